"""`--method meta`: pixel-wise meta-reweighting of noisy masks.

Mirikharaji, Yan, Hamarneh, "Learning to Segment Skin Lesions from Noisy
Annotations" (MICCAI DART 2019), eq. 6-9, extending Ren et al., "Learning to
Reweight Examples for Robust Deep Learning" (ICML 2018). Every step:

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


import dataclasses
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from lesionkeras import config
from lesionkeras import losses
from lesionkeras import metrics as metrics_lib
from lesionkeras.data import pipeline
from lesionkeras.data.noise import simulate_noise
from lesionkeras.data import layout, sources
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.models.blocks import make_second_order_exact
from lesionkeras.models.second_order import second_order_blockers
from lesionkeras.training import method, segmentation
from lesionkeras.training.method import Stage, WrapsNetwork
from lesionkeras.training.segmentation import SegmentationMethod

@dataclasses.dataclass(frozen=True)
class MetaConfig:
    meta_grad: str = config.field(
        "forward",
        "meta: how eq. 7 is differentiated: `forward` (closed form at W0 = 0, one "
        "forward-mode pass; the default, faster and lighter) or `nested` tapes (the reference).",
        choices=("nested", "forward"), flag=True)
    clean_batch_size: int = config.field(10, "meta: clean images per step (paper: 10).", minimum=1, flag=True)
    simulate_noise: str = config.field(
        "",
        "meta: experiment mode, replace the masks of all training images but `clean_count` "
        "by this polygon noise (`7-vertex`, `3-vertex`, `4-axis`, `maximal`; empty = off).",
        choices=("", "7-vertex", "3-vertex", "4-axis", "maximal"), flag=True)
    clean_count: int = config.field(
        16, "meta: clean training images kept by `simulate_noise`.", minimum=1, flag=True)
    clean_in_noisy: bool = config.field(
        True,
        "meta, image-reweight, finetune: the clean training images also train in the noisy "
        "stream, with their clean masks (the paper's D^c in D^n); false = noisy images only.", flag=True)
    noisy_data: str = config.field("", "meta: folder of images with noisy masks (real use).", flag=True)
    clean_data: str = config.field(
        "", "meta: folder of images with clean masks (real use; also gives the validation split).", flag=True)
    finetune_epochs: int = config.field(
        10, "finetune (and meta with `then_finetune`): epochs on the clean images after "
        "`train.epochs` on the noisy ones.",
        minimum=1, flag=True)
    then_finetune: bool = config.field(
        False, "meta, image-reweight: after `train.epochs` of meta-training, fine-tune on the "
        "clean images for `finetune_epochs` at `finetune_lr` (the fine-tuning baseline's stage).", flag=True)
    finetune_lr: float = config.field(
        0.0, "finetune: learning rate of the clean stage (0 = train.lr / 10).", minimum=0.0, flag=True)
    weight_image_every: int = config.field(
        5, "meta: write the weight maps (and with simulated noise the Fig. 3 overlay) to "
        "TensorBoard every N epochs (0 = never).", minimum=0,
    )


config.register_section("meta", MetaConfig)


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
        # Eq. 7 differentiates a gradient; the fused batch-norm kernel's second
        # derivative is wrong on degenerate channels (see make_second_order_exact).
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


# ---------------------------------------------------------------------- #
# Building, data
# ---------------------------------------------------------------------- #


def build(cfg, steps_per_epoch=None):
    """The compiled `MetaReweighter` for `cfg` (call inside the strategy scope).

    `method = "meta"` weighs pixels, `method = "image-reweight"` images.
    """
    if cfg.train.mixed_precision:
        raise ConfigError(
            f"`train.mixed_precision` is not supported by `method = \"{cfg.method}\"`"
        )
    network = segmentation.build_model(cfg)
    optimizer = segmentation.make_optimizer(cfg.train, steps_per_epoch)
    # The network is compiled too (same optimiser), so that its saved
    # checkpoints load and evaluate as the baseline's do.
    network.compile(
        optimizer=optimizer,
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics_lib.default_metrics(threshold=cfg.train.threshold, from_logits=True),
    )
    granularity = "image" if cfg.method == "image-reweight" else "pixel"
    model = MetaReweighter(
        network, meta_grad=cfg.meta.meta_grad, granularity=granularity,
        threshold=cfg.train.threshold,
    )
    check_second_order(network, cfg)
    model.compile(optimizer=optimizer, jit_compile=False)
    model.optimizer.build(network.trainable_variables)
    return model


def check_second_order(network, cfg):
    """Refuses a network whose second derivatives TensorFlow would drop or get wrong.

    Eq. 7 differentiates the training gradient; an op without an exact second
    derivative (e.g. Keras' bilinear `UpSampling2D`) would silently corrupt the
    weights instead of failing.

    Raises:
        ConfigError: naming the first such layer and op.
    """
    blockers = second_order_blockers(network)
    if blockers:
        layer, op, reason = blockers[0]
        more = f" (and {len(blockers) - 1} more)" if len(blockers) > 1 else ""
        raise ConfigError(
            f"model `{cfg.model_name}` cannot be trained with `method = \"{cfg.method}\"`: "
            f"layer `{layer}` runs `{op}`{more}, whose derivative eq. 7 needs, but {reason}; "
            "build it from layers with exact second derivatives (e.g. "
            "lesionkeras.models.layers.BilinearUpSampling2D for bilinear up-sampling)"
        )


def load_manifest(cfg):
    """Real use (`meta.noisy_data` + `meta.clean_data`), else None.

    Rows of the noisy folder train the noisy stream; the clean folder is
    split by `data.val_fraction` (seeded) into the clean stream and the
    validation set (noisy masks cannot validate).
    """
    m = cfg.meta
    if not (m.noisy_data or m.clean_data):
        return None
    if not (m.noisy_data and m.clean_data):
        raise ConfigError("`meta.noisy_data` and `meta.clean_data` go together; give both")
    noisy = layout.build_manifest(m.noisy_data)
    clean = sources.load_manifest(m.clean_data)
    noisy = noisy.assign(id="noisy/" + noisy["id"], clean=False, split="train")
    clean = pipeline.assign_splits(
        clean.assign(split=""), val_fraction=cfg.data.val_fraction, seed=cfg.seed
    )
    clean = clean.assign(id="clean/" + clean["id"], clean=True)
    if cfg.data.limit:
        noisy = noisy.iloc[: cfg.data.limit]
    return pd.concat([noisy, clean], ignore_index=True)


def prepare_manifest(cfg, df):
    """Marks clean/noisy training rows (simulated noise or real folders)."""
    m = cfg.meta
    if m.simulate_noise:
        if m.noisy_data or m.clean_data:
            raise ConfigError("`meta.simulate_noise` cannot be combined with `meta.noisy_data`")
        return simulate_noise(df, m.simulate_noise, m.clean_count, cfg.seed)
    if not (m.noisy_data or m.clean_data):
        raise ConfigError(
            f"`method = \"{cfg.method}\"` needs clean and noisy masks: give `--simulate-noise LEVEL "
            "--clean-count K`, or `--noisy-data DIR --clean-data DIR`"
        )
    return df


def _clean_stream(decoded, *, batch_size, mean, std, augment, crop_size, seed):
    """Shuffled clean batches, repeating forever (full batches only)."""
    return pipeline.make_dataset(
        decoded, batch_size=batch_size, mean=mean, std=std, training=True, augment=augment,
        crop_size=crop_size, seed=seed, repeat=True,
    )


def split_streams(cfg, train_df):
    """The training rows of the noisy stream and of the clean (meta) set.

    The paper's protocol (Mirikharaji et al. 2019, sec. 2: D^c is a subset of
    D^n) keeps the clean images in the noisy training stream, with their clean
    masks, besides forming the clean set; `meta.clean_in_noisy = false` trains
    the noisy stream on the noisy images alone.

    Returns:
        (noisy_df, clean_df), both with a fresh index.

    Raises:
        DataError: no noisy or no clean training image.
    """
    is_clean = train_df["clean"].astype(bool)
    n_noisy, n_clean = int((~is_clean).sum()), int(is_clean.sum())
    if not n_noisy or not n_clean:
        raise DataError(
            f"{cfg.data.source}: `method = \"{cfg.method}\"` needs both noisy and clean training "
            f"images (found {n_noisy} noisy, {n_clean} clean)"
        )
    noisy_df = train_df if cfg.meta.clean_in_noisy else train_df[~is_clean]
    return noisy_df.reset_index(drop=True), train_df[is_clean].reset_index(drop=True)


def stages(cfg, train_df, mean, std):
    """Meta-training for `train.epochs`; with `meta.then_finetune`, then the clean stage.

    The clean stage is the fine-tuning baseline's (`method = "finetune"`): plain BCE
    steps on the clean training images for `meta.finetune_epochs` epochs at
    `meta.finetune_lr` (default `train.lr / 10`), continuing the same optimiser.

    Returns:
        list of `Stage` for the run loop.
    """
    out = [Stage(train_dataset(cfg, train_df, mean, std), cfg.train.epochs)]
    if cfg.meta.then_finetune:
        clean = plain_train_dataset(cfg, split_streams(cfg, train_df)[1], mean, std).map(
            lambda x, y: {"noisy_image": x, "noisy_mask": y}
        )
        lr = cfg.meta.finetune_lr or cfg.train.lr / 10.0
        out.append(Stage(clean, cfg.meta.finetune_epochs, lr, _to_plain_steps))
    return out


def plain_train_dataset(cfg, df, mean, std):
    """Training batches of `df` as plain supervised training sees them (`train.batch_size`)."""
    d = cfg.data
    return pipeline.make_dataset(
        pipeline.decoded_dataset(df, d.image_size, cache=d.cache, color_constancy=d.color_constancy),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
    )


def _to_plain_steps(model):
    model.plain = True
    model.train_function = None  # traced anew with plain steps


def train_dataset(cfg, train_df, mean, std):
    """Zipped noisy batches (`train.batch_size`) and repeating clean batches."""
    d = cfg.data
    noisy_df, clean_df = split_streams(cfg, train_df)
    noisy = pipeline.make_dataset(
        pipeline.decoded_dataset(
            noisy_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
        ),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
    )
    clean = _clean_stream(
        pipeline.decoded_dataset(
            clean_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
        ),
        batch_size=cfg.meta.clean_batch_size, mean=mean, std=std, augment=cfg.augment,
        crop_size=d.crop_size, seed=cfg.seed + 1,
    )
    both = tf.data.Dataset.zip((noisy, clean)).map(
        lambda a, b: {
            "noisy_image": a[0], "noisy_mask": a[1], "clean_image": b[0], "clean_mask": b[1],
        }
    )
    return both.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------- #
# TensorBoard: weight maps, Fig. 3 overlay
# ---------------------------------------------------------------------- #


def weight_overlay(weights, noisy_masks, true_masks, low=0.1):
    """The paper's Fig. 3 colouring of one batch's weights.

    Mislabelled pixels (noisy mask != true mask) are blue, low-weight pixels
    green, so cyan means "mislabelled and ignored". A weight is low below
    `low` times the uniform weight 1 / (pixels in the batch).

    Args:
        weights: float array (B, H, W, 1). Eq. 8 weights of the batch.
        noisy_masks: array (B, H, W, 1). The masks trained on.
        true_masks: array (B, H, W, 1). The clean masks.
        low: float. Fraction of the uniform weight below which a weight is low.
            Defaults to 0.1.

    Returns:
        uint8 array (B, H, W, 3).
    """
    weights = np.asarray(weights, np.float32)
    wrong = (np.asarray(noisy_masks) > 0.5) != (np.asarray(true_masks) > 0.5)
    small = weights < low / weights.size
    rgb = np.zeros(weights.shape[:3] + (3,), np.uint8)
    rgb[..., 1] = 255 * small[..., 0]
    rgb[..., 2] = 255 * wrong[..., 0]
    return rgb


def weight_split(weights, noisy_masks, true_masks):
    """Mean weight on mislabelled and on correctly labelled pixels, times the pixel count.

    Scaled so that 1 is the uniform weight: below 1, the method trusts those
    pixels less than average. NaN where a group is empty.

    Returns:
        (float, float): (mislabelled, correct).
    """
    weights = np.asarray(weights, np.float64)
    wrong = (np.asarray(noisy_masks) > 0.5) != (np.asarray(true_masks) > 0.5)
    scaled = weights * weights.size
    mean = lambda sel: float(scaled[sel].mean()) if sel.any() else float("nan")  # noqa: E731
    return mean(wrong), mean(~wrong)


class WeightMaps(keras.callbacks.Callback):
    """Writes the meta-learned weights of a fixed batch to TensorBoard.

    Every `every` epochs (and after the first) the weights of eq. 8 are
    computed, changing nothing, for a fixed noisy batch against a fixed clean
    batch, and written to `logdir/weights`: `weights/maps` (each image's
    weights scaled to its maximum), and, when the true masks of the noisy
    images are known (simulated noise), `weights/fig3_overlay` (see
    `weight_overlay`) and the scalars `weights/mislabelled_mean` and
    `weights/correct_mean` (see `weight_split`).

    Args:
        logdir: str. TensorBoard directory of the run.
        noisy: (images, masks) float32 arrays of the fixed noisy batch, normalised.
        clean: (images, masks) float32 arrays of the fixed clean batch, normalised.
        true_masks: float32 array or None. Clean masks of the noisy batch.
        every: int. Epochs between writes. Defaults to 5.
    """

    def __init__(self, logdir, noisy, clean, true_masks=None, every=5):
        super().__init__()
        self.logdir = str(logdir) + "/weights"
        self.noisy, self.clean, self.true_masks = noisy, clean, true_masks
        self.every = every
        self.history = []  # (epoch, mislabelled mean, correct mean)
        self._writer = None
        self._fn = None

    def weights(self):
        """The eq. 8 weights of the fixed batch under the current model."""
        if self._fn is None:
            self._fn = tf.function(self.model.meta_weights)
        out = self._fn(*self.noisy, *self.clean)
        return out["weights"].numpy()

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch % self.every and epoch != 0):
            return
        w = self.weights()
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        peak = w.max(axis=(1, 2, 3), keepdims=True)
        maps = np.divide(w, peak, out=np.zeros_like(w), where=peak > 0)
        if maps.shape[1] == 1:  # one weight per image: a flat tile per image
            maps = np.broadcast_to(maps, (len(w),) + self.noisy[1].shape[1:])
        with self._writer.as_default():
            tf.summary.image("weights/maps", maps, step=epoch, max_outputs=len(w))
            if self.true_masks is not None and w.shape[1] > 1:
                overlay = weight_overlay(w, self.noisy[1], self.true_masks)
                tf.summary.image("weights/fig3_overlay", overlay, step=epoch, max_outputs=len(w))
                wrong, right = weight_split(w, self.noisy[1], self.true_masks)
                tf.summary.scalar("weights/mislabelled_mean", wrong, step=epoch)
                tf.summary.scalar("weights/correct_mean", right, step=epoch)
                self.history.append((epoch, wrong, right))
        self._writer.flush()


def _fixed_batch(df, count, cfg, mean, std, column="mask"):
    rows = df.iloc[:count].reset_index(drop=True)
    rows = rows.assign(mask=rows[column])
    pairs = list(pipeline.decoded_dataset(
        rows, cfg.data.image_size, cache=False, color_constancy=cfg.data.color_constancy
    ))
    images = np.stack([p[0].numpy() for p in pairs]).astype(np.float32)
    masks = np.stack([p[1].numpy() for p in pairs]).astype(np.float32)
    if cfg.data.crop_size:
        c, off = cfg.data.crop_size, (images.shape[1] - cfg.data.crop_size) // 2
        images, masks = images[:, off:off + c, off:off + c], masks[:, off:off + c, off:off + c]
    return pipeline.normalizer(mean, std)(images).numpy(), masks


def callbacks(cfg, train_df=None, mean=None, std=None):
    """The `WeightMaps` callback of the run (none if `meta.weight_image_every` is 0)."""
    if not cfg.meta.weight_image_every or train_df is None:
        return []
    is_clean = train_df["clean"].astype(bool)
    noisy_df, clean_df = train_df[~is_clean], train_df[is_clean]
    if noisy_df.empty or clean_df.empty:
        return []  # train_dataset reports it
    count = min(cfg.train.image_count, len(noisy_df))
    noisy = _fixed_batch(noisy_df, count, cfg, mean, std)
    clean = _fixed_batch(clean_df, min(cfg.meta.clean_batch_size, len(clean_df)), cfg, mean, std)
    true_masks = None
    if "true_mask" in noisy_df:
        true_masks = _fixed_batch(noisy_df, count, cfg, mean, std, column="true_mask")[1]
    logdir = (cfg.out or ".") + "/tensorboard"
    return [WeightMaps(logdir, noisy, clean, true_masks, every=cfg.meta.weight_image_every)]


@method.register
class Reweight(SegmentationMethod):
    """Meta-learned pixel weights (`meta`, Mirikharaji et al. 2019, eq. 6-9) or image
    weights (`image-reweight`, Ren et al. 2018), from a small clean set."""

    names = ("meta", "image-reweight")

    def load_manifest(self):
        return load_manifest(self.cfg)

    def prepare_manifest(self, df):
        return prepare_manifest(self.cfg, df)

    def stages(self, data):
        return stages(self.cfg, data.train_df, data.mean, data.std)

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def method_callbacks(self, data):
        return callbacks(self.cfg, data.train_df, data.mean, data.std)
