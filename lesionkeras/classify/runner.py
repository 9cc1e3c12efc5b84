"""Data, prediction and scoring of `--task classify` (ISIC 2018 Task 3); `fit` is
`lesionkeras.methods.triplet.Triplet` on the shared run loop.

Run directory (same contract as segmentation, plus the class files):
    config.toml       the resolved config (`task = "classify"`)
    model.keras       best network by validation balanced accuracy ({"embedding", "logits"})
    last.keras        last epoch
    classes.json      the class names, in the order of the logits
    references.npz    embeddings, labels and ids of up to `references_per_class`
                      training images per class (nearest-class-mean prediction)
    history.csv       one row per epoch (loss, ce, triplet, triplets, balanced_accuracy;
                      offline triplets add regenerated_triplets, anchor_negative_distance)
    metrics.json      final validation metrics of model.keras (both prediction rules)
    confusion.csv/png validation confusion matrix of the configured rule
    tensorboard/
    backup/           RunBackup state for `fit --resume` (and, with
                      `classify.regenerate_every`, the current offline triplets)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np

from lesionkeras import config as config_lib
from lesionkeras import files, schedules
from lesionkeras.classify import data as cdata
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.classify.triplet import nearest_class_mean_distances
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.data import check
from lesionkeras.inference.loading import load_keras_model

# Nearest-mean "probabilities": softmax of -distance / T. Only the argmax is the
# prediction; T keeps the scores readable for unit-norm embeddings (distances in [0, 2]).
DISTANCE_TEMPERATURE = 0.1


def predict_rule(cfg):
    """The prediction rule of `cfg`: `softmax` or `nearest_mean` (`auto` resolved)."""
    rule = cfg.classify.predict_by
    if rule == "auto":
        rule = "nearest_mean" if cfg.method == "triplet" else "softmax"
    return rule


def make_optimizer(cfg, steps_per_epoch):
    """`train.optimizer` with `train.lr` x `lr_step_factor` every `lr_step_epochs` epochs."""
    section = cfg.classify if cfg.task == "classify" else cfg.attributes
    lr = keras.optimizers.schedules.ExponentialDecay(
        cfg.train.lr, decay_steps=max(steps_per_epoch, 1) * section.lr_step_epochs,
        decay_rate=section.lr_step_factor, staircase=True,
    )
    return schedules.make_optimizer(cfg.train, learning_rate=lr)


def check_model_name(cfg, expected):
    """`model.name` is empty or the task's registered network `expected`."""
    if cfg.model.name not in ("", expected):
        raise ConfigError(f"`--model {cfg.model.name}` does not fit `--task {cfg.task}`; its "
                          f"model is `{expected}` (leave --model empty)")


def load_data(cfg, source=None):
    """Manifest and classes of `source` (default: the config's), with the config's options."""
    c, d = cfg.classify, cfg.data
    own = source is None or source == d.source
    return cdata.load_classification(
        d.source if source is None else source,
        labels=c.labels if own else "", images=c.images if own else "",
        limit=d.limit, synthetic_count=d.synthetic_count,
        synthetic_size=d.synthetic_size or max(c.resize_width, c.resize_height),
    )


def dataset(cfg, df, *, training, batch_size=None, labels=True):
    c = cfg.classify
    return cdata.make_dataset(
        df["image"].tolist(), df["label"].to_numpy() if labels else None,
        resize=(c.resize_width, c.resize_height), crop=c.crop,
        batch_size=batch_size or cfg.train.batch_size, training=training,
        flip=cfg.augment.flip, seed=cfg.seed, cache=cfg.data.cache,
    )


def check_images(df, source):
    """Every image decodes (DataError naming each bad file), before anything is written."""

    check.validate(df.assign(mask=""), require_masks=False, source=str(source))


def write_references(cfg, network, train_df, path):
    """Embeds up to `references_per_class` seeded training images per class into `path`."""
    rng = np.random.default_rng(cfg.seed)
    keep = []
    for label in sorted(train_df["label"].unique()):
        rows = np.flatnonzero(train_df["label"].to_numpy() == label)
        keep.extend(rng.permutation(rows)[: cfg.classify.references_per_class])
    ref = train_df.iloc[sorted(keep)].reset_index(drop=True)
    emb = embed(network, dataset(cfg, ref, training=False, labels=False),
                cfg.classify.normalize_embedding)
    with files.atomic_path(path) as tmp:
        np.savez(tmp, embeddings=emb, labels=ref["label"].to_numpy(np.int32),
                 ids=ref["id"].to_numpy(str))


