"""`--method meta`: pixel-wise meta-reweighting of noisy masks.

Mirikharaji, Yan, Hamarneh, "Learning to Segment Skin Lesions from Noisy
Annotations" (MICCAI DART 2019), eq. 6-9, extending Ren et al., "Learning to
Reweight Examples for Robust Deep Learning" (ICML 2018).

This module owns the method (`meta` and `image-reweight`), its `[meta]` config
table, building the compiled model and the noisy/clean data streams. The step
itself (eq. 6-9) and the wrapper model `MetaReweighter` are in `reweight_step`,
the TensorBoard weight maps (Fig. 3) in `reweight_maps`.

`granularity="image"` is `--method image-reweight`, Ren et al.'s L2RW: the
same step with one weight per image on the image's mean pixel loss instead
of one weight per pixel.
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import tensorflow as tf

from lesionkeras import config
from lesionkeras import losses
from lesionkeras import metrics as metrics_lib
from lesionkeras.data import pipeline
from lesionkeras.data.noise import simulate_noise
from lesionkeras.data import layout, sources
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.methods.reweight_maps import callbacks
from lesionkeras.methods.reweight_step import MetaReweighter
from lesionkeras.models.second_order import second_order_blockers
from lesionkeras.training import method, segmentation
from lesionkeras.training.method import Stage
from lesionkeras.training.segmentation import SegmentationMethod


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    meta_grad: str = config.field(
        "forward",
        "meta: how eq. 7 is differentiated: `forward` (closed form at W0 = 0, one "
        "forward-mode pass; the default, faster and lighter) or `nested` tapes (the reference).",
        choices=("nested", "forward"), flag=True)
    clean_batch_size: int = config.field(10, "meta: clean images per step (paper: 10).", minimum=1, flag=True)
    simulate_noise: str = config.field(
        "",
        "meta: experiment mode, replace the masks of all training images but `clean_count` "
        "by this polygon noise (`7-vertex`, `3-vertex`, `4-axis`, `maximal`; empty = off).",
        choices=("", "7-vertex", "3-vertex", "4-axis", "maximal"), flag=True)
    clean_count: int = config.field(
        16, "meta: clean training images kept by `simulate_noise`.", minimum=1, flag=True)
    clean_in_noisy: bool = config.field(
        True,
        "meta, image-reweight, finetune: the clean training images also train in the noisy "
        "stream, with their clean masks (the paper's D^c in D^n); false = noisy images only.", flag=True)
    noisy_data: str = config.field("", "meta: folder of images with noisy masks (real use).", flag=True)
    clean_data: str = config.field(
        "", "meta: folder of images with clean masks (real use; also gives the validation split).", flag=True)
    finetune_epochs: int = config.field(
        10, "finetune (and meta with `then_finetune`): epochs on the clean images after "
        "`train.epochs` on the noisy ones.",
        minimum=1, flag=True)
    then_finetune: bool = config.field(
        False, "meta, image-reweight: after `train.epochs` of meta-training, fine-tune on the "
        "clean images for `finetune_epochs` at `finetune_lr` (the fine-tuning baseline's stage).", flag=True)
    finetune_lr: float = config.field(
        0.0, "finetune: learning rate of the clean stage (0 = train.lr / 10).", minimum=0.0, flag=True)
    weight_image_every: int = config.field(
        5, "meta: write the weight maps (and with simulated noise the Fig. 3 overlay) to "
        "TensorBoard every N epochs (0 = never).", minimum=0,
    )


config.register_section("meta", MetaConfig)


# ---------------------------------------------------------------------- #
# Building, data
# ---------------------------------------------------------------------- #


def build(cfg, steps_per_epoch=None):
    """The compiled `MetaReweighter` for `cfg` (call inside the strategy scope).

    `method = "meta"` weighs pixels, `method = "image-reweight"` images.
    """
    if cfg.train.mixed_precision:
        raise ConfigError(
            f"`train.mixed_precision` is not supported by `method = \"{cfg.method}\"`"
        )
    network = segmentation.build_model(cfg)
    optimizer = segmentation.make_optimizer(cfg.train, steps_per_epoch)
    # The network is compiled too (same optimiser), so that its saved
    # checkpoints load and evaluate as the baseline's do.
    network.compile(
        optimizer=optimizer,
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics_lib.default_metrics(threshold=cfg.train.threshold, from_logits=True),
    )
    granularity = "image" if cfg.method == "image-reweight" else "pixel"
    model = MetaReweighter(
        network, meta_grad=cfg.meta.meta_grad, granularity=granularity,
        threshold=cfg.train.threshold,
    )
    check_second_order(network, cfg)
    model.compile(optimizer=optimizer, jit_compile=False)
    model.optimizer.build(network.trainable_variables)
    return model


def check_second_order(network, cfg):
    """Refuses a network whose second derivatives TensorFlow would drop or get wrong.

    Eq. 7 differentiates the training gradient; an op without an exact second
    derivative (e.g. Keras' bilinear `UpSampling2D`) would silently corrupt the
    weights instead of failing.

    Raises:
        ConfigError: naming the first such layer and op.
    """
    blockers = second_order_blockers(network)
    if blockers:
        layer, op, reason = blockers[0]
        more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
        raise ConfigError(
            f"model `{cfg.model_name}` cannot be trained with `method = \"{cfg.method}\"`: "
            f"layer `{layer}` runs `{op}`{more}, whose derivative eq. 7 needs, but {reason}; "
            "build it from layers with exact second derivatives (e.g. "
            "lesionkeras.models.layers.BilinearUpSampling2D for bilinear up-sampling)"
        )


def load_manifest(cfg):
    """Real use (`meta.noisy_data` + `meta.clean_data`), else None.

    Rows of the noisy folder train the noisy stream; the clean folder is
    split by `data.val_fraction` (seeded) into the clean stream and the
    validation set (noisy masks cannot validate).
    """
    m = cfg.meta
    if not (m.noisy_data or m.clean_data):
        return None
    if not (m.noisy_data and m.clean_data):
        raise ConfigError("`meta.noisy_data` and `meta.clean_data` go together; give both")
    noisy = layout.build_manifest(m.noisy_data)
    clean = sources.load_manifest(m.clean_data)
    noisy = noisy.assign(id="noisy/" + noisy["id"], clean=False, split="train")
    clean = pipeline.assign_splits(
        clean.assign(split=""), val_fraction=cfg.data.val_fraction, seed=cfg.seed
    )
    clean = clean.assign(id="clean/" + clean["id"], clean=True)
    if cfg.data.limit:
        noisy = noisy.iloc[: cfg.data.limit]
    return pd.concat([noisy, clean], ignore_index=True)


def prepare_manifest(cfg, df):
    """Marks clean/noisy training rows (simulated noise or real folders)."""
    m = cfg.meta
    if m.simulate_noise:
        if m.noisy_data or m.clean_data:
            raise ConfigError("`meta.simulate_noise` cannot be combined with `meta.noisy_data`")
        return simulate_noise(df, m.simulate_noise, m.clean_count, cfg.seed)
    if not (m.noisy_data or m.clean_data):
        raise ConfigError(
            f"`method = \"{cfg.method}\"` needs clean and noisy masks: give `--simulate-noise LEVEL "
            "--clean-count K`, or `--noisy-data DIR --clean-data DIR`"
        )
    return df


def _clean_stream(decoded, *, batch_size, mean, std, augment, crop_size, seed):
    """Shuffled clean batches, repeating forever (full batches only)."""
    return pipeline.make_dataset(
        decoded, batch_size=batch_size, mean=mean, std=std, training=True, augment=augment,
        crop_size=crop_size, seed=seed, repeat=True,
    )


def split_streams(cfg, train_df):
    """The training rows of the noisy stream and of the clean (meta) set.

    The paper's protocol (Mirikharaji et al. 2019, sec. 2: D^c is a subset of
    D^n) keeps the clean images in the noisy training stream, with their clean
    masks, besides forming the clean set; `meta.clean_in_noisy = false` trains
    the noisy stream on the noisy images alone.

    Returns:
        (noisy_df, clean_df), both with a fresh index.

    Raises:
        DataError: no noisy or no clean training image.
    """
    is_clean = train_df["clean"].astype(bool)
    n_noisy, n_clean = int((~is_clean).sum()), int(is_clean.sum())
    if not n_noisy or not n_clean:
        raise DataError(
            f"{cfg.data.source}: `method = \"{cfg.method}\"` needs both noisy and clean training "
            f"images (found {n_noisy} noisy, {n_clean} clean)"
        )
    noisy_df = train_df if cfg.meta.clean_in_noisy else train_df[~is_clean]
    return noisy_df.reset_index(drop=True), train_df[is_clean].reset_index(drop=True)


def stages(cfg, train_df, mean, std):
    """Meta-training for `train.epochs`; with `meta.then_finetune`, then the clean stage.

    The clean stage is the fine-tuning baseline's (`method = "finetune"`): plain BCE
    steps on the clean training images for `meta.finetune_epochs` epochs at
    `meta.finetune_lr` (default `train.lr / 10`), continuing the same optimiser.

    Returns:
        list of `Stage` for the run loop.
    """
    out = [Stage(train_dataset(cfg, train_df, mean, std), cfg.train.epochs)]
    if cfg.meta.then_finetune:
        clean = plain_train_dataset(cfg, split_streams(cfg, train_df)[1], mean, std).map(
            lambda x, y: {"noisy_image": x, "noisy_mask": y}
        )
        lr = cfg.meta.finetune_lr or cfg.train.lr / 10.0
        out.append(Stage(clean, cfg.meta.finetune_epochs, lr, _to_plain_steps))
    return out


def plain_train_dataset(cfg, df, mean, std):
    """Training batches of `df` as plain supervised training sees them (`train.batch_size`)."""
    d = cfg.data
    return pipeline.make_dataset(
        pipeline.decoded_dataset(df, d.image_size, cache=d.cache, color_constancy=d.color_constancy),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
    )


def _to_plain_steps(model):
    model.plain = True
    model.train_function = None  # traced anew with plain steps


def train_dataset(cfg, train_df, mean, std):
    """Zipped noisy batches (`train.batch_size`) and repeating clean batches."""
    d = cfg.data
    noisy_df, clean_df = split_streams(cfg, train_df)
    noisy = pipeline.make_dataset(
        pipeline.decoded_dataset(
            noisy_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
        ),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
    )
    clean = _clean_stream(
        pipeline.decoded_dataset(
            clean_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
        ),
        batch_size=cfg.meta.clean_batch_size, mean=mean, std=std, augment=cfg.augment,
        crop_size=d.crop_size, seed=cfg.seed + 1,
    )
    both = tf.data.Dataset.zip((noisy, clean)).map(
        lambda a, b: {
            "noisy_image": a[0], "noisy_mask": a[1], "clean_image": b[0], "clean_mask": b[1],
        }
    )
    return both.prefetch(tf.data.AUTOTUNE)


@method.register
class Reweight(SegmentationMethod):
    """Meta-learned pixel weights (`meta`, Mirikharaji et al. 2019, eq. 6-9) or image
    weights (`image-reweight`, Ren et al. 2018), from a small clean set."""

    names = ("meta", "image-reweight")

    def load_manifest(self):
        return load_manifest(self.cfg)

    def prepare_manifest(self, df):
        return prepare_manifest(self.cfg, df)

    def prepare(self, data):
        split_streams(self.cfg, data.train_df)  # refuses a run without both, before any write
        super().prepare(data)

    def stages(self, data):
        return stages(self.cfg, data.train_df, data.mean, data.std)

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def method_callbacks(self, data):
        return callbacks(self.cfg, data.train_df, data.mean, data.std)
