"""`--method smile` and `--method multiclass`: K structures with missing labels.

SMILE (Petit, Thome, Soler et al. 2018): K independent sigmoid heads, each
trained with a per-pixel binary cross-entropy weighted by a binary map w_k
(1 everywhere if structure k is annotated in the image, else 1 only on
pixels annotated as another structure), normalised by the number of
weighted pixels. The maps are computed in the `tf.data` pipeline
(`data.missing.smile_weights`) and reach the loss as Keras' `sample_weight`,
so the model is a plain functional model trained by `model.fit`; its
checkpoints load and evaluate like any other.

`multiclass` is the paper's baseline: one (K+1)-way softmax (background +
K structures) trained with plain cross-entropy, so a structure that was not
annotated counts as background. Its labels come from the K masks with
`losses.multiclass_labels`: a pixel inside several structures takes the one
listed last in `smile.structures`, except the `smile.container` (the lesion)
which loses to every other structure, so an attribute pixel is labelled with
the attribute. The model outputs K + 1 logits (channel 0 = background);
`losses.multiclass_probabilities` turns them back into K per-structure
probabilities (the container's is 1 - p(background)) for the metrics,
`evaluate` and `predict`, so both methods are scored the same way.

SMILEr (`smile.relabel_rounds` > 0): the relabelling rounds are further
stages of the same run after SMILE training (`Relabelling`). A manifest CSV of `.npy` volumes is sliced
into 2D samples by `load_manifest` (`missing.slice_volumes`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from lesionkeras import config, files
from lesionkeras import losses, metrics
from lesionkeras.errors import ConfigError
from lesionkeras.data import missing
from lesionkeras.models import registry
from lesionkeras.training import method, segmentation
from lesionkeras.training.method import Stage
from lesionkeras.training.segmentation import SegmentationMethod
from lesionkeras.data import pipeline
from lesionkeras.data import synthetic
from lesionkeras.inference import predictor as inference_predictor


# An image may lack the lesion (`mask`) file: the lesion is then not annotated,
# and `missing.annotate` checks the files of every structure.


def structures(cfg) -> tuple:
    """The structure names of `cfg.smile.structures`."""
    return missing.parse_structures(cfg.smile.structures)


def structure_metrics(names, threshold=0.5, softmax_container=False):
    """Mean Dice/Jaccard/sensitivity/specificity over structures, and Dice per structure.

    `softmax_container`: False for K sigmoid heads; for the (K+1)-way softmax
    of `multiclass`, the container channel (int) or None.
    """
    if softmax_container is not False:
        def score(kind, **kw):
            return metrics.SoftmaxStructureScore(
                kind, container=softmax_container, threshold=threshold, **kw
            )

        out = [score(kind, name=kind) for kind in ("dice", "jaccard", "sensitivity", "specificity")]
        return out + [
            score("dice", class_id=k, name=f"dice_{name}") for k, name in enumerate(names)
        ]
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


@dataclasses.dataclass(frozen=True)
class SmileConfig:
    structures: str = config.field(
        "lesion,globules,milia_like_cyst,negative_network,pigment_network,streaks",
        "smile/multiclass: comma-separated structures (K sigmoid heads); `lesion` is the "
        "`mask` column, any other name the `attr_<name>` column of the manifest.", flag=True)
    empty_means_missing: bool = config.field(
        False,
        "smile/multiclass: an empty mask file means `not annotated` (default: annotated "
        "and absent; a missing file always means not annotated).", flag="--empty-means-missing/--empty-means-absent")
    simulate_missing: float = config.field(
        0.0,
        "smile/multiclass: experiment mode, drop each structure's annotation from this "
        "fraction of the training images (independently per structure, seeded; 0 = off).",
        minimum=0.0, maximum=1.0, flag=True)
    container: str = config.field(
        "lesion",
        "smile: the structure that encloses the others (dermoscopic attributes lie inside "
        "the lesion), so that known labels follow the nesting; empty = the paper's rule "
        "for mutually exclusive structures.",
    )
    relabel_rounds: int = config.field(
        0,
        "smile: SMILEr rounds T after SMILE training (0 = off); round t adds the top "
        "t / T * gamma_max of the predicted-positive unknown pixels of each non-annotated "
        "structure as positive labels, then retrains (warm start).",
        minimum=0, flag=True)
    gamma_max: float = config.field(
        1.0, "smile: SMILEr fraction of the candidate pixels added in the last round.",
        minimum=0.0, maximum=1.0, flag=True)
    relabel_epochs: int = config.field(5, "smile: training epochs of each SMILEr round.", minimum=1, flag=True)
    uncertainty: str = config.field(
        "score",
        "smile: SMILEr pixel choice: `score` (highest probability first) or `mc-dropout` "
        "(lowest MC-dropout standard deviation first; needs a model with dropout > 0).",
        choices=("score", "mc-dropout"), flag=True)
    mc_samples: int = config.field(10, "smile: MC-dropout samples of `uncertainty = mc-dropout`.", minimum=2, flag=True)


def check_section(cfg, origin):
    """Rules of `[smile]` that involve other tables."""
    if cfg.data.color_constancy != "none" and cfg.method in ("smile", "multiclass"):
        raise ConfigError(
            f"{origin}: `data.color_constancy` is not supported by `method = {cfg.method!r}` "
            "yet; use \"none\""
        )


config.register_section("smile", SmileConfig, check_section)


def build(cfg, steps_per_epoch=None):
    """The compiled K-head model for `cfg` (call inside the strategy scope)."""
    names = structures(cfg)
    softmax = cfg.method == "multiclass"
    model = registry.build(
        cfg.model_name,
        input_shape=(None, None, 3),
        out_channels=len(names) + 1 if softmax else len(names),
        **segmentation.model_options(cfg.model, cfg.model_name),
    )
    container = container_index(cfg, names)
    model.compile(
        optimizer=segmentation.make_optimizer(cfg.train, steps_per_epoch),
        loss=losses.MulticlassLoss(container) if softmax else losses.SmileLoss(),
        metrics=structure_metrics(
            names, cfg.train.threshold, softmax_container=container if softmax else False
        ),
        jit_compile=segmentation.jit_option(cfg.train),
    )
    return model


def load_manifest(cfg):
    """A volume manifest (`.npy` stacks) sliced into 2D samples, else None (the usual sources).

    The slices are written as PNG files below the cache folder
    (`$LESIONKERAS_CACHE/volumes/<hash of the manifest path>/`), rewritten at every run.
    """
    source = cfg.data.source
    if not missing.is_volume_manifest(source):
        return None

    key = hashlib.sha1(str(Path(source).resolve()).encode()).hexdigest()[:12]
    df = missing.slice_volumes(source, structures(cfg), synthetic.cache_root() / "volumes" / key)
    if cfg.data.limit:
        df = df.iloc[: cfg.data.limit].reset_index(drop=True)
    return df


def prepare_manifest(cfg, df):
    """Annotated flags of every structure; simulated missing labels on the training rows.

    Slices of volumes (a `volume` column) are split and lose labels per volume.
    """
    _check_relabel(cfg)
    names = structures(cfg)
    volumes = "volume" in df
    if volumes:
        df = missing.split_by_volume(df, cfg.data.val_fraction, cfg.seed)
    df = missing.annotate(
        df, names, empty_means_missing=cfg.smile.empty_means_missing, source=cfg.data.source
    )
    if cfg.smile.simulate_missing:
        drop = missing.drop_annotations_by_volume if volumes else missing.drop_annotations
        df = drop(
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
    files.write_text(Path(cfg.out) / "annotations.csv", train_df[cols].to_csv(index=False))


def container_index(cfg, names):
    """Channel of `smile.container` among `names`, or None (paper's rule)."""
    c = cfg.smile.container
    return names.index(c) if c and c in names and len(names) > 1 else None


def train_dataset(cfg, train_df, mean, std):
    """Batches of (image, K masks, weight maps); all-ones maps for `multiclass`."""
    names = structures(cfg)
    _record_annotations(cfg, train_df, names)
    d = cfg.data
    return _for_method(cfg, missing.make_dataset(
        missing.decoded_dataset(train_df, names, d.image_size, cache=d.cache),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
        with_weights=cfg.method == "smile", container=container_index(cfg, names),
    ))


def _for_method(cfg, ds):
    """`multiclass` trains on (image, K masks): its loss builds one label per pixel."""
    if cfg.method == "multiclass":
        return ds.map(lambda image, masks, weights: (image, masks))
    return ds


def val_dataset(cfg, val_df, mean, std, batch_size):
    """Validation batches with every structure's truth as annotated in the data."""
    names = structures(cfg)
    d = cfg.data
    val_df = val_df.copy()
    for s in names:
        # Annotations removed by `data drop-labels` still score the validation images.
        if f"dropped_{s}" in val_df:
            val_df[f"annotated_{s}"] = val_df[f"annotated_{s}"] | val_df[f"dropped_{s}"].astype(bool)
    return _for_method(cfg, missing.make_dataset(
        missing.decoded_dataset(val_df, names, d.image_size, cache=d.cache),
        batch_size=batch_size, mean=mean, std=std, training=False, crop_size=d.crop_size,
        with_weights=cfg.method == "smile", container=container_index(cfg, names),
    ))


def _check_relabel(cfg):
    """Bad SMILEr settings, caught before anything is written."""
    sm = cfg.smile
    if sm.relabel_rounds and cfg.method != "smile":
        raise ConfigError(f"`smile.relabel_rounds` (SMILEr) needs `method = \"smile\"`. "
                          f"Received: method = {cfg.method!r}")
    if sm.relabel_rounds and sm.uncertainty == "mc-dropout" and not (
        registry.capabilities(cfg.model_name).mc_dropout and cfg.model.dropout > 0
    ):
        raise ConfigError(
            "`smile.uncertainty = \"mc-dropout\"` needs a model with an MC-dropout layer "
            f"(a resnet*_deeplab or deeplabv3plus with model.dropout > 0). Received: model {cfg.model_name!r}, "
            f"dropout {cfg.model.dropout}"
        )


def _stack(df, names, size):
    """All rows of `df` as numpy (images uint8, masks float32, flags float32)."""
    ds = missing.decoded_dataset(df, names, size, cache=False).batch(max(len(df), 1))
    images, masks, flags = ds.get_single_element()
    return images.numpy(), masks.numpy().astype(np.float32), flags.numpy()


class Relabelling:
    """SMILEr (Petit, Thome et al. 2018, Algorithm 1) as stages of the run loop.

    Round t = 1..T is one `Stage` of `smile.relabel_epochs` epochs. When it
    starts, the model so far (round 1: the best SMILE checkpoint, kept as
    `smile.keras`) predicts on the training images, and for every
    non-annotated structure the top gamma_t = t / T * gamma_max of its
    predicted-positive unknown pixels (`missing.relabel`; highest score, or
    lowest MC-dropout std with `smile.uncertainty = "mc-dropout"`) are added as
    positive labels (union with the earlier rounds); the round then trains on
    them. `model.keras` is the best epoch of the rounds. When the full truth is
    known (`dropped_<name>` columns of simulated missing labels) the added
    pixels are counted as true or false positives, the paper's key indicator.

    Run directory: `relabel_state.npz` (the labels added so far, so a resumed
    round trains on the same labels), `relabel.csv` (round, gamma, structure,
    added, true/false positives, validation Dice at the round's end) and
    per-round scalars in `tensorboard/smiler/`.

    Args:
        cfg: `Config` with `method = "smile"` and `out` the run directory.
        train_df: the training rows of the manifest.
        mean, std: normalisation statistics (0-255 scale).
        log: callable for status lines.
    """

    STATE = "relabel_state.npz"

    def __init__(self, cfg, train_df, mean, std, log=print):
        self.cfg, self.train_df, self.mean, self.std, self.log = cfg, train_df, mean, std, log
        self.names = structures(cfg)
        self.run_dir = Path(cfg.out)
        self.first_epoch = 0
        self._arrays = None

    def stages(self, first_epoch) -> list:
        """One `Stage` per round; the rounds start at epoch `first_epoch` (0-based)."""
        self.first_epoch = first_epoch
        sm = self.cfg.smile
        return [
            Stage(functools.partial(self.dataset, t), sm.relabel_epochs,
                  setup=self.warm_start if t == 1 else _previous_round, new_best=t == 1)
            for t in range(1, sm.relabel_rounds + 1)
        ]

    def warm_start(self, model):
        """Round 1 starts from the best SMILE checkpoint, copied once to `smile.keras`."""
        smile_ckpt, best = self.run_dir / "smile.keras", self.run_dir / "model.keras"
        if not smile_ckpt.exists() and best.exists():
            files.copy(best, smile_ckpt)
        if smile_ckpt.exists():
            model.load_weights(smile_ckpt)

    def _load(self):
        if self._arrays is None:
            names, size = self.names, self.cfg.data.image_size
            images, masks, flags = _stack(self.train_df, names, size)
            container = container_index(self.cfg, names)
            if container is not None:
                targets, weights = missing.nested_targets_and_weights(masks, flags, container)
            else:
                targets, weights = masks, missing.smile_weights(masks, flags)
            # The full truth of labels removed by the simulation, to score the added pixels.
            known, truth = np.zeros_like(flags, dtype=bool), None
            if any(f"dropped_{s}" in self.train_df for s in names):
                full = self.train_df.copy()
                for k, s in enumerate(names):
                    if f"dropped_{s}" in full:
                        dropped = full[f"dropped_{s}"].to_numpy(bool)
                        known[:, k] = dropped & (flags[:, k] <= 0)
                        full[f"annotated_{s}"] = full[f"annotated_{s}"].to_numpy(bool) | dropped
                truth = _stack(full, names, size)[1] > 0.5
            self._arrays = dict(
                images=images, flags=flags, known=known, truth=truth,
                targets=np.asarray(targets, np.float32), weights=np.asarray(weights, np.float32))
        return self._arrays

    def _state(self):
        path = self.run_dir / self.STATE
        if not path.exists():
            return None
        with np.load(path) as z:
            return {"round": int(z["round"]), "added": z["added"],
                    "rows": json.loads(str(z["rows"]))}

    def _added(self, t, model):
        """The labels added through round t: computed now, or read back on resume."""
        state = self._state()
        if state is not None and state["round"] >= t:
            return state["added"]
        a, sm = self._load(), self.cfg.smile
        gamma = t / sm.relabel_rounds * sm.gamma_max
        x = pipeline.normalizer(self.mean, self.std)(
            tf.convert_to_tensor(a["images"], tf.float32)).numpy()
        if sm.uncertainty == "mc-dropout":
            scores, sd = inference_predictor.mc_dropout_predict(
                model, x, samples=sm.mc_samples, batch_size=self.cfg.train.batch_size)
        else:
            logits = model.predict(x, batch_size=self.cfg.train.batch_size, verbose=0)
            scores, sd = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float32))), None
        added = np.zeros_like(a["weights"], dtype=bool) if state is None else state["added"]
        added = added | missing.relabel(a["weights"], a["flags"], scores, gamma,
                                        threshold=self.cfg.train.threshold, std=sd)
        rows = ([] if state is None else state["rows"]) + self._score(t, gamma, added)
        with files.atomic_path(self.run_dir / self.STATE) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, round=t, added=added, rows=json.dumps(rows))
        return added

    def _score(self, t, gamma, added):
        """Rows of round t (one per structure), TensorBoard scalars and the status line."""
        a, rows = self._arrays, []
        writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard" / "smiler"))
        with writer.as_default(step=t):
            tf.summary.scalar("smiler/gamma", gamma)
            tf.summary.scalar("smiler/added_pixels", float(added.sum()))
            for k, s in enumerate(self.names):
                row = {"round": t, "gamma": gamma, "structure": s,
                       "added": int(added[..., k].sum())}
                if a["truth"] is not None and a["known"][:, k].any():
                    scored = added[..., k] & a["known"][:, None, None, k]
                    row["true_positives"] = int((scored & a["truth"][..., k]).sum())
                    row["false_positives"] = int((scored & ~a["truth"][..., k]).sum())
                    tf.summary.scalar(f"smiler/true_positives_{s}", row["true_positives"])
                    tf.summary.scalar(f"smiler/false_positives_{s}", row["false_positives"])
                tf.summary.scalar(f"smiler/added_{s}", row["added"])
                rows.append(row)
        writer.close()
        tp = sum(r.get("true_positives", 0) for r in rows)
        fp = sum(r.get("false_positives", 0) for r in rows)
        scored_note = f", {tp} true / {fp} false positives" if a["truth"] is not None else ""
        self.log(f"SMILEr round {t}/{self.cfg.smile.relabel_rounds}: gamma {gamma:.2f}, "
                 f"{int(added.sum())} labels added{scored_note}")
        return rows

    def dataset(self, t, model):
        """Round t's training batches: (image, K targets, K weight maps) with the added labels."""
        added = self._added(t, model)
        a, cfg = self._load(), self.cfg
        kk = len(self.names)
        targets = np.maximum(a["targets"], added).astype(np.float32)
        weights = np.maximum(a["weights"], added).astype(np.float32)
        decoded = tf.data.Dataset.from_tensor_slices(
            (a["images"], np.concatenate([targets, weights], -1)))
        # The one batch builder: shuffle and augmentation (targets and weight maps
        # moved with the image) keyed by the epoch.
        return pipeline.make_dataset(
            decoded, batch_size=cfg.train.batch_size, mean=self.mean, std=self.std,
            training=True, augment=cfg.augment, seed=cfg.seed + t,
            finish=lambda i, m: (i, m[..., :kk], m[..., kk:]))

    def write_table(self):
        """`relabel.csv`: the rounds' rows, with the validation Dice at each round's end."""
        state = self._state()
        if state is None:
            return
        table = pd.DataFrame(state["rows"])
        hist_path = self.run_dir / "history.csv"
        hist = pd.read_csv(hist_path) if hist_path.exists() else pd.DataFrame()
        epochs = self.cfg.smile.relabel_epochs

        def val_dice(row):
            end = self.first_epoch + row["round"] * epochs - 1
            at = hist[hist["epoch"] == end] if "epoch" in hist else hist.iloc[:0]
            col = f"val_dice_{row['structure']}"
            return float(at[col].iloc[-1]) if len(at) and col in at else float("nan")

        table["val_dice"] = table.apply(val_dice, axis=1)
        with files.atomic_path(self.run_dir / "relabel.csv") as tmp:
            table.to_csv(tmp, index=False)


