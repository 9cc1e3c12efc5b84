"""Load a trained model with its preprocessing; evaluate and predict on folders.

`MODEL` is a run directory (model.keras + config.toml) or a `.keras` file
(its preprocessing is read from a config.toml beside it when there is one),
or an artefact of `lesionkeras export`: a SavedModel folder or a `.tflite`
file, whose preprocessing is baked in (size and threshold are read from the
`lesionkeras.json` beside it).

On top of any predictor: `load_ensemble` averages several models (any mix
of artefacts), `with_tta` averages the flipped/rotated views of each image,
`mc_probabilities` gives Monte-Carlo dropout mean and std maps, and
`evaluate`/`predict` take post-processing steps (`postprocess.py`) and write
an HTML failure report (`write_report`).
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
from lesionkeras import postprocess as postprocess_lib
from lesionkeras import schedules as _schedules  # noqa: F401 - registers the schedules of saved optimizers
from lesionkeras.data import layout, pipeline
from lesionkeras.data.color import apply_color_constancy
from lesionkeras.errors import DataError
from lesionkeras.models import registry

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}
SCORE_COLUMNS = metrics_lib.SCORE_NAMES


def output_activation(method):
    """Name of the logits -> probabilities mapping of a run's `method`.

    `softmax_structures` for `multiclass` (a (K+1)-way softmax over background
    and K structures, `losses.multiclass_probabilities`), `sigmoid` for every
    other method (independent binary heads). Exports record it in
    `lesionkeras.json` as `activation`.
    """
    return "softmax_structures" if method == "multiclass" else "sigmoid"


def probabilities_from_logits(logits, method="", container=-1):
    """Probabilities `(..., K)` float32 from a model's logits, as the run was trained.

    The one mapping used by `Predictor` and baked into exported artefacts
    (`export.serving_functions`), so both give the same maps.

    Args:
        logits: tensor `(..., K)` (`(..., K + 1)` for `multiclass`, channel 0
            the background).
        method: str. The run's `method`; see `output_activation`. Defaults to "".
        container: int. `multiclass` only: the container structure's channel
            (its probability is `1 - p(background)`), -1 for none. Defaults to -1.

    Returns:
        float32 tensor of probabilities in [0, 1].
    """
    logits = tf.cast(logits, tf.float32)
    if output_activation(method) == "softmax_structures":
        return _losses.multiclass_probabilities(logits, None if container < 0 else int(container))
    return tf.sigmoid(logits)


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
    # K-structure models (`smile`, `multiclass`): one name per output channel,
    # and for `multiclass` the container channel of its softmax (-1 = none).
    structures: tuple = ()
    container: int = -1

    def to_probabilities(self, logits):
        """The model's logits -> probabilities `(..., K)` (see `probabilities_from_logits`)."""
        return probabilities_from_logits(logits, self.method, self.container)

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
        probs = self.to_probabilities(self.model(batch, training=False))
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
        return _average(self.member_probabilities(images), self.names)


def _average(by_member, names=None):
    out = []
    for maps in zip(*by_member):
        channels = [m.shape[-1] for m in maps]
        if len(set(channels)) > 1:
            who = ", ".join(f"{n}: {c}" for n, c in zip(names or range(len(maps)), channels))
            raise DataError(
                f"ensemble members are not the same task (output channels differ: {who})"
            )
        out.append(np.mean(maps, axis=0))
    return out


