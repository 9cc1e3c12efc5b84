"""Run configuration: TOML (stdlib `tomllib`) -> frozen dataclasses, validated.

A config has a few top-level keys and one table per concern. This module owns
the mechanism and the shared tables (`data`, `augment`, `model`, `train`,
`postprocess`); each method declares its own table (a frozen dataclass of
`field`s) beside its code and registers it with `register_section`, and
registers its name, task and default model with `register_method` (the
`lesionkeras.training.method.register` decorator does that). Every key has a
default, a type and, where the set of values is closed, a list of choices, so a
typo or a bad value is caught before anything runs and reported as one line
naming the key. A field's `flag` metadata makes it a `lesionkeras fit` option.
CLI flags are applied on top of the file with `Config.override`.

Example:

```python
cfg = load_config("configs/baseline.toml", overrides={"train.epochs": 3})
cfg.train.epochs  # 3
```
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

from lesionkeras.errors import ConfigError


def field(default, help, choices=None, minimum=None, maximum=None, flag=None, check=None):
    """A documented config key.

    Args:
        default: its value when absent; its type is the key's type.
        help: str. One sentence for the docs and the CLI.
        choices: tuple or None. The closed set of values.
        minimum, maximum: number or None. Inclusive bounds.
        flag: None, True or str. Also a `lesionkeras fit` option: True derives
            `--key-name` (`--x/--no-x` for booleans); a str gives the declaration.
        check: callable(value, where, origin) -> value, or None. Own validation
            (e.g. an array of tables).
    """
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": choices, "minimum": minimum, "maximum": maximum,
                  "flag": flag, "check": check},
    )



@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = field(
        "synthetic", "Data folder, manifest CSV, or `synthetic` (built-in dataset)."
    )
    image_size: int = field(64, "Side of the square model input, in pixels.", minimum=16)
    crop_size: int = field(
        0,
        "If > 0: resize to image_size, then train on random crops of this side "
        "(validation uses a centre crop).",
        minimum=0,
    )
    limit: int = field(0, "Use only the first N images (0 = all).", minimum=0)
    val_fraction: float = field(0.2, "Fraction of images held out for validation.")
    val_list: str = field(
        "", "Text file of image ids (one per line) that form the validation split."
    )
    folds: int = field(0, "Number of k-fold groups written to the manifest (0 = none).", minimum=0)
    fold: int = field(-1, "Fold used as validation when folds > 0 (-1 = use val_fraction).")
    normalize: str = field(
        "dataset",
        "Per-channel normalisation: `dataset` (mean/std of the training split) or `imagenet`.",
        choices=("dataset", "imagenet"),
    )
    mean: tuple = field((), "Per-channel mean (0-255); filled in by `fit` and stored in the run config.")
    std: tuple = field((), "Per-channel std (0-255); filled in by `fit` and stored in the run config.")
    cache: bool = field(True, "Cache decoded, resized images in memory.")
    color_constancy: str = field(
        "none",
        "Colour balance applied once to every decoded image: `none` or `shades_of_gray` "
        "(Finlayson & Trezzi 2004, p = 6).",
        choices=("none", "shades_of_gray"),
    )
    synthetic_count: int = field(240, "Number of images of the built-in synthetic dataset.", minimum=8)
    synthetic_size: int = field(
        0, "Side of the synthetic images on disk (0 = same as image_size).", minimum=0
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = field(True, "Random horizontal and vertical flips.")
    rotate90: bool = field(True, "Random rotations by multiples of 90 degrees.")
    dihedral: bool = field(
        False,
        "One of the 8 dihedral transforms (4 rotations by 90 degrees, each with or without a "
        "flip), uniformly at random; when true it replaces `flip` and `rotate90`.",
    )
    rotation: float = field(0.0, "Random rotation up to this many degrees (0 = off).", minimum=0.0)
    zoom: float = field(0.0, "Random zoom in/out by up to this fraction (0 = off).", minimum=0.0)
    brightness: float = field(0.0, "Colour jitter: brightness factor (0 = off).", minimum=0.0)
    contrast: float = field(0.0, "Colour jitter: contrast factor (0 = off).", minimum=0.0)
    saturation: float = field(0.0, "Colour jitter: saturation factor (0 = off).", minimum=0.0)
    hue: float = field(0.0, "Colour jitter: hue factor (0 = off).", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        "", "Registered model name (empty: the method's own default model)."
    )
    depth: int = field(4, "Number of down-sampling levels of the U-Net.", minimum=1)
    filters: int = field(16, "Filters of the first level; doubled at each level.", minimum=1)
    output_stride: int = field(
        16, "DeepLab models: the encoder's output stride, 16 (last ResNet stage dilated, the "
        "DeepLabV3+ default) or 8 (last two dilated; ASPP rates doubled) or 32.",
        choices=(8, 16, 32),
    )
    batch_norm: bool = field(True, "Batch normalisation after every convolution.")
    dropout: float = field(0.0, "Dropout rate at the bottleneck (0 = off).", minimum=0.0)
    upsampling: str = field(
        "bilinear",
        "Decoder up-sampling: `bilinear` resize + conv, or `transpose` convolution.",
        choices=("bilinear", "transpose"),
    )
    encoder_weights: str = field(
        "",
        "ResNet U-Nets: local encoder weights (`.weights.h5` of a keras-hub ResNetBackbone, "
        "or a keras-hub preset folder); empty = random initialisation.",
    )
    encoder_filters: int = field(
        64, "vgg19se: filters of the first VGG19 block (64 = VGG19; smaller for quick tests).",
        minimum=1,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = field("adam", "Optimiser.", choices=("adam", "adamw", "sgd"))
    lr: float = field(
        1e-3, "Learning rate (the peak rate of `one_cycle` and `slanted_triangular`).",
        minimum=0.0,
    )
    schedule: str = field(
        "constant",
        "Learning-rate schedule: `constant`, `one_cycle` (Smith), `slanted_triangular` "
        "(Howard & Ruder), `linear_decay` (to final_lr), or `plateau` (divide on a plateau "
        "of val_dice).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau"),
    )
    pct_start: float = field(0.3, "one_cycle: fraction of the steps spent rising.")
    div_factor: float = field(25.0, "one_cycle: lr / starting rate.", minimum=1.0)
    final_div_factor: float = field(
        1e4, "one_cycle: starting rate / final rate.", minimum=1.0
    )
    cut_frac: float = field(0.1, "slanted_triangular: fraction of the steps spent rising.")
    stlr_ratio: float = field(
        32.0, "slanted_triangular: lr / lowest rate.", minimum=1.0
    )
    final_lr: float = field(0.0, "linear_decay: rate reached at the last step.", minimum=0.0)
    plateau_divide: float = field(10.0, "plateau: divide the rate by this.", minimum=1.0)
    plateau_patience: int = field(
        5, "plateau: epochs without a better val_dice before dividing.", minimum=1
    )
    weight_decay: float = field(0.0, "Decoupled weight decay (adamw, sgd).", minimum=0.0)
    momentum: float = field(0.9, "SGD momentum.", minimum=0.0)
    epochs: int = field(20, "Training epochs.", minimum=1)
    batch_size: int = field(8, "Global batch size (split across replicas).", minimum=1)
    loss: str = field(
        "bce+dice", "Loss.", choices=("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")
    )
    threshold: float = field(0.5, "Probability threshold of the binary masks.")
    strategy: str = field(
        "auto", "Distribution strategy.", choices=("auto", "default", "mirrored", "multiworker")
    )
    mixed_precision: bool = field(False, "Mixed precision (float16 on GPU, bfloat16 on CPU).")
    jit_compile: str = field(
        "auto", "XLA compilation of the train step.", choices=("auto", "true", "false")
    )
    image_every: int = field(
        5, "Write the TensorBoard image grid every N epochs (0 = never).", minimum=0
    )
    image_count: int = field(4, "Validation images shown in the TensorBoard grid.", minimum=1)
    progress: bool = field(True, "Show the Keras progress bar.")
    freeze_encoder_epochs: int = field(
        0, "Train with the model's encoder frozen for the first N epochs, then train all "
        "(baseline, segan; models with an encoder, e.g. vgg19se; ISIC 2018 report: 50).",
        minimum=0,
    )


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    min_component_fraction: float = field(
        0.001,
        "postprocess morph: remove connected components smaller than this fraction of the "
        "image area (0 = keep all).",
        minimum=0.0,
    )
    fill_holes: bool = field(True, "postprocess morph: fill holes enclosed by the mask.")
    keep_largest: bool = field(
        True, "postprocess morph: keep only the largest connected component (one lesion)."
    )
    crf_iterations: int = field(
        5, "postprocess crf: mean-field iterations of the dense CRF.", minimum=1
    )
    crf_gaussian_sxy: float = field(
        3.0, "postprocess crf: spatial std (pixels) of the Gaussian smoothness kernel.",
        minimum=0.0,
    )
    crf_gaussian_compat: float = field(
        3.0, "postprocess crf: weight of the Gaussian smoothness kernel.", minimum=0.0
    )
    crf_bilateral_sxy: float = field(
        40.0, "postprocess crf: spatial std (pixels) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_srgb: float = field(
        13.0, "postprocess crf: colour std (0-255) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_compat: float = field(
        10.0, "postprocess crf: weight of the bilateral appearance kernel.", minimum=0.0
    )


SHARED_SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "postprocess": PostprocessConfig,
}
TASKS = ("segment", "attributes", "classify")

# Filled by the methods' modules when they are imported (see `_registered`).
_METHOD_SECTIONS: dict = {}  # name -> dataclass of its table
_VALIDATORS: dict = {}  # table name -> callable(cfg, origin) for cross-key rules
_METHODS: dict = {}  # method name -> {"task": str, "default_model": str}


def register_section(name, cls, validate=None):
    """Makes `[name]` a config table of dataclass `cls`; `validate(cfg, origin)` checks it."""
    if name in SHARED_SECTIONS or name in _TOP_KEYS:
        raise ValueError(f"`{name}` is a shared config table or key; choose another name.")
    if _METHOD_SECTIONS.get(name, cls) is not cls:
        raise ValueError(f"Config table `[{name}]` is already registered.")
    _METHOD_SECTIONS[name] = cls
    if validate is not None:
        _VALIDATORS[name] = validate
    return cls


def unregister_section(name):
    """Removes the method table `[name]` (plug-in tests clean up with it)."""
    _METHOD_SECTIONS.pop(name, None)
    _VALIDATORS.pop(name, None)


def register_method(name, task="segment", default_model="unet"):
    """Makes `method = name` valid for `task`, training `default_model` when `model.name` is empty."""
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: {task!r}")
    _METHODS[name] = {"task": task, "default_model": default_model}


def unregister_method(name):
    """Makes `method = name` invalid again."""
    _METHODS.pop(name, None)


def _registered():
    # The methods' modules declare their tables and names when imported; the
    # package is imported by name, so the config layer depends on no method.
    if "lesionkeras.methods" not in sys.modules:
        importlib.import_module("lesionkeras.methods")


def methods(task=None) -> tuple:
    """Registered method names, all or those of one `task`."""
    _registered()
    return tuple(n for n, m in _METHODS.items() if task is None or m["task"] == task)


def sections() -> dict:
    """{table name: dataclass} of every table, shared and methods' own."""
    _registered()
    return {**SHARED_SECTIONS, **_METHOD_SECTIONS}


