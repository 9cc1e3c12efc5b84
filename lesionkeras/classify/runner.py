"""`fit`, `evaluate` and `predict` of `--task classify` (ISIC 2018 Task 3).

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
    backup/           BackupAndRestore state for `fit --resume` (and, with
                      `classify.regenerate_every`, the current offline triplets)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np

from lesionkeras import config as config_lib
from lesionkeras.callbacks import StopOnNaN
from lesionkeras.classify import data as cdata
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.classify.triplet import nearest_class_mean_distances
from lesionkeras.errors import ConfigError, DataError

# Nearest-mean "probabilities": softmax of -distance / T. Only the argmax is the
# prediction; T keeps the scores readable for unit-norm embeddings (distances in [0, 2]).
DISTANCE_TEMPERATURE = 0.1
# Offline triplets (`classify.regenerate_every`): positives per minority anchor.
OFFLINE_POSITIVES = 4


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
    t = cfg.train
    if t.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=t.momentum,
                                    weight_decay=t.weight_decay or None)
    if t.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=t.weight_decay)
    return keras.optimizers.Adam(lr)


# Keys that fix the data split and the network's shape: a resumed run must keep them.
RESUME_KEYS = {
    "classify": ("task", "method", "seed", "data.source", "data.limit", "data.val_fraction",
                 "classify.labels", "classify.images", "classify.backbone",
                 "classify.embedding_dim", "classify.crop", "classify.regenerate_every"),
    "attributes": ("task", "method", "seed", "data.source", "data.limit", "data.val_fraction",
                   "data.image_size", "data.crop_size", "model.encoder_filters",
                   "model.filters", "model.batch_norm", "smile.simulate_missing"),
}


def run_dir_for(cfg, resume_dir):
    """The run directory: a new, empty one, or `resume_dir` checked against `cfg`.

    Raises:
        ConfigError: the new folder is not empty, or `resume_dir` is not a run of
            the same task or `cfg` changes a key that fixes its data or network.
    """
    if resume_dir:
        run_dir = Path(resume_dir)
        path = run_dir / "config.toml"
        if not path.is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no config.toml)")
        saved = config_lib.load_config(path).to_dict()
        new = cfg.to_dict()
        for key in RESUME_KEYS[cfg.task]:
            old_value, new_value = _lookup(saved, key), _lookup(new, key)
            if old_value != new_value:
                raise ConfigError(f"{run_dir}: the run has `{key} = {old_value!r}`; it cannot "
                                  f"resume with {new_value!r}")
        return run_dir
    from lesionkeras.trainers.run import default_run_dir

    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: run directory exists and is not empty "
                          "(choose another --out, or continue it with --resume)")
    return run_dir


def _lookup(tree, dotted):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def training_callbacks(run_dir, monitor, *, before=(), after=()):
    """The callbacks of a resumable classify/attributes fit, in order.

    The segmentation runs' resume machinery: `BackupAndRestore` (first) keeps the
    weights, optimizer state and epoch counter in `RUN/backup/` every epoch and
    restores them when `fit --resume` starts again; the best checkpoint keeps
    the best `monitor` of `RUN/history.csv` so far; the CSV log appends. `before`
    go ahead of the writers (so what they add to the logs is written).
    """
    from lesionkeras.trainers.run import _best_so_far
    from lesionkeras.trainers.triplet import SaveNetwork

    run_dir = Path(run_dir)
    return [
        keras.callbacks.BackupAndRestore(str(run_dir / "backup"), delete_checkpoint=False),
        *before,
        SaveNetwork(run_dir / "model.keras", run_dir / "last.keras", monitor,
                    initial_best=_best_so_far(run_dir / "history.csv", monitor)),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.TensorBoard(str(run_dir / "tensorboard")),
        *after,
    ]


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


def _dataset(cfg, df, *, training, batch_size=None, labels=True):
    c = cfg.classify
    return cdata.make_dataset(
        df["image"].tolist(), df["label"].to_numpy() if labels else None,
        resize=(c.resize_width, c.resize_height), crop=c.crop,
        batch_size=batch_size or cfg.train.batch_size, training=training,
        flip=cfg.augment.flip, seed=cfg.seed, cache=cfg.data.cache,
    )


def fit(cfg, *, resume_dir=None, verbose=1, log=print, extra_callbacks=()):
    """Trains `--task classify` (`--method triplet` or `softmax`) and fills the run directory.

    Args:
        cfg: `Config` with `task = "classify"`.
        resume_dir: str or None. Continue this interrupted (or finished) run from its
            last finished epoch, up to `cfg.train.epochs`.
        verbose: int. Keras verbosity. log: callable. Where status lines go.
        extra_callbacks: sequence of `keras.callbacks.Callback`, run last.

    Returns:
        `lesionkeras.trainers.run.FitResult`.
    """
    import tensorflow as tf

    from lesionkeras import distribute
    from lesionkeras.data import pipeline
    from lesionkeras.models import registry
    from lesionkeras.trainers.run import FitResult, _history_len
    from lesionkeras.trainers.triplet import (RegenerateTriplets, TripletEpochs, TripletTable,
                                              TripletTrainer)

    check_model_name(cfg, "resnet_classifier")
    # First, before any TensorFlow op (MultiWorkerMirroredStrategy configures the runtime).
    strategy = distribute.resolve_strategy(cfg.train.strategy)
    run_dir = run_dir_for(cfg, resume_dir)
    cfg = cfg.override({"out": str(run_dir)})
    replicas = distribute.check_batch_size(cfg.train.batch_size, strategy)
    keras.utils.set_random_seed(cfg.seed)
    c = cfg.classify
    df, classes = load_data(cfg)
    _check_images(df, cfg.data.source)
    df = cdata.stratified_split(df, cfg.data.val_fraction, cfg.seed)
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    val_df = df[df["split"] == "val"].reset_index(drop=True)
    counts = np.bincount(train_df["label"], minlength=len(classes))
    present = [classes[i] for i in np.flatnonzero(counts)]
    if len(present) < 2:
        raise DataError(f"{cfg.data.source}: the training split holds only one class "
                        f"({present[0] if present else 'none'}); a classifier needs two")
    majority = int(np.argmax(counts))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.toml")
    (run_dir / "classes.json").write_text(json.dumps(list(classes)) + "\n")

    train_ds = _dataset(cfg, train_df, training=True)
    steps = int(train_ds.cardinality())
    val_ds = None
    if len(val_df):
        keep, val_batch = pipeline.validation_batches(
            len(val_df), cfg.train.batch_size, replicas, log)
        val_df = val_df.iloc[:keep].reset_index(drop=True)
        val_ds = _dataset(cfg, val_df, training=False, batch_size=val_batch)
    offline = cfg.method == "triplet" and c.regenerate_every > 0
    before = []
    if offline:
        from lesionkeras.classify.triplet import triplet_capacity

        labels = train_df["label"].to_numpy()
        # Outside the strategy scope: the input pipeline reads these variables.
        table = TripletTable(triplet_capacity(labels, majority, negatives=c.negatives,
                                              positives=OFFLINE_POSITIVES))
        per_batch = max(replicas, cfg.train.batch_size // 3 // replicas * replicas)
        triplet_ds = cdata.make_triplet_dataset(
            train_df["image"].tolist(), table.triplets, table.count,
            resize=(c.resize_width, c.resize_height), crop=c.crop,
            triplets_per_batch=per_batch, flip=cfg.augment.flip, seed=cfg.seed,
        )
        train_ds = tf.data.Dataset.zip((train_ds, triplet_ds)).map(
            lambda xy, t: ({"image": xy[0], "triplets": t[0], "triplet_valid": t[1]}, xy[1])
        ).prefetch(tf.data.AUTOTUNE)
        before.append(RegenerateTriplets(
            c.regenerate_every, _dataset(cfg, train_df, training=False, labels=False), labels,
            table, majority=majority, negatives=c.negatives, positives=OFFLINE_POSITIVES,
            normalize=c.normalize_embedding, seed=cfg.seed,
            state=run_dir / "backup" / "triplets.npz", log=log,
        ))
    with strategy.scope():
        network = registry.build(
            "resnet_classifier", input_shape=(c.crop, c.crop, 3), num_classes=len(classes),
            backbone=c.backbone, embedding_dim=c.embedding_dim, weights=c.backbone_weights,
        )
        model = TripletTrainer(
            network, len(classes), majority, use_triplet=cfg.method == "triplet",
            mode=c.triplet_mode, every=c.triplet_every, margin=c.margin,
            triplet_weight=c.triplet_weight, negatives=c.negatives,
            normalize=c.normalize_embedding,
        )
        # XLA only when asked: compiling a ResNet step costs more than it saves on short runs.
        model.compile(optimizer=make_optimizer(cfg, steps),
                      jit_compile=cfg.train.jit_compile == "true")
        # Built here, in the strategy scope, before `fit` (keras#20164).
        model.optimizer.build(network.trainable_variables)
    nan_stop = StopOnNaN()
    if c.triplet_mode == "alternate_epoch":
        before.append(TripletEpochs(c.triplet_every))
    callbacks = training_callbacks(
        run_dir, "val_balanced_accuracy" if val_ds is not None else "balanced_accuracy",
        before=[nan_stop, *before], after=extra_callbacks,
    )
    log(f"training {c.backbone} classifier ({network.count_params():,} parameters; "
        f"{cfg.method}, classes {', '.join(classes)}; majority {classes[majority]}) on "
        f"{len(train_df)} images, validating on {len(val_df)}; strategy "
        f"{type(strategy).__name__} with {replicas} replica(s)"
        + (f"; triplets regenerated every {c.regenerate_every} epochs" if offline else ""))
    history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.train.epochs,
                        callbacks=callbacks, shuffle=False,  # the dataset shuffles itself
                        verbose=verbose if cfg.train.progress else (2 if verbose else 0))
    nan_stop.raise_if_stopped(run_dir)
    if not (run_dir / "model.keras").exists():
        network.save(run_dir / "model.keras")  # the monitor was never finite
    best = keras.saving.load_model(run_dir / "model.keras")
    write_references(cfg, best, train_df, run_dir / "references.npz")
    metrics = {"epochs": _history_len(run_dir / "history.csv"), "train_images": len(train_df),
               "val_images": len(val_df), "classes": list(classes),
               "predict_by": predict_rule(cfg)}
    if val_ds is not None:
        predictor = ClassifierPredictor(run_dir)
        for rule in ("softmax", "nearest_mean"):
            probs = predictor.probabilities(_dataset(cfg, val_df, training=False, labels=False),
                                            rule=rule)
            report = cmetrics.classification_report(val_df["label"], probs.argmax(1), classes)
            metrics[f"balanced_accuracy_{rule}"] = report["balanced_accuracy"]
            if rule == predict_rule(cfg):
                cmetrics.write_confusion(report.pop("confusion"), classes, run_dir)
                metrics.update(report)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return FitResult(run_dir, metrics, len(history.epoch), [])


def _check_images(df, source):
    """Every image decodes (DataError naming each bad file), before anything is written."""
    from lesionkeras.data import check

    check.validate(df.assign(mask=""), require_masks=False, source=str(source))


def write_references(cfg, network, train_df, path):
    """Embeds up to `references_per_class` seeded training images per class into `path`."""
    rng = np.random.default_rng(cfg.seed)
    keep = []
    for label in sorted(train_df["label"].unique()):
        rows = np.flatnonzero(train_df["label"].to_numpy() == label)
        keep.extend(rng.permutation(rows)[: cfg.classify.references_per_class])
    ref = train_df.iloc[sorted(keep)].reset_index(drop=True)
    emb = embed(network, _dataset(cfg, ref, training=False, labels=False),
                cfg.classify.normalize_embedding)
    np.savez(path, embeddings=emb, labels=ref["label"].to_numpy(np.int32),
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
        self.network = keras.saving.load_model(run_dir / "model.keras")
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
    if limit is not None:
        cfg = cfg.override({"data.limit": limit})
    df, data_classes = load_data(cfg, data)
    unknown = sorted(set(df["diagnosis"]) - set(predictor.classes))
    if unknown:
        raise DataError(f"{data or cfg.data.source}: class {unknown[0]} is not one of the "
                        f"model's classes ({', '.join(predictor.classes)})")
    labels = np.array([predictor.classes.index(n) for n in df["diagnosis"]])
    df = df.assign(label=labels)
    probs = predictor.probabilities(_dataset(cfg, df, training=False, batch_size=batch_size,
                                             labels=False))
    pred = probs.argmax(1)
    report = cmetrics.classification_report(labels, pred, predictor.classes)
    out = Path(out) if out else Path(model_path) / f"eval-{Path(data or cfg.data.source).name}"
    out.mkdir(parents=True, exist_ok=True)
    cmetrics.write_confusion(report.pop("confusion"), predictor.classes, out)
    report["predict_by"] = predict_rule(cfg)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "per_image.csv", "w", newline="") as f:
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
    predictor = ClassifierPredictor(model_path)
    df = cdata.list_images(input_path)
    _check_images(df, input_path)
    probs = predictor.probabilities(_dataset(predictor.cfg, df, training=False,
                                             batch_size=batch_size, labels=False))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", *predictor.classes])
        for i, row in zip(df["id"], probs):
            w.writerow([i, *(f"{v:.6f}" for v in row)])
    return path