def load_ensemble(paths, threshold=None):
    """An `EnsemblePredictor` over several models of the same task.

    Any mix of run directories (a run with folds counts as one member, its
    folds averaged first), `.keras` files, SavedModel folders and `.tflite`
    files; each member keeps its own preprocessing.

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
    return EnsemblePredictor(
        members, names, float(threshold if threshold is not None else members[0].threshold),
        " + ".join(names), [n for m in members for n in m.notes], members[0].method,
    )


# Test-time augmentation views: (apply to an image, undo on its map). Each
# view is a flip or rotation of the dihedral group of the square, so undoing
# it puts every pixel of the map back where it came from.
TTA_VIEWS = {
    "identity": (lambda a: a, lambda a: a),
    "flip_lr": (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    "flip_ud": (lambda a: a[::-1], lambda a: a[::-1]),
    "rot90": (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    "rot180": (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, -2)),
    "rot270": (lambda a: np.rot90(a, 3), lambda a: np.rot90(a, -3)),
    "transpose": (lambda a: a.swapaxes(0, 1), lambda a: a.swapaxes(0, 1)),
    "anti_transpose": (lambda a: np.rot90(a, 2).swapaxes(0, 1),
                       lambda a: np.rot90(a.swapaxes(0, 1), -2)),
}
TTA_MODES = {"none": ("identity",), "flips": tuple(TTA_VIEWS)}


@dataclasses.dataclass
class TTAPredictor:
    """Test-time augmentation: averages a predictor's maps over flipped and rotated views.

    Each view of the image is predicted and the inverse transform is applied
    to its probability map before averaging, so the maps line up pixel for
    pixel. A flip- and rotation-equivariant model gives its plain prediction.

    Args:
        base: a predictor (`Predictor`, `EnsemblePredictor`, ...).
        mode: str. `flips`: the 8 flips/rotations of the square (identity,
            left-right, up-down, 90/180/270 degrees, both transposes); `none`.
    """

    base: object
    mode: str = "flips"

    def __post_init__(self):
        if self.mode not in TTA_MODES:
            raise DataError(f"unknown --tta {self.mode!r} (expected {', '.join(TTA_MODES)})")
        for name in ("threshold", "source", "notes", "method", "image_size", "structures"):
            if hasattr(self.base, name):
                setattr(self, name, getattr(self.base, name))
        self.model = None

    def probabilities(self, images):
        images = [np.asarray(im) for im in images]
        total = None
        for view in TTA_MODES[self.mode]:
            apply, undo = TTA_VIEWS[view]
            maps = self.base.probabilities([np.ascontiguousarray(apply(im)) for im in images])
            maps = [undo(m) for m in maps]
            total = maps if total is None else [t + m for t, m in zip(total, maps)]
        return [np.ascontiguousarray(t / len(TTA_MODES[self.mode]), np.float32) for t in total]


def with_tta(predictor, mode):
    """`predictor` with test-time augmentation `mode`; an ensemble's members each get it."""
    if mode == "none":
        return predictor
    if isinstance(predictor, EnsemblePredictor):
        return dataclasses.replace(predictor, members=[TTAPredictor(m, mode) for m in predictor.members])
    return TTAPredictor(predictor, mode)


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
    method, color_constancy, names, container = "", "none", (), -1
    if cfg_file.exists():
        cfg = config_lib.load_config(cfg_file)
        method, color_constancy = cfg.method, cfg.data.color_constancy
        if method in ("smile", "multiclass"):
            from lesionkeras.data.missing import parse_structures

            names = parse_structures(cfg.smile.structures)
            c = cfg.smile.container
            container = names.index(c) if c in names and len(names) > 1 else -1
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
        color_constancy, structures=tuple(names), container=container,
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
            runner = TFLiteRunner(path)
            size = runner.image_size

            def forward(batch):
                return runner(np.asarray(batch, np.float32))["probabilities"]
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
        from ai_edge_litert.interpreter import Interpreter

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


def postprocess_config(model_path):
    """The `[postprocess]` config of a model: from the config.toml of its run, else defaults."""
    path = Path(model_path)
    cfg_file = path / "config.toml" if path.is_dir() else path.parent / "config.toml"
    if cfg_file.exists():
        return config_lib.load_config(cfg_file).postprocess
    return config_lib.PostprocessConfig()


def _post_summary(steps, post_cfg):
    cfg = post_cfg or config_lib.PostprocessConfig()
    return {"steps": list(steps), "config": dataclasses.asdict(cfg)}


