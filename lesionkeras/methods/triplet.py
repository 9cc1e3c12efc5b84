"""Cross-entropy + triplet-loss classification (Xue et al. 2018, ISIC 2018 report, section 3).

How the two losses alternate (`classify.triplet_mode`):

* `alternate_batch` (default): of every `classify.triplet_every` training steps
  the last one minimises the triplet loss on the embedding, the others the
  cross-entropy of the classifier (every = 2: CE, triplet, CE, triplet, ...).
* `alternate_epoch`: the same by epochs: every `triplet_every`-th epoch is a
  triplet epoch (the report regenerates triplets every 10 epochs).
* `joint`: every step minimises CE + `triplet_weight` x triplet.

In a triplet step the classifier gets no gradient (with SGD momentum it still
coasts on the velocity of the earlier CE steps). By default triplets are mined
online in every batch (`lesionkeras.classify.triplet`), so they are regenerated
at every step. With `classify.regenerate_every = N` they are mined offline
instead: every N epochs `RegenerateTriplets` embeds the whole training set and
rewrites a `TripletTable` (each minority sample anchors a few positives of its
class and its hardest majority negative), and each training batch carries T
triplets drawn from the table (`classify.data.make_triplet_dataset`) that the
triplet loss is computed on, at the cost of one more forward pass per step.
`--method softmax` is the same model trained with cross-entropy only (the
triplet loss is still computed and logged, never minimised): the paper's
"CE loss only" baseline.

Distribution: the minimised loss is the per-replica mean divided by the number
of replicas (the optimiser sums gradients over replicas).
"""

import dataclasses
import json
import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from lesionkeras.errors import ConfigError
from lesionkeras import config
from lesionkeras.classify import data as cdata
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.classify import runner
from lesionkeras.classify.metrics import BalancedAccuracy
from lesionkeras.classify.triplet import (offline_triplet_loss, regenerate_triplets,
                                          triplet_capacity, triplet_loss)
from lesionkeras.errors import DataError
from lesionkeras.models import registry
from lesionkeras.training import method
from lesionkeras.training.distribute import replicas_in_sync
from lesionkeras.training.method import Method, Stage

@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    labels: str = config.field(
        "",
        "classify: label CSV (ISIC 2018 Task 3 one-hot, HAM10000 metadata with `dx`, or ISIC "
        "2017 `melanoma`[/`seborrheic_keratosis`] classes); empty = `data.source` if it is a "
        "CSV, else the one label CSV found below it. The class list comes from the file.",
    )
    images: str = config.field(
        "", "classify: image folder searched by image id (empty = the data folder / the CSV's folder)."
    )
    backbone: str = config.field(
        "resnet101", "classify: keras-hub ResNet backbone (built from its config, no download).",
        choices=("resnet18", "resnet34", "resnet50", "resnet101"),
    )
    backbone_weights: str = config.field(
        "", "classify: local `.weights.h5` of the same backbone; empty = random initialisation."
    )
    embedding_dim: int = config.field(256, "classify: size of the embedding after pooling.", minimum=1)
    resize_width: int = config.field(360, "classify: images are first resized to this width.", minimum=16)
    resize_height: int = config.field(270, "classify: ... and this height.", minimum=16)
    crop: int = config.field(
        256, "classify: side of the random training crop (validation/prediction: centre crop).",
        minimum=16,
    )
    triplet_mode: str = config.field(
        "alternate_batch",
        "classify/triplet: `alternate_batch` (of every `triplet_every` steps the last minimises "
        "the triplet loss, the others cross-entropy), `alternate_epoch` (the same by epochs), "
        "or `joint` (CE + triplet_weight x triplet every step).",
        choices=("alternate_batch", "alternate_epoch", "joint"),
    )
    triplet_every: int = config.field(
        2, "classify/triplet: period of the alternation, in steps or epochs.", minimum=1
    )
    margin: float = config.field(0.2, "classify/triplet: margin alpha of the triplet loss.", minimum=0.0)
    triplet_weight: float = config.field(1.0, "classify/triplet: scale of the triplet loss.", minimum=0.0)
    negatives: str = config.field(
        "majority",
        "classify/triplet: negatives from the `majority` class of the training split (anchors "
        "and positives from the other classes; the paper), or from any `other` class.",
        choices=("majority", "other"),
    )
    regenerate_every: int = config.field(
        0, "classify/triplet: if > 0, mine triplets offline every N epochs (each minority "
        "training image anchors positives of its class and its hardest majority negative, from "
        "embeddings of the whole training set) instead of online in each batch; 0 = online.",
        minimum=0,
    )
    normalize_embedding: bool = config.field(
        True, "classify: L2-normalise embeddings for the triplet loss and nearest-mean prediction."
    )
    predict_by: str = config.field(
        "auto",
        "classify: `softmax`, `nearest_mean` (least mean Euclidean distance to the stored "
        "training embeddings of each class), or `auto` (nearest_mean for triplet, softmax "
        "for softmax).",
        choices=("auto", "softmax", "nearest_mean"),
    )
    references_per_class: int = config.field(
        100, "classify: training images per class sampled for nearest_mean (stored in the run).",
        minimum=1,
    )
    lr_step_epochs: int = config.field(
        100, "classify: multiply the learning rate by lr_step_factor every N epochs.", minimum=1
    )
    lr_step_factor: float = config.field(0.1, "classify: see lr_step_epochs.", minimum=0.0)


