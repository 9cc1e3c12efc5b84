"""The SegAN step: `SegANTrainer`, the wrapper model alternating critic and segmentor updates, and its warm-up.

Xue, Xu, Huang (ISBI 2018). Every step, on one batch:

1. the segmentor S predicts `p = sigmoid(S(x))` (the adaptive logistic f(z));
2. critic step, S fixed: the critic C *maximises* the multi-scale L1 loss
   `L = mean_i |C_i(x o p) - C_i(x o y)|` (eq. 1-2) between the features of
   the image masked by the prediction and by the truth;
3. every critic weight is clamped to [-c, c] (paper: c = 0.05);
4. segmentor step, C fixed: S *minimises* the same loss through the updated
   critic, plus, optionally, `supervised_weight` x a BCE/Dice term (off
   reproduces the paper; the authors' public code is reported not to reach
   the paper's numbers without one), plus, optionally, `hard_mining_weight` x
   the mean soft-Dice loss of the `hard_mining_count` worst images of the
   batch (the ISIC 2018 report's hard mining). During `warmup_epochs` the adversarial
   term is switched off and S learns from the supervised term alone.

Both networks see the two masked batches in one critic call, so the critic's
batch-norm statistics are those of predictions and truths together. In the
segmentor step the critic runs through `stateless_call` and its batch-norm
updates are dropped: the critic is fixed there.

Distribution: losses are per-replica means divided by the number of replicas
(the optimiser sums gradients over replicas); both optimisers are built in
`compile`, which `build` calls inside the strategy scope, before `fit`
(otherwise Keras 3 under MirroredStrategy fails with "You must feed a value
for placeholder tensor", keras-team/keras#20164).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lesionkeras import losses as losses_lib
from lesionkeras import metrics as metrics_lib
from lesionkeras.training import compat
from lesionkeras.training.distribute import replicas_in_sync
from lesionkeras.training.method import WrapsNetwork


def clamp_variables(variables, clip):
    """Clamps every variable to [-clip, clip], in replica or cross-replica context.

    Mirrored variables cannot be assigned from a replica context; the update
    runs as a merge call on every copy, as Keras' own weight decay does.
    """

    def clamp_all(strategy, variables):
        def clamp(var):
            return var.assign(tf.clip_by_value(var, -clip, clip))

        for v in variables:
            v = v.value if isinstance(v, keras.Variable) else v
            strategy.extended.update(v, clamp, group=False)

    compat.merge_call(clamp_all, variables)


@keras.saving.register_keras_serializable(package="lesionkeras")
class SegANTrainer(WrapsNetwork, compat.NoSymbolicBuildOnMultiWorker, keras.Model):
    """Trains a segmentor against a multi-scale L1 critic (SegAN).

    `save` writes the segmentor alone, so the `.keras` checkpoints are
    ordinary segmentation models for `evaluate` and `predict`.

    Args:
        network: keras.Model. The segmentor: images (B, H, W, C) -> logits (B, H, W, K).
        critic: keras.Model. Masked images (B, H, W, K * C) -> list of feature maps.
        clip: float > 0. Critic weights are clamped to [-clip, clip] after
            each critic step (paper: 0.05). Defaults to 0.05.
        supervised_loss: str. `""` (off, the paper) or a name of
            `lesionkeras.losses.get_loss`. Defaults to `""`.
        supervised_weight: float. Weight of the supervised term. Defaults to 1.0.
        threshold: float. Threshold of the segmentation metrics. Defaults to 0.5.
        hard_mining_weight: float >= 0. Weight of the hard-mining term, the
            mean soft-Dice loss of the `hard_mining_count` worst images of the
            (per-replica) batch (ISIC 2018 report); 0 is off. Defaults to 0.
        hard_mining_count: int >= 1. Images of that term. Defaults to 5.

    Example:

    ```python
    trainer = SegANTrainer(build_segan((64, 64, 3), filters=8), build_critic((64, 64, 3)))
    trainer.compile(seg_optimizer=keras.optimizers.Adam(2e-4),
                    critic_optimizer=keras.optimizers.Adam(2e-4))
    trainer.fit(ds)  # (image, mask) batches
    ```
    """

    def __init__(
        self, network, critic, clip=0.05, supervised_loss="", supervised_weight=1.0,
        threshold=0.5, hard_mining_weight=0.0, hard_mining_count=5, **kwargs,
    ):
        super().__init__(**kwargs)
        if not clip > 0:
            raise ValueError(f"`clip` must be > 0. Received: clip={clip}")
        self.network = network
        self.critic = critic
        self.clip = float(clip)
        self.supervised_loss = supervised_loss
        self.supervised_weight = float(supervised_weight)
        self.threshold = threshold
        if hard_mining_weight < 0 or hard_mining_count < 1:
            raise ValueError(
                "Expected hard_mining_weight >= 0 and hard_mining_count >= 1. Received: "
                f"hard_mining_weight={hard_mining_weight}, hard_mining_count={hard_mining_count}"
            )
        self.hard_mining_weight = float(hard_mining_weight)
        self.hard_mining_count = int(hard_mining_count)
        self._supervised = losses_lib.get_loss(supervised_loss) if supervised_loss else None
        # 1.0, or 0.0 during the warm-up epochs (set by `AdversarialWarmup`).
        self.adversarial_weight = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="adversarial_weight"
        )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.critic_tracker = keras.metrics.Mean(name="critic_loss")
        self.adversarial_tracker = keras.metrics.Mean(name="adversarial_loss")
        self.supervised_tracker = keras.metrics.Mean(name="supervised_loss")
        self.hard_mining_tracker = keras.metrics.Mean(name="hard_mining_loss")
        self.seg_metrics = metrics_lib.default_metrics(threshold=threshold, from_logits=True)
        self.critic_optimizer = None
        self.built = True

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.critic_tracker, self.adversarial_tracker]
        if self._supervised is not None:
            trackers.append(self.supervised_tracker)
        if self.hard_mining_weight:
            trackers.append(self.hard_mining_tracker)
        return [*trackers, *self.seg_metrics]

    @property
    def seg_optimizer(self):
        return self.optimizer

    def compile(self, *, seg_optimizer, critic_optimizer, jit_compile=False, **kwargs):
        """Sets and builds both optimisers (call inside the strategy scope).

        Args:
            seg_optimizer: keras.optimizers.Optimizer. Updates the segmentor;
                also `self.optimizer`, so learning-rate callbacks see it.
            critic_optimizer: keras.optimizers.Optimizer. Updates the critic.
            jit_compile: bool. XLA compilation of the step. Defaults to False.
        """
        if seg_optimizer is critic_optimizer:
            raise ValueError("`seg_optimizer` and `critic_optimizer` must be two objects.")
        super().compile(optimizer=seg_optimizer, jit_compile=jit_compile, **kwargs)
        self.critic_optimizer = critic_optimizer
        # Built here, in the caller's strategy scope, before `fit` (keras#20164).
        seg_optimizer.build(self.network.trainable_variables)
        critic_optimizer.build(self.critic.trainable_variables)


    def get_config(self):
        return {
            "network": keras.saving.serialize_keras_object(self.network),
            "critic": keras.saving.serialize_keras_object(self.critic),
            "clip": self.clip,
            "supervised_loss": self.supervised_loss,
            "supervised_weight": self.supervised_weight,
            "threshold": self.threshold,
            "hard_mining_weight": self.hard_mining_weight,
            "hard_mining_count": self.hard_mining_count,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "segmentor" in config:  # runs saved before the rename
            config["network"] = config.pop("segmentor")
        for key in ("network", "critic"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)

    # ------------------------------------------------------------------ #

    def _critic_features(self, x, probs, y, training, variables=None):
        """Critic features of `x o probs` and `x o y`, from one call on both."""
        both = tf.concat(
            [losses_lib.mask_image(x, probs), losses_lib.mask_image(x, y)], axis=0
        )
        if variables is None:
            feats = self.critic(both, training=training)
        else:
            feats, _ = self.critic.stateless_call(*variables, both, training=training)
        n = tf.shape(x)[0]
        return [f[:n] for f in feats], [f[n:] for f in feats]

    def multiscale_loss(self, x, probs, y, training=False, variables=None):
        """Batch mean of eq. 1-2 for images `x`, probabilities `probs`, truth `y`."""
        a, b = self._critic_features(x, probs, y, training, variables)
        return tf.reduce_mean(losses_lib.multiscale_l1(a, b))

    def critic_step(self, x, probs, y):
        """Updates the critic to maximise the loss (segmentor fixed), then clamps it.

        Returns:
            The loss before the update (float32 scalar, this replica's batch).
        """
        variables = self.critic.trainable_variables
        probs = tf.stop_gradient(probs)
        with tf.GradientTape() as tape:
            loss = self.multiscale_loss(x, probs, y, training=True)
            objective = -loss / replicas_in_sync()
        grads = tape.gradient(objective, variables)
        self.critic_optimizer.apply(grads, variables)
        clamp_variables(variables, self.clip)
        return loss

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.cast(y, tf.float32)
        seg_vars = self.network.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.network(x, training=True)
            probs = tf.sigmoid(tf.cast(logits, tf.float32))
        critic_loss = self.critic_step(x, probs, y)
        critic_state = (
            [tf.convert_to_tensor(v) for v in self.critic.trainable_variables],
            [tf.convert_to_tensor(v) for v in self.critic.non_trainable_variables],
        )
        with tape:
            adversarial = self.multiscale_loss(x, probs, y, training=True, variables=critic_state)
            total = self.adversarial_weight * adversarial
            if self._supervised is not None:
                supervised = self._supervised(y, logits)
                total = total + self.supervised_weight * supervised
            if self.hard_mining_weight:
                hard = losses_lib.hard_mining_dice_loss(y, probs, self.hard_mining_count)
                total = total + self.hard_mining_weight * hard
            scaled = total / replicas_in_sync()
        grads = tape.gradient(scaled, seg_vars)
        self.optimizer.apply(grads, seg_vars)

        self.loss_tracker.update_state(total)
        self.critic_tracker.update_state(critic_loss)
        self.adversarial_tracker.update_state(adversarial)
        if self._supervised is not None:
            self.supervised_tracker.update_state(supervised)
        if self.hard_mining_weight:
            self.hard_mining_tracker.update_state(hard)
        for m in self.seg_metrics:
            m.update_state(y, logits)
        return _logs(self.metrics)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        y = tf.cast(y, tf.float32)
        logits = self.network(x, training=False)
        probs = tf.sigmoid(tf.cast(logits, tf.float32))
        adversarial = self.multiscale_loss(x, probs, y, training=False)
        total = self.adversarial_weight * adversarial
        if self._supervised is not None:
            total = total + self.supervised_weight * self._supervised(y, logits)
        self.loss_tracker.update_state(total)
        self.adversarial_tracker.update_state(adversarial)
        for m in self.seg_metrics:
            m.update_state(y, logits)
        shown = [self.loss_tracker, self.adversarial_tracker, *self.seg_metrics]
        return _logs(shown)


def _logs(metrics):
    """`{name: result}`; under MultiWorkerMirroredStrategy each with a batch axis of 1.

    Keras averages multi-worker logs with `strategy.reduce("MEAN", v, axis=0)`,
    which needs an axis 0; a scalar fails ("Invalid reduction dimension 0").
    """
    logs = {m.name: m.result() for m in metrics}
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs


class AdversarialWarmup(keras.callbacks.Callback):
    """Switches the adversarial term off for the first `epochs` epochs.

    Args:
        epochs: int. Epochs trained on the supervised term alone.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = int(epochs)

    def on_epoch_begin(self, epoch, logs=None):
        self.model.adversarial_weight.assign(0.0 if epoch < self.epochs else 1.0)
