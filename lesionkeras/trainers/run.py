"""`fit`: config -> validated data -> model -> `model.fit` -> run directory.

Run directory (the contract the other commands read):

    config.toml     the fully resolved config (incl. normalisation statistics)
    model.keras     best checkpoint by validation Dice
    last.keras      last epoch
    history.csv     one row per epoch
    metrics.json    final validation metrics of model.keras
    tensorboard/    scalars and the input | truth | prediction grid
    backup/         BackupAndRestore state for `--resume`
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from lesionkeras import config as config_lib
from lesionkeras import schedules
from lesionkeras.callbacks import ImageGrid, LearningRateLogger, StopOnNaN
from lesionkeras.data import check, pipeline, sources
from lesionkeras import distribute
from lesionkeras.distribute import resolve_strategy, set_precision
from lesionkeras.errors import ConfigError, DataError, TrainingError  # noqa: F401 (re-exported)
from lesionkeras.trainers import baseline, finetune, meta
from lesionkeras.trainers import segan
from lesionkeras.trainers import smile
from lesionkeras.trainers import unet34
from lesionkeras.trainers.stages import FreezeEncoder, check_freeze_encoder

# A trainer module provides `build(cfg[, steps_per_epoch])` and may provide
# `load_manifest(cfg)` (its own data sources, or None), `prepare_manifest(cfg, df)`
# (after the split) and `train_dataset(cfg, train_df, mean, std)` (its own streams),
# and `callbacks(cfg[, train_df=, mean=, std=])` (its own callbacks, run before the
# checkpoint and log writers).
# `stages(cfg, train_df, mean, std)` (several `(dataset, epochs, learning_rate or None)`
# fits in a row, epochs numbered on) replaces `train_dataset`; a stage may add a 4th item,
# `setup(model)`, run in the strategy scope before it (e.g. freeze layers and recompile).
# `val_dataset(cfg, val_df, mean, std, batch_size)` builds its own validation batches.
# `after_fit(cfg, best_model, val_ds, log)` -> (cfg, model) runs on the best checkpoint
# before the final validation (e.g. a threshold search stored in config.toml); it is
# also given those of `train_df`/`mean`/`std` it takes as keywords (e.g. SMILEr rounds).
TRAINERS = {
    "baseline": baseline, "meta": meta, "image-reweight": meta, "finetune": finetune,
    "segan": segan, "smile": smile, "multiclass": smile, "unet34": unet34,
}


@dataclasses.dataclass
class FitResult:
    run_dir: Path
    metrics: dict
    epochs_run: int
    warnings: list


def default_run_dir(method: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{method}-{stamp}"


def prepare_data(cfg, *, require_masks=True):
    """Manifest with splits, validated; raises DataError before anything is written."""
    d = cfg.data
    trainer = TRAINERS.get(cfg.method)
    loader = getattr(trainer, "load_manifest", None)
    df = loader(cfg) if loader else None
    if df is None:
        df = sources.load_manifest(
            d.source,
            limit=d.limit,
            synthetic_count=d.synthetic_count,
            synthetic_size=d.synthetic_size or d.image_size,
            synthetic_seed=0,
        )
    # A trainer may accept images without a `mask` (e.g. SMILE: the lesion not annotated).
    require_masks = require_masks and getattr(trainer, "REQUIRE_MASKS", True)
    report = check.validate(df, require_masks=require_masks, source=d.source)
    val_ids = None
    if d.val_list:
        try:
            val_ids = [l.strip() for l in Path(d.val_list).read_text().splitlines() if l.strip()]
        except OSError as e:
            raise DataError(f"{d.val_list}: cannot read validation list ({e.strerror})") from None
        unknown = sorted(set(val_ids) - set(df["id"]))
        if unknown:
            raise DataError(
                f"{d.val_list}: {len(unknown)} ids are not in the data (first: {unknown[0]})"
            )
    df = pipeline.assign_splits(
        df, val_fraction=d.val_fraction, seed=cfg.seed, val_ids=val_ids, folds=d.folds, fold=d.fold
    )
    if not (df["split"] == "train").any():
        raise DataError(f"{d.source}: no training images left after the validation split")
    if hasattr(trainer, "prepare_manifest"):
        df = trainer.prepare_manifest(cfg, df)
    return df, report


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


def build_for_training(trainer, cfg, steps_per_epoch):
    """`trainer.build(cfg)`, telling it the steps per epoch if it takes them (schedules)."""
    import inspect

    if "steps_per_epoch" in inspect.signature(trainer.build).parameters:
        return trainer.build(cfg, steps_per_epoch=max(steps_per_epoch, 1))
    return trainer.build(cfg)


def _check_sizes(cfg):
    """The model is a segmentation network and the input size fits its depth."""
    from lesionkeras.models import registry

    segmenters = registry.names(task="segment")
    if cfg.model_name not in segmenters:
        raise ConfigError(
            f"`--model {cfg.model_name}` is not a segmentation model; choose from "
            f"{', '.join(segmenters)}"
        )
    depth = cfg.model.depth if cfg.model_name in ("unet", "segan") else 0
    if cfg.model_name.startswith("resnet") or cfg.model_name in ("vgg19se", "deeplabv3plus"):
        depth = 5  # the ResNet/VGG encoder halves the input five times
    size = cfg.data.crop_size or cfg.data.image_size
    if depth and size % (2**depth):
        raise ConfigError(
            f"`data.image_size`/`data.crop_size` ({size}) must be divisible by "
            f"2**model.depth = {2**depth}"
        )


def _best_so_far(history_csv: Path, monitor: str):
    if not history_csv.exists():
        return None
    hist = pd.read_csv(history_csv)
    if monitor not in hist or hist[monitor].dropna().empty:
        return None
    return float(hist[monitor].max())


def fit(cfg, *, resume_dir=None, verbose=1, log=print, extra_callbacks=()) -> FitResult:
    """Trains `cfg.method` and fills the run directory.

    Args:
        cfg: `Config`. The resolved configuration.
        resume_dir: str or None. Continue the interrupted run in this folder.
        verbose: int. Keras verbosity (1 = progress bar, 2 = one line per epoch).
        log: callable. Where status lines go.
        extra_callbacks: sequence of `keras.callbacks.Callback`, run after the built-in ones.
    """
    if cfg.task != "segment":
        # ISIC 2018 Tasks 2 and 3 have their own data, models and metrics.
        from lesionkeras.classify import tasks

        return tasks.fit(cfg, resume_dir=resume_dir, verbose=verbose, log=log,
                         extra_callbacks=extra_callbacks)
    _check_sizes(cfg)
    check_freeze_encoder(cfg)
    # First, before any TensorFlow op: MultiWorkerMirroredStrategy must configure
    # the runtime's collective ops before it starts.
    strategy = resolve_strategy(cfg.train.strategy)
    if resume_dir:
        run_dir = Path(resume_dir)
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir}: run directory exists and is not empty "
                "(choose another --out, or continue it with --resume)"
            )
        cfg = cfg.override({"out": str(run_dir)})
    keras.utils.set_random_seed(cfg.seed)
    df, report = prepare_data(cfg)
    warnings = summarize_warnings(report)
    for line in warnings:
        log(line)

    train_df = df[df["split"] == "train"].reset_index(drop=True)
    val_df = df[df["split"] == "val"].reset_index(drop=True)
    d = cfg.data
    train_dec = pipeline.decoded_dataset(
        train_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
    )
    val_dec = pipeline.decoded_dataset(
        val_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
    ) if len(val_df) else None
    if d.mean and d.std:
        mean, std = d.mean, d.std
    elif d.normalize == "imagenet":
        mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
    else:
        mean, std = pipeline.compute_stats(train_dec)
    cfg = cfg.override({"data.mean": list(mean), "data.std": list(std)})

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.toml")

    policy = set_precision(cfg.train.mixed_precision)
    crop = d.crop_size
    trainer = TRAINERS[cfg.method]
    stages = None
    if hasattr(trainer, "stages"):
        stages = trainer.stages(cfg, train_df, mean, std)
        train_ds = stages[0][0]
    elif hasattr(trainer, "train_dataset"):
        train_ds = trainer.train_dataset(cfg, train_df, mean, std)
    else:
        train_ds = pipeline.make_dataset(
            train_dec, batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
            augment=cfg.augment, crop_size=crop, seed=cfg.seed,
        )
    replicas = distribute.check_batch_size(cfg.train.batch_size, strategy)
    val_ds = None
    if val_dec is not None:
        keep, val_batch = pipeline.validation_batches(
            len(val_df), cfg.train.batch_size, replicas, log)
        if keep < len(val_df):
            val_dec = val_dec.take(keep)
        if hasattr(trainer, "val_dataset"):
            val_ds = trainer.val_dataset(cfg, val_df, mean, std, val_batch)
        else:
            val_ds = pipeline.make_dataset(
                val_dec, batch_size=val_batch, mean=mean, std=std, training=False, crop_size=crop,
            )
    trainer = TRAINERS[cfg.method]
    with strategy.scope():
        model = build_for_training(trainer, cfg, int(train_ds.cardinality()))

    monitor = "val_dice" if val_ds is not None else "dice"
    nan_stop = StopOnNaN()
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        nan_stop,
        LearningRateLogger(),
        # Before the loggers below, so that what they add to the logs is written.
        *_trainer_callbacks(trainer, cfg, train_df=train_df, mean=mean, std=std),
        *([FreezeEncoder(cfg.train.freeze_encoder_epochs)] if cfg.train.freeze_encoder_epochs else []),
        *schedules.schedule_callbacks(cfg.train, monitor),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "model.keras"), monitor=monitor, mode="max", save_best_only=True,
            initial_value_threshold=_best_so_far(run_dir / "history.csv", monitor),
        ),
        keras.callbacks.ModelCheckpoint(str(run_dir / "last.keras")),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
    ]
    if val_dec is not None and cfg.train.image_every:
        raw, truth = _first_images(val_dec, cfg.train.image_count, crop)
        norm = pipeline.normalizer(mean, std)
        callbacks.append(
            ImageGrid(
                run_dir / "tensorboard", raw, norm(raw).numpy(), truth,
                every=cfg.train.image_every,
            )
        )
    callbacks.extend(extra_callbacks)
    log(
        f"training {cfg.model_name} ({model.count_params():,} parameters) on "
        f"{len(train_df)} images, validating on {len(val_df)}; strategy "
        f"{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s); "
        f"precision {policy}"
    )
    epochs_run = done = 0
    all_stages = stages or [(train_ds, cfg.train.epochs, None)]
    resume_epoch = _backup_epoch(run_dir / "backup")
    for i, (stage_ds, epochs, lr, *setup) in enumerate(all_stages):
        if setup:
            if resume_epoch is not None and done + epochs <= resume_epoch and i + 1 < len(all_stages):
                done += epochs  # finished before the interruption
                continue
            with strategy.scope():
                setup[0](model)
            _carry_backup_into_stage(model, run_dir / "backup", done)
        stage_callbacks = callbacks
        if i:
            # A TensorBoard callback closes its writers at the end of a fit.
            stage_callbacks = [
                keras.callbacks.TensorBoard(cb.log_dir)
                if type(cb) is keras.callbacks.TensorBoard else cb
                for cb in callbacks
            ]
        if lr is not None:
            # After BackupAndRestore (first), which restores the optimiser's rate.
            stage_callbacks = [stage_callbacks[0], _SetLearningRate(lr), *stage_callbacks[1:]]
        # BackupAndRestore sets this when it restores a backup and Keras never clears
        # it, so after a resumed stage every later stage would restart at that epoch.
        model._initial_epoch = None
        history = model.fit(
            stage_ds,
            validation_data=val_ds,
            initial_epoch=done,
            epochs=done + epochs,
            callbacks=stage_callbacks,
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=verbose if cfg.train.progress else 2,
        )
        epochs_run += len(history.epoch)
        done += epochs
        if nan_stop.where:
            break
    nan_stop.raise_if_stopped(run_dir)
    if not (run_dir / "model.keras").exists():
        model.save(run_dir / "model.keras")
    best = keras.saving.load_model(run_dir / "model.keras")
    if val_ds is not None and hasattr(trainer, "after_fit"):
        # E.g. a threshold chosen on validation, stored with the run.
        cfg, best = trainer.after_fit(
            cfg, best, val_ds, log,
            **_accepted(trainer.after_fit, train_df=train_df, mean=mean, std=std),
        )
        cfg.save(run_dir / "config.toml")
    metrics = {}
    if val_ds is not None:
        metrics = {
            k: float(v) for k, v in best.evaluate(val_ds, verbose=0, return_dict=True).items()
        }
    metrics.update(
        epochs=int(_history_len(run_dir / "history.csv")),
        train_images=len(train_df),
        val_images=len(val_df),
    )
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return FitResult(run_dir, metrics, epochs_run, warnings)


def fit_folds(cfg, folds=None, *, resume_dir=None, verbose=1, log=print,
              extra_callbacks=()) -> FitResult:
    """Trains `folds` models on a K-fold split of the training data, one per fold.

    Fold i validates on the i-th part and trains on the others; each keeps its
    best-validation-Dice checkpoint in `RUN/fold{i}/` (a complete run
    directory). `RUN/summary.json` holds every fold's validation metrics and
    their mean; `evaluate`/`predict` on `RUN` average the folds (the Ensemble of
    Guth & deCampos 2018, section 3.5). `RUN/config.toml` and `RUN/folds.json`
    let `fit --resume RUN` continue: every fold already started resumes from
    its last epoch (a finished one trains no further unless `--epochs` grew,
    and is only re-scored), the others start.

    Args:
        cfg: `Config`. `data.folds`/`data.fold` are set per fold.
        folds: int. K >= 2. Read from `RUN/folds.json` when resuming.
        resume_dir: str or None. Continue this interrupted run with folds.
        verbose: int. Keras verbosity. log: callable. Where status lines go.
        extra_callbacks: sequence of `keras.callbacks.Callback`, given to every fold.

    Returns:
        `FitResult` of `RUN` with the mean validation metrics over the folds.

    Raises:
        ConfigError: K < 2, a fixed validation list, or a non-empty `RUN`.
    """
    if resume_dir:
        run_dir = Path(resume_dir)
        folds = fold_count(run_dir)
    else:
        run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"`--folds` must be an integer >= 2. Received: {folds!r}")
    if cfg.data.val_list:
        raise ConfigError("`--folds` makes its own validation splits; drop `data.val_list`")
    cfg = cfg.override({"out": str(run_dir)})
    if not resume_dir:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(
                f"{run_dir}: run directory exists and is not empty "
                "(choose another --out, or continue it with --resume)"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FOLDS_FILE).write_text(json.dumps({"folds": folds}) + "\n")
    cfg.save(run_dir / "config.toml")
    results = []
    for i in range(folds):
        fold_dir = run_dir / f"fold{i}"
        log(f"fold {i + 1} of {folds}")
        fold_cfg = cfg.override({"out": str(fold_dir), "data.folds": folds, "data.fold": i})
        started = fold_dir.exists() and any(fold_dir.iterdir())
        results.append(fit(
            fold_cfg, resume_dir=fold_dir if started else None, verbose=verbose, log=log,
            extra_callbacks=extra_callbacks,
        ))
    per_fold = {f"fold{i}": r.metrics for i, r in enumerate(results)}
    keys = [k for k in results[0].metrics if all(k in r.metrics for r in results)]
    mean = {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}
    (run_dir / "summary.json").write_text(
        json.dumps({"folds": folds, "mean": mean, "per_fold": per_fold}, indent=2) + "\n"
    )
    return FitResult(run_dir, mean, sum(r.epochs_run for r in results), results[0].warnings)


FOLDS_FILE = "folds.json"


def fold_count(run_dir):
    """K of a `fit --folds K` run directory, or None for an ordinary run."""
    path = Path(run_dir) / FOLDS_FILE
    if not path.exists():
        return None
    try:
        folds = json.loads(path.read_text())["folds"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: not a folds record (expected {{\"folds\": K}})") from None
    return folds


def _accepted(fn, **data):
    """The items of `data` that `fn` takes as keyword arguments."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in data.items() if k in params}