def check_section(cfg, origin):
    """`classify.crop` fits in the resized image."""
    c = cfg.classify
    if c.crop > min(c.resize_width, c.resize_height):
        raise ConfigError(
            f"{origin}: `classify.crop` ({c.crop}) must not exceed "
            f"`classify.resize_width`/`classify.resize_height` "
            f"({c.resize_width}x{c.resize_height})"
        )


config.register_section("classify", ClassifyConfig, check_section)


MODES = ("alternate_batch", "alternate_epoch", "joint")


class TripletTrainer(keras.Model):
    """Wraps a `{"embedding", "logits"}` network with the alternating CE / triplet step.

    Training batches are `(image, label)` (online mining), or, for offline
    triplets, `({"image", "triplets", "triplet_valid"}, label)` with `triplets`
    (T, 3, H, W, 3) images of (anchor, positive, negative) and `triplet_valid` (T,).

    Args:
        network: `keras.Model`. Returns a dict with `embedding` and `logits`.
        num_classes: int. K.
        majority: int. The majority class of the training split (negatives' class).
        use_triplet: bool. False trains on cross-entropy only. Defaults to True.
        mode: str. One of `MODES`. Defaults to `"alternate_batch"`.
        every: int. Period of the alternation (steps or epochs). Defaults to 2.
        margin: float. alpha. Defaults to 0.2.
        triplet_weight: float. Scale of the triplet loss. Defaults to 1.0.
        negatives: str. `"majority"` (paper) or `"other"`. Defaults to `"majority"`.
        normalize: bool. L2-normalise embeddings in the triplet loss. Defaults to True.
    """

    def __init__(self, network, num_classes, majority, *, use_triplet=True,
                 mode="alternate_batch", every=2, margin=0.2, triplet_weight=1.0,
                 negatives="majority", normalize=True, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}. Received: mode={mode!r}")
        if every < 1:
            raise ValueError(f"`every` must be >= 1. Received: every={every}")
        self.network = network
        self.num_classes, self.majority = int(num_classes), int(majority)
        self.use_triplet, self.mode, self.every = bool(use_triplet), mode, int(every)
        self.margin, self.triplet_weight = float(margin), float(triplet_weight)
        self.negatives, self.normalize = negatives, bool(normalize)
        # 1.0 during a triplet epoch of `alternate_epoch` (set by `TripletEpochs`).
        self.triplet_epoch = tf.Variable(0.0, trainable=False, name="triplet_epoch")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.triplet_tracker = keras.metrics.Mean(name="triplet")
        self.count_tracker = keras.metrics.Mean(name="triplets")
        self.balanced = BalancedAccuracy(num_classes)
        # The wrapped functional network is built; so is this wrapper (BackupAndRestore).
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.ce_tracker, self.triplet_tracker, self.count_tracker,
                self.balanced]

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            inputs = inputs["image"]
        return self.network(inputs, training=training)

    def _forward(self, x, y, training):
        triplets = None
        if isinstance(x, dict):
            x, triplets, valid = x["image"], x["triplets"], x["triplet_valid"]
        out = self.network(x, training=training)
        logits = ops.cast(out["logits"], "float32")
        ce = ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        if triplets is None:
            trip, count = triplet_loss(
                out["embedding"], y, margin=self.margin, majority=self.majority,
                negatives=self.negatives, normalize=self.normalize,
            )
        else:
            # (T, 3, H, W, C) -> (3T, H, W, C): rows a0, p0, n0, a1, ...
            flat = ops.reshape(triplets, (-1, *triplets.shape[2:]))
            emb = self.network(flat, training=training)["embedding"]
            emb = ops.reshape(emb, (-1, 3, emb.shape[-1]))
            trip, count = offline_triplet_loss(
                emb[:, 0], emb[:, 1], emb[:, 2], margin=self.margin, weights=valid,
                normalize=self.normalize,
            )
        return logits, ce, trip, count

    def triplet_share(self):
        """1.0 if this step minimises the triplet loss, 0.0 for cross-entropy."""
        if not self.use_triplet or self.mode == "joint":
            return ops.zeros(())
        if self.mode == "alternate_epoch":
            return ops.convert_to_tensor(self.triplet_epoch)
        step = ops.cast(self.optimizer.iterations, "int32")
        return ops.cast(ops.equal(step % self.every, self.every - 1), "float32")

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        y = ops.reshape(ops.cast(y, "int32"), (-1,))
        with tf.GradientTape() as tape:
            logits, ce, trip, count = self._forward(x, y, True)
            if not self.use_triplet:
                loss = ce
            elif self.mode == "joint":
                loss = ce + self.triplet_weight * trip
            else:
                share = self.triplet_share()
                loss = share * self.triplet_weight * trip + (1.0 - share) * ce
            scaled = loss / replicas_in_sync()
        variables = self.network.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._update(loss, ce, trip, count, y, logits)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        y = ops.reshape(ops.cast(y, "int32"), (-1,))
        logits, ce, trip, count = self._forward(x, y, False)
        loss = ce + self.triplet_weight * trip if self.use_triplet else ce
        return self._update(loss, ce, trip, count, y, logits)

    def _update(self, loss, ce, trip, count, y, logits):
        self.loss_tracker.update_state(loss)
        self.ce_tracker.update_state(ce)
        self.triplet_tracker.update_state(trip)
        self.count_tracker.update_state(count)
        self.balanced.update_state(y, logits)
        return {m.name: m.result() for m in self.metrics}


