"""Run configuration: TOML (stdlib `tomllib`) -> frozen dataclasses.

A config has a few top-level keys and one table per concern (`data`,
`augment`, `model`, `train`). Every key has a default, a type and, where the
set of values is closed, a list of choices, so a typo or a bad value is caught
before anything runs and reported as one line naming the key. CLI flags are
applied on top of the file with `Config.override`.

Example:

```python
cfg = load_config("configs/baseline.toml", overrides={"train.epochs": 3})
cfg.train.epochs  # 3
```
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

from lesionkeras.errors import ConfigError


def _field(default, help, choices=None, minimum=None):
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": choices, "minimum": minimum},
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = _field(
        "synthetic", "Data folder, manifest CSV, or `synthetic` (built-in dataset)."
    )
    image_size: int = _field(64, "Side of the square model input, in pixels.", minimum=16)
    crop_size: int = _field(
        0,
        "If > 0: resize to image_size, then train on random crops of this side "
        "(validation uses a centre crop).",
        minimum=0,
    )
    limit: int = _field(0, "Use only the first N images (0 = all).", minimum=0)
    val_fraction: float = _field(0.2, "Fraction of images held out for validation.")
    val_list: str = _field(
        "", "Text file of image ids (one per line) that form the validation split."
    )
    folds: int = _field(0, "Number of k-fold groups written to the manifest (0 = none).", minimum=0)
    fold: int = _field(-1, "Fold used as validation when folds > 0 (-1 = use val_fraction).")
    normalize: str = _field(
        "dataset",
        "Per-channel normalisation: `dataset` (mean/std of the training split) or `imagenet`.",
        choices=("dataset", "imagenet"),
    )
    mean: tuple = _field((), "Per-channel mean (0-255); filled in by `fit` and stored in the run config.")
    std: tuple = _field((), "Per-channel std (0-255); filled in by `fit` and stored in the run config.")
    cache: bool = _field(True, "Cache decoded, resized images in memory.")
    color_constancy: str = _field(
        "none",
        "Colour balance applied once to every decoded image: `none` or `shades_of_gray` "
        "(Finlayson & Trezzi 2004, p = 6).",
        choices=("none", "shades_of_gray"),
    )
    synthetic_count: int = _field(240, "Number of images of the built-in synthetic dataset.", minimum=8)
    synthetic_size: int = _field(
        0, "Side of the synthetic images on disk (0 = same as image_size).", minimum=0
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = _field(True, "Random horizontal and vertical flips.")
    rotate90: bool = _field(True, "Random rotations by multiples of 90 degrees.")
    rotation: float = _field(0.0, "Random rotation up to this many degrees (0 = off).", minimum=0.0)
    zoom: float = _field(0.0, "Random zoom in/out by up to this fraction (0 = off).", minimum=0.0)
    brightness: float = _field(0.0, "Colour jitter: brightness factor (0 = off).", minimum=0.0)
    contrast: float = _field(0.0, "Colour jitter: contrast factor (0 = off).", minimum=0.0)
    saturation: float = _field(0.0, "Colour jitter: saturation factor (0 = off).", minimum=0.0)
    hue: float = _field(0.0, "Colour jitter: hue factor (0 = off).", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = _field(
        "", "Registered model name (empty: the method's default, `segan` for "
        "`--method segan`, `unet` otherwise)."
    )
    depth: int = _field(4, "Number of down-sampling levels of the U-Net.", minimum=1)
    filters: int = _field(16, "Filters of the first level; doubled at each level.", minimum=1)
    batch_norm: bool = _field(True, "Batch normalisation after every convolution.")
    dropout: float = _field(0.0, "Dropout rate at the bottleneck (0 = off).", minimum=0.0)
    upsampling: str = _field(
        "bilinear",
        "Decoder up-sampling: `bilinear` resize + conv, or `transpose` convolution.",
        choices=("bilinear", "transpose"),
    )
    encoder_weights: str = _field(
        "",
        "ResNet U-Nets: local encoder weights (`.weights.h5` of a keras-hub ResNetBackbone, "
        "or a keras-hub preset folder); empty = random initialisation.",
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = _field("adam", "Optimiser.", choices=("adam", "adamw", "sgd"))
    lr: float = _field(
        1e-3, "Learning rate (the peak rate of `one_cycle` and `slanted_triangular`).",
        minimum=0.0,
    )
    schedule: str = _field(
        "constant",
        "Learning-rate schedule: `constant`, `one_cycle` (Smith), `slanted_triangular` "
        "(Howard & Ruder), `linear_decay` (to final_lr), or `plateau` (divide on a plateau "
        "of val_dice).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau"),
    )
    pct_start: float = _field(0.3, "one_cycle: fraction of the steps spent rising.")
    div_factor: float = _field(25.0, "one_cycle: lr / starting rate.", minimum=1.0)
    final_div_factor: float = _field(
        1e4, "one_cycle: starting rate / final rate.", minimum=1.0
    )
    cut_frac: float = _field(0.1, "slanted_triangular: fraction of the steps spent rising.")
    stlr_ratio: float = _field(
        32.0, "slanted_triangular: lr / lowest rate.", minimum=1.0
    )
    final_lr: float = _field(0.0, "linear_decay: rate reached at the last step.", minimum=0.0)
    plateau_divide: float = _field(10.0, "plateau: divide the rate by this.", minimum=1.0)
    plateau_patience: int = _field(
        5, "plateau: epochs without a better val_dice before dividing.", minimum=1
    )
    weight_decay: float = _field(0.0, "Decoupled weight decay (adamw, sgd).", minimum=0.0)
    momentum: float = _field(0.9, "SGD momentum.", minimum=0.0)
    epochs: int = _field(20, "Training epochs.", minimum=1)
    batch_size: int = _field(8, "Global batch size (split across replicas).", minimum=1)
    loss: str = _field(
        "bce+dice", "Loss.", choices=("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")
    )
    threshold: float = _field(0.5, "Probability threshold of the binary masks.")
    strategy: str = _field(
        "auto", "Distribution strategy.", choices=("auto", "default", "mirrored", "multiworker")
    )
    mixed_precision: bool = _field(False, "Mixed precision (float16 on GPU, bfloat16 on CPU).")
    jit_compile: str = _field(
        "auto", "XLA compilation of the train step.", choices=("auto", "true", "false")
    )
    image_every: int = _field(
        5, "Write the TensorBoard image grid every N epochs (0 = never).", minimum=0
    )
    image_count: int = _field(4, "Validation images shown in the TensorBoard grid.", minimum=1)
    progress: bool = _field(True, "Show the Keras progress bar.")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    meta_grad: str = _field(
        "nested",
        "meta: how eq. 7 is differentiated: `nested` tapes (reference) or `forward` "
        "(closed form at W0 = 0, one forward-mode pass).",
        choices=("nested", "forward"),
    )
    clean_batch_size: int = _field(10, "meta: clean images per step (paper: 10).", minimum=1)
    simulate_noise: str = _field(
        "",
        "meta: experiment mode, replace the masks of all training images but `clean_count` "
        "by this polygon noise (`7-vertex`, `3-vertex`, `4-axis`, `maximal`; empty = off).",
        choices=("", "7-vertex", "3-vertex", "4-axis", "maximal"),
    )
    clean_count: int = _field(
        16, "meta: clean training images kept by `simulate_noise`.", minimum=1
    )
    noisy_data: str = _field("", "meta: folder of images with noisy masks (real use).")
    clean_data: str = _field(
        "", "meta: folder of images with clean masks (real use; also gives the validation split)."
    )
    finetune_epochs: int = _field(
        10, "finetune: epochs on the clean images after `train.epochs` on the noisy ones.",
        minimum=1,
    )
    finetune_lr: float = _field(
        0.0, "finetune: learning rate of the clean stage (0 = train.lr / 10).", minimum=0.0
    )
    weight_image_every: int = _field(
        5, "meta: write the weight maps (and with simulated noise the Fig. 3 overlay) to "
        "TensorBoard every N epochs (0 = never).", minimum=0,
    )


@dataclasses.dataclass(frozen=True)
class SeganConfig:
    clip: float = _field(
        0.05, "segan: critic weights are clamped to [-clip, clip] after each critic step.",
        minimum=0.0,
    )
    critic_blocks: int = _field(5, "segan: global-convolution blocks of the critic.", minimum=1)
    critic_filters: int = _field(
        16, "segan: filters of the first critic block (doubled per block, at most 128).",
        minimum=1,
    )
    critic_kernel: int = _field(9, "segan: k of the critic's 1 x k + k x 1 convolutions.", minimum=1)
    k_decay: float = _field(
        0.9, "segan: adaptive logistic k is multiplied by this every `k_every` epochs.",
        minimum=0.0,
    )
    k_every: int = _field(25, "segan: epochs between two decays of k.", minimum=1)
    k_floor: float = _field(0.3, "segan: smallest k.", minimum=0.0)
    supervised_loss: str = _field(
        "",
        "segan: extra supervised term of the segmentor (empty = off, the paper).",
        choices=("", "bce", "dice", "jaccard", "bce+dice", "bce+jaccard"),
    )
    supervised_weight: float = _field(1.0, "segan: weight of the supervised term.", minimum=0.0)
    warmup_epochs: int = _field(
        0, "segan: first epochs trained on the supervised term alone (critic still trained).",
        minimum=0,
    )
    threshold_search: bool = _field(
        True,
        "segan: after training, grid-search `train.threshold` (0.05-0.95) for the best mean "
        "validation Jaccard and store it in the run config.",
    )


@dataclasses.dataclass(frozen=True)
class SmileConfig:
    structures: str = _field(
        "lesion,globules,milia_like_cyst,negative_network,pigment_network,streaks",
        "smile/multiclass: comma-separated structures (K sigmoid heads); `lesion` is the "
        "`mask` column, any other name the `attr_<name>` column of the manifest.",
    )
    empty_means_missing: bool = _field(
        False,
        "smile/multiclass: an empty mask file means `not annotated` (default: annotated "
        "and absent; a missing file always means not annotated).",
    )
    simulate_missing: float = _field(
        0.0,
        "smile/multiclass: experiment mode, drop each structure's annotation from this "
        "fraction of the training images (independently per structure, seeded; 0 = off).",
        minimum=0.0,
    )
    container: str = _field(
        "lesion",
        "smile: the structure that encloses the others (dermoscopic attributes lie inside "
        "the lesion), so that known labels follow the nesting; empty = the paper's rule "
        "for mutually exclusive structures.",
    )


@dataclasses.dataclass(frozen=True)
class Unet34Config:
    schedule: str = _field(
        "one_cycle",
        "unet34: learning-rate schedule of each stage, restarted per stage (`train.epochs` "
        "and `train.schedule` are not used by this method).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay"),
    )
    stage1_epochs: int = _field(10, "unet34: epochs of stage 1 (encoder frozen).", minimum=1)
    stage1_lr: float = _field(
        0.0, "unet34: (peak) learning rate of stage 1 (0 = train.lr).", minimum=0.0
    )
    stage2_epochs: int = _field(
        10, "unet34: epochs of stage 2 (all but the batch norms trainable).", minimum=1
    )
    stage2_lr: float = _field(
        0.0, "unet34: (peak) learning rate of stage 2 (0 = the stage-1 rate / 10).", minimum=0.0
    )


SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "meta": MetaConfig,
    "segan": SeganConfig,
    "smile": SmileConfig,
    "unet34": Unet34Config,
}
METHODS = (
    "baseline", "meta", "image-reweight", "finetune", "segan", "smile", "multiclass", "unet34",
)
# The model a method trains when `model.name` is left empty.
DEFAULT_MODELS = {"segan": "segan", "unet34": "resnet34_unet"}


@dataclasses.dataclass(frozen=True)
class Config:
    method: str = _field("baseline", "Training method.")
    seed: int = _field(0, "Seed of every random choice (data split, weights, augmentation).")
    out: str = _field("", "Run directory (empty: runs/<method>-<timestamp>).")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)
    segan: SeganConfig = dataclasses.field(default_factory=SeganConfig)
    smile: SmileConfig = dataclasses.field(default_factory=SmileConfig)
    unet34: Unet34Config = dataclasses.field(default_factory=Unet34Config)

    @property
    def model_name(self) -> str:
        """`model.name`, or the method's default model when it is empty."""
        return self.model.name or DEFAULT_MODELS.get(self.method, "unet")

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def override(self, overrides: dict, origin: str = "command line") -> "Config":
        """Returns a copy with `{"section.key": value}` (or `{"key": value}`) applied."""
        tree = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            *parents, key = dotted.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[key] = value
        return from_dict(tree, origin=origin)

    def save(self, path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _check_value(cls, f: dataclasses.Field, value, where: str):
    expected = type(f.default) if f.default is not dataclasses.MISSING else None
    name = f"`{where}`"
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false. Received: {value!r}")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer. Received: {value!r}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number. Received: {value!r}")
        value = float(value)
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string. Received: {value!r}")
    elif expected is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{name} must be a list of numbers. Received: {value!r}")
        value = tuple(float(v) for v in value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, choices))}. Received: {value!r}"
        )
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}. Received: {value!r}")
    return value


