"""Callbacks of every `fit`: backup for resume, checkpoints, learning-rate logging, TensorBoard images, NaN stop."""

import json
import math
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from lesionkeras import files
from lesionkeras.data import epochs
from lesionkeras.errors import TrainingError
from lesionkeras.models.segan import AdaptiveLogistic
from lesionkeras.training import compat


class LearningRateLogger(keras.callbacks.Callback):
    """Adds the current `learning_rate` to the epoch logs (history.csv, TensorBoard)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self.model.optimizer is None:
            return
        lr = self.model.optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))


class StopOnNaN(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and remembers where.

    Unlike `keras.callbacks.TerminateOnNaN` it keeps the place, so the command
    can end with one clear message instead of a run that silently stopped.
    """

    def __init__(self):
        super().__init__()
        self.where = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.where = (self._epoch + 1, batch + 1)
            self.model.stop_training = True

    def raise_if_stopped(self, run_dir):
        """Raises `TrainingError` (exit code 1) naming the run and the batch, if it stopped."""

        if self.where:
            epoch, batch = self.where
            raise TrainingError(
                f"{run_dir}: the loss became NaN at epoch {epoch}, batch {batch}; "
                "lower the learning rate (--lr) or check the data"
            )


def image_grid(images, truths, probs):
    """Rows of `input | truth | prediction` as one uint8 (1, H*n, W*3, 3) image."""
    rows = []
    for img, t, p in zip(images, truths, probs):
        t3 = np.repeat((t[..., :1] * 255).astype(np.uint8), 3, axis=-1)
        p3 = np.repeat((np.clip(np.nan_to_num(p[..., :1]), 0, 1) * 255).astype(np.uint8), 3, axis=-1)
        rows.append(np.concatenate([img.astype(np.uint8), t3, p3], axis=1))
    return np.concatenate(rows, axis=0)[None]


class ImageGrid(keras.callbacks.Callback):
    """Writes `input | truth | prediction` of fixed validation images to TensorBoard.

    Args:
        logdir: str. TensorBoard directory; images go to `logdir/images`.
        raw_images: uint8 (n, S, S, 3). The images as shown.
        inputs: float32 (n, S, S, 3). The same images as the model sees them.
        truths: float32 (n, S, S, 1). Their masks.
        every: int. Write every this many epochs (and after the first).
    """

    def __init__(self, logdir, raw_images, inputs, truths, every=5):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(logdir) + "/images")
        self.raw_images, self.inputs, self.truths = raw_images, inputs, truths
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch % self.every and epoch != 0):
            return
        logits = self.model.predict_on_batch(self.inputs)
        probs = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float32)))
        grid = image_grid(self.raw_images, self.truths, probs)
        with self.writer.as_default():
            tf.summary.image("validation/input_truth_prediction", grid, step=epoch)
        self.writer.flush()

    def on_train_end(self, logs=None):
        # Flushed, not closed: `fit --method finetune` fits twice with the same callbacks.
        self.writer.flush()


