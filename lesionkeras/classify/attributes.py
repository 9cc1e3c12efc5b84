"""Data, scoring and prediction of `--task attributes` (ISIC 2018 Task 2); `fit` is
`lesionkeras.methods.multitask.Multitask` on the shared run loop.

Data: an ISIC folder with Task 2 masks (`<id>_attribute_<name>.png`), a
manifest CSV with `attr_<name>` columns, or the synthetic dataset; missing
annotations follow SMILE's flags (`annotated_<name>` columns, missing files,
`smile.empty_means_missing`, `smile.simulate_missing`). Images are resized to
`data.image_size` (random/centre `data.crop_size` crops if set), normalised with
the ImageNet statistics and augmented by `[augment]`.

Run directory: config.toml, model.keras (best validation pooled Jaccard; the
network `{"masks", "presence"}`), last.keras, history.csv, metrics.json
(`jaccard` = mean of `jaccard_<attribute>`, pixels pooled over the validation set).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import files
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.data.classes import ATTRIBUTES
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.classify.data import list_images
from lesionkeras.inference.loading import load_keras_model
from lesionkeras.data import check, layout, missing, pipeline, sources
import lesionkeras.models.attribute_net  # noqa: F401

SIZE_MULTIPLE = 32


def manifest(cfg, source=None, limit=None):
    d = cfg.data
    source = source or d.source
    df = sources.load_manifest(
        source, limit=d.limit if limit is None else limit, synthetic_count=d.synthetic_count,
        synthetic_size=d.synthetic_size or d.image_size, synthetic_seed=0,
    )
    if not all(c in df for c in layout.ATTRIBUTE_COLUMNS):
        raise DataError(f"{source}: no ISIC 2018 Task 2 attribute masks "
                        "(<id>_attribute_<name>.png or attr_<name> columns) found")
    check.validate(df, require_masks=False, mask_columns=(), source=source)  # the images
    return missing.annotate(df, ATTRIBUTES, empty_means_missing=cfg.smile.empty_means_missing,
                            source=source)


def datasets(cfg, df, training, batch_size=None):
    d = cfg.data
    decoded = missing.decoded_dataset(df, ATTRIBUTES, d.image_size, cache=d.cache)
    return missing.make_dataset(
        decoded, batch_size=batch_size or cfg.train.batch_size, mean=pipeline.IMAGENET_MEAN,
        std=pipeline.IMAGENET_STD, training=training, augment=cfg.augment if training else None,
        crop_size=d.crop_size, seed=cfg.seed,
    )


def init_source(source):
    """The `.keras` file that `attributes.init_from` names (a run directory or the file).

    Raises:
        ConfigError: neither exists.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "model.keras"
    if not path.is_file():
        raise ConfigError(f"{source}: `attributes.init_from` must be a run directory or a "
                          ".keras file (not found)")
    return path


def init_encoder(network, source):
    """Copies the `encoder` weights of a Task 1 run (or `.keras` file) into `network`."""
    path = init_source(source)
    task1 = load_keras_model(path, compile=False)
    try:
        network.get_layer("encoder").set_weights(task1.get_layer("encoder").get_weights())
    except ValueError as e:
        raise ConfigError(f"{path}: its `encoder` does not match the VGG19 features "
                          f"({str(e).splitlines()[0]})") from None


def score(network, dataset, threshold):
    """ISIC 2018 Task 2 scores: pooled Jaccard per attribute (known pixels) and their mean."""
    inter = np.zeros(len(ATTRIBUTES), np.int64)
    union = np.zeros(len(ATTRIBUTES), np.int64)
    presence_hits = presence_known = 0
    for x, masks, weights in dataset:
        out = network(x, training=False)
        pred = keras.ops.convert_to_numpy(keras.ops.sigmoid(out["masks"])) >= threshold
        known = weights.numpy() > 0
        truth = masks.numpy() > 0.5
        i, u = cmetrics.pooled_jaccard_counts(truth & known, pred & known)
        inter += i
        union += u
        present = truth.max(axis=(1, 2))
        pred_present = keras.ops.convert_to_numpy(out["presence"]) > 0
        whole = known.min(axis=(1, 2))
        presence_hits += int(((present == pred_present) & whole).sum())
        presence_known += int(whole.sum())
    jac = cmetrics.pooled_jaccard(inter, union)
    scores = {"jaccard": float(np.nanmean(jac)) if np.isfinite(jac).any() else 0.0}
    for name, value in zip(ATTRIBUTES, jac):
        scores[f"jaccard_{name}"] = float(value) if np.isfinite(value) else None
    scores["presence_accuracy"] = presence_hits / max(presence_known, 1)
    return scores


def _load(model_path):
    # Registers the package's layers (blocks, adaptive logistic) before loading.

    run = Path(model_path)
    cfg = config_lib.load_config(run / "config.toml")
    if cfg.task != "attributes":
        raise ConfigError(f"{run}: a `{cfg.task}` run, not an attributes run")
    if not (run / "model.keras").exists():
        raise ConfigError(f"{run}: incomplete attributes run (no model.keras)")
    return cfg, load_keras_model(run / "model.keras")


def evaluate(model_path, data=None, out=None, batch_size=None, limit=None):
    """(summary lines, out folder): pooled Jaccard per attribute on labelled data."""
    cfg, network = _load(model_path)
    out = files.check_output(out or Path(model_path) / f"eval-{Path(data or cfg.data.source).name}")
    df = manifest(cfg, data, limit)
    scores = score(network, datasets(cfg, df, False, batch_size), cfg.train.threshold)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / "metrics.json", json.dumps({**scores, "images": len(df)}, indent=2) + "\n")
    lines = [f"ISIC 2018 Task 2 Jaccard (pixels pooled over {len(df)} images): "
             f"mean {scores['jaccard']:.4f}"]
    lines += [f"  {a:<18}" + ("n/a (empty)" if scores[f"jaccard_{a}"] is None
                              else f"{scores[f'jaccard_{a}']:.4f}") for a in ATTRIBUTES]
    lines.append(f"presence accuracy {scores['presence_accuracy']:.4f}")
    lines.append(f"scores: {out / 'metrics.json'}")
    return lines, out


def predict(model_path, input_path, out, batch_size=None):
    """Writes `<image>_attribute_<name>.png` (0/255, original size); returns the image count."""

    out = files.check_output(out)
    cfg, network = _load(model_path)
    size = cfg.data.crop_size or cfg.data.image_size
    df = list_images(input_path)
    out.mkdir(parents=True, exist_ok=True)
    norm = pipeline.normalizer(pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)
    for image_id, path in zip(df["id"], df["image"]):
        try:
            with Image.open(path) as im:
                rgb = np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        x = tf.image.resize(tf.cast(rgb[None], tf.float32), (size, size), antialias=True)
        probs = keras.ops.sigmoid(network(norm(x), training=False)["masks"])
        probs = tf.image.resize(probs, rgb.shape[:2]).numpy()[0]
        for k, name in enumerate(ATTRIBUTES):
            mask = (probs[..., k] >= cfg.train.threshold).astype(np.uint8) * 255
            files.save_image(mask, out / f"{image_id}_attribute_{name}.png")
    return len(df)