def _build(cls, values: dict, prefix: str, origin: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{origin}: unknown config key `{where}`")
        f = fields[key]
        if key in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: `{where}` must be a table ([{key}])")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.", origin)
        else:
            try:
                kwargs[key] = _check_value(cls, f, value, where)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None
    return cls(**kwargs)


def from_dict(values: dict, origin: str = "config") -> Config:
    """Builds a validated `Config`; raises `ConfigError` naming the bad key."""
    cfg = _build(Config, values, "", origin)
    if cfg.method not in METHODS:
        raise ConfigError(
            f"{origin}: `method` must be one of {', '.join(METHODS)}. Received: {cfg.method!r}"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(
            f"{origin}: `data.val_fraction` must be in [0, 1). Received: {cfg.data.val_fraction}"
        )
    for key in ("pct_start", "cut_frac"):
        if not 0.0 < getattr(cfg.train, key) < 1.0:
            raise ConfigError(
                f"{origin}: `train.{key}` must be in (0, 1). Received: {getattr(cfg.train, key)}"
            )
    if not 0.0 < cfg.train.threshold < 1.0:
        raise ConfigError(
            f"{origin}: `train.threshold` must be in (0, 1). Received: {cfg.train.threshold}"
        )
    if cfg.data.crop_size and cfg.data.crop_size > cfg.data.image_size:
        raise ConfigError(
            f"{origin}: `data.crop_size` ({cfg.data.crop_size}) must not exceed "
            f"`data.image_size` ({cfg.data.image_size})"
        )
    if cfg.data.folds and cfg.data.fold >= cfg.data.folds:
        raise ConfigError(
            f"{origin}: `data.fold` must be < `data.folds` ({cfg.data.folds}). "
            f"Received: {cfg.data.fold}"
        )
    if cfg.smile.simulate_missing > 1.0:
        raise ConfigError(
            f"{origin}: `smile.simulate_missing` must be in [0, 1]. "
            f"Received: {cfg.smile.simulate_missing}"
        )
    sg = cfg.segan
    for key, ok, rule in (
        ("clip", sg.clip > 0, "> 0"),
        ("k_decay", 0 < sg.k_decay <= 1, "in (0, 1]"),
        ("k_floor", 0 < sg.k_floor <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise ConfigError(
                f"{origin}: `segan.{key}` must be {rule}. Received: {getattr(sg, key)}"
            )
    if sg.warmup_epochs and not sg.supervised_loss:
        raise ConfigError(
            f"{origin}: `segan.warmup_epochs` needs a `segan.supervised_loss` to train on"
        )
    if cfg.data.color_constancy != "none" and cfg.method in ("smile", "multiclass"):
        raise ConfigError(
            f"{origin}: `data.color_constancy` is not supported by `method = {cfg.method!r}` "
            "yet; use \"none\""
        )
    if len(cfg.data.mean) not in (0, 3) or len(cfg.data.std) not in (0, 3):
        raise ConfigError(f"{origin}: `data.mean` and `data.std` need 3 values each")
    return cfg


def read_toml(path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Reads a TOML file (or the defaults) and applies `overrides`.

    Args:
        path: str or Path. TOML file; None uses the defaults.
        overrides: dict. `{"train.lr": 1e-4, "seed": 3}`; None values are skipped.
    """
    cfg = from_dict(read_toml(path), origin=str(path)) if path else Config()
    return cfg.override(overrides or {}) if overrides else cfg


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: used to document configs."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                rows.append((f"{f.name}.{g.name}", g.default, g.metadata["help"]))
        else:
            rows.append((f.name, f.default, f.metadata["help"]))
    return rows