class TripletEpochs(keras.callbacks.Callback):
    """`alternate_epoch`: marks every `every`-th epoch (1-based) as a triplet epoch."""

    def __init__(self, every):
        super().__init__()
        self.every = int(every)

    def on_epoch_begin(self, epoch, logs=None):
        self.model.triplet_epoch.assign(1.0 if (epoch + 1) % self.every == 0 else 0.0)


class TripletTable:
    """Offline triplets shared by the data pipeline and `RegenerateTriplets`.

    Plain `tf.Variable`s (create it outside a strategy scope): `triplets` (capacity, 3)
    int32 rows of (anchor, positive, negative) training indices and `count`, the rows in use.

    Args:
        capacity: int. Most rows (`classify.triplet.triplet_capacity`); at least 1.
    """

    def __init__(self, capacity):
        self.capacity = max(int(capacity), 1)
        self.triplets = tf.Variable(tf.zeros((self.capacity, 3), tf.int32), trainable=False,
                                    name="triplet_table")
        self.count = tf.Variable(0, dtype=tf.int32, trainable=False, name="triplet_count")

    def set(self, triplets):
        triplets = np.asarray(triplets, np.int32).reshape(-1, 3)
        if len(triplets) > self.capacity:
            raise ValueError(f"{len(triplets)} triplets do not fit a table of {self.capacity}")
        padded = np.zeros((self.capacity, 3), np.int32)
        padded[: len(triplets)] = triplets
        self.triplets.assign(padded)
        self.count.assign(len(triplets))

    def numpy(self):
        return self.triplets.numpy()[: int(self.count.numpy())]


