"""Export a trained model as a SavedModel (TensorFlow Serving), a TFLite or an ONNX file.

The exported graph takes raw 0-255 RGB images: the per-channel normalisation
of the run and its logits -> probabilities mapping (the sigmoid, or for
`multiclass` runs the softmax over background + K structures, exactly as
`inference.predictor.Predictor` computes it) are baked in, so a client needs no Python
preprocessing. A SavedModel has two signatures:
- `serving_default`: `images` float32 `(batch, S, S, 3)` at the model
  resolution `S` -> `probabilities` float32 `(batch, S, S, K)` and `mask`
  uint8 `(batch, S, S, K)` (1 where the probability reaches the run's
  threshold).
- `serving_bytes`: `image_bytes` string scalar, one encoded JPEG/PNG/BMP/GIF
  image of any size -> `probabilities` float32 `(H, W, K)` and `mask` uint8
  `(H, W, K)` at the image's own size.

A TFLite file holds `serving_default` only (its decoders are not TFLite ops).
It is float32 or quantised (`quantize`): `float16` weights, `dynamic`-range
int8 weights, or full `int8` weights and activations calibrated on a
representative dataset of real images (its input and output stay float32, so
every TFLite file is called the same way).
An ONNX file holds `serving_default` too, converted by `tf2onnx` from the same
function (`export_onnx`, extra `lesionkeras[onnx]`), its batch dimension
symbolic, and is checked with ONNX Runtime.
`lesionkeras.json` beside the model (`model.lesionkeras.json` beside a
`.tflite` or `.onnx` file) records the input size, channels,
normalisation, threshold, method, activation (`sigmoid` or
`softmax_structures`), structure names, quantisation and package version.

Every export is checked before it is published: the artefact and the Keras
model run on a few synthetic images, and the export is refused (nothing left
at `out`) when their probabilities differ by more than `tolerance` (float
exports) or when the Dice agreement of their thresholded masks falls below
`min_dice` (quantised exports, whose probabilities move by design). `out` is
checked before the model loads (`files.check_output`); a SavedModel is built in
a temporary folder next to `out` and renamed into place (`files.atomic_folder`),
a TFLite or ONNX file in a scratch folder and copied to `out` whole.

Example:
```python
from lesionkeras import export

result = export.export_model("runs/baseline", "exported/lesion/1")
print(result.max_abs_diff, result.dice)
```
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from lesionkeras import __version__, export_onnx, files
from lesionkeras.data import pipeline
from lesionkeras.data.color import apply_color_constancy
from lesionkeras.errors import DataError, LesionKerasError
from lesionkeras.inference.evaluate import list_images
from lesionkeras.inference.loading import TFLiteRunner, load_predictor
from lesionkeras.inference.onnx_runner import OnnxRunner
from lesionkeras.inference.predictor import probabilities_from_logits
from lesionkeras.data import synthetic

FORMATS = ("savedmodel", "tflite", "onnx")
# The single-file formats: the file's suffix, its metadata `<stem>.lesionkeras.json` beside it.
FILE_SUFFIXES = {"tflite": ".tflite", "onnx": ".onnx"}
QUANTIZE = ("none", "float16", "dynamic", "int8")
METADATA_FILE = "lesionkeras.json"
SIGNATURES = ("serving_default", "serving_bytes")


class ParityError(LesionKerasError):
    """The exported artefact does not reproduce the Keras model (CLI exit code 1)."""


@dataclasses.dataclass
class ExportResult:
    """What `export_model` wrote and how closely it matches the Keras model.

    Attributes:
        path: Path. The SavedModel folder, or the `.tflite` or `.onnx` file.
        metadata_path: Path. The `lesionkeras.json` written beside it.
        format: str. `savedmodel`, `tflite` or `onnx`.
        max_abs_diff: float. Largest absolute probability difference.
        dice: float. Dice agreement of the thresholded masks (1.0 = identical).
        images: int. Number of parity images.
    """

    path: Path
    metadata_path: Path
    format: str
    max_abs_diff: float
    dice: float
    images: int


def serving_functions(model, image_size, mean, std, threshold, color_constancy="none",
                      activation="sigmoid", container=-1):
    """The two serving functions, with preprocessing, activation and threshold baked in.

    The logits become probabilities through `inference.predictor.probabilities_from_logits`,
    the very mapping `predict` uses: a sigmoid per channel, or for `multiclass`
    runs (`softmax_structures`) the (K+1)-way softmax turned into K structure
    probabilities.

    Args:
        model: keras.Model. Returns logits `(batch, S, S, K)` for normalised input.
        image_size: int. Model input side `S`.
        mean: sequence of 3 floats. Per-channel mean on the 0-255 scale.
        std: sequence of 3 floats. Per-channel std on the 0-255 scale.
        threshold: float. Probability threshold of the `mask` output.
        color_constancy: str. Colour balance of the run (`data.color_constancy`).
            Defaults to `"none"`.
        activation: str. The logits -> probabilities mapping of the run
            (`inference.predictor.ACTIVATIONS`). Defaults to `"sigmoid"`.
        container: int. `softmax_structures` only: the container structure's
            channel, -1 for none. Defaults to -1.

    Returns:
        (serve, serve_bytes): `serve(images)` for a float32 batch of raw 0-255
        images at `S x S`; `serve_bytes(image_bytes)` for one encoded image.
    """
    # Plain floats, made constants inside each traced graph: an eager tensor
    # captured from here would become an extra input of a graph tf2onnx converts.
    mean = [float(m) for m in mean]
    std = [float(s) for s in std]
    size = (int(image_size), int(image_size))

    def probabilities(images):
        x = apply_color_constancy(tf.clip_by_value(images, 0.0, 255.0), color_constancy)
        x = (x - tf.constant(mean)) / tf.constant(std)
        return probabilities_from_logits(model(x, training=False), activation, container)

    def outputs(p):
        return {"probabilities": p, "mask": tf.cast(p >= threshold, tf.uint8)}

    def serve(images):
        return outputs(probabilities(tf.cast(images, tf.float32)))

    def serve_bytes(image_bytes):
        img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        # Same resizing as `inference.predictor.Predictor`, so both give the same maps.
        x = tf.image.resize(tf.cast(img, tf.float32), size, antialias=True)
        p = probabilities(x[tf.newaxis])[0]
        return outputs(tf.image.resize(p, tf.shape(img)[:2], method="bilinear"))

    return serve, serve_bytes


def write_savedmodel(model, path, image_size, mean, std, threshold, color_constancy="none",
                     activation="sigmoid", container=-1):
    """Writes the SavedModel with the `serving_default` and `serving_bytes` signatures.

    Args:
        model: keras.Model. Returns logits for normalised input.
        path: str or Path. Output folder.
        image_size: int. Model input side.
        mean: sequence of 3 floats. Per-channel mean (0-255 scale).
        std: sequence of 3 floats. Per-channel std (0-255 scale).
        threshold: float. Threshold of the `mask` outputs.
        color_constancy: str. Colour balance of the run. Defaults to `"none"`.
        activation: str. The run's logits -> probabilities mapping (see
            `serving_functions`). Defaults to `"sigmoid"`.
        container: int. `softmax_structures` container channel or -1. Defaults to -1.
    """
    serve, serve_bytes = serving_functions(
        model, image_size, mean, std, threshold, color_constancy, activation, container
    )
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve,
        input_signature=[
            tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
        ],
    )
    archive.add_endpoint(
        "serving_bytes", serve_bytes,
        input_signature=[tf.TensorSpec([], tf.string, name="image_bytes")],
    )
    archive.write_out(str(path), verbose=False)


def write_tflite(saved_model_dir, path, quantize="none", representative=None):
    """Converts the `serving_default` signature of a SavedModel to a TFLite file.

    Args:
        saved_model_dir: str or Path. SavedModel from `write_savedmodel`.
        path: str or Path. The `.tflite` file written.
        quantize: str. `none` (float32), `float16` (float16 weights),
            `dynamic` (int8 weights, float activations) or `int8` (int8
            weights and activations, float32 input and output). Defaults to
            `"none"`.
        representative: array or None. `int8` only: raw 0-255 images
            `(N, S, S, 3)` that calibrate the activation ranges (they pass
            through the baked-in preprocessing, as served images do).
    """
    if quantize not in QUANTIZE:
        raise DataError(f"unknown quantisation {quantize!r} (expected {', '.join(QUANTIZE)})")
    converter = tf.lite.TFLiteConverter.from_saved_model(
        str(saved_model_dir), signature_keys=["serving_default"]
    )
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        if representative is None or not len(representative):
            raise DataError("int8 quantisation needs representative images")
        images = np.asarray(representative, np.float32)

        def dataset():
            for i in range(len(images)):
                yield {"images": images[i : i + 1]}

        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    Path(path).write_bytes(converter.convert())


def representative_images(source, image_size, limit=100):
    """Raw images of a folder resized to the model input, for int8 calibration.

    Args:
        source: str or Path. A data folder (any layout `predict` reads) or one image.
        image_size: int. Model input side.
        limit: int. At most this many images (the first, sorted). Defaults to 100.

    Returns:
        float32 array `(N, S, S, 3)`, values 0-255.

    Raises:
        DataError: the folder is missing, empty or holds an unreadable image.
    """
    df = list_images(source)
    out = []
    for path in df["image"].astype(str).tolist()[:limit]:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - any decode failure is a bad input file
            raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
        # The same resizing as `inference.predictor.Predictor`, so calibration sees served inputs.
        out.append(tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size),
                                   antialias=True).numpy())
    return np.stack(out)


def parity_images(image_size, count=4, seed=0):
    """Synthetic lesion images, (count, S, S, 3) uint8, deterministic."""

    return np.stack(
        [synthetic.make_sample(seed, i, size=int(image_size)).image for i in range(count)]
    )


def keras_probabilities(predictor, images):
    """Probabilities of the Keras model on raw images at the model size, (N, S, S, K)."""
    x = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
    x = apply_color_constancy(x, _color_constancy(predictor))
    x = pipeline.normalizer(predictor.mean, predictor.std)(x)
    return np.asarray(predictor.to_probabilities(predictor.model(x, training=False)))


def _color_constancy(predictor):
    return getattr(predictor, "color_constancy", "none") or "none"


def mask_dice(a, b):
    """Dice agreement of two boolean masks pooled over all pixels (1.0 if both empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _png_bytes(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _run_savedmodel(path, images, encoded):
    loaded = tf.saved_model.load(str(path))
    probs = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))
    from_bytes = loaded.signatures["serving_bytes"](image_bytes=tf.constant(encoded))
    return probs["probabilities"].numpy(), from_bytes["probabilities"].numpy()