def _trainer_callbacks(trainer, cfg, **data):
    """`trainer.callbacks(cfg)`, also given those of `train_df`/`mean`/`std` it takes."""
    if not hasattr(trainer, "callbacks"):
        return []
    return trainer.callbacks(cfg, **_accepted(trainer.callbacks, **data))


def _backup_epoch(backup_dir: Path):
    """The epoch count recorded by `BackupAndRestore` (or at a stage's start), or None."""
    epochs = [
        int(json.loads(path.read_text())["epoch"])
        for path in (backup_dir / "training_metadata.json", backup_dir / "stage_start.json")
        if path.exists()
    ]
    return max(epochs) if epochs else None


def _carry_backup_into_stage(model, backup_dir: Path, done: int):
    """Loads a backup taken at the end of the previous stage without its optimizer.

    A stage's `setup` may recompile the model, so the backup's optimizer slots
    no longer match; the model weights are loaded (a no-op unless resuming at a
    stage boundary) and the backup is removed so `BackupAndRestore` starts afresh.
    The weights are kept as `stage_start` until the stage writes its own backup,
    so a run interrupted in the stage's first epoch resumes at the stage's start.
    """
    def recorded(name):
        path = backup_dir / name
        return int(json.loads(path.read_text())["epoch"]) if path.exists() else None

    weights = backup_dir / "latest.weights.h5"
    start = backup_dir / "stage_start.weights.h5"
    latest = recorded("training_metadata.json")
    if latest == done and weights.exists():
        model.load_weights(weights, objects_to_skip=[model.optimizer])
        model.save_weights(start)
        (backup_dir / "stage_start.json").write_text(json.dumps({"epoch": done}))
    elif latest is None and recorded("stage_start.json") == done and start.exists():
        model.load_weights(start, objects_to_skip=[model.optimizer])
    else:
        return
    for name in ("latest.weights.h5", "training_metadata.json"):
        for path in (backup_dir / name, backup_dir / f"{name}.bkp"):
            path.unlink(missing_ok=True)


class _SetLearningRate(keras.callbacks.Callback):
    """Sets the optimiser's rate when a training stage begins."""

    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate.assign(self.lr)


def _history_len(path):
    return len(pd.read_csv(path)) if path.exists() else 0


def _first_images(decoded, count, crop):
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


def load_run_config(run_dir) -> config_lib.Config:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    return config_lib.load_config(path)
