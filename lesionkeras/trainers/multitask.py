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

import keras
import tensorflow as tf
from keras import ops

from lesionkeras.classify.metrics import PooledJaccard
from lesionkeras.distribute import replicas_in_sync


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
    masks, logits = ops.cast(masks, "float32"), ops.cast(logits, "float32")
    weights = ops.cast(weights, "float32")
    per = ops.maximum(logits, 0.0) - logits * masks + ops.softplus(-ops.abs(logits))
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
        # The wrapped functional network is built; so is this wrapper (BackupAndRestore).
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