def _run_tflite(path, images):
    return TFLiteRunner(path)(np.asarray(images, np.float32))["probabilities"]


def _write_and_run_onnx(model_args, path, images, out):
    """Converts to `path` and runs it in ONNX Runtime; a file that does not run is refused.

    Returns:
        (probabilities on `images`, metadata: opsets, converter and runtime versions).
    """
    serve, _ = serving_functions(export_onnx.inference_model(model_args[0]), *model_args[1:])
    try:
        onnx_model = export_onnx.write_onnx(serve, path, model_args[1])
        runner = OnnxRunner(path)
        probs = runner(images)["probabilities"]
    except LesionKerasError:
        raise
    except Exception as e:  # noqa: BLE001 - an op tf2onnx or ONNX Runtime does not support
        first = (str(e).strip().splitlines() or [""])[0]
        raise ParityError(f"{out}: the ONNX conversion does not run in ONNX Runtime "
                          f"({type(e).__name__}: {first}); artefact removed") from e
    return probs, {
        "opset": {d.domain or "ai.onnx": d.version for d in onnx_model.opset_import},
        # producer_version is "1.17.0 <git hash or None>".
        "converter": f"{onnx_model.producer_name} {onnx_model.producer_version.split()[0]}",
        "checked_with": runner.version,
    }


