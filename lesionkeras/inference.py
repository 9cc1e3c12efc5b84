"""Load a trained model with its preprocessing; evaluate and predict on folders.

`MODEL` is a run directory (model.keras + config.toml) or a `.keras` file
(its preprocessing is read from a config.toml beside it when there is one),
or an artefact of `lesionkeras export`: a SavedModel folder or a `.tflite`
file, whose preprocessing is baked in (size and threshold are read from the
`lesionkeras.json` beside it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import losses as _losses  # noqa: F401 - registers the loss classes for loading
from lesionkeras import metrics as metrics_lib
from lesionkeras.data import layout, pipeline
from lesionkeras.data.color import apply_color_constancy
from lesionkeras.errors import DataError
from lesionkeras.models import registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}
SCORE_COLUMNS = metrics_lib.SCORE_NAMES


@dataclasses.dataclass
class Predictor:
    """A model plus what it needs to turn raw images into probability maps."""

    model: keras.Model
    image_size: int
    mean: tuple
    std: tuple
    threshold: float
    source: str
    notes: list = dataclasses.field(default_factory=list)
    method: str = ""
    color_constancy: str = "none"
    # Exported artefacts: raw 0-255 batch at the model size -> probabilities
    # (their preprocessing is baked in); `model` is None then.
    forward: object = None

    def probabilities(self, images):
        """Probability maps (H_i, W_i, K) float32 at each image's own size.

        Args:
            images: list of (H_i, W_i, 3) uint8 arrays or tensors.
        """
        size = (self.image_size, self.image_size)
        batch = tf.stack(
            [tf.image.resize(tf.cast(im, tf.float32), size, antialias=True) for im in images]
        )
        if self.forward is not None:
            probs = tf.convert_to_tensor(self.forward(tf.clip_by_value(batch, 0, 255)))
            return [
                tf.image.resize(p, tf.shape(im)[:2], method="bilinear").numpy()
                for p, im in zip(probs, images)
            ]
        # The same colour balance as training (`data.color_constancy`), on the resized image.
        batch = apply_color_constancy(tf.clip_by_value(batch, 0, 255), self.color_constancy)
        batch = pipeline.normalizer(self.mean, self.std)(batch)
        probs = tf.sigmoid(tf.cast(self.model(batch, training=False), tf.float32))
        return [
            tf.image.resize(p, tf.shape(im)[:2], method="bilinear").numpy()
            for p, im in zip(probs, images)
        ]


@dataclasses.dataclass
class EnsemblePredictor:
    """Several predictors (e.g. the folds of `fit --folds K`) whose probabilities are averaged.

    Each member keeps its own preprocessing (a fold's normalisation statistics
    come from its own training split). This is the paper's Ensemble (Guth &
    deCampos 2018, section 3.5).

    Args:
        members: list of `Predictor`.
        names: list of str. One name per member (e.g. `fold0`).
        threshold: float. Threshold of the averaged probabilities.
        source: str. Where the members were loaded from.
    """

    members: list
    names: list
    threshold: float
    source: str
    notes: list = dataclasses.field(default_factory=list)
    method: str = ""
    model: object = None  # no single Keras model (export needs one)

    def member_probabilities(self, images):
        """Per member, the list of its probability maps (as `Predictor.probabilities`)."""
        return [m.probabilities(images) for m in self.members]

    def probabilities(self, images):
        """The members' probability maps averaged, image by image."""
        return _average(self.member_probabilities(images))


def _average(by_member):
    return [np.mean(maps, axis=0) for maps in zip(*by_member)]


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
    """Loads a run directory, a `.keras` file, or a run with folds (see module docstring).

    A directory without `model.keras` but with `fold*/model.keras` gives an
    `EnsemblePredictor` averaging the folds (threshold: `threshold`, else fold 0's).
    """
    path = Path(path)
    folds = fold_dirs(path) if not (path / "model.keras").exists() else []
    if folds:
        members = [load_predictor(d, threshold=threshold) for d in folds]
        return EnsemblePredictor(
            members, [d.name for d in folds], members[0].threshold, str(path),
            [n for m in members for n in m.notes], members[0].method,
        )
    notes = []
    if (path.is_dir() and (path / "saved_model.pb").exists()) or path.suffix == ".tflite":
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
            "a SavedModel folder or a .tflite file)"
        )
    # Importing the builders registers their custom layers, which loading needs.
    registry.names()
    try:
        model = keras.saving.load_model(model_file)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
        raise DataError(f"{model_file}: cannot load the model ({type(e).__name__}: {e})") from None
    method, color_constancy = "", "none"
    if cfg_file.exists():
        cfg = config_lib.load_config(cfg_file)
        method, color_constancy = cfg.method, cfg.data.color_constancy
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
        color_constancy,
    )


def _load_exported(path, threshold):
    """A `Predictor` over a SavedModel folder or a `.tflite` file from `lesionkeras export`."""
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
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=str(path))
            runner = interpreter.get_signature_runner("serving_default")
            size = int(runner.get_input_details()["images"]["shape"][1])

            def forward(batch):
                # Batch 1 per call: the file's batch dimension is fixed at conversion.
                batch = np.asarray(batch, np.float32)
                return np.concatenate(
                    [runner(images=batch[i : i + 1])["probabilities"] for i in range(len(batch))]
                )
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
    )