def _default_sections():
    _registered()
    return {name: cls() for name, cls in _METHOD_SECTIONS.items()}


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run configuration: top-level keys, shared tables, and each method's table.

    A method's table is an attribute too (`cfg.meta.clean_count`).
    """

    method: str = field("baseline", "Training method.")
    task: str = field(
        "segment",
        "ISIC task: `segment` (Task 1, lesion masks), `attributes` (Task 2, method "
        "multitask), or `classify` (Task 3, methods triplet and softmax).",
        choices=TASKS,
    )
    seed: int = field(0, "Seed of every random choice (data split, weights, augmentation).")
    out: str = field("", "Run directory (empty: runs/<method>-<timestamp>).")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = dataclasses.field(default_factory=PostprocessConfig)
    # The methods' tables, by name.
    tables: dict = dataclasses.field(default_factory=_default_sections, compare=True, repr=False)

    def __getattr__(self, name):
        tables = self.__dict__.get("tables")
        if tables is not None and name in tables:
            return tables[name]
        raise AttributeError(f"`Config` has no key or table `{name}`")

    @property
    def model_name(self) -> str:
        """`model.name`, or the method's default model when it is empty."""
        if self.model.name:
            return self.model.name
        _registered()
        return _METHODS.get(self.method, {}).get("default_model", "unet")

    def to_dict(self) -> dict:
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "tables"}
        tree = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in tree.items()}
        tree.update({k: dataclasses.asdict(v) for k, v in self.tables.items()})
        return _to_plain(tree)

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
    maximum = f.metadata.get("maximum")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}. Received: {value!r}")
    return value


