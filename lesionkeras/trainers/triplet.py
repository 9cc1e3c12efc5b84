"""Cross-entropy + triplet-loss classification (Xue et al. 2018, ISIC 2018 report, section 3).

How the two losses alternate (`classify.triplet_mode`):

* `alternate_batch` (default): of every `classify.triplet_every` training steps
  the last one minimises the triplet loss on the embedding, the others the
  cross-entropy of the classifier (every = 2: CE, triplet, CE, triplet, ...).
* `alternate_epoch`: the same by epochs: every `triplet_every`-th epoch is a
  triplet epoch (the report regenerates triplets every 10 epochs).
* `joint`: every step minimises CE + `triplet_weight` x triplet.

In a triplet step the classifier gets no gradient (with SGD momentum it still
coasts on the velocity of the earlier CE steps). Triplets are mined online in
every batch (`lesionkeras.classify.triplet`), so they are regenerated at every step.
`--method softmax` is the same model trained with cross-entropy only (the
triplet loss is still computed and logged, never minimised): the paper's
"CE loss only" baseline.
"""

import keras
import tensorflow as tf
from keras import ops

from lesionkeras.classify.metrics import BalancedAccuracy
from lesionkeras.classify.triplet import triplet_loss

MODES = ("alternate_batch", "alternate_epoch", "joint")


class TripletTrainer(keras.Model):
    """Wraps a `{"embedding", "logits"}` network with the alternating CE / triplet step.

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

    @property
    def metrics(self):
        return [self.loss_tracker, self.ce_tracker, self.triplet_tracker, self.count_tracker,
                self.balanced]

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    def _forward(self, x, y, training):
        out = self.network(x, training=training)
        logits = ops.cast(out["logits"], "float32")
        ce = ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        trip, count = triplet_loss(
            out["embedding"], y, margin=self.margin, majority=self.majority,
            negatives=self.negatives, normalize=self.normalize,
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
        variables = self.network.trainable_variables
        grads = tape.gradient(loss, variables)
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


class SaveNetwork(keras.callbacks.Callback):
    """Saves the wrapped network: `best` when `monitor` improves, `last` every epoch.

    The files hold only the functional network (standard layers and keras-hub's
    backbone), so they load with `keras.saving.load_model` and no custom objects.
    """

    def __init__(self, best, last, monitor="val_balanced_accuracy"):
        super().__init__()
        self.best_path, self.last_path, self.monitor = str(best), str(last), monitor
        self.best = -float("inf")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        value = logs.get(self.monitor, logs.get(self.monitor.replace("val_", "")))
        if value is not None and float(value) > self.best:
            self.best = float(value)
            self.model.network.save(self.best_path)
        self.model.network.save(self.last_path)
