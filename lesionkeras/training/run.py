"""`fit`: config -> validated data -> model -> `model.fit` -> run directory.

Run directory (the contract the other commands read):

    config.toml     the fully resolved config (incl. normalisation statistics)
    model.keras     best checkpoint by validation Dice
    last.keras      last epoch
    history.csv     one row per epoch
    metrics.json    final validation metrics of model.keras
    tensorboard/    scalars and the input | truth | prediction grid
    backup/         the training state `--resume` continues from (`RunBackup`)

Every file is written whole or not at all (`files.py`), and an epoch's history
row is written before the backup that records the epoch as done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import shutil
import warnings as pywarnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from lesionkeras import config as config_lib
from lesionkeras import files
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.data import pipeline
from lesionkeras.training import compat, distribute
from lesionkeras.training import method as method_lib
from lesionkeras.training import callbacks as callbacks_lib
from lesionkeras.training.callbacks import (
    CompactProgbar, HistoryWriter, RunBackup, SaveCheckpoints, SetEpoch, StopOnNaN)
from lesionkeras.training.method import RunData


@dataclasses.dataclass
class FitResult:
    run_dir: Path
    metrics: dict
    epochs_run: int
    warnings: list


def default_run_dir(method: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{method}-{stamp}"


def prepare_data(cfg):
    """The validated manifest of `cfg` with its `split` column, as `fit` sees it, and warnings.

    Raises:
        ConfigError, DataError: before anything is written.
    """
    method = method_lib.create(cfg)
    method.check()
    return method.manifest()


def run_dir_for(cfg, resume_dir, method):
    """The run directory: a new, empty one, or `resume_dir` checked against `cfg`.

    Raises:
        ConfigError: the new folder is not empty, or `resume_dir` is not a run, or
            `cfg` changes a key that fixes the run's data split or network.
    """
    if resume_dir:
        run_dir = Path(resume_dir)
        saved = load_run_config(run_dir).to_dict()
        files.check_output(run_dir)
        new = cfg.to_dict()
        for key in (*method_lib.RESUME_KEYS, *method.resume_keys):
            old_value, new_value = _lookup(saved, key), _lookup(new, key)
            if old_value != new_value:
                raise ConfigError(f"{run_dir}: the run has `{key} = {old_value!r}`; it cannot "
                                  f"resume with {new_value!r}")
        return run_dir
    return new_run_dir(cfg)


def new_run_dir(cfg):
    """`cfg.out` (or a fresh `runs/<method>-<time>`), refused unless absent or empty and writable."""
    run_dir = files.check_output(cfg.out or default_run_dir(cfg.method))
    # The lock file and files a killed run had not finished writing do not count.
    if run_dir.exists() and any(p.name != files.LOCK_NAME and not files.is_temporary(p)
                                for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: run directory exists and is not empty "
                          "(choose another --out, or continue it with --resume)")
    return run_dir


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


@contextlib.contextmanager
def _removed_on_setup_error(run_dir, fresh):
    """Deletes `run_dir` (checked empty or absent before) if setting up a fresh run fails."""
    try:
        yield
    except (ConfigError, DataError):
        if fresh:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def best_so_far(history_csv: Path, monitor: str, since: int = 0):
    """The best `monitor` in a run's history.csv from epoch `since` (0-based) on.

    None: no finite value yet.
    """
    hist = read_history(history_csv)
    if "epoch" in hist:
        hist = hist[hist["epoch"] >= since]
    if monitor not in hist or hist[monitor].dropna().empty:
        return None
    return float(hist[monitor].max())


def fit(cfg, *, resume_dir=None, verbose=1, log=print, extra_callbacks=()) -> FitResult:
    """Trains `cfg.method` and fills the run directory; the one run loop of every task.

    Args:
        cfg: `Config`. The resolved configuration.
        resume_dir: str or None. Continue the interrupted run in this folder.
        verbose: int. Keras verbosity (1 = progress bar, 2 = one line per epoch).
        log: callable. Where status lines go.
        extra_callbacks: sequence of `keras.callbacks.Callback`, run after the built-in ones.
    """
    method = method_lib.create(cfg)
    method.check()
    # First, before any TensorFlow op: MultiWorkerMirroredStrategy must configure
    # the runtime's collective ops before it starts.
    strategy = distribute.resolve_strategy(cfg.train.strategy)
    run_dir = run_dir_for(cfg, resume_dir, method)
    method.cfg = cfg = cfg.override({"out": str(run_dir)})
    method.resuming = bool(resume_dir)
    method.log = log
    method.replicas = replicas = distribute.check_batch_size(cfg.train.batch_size, strategy)
    keras.utils.set_random_seed(cfg.seed)
    df, warnings = method.manifest()
    for line in warnings:
        log(line)
    data = RunData(df[df["split"] == "train"].reset_index(drop=True),
                   df[df["split"] == "val"].reset_index(drop=True), warnings)
    method.prepare(data)
    cfg = method.cfg

    # One process per run directory, from before its first file to the end.
    run_dir.mkdir(parents=True, exist_ok=True)
    with _names_run_dir_on_interrupt(run_dir), files.run_lock(run_dir):
        if not resume_dir:
            new_run_dir(cfg)  # again: a run may have filled it while this one set up
        files.remove_temporaries(run_dir)  # of a killed run; no other writer holds the lock
        return _train(method, cfg, data, run_dir, strategy, replicas, resume_dir, verbose, log,
                      extra_callbacks)


@contextlib.contextmanager
def _names_run_dir_on_interrupt(run_dir):
    """Ctrl-C (`KeyboardInterrupt`) leaves with `.run_dir`, so the CLI can name what to resume."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        interrupt.run_dir = run_dir
        raise