def list_images(source) -> pd.DataFrame:
    """Manifest of the images to predict: one file, a known layout, or a plain folder."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{source}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
        files = [source]
    elif source.is_dir():
        try:
            return layout.build_manifest(source)
        except DataError:
            files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{source}: empty folder: no images found")
    else:
        raise DataError(f"{source}: no such file or folder")
    return pd.DataFrame(
        {"id": [p.stem for p in files], "image": [str(p.resolve()) for p in files], "mask": ""}
    )


def _read_batches(df, batch_size, with_masks):
    """Yields lists of (row index, image uint8, mask float32 or None) at original size."""
    paths = df["image"].astype(str).tolist()
    masks = df["mask"].astype(str).tolist() if with_masks else [""] * len(df)
    ds = tf.data.Dataset.from_tensor_slices((paths, masks))

    def load(i, m):
        img = pipeline.decode_image(i)
        mask = pipeline.decode_mask(m) if with_masks else tf.zeros((0, 0, 1))
        return img, mask

    ds = ds.map(load, num_parallel_calls=pipeline.AUTOTUNE, deterministic=True).prefetch(
        pipeline.AUTOTUNE
    )
    batch = []
    for idx, (img, mask) in enumerate(ds):
        batch.append((idx, img, mask if with_masks else None))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate(predictor, df, *, out_dir=None, batch_size=8, progress=None):
    """Scores every image at its original size; writes per_image.csv and summary.json.

    Returns:
        (per-image DataFrame, summary dict).
    """
    def scores_of(mask, prob):
        scores = metrics_lib.per_image_scores(
            mask.numpy(), prob, threshold=predictor.threshold, from_logits=False
        )
        return {k: float(np.asarray(scores[k]).reshape(-1)[0]) for k in SCORE_COLUMNS}

    names = getattr(predictor, "names", [])
    rows, member_rows = [], {n: [] for n in names}
    for batch in _read_batches(df, batch_size, with_masks=True):
        images = [img for _, img, _ in batch]
        if names:
            # An ensemble: score each member alone too, from the same maps.
            by_member = predictor.member_probabilities(images)
            probs = _average(by_member)
            for name, maps in zip(names, by_member):
                member_rows[name] += [scores_of(m, p) for (_, _, m), p in zip(batch, maps)]
        else:
            probs = predictor.probabilities(images)
        for (idx, _, mask), prob in zip(batch, probs):
            rows.append(
                {"id": df["id"].iloc[idx], "image": df["image"].iloc[idx]}
                | scores_of(mask, prob)
            )
        if progress:
            progress(len(batch))
    per_image = pd.DataFrame(rows)
    summary = {
        "model": predictor.source,
        "images": len(per_image),
        "threshold": predictor.threshold,
        **{k: float(per_image[k].mean()) for k in SCORE_COLUMNS},
    }
    if names:
        summary["members"] = {
            n: {k: float(pd.DataFrame(r)[k].mean()) for k in SCORE_COLUMNS}
            for n, r in member_rows.items()
        }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_image.to_csv(out_dir / "per_image.csv", index=False, float_format="%.6f")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return per_image, summary


def format_summary(summary) -> str:
    width = max(len(k) for k in SCORE_COLUMNS)
    lines = [f"{'metric':<{width}}  mean over {summary['images']} images"]
    lines += [f"{k:<{width}}  {summary[k]:.4f}" for k in SCORE_COLUMNS]
    for name, scores in summary.get("members", {}).items():
        lines.append(f"{name} alone: " + ", ".join(
            f"{k} {scores[k]:.4f}" for k in ("dice", "jaccard", "threshold_jaccard") if k in scores
        ))
    return "\n".join(lines)


def overlay(image, mask, color=(255, 40, 40), alpha=0.45):
    """The image with the mask tinted and its border drawn solid."""
    img = image.astype(np.float32)
    m = mask.astype(bool)
    tinted = np.where(m[..., None], (1 - alpha) * img + alpha * np.array(color), img)
    # Border pixels: inside the mask with an outside 4-neighbour.
    pad = np.pad(m, 1, mode="edge")
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    border = m & ~inner
    tinted[border] = color
    return tinted.astype(np.uint8)


def predict(predictor, df, out_dir, *, probabilities=False, overlays=False, batch_size=8,
            progress=None):
    """Writes `<id>_mask.png` (0/255, original size) and optional maps and overlays."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for batch in _read_batches(df, batch_size, with_masks=False):
        probs = predictor.probabilities([img for _, img, _ in batch])
        for (idx, img, _), prob in zip(batch, probs):
            name = df["id"].iloc[idx]
            p = prob[..., 0]
            mask = p >= predictor.threshold
            Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / f"{name}_mask.png")
            if probabilities:
                Image.fromarray(np.round(p * 255).astype(np.uint8)).save(
                    out_dir / f"{name}_prob.png"
                )
            if overlays:
                Image.fromarray(overlay(img.numpy(), mask)).save(out_dir / f"{name}_overlay.png")
            written.append(name)
        if progress:
            progress(len(batch))
    return written
