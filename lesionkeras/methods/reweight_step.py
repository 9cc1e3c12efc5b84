"""The meta-reweighting step (eq. 6-9): the wrapper model `MetaReweighter` and the weight normalisation of eq. 8.

Mirikharaji, Yan, Hamarneh 2019, eq. 6-9, extending Ren et al. 2018. Every step:

1. per-pixel BCE `l` on a noisy batch, weighted by `W0 = 0` (eq. 3);
2. one virtual SGD step `theta_hat = theta - alpha * grad_theta sum(W0 * l)` with
   the optimiser's current learning rate alpha (eq. 6);
3. the mean BCE of a clean batch at `theta_hat` and its gradient with respect
   to the pixel weights, `U = -eta * dLc/dW` (eq. 7, eta = alpha);
4. `W = max(0, U) / sum(max(0, U))` over the whole (global) noisy batch (eq. 8);
   when every weight is 0 the step updates nothing and `zero_weight_steps` counts it;
5. the real update of theta on `sum(W * l)` with the configured optimiser (eq. 9).

`meta_grad="nested"` gets eq. 7 by differentiating through the virtual step
(nested tapes, the virtual pass through `stateless_call`). `meta_grad="forward"`
uses the closed form at `W0 = 0`: `dLc/dw_p = -alpha * <grad l_p, grad Lc>`, the
directional derivative of each pixel's loss along the clean gradient, one
`tf.autodiff.ForwardAccumulator` pass and no second-order graph.

`granularity="image"` is `--method image-reweight`, Ren et al.'s L2RW: the
same step with one weight per image on the image's mean pixel loss instead
of one weight per pixel.

Batch norm: the noisy forward pass at `theta` is the real step's forward pass,
so its moving-statistics update is applied once, after the real update; the
clean pass at `theta_hat` is virtual and its statistics are discarded.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from lesionkeras import losses
from lesionkeras import metrics as metrics_lib
from lesionkeras.models.blocks import make_second_order_exact
from lesionkeras.training.method import WrapsNetwork


META_GRADS = ("nested", "forward")
GRANULARITIES = ("pixel", "image")


# Per-pixel sigmoid cross-entropy from logits, float32 (the package's one BCE).
pixel_bce = losses.pixel_binary_crossentropy


def normalize_weights(u):
    """Eq. 8: rectify, then divide by the sum over the global batch.

    Under a distribution strategy the sum runs over every replica's batch, so
    the weights of the whole global batch sum to 1.

    Args:
        u: float32 tensor (B, H, W, K). Unnormalised weights `U` of eq. 7.

    Returns:
        (weights, any_positive): weights >= 0 summing to 1 over the global
        batch (all 0 if no entry of `u` is positive), and a bool scalar.
    """
    u = tf.nn.relu(u)
    total = tf.reduce_sum(u)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, total)
    positive = total > 0.0
    return tf.math.divide_no_nan(u, total), positive


def _all_reduce_mean(tensors):
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return tensors
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tensors)


@keras.saving.register_keras_serializable(package="lesionkeras")
class MetaReweighter(WrapsNetwork, keras.Model):
    """Trains a segmentation network with meta-learned pixel weights.

    Wraps `network` (logits out); `save` writes the plain network, so the
    `.keras` checkpoints are ordinary segmentation models.

    Args:
        network: keras.Model. Images (B, H, W, 3) -> logits (B, H, W, 1).
        meta_grad: str. `"nested"` (reference) or `"forward"`. Defaults to `"nested"`;
            the config (`meta.meta_grad`) defaults to `"forward"`, which gives the
            same weights faster.
        granularity: str. `"pixel"` (one weight per pixel, Mirikharaji et al.
            2019) or `"image"` (one weight per image on its mean pixel loss,
            Ren et al. 2018). Defaults to `"pixel"`.
        threshold: float. Threshold of the Dice/Jaccard metrics. Defaults to 0.5.

    Example:

    ```python
    trainer = MetaReweighter(build_unet((64, 64, 3), filters=8, depth=2), meta_grad="forward")
    trainer.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9))
    trainer.fit(ds)  # elements: {"noisy_image", "noisy_mask", "clean_image", "clean_mask"}
    ```
    """

    def __init__(self, network, meta_grad="nested", granularity="pixel", threshold=0.5, **kwargs):
        super().__init__(**kwargs)
        if meta_grad not in META_GRADS:
            raise ValueError(
                f"`meta_grad` must be one of {META_GRADS}. Received: meta_grad={meta_grad!r}"
            )
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"`granularity` must be one of {GRANULARITIES}. "
                f"Received: granularity={granularity!r}"
            )
        # Eq. 7 differentiates a gradient: batch norm and bilinear resizing must
        # run their exact paths (see make_second_order_exact).
        make_second_order_exact(network)
        self.network = network
        # True during a clean fine-tuning stage (`meta.then_finetune`): plain steps.
        self.plain = False
        self.meta_grad = meta_grad
        self.granularity = granularity
        self.threshold = threshold
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.noisy_loss_tracker = keras.metrics.Mean(name="noisy_loss")
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.zero_fraction_tracker = keras.metrics.Mean(name="zero_weight_fraction")
        self.zero_steps_tracker = keras.metrics.Sum(name="zero_weight_steps")
        self.seg_metrics = metrics_lib.default_metrics(threshold=threshold, from_logits=True)
        # The wrapped functional network is built; so is this wrapper.
        self.built = True

    @property
    def metrics(self):
        return [
            self.loss_tracker, self.noisy_loss_tracker, self.clean_loss_tracker,
            self.zero_fraction_tracker, self.zero_steps_tracker, *self.seg_metrics,
        ]


    def get_config(self):
        return {
            "network": keras.saving.serialize_keras_object(self.network),
            "meta_grad": self.meta_grad,
            "granularity": self.granularity,
            "threshold": self.threshold,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)

    # ------------------------------------------------------------------ #
    # Eq. 6-8
    # ------------------------------------------------------------------ #

    def _learning_rate(self):
        return tf.cast(tf.convert_to_tensor(self.optimizer.learning_rate), tf.float32)

    def _example_loss(self, pixel_loss):
        """What one weight multiplies: each pixel's loss, or each image's mean."""
        if self.granularity == "pixel":
            return pixel_loss
        return tf.reduce_mean(pixel_loss, axis=[1, 2, 3], keepdims=True)

    def _clean_gradient(self, trainable, non_trainable, x_clean, y_clean):
        """Eq. 2 at `trainable` and its gradient, averaged over replicas (zeros for unused)."""
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            clean_loss = self._clean_loss(trainable, non_trainable, x_clean, y_clean)
        grads = tape.gradient(clean_loss, trainable)
        grads = [tf.zeros_like(t) if g is None else g for t, g in zip(trainable, grads)]
        return clean_loss, _all_reduce_mean(grads)

    def _clean_loss(self, trainable, non_trainable, x_clean, y_clean):
        # Training-mode pass (batch statistics); its non-trainable updates are
        # returned by stateless_call and dropped here: this pass is virtual.
        logits, _ = self.network.stateless_call(trainable, non_trainable, x_clean, training=True)
        return tf.reduce_mean(pixel_bce(y_clean, logits))

    def meta_weights(self, x_noisy, y_noisy, x_clean, y_clean):
        """Eq. 6-8 for one batch, changing no variable.

        Returns:
            dict of tensors: `weights` (B, H, W, 1), or (B, 1, 1, 1) with
            `granularity="image"`, >= 0, summing to 1 over the global batch;
            `scores`, the unnormalised `U` of eq. 7 (same shape, any sign);
            `any_positive` (bool); `clean_loss` (eq. 2 at theta_hat).
        """
        out, _ = self._meta_pass(x_noisy, y_noisy, x_clean, y_clean)
        return {k: out[k] for k in ("weights", "scores", "any_positive", "clean_loss")}

    def _meta_pass(self, x_noisy, y_noisy, x_clean, y_clean):
        """Eq. 6-8, keeping what the real step needs.

        Returns:
            (dict, tape): the dict holds `weights`, `any_positive`, `pixel_loss`
            (per-pixel BCE of the noisy batch), `example_loss` (what the weights
            multiply; both functions of `theta` recorded on `tape`), `clean_loss`, `non_trainable` (the batch-norm updates of
            the noisy pass), `theta` and `logits`.
        """
        net = self.network
        variables = net.trainable_variables
        theta = [tf.convert_to_tensor(v) for v in variables]
        non_trainable = [tf.convert_to_tensor(v) for v in net.non_trainable_variables]
        # float32, or float64 for a float64 network (the tests' numerical references).
        dtype = tf.float64 if theta[0].dtype == tf.float64 else tf.float32
        alpha = tf.cast(self._learning_rate(), dtype)
        eta = alpha
        if self.meta_grad == "nested":
            # One zero weight per pixel, or per image (the shape of the example loss).
            w0 = self._example_loss(tf.zeros_like(tf.cast(y_noisy, dtype)))
            # The outer tape records the inner gradient, so the virtual step
            # (eq. 6) can be differentiated with respect to the weights.
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(theta)
                tape.watch(w0)
                with tf.GradientTape() as inner:
                    inner.watch(theta)
                    logits, new_nt = net.stateless_call(
                        theta, non_trainable, x_noisy, training=True
                    )
                    pixel_loss = pixel_bce(y_noisy, logits)
                    example_loss = self._example_loss(pixel_loss)
                    weighted = tf.reduce_sum(w0 * example_loss)
                grads = inner.gradient(weighted, theta)
                grads = [tf.zeros_like(t) if g is None else g for t, g in zip(theta, grads)]
                theta_hat = [t - alpha * g for t, g in zip(theta, grads)]
            clean_loss, g_clean = self._clean_gradient(theta_hat, non_trainable, x_clean, y_clean)
            # Chain rule through the virtual step: dLc/dW = (dtheta_hat/dW)^T dLc/dtheta_hat.
            grad_w = tape.gradient(theta_hat, w0, output_gradients=g_clean)
            u = -eta * grad_w
        else:
            clean_loss, g_clean = self._clean_gradient(theta, non_trainable, x_clean, y_clean)
            with tf.autodiff.ForwardAccumulator(theta, g_clean) as acc:
                with tf.GradientTape(persistent=True) as tape:
                    tape.watch(theta)
                    logits, new_nt = net.stateless_call(
                        theta, non_trainable, x_noisy, training=True
                    )
                    pixel_loss = pixel_bce(y_noisy, logits)
                    example_loss = self._example_loss(pixel_loss)
                directional = acc.jvp(example_loss, unconnected_gradients="zero")
            # At W0 = 0, theta_hat = theta - alpha * sum_p w_p grad l_p, so
            # dLc/dw_p = -alpha <grad l_p, grad Lc> and U = eta * alpha * directional.
            u = eta * alpha * directional
        u = tf.stop_gradient(u)
        weights, positive = normalize_weights(u)
        out = {
            "scores": u, "weights": weights, "any_positive": positive, "pixel_loss": pixel_loss,
            "example_loss": example_loss,
            "clean_loss": clean_loss, "non_trainable": new_nt, "theta": theta,
            "logits": logits,
        }
        return out, tape

    # ------------------------------------------------------------------ #
    # Eq. 9
    # ------------------------------------------------------------------ #

    def train_step(self, data):
        data, _, _ = keras.utils.unpack_x_y_sample_weight(data)  # fit: dict; train_on_batch: (dict,)
        if self.plain:
            return self._plain_step(data["noisy_image"], data["noisy_mask"])
        x_noisy, y_noisy = data["noisy_image"], data["noisy_mask"]
        x_clean, y_clean = data["clean_image"], data["clean_mask"]
        out, tape = self._meta_pass(x_noisy, y_noisy, x_clean, y_clean)
        weights = out["weights"]
        with tape:
            loss = tf.reduce_sum(weights * out["example_loss"])
        grads = tape.gradient(loss, out["theta"])
        del tape
        variables = self.network.trainable_variables
        grads = [tf.zeros_like(v) if g is None else g for v, g in zip(variables, grads)]

        # All weights 0: the step updates nothing (no momentum, no weight decay).
        self._apply_if(out["any_positive"], grads, variables)
        for var, value in zip(self.network.non_trainable_variables, out["non_trainable"]):
            var.assign(value)

        # Global batch loss: each replica holds its share of the weighted sum.
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        self.loss_tracker.update_state(loss * replicas)
        self.noisy_loss_tracker.update_state(tf.reduce_mean(out["pixel_loss"]))
        self.clean_loss_tracker.update_state(out["clean_loss"])
        self.zero_fraction_tracker.update_state(
            tf.reduce_mean(tf.cast(weights <= 0.0, tf.float32))
        )
        self.zero_steps_tracker.update_state(
            tf.cast(tf.logical_not(out["any_positive"]), tf.float32) / replicas
        )
        for m in self.seg_metrics:
            m.update_state(y_noisy, out["logits"])
        return {m.name: m.result() for m in self.metrics}

    def _plain_step(self, x, y):
        """Plain training on mean BCE (the clean fine-tuning stage after meta-training)."""
        variables = self.network.trainable_variables
        with tf.GradientTape() as tape:
            logits = self.network(x, training=True)
            loss = tf.reduce_mean(pixel_bce(y, logits))
            ctx = tf.distribute.get_replica_context()
            scaled = loss / (ctx.num_replicas_in_sync if ctx is not None else 1)
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_tracker.update_state(loss)
        self.noisy_loss_tracker.update_state(loss)
        for m in self.seg_metrics:
            m.update_state(y, logits)
        # Every key of a meta step (history.csv keeps one set of columns); the clean
        # loss and the zero-weight counts of a plain step stay 0.
        return {m.name: m.result() for m in self.metrics}

    def _apply_if(self, positive, grads, variables):
        """`optimizer.apply` when `positive`, else nothing."""

        def update():
            self.optimizer.apply(grads, variables)

        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            tf.cond(positive, update, lambda: None)
            return

        # A branch that calls merge_call (the optimiser does) cannot sit in a
        # replica-context cond, so the cond runs in cross-replica context.
        # `positive` comes from an all-reduced sum: every replica agrees.
        def cross_replica(strategy, positive):
            first = strategy.experimental_local_results(positive)[0]
            tf.cond(
                first, lambda: strategy.extended.call_for_each_replica(update), lambda: None
            )

        ctx.merge_call(cross_replica, args=(positive,))

    def test_step(self, data):
        x, y = data[0], data[1]
        logits = self.network(x, training=False)
        self.loss_tracker.update_state(tf.reduce_mean(pixel_bce(y, logits)))
        for m in self.seg_metrics:
            m.update_state(y, logits)
        return {m.name: m.result() for m in [self.loss_tracker, *self.seg_metrics]}