def _train(method, cfg, data, run_dir, strategy, replicas, resume_dir, verbose, log,
           extra_callbacks):
    """The part of `fit` that writes: run directory, build, stages, final metrics."""
    warnings = data.warnings
    # A fresh run that fails before training (bad data, a refused model) leaves
    # no run directory behind.
    with _removed_on_setup_error(run_dir, fresh=not resume_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume_dir:  # a resumed run's config is saved once its state loads
            cfg.save(run_dir / "config.toml")
        method.write_files(run_dir, data)
        policy = distribute.set_precision(cfg.train.mixed_precision)
        stages = method.stages(data)
        total = sum(stage.epochs for stage in stages)
        if (resume_dir and (run_dir / "metrics.json").exists()
                and (_backup_epoch(run_dir / "backup") or 0) >= total):
            log(f"{run_dir}: already complete ({total} epochs); nothing to train "
                "(a larger --epochs trains on)")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            return FitResult(run_dir, metrics, 0, warnings)
        val_ds = None
        if len(data.val_df):
            keep, val_batch = pipeline.validation_batches(
                len(data.val_df), cfg.train.batch_size, replicas, log)
            val_ds = method.val_dataset(data, keep, val_batch)
        with strategy.scope():
            model = method.build(data, max(int(stages[0].dataset.cardinality()), 1))
            if resume_dir:
                _check_resumable(model, run_dir, strict=len(stages) == 1)
        method.after_build(model)
        if resume_dir:
            cfg.save(run_dir / "config.toml")

    monitor = ("val_" if val_ds is not None else "") + method.monitor
    nan_stop = StopOnNaN()
    checkpoints = SaveCheckpoints(run_dir / "model.keras", run_dir / "last.keras", monitor)
    backup = RunBackup(run_dir / "backup")
    callbacks = [
        backup,  # first: it restores the state the others continue from
        SetEpoch(),
        nan_stop,
        # Before the writers below, so that what they add to the logs is written.
        *method.callbacks(data, model),
        checkpoints,
        HistoryWriter(run_dir / "history.csv"),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
        # After the history row and the checkpoints: the backup commits the epoch.
        backup.saver(),
        *extra_callbacks,
    ]
    if cfg.train.progress_metrics == "compact":
        # Keras adds its own bar only when the callbacks hold none.
        callbacks.append(CompactProgbar({"loss", "dice", method.monitor}))
    log(f"{method.describe(model, data)}; strategy {type(strategy).__name__} with "
        f"{strategy.num_replicas_in_sync} replica(s); precision {policy}")
    epochs_run = _run_stages(model, strategy, stages, val_ds, callbacks, nan_stop, checkpoints,
                             run_dir, verbose if cfg.train.progress else (2 if verbose else 0))
    nan_stop.raise_if_stopped(run_dir)
    if not (run_dir / "model.keras").exists():
        # The monitor was never finite.
        callbacks_lib.save_model(method_lib.network_of(model), run_dir / "model.keras")
    best = keras.saving.load_model(run_dir / "model.keras")
    # E.g. a threshold chosen on validation, stored with the run.
    best = method.after_fit(best, val_ds, data, log)
    if method.cfg is not cfg:
        cfg = method.cfg
        cfg.save(run_dir / "config.toml")
    metrics = method.final_metrics(best, val_ds, data, run_dir)
    metrics.update(
        epochs=int(_history_len(run_dir / "history.csv")),
        train_images=len(data.train_df),
        val_images=len(data.val_df),
    )
    files.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return FitResult(run_dir, metrics, epochs_run, warnings)


def _check_resumable(model, run_dir, strict):
    """Loads the run's saved training state into `model`, or refuses the resume in one line.

    Before `config.toml` is rewritten with the resume's overrides: a resume whose
    settings give a model the saved weights do not fit changes nothing. With
    `strict` (one stage) the optimiser state must fit too; across stages the
    saved optimiser may be an earlier stage's.

    Raises:
        ConfigError: the state does not load.
    """
    backup_dir = run_dir / "backup"
    if callbacks_lib.backup_weights(backup_dir) is not None:
        record = callbacks_lib.METADATA
    elif (backup_dir / STAGE_START).exists():
        record = STAGE_START
    else:
        return  # stopped in its first epoch: it starts again
    try:
        with pywarnings.catch_warnings():
            pywarnings.simplefilter("error" if strict else "ignore", UserWarning)
            callbacks_lib.load_state(model, backup_dir, record, optimizer_if_it_fits=not strict)
    except (ValueError, OSError, KeyError, UserWarning) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{run_dir}: cannot resume with these settings: the saved training "
                          f"state does not fit the model they give ({reason})") from None