def _metadata(predictor, fmt, out_channels):
    return {
        "format": fmt,
        "input_size": predictor.image_size,
        "channels": 3,
        "out_channels": out_channels,
        "input": "RGB, float32, 0-255 (not normalised)",
        "mean": list(predictor.mean),
        "std": list(predictor.std),
        "color_constancy": _color_constancy(predictor),
        "threshold": predictor.threshold,
        "method": predictor.method,
        # The logits -> probabilities mapping baked into the signatures.
        "activation": predictor.activation,
        "structures": list(getattr(predictor, "structures", ())),
        "container": int(getattr(predictor, "container", -1)),
        "version": __version__,
        "source": predictor.source,
        "signatures": list(SIGNATURES) if fmt == "savedmodel" else ["serving_default"],
    }


def _metadata_path(out, fmt):
    return out / METADATA_FILE if fmt == "savedmodel" else out.with_name(
        f"{out.stem}.{METADATA_FILE}")


def _check_out(out, fmt):
    suffix = FILE_SUFFIXES.get(fmt)
    if suffix and out.suffix != suffix:
        raise DataError(f"{out}: a {fmt} export needs a {suffix} file name")
    files.check_output(out, kind="file" if suffix else "folder", whole=True)
    if suffix:  # its metadata goes beside it
        files.check_output(_metadata_path(out, fmt), kind="file")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise DataError(f"{out}: already exists; choose a new --out")