def _previous_round(model):
    """Rounds after the first continue from the previous round's weights (the run
    loop loads them from the backup when a run resumes at a round's start)."""


@method.register
class Smile(SegmentationMethod):
    """K structures with missing labels: SMILE(r) (Petit, Thome et al. 2018) and its
    softmax baseline `multiclass`."""

    names = ("smile", "multiclass")
    default_model = "resnet18_deeplab"
    require_masks = False  # an image whose lesion is not annotated still trains the others

    def load_manifest(self):
        return load_manifest(self.cfg)

    def prepare_manifest(self, df):
        return prepare_manifest(self.cfg, df)

    relabelling = None

    def stages(self, data):
        out = [Stage(train_dataset(self.cfg, data.train_df, data.mean, data.std),
                     self.cfg.train.epochs)]
        if self.cfg.method == "smile" and self.cfg.smile.relabel_rounds:
            self.relabelling = Relabelling(self.cfg, data.train_df, data.mean, data.std,
                                           self.log)
            out += self.relabelling.stages(first_epoch=self.cfg.train.epochs)
        return out

    def val_dataset(self, data, keep, batch_size):
        return val_dataset(self.cfg, data.val_df.iloc[:keep], data.mean, data.std, batch_size)

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def after_fit(self, best, val_ds, data, log):
        if self.relabelling is not None:
            self.relabelling.write_table()
        return best
