"""The `Method` interface every training method implements, and the registry of methods.

The run loop (`lesionkeras.training.run.fit`) owns everything that is the same
for every method: strategy, run directory, seeding, the validation split's
batching, config saving, building in the strategy scope, stages, checkpoints,
resume, the best-model reload and `metrics.json`. A method supplies only what
differs, through the hooks below, called in this order:

    check()                       config rules, before anything else
    manifest()                    the validated manifest with its `split` column
    prepare(data)                 statistics, decoded images, ... (may update `self.cfg`)
    write_files(run_dir, data)    extra files of the run directory
    stages(data)                  the training datasets, as `Stage`s
    val_dataset(data, keep, batch_size)
    build(data, steps_per_epoch)  in the strategy scope: the compiled model
    after_build(model)            outside the scope (e.g. weights from another run)
    callbacks(data, model)        before the checkpoint and log writers
    describe(model, data)         the one status line printed before training
    after_fit(best, val_ds, data, log)   on the best checkpoint (may update `self.cfg`;
                                  `val_ds` is None without validation images)
    final_metrics(best, val_ds, data, run_dir)

A wrapper model (a custom `train_step` around a network) keeps that network in
its `network` attribute; checkpoints and predictions use it.

Example:

```python
from lesionkeras.training import method

@method.register
class Toy(SegmentationMethod):
    name = "toy"
```
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, ClassVar, NamedTuple

import pandas as pd

from lesionkeras import config
from lesionkeras.errors import ConfigError


class Stage(NamedTuple):
    """One `model.fit` of a run: epochs are numbered on from the previous stage.

    Args:
        dataset: `tf.data.Dataset`, or callable(model) -> `tf.data.Dataset` built when
            the stage starts, after `setup` (e.g. labels predicted by the model so far).
        epochs: int. Epochs of the stage.
        lr: float or None. Learning rate set when the stage starts (None: unchanged).
        setup: callable(model) or None. Run in the strategy scope before the stage,
            on the model as the previous stage left it (e.g. freeze layers and
            recompile, or load other weights); the stage continues with the
            optimiser the model has after it (the same one, unless it recompiles).
        new_best: bool. `model.keras` is the best epoch from this stage on (earlier
            stages only prepare it, as SMILE training before the SMILEr rounds).
    """

    dataset: Any
    epochs: int
    lr: float | None = None
    setup: Callable | None = None
    new_best: bool = False


@dataclasses.dataclass
class RunData:
    """The data of one run.

    Args:
        train_df: DataFrame. Training rows of the manifest.
        val_df: DataFrame. Validation rows (may be empty).
        warnings: list of str. One line per kind of data warning.
        mean: per-channel input mean (0-255) of the network, if it has one.
        std: per-channel input std (0-255).
        extra: dict. Whatever the method keeps between hooks (classes, decoded images).
    """

    train_df: pd.DataFrame
    val_df: pd.DataFrame
    warnings: list = dataclasses.field(default_factory=list)
    mean: tuple = ()
    std: tuple = ()
    extra: dict = dataclasses.field(default_factory=dict)


# Keys that fix a run's data split or its network: `fit --resume` refuses to change them.
RESUME_KEYS = ("task", "method", "seed", "data.source", "data.limit", "data.val_fraction",
               "data.val_list", "data.folds", "data.fold", "model.name", "model.depth",
               "model.filters", "model.output_stride", "model.batch_norm", "model.upsampling",
               "model.encoder_filters")


class Method:
    """One training method: what `lesionkeras fit --method NAME` does beyond the run loop.

    Subclasses set `name` (or `names`, for one class behind several `--method`
    values), `task` and `monitor`, and override the hooks they need; the
    defaults do nothing or raise `NotImplementedError` for the required ones
    (`manifest`, `stages`, `build`). `self.cfg` is the run's `Config`;
    `self.resuming` is true when `fit --resume` continues the run,
    `self.replicas` is the strategy's replica count and `self.log` prints a status line.
    """

    name: ClassVar[str] = ""
    names: ClassVar[tuple] = ()
    task: ClassVar[str] = "segment"
    # The model trained when `model.name` is empty.
    default_model: ClassVar[str] = "unet"
    # Validation metric (without `val_`) maximised by the best checkpoint `model.keras`.
    monitor: ClassVar[str] = "dice"
    # Config keys a resumed run must keep, besides `RESUME_KEYS`.
    resume_keys: ClassVar[tuple] = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.resuming = False  # set by the run loop: `fit --resume` continues the run
        self.replicas = 1  # set by the run loop: replicas of the distribution strategy
        self.log = print  # set by the run loop: where status lines go

    def check(self) -> None:
        """Raises `ConfigError` for a config this method cannot run, before anything is read."""

    def manifest(self) -> tuple[pd.DataFrame, list]:
        """The validated manifest (with a `split` column: train/val) and its warning lines.

        Raises:
            DataError: naming the file and its problem, before anything is written.
        """
        raise NotImplementedError

    def prepare(self, data: RunData) -> None:
        """Fills `data` (statistics, decoded images); may set `self.cfg` (stored in config.toml)."""

    def write_files(self, run_dir, data: RunData) -> None:
        """Writes the method's own files of the run directory (e.g. `classes.json`)."""

    def stages(self, data: RunData) -> list[Stage]:
        """The training stages, at least one (called outside the strategy scope)."""
        raise NotImplementedError

    def val_dataset(self, data: RunData, keep: int, batch_size: int):
        """Validation batches of the first `keep` validation rows (None: no validation)."""
        return None

    def build(self, data: RunData, steps_per_epoch: int):
        """The compiled `keras.Model` to `fit` (called in the strategy scope)."""
        raise NotImplementedError

    def after_build(self, model) -> None:
        """Runs after `build`, outside the strategy scope (e.g. loads another run's weights)."""

    def callbacks(self, data: RunData, model) -> list:
        """The method's callbacks; they run before the checkpoint and log writers."""
        return []

    def describe(self, model, data: RunData) -> str:
        """The status line printed before training."""
        network = getattr(model, "network", model)
        return (f"training {self.cfg.model_name} ({network.count_params():,} parameters) on "
                f"{len(data.train_df)} images, validating on {len(data.val_df)}")

    def after_fit(self, best, val_ds, data: RunData, log):
        """Runs on the best checkpoint before its final validation; returns the model to score.

        `val_ds` is None when the run has no validation images.
        """
        return best

    def final_metrics(self, best, val_ds, data: RunData, run_dir) -> dict:
        """The validation metrics of `best` written to `metrics.json`."""
        if val_ds is None:
            return {}
        return {k: float(v) for k, v in best.evaluate(val_ds, verbose=0, return_dict=True).items()}