def evaluate(predictor, df, *, out_dir=None, batch_size=8, progress=None, postprocess=(),
             post_cfg=None, report=False):
    """Scores every image at its original size; writes per_image.csv and summary.json.

    Args:
        postprocess: sequence of step names (`postprocess.STEPS`). When given,
            every image is also scored after them: per-image columns
            `<metric>_post` and `summary["postprocess"]`, side by side with
            the raw scores; K-structure models post-process and score each
            structure on its own (`evaluate_structures`).
        post_cfg: `config.PostprocessConfig` or None (defaults).
        report: bool. Also write the failure report (`write_report`, or
            `write_structure_report` for K-structure models) to `out_dir`
            (required then).

    Returns:
        (per-image DataFrame, summary dict).
    """
    if report and out_dir is None:
        raise ValueError("`report=True` needs an `out_dir`.")
    report_dir = Path(out_dir) / REPORT_DIR if report else None
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
    def scores_of(mask, prob):
        scores = metrics_lib.per_image_scores(
            mask.numpy(), prob, threshold=predictor.threshold, from_logits=False
        )
        return {k: float(np.asarray(scores[k]).reshape(-1)[0]) for k in SCORE_COLUMNS}

    if len(getattr(predictor, "structures", ())) > 1:
        return evaluate_structures(
            predictor, df, out_dir=out_dir, batch_size=batch_size, progress=progress,
            postprocess=postprocess, post_cfg=post_cfg, report=report,
        )
    names = getattr(predictor, "names", [])
    rows, member_rows = [], {n: [] for n in names}
    for batch in _read_batches(df, batch_size, with_masks=True):
        images = [img for _, img, _ in batch]
        if names:
            # An ensemble: score each member alone too, from the same maps.
            by_member = predictor.member_probabilities(images)
            probs = _average(by_member, names)
            for name, maps in zip(names, by_member):
                member_rows[name] += [scores_of(m, p) for (_, _, m), p in zip(batch, maps)]
        else:
            probs = predictor.probabilities(images)
        for (idx, img, mask), prob in zip(batch, probs):
            row = {"id": df["id"].iloc[idx], "image": df["image"].iloc[idx]}
            row |= scores_of(mask, prob)
            final = prob[..., 0] >= predictor.threshold
            if postprocess:
                _, post_mask = postprocess_lib.apply(
                    postprocess, np.asarray(img), prob, predictor.threshold, post_cfg)
                row |= {f"{k}_post": v for k, v in
                        scores_of(mask, post_mask.astype(np.float32)).items()}
                final = post_mask[..., 0]
            if report_dir is not None:
                row["overlay"] = f"{REPORT_DIR}/{len(rows):05d}_{_safe_name(row['id'])}.png"
                Image.fromarray(report_panel(np.asarray(img), mask.numpy()[..., 0] > 0.5, final)
                                ).save(Path(out_dir) / row["overlay"])
            rows.append(row)
        if progress:
            progress(len(batch))
    per_image = pd.DataFrame(rows)
    summary = {
        "model": predictor.source,
        "images": len(per_image),
        "threshold": predictor.threshold,
        **{k: float(per_image[k].mean()) for k in SCORE_COLUMNS},
    }
    if postprocess:
        summary["postprocess"] = _post_summary(postprocess, post_cfg) | {
            k: float(per_image[f"{k}_post"].mean()) for k in SCORE_COLUMNS
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
        if report:
            write_report(per_image, summary, out_dir / "report.html")
    return per_image, summary


REPORT_DIR = "report"


def _safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))[:80]


def report_panel(image, truth, prediction):
    """Image | overlay, side by side: prediction tinted red, truth outlined green."""
    shown = overlay(image, prediction)
    t = np.asarray(truth, bool)
    pad = np.pad(t, 1, mode="edge")
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    shown[t & ~inner] = (40, 220, 40)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([np.asarray(image, np.uint8), gap, shown], axis=1)


def write_report(per_image, summary, path):
    """A self-contained HTML failure report: metric table, then every image worst Dice first.

    The page has no scripts or external styles; it references the PNG panels
    (`per_image["overlay"]`, relative to the page). Images are sorted by Dice
    after post-processing when there was any, else by raw Dice.

    Args:
        per_image: DataFrame from `evaluate` with an `overlay` column.
        summary: dict from `evaluate`.
        path: str or Path. The HTML file written.
    """
    import html

    key = "dice_post" if "dice_post" in per_image else "dice"
    rows = per_image.sort_values([key, "id"], kind="stable")
    post = summary.get("postprocess")
    head = "<tr><th>metric</th><th>raw</th>" + (
        f"<th>{html.escape('+'.join(post['steps']))}</th>" if post else "") + "</tr>"
    metric_rows = "".join(
        f"<tr><td>{k}</td><td>{summary[k]:.4f}</td>"
        + (f"<td>{post[k]:.4f}</td>" if post else "") + "</tr>"
        for k in SCORE_COLUMNS
    )
    cases = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(str(r['id']))}</td><td>{r[key]:.4f}</td>"
        f"<td>{r['jaccard' + key[4:]]:.4f}</td>"
        f"<td><img src=\"{html.escape(r['overlay'])}\" alt=\"{html.escape(str(r['id']))}\">"
        "</td></tr>\n"
        for i, (_, r) in enumerate(rows.iterrows())
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lesionkeras failure report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:640px}}</style>
</head><body>
<h1>Failure report</h1>
<p>Model: {html.escape(str(summary['model']))}. {summary['images']} images, threshold
{summary['threshold']:g}. Each panel: the image, then the prediction tinted red with the
truth outlined green. Sorted by {key}, worst first.</p>
<table>{head}{metric_rows}</table>
<h2>Images, worst {key} first</h2>
<table><tr><th>rank</th><th>id</th><th>{key}</th><th>jaccard{key[4:]}</th><th>overlay</th></tr>
{cases}</table>
</body></html>
"""
    Path(path).write_text(page)


STRUCTURE_SCORES = ("dice", "jaccard", "sensitivity", "specificity")


def _read_structure_mask(path, shape):
    """A 0/1 float32 (H, W) truth mask at `shape`, or None when there is no file."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            m = im.convert("L")
            if m.size != (shape[1], shape[0]):
                m = m.resize((shape[1], shape[0]), Image.NEAREST)
            return (np.asarray(m) >= 128).astype(np.float32)
    except OSError as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None