def logistic_k(epoch, decay=0.9, every=25, floor=0.3, initial=1.0):
    """k of SegAN's adaptive logistic at `epoch` (0-based): `initial * decay**(epoch // every)`,
    never below `floor` (Xue et al. 2018: 0.9 every 25 epochs, down to 0.3)."""
    return max(float(floor), float(initial) * float(decay) ** (int(epoch) // int(every)))


class AnnealLogisticK(keras.callbacks.Callback):
    """Anneals k of every `AdaptiveLogistic` layer of the model (SegAN, eq. 3).

    At the start of each epoch sets k to `logistic_k(epoch, ...)` (from the
    layer's initial k) and logs it as `logistic_k`. `k` is a model variable,
    so checkpoints keep the value they were trained with, and a resumed run
    continues the schedule from its epoch.

    Args:
        decay: float. Factor applied every `every` epochs. Defaults to 0.9.
        every: int. Epochs between two decays. Defaults to 25.
        floor: float. Smallest k. Defaults to 0.3.
    """

    def __init__(self, decay=0.9, every=25, floor=0.3):
        super().__init__()
        if not (0 < decay <= 1 and every >= 1 and floor > 0):
            raise ValueError(
                "Expected 0 < decay <= 1, every >= 1 and floor > 0. "
                f"Received: decay={decay}, every={every}, floor={floor}"
            )
        self.decay, self.every, self.floor = decay, every, floor
        self._k = None

    def _layers(self):
        found, stack = [], [self.model]
        while stack:
            layer = stack.pop()
            if isinstance(layer, AdaptiveLogistic):
                found.append(layer)
            if isinstance(layer, keras.Model):
                stack.extend(layer.layers)
            if isinstance(getattr(layer, "network", None), keras.Model):
                stack.append(layer.network)
        return found

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self._layers():
            self._k = logistic_k(epoch, self.decay, self.every, self.floor, layer.initial_k)
            layer.k.assign(self._k)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._k is not None:
            logs["logistic_k"] = self._k


class SaveCheckpoints(keras.callbacks.Callback):
    """Saves the trained network: `best` when `monitor` improves, `last` every epoch.

    A wrapper model (a custom training step around a network) saves its
    `network` only, so the files load with `keras.saving.load_model` and
    predict like any plain model.

    Args:
        best: path. Best checkpoint. last: path. Last epoch.
        monitor: str. Log key to maximise (its name without `val_` when absent).
        initial_best: float or None. Best value so far (a resumed run: only a better
            epoch replaces its `best`). Defaults to None.
    """

    def __init__(self, best, last, monitor, initial_best=None):
        super().__init__()
        self.best_path, self.last_path, self.monitor = str(best), str(last), monitor
        self.best = -float("inf") if initial_best is None else float(initial_best)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor, logs.get(self.monitor.replace("val_", "")))
        network = getattr(self.model, "network", self.model)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            save_model(network, self.best_path)
        save_model(network, self.last_path)


class HistoryWriter(keras.callbacks.Callback):
    """Adds each epoch's row to a run's `history.csv`, rewriting the file atomically.

    Like `keras.callbacks.CSVLogger(append=True)` (columns `epoch`, then the log
    keys sorted), but the file is replaced whole (`files.write_text`) instead of
    appended to, so a kill never leaves a partial row. A file of a few hundred
    rows takes milliseconds to rewrite.

    Args:
        path: path. The CSV file; rows already in it are kept.
    """

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": int(epoch)}
        for name in sorted(logs):
            value = logs[name]
            row[name] = float(np.asarray(value)) if np.ndim(value) == 0 else str(value)
        old = (pd.read_csv(self.path) if self.path.exists() and self.path.stat().st_size
               else pd.DataFrame())
        table = pd.concat([old, pd.DataFrame([row])], ignore_index=True)
        files.write_text(self.path, table.to_csv(index=False))


class CompactProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar showing a few values: with K structures the full logs
    (Dice, Jaccard, sensitivity... per structure, and their validation twins)
    make a line wider than any terminal.

    Args:
        keys: iterable of str. Log keys shown (with their `val_` twins).
    """

    def __init__(self, keys):
        super().__init__()
        self.keys = {*keys, *(f"val_{k}" for k in keys)}

    def _shown(self, logs):
        return {k: v for k, v in (logs or {}).items() if k in self.keys}

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, self._shown(logs))

    def on_test_batch_end(self, batch, logs=None):
        super().on_test_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, self._shown(logs))


class SetEpoch(keras.callbacks.Callback):
    """Puts each epoch's number on the data clock before its batches are drawn (`data.epochs`)."""

    def on_epoch_begin(self, epoch, logs=None):
        epochs.set_epoch(epoch)


class _SaveBackup(keras.callbacks.Callback):
    """Writes `backup` (a `RunBackup`) at the end of each epoch; see `RunBackup.saver`."""

    def __init__(self, backup):
        super().__init__()
        self.backup = backup

    def on_epoch_end(self, epoch, logs=None):
        self.backup.save(epoch + 1)


def save_model(model, path):
    """`model.save(path)`, atomically: a kill leaves the previous file, never a truncated one."""
    with files.atomic_path(path) as tmp:
        model.save(tmp)


METADATA = "training_metadata.json"
# Backups written before the weights' name was recorded in the metadata.
_OLD_WEIGHTS = "latest.weights.h5"


def backup_weights(backup_dir):
    """The weights file the backup's metadata commits to, or None (no backup)."""
    meta = Path(backup_dir) / METADATA
    if not meta.exists():
        return None
    path = Path(backup_dir) / json.loads(meta.read_text()).get("weights", _OLD_WEIGHTS)
    return path if path.exists() else None


def backup_epoch(backup_dir):
    """Epochs completed according to the backup's metadata, or None."""
    meta = Path(backup_dir) / METADATA
    return int(json.loads(meta.read_text())["epoch"]) if meta.exists() else None


def clear_backup(backup_dir):
    """Removes the backup's metadata and weights (other files in the folder stay)."""
    backup_dir = Path(backup_dir)
    for path in [backup_dir / METADATA, *backup_dir.glob("epoch*.weights.h5"),
                 backup_dir / _OLD_WEIGHTS, backup_dir / f"{_OLD_WEIGHTS}.bkp",
                 backup_dir / f"{METADATA}.bkp"]:
        path.unlink(missing_ok=True)


def save_state(model, backup_dir, weights_name, record_name, epoch):
    """Commits `model`'s training state in `backup_dir`: weights file, then its record.

    The weights file (`weights_name`: weights and optimiser state, written whole
    under a temporary name and renamed) comes first, then the record
    `record_name` naming it: `{"epoch", "weights", "optimizer_variables",
    "seed_states"}`, the last being the random state of the model's layers
    (dropout), which Keras' weights files leave out. A kill before the record's
    rename leaves the previous record in force.
    """
    backup_dir = Path(backup_dir)
    backup_dir.mkdir(parents=True, exist_ok=True)
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        # Saved with its slots, so the file loads into a model whose optimiser is
        # built (as `load_state` builds it) whether or not it had trained.
        optimizer.build(model.trainable_variables)
    with files.atomic_path(backup_dir / weights_name) as tmp:
        model.save_weights(tmp)
    record = {
        "epoch": int(epoch),
        "weights": weights_name,
        "optimizer_variables": len(optimizer.variables) if optimizer is not None else 0,
        "seed_states": [np.asarray(v.numpy()).tolist() for v in compat.seed_states(model)],
    }
    files.write_text(backup_dir / record_name, json.dumps(record))


def load_state(model, backup_dir, record_name, *, optimizer_if_it_fits=False):
    """Restores what `save_state` committed under `record_name` into `model`.

    Args:
        optimizer_if_it_fits: bool. Load the optimiser state only when the saved
            optimiser has as many variables as `model`'s (built on its trainable
            variables): an earlier training stage may have trained another set of
            variables; False (the default) always loads it.
    """
    record = json.loads((Path(backup_dir) / record_name).read_text())
    optimizer = model.optimizer
    if optimizer is not None and not optimizer.built:
        # The optimiser's slots must exist before their values can load.
        optimizer.build(model.trainable_variables)
    skip = []
    if optimizer is not None and optimizer_if_it_fits:
        if record.get("optimizer_variables") != len(optimizer.variables):
            skip = [optimizer]
    model.load_weights(Path(backup_dir) / record["weights"], objects_to_skip=skip or None)
    states = compat.seed_states(model)
    if len(record.get("seed_states", ())) == len(states):
        for variable, value in zip(states, record["seed_states"]):
            variable.assign(np.asarray(value, dtype=variable.dtype))


class RunBackup(keras.callbacks.Callback):
    """The training state `fit --resume` continues from, consistent after a kill at any moment.

    Like `keras.callbacks.BackupAndRestore` (weights with the optimiser state,
    and the epoch), but a backup is two files committed in order: the weights
    under a new name (`epoch<k>.weights.h5`, written whole and renamed), then
    the metadata naming them (`{"epoch": k, "weights": ...}`, also renamed into
    place); only then is the previous weights file removed. A kill before the
    metadata's rename leaves the previous backup in force; after it, the new
    one. Keras' callback writes both files in place, so a kill could leave a
    truncated file or weights of one epoch with the epoch count of another.

    The backup is written by `saver()`, a second callback that the run loop puts
    after the history writer, so an epoch's history row always exists before
    the backup that says the epoch is done (the loop drops rows of epochs the
    backup does not cover when it resumes).

    Args:
        backup_dir: path. Folder of the backup.
    """

    def __init__(self, backup_dir):
        super().__init__()
        self.backup_dir = Path(backup_dir)

    def on_train_begin(self, logs=None):
        if backup_weights(self.backup_dir) is not None:
            load_state(self.model, self.backup_dir, METADATA)
            compat.set_restored_epoch(self.model, backup_epoch(self.backup_dir))

    def save(self, epochs_done):
        old = backup_weights(self.backup_dir)
        name = f"epoch{epochs_done}.weights.h5"
        save_state(self.model, self.backup_dir, name, METADATA, epochs_done)
        if old is not None and old.name != name:
            old.unlink(missing_ok=True)

    def saver(self):
        """The callback that writes the backup at the end of each epoch."""
        return _SaveBackup(self)