class RegenerateTriplets(keras.callbacks.Callback):
    """Every `every` epochs, re-mines the offline triplets of the training set.

    At the start of epochs 0, N, 2N, ... it embeds the training images (batches
    of `images`, the training set in the order of `labels`, without augmentation)
    with the current network, builds the triplets with
    `classify.triplet.regenerate_triplets` (seeded by `seed` and the epoch) and
    writes them to `table`. The triplets and their epoch are saved to `state`, so
    a resumed run draws from the same set until its next regeneration. Each
    epoch's logs get `regenerated_triplets` (the count) and
    `anchor_negative_distance` (mean Euclidean anchor-negative distance), so
    history.csv and TensorBoard show them; `log` gets one line per regeneration.

    Args:
        every: int >= 1. N.
        images: dataset of image batches. labels: int array (N,).
        table: `TripletTable`.
        majority: int. negatives: str. positives: int. normalize: bool. See
            `regenerate_triplets`.
        seed: int. state: path of the `.npz` state (None: not saved).
        log: callable. Defaults to `print`.
    """

    def __init__(self, every, images, labels, table, *, majority, negatives="majority",
                 positives=4, normalize=True, seed=0, state=None, log=print):
        super().__init__()
        if every < 1:
            raise ValueError(f"`every` must be >= 1. Received: every={every}")
        self.every, self.images = int(every), images
        self.labels = np.asarray(labels).astype(np.int64)
        self.table, self.majority, self.negatives = table, majority, negatives
        self.positives, self.normalize, self.seed = positives, normalize, int(seed)
        self.state = Path(state) if state else None
        self.log = log
        self.generated_at = None
        self.distance = float("nan")

    def on_train_begin(self, logs=None):
        if self.state is not None and self.state.exists():
            saved = np.load(self.state)
            self.table.set(saved["triplets"])
            self.generated_at = int(saved["epoch"])
            self.distance = float(saved["distance"])

    def on_epoch_begin(self, epoch, logs=None):
        if epoch % self.every and self.generated_at is not None:
            return
        if self.generated_at == epoch:
            return  # restored from the state written at this epoch's start
        embeddings = np.concatenate([
            keras.ops.convert_to_numpy(self.model.network(x, training=False)["embedding"])
            for x in self.images
        ])
        triplets, distances = regenerate_triplets(
            embeddings, self.labels, self.majority, negatives=self.negatives,
            positives=self.positives, seed=[self.seed, epoch], normalize=self.normalize,
        )
        self.table.set(triplets)
        self.generated_at = epoch
        self.distance = float(distances.mean()) if len(distances) else float("nan")
        if self.state is not None:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_name(self.state.stem + ".tmp.npz")
            np.savez(tmp, triplets=triplets, epoch=epoch, distance=self.distance)
            os.replace(tmp, self.state)
        self.log(f"epoch {epoch + 1}: regenerated {len(triplets)} triplets of "
                 f"{len(self.labels)} training images (mean anchor-negative distance "
                 f"{self.distance:.4f})")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["regenerated_triplets"] = float(self.table.count.numpy())
            logs["anchor_negative_distance"] = self.distance


# Offline triplets (`classify.regenerate_every`): positives per minority anchor.
OFFLINE_POSITIVES = 4