def evaluate_structures(predictor, df, *, out_dir=None, batch_size=8, progress=None,
                        postprocess=(), post_cfg=None, report=False):
    """Per-structure scores of a K-structure model (`smile`, `multiclass`).

    Structure k of an image is scored when the manifest has a mask file for it
    (`mask` for `lesion`, `attr_<name>` otherwise), whatever its
    `annotated_<name>` flag: labels removed by `data drop-labels` keep their
    file, so evaluation uses the full truth. Images without the file are
    left out of that structure's mean. `per_image.csv` has one column
    `<score>_<structure>` per score and structure (empty when not scored)
    and `dice_mean`, the mean Dice over the image's scored structures.

    Post-processing works per structure: the dense CRF refines each output
    channel as its own two-label problem and morphology cleans each channel's
    mask on its own, with the one `[postprocess]` table of the run (so
    `keep_largest` keeps one component of every structure; switch it off for
    scattered attributes such as globules). The post-processed scores are the
    columns `<score>_<structure>_post` and `dice_mean_post`, and
    `summary["postprocess"]` holds their per-structure means beside the raw ones.

    The failure report (`report=True`) has one row per image, sorted worst
    mean Dice first (after post-processing when there was any), with the
    image's Dice per structure and one panel per structure (image | that
    structure's prediction tinted red, its truth outlined green when it has
    a mask file), written to `report/<rank>_<id>_<structure>.png`.

    Args:
        predictor: a predictor whose `structures` name its output channels.
        df: manifest (`list_images` or a dataset layout).
        out_dir: str, Path or None. Where per_image.csv and summary.json go.
        batch_size: int. Images per forward pass. Defaults to 8.
        progress: callable or None. Called with the number of images done.
        postprocess: sequence of step names (`postprocess.STEPS`). Defaults to ().
        post_cfg: `config.PostprocessConfig` or None (defaults).
        report: bool. Also write `report.html` (needs `out_dir`). Defaults to False.

    Returns:
        (per-image DataFrame, summary dict with `structures`: {name: {score: mean,
        "images": n}} and the means over structures under the score names).
    """
    from lesionkeras.data.missing import mask_column

    if report and out_dir is None:
        raise ValueError("`report=True` needs an `out_dir`.")
    names = tuple(predictor.structures)
    columns = {}
    for s in names:
        col = mask_column(s)
        columns[s] = (df[col].fillna("").astype(str).tolist() if col in df else [""] * len(df))
    suffixes = ("", "_post") if postprocess else ("",)
    rows = []
    for batch in _read_batches(df, batch_size, with_masks=False):
        probs = predictor.probabilities([img for _, img, _ in batch])
        for (idx, img, _), prob in zip(batch, probs):
            row = {"id": df["id"].iloc[idx], "image": df["image"].iloc[idx]}
            masks = {"": prob >= predictor.threshold}
            if postprocess:
                masks["_post"] = postprocess_lib.apply(
                    postprocess, np.asarray(img), prob, predictor.threshold, post_cfg)[1]
            truths = {}
            for k, s in enumerate(names):
                truth = _read_structure_mask(columns[s][idx].strip(), prob.shape[:2])
                truths[s] = truth
                for suffix in suffixes:
                    for key in STRUCTURE_SCORES:
                        row[f"{key}_{s}{suffix}"] = np.nan
                    if truth is None:
                        continue
                    pred = prob[..., k] if suffix == "" else masks[suffix][..., k].astype(np.float32)
                    scores = metrics_lib.per_image_scores(
                        truth, pred, threshold=predictor.threshold, from_logits=False
                    )
                    for key in STRUCTURE_SCORES:
                        row[f"{key}_{s}{suffix}"] = float(np.asarray(scores[key]).reshape(-1)[0])
            for suffix in suffixes:
                dice = [row[f"dice_{s}{suffix}"] for s in names if truths[s] is not None]
                row[f"dice_mean{suffix}"] = float(np.mean(dice)) if dice else np.nan
            if report:
                final = masks["_post" if postprocess else ""]
                for k, s in enumerate(names):
                    truth = truths[s] if truths[s] is not None else np.zeros(prob.shape[:2])
                    rel = f"{REPORT_DIR}/{len(rows):05d}_{_safe_name(row['id'])}_{_safe_name(s)}.png"
                    row[f"overlay_{s}"] = rel
                    panel = report_panel(np.asarray(img), truth > 0.5, final[..., k])
                    (Path(out_dir) / REPORT_DIR).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(panel).save(Path(out_dir) / rel)
            rows.append(row)
        if progress:
            progress(len(batch))
    per_image = pd.DataFrame(rows)

    def means(suffix):
        per_structure = {}
        for s in names:
            scored = per_image[f"dice_{s}{suffix}"].notna() if len(per_image) else []
            per_structure[s] = {
                "images": int(np.sum(scored)),
                **{k: float(per_image.loc[scored, f"{k}_{s}{suffix}"].mean())
                   if np.sum(scored) else float("nan") for k in STRUCTURE_SCORES},
            }
        scored = [v for v in per_structure.values() if v["images"]]
        overall = {k: float(np.mean([v[k] for v in scored])) if scored else float("nan")
                   for k in STRUCTURE_SCORES}
        return per_structure, overall

    per_structure, overall = means("")
    summary = {
        "model": predictor.source,
        "images": len(per_image),
        "threshold": predictor.threshold,
        **overall,
        "structures": per_structure,
    }
    if postprocess:
        post_structures, post_overall = means("_post")
        summary["postprocess"] = _post_summary(postprocess, post_cfg) | post_overall | {
            "structures": post_structures}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_image.to_csv(out_dir / "per_image.csv", index=False, float_format="%.6f")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if report:
            write_structure_report(per_image, summary, names, out_dir / "report.html")
    return per_image, summary


