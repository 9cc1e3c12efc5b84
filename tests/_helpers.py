"""Pieces several test files share: callbacks, a two-device fit, a tiny classify config,
folders built once per test session."""

import fcntl
import os
import shutil
import subprocess
import sys

import keras
import numpy as np


class WeightRecorder(keras.callbacks.Callback):
    """Weights at the start and the end of each fit: `fits[i] = [start, end]`.

    Args:
        layer: str or None. Record only this layer's weights (trainable and batch-norm
            statistics), e.g. `"encoder"`; None records the whole model.
    """

    def __init__(self, layer=None):
        super().__init__()
        self.layer = layer
        self.fits = []

    def _weights(self):
        source = self.model.get_layer(self.layer) if self.layer else self.model
        return [np.array(w) for w in source.weights]

    def on_train_begin(self, logs=None):
        self.fits.append([self._weights()])

    def on_train_end(self, logs=None):
        self.fits[-1].append(self._weights())


class InterruptAfter(keras.callbacks.Callback):
    """Raises KeyboardInterrupt (as Ctrl-C would) at the end of epoch `epoch` (0-based)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def fit_on_two_cpus(args, timeout=600):
    """`lesionkeras fit ARGS` in a process of its own with two logical CPU devices.

    Logical devices must be set before TensorFlow starts, and the collective keys
    of several MirroredStrategy objects in one process collide; returns the
    `subprocess.CompletedProcess`.
    """
    script = (
        "import sys, tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu[0], [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "from lesionkeras.cli import main\n"
        "main(['fit'] + sys.argv[1:])\n"
    )
    return subprocess.run([sys.executable, "-c", script, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def tiny_classify_config(tmp_path, extra=""):
    """A TOML file for a seconds-long `--task classify` run on synthetic data."""
    path = tmp_path / "tiny.toml"
    path.write_text(
        "[data]\nsynthetic_count = 40\nsynthetic_size = 40\nval_fraction = 0.25\n"
        "[classify]\nbackbone = \"resnet18\"\nresize_width = 40\nresize_height = 36\n"
        "crop = 32\nreferences_per_class = 3\n" + extra
    )
    return str(path)


def untrained_run(run, *, size, seed, overrides, out_channels=1):
    """A run directory holding an untrained U-Net (8 filters, depth 2) and a config.

    Enough for `evaluate`/`predict`/`export` tests: `size` px inputs, the given
    config `overrides` (plus `data.image_size`), normalisation statistics of
    ordinary photographs.
    """
    from lesionkeras import config as config_lib
    from lesionkeras.models import registry

    run.mkdir(parents=True)
    keras.utils.set_random_seed(seed)
    registry.build("unet", input_shape=(size, size, 3), out_channels=out_channels, filters=8,
                   depth=2).save(run / "model.keras")
    config_lib.load_config(overrides={
        "data.image_size": size, "data.mean": [120.0, 110.0, 100.0],
        "data.std": [50.0, 45.0, 40.0], **overrides,
    }).save(run / "config.toml")
    keras.backend.clear_session()
    return run


def shared_dir(tmp_path_factory, name, build):
    """A folder built once per test session and shared by every pytest-xdist worker.

    The first worker to ask for `name` calls `build(path)` on a fresh folder; a worker
    asking meanwhile waits for it, later ones find it done. Use it for a training run
    that several tests only read (tests that change it copy it first), so one fit
    serves them whichever worker runs them. A build that raised is retried by the
    next caller.

    Args:
        tmp_path_factory: the pytest fixture.
        name: str. Folder name, unique in the session.
        build: callable(pathlib.Path). Fills the folder.

    Returns:
        pathlib.Path of the finished folder.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    root = root / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            if path.exists():
                shutil.rmtree(path)
            path.mkdir()
            build(path)
            done.touch()
    return path