# Keys of the run config's top level (not tables).
_TOP_KEYS = ("method", "task", "seed", "out")


def _build(cls, values: dict, prefix: str, origin: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{origin}: unknown config key `{where}`")
        check = fields[key].metadata.get("check")
        try:
            if check is not None:
                kwargs[key] = check(value, where, origin)
            else:
                kwargs[key] = _check_value(cls, fields[key], value, where)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(f"{origin}: ") else f"{origin}: {msg}") from None
    return cls(**kwargs)


def _build_config(values: dict, origin: str):
    values = dict(values)
    if "stages" in values:  # run configs written before `[[unet34.stages]]`
        values["unet34"] = {**values.get("unet34", {}), "stages": values.pop("stages")}
    tables = sections()
    top = {f.name: f for f in dataclasses.fields(Config) if f.name in _TOP_KEYS}
    kwargs, method_tables = {}, {}
    for key, value in values.items():
        if key in top:
            try:
                kwargs[key] = _check_value(Config, top[key], value, key)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None
        elif key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: `{key}` must be a table ([{key}])")
            table = _build(tables[key], value, f"{key}.", origin)
            (kwargs if key in SHARED_SECTIONS else method_tables)[key] = table
        else:
            raise ConfigError(f"{origin}: unknown config key `{key}`")
    return Config(**kwargs, tables={**_default_sections(), **method_tables})


def from_dict(values: dict, origin: str = "config") -> Config:
    """Builds a validated `Config`; raises `ConfigError` naming the bad key."""
    cfg = _build_config(values, origin)
    if cfg.method not in methods():
        raise ConfigError(
            f"{origin}: `method` must be one of {', '.join(methods())}. Received: {cfg.method!r}"
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
    if cfg.method not in methods(cfg.task):
        raise ConfigError(
            f"{origin}: `task = {cfg.task!r}` needs `method` to be one of "
            f"{', '.join(methods(cfg.task))}. Received: {cfg.method!r}"
        )
    if len(cfg.data.mean) not in (0, 3) or len(cfg.data.std) not in (0, 3):
        raise ConfigError(f"{origin}: `data.mean` and `data.std` need 3 values each")
    for validate in _VALIDATORS.values():
        validate(cfg, origin)
    return cfg


def parse_int_list(text: str, key: str) -> list[int]:
    """`"128, 256"` -> `[128, 256]`; raises `ConfigError` naming `key` otherwise."""
    try:
        return [int(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise ConfigError(
            f"`{key}` must be comma-separated integers. Received: {text!r}"
        ) from None


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
