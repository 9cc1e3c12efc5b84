"""Loading a predictor from a run directory, a `.keras` file, a SavedModel, a `.tflite` or `.onnx` file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from lesionkeras import config as config_lib
from lesionkeras import losses as _losses  # noqa: F401 - registers the loss classes for loading
from lesionkeras import metrics as _metrics  # noqa: F401 - registers the metrics of compiled models
from lesionkeras import schedules as _schedules  # noqa: F401 - registers the schedules of saved optimizers
from lesionkeras.data import pipeline
from lesionkeras.data.missing.labels import parse_structures
from lesionkeras.errors import DataError
from lesionkeras.inference.onnx_runner import OnnxRunner
from lesionkeras.inference.predictor import EnsemblePredictor, Predictor
from lesionkeras.models import registry


def fold_dirs(path):
    """The `fold*/` sub-runs of a `fit --folds` run directory (sorted), else []."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(
        (d for d in path.glob("fold*") if (d / "model.keras").exists()),
        key=lambda d: int("".join(c for c in d.name[4:] if c.isdigit()) or 0),
    )


def load_predictor(path, threshold=None):
    """A predictor for a run directory, a `.keras` file, an exported artefact or a run with folds.

    A run directory holds model.keras + config.toml; a `.keras` file takes its
    preprocessing from a config.toml beside it when there is one (else
    ImageNet normalisation, threshold 0.5, with a note). The artefacts of
    `lesionkeras export` (a SavedModel folder, a `.tflite` or `.onnx` file) have their
    preprocessing baked in; size and threshold come from the `lesionkeras.json`
    beside them. A directory without `model.keras` but with `fold*/model.keras`
    gives an `EnsemblePredictor` averaging the folds.

    Args:
        path: str or Path. The model.
        threshold: float or None. Mask threshold; None uses the run's (fold 0's
            for a run with folds). Defaults to None.

    Returns:
        `Predictor` (or `EnsemblePredictor` for a run with folds).

    Raises:
        DataError: no such file, an unknown format, or a model that does not load.
    """
    path = Path(path)
    folds = fold_dirs(path) if not (path / "model.keras").exists() else []
    if folds:
        members = [load_predictor(d, threshold=threshold) for d in folds]
        return _ensemble(members, [d.name for d in folds], members[0].threshold, str(path))
    notes = []
    if (path.is_dir() and (path / "saved_model.pb").exists()) or path.suffix in EXPORTED_FILES:
        return _load_exported(path, threshold)
    if path.is_dir():
        model_file, cfg_file = path / "model.keras", path / "config.toml"
        if not model_file.exists():
            raise DataError(f"{path}: not a run directory (no model.keras)")
    elif path.suffix == ".keras":
        model_file, cfg_file = path, path.parent / "config.toml"
        if not path.exists():
            raise DataError(f"{path}: no such model file")
    else:
        raise DataError(
            f"{path}: unknown model format (expected a run directory, a .keras file, "
            "a SavedModel folder, a .tflite or a .onnx file)"
        )
    model = load_keras_model(model_file)
    method, color_constancy, names, activation, container = "", "none", (), "sigmoid", -1
    if cfg_file.exists():
        cfg = config_lib.load_config(cfg_file)
        method, color_constancy = cfg.method, cfg.data.color_constancy
        names, activation, container = recorded_outputs(cfg, model)
        size, mean, std, thr = cfg.data.image_size, cfg.data.mean, cfg.data.std, cfg.train.threshold
        size = cfg.data.crop_size or size
        if not (mean and std):
            mean, std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
    else:
        notes.append(
            f"warning: {model_file}: no config.toml beside it; using ImageNet "
            "normalisation, threshold 0.5 and the model's input size"
        )
        size = model.input_shape[1] or 64
        mean, std, thr = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD, 0.5
    return Predictor(
        model, int(size), tuple(mean), tuple(std),
        float(threshold if threshold is not None else thr), str(path), notes, method,
        color_constancy, structures=tuple(names), container=container, activation=activation,
    )


def load_keras_model(path, **kwargs):
    """`keras.saving.load_model(path, **kwargs)`, its failures told in one line.

    Raises:
        DataError: `path` is missing, is not a `.keras` archive (a truncated or
            corrupt file: Keras itself would say "File not found"), or does not load.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a Keras model file (truncated or corrupt: "
                        f"{path.stat().st_size} bytes, not a .keras zip archive)")
    # Importing the builders registers their custom layers, which loading needs.
    registry.names()
    try:
        return keras.saving.load_model(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: cannot load the model ({type(e).__name__}: {first})") from None


def recorded_outputs(cfg, model):
    """What a run's output channels are, read from what the run recorded (not its method name).

    The run's config lists its structures (`smile.structures`, K names) and
    the saved model has its number of output channels: K channels are K
    independent sigmoid heads (`smile`), K + 1 a softmax over background
    (channel 0) and the K structures (`multiclass`). Any other count, such as
    the single channel of a run whose config keeps the default structure
    list, is one unnamed sigmoid map.

    Args:
        cfg: `config.Config` of the run.
        model: keras.Model. The run's model.

    Returns:
        (structure names, activation, container): a tuple of str (empty for
        one unnamed map), one of `predictor.ACTIVATIONS`, and the channel of
        the container structure `smile.container` among the names (-1 for
        none; the softmax gives it `1 - p(background)`).
    """
    shape = model.output_shape
    channels = shape[-1] if isinstance(shape, tuple) else None
    names = parse_structures(cfg.smile.structures)
    if channels not in (len(names), len(names) + 1):
        return (), "sigmoid", -1
    c = cfg.smile.container
    container = names.index(c) if c in names and len(names) > 1 else -1
    return names, "softmax_structures" if channels == len(names) + 1 else "sigmoid", container


def load_ensemble(paths, threshold=None):
    """An `EnsemblePredictor` over several models of the same task.

    Any mix of run directories (a run with folds counts as one member, its
    folds averaged first), `.keras` files, SavedModel folders, `.tflite` and
    `.onnx` files; each member keeps its own preprocessing.

    Args:
        paths: list of str or Path, at least two.
        threshold: float or None. Threshold of the averaged map; None uses
            the first member's.

    Returns:
        EnsemblePredictor. Members are named by their path.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise DataError(f"an ensemble needs at least two models (got {len(paths)})")
    members = [load_predictor(p, threshold=threshold) for p in paths]
    names = [str(p) for p in paths]
    return _ensemble(members, names,
                     float(threshold if threshold is not None else members[0].threshold),
                     " + ".join(names))