class WrapsNetwork:
    """Mixin for a wrapper `keras.Model` whose own step trains `self.network`.

    Calling the wrapper runs the network, and saving it saves the network alone
    (what `evaluate`/`predict` load), so checkpoints are plain models.
    """

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def save(self, filepath, *args, **kwargs):
        return self.network.save(filepath, *args, **kwargs)


def network_of(model):
    """The network a wrapper model trains (`model.network`), or `model` itself."""
    return getattr(model, "network", model)


_METHODS: dict[str, type] = {}


def register(cls):
    """Class decorator: makes `cls` the method of `--method cls.name` (or each of `cls.names`)."""
    names = cls.names or (cls.name,)
    if not all(names):
        raise ValueError(f"{cls.__name__}: a registered method needs `name` or `names`")
    for name in names:
        _METHODS[name] = cls
        config.register_method(name, task=cls.task, default_model=cls.default_model)
    return cls


def unregister(name):
    """Removes the method `name` (plug-in tests clean up with it)."""
    _METHODS.pop(name, None)
    config.unregister_method(name)


def create(cfg) -> Method:
    """The `Method` of `cfg.method`.

    Raises:
        ConfigError: no method is registered under that name.
    """
    _load_builtin()
    cls = _METHODS.get(cfg.method)
    if cls is None:
        raise ConfigError(f"`method = {cfg.method!r}` is not a registered method; choose from "
                          f"{', '.join(sorted(_METHODS))}")
    return cls(cfg)


def registered() -> dict:
    """{name: Method subclass} of every registered method."""
    _load_builtin()
    return dict(_METHODS)


def _load_builtin():
    # The package's own methods register when `lesionkeras.methods` is imported
    # (it imports its modules); imported by name, so nothing here depends on one.
    importlib.import_module("lesionkeras.methods")