@method.register
class Triplet(Method):
    """ISIC 2018 Task 3: a ResNet classifier trained with cross-entropy and the triplet
    loss (`triplet`), or with cross-entropy alone (`softmax`, the report's baseline).

    Run directory, besides the shared files: `classes.json` (class names in the
    order of the logits), `references.npz` (embeddings of up to
    `classify.references_per_class` training images per class, for nearest-class-mean
    prediction), `confusion.csv`/`.png` (validation, the configured rule) and, with
    `classify.regenerate_every`, `backup/triplets.npz`. `model.keras` is the network
    `{"embedding", "logits"}` with the best validation balanced accuracy.
    """

    names = ("triplet", "softmax")
    task = "classify"
    monitor = "balanced_accuracy"
    resume_keys = ("classify.labels", "classify.images", "classify.backbone",
                   "classify.embedding_dim", "classify.crop", "classify.regenerate_every")

    def check(self):
        runner.check_model_name(self.cfg, "resnet_classifier")

    def manifest(self):
        cfg = self.cfg
        df, self.classes = runner.load_data(cfg)
        runner.check_images(df, cfg.data.source)
        return cdata.stratified_split(df, cfg.data.val_fraction, cfg.seed), []

    def prepare(self, data):
        counts = np.bincount(data.train_df["label"], minlength=len(self.classes))
        present = [self.classes[i] for i in np.flatnonzero(counts)]
        if len(present) < 2:
            raise DataError(f"{self.cfg.data.source}: the training split holds only one class "
                            f"({present[0] if present else 'none'}); a classifier needs two")
        self.majority = int(np.argmax(counts))

    def write_files(self, run_dir, data):
        (Path(run_dir) / "classes.json").write_text(json.dumps(list(self.classes)) + "\n")

    def _offline(self):
        return self.cfg.method == "triplet" and self.cfg.classify.regenerate_every > 0

    def stages(self, data):
        cfg, c = self.cfg, self.cfg.classify
        train_ds = runner.dataset(cfg, data.train_df, training=True)
        self._regenerate = []
        if self._offline():
            labels = data.train_df["label"].to_numpy()
            # Outside the strategy scope: the input pipeline reads these variables.
            table = TripletTable(triplet_capacity(labels, self.majority, negatives=c.negatives,
                                                  positives=OFFLINE_POSITIVES))
            per_batch = max(self.replicas,
                            cfg.train.batch_size // 3 // self.replicas * self.replicas)
            triplet_ds = cdata.make_triplet_dataset(
                data.train_df["image"].tolist(), table.triplets, table.count,
                resize=(c.resize_width, c.resize_height), crop=c.crop,
                triplets_per_batch=per_batch, flip=cfg.augment.flip, seed=cfg.seed,
            )
            train_ds = tf.data.Dataset.zip((train_ds, triplet_ds)).map(
                lambda xy, t: ({"image": xy[0], "triplets": t[0], "triplet_valid": t[1]}, xy[1])
            ).prefetch(tf.data.AUTOTUNE)
            self._regenerate.append(RegenerateTriplets(
                c.regenerate_every,
                runner.dataset(cfg, data.train_df, training=False, labels=False), labels,
                table, majority=self.majority, negatives=c.negatives,
                positives=OFFLINE_POSITIVES, normalize=c.normalize_embedding, seed=cfg.seed,
                state=Path(cfg.out) / "backup" / "triplets.npz", log=self.log,
            ))
        return [Stage(train_ds, cfg.train.epochs)]

    def val_dataset(self, data, keep, batch_size):
        data.extra["scored_val_df"] = data.val_df.iloc[:keep].reset_index(drop=True)
        return runner.dataset(self.cfg, data.extra["scored_val_df"], training=False,
                              batch_size=batch_size)

    def build(self, data, steps_per_epoch):
        cfg, c = self.cfg, self.cfg.classify
        network = registry.build(
            "resnet_classifier", input_shape=(c.crop, c.crop, 3), num_classes=len(self.classes),
            backbone=c.backbone, embedding_dim=c.embedding_dim, weights=c.backbone_weights,
        )
        model = TripletTrainer(
            network, len(self.classes), self.majority, use_triplet=cfg.method == "triplet",
            mode=c.triplet_mode, every=c.triplet_every, margin=c.margin,
            triplet_weight=c.triplet_weight, negatives=c.negatives,
            normalize=c.normalize_embedding,
        )
        # XLA only when asked: compiling a ResNet step costs more than it saves on short runs.
        model.compile(optimizer=runner.make_optimizer(cfg, steps_per_epoch),
                      jit_compile=cfg.train.jit_compile == "true")
        # Built here, in the strategy scope, before `fit` (keras#20164).
        model.optimizer.build(network.trainable_variables)
        return model

    def callbacks(self, data, model):
        out = list(self._regenerate)
        if self.cfg.classify.triplet_mode == "alternate_epoch":
            out.append(TripletEpochs(self.cfg.classify.triplet_every))
        return out

    def describe(self, model, data):
        c = self.cfg.classify
        return (f"training {c.backbone} classifier ({model.network.count_params():,} parameters; "
                f"{self.cfg.method}, classes {', '.join(self.classes)}; majority "
                f"{self.classes[self.majority]}) on {len(data.train_df)} images, validating on "
                f"{len(data.val_df)}"
                + (f"; triplets regenerated every {c.regenerate_every} epochs"
                   if self._offline() else ""))

    def final_metrics(self, best, val_ds, data, run_dir):
        cfg = self.cfg
        run_dir = Path(run_dir)
        runner.write_references(cfg, best, data.train_df, run_dir / "references.npz")
        metrics = {"classes": list(self.classes), "predict_by": runner.predict_rule(cfg)}
        if val_ds is None:
            return metrics
        val_df = data.extra["scored_val_df"]
        predictor = runner.ClassifierPredictor(run_dir)
        for rule in ("softmax", "nearest_mean"):
            probs = predictor.probabilities(
                runner.dataset(cfg, val_df, training=False, labels=False), rule=rule)
            report = cmetrics.classification_report(val_df["label"], probs.argmax(1),
                                                    self.classes)
            metrics[f"balanced_accuracy_{rule}"] = report["balanced_accuracy"]
            if rule == runner.predict_rule(cfg):
                cmetrics.write_confusion(report.pop("confusion"), self.classes, run_dir)
                metrics.update(report)
        return metrics
