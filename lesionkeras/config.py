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

The keys themselves are declared with `config_fields.field`; the shared
tables live in `config_tables`. Both are re-exported here.

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

from lesionkeras.config_fields import _check_value, field
from lesionkeras.config_tables import (
    SHARED_SECTIONS, AugmentConfig, DataConfig, ModelConfig, PostprocessConfig, TrainConfig)
from lesionkeras import files
from lesionkeras.errors import ConfigError

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
        files.write_text(path, tomli_w.dumps(self.to_dict()))


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


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