def _run_stages(model, strategy, stages, val_ds, callbacks, nan_stop, checkpoints, run_dir,
                verbose):
    """Fits each stage in turn, epochs numbered on; returns the epochs trained now.

    On resume, stages that ended before the interruption are skipped (except the
    last, which may have more epochs now).
    """
    epochs_run = done = best_since = 0
    resume_epoch = _backup_epoch(run_dir / "backup")
    # Rows of epochs the backup does not cover (a kill between the two writes)
    # are trained again; drop them so each epoch has one row.
    trim_history(run_dir / "history.csv", resume_epoch or 0)
    for i, stage in enumerate(stages):
        if stage.new_best:
            best_since = done
        if (resume_epoch is not None and done + stage.epochs <= resume_epoch
                and i + 1 < len(stages)):
            done += stage.epochs  # finished before the interruption
            continue
        if stage.setup is not None:
            with strategy.scope():
                _enter_stage(model, run_dir / "backup", done, stage.setup)
        checkpoints.best = _or_minus_inf(
            best_so_far(run_dir / "history.csv", checkpoints.monitor, since=best_since))
        dataset = stage.dataset(model) if callable(stage.dataset) else stage.dataset
        stage_callbacks = callbacks
        if i:
            # A TensorBoard callback closes its writers at the end of a fit.
            stage_callbacks = [
                keras.callbacks.TensorBoard(cb.log_dir)
                if type(cb) is keras.callbacks.TensorBoard else cb
                for cb in callbacks
            ]
        if stage.lr is not None:
            # After RunBackup (first), which restores the optimiser's rate.
            stage_callbacks = [stage_callbacks[0], _SetLearningRate(stage.lr),
                               *stage_callbacks[1:]]
        compat.forget_restored_epoch(model)
        history = model.fit(
            dataset,
            validation_data=val_ds,
            initial_epoch=done,
            epochs=done + stage.epochs,
            callbacks=stage_callbacks,
            shuffle=False,  # the dataset shuffles itself, seeded
            verbose=verbose,
        )
        epochs_run += len(history.epoch)
        done += stage.epochs
        if nan_stop.where:
            break
    return epochs_run


def _or_minus_inf(value):
    return -float("inf") if value is None else value