def _ensemble(members, names, threshold, source):
    """An `EnsemblePredictor` of `members`, which must not name different structures."""
    named = {n: tuple(m.structures) for n, m in zip(names, members) if len(m.structures) > 1}
    if len(set(named.values())) > 1:
        who = "; ".join(f"{n}: {', '.join(s)}" for n, s in named.items())
        raise DataError(f"ensemble members are not the same task (structures differ: {who})")
    return EnsemblePredictor(
        members, names, threshold, source, [n for m in members for n in m.notes],
        members[0].method, structures=next(iter(named.values()), ()),
    )


def _load_exported(path, threshold):
    """A `Predictor` over a SavedModel folder, a `.tflite` or `.onnx` file from `lesionkeras export`."""
    if not path.exists():
        raise DataError(f"{path}: no such model file")
    meta_file = path / "lesionkeras.json" if path.is_dir() else path.with_suffix(
        ".lesionkeras.json")
    try:
        if path.is_dir():
            fn = tf.saved_model.load(str(path)).signatures["serving_default"]
            size = fn.structured_input_signature[1]["images"].shape[1]

            def forward(batch):
                return fn(images=tf.cast(batch, tf.float32))["probabilities"]
        else:
            runner = EXPORTED_FILES[path.suffix](path)
            size = runner.image_size

            def forward(batch):
                return runner(np.asarray(batch, np.float32))["probabilities"]
    except DataError:
        raise  # already one line (e.g. the `onnx` extra is missing)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
        raise DataError(f"{path}: cannot load the exported model ({type(e).__name__}: {e})") from None
    notes, meta = [], {}
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
    else:
        notes.append(f"warning: {path}: no {meta_file.name} beside it; using threshold 0.5")
    thr = threshold if threshold is not None else meta.get("threshold", 0.5)
    return Predictor(
        None, int(meta.get("input_size") or size), tuple(meta.get("mean", ())),
        tuple(meta.get("std", ())), float(thr), str(path), notes, meta.get("method", ""),
        meta.get("color_constancy", "none"), forward,
        structures=tuple(meta.get("structures", ())), container=int(meta.get("container", -1)),
        activation=meta.get("activation", "sigmoid"),
    )


class TFLiteRunner:
    """Runs the `serving_default` signature of a `.tflite` file on whole batches.

    The input tensor is resized to each batch (`resize_tensor_input`, strict:
    only a dimension the file leaves open, the batch of our exports, may
    change) and the tensors re-allocated only when the batch size changes.
    A file whose batch dimension is fixed runs image by image instead.
    Uses the `ai-edge-litert` interpreter.

    Args:
        path: str or Path. The `.tflite` file.
        num_threads: int or None. Interpreter threads; None lets LiteRT choose.

    Example:

    ```python
    runner = TFLiteRunner("model.tflite")
    probs = runner(images)["probabilities"]  # images: float32 (N, S, S, 3), 0-255
    ```
    """

    def __init__(self, path, num_threads=None):
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        signature = self.interpreter.get_signature_runner("serving_default")
        (self._input,) = signature.get_input_details().values()
        self._outputs = {k: v["index"] for k, v in signature.get_output_details().items()}
        # The signature runner holds the interpreter's buffers, which blocks resizing.
        del signature
        self.image_size = int(self._input["shape"][1])
        # -1 in the signature shape: the converter left the batch open.
        self.resizable = int(self._input["shape_signature"][0]) == -1
        self._batch = int(self._input["shape"][0])
        self.interpreter.allocate_tensors()

    def _resize(self, n):
        if n == self._batch:
            return True
        if not self.resizable:
            return False
        try:
            self.interpreter.resize_tensor_input(
                self._input["index"], [n, *self._input["shape"][1:]], strict=True)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError):
            self.resizable = False
            return False
        self._batch = n
        return True

    def _invoke(self, images):
        self.interpreter.set_tensor(self._input["index"], images)
        self.interpreter.invoke()
        return {k: self.interpreter.get_tensor(i) for k, i in self._outputs.items()}

    def __call__(self, images):
        """Outputs of `serving_default` for a float32 batch `(N, S, S, 3)` of raw images.

        Returns:
            dict of output name -> numpy array with a leading batch axis `N`.
        """
        images = np.ascontiguousarray(images, np.float32)
        if self._resize(len(images)):
            return self._invoke(images)
        # A fixed batch dimension (usually 1): chunks of that size, the last one padded.
        step, n = self._batch, len(images)
        pad = -n % step
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        parts = [self._invoke(images[i : i + step]) for i in range(0, len(images), step)]
        return {k: np.concatenate([p[k] for p in parts])[:n] for k in self._outputs}


# The single-file artefacts of `lesionkeras export`, by suffix: a runner taking a
# float32 batch of raw images and returning a dict with `probabilities`.
EXPORTED_FILES = {".tflite": TFLiteRunner, ".onnx": OnnxRunner}