def write_structure_report(per_image, summary, names, path):
    """The failure report of a K-structure model: one row per image, worst mean Dice first.

    Each row shows the image's Dice per structure (after post-processing when
    there was any; `-` where the structure has no truth mask) and one panel per
    structure (see `evaluate_structures`). Self-contained like `write_report`.

    Args:
        per_image: DataFrame from `evaluate_structures(..., report=True)`.
        summary: dict from `evaluate_structures`.
        names: sequence of structure names (the output channels).
        path: str or Path. The HTML file written.
    """
    import html

    post = summary.get("postprocess")
    suffix = "_post" if post else ""
    key = f"dice_mean{suffix}"
    rows = per_image.sort_values([key, "id"], kind="stable", na_position="last")

    def cell(value):
        return "-" if pd.isna(value) else f"{value:.4f}"

    head = "<tr><th>structure</th>" + "".join(
        f"<th>{k}</th>" + (f"<th>{k} {html.escape('+'.join(post['steps']))}</th>" if post else "")
        for k in STRUCTURE_SCORES) + "<th>images</th></tr>"
    table = "".join(
        f"<tr><td>{html.escape(s)}</td>" + "".join(
            f"<td>{cell(v[k])}</td>" + (f"<td>{cell(post['structures'][s][k])}</td>" if post else "")
            for k in STRUCTURE_SCORES) + f"<td>{v['images']}</td></tr>"
        for s, v in summary["structures"].items()
    )
    cases = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(str(r['id']))}</td><td>{cell(r[key])}</td>"
        + "".join(f"<td>{cell(r[f'dice_{s}{suffix}'])}</td>" for s in names)
        + "<td>" + "".join(
            f"<figure><img src=\"{html.escape(r[f'overlay_{s}'])}\" "
            f"alt=\"{html.escape(str(r['id']))} {html.escape(s)}\">"
            f"<figcaption>{html.escape(s)}</figcaption></figure>" for s in names)
        + "</td></tr>\n"
        for i, (_, r) in enumerate(rows.iterrows())
    )
    structure_heads = "".join(f"<th>dice {html.escape(s)}</th>" for s in names)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lesionkeras failure report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:480px}}