def fit_folds(cfg, folds=None, *, resume_dir=None, verbose=1, log=print,
              extra_callbacks=()) -> FitResult:
    """Trains `folds` models on a K-fold split of the training data, one per fold.

    Fold i validates on the i-th part and trains on the others; each keeps its
    best-validation-Dice checkpoint in `RUN/fold{i}/` (a complete run
    directory). `RUN/summary.json` holds every fold's validation metrics and
    their mean; `evaluate`/`predict` on `RUN` average the folds (the Ensemble of
    Guth & deCampos 2018, section 3.5). `RUN/config.toml` and `RUN/folds.json`
    let `fit --resume RUN` continue: every fold already started resumes from
    its last epoch (a finished one is reused as it is unless `--epochs`
    grew), the others start.

    Args:
        cfg: `Config`. `data.folds`/`data.fold` are set per fold.
        folds: int. K >= 2. Read from `RUN/folds.json` when resuming.
        resume_dir: str or None. Continue this interrupted run with folds.
        verbose: int. Keras verbosity. log: callable. Where status lines go.
        extra_callbacks: sequence of `keras.callbacks.Callback`, given to every fold.

    Returns:
        `FitResult` of `RUN` with the mean validation metrics over the folds.

    Raises:
        ConfigError: K < 2, a fixed validation list, a non-empty `RUN`, or `RUN` in
            use by another process.
        DataError: the data cannot be used (checked before anything is written).
    """
    if resume_dir:
        folds = fold_count(resume_dir)
    run_dir = run_dir_for(cfg, resume_dir, method_lib.create(cfg))
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"`--folds` must be an integer >= 2. Received: {folds!r}")
    if cfg.data.val_list:
        raise ConfigError("`--folds` makes its own validation splits; drop `data.val_list`")
    cfg = cfg.override({"out": str(run_dir)})
    # The data (and the method's own inputs) before anything is written: a refused
    # run leaves no folds.json behind to refuse the corrected command.
    prepare_data(cfg.override({"data.folds": folds, "data.fold": 0}))
    run_dir.mkdir(parents=True, exist_ok=True)
    results = []
    # The folds' parent is what resumes, and one process writes it, from folds.json
    # to summary.json (each fold's own directory has its own lock too).
    with _names_run_dir_on_interrupt(run_dir), files.run_lock(run_dir):
        if not resume_dir:
            new_run_dir(cfg)  # again: a run may have filled it while this one set up
            files.write_text(run_dir / FOLDS_FILE, json.dumps({"folds": folds}) + "\n")
        cfg.save(run_dir / "config.toml")
        for i in range(folds):
            fold_dir = run_dir / f"fold{i}"
            log(f"fold {i + 1} of {folds}")
            fold_cfg = cfg.override({"out": str(fold_dir), "data.folds": folds, "data.fold": i})
            started = (fold_dir / "config.toml").exists()
            results.append(fit(
                fold_cfg, resume_dir=fold_dir if started else None, verbose=verbose, log=log,
                extra_callbacks=extra_callbacks,
            ))
        per_fold = {f"fold{i}": r.metrics for i, r in enumerate(results)}
        keys = [k for k in results[0].metrics if all(k in r.metrics for r in results)]
        mean = {k: float(np.mean([r.metrics[k] for r in results])) for k in keys}
        files.write_text(run_dir / "summary.json", json.dumps(
            {"folds": folds, "mean": mean, "per_fold": per_fold}, indent=2) + "\n")
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


def _backup_epoch(backup_dir: Path):
    """The epoch count recorded by the backup (or at a stage's start), or None."""
    epochs = [callbacks_lib.backup_epoch(backup_dir)]
    if (backup_dir / STAGE_START).exists():
        epochs.append(int(json.loads((backup_dir / STAGE_START).read_text())["epoch"]))
    epochs = [e for e in epochs if e is not None]
    return max(epochs) if epochs else None


STAGE_START = "stage_start.json"


def _enter_stage(model, backup_dir: Path, done: int, setup):
    """Runs a stage's `setup` at epoch `done`, from the state the uninterrupted run has there.

    A setup may recompile the model (a new optimiser, other trainable
    variables), so the backup of the previous stage no longer loads into the
    model after it. Here the backup taken at the end of the previous stage
    (in memory already, unless this process resumed at that point) is loaded
    before `setup`, with the optimiser state when it fits; the state after
    `setup` is then committed as `stage_start` and the backup removed, so
    `RunBackup` starts afresh and a run killed in the stage's first epoch
    resumes at the stage's start, exactly. Resuming later in the stage, the
    setup runs and `RunBackup` restores the stage's own backup.
    """
    def recorded(name):
        path = backup_dir / name
        return int(json.loads(path.read_text())["epoch"]) if path.exists() else None

    latest = callbacks_lib.backup_epoch(backup_dir)
    if latest == done and callbacks_lib.backup_weights(backup_dir) is not None:
        callbacks_lib.load_state(model, backup_dir, callbacks_lib.METADATA,
                                 optimizer_if_it_fits=True)
        setup(model)
        callbacks_lib.save_state(model, backup_dir, "stage_start.weights.h5", STAGE_START, done)
        callbacks_lib.clear_backup(backup_dir)
    elif latest is None and recorded(STAGE_START) == done:
        setup(model)
        callbacks_lib.load_state(model, backup_dir, STAGE_START)
    else:
        setup(model)


class _SetLearningRate(keras.callbacks.Callback):
    """Sets the optimiser's rate when a training stage begins."""

    def __init__(self, lr):
        super().__init__()
        self.lr = lr

    def on_train_begin(self, logs=None):
        self.model.optimizer.learning_rate.assign(self.lr)


def _history_len(path):
    return len(read_history(path))


def trim_history(path, epochs):
    """Drops the rows of epochs >= `epochs` from a run's history.csv (atomically)."""
    hist = read_history(path)
    if "epoch" in hist and (hist["epoch"] >= epochs).any():
        files.write_text(path, hist[hist["epoch"] < epochs].to_csv(index=False))


def read_history(path) -> pd.DataFrame:
    """A run's history.csv; empty when absent or empty (a run stopped in its first epoch)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path)


def load_run_config(run_dir) -> config_lib.Config:
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
    return config_lib.load_config(path)