def export_model(model_path, out, *, format="savedmodel", parity_count=4, tolerance=1e-4,
                 threshold=None, log=None, quantize="none", representative_data=None,
                 min_dice=0.98):
    """Exports a run directory or `.keras` file and checks it against the Keras model.

    Args:
        model_path: str or Path. Run directory or `.keras` file.
        out: str or Path. SavedModel folder, `.tflite` or `.onnx` file; must
            not exist (an empty folder is accepted).
        format: str. `savedmodel`, `tflite` or `onnx` (needs the extra
            `lesionkeras[onnx]`). Defaults to `savedmodel`.
        parity_count: int. Synthetic images of the parity check. Defaults to 4.
        tolerance: float. Largest accepted absolute probability difference.
            Defaults to 1e-4.
        threshold: float or None. Threshold baked in; None uses the run's.
        log: callable or None. Receives progress lines.
        quantize: str. TFLite only: `none`, `float16`, `dynamic` or `int8`
            (see `write_tflite`). Defaults to `"none"`.
        representative_data: str, Path or None. `int8` only (and required
            there): folder of real images calibrating the activations.
        min_dice: float. Quantised exports: smallest accepted Dice agreement
            of the thresholded masks with the Keras model's. Defaults to 0.98.

    Returns:
        ExportResult.

    Raises:
        DataError: bad model path (or an exported artefact) or output path, or
            for `onnx` the extra is not installed (nothing written).
        ParityError: the artefact differs from the Keras model (nothing left at `out`).
    """
    if format not in FORMATS:
        raise DataError(f"unknown export format {format!r} (expected {', '.join(FORMATS)})")
    if quantize not in QUANTIZE:
        raise DataError(f"unknown quantisation {quantize!r} (expected {', '.join(QUANTIZE)})")
    if quantize != "none" and format != "tflite":
        raise DataError(f"{out}: --quantize {quantize} needs --format tflite")
    if (quantize == "int8") != (representative_data is not None):
        raise DataError(
            "--quantize int8 needs --representative-data DIR" if quantize == "int8"
            else "--representative-data is only used by --quantize int8"
        )
    log = log or (lambda line: None)
    out = Path(out)
    _check_out(out, format)
    if format == "onnx":
        export_onnx.check_available()
    predictor = load_predictor(model_path, threshold=threshold)
    if predictor.model is None:
        raise DataError(f"{model_path}: already exported; export a run directory or a .keras file")
    for note in predictor.notes:
        log(note)
    size = predictor.image_size
    representative = (
        representative_images(representative_data, size) if quantize == "int8" else None
    )
    images = parity_images(size, parity_count)
    reference = keras_probabilities(predictor, images)
    # The bytes signature is checked on a non-square image of another size.
    odd = parity_images(size * 3 // 2, 1)[0][:, : size + 5]
    odd_reference = predictor.probabilities([odd])[0]

    # A SavedModel is built in a temporary folder renamed to `out` at the end; a
    # TFLite or ONNX file is built in a scratch folder and copied to `out` whole.
    workspace = files.atomic_folder(out) if format == "savedmodel" else files.scratch_folder(out)
    model_args = (predictor.model, size, predictor.mean, predictor.std, predictor.threshold,
                  _color_constancy(predictor), predictor.activation, predictor.container)
    extra_meta = {}
    with workspace as tmp:
        artefact = tmp / out.name
        if format == "onnx":
            probs, extra_meta = _write_and_run_onnx(model_args, artefact, images, out)
            diffs = [np.abs(probs - reference).max()]
        else:
            saved_model = tmp if format == "savedmodel" else tmp / "saved_model"
            write_savedmodel(model_args[0], saved_model, *model_args[1:])
        if format == "savedmodel":
            probs, odd_probs = _run_savedmodel(saved_model, images, _png_bytes(odd))
            diffs = [np.abs(probs - reference).max(), np.abs(odd_probs - odd_reference).max()]
        elif format == "tflite":
            write_tflite(saved_model, artefact, quantize, representative)
            probs = _run_tflite(artefact, images)
            diffs = [np.abs(probs - reference).max()]
        final, final_meta = out, _metadata_path(out, format)
        max_diff = float(max(diffs))
        dice = mask_dice(probs >= predictor.threshold, reference >= predictor.threshold)
        log(f"parity on {len(images)} synthetic images: max abs diff {max_diff:.3g}, "
            f"mask dice {dice:.4f}")
        if quantize == "none" and not max_diff <= tolerance:
            raise ParityError(
                f"{out}: {format} export differs from the Keras model (max abs diff "
                f"{max_diff:.3g} > {tolerance:g}); artefact removed"
            )
        if quantize != "none" and not dice >= min_dice:
            raise ParityError(
                f"{out}: {quantize} export disagrees with the Keras model (mask dice "
                f"{dice:.4f} < {min_dice:g}); artefact removed"
            )
        meta = _metadata(predictor, format, int(reference.shape[-1]))
        meta["quantize"] = quantize
        meta |= extra_meta
        meta["parity"] = {"images": len(images), "max_abs_diff": max_diff, "dice": dice}
        meta["parity"] |= (
            {"tolerance": tolerance} if quantize == "none"
            else {"min_dice": min_dice, "representative_images":
                  0 if representative is None else len(representative)}
        )
        text = json.dumps(meta, indent=2) + "\n"
        if format == "savedmodel":
            (tmp / METADATA_FILE).write_text(text)  # published with the folder
        else:
            # The metadata first: a .tflite or .onnx file never appears without it.
            files.write_text(final_meta, text)
            files.copy(artefact, out)
    return ExportResult(final, final_meta, format, max_diff, dice, len(images))
