"""`--method smile` and `--method multiclass`: K structures with missing labels.

SMILE (Petit, Thome, Soler et al. 2018): K independent sigmoid heads, each
trained with a per-pixel binary cross-entropy weighted by a binary map w_k
(1 everywhere if structure k is annotated in the image, else 1 only on
pixels annotated as another structure), normalised by the number of
weighted pixels. The maps are computed in the `tf.data` pipeline
(`data.missing.smile_weights`) and reach the loss as Keras' `sample_weight`,
so the model is a plain functional model trained by `model.fit`; its
checkpoints load and evaluate like any other.

`multiclass` is the naive comparison: the same K sigmoid heads with every
weight 1, i.e. a structure that was not annotated counts as background.
(The paper's baseline is a (K+1)-way softmax; the ISIC attributes overlap
each other and lie inside the lesion, so one label per pixel does not fit
them, and the K-sigmoid form isolates the effect of the weight maps.)
"""

from __future__ import annotations

from pathlib import Path

import keras

from lesionkeras import losses, metrics
from lesionkeras.data import missing
from lesionkeras.models import registry
from lesionkeras.trainers import baseline


def structures(cfg) -> tuple:
    """The structure names of `cfg.smile.structures`."""
    return missing.parse_structures(cfg.smile.structures)


def structure_metrics(names, threshold=0.5):
    """Mean Dice/Jaccard/sensitivity/specificity over structures, and Dice per structure."""
    out = [
        metrics.Dice(threshold=threshold, name="dice"),
        metrics.Jaccard(threshold=threshold, name="jaccard"),
        metrics.Sensitivity(threshold=threshold, name="sensitivity"),
        metrics.Specificity(threshold=threshold, name="specificity"),
    ]
    out += [
        metrics.Dice(threshold=threshold, class_id=k, name=f"dice_{name}")
        for k, name in enumerate(names)
    ]
    return out


def build(cfg, steps_per_epoch=None):
    """The compiled K-head model for `cfg` (call inside the strategy scope)."""
    names = structures(cfg)
    model = registry.build(
        cfg.model_name,
        input_shape=(None, None, 3),
        out_channels=len(names),
        **baseline.model_options(cfg.model, cfg.model_name),
    )
    model.compile(
        optimizer=baseline.make_optimizer(cfg.train, steps_per_epoch),
        loss=losses.SmileLoss(),
        metrics=structure_metrics(names, cfg.train.threshold),
        jit_compile=baseline.jit_option(cfg.train),
    )
    return model


def prepare_manifest(cfg, df):
    """Annotated flags of every structure; simulated missing labels on the training rows."""
    names = structures(cfg)
    df = missing.annotate(
        df, names, empty_means_missing=cfg.smile.empty_means_missing, source=cfg.data.source
    )
    if cfg.smile.simulate_missing:
        df = missing.drop_annotations(
            df, names, cfg.smile.simulate_missing, cfg.seed,
            rows=(df["split"] == "train").to_numpy(),
        )
    return df


def _record_annotations(cfg, train_df, names):
    """`annotations.csv` in the run directory: which labels training used / dropped."""
    if not cfg.out or not Path(cfg.out).is_dir():
        return
    cols = ["id"] + [f"annotated_{s}" for s in names]
    cols += [f"dropped_{s}" for s in names if f"dropped_{s}" in train_df]
    train_df[cols].to_csv(Path(cfg.out) / "annotations.csv", index=False)


def container_index(cfg, names):
    """Channel of `smile.container` among `names`, or None (paper's rule)."""
    c = cfg.smile.container
    return names.index(c) if c and c in names and len(names) > 1 else None


def train_dataset(cfg, train_df, mean, std):
    """Batches of (image, K masks, weight maps); all-ones maps for `multiclass`."""
    names = structures(cfg)
    _record_annotations(cfg, train_df, names)
    d = cfg.data
    return missing.make_dataset(
        missing.decoded_dataset(train_df, names, d.image_size, cache=d.cache),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
        with_weights=cfg.method == "smile", container=container_index(cfg, names),
    )


def val_dataset(cfg, val_df, mean, std, batch_size):
    """Validation batches with every structure's truth as annotated in the data."""
    names = structures(cfg)
    d = cfg.data
    val_df = val_df.copy()
    for s in names:
        # Annotations removed by `data drop-labels` still score the validation images.
        if f"dropped_{s}" in val_df:
            val_df[f"annotated_{s}"] = val_df[f"annotated_{s}"] | val_df[f"dropped_{s}"].astype(bool)
    return missing.make_dataset(
        missing.decoded_dataset(val_df, names, d.image_size, cache=d.cache),
        batch_size=batch_size, mean=mean, std=std, training=False, crop_size=d.crop_size,
        with_weights=cfg.method == "smile", container=container_index(cfg, names),
    )


def load_model(path):
    """Loads a checkpoint saved by this trainer (plain `keras.saving.load_model`)."""
    return keras.saving.load_model(path)