def embed(network, dataset, normalize):
    out = np.concatenate([network(x, training=False)["embedding"].numpy() for x in dataset])
    if normalize:
        out = out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)
    return out.astype(np.float32)


class ClassifierPredictor:
    """A classify run directory, ready to score images by softmax or nearest class mean."""

    def __init__(self, run_dir):
        run_dir = Path(run_dir)
        if not (run_dir / "config.toml").exists():
            raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
        self.cfg = config_lib.load_config(run_dir / "config.toml")
        if self.cfg.task != "classify":
            raise ConfigError(f"{run_dir}: a `{self.cfg.task}` run, not a classify run")
        for name in ("model.keras", "classes.json"):
            if not (run_dir / name).exists():
                raise ConfigError(f"{run_dir}: incomplete classify run (no {name})")
        import keras_hub  # noqa: F401  (registers the backbone's classes for loading)

        self.run_dir = run_dir
        self.classes = tuple(json.loads((run_dir / "classes.json").read_text()))
        self.network = load_keras_model(run_dir / "model.keras")
        refs = run_dir / "references.npz"
        self.references = dict(np.load(refs)) if refs.exists() else None

    def probabilities(self, dataset, rule=None):
        """(N, K) class scores of an image dataset; `rule` defaults to the run's."""
        rule = rule or predict_rule(self.cfg)
        if rule == "softmax":
            logits = np.concatenate(
                [self.network(x, training=False)["logits"].numpy() for x in dataset])
            return keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
        if self.references is None:
            raise ConfigError(f"{self.run_dir}: no references.npz for nearest_mean prediction")
        emb = embed(self.network, dataset, self.cfg.classify.normalize_embedding)
        d = nearest_class_mean_distances(emb, self.references["embeddings"],
                                         self.references["labels"], len(self.classes))
        return keras.ops.convert_to_numpy(keras.ops.softmax(-d / DISTANCE_TEMPERATURE, axis=-1))


def evaluate(model_path, data=None, out=None, batch_size=None, limit=None):
    """Scores a classify run on labelled data; writes metrics.json, per_image.csv, confusion.

    Returns:
        (report dict, classes, out folder).
    """
    predictor = ClassifierPredictor(model_path)
    cfg = predictor.cfg
    out = files.check_output(out or Path(model_path) / f"eval-{Path(data or cfg.data.source).name}")
    if limit is not None:
        cfg = cfg.override({"data.limit": limit})
    df, data_classes = load_data(cfg, data)
    unknown = sorted(set(df["diagnosis"]) - set(predictor.classes))
    if unknown:
        raise DataError(f"{data or cfg.data.source}: class {unknown[0]} is not one of the "
                        f"model's classes ({', '.join(predictor.classes)})")
    labels = np.array([predictor.classes.index(n) for n in df["diagnosis"]])
    df = df.assign(label=labels)
    probs = predictor.probabilities(dataset(cfg, df, training=False, batch_size=batch_size,
                                             labels=False))
    pred = probs.argmax(1)
    report = cmetrics.classification_report(labels, pred, predictor.classes)
    out.mkdir(parents=True, exist_ok=True)
    cmetrics.write_confusion(report.pop("confusion"), predictor.classes, out)
    report["predict_by"] = predict_rule(cfg)
    files.write_text(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    with files.atomic_path(out / "per_image.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "truth", "prediction", *predictor.classes])
        for i, t, p, row in zip(df["id"], labels, pred, probs):
            w.writerow([i, predictor.classes[t], predictor.classes[p],
                        *(f"{v:.6f}" for v in row)])
    return report, predictor.classes, out


def predict(model_path, input_path, out, batch_size=None):
    """Writes the ISIC 2018 Task 3 submission CSV (`image` + one probability per class).

    Returns:
        Path of `OUT/predictions.csv`.
    """
    out = files.check_output(out)
    predictor = ClassifierPredictor(model_path)
    df = cdata.list_images(input_path)
    check_images(df, input_path)
    probs = predictor.probabilities(dataset(predictor.cfg, df, training=False,
                                             batch_size=batch_size, labels=False))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", *predictor.classes])
        for i, row in zip(df["id"], probs):
            w.writerow([i, *(f"{v:.6f}" for v in row)])
    return path
