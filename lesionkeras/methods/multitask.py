"""Multitask attribute training (Xue et al. 2018, ISIC 2018 report, section 2).

One step minimises, jointly,

    mask_weight x pixel BCE of the 5 attribute masks
    + presence_weight x multi-label soft-margin loss of the 5 presence logits

with SMILE's missing-label weights (`lesionkeras.data.missing`): a pixel of a
non-annotated attribute counts only where it is known negative, and the
presence of an attribute counts only where its whole map is known
(i.e. the attribute was annotated in that image).

Distribution: the minimised loss is the per-replica mean divided by the number
of replicas (the optimiser sums gradients over replicas).
"""

import dataclasses
import keras
import tensorflow as tf
from keras import ops

from lesionkeras import config
from lesionkeras import losses
from lesionkeras.classify import attributes
from lesionkeras.classify.metrics import PooledJaccard
from lesionkeras.classify.runner import check_model_name, make_optimizer
from lesionkeras.data import missing, pipeline
from lesionkeras.data.classes import ATTRIBUTES
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.models import registry
from lesionkeras.training import method
from lesionkeras.training.distribute import replicas_in_sync
from lesionkeras.training.method import Method, Stage


@dataclasses.dataclass(frozen=True)
class AttributesConfig:
    mask_weight: float = config.field(
        1.0, "attributes: weight of the pixel cross-entropy of the 5 attribute masks.", minimum=0.0
    )
    presence_weight: float = config.field(
        1.0, "attributes: weight of the multi-label soft-margin loss of attribute presence.",
        minimum=0.0,
    )
    init_from: str = config.field(
        "", "attributes: a Task 1 run (or its model.keras) whose `encoder` initialises the "
        "VGG19 features; empty = random initialisation.",
    )
    lr_step_epochs: int = config.field(
        100, "attributes: multiply the learning rate by lr_step_factor every N epochs.", minimum=1
    )
    lr_step_factor: float = config.field(0.1, "attributes: see lr_step_epochs.", minimum=0.0)


config.register_section("attributes", AttributesConfig)


def multilabel_soft_margin(labels, logits, weights=None):
    """Mean over labels of log(1 + exp(-y' x)), y' = 2y - 1 (PyTorch's MultiLabelSoftMarginLoss).

    Args:
        labels: (B, A) in {0, 1}. logits: (B, A). weights: optional (B, A) in {0, 1}.

    Returns:
        Scalar: the weighted mean (0 when every weight is 0).
    """
    labels = ops.cast(labels, "float32")
    logits = ops.cast(logits, "float32")
    if labels.shape != logits.shape:
        raise ValueError(f"`labels` and `logits` must have the same shape. Received: "
                         f"{labels.shape} and {logits.shape}")
    per = ops.softplus(-(2.0 * labels - 1.0) * logits)
    if weights is None:
        return ops.mean(per)
    weights = ops.cast(weights, "float32")
    return ops.sum(per * weights) / ops.maximum(ops.sum(weights), 1.0)


def weighted_pixel_bce(masks, logits, weights):
    """Pixel binary cross-entropy from logits, averaged over the pixels of weight 1."""
    per = losses.sigmoid_cross_entropy(masks, ops.cast(logits, "float32"))
    weights = ops.cast(weights, "float32")
    return ops.sum(per * weights) / ops.maximum(ops.sum(weights), 1.0)


class MultitaskTrainer(keras.Model):
    """Wraps a `{"masks", "presence"}` network; batches are `(image, masks, weights)`.

    Args:
        network: `keras.Model` from `build_attribute_net`.
        mask_weight: float. Defaults to 1.0.
        presence_weight: float. Defaults to 1.0.
        threshold: float. Probability threshold of the masks for the Jaccard. Defaults to 0.5.
    """

    def __init__(self, network, *, mask_weight=1.0, presence_weight=1.0, threshold=0.5,
                 **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.mask_weight, self.presence_weight = float(mask_weight), float(presence_weight)
        num = network.output["presence"].shape[-1]
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.mask_tracker = keras.metrics.Mean(name="mask_loss")
        self.presence_tracker = keras.metrics.Mean(name="presence_loss")
        self.jaccard = PooledJaccard(num, threshold=threshold)
        # The wrapped functional network is built; so is this wrapper (RunBackup).
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.mask_tracker, self.presence_tracker, self.jaccard]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _forward(self, data, training):
        x, masks, weights = data
        out = self.network(x, training=training)
        presence = ops.max(masks, axis=(1, 2))
        # Known presence: every pixel of the attribute's map is known.
        presence_weight = ops.min(weights, axis=(1, 2))
        mask_loss = weighted_pixel_bce(masks, out["masks"], weights)
        presence_loss = multilabel_soft_margin(presence, out["presence"], presence_weight)
        loss = self.mask_weight * mask_loss + self.presence_weight * presence_loss
        return out, masks, weights, loss, mask_loss, presence_loss

    def train_step(self, data):
        with tf.GradientTape() as tape:
            out, masks, weights, loss, mask_loss, presence_loss = self._forward(data, True)
            scaled = loss / replicas_in_sync()
        variables = self.network.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        return self._update(masks, weights, out, loss, mask_loss, presence_loss)

    def test_step(self, data):
        out, masks, weights, loss, mask_loss, presence_loss = self._forward(data, False)
        return self._update(masks, weights, out, loss, mask_loss, presence_loss)

    def _update(self, masks, weights, out, loss, mask_loss, presence_loss):
        self.loss_tracker.update_state(loss)
        self.mask_tracker.update_state(mask_loss)
        self.presence_tracker.update_state(presence_loss)
        self.jaccard.update_state(masks, out["masks"], sample_weight=weights)
        return {m.name: m.result() for m in self.metrics}


