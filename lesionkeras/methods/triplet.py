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

The wrapper model and its step are in `triplet_step`, the offline triplet
table and its regeneration in `triplet_offline`; this module owns the method
and its `[classify]` config table.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from lesionkeras.errors import ConfigError
from lesionkeras import config, files
from lesionkeras.classify import data as cdata
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.classify import runner
from lesionkeras.classify.triplet import triplet_capacity
from lesionkeras.errors import DataError
from lesionkeras.methods.triplet_offline import RegenerateTriplets, TripletTable
from lesionkeras.methods.triplet_step import TripletEpochs, TripletTrainer
from lesionkeras.models import registry
from lesionkeras.training import method
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
        files.write_text(Path(run_dir) / "classes.json", json.dumps(list(self.classes)) + "\n")

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
