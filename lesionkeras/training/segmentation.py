"""`SegmentationMethod`: the ISIC Task 1 defaults every lesion-segmentation method builds on.

Data: a Task 1 manifest (image + mask) from `data.source`, validated, split by
`data.val_fraction` / `data.val_list` / folds; decoded once and cached;
normalised by the training split's statistics (or ImageNet's, or fixed ones).
Model: the registered network of `model.name`, compiled with `train.loss`,
the per-image metrics and `train.optimizer` + `train.schedule`. Callbacks:
learning-rate log, encoder freezing, schedule callbacks and the TensorBoard
image grid. A method overrides only what it changes (e.g. `train_dataset`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lesionkeras import losses, metrics, schedules
from lesionkeras.schedules import make_optimizer
from lesionkeras.data import check, pipeline, sources
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.models import registry
from lesionkeras.training.callbacks import ImageGrid, LearningRateLogger
from lesionkeras.training.method import Method, RunData, Stage
from lesionkeras.training.stages import FreezeEncoder, check_freeze_encoder

MODEL_OPTIONS = ("depth", "filters", "batch_norm", "dropout", "upsampling", "encoder_weights",
                 "encoder_filters", "output_stride")


def model_options(model_cfg, name=None):
    """The `[model]` options that the builder `name` (default: `model_cfg.name`) accepts."""
    opts = {k: getattr(model_cfg, k) for k in MODEL_OPTIONS}
    return registry.accepted_options(name or model_cfg.name or "unet", opts)


def build_model(cfg, out_channels=1):
    """The uncompiled network of `cfg.model_name` with `out_channels` logits per pixel."""
    return registry.build(
        cfg.model_name,
        input_shape=(None, None, 3),
        out_channels=out_channels,
        **model_options(cfg.model, cfg.model_name),
    )


def jit_option(train_cfg):
    return {"auto": "auto", "true": True, "false": False}[train_cfg.jit_compile]


def compile_plain(model, cfg, steps_per_epoch=None):
    """Compiles `model` for plain supervised training (loss, metrics, optimiser of `cfg`)."""
    model.compile(
        optimizer=make_optimizer(cfg.train, steps_per_epoch),
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics.default_metrics(threshold=cfg.train.threshold, from_logits=True),
        jit_compile=jit_option(cfg.train),
    )
    return model


def check_sizes(cfg):
    """The model is a segmentation network and the input size fits its depth."""
    segmenters = registry.names(task="segment")
    if cfg.model_name not in segmenters:
        raise ConfigError(
            f"`--model {cfg.model_name}` is not a segmentation model; choose from "
            f"{', '.join(segmenters)}"
        )
    multiple = registry.size_multiple(cfg.model_name, model_options(cfg.model, cfg.model_name))
    size = cfg.data.crop_size or cfg.data.image_size
    if size % multiple:
        raise ConfigError(
            f"`data.image_size`/`data.crop_size` ({size}) must be a multiple of {multiple} "
            f"for `{cfg.model_name}` (its encoder halves the input {multiple.bit_length() - 1} "
            "times)"
        )


def summarize_warnings(report) -> list[str]:
    """One line per kind of warning, so a folder of 2000 grey masks is one line, not 2000."""
    lines = []
    by_kind = {}
    for p in report.warnings:
        kind = p.message.split(";")[0].split(",")[0]
        by_kind.setdefault(kind, []).append(p)
    for kind, items in by_kind.items():
        first = items[0]
        more = f" (and {len(items) - 1} more files)" if len(items) > 1 else ""
        lines.append(f"warning: {first.path}: {first.message}{more}")
    return lines


def read_val_list(path, df):
    """The image ids listed in the text file `path`, all of them in `df`."""
    try:
        ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"{path}: cannot read validation list ({e.strerror})") from None
    unknown = sorted(set(ids) - set(df["id"]))
    if unknown:
        raise DataError(f"{path}: {len(unknown)} ids are not in the data (first: {unknown[0]})")
    return ids


class SegmentationMethod(Method):
    """Plain supervised lesion segmentation; the base of every Task 1 method."""

    task = "segment"
    monitor = "dice"
    resume_keys = ("data.image_size", "data.crop_size", "model.name", "model.filters",
                   "model.depth")
    # False: images without a `mask` are kept (e.g. SMILE: the lesion not annotated).
    require_masks = True
    # True: its training step follows the model's trainable flags at every retrace,
    # so `train.freeze_encoder_epochs` works.
    freezes_encoder = False

    # -- config and data ------------------------------------------------- #

    def check(self):
        check_sizes(self.cfg)
        check_freeze_encoder(self.cfg, self.name or self.cfg.method, self.freezes_encoder)

    def load_manifest(self):
        """The method's own data sources as a manifest, or None for `data.source`."""
        return None

    def prepare_manifest(self, df):
        """The manifest after the split (e.g. simulated noisy masks); default unchanged."""
        return df

    def manifest(self):
        cfg, d = self.cfg, self.cfg.data
        df = self.load_manifest()
        if df is None:
            df = sources.load_manifest(
                d.source, limit=d.limit, synthetic_count=d.synthetic_count,
                synthetic_size=d.synthetic_size or d.image_size, synthetic_seed=0,
            )
        report = check.validate(df, require_masks=self.require_masks, source=d.source)
        val_ids = read_val_list(d.val_list, df) if d.val_list else None
        df = pipeline.assign_splits(
            df, val_fraction=d.val_fraction, seed=cfg.seed, val_ids=val_ids, folds=d.folds,
            fold=d.fold,
        )
        if not (df["split"] == "train").any():
            raise DataError(f"{d.source}: no training images left after the validation split")
        return self.prepare_manifest(df), summarize_warnings(report)

    def decoded(self, df):
        d = self.cfg.data
        return pipeline.decoded_dataset(df, d.image_size, cache=d.cache,
                                        color_constancy=d.color_constancy)

    def prepare(self, data):
        d = self.cfg.data
        train_dec = self.decoded(data.train_df)
        data.extra["val_decoded"] = self.decoded(data.val_df) if len(data.val_df) else None
        if d.mean and d.std:
            mean, std = d.mean, d.std
        elif d.normalize == "imagenet":
            mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
        else:
            mean, std = pipeline.compute_stats(train_dec)
        data.mean, data.std = tuple(mean), tuple(std)
        self.cfg = self.cfg.override({"data.mean": list(mean), "data.std": list(std)})

    # -- datasets and model -------------------------------------------- #

    def train_dataset(self, data: RunData):
        """Shuffled, augmented, normalised training batches (`train.batch_size`)."""
        return self.plain_dataset(data.train_df, data)

    def plain_dataset(self, df, data: RunData):
        """Training batches of the rows `df` as plain supervised training sees them."""
        cfg = self.cfg
        return pipeline.make_dataset(
            self.decoded(df), batch_size=cfg.train.batch_size, mean=data.mean, std=data.std,
            training=True, augment=cfg.augment, crop_size=cfg.data.crop_size, seed=cfg.seed,
        )

    def stages(self, data):
        return [Stage(self.train_dataset(data), self.cfg.train.epochs)]

    def val_dataset(self, data, keep, batch_size):
        decoded = data.extra.get("val_decoded")
        if decoded is None:
            return None
        if keep < len(data.val_df):
            decoded = decoded.take(keep)
        return pipeline.make_dataset(
            decoded, batch_size=batch_size, mean=data.mean, std=data.std, training=False,
            crop_size=self.cfg.data.crop_size,
        )

    def build(self, data, steps_per_epoch):
        return compile_plain(build_model(self.cfg), self.cfg, steps_per_epoch)

    # -- callbacks and reporting ---------------------------------------- #

    def method_callbacks(self, data: RunData) -> list:
        """Callbacks of the method itself (e.g. its TensorBoard weight maps)."""
        return []

    def callbacks(self, data, model):
        cfg = self.cfg
        monitor = ("val_" if len(data.val_df) else "") + self.monitor
        out = [LearningRateLogger(), *self.method_callbacks(data)]
        if cfg.train.freeze_encoder_epochs:
            out.append(FreezeEncoder(cfg.train.freeze_encoder_epochs))
        out.extend(schedules.schedule_callbacks(cfg.train, monitor))
        val_decoded = data.extra.get("val_decoded")
        if val_decoded is not None and cfg.train.image_every:
            raw, truth = first_images(val_decoded, cfg.train.image_count, cfg.data.crop_size)
            norm = pipeline.normalizer(data.mean, data.std)
            out.append(ImageGrid(Path(cfg.out) / "tensorboard", raw, norm(raw).numpy(), truth,
                                 every=cfg.train.image_every))
        return out


def first_images(decoded, count, crop):
    """The first `count` (image, mask) pairs of `decoded`, centre-cropped to `crop` if set."""
    imgs, masks = [], []
    for img, m in decoded.take(count):
        imgs.append(img.numpy())
        masks.append(m.numpy().astype(np.float32))
    imgs, masks = np.stack(imgs), np.stack(masks)
    if crop:
        off = (imgs.shape[1] - crop) // 2
        imgs = imgs[:, off : off + crop, off : off + crop]
        masks = masks[:, off : off + crop, off : off + crop]
    return imgs, masks