@method.register
class Multitask(Method):
    """ISIC 2018 Task 2: five attribute masks and their presence from one VGG19 network.

    Data: an ISIC folder with Task 2 masks, a manifest CSV with `attr_<name>`
    columns, or the synthetic dataset; missing annotations follow SMILE's flags.
    Inputs are normalised with the ImageNet statistics. `model.keras` is the
    network `{"masks", "presence"}` with the best validation pooled Jaccard.
    """

    name = "multitask"
    task = "attributes"
    monitor = "jaccard"
    resume_keys = ("data.image_size", "data.crop_size", "model.encoder_filters",
                   "model.filters", "model.batch_norm", "smile.simulate_missing")

    def check(self):
        check_model_name(self.cfg, "attribute_net")
        size = self.cfg.data.crop_size or self.cfg.data.image_size
        if size % attributes.SIZE_MULTIPLE:
            raise ConfigError(f"`data.image_size`/`data.crop_size` ({size}) must be a multiple "
                              f"of {attributes.SIZE_MULTIPLE} for the VGG19 features")
        if self.cfg.attributes.init_from:
            attributes.init_source(self.cfg.attributes.init_from)  # before anything is written

    def manifest(self):
        cfg = self.cfg
        df = pipeline.assign_splits(attributes.manifest(cfg), val_fraction=cfg.data.val_fraction,
                                    seed=cfg.seed)
        if cfg.smile.simulate_missing:
            df = missing.drop_annotations(df, ATTRIBUTES, cfg.smile.simulate_missing, cfg.seed,
                                          rows=df["split"].to_numpy() == "train")
        if not (df["split"] == "train").any():
            raise DataError(f"{cfg.data.source}: no training images left after the "
                            "validation split")
        return df, []

    def prepare(self, data):
        data.mean, data.std = pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD
        self.cfg = self.cfg.override({"data.mean": list(data.mean), "data.std": list(data.std)})

    def stages(self, data):
        return [Stage(attributes.datasets(self.cfg, data.train_df, True), self.cfg.train.epochs)]

    def val_dataset(self, data, keep, batch_size):
        return attributes.datasets(self.cfg, data.val_df.iloc[:keep].reset_index(drop=True),
                                   False, batch_size)

    def build(self, data, steps_per_epoch):
        cfg, m = self.cfg, self.cfg.model
        size = cfg.data.crop_size or cfg.data.image_size
        network = registry.build(
            "attribute_net", input_shape=(size, size, 3), encoder_filters=m.encoder_filters,
            filters=m.filters, batch_norm=m.batch_norm, encoder_weights=m.encoder_weights or None,
        )
        model = MultitaskTrainer(network, mask_weight=cfg.attributes.mask_weight,
                                 presence_weight=cfg.attributes.presence_weight,
                                 threshold=cfg.train.threshold)
        model.compile(optimizer=make_optimizer(cfg, steps_per_epoch),
                      jit_compile=cfg.train.jit_compile == "true")
        # Built here, in the strategy scope, before `fit` (keras#20164).
        model.optimizer.build(network.trainable_variables)
        return model

    def after_build(self, model):
        if self.cfg.attributes.init_from and not self.resuming:
            # A resumed run restores its own trained weights instead (RunBackup).
            attributes.init_encoder(model.network, self.cfg.attributes.init_from)

    def describe(self, model, data):
        known = {a: int(data.train_df[f"annotated_{a}"].sum()) for a in ATTRIBUTES}
        return (f"training the multitask VGG19 attribute network "
                f"({model.network.count_params():,} parameters) on {len(data.train_df)} images "
                "(annotated: " + ", ".join(f"{a} {n}" for a, n in known.items())
                + f"), validating on {len(data.val_df)}")

    def final_metrics(self, best, val_ds, data, run_dir):
        if val_ds is None:
            return {}
        return attributes.score(best, val_ds, self.cfg.train.threshold)