figure{{display:inline-block;margin:2px}}</style>
</head><body>
<h1>Failure report</h1>
<p>Model: {html.escape(str(summary['model']))}. {summary['images']} images, threshold
{summary['threshold']:g}, {len(names)} structures. Each panel: the image, then that
structure's prediction tinted red with its truth outlined green. Sorted by {key} (mean
Dice over the structures an image has a truth mask for), worst first.</p>
<table>{head}{table}</table>
<h2>Images, worst {key} first</h2>
<table><tr><th>rank</th><th>id</th><th>{key}</th>{structure_heads}<th>overlays</th></tr>
{cases}</table>
</body></html>
"""
    Path(path).write_text(page)


def _format_structures(summary) -> str:
    per = summary["structures"]
    post = summary.get("postprocess")
    width = max(len("structure"), max(len(s) for s in per), len("mean"))

    def cells(values, post_values=None):
        out = []
        for k in STRUCTURE_SCORES:
            out.append(f"{values[k]:>11.4f}")
            if post_values is not None:
                out.append(f"{post_values[k]:>11.4f}")
        return "  ".join(out)

    if post:
        name = "+".join(post["steps"])
        heads = [h for k in STRUCTURE_SCORES for h in (k, "post")]
        lines = [f"each score raw, then after {name} (post)"]
    else:
        heads = list(STRUCTURE_SCORES)
        lines = []
    lines.append(f"{'structure':<{width}}  " + "  ".join(f"{h:>11}" for h in heads) + "  images")
    for s, v in per.items():
        lines.append(f"{s:<{width}}  " + cells(v, post["structures"][s] if post else None)
                     + f"  {v['images']:>6}")
    lines.append(f"{'mean':<{width}}  " + cells(summary, post) + f"  {summary['images']:>6}")
    return "\n".join(lines)


def format_summary(summary) -> str:
    if "structures" in summary:
        return _format_structures(summary)
    width = max(len(k) for k in SCORE_COLUMNS)
    post = summary.get("postprocess")
    if post:
        # Side by side: the raw masks and the post-processed ones.
        name = "+".join(post["steps"])
        lines = [f"{'metric':<{width}}  {'raw':>9}  {name:>9}   mean over {summary['images']} images"]
        lines += [f"{k:<{width}}  {summary[k]:9.4f}  {post[k]:9.4f}" for k in SCORE_COLUMNS]
    else:
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


def mc_dropout_predictor(predictor):
    """A copy of `predictor` whose dropout can stay on at inference, and its switches.

    Models with `MCDropout` layers (the DeepLab of `models/deeplab.py`) are
    used as they are; plain `keras.layers.Dropout` layers (e.g. the U-Net's
    bottleneck dropout) are swapped for `MCDropout` in a clone that shares
    every other layer and weight. Batch norm stays in inference mode.

    Returns:
        (Predictor, list of `MCDropout` layers).

    Raises:
        DataError: no Keras model (an exported artefact or an ensemble), or no dropout.
    """
    from lesionkeras.models import deeplab

    model = getattr(predictor, "model", None)
    if model is None:
        raise DataError(
            f"{predictor.source}: --mc-samples needs a Keras model (a run directory or a "
            ".keras file), not an exported artefact or an ensemble"
        )
    found = deeplab.mc_dropout_layers(model)
    if not found:
        if not any(isinstance(layer, keras.layers.Dropout) and layer.rate > 0
                   for layer in model.layers):
            raise DataError(
                f"{predictor.source}: the model has no dropout layer, so --mc-samples would "
                "give zero uncertainty (train with model.dropout > 0)"
            )

        def swap(layer):
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:
                return deeplab.MCDropout(layer.rate, seed=layer.seed, name=f"{layer.name}_mc")
            return layer  # the same layer object: weights are shared, not copied

        model = keras.models.clone_model(model, clone_function=swap)
        found = deeplab.mc_dropout_layers(model)
    return dataclasses.replace(predictor, model=model), found


def mc_probabilities(predictor, images, samples, layers=None):
    """Mean and standard deviation of `samples` Monte-Carlo dropout maps per image.

    Args:
        predictor: `Predictor` from `mc_dropout_predictor` (or any predictor
            with `layers` given as the `MCDropout` layers to switch on).
        images: list of (H_i, W_i, 3) uint8 images.
        samples: int >= 2. Dropout draws per image.
        layers: list of `MCDropout` layers or None (found in `predictor.model`).

    Returns:
        (means, stds): two lists of float32 (H_i, W_i, K) maps.
    """
    from lesionkeras.models import deeplab

    if samples < 2:
        raise ValueError(f"`samples` must be >= 2. Received: samples={samples}")
    layers = deeplab.mc_dropout_layers(predictor.model) if layers is None else layers
    for layer in layers:
        layer.enabled.assign(1.0)
    try:
        draws = [predictor.probabilities(images) for _ in range(samples)]
    finally:
        for layer in layers:
            layer.enabled.assign(0.0)
    stacks = [np.stack(per_image) for per_image in zip(*draws)]
    return ([s.mean(axis=0).astype(np.float32) for s in stacks],
            [s.std(axis=0).astype(np.float32) for s in stacks])


def predict(predictor, df, out_dir, *, probabilities=False, overlays=False, batch_size=8,
            progress=None, postprocess=(), post_cfg=None, mc_samples=0):
    """Writes `<id>_mask.png` (0/255, original size) and optional maps and overlays.

    With `postprocess` steps the masks (and overlays) are post-processed, the
    probability maps stay the model's, and `postprocess.json` records the
    steps and their parameters.

    With `mc_samples >= 2` (Monte-Carlo dropout, Gal & Ghahramani 2016) the
    masks come from the mean of that many dropout draws, and `<stem>_mean.png`
    (mean probability x 255) and `<stem>_std.png` (standard deviation x 510:
    the std of values in [0, 1] is at most 0.5) are written too.

    A K-structure model (`smile`, `multiclass`) writes one mask per structure
    instead: `<id>_<structure>.png` (e.g. `ISIC_0000000_globules.png`), and
    with the options `<id>_<structure>_prob.png` and `<id>_<structure>_overlay.png`.
    """
    if mc_samples:
        # Checked first: a model without dropout must leave nothing written.
        mc_predictor, mc_layers = mc_dropout_predictor(predictor)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if postprocess:
        (out_dir / "postprocess.json").write_text(
            json.dumps(_post_summary(postprocess, post_cfg), indent=2) + "\n")
    written = []
    for batch in _read_batches(df, batch_size, with_masks=False):
        images = [img for _, img, _ in batch]
        if mc_samples:
            probs, stds = mc_probabilities(mc_predictor, images, mc_samples, mc_layers)
        else:
            probs, stds = predictor.probabilities(images), [None] * len(images)
        for (idx, img, _), prob, std in zip(batch, probs, stds):
            name = df["id"].iloc[idx]
            post_masks = (
                postprocess_lib.apply(postprocess, np.asarray(img), prob, predictor.threshold,
                                      post_cfg)[1] if postprocess else None
            )
            structures = tuple(getattr(predictor, "structures", ()))
            stems = [f"{name}_{s}" for s in structures] if len(structures) > 1 else [name]
            for k, stem in enumerate(stems):
                p = prob[..., k]
                mask = p >= predictor.threshold if post_masks is None else post_masks[..., k]
                suffix = "" if len(stems) > 1 else "_mask"
                Image.fromarray((mask * 255).astype(np.uint8)).save(out_dir / f"{stem}{suffix}.png")
                if probabilities:
                    Image.fromarray(np.round(p * 255).astype(np.uint8)).save(
                        out_dir / f"{stem}_prob.png"
                    )
                if overlays:
                    Image.fromarray(overlay(img.numpy(), mask)).save(out_dir / f"{stem}_overlay.png")
                if std is not None:
                    Image.fromarray(np.round(p * 255).astype(np.uint8)).save(
                        out_dir / f"{stem}_mean.png")
                    Image.fromarray(np.round(np.clip(std[..., k] * 510, 0, 255)).astype(np.uint8)
                                    ).save(out_dir / f"{stem}_std.png")
            written.append(name)
        if progress:
            progress(len(batch))
    return written
