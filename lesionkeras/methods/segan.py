"""`--method segan`: adversarial training with a multi-scale L1 critic.

Xue, Xu, Huang, "Adversarial learning with multi-scale loss for skin lesion
segmentation" (ISBI 2018). Every step, on one batch:

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

import dataclasses
import keras
import numpy as np
import tensorflow as tf

from lesionkeras import config
from lesionkeras import losses as losses_lib
from lesionkeras import metrics as metrics_lib
from lesionkeras.training.callbacks import AnnealLogisticK
from lesionkeras.training import compat, method
from lesionkeras.training.method import WrapsNetwork
from lesionkeras.training.segmentation import SegmentationMethod
from lesionkeras.training.distribute import replicas_in_sync
from lesionkeras.errors import ConfigError
from lesionkeras.models.critic import build_critic
from lesionkeras.models.segan import decoder_kernels
from lesionkeras.training import segmentation


@dataclasses.dataclass(frozen=True)
class SeganConfig:
    clip: float = config.field(
        0.05, "segan: critic weights are clamped to [-clip, clip] after each critic step.",
        minimum=0.0,
    )
    critic_blocks: int = config.field(5, "segan: global-convolution blocks of the critic.", minimum=1)
    critic_filters: int = config.field(
        16, "segan: filters of the first critic block (doubled per block, at most 128).",
        minimum=1,
    )
    critic: str = config.field(
        "isbi2018",
        "segan: critic form, `isbi2018` (Xue et al. ISBI 2018: leaky ReLU, kernels of the "
        "segmentor's decoder in reverse, 7, 9, 11, ...) or `isic2018` (their ISIC 2018 report: "
        "ReLU, `critic_kernel` in every block).",
        choices=("isbi2018", "isic2018"),
    )
    critic_kernel: int = config.field(
        9, "segan: k of the `isic2018` critic's 1 x k + k x 1 convolutions.", minimum=1
    )
    k_decay: float = config.field(
        0.9, "segan: adaptive logistic k is multiplied by this every `k_every` epochs.",
        minimum=0.0,
    )
    k_every: int = config.field(25, "segan: epochs between two decays of k.", minimum=1)
    k_floor: float = config.field(0.3, "segan: smallest k.", minimum=0.0)
    supervised_loss: str = config.field(
        "",
        "segan: extra supervised term of the segmentor (empty = off, the paper).",
        choices=("", "bce", "dice", "jaccard", "bce+dice", "bce+jaccard"),
    )
    supervised_weight: float = config.field(1.0, "segan: weight of the supervised term.", minimum=0.0)
    warmup_epochs: int = config.field(
        0, "segan: first epochs trained on the supervised term alone (critic still trained).",
        minimum=0,
    )
    hard_mining_weight: float = config.field(
        0.0, "segan: weight of the hard-mining term, the mean soft-Dice loss of the "
        "`hard_mining_count` worst images of the batch (ISIC 2018 report; 0 = off).",
        minimum=0.0,
    )
    hard_mining_count: int = config.field(
        5, "segan: images per batch (per replica) in the hard-mining term.", minimum=1
    )
    threshold_search: bool = config.field(
        True,
        "segan: after training, grid-search `train.threshold` (0.05-0.95) for the best mean "
        "validation `threshold_metric` and store it in the run config.",
    )
    threshold_metric: str = config.field(
        "jaccard",
        "segan: what the threshold search maximises: mean per-image `jaccard` (ISIC 2017), "
        "`threshold_jaccard` (ISIC 2018: below 0.65 an image counts 0) or `dice`.",
        choices=("jaccard", "threshold_jaccard", "dice"),
    )


def check_section(cfg, origin):
    """Cross-key rules of `[segan]`."""
    sg = cfg.segan
    for key, ok, rule in (
        ("clip", sg.clip > 0, "> 0"),
        ("k_decay", 0 < sg.k_decay <= 1, "in (0, 1]"),
        ("k_floor", 0 < sg.k_floor <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise ConfigError(
                f"{origin}: `segan.{key}` must be {rule}. Received: {getattr(sg, key)}"
            )
    if sg.warmup_epochs and not sg.supervised_loss:
        raise ConfigError(
            f"{origin}: `segan.warmup_epochs` needs a `segan.supervised_loss` to train on"
        )


config.register_section("segan", SeganConfig, check_section)


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


# ---------------------------------------------------------------------- #
# Building
# ---------------------------------------------------------------------- #


def check_config(cfg):
    """Raises ConfigError for settings the SegAN trainer cannot honour."""
    s = cfg.segan
    if s.warmup_epochs and not s.supervised_loss:
        raise ConfigError(
            "`segan.warmup_epochs` needs a `segan.supervised_loss` to train on during warm-up"
        )
    if cfg.train.mixed_precision:
        raise ConfigError("`train.mixed_precision` is not supported by `method = \"segan\"`")


def build(cfg, steps_per_epoch=None):
    """The compiled `SegANTrainer` for `cfg` (call inside the strategy scope)."""
    check_config(cfg)
    s = cfg.segan
    segmentor = segmentation.build_model(cfg)
    isbi = s.critic == "isbi2018"
    critic = build_critic(
        (None, None, 3 * segmentor.output_shape[-1]), blocks=s.critic_blocks,
        filters=s.critic_filters,
        kernel_size=isbi_critic_kernels(s.critic_blocks) if isbi else s.critic_kernel,
        leaky=isbi,
    )
    seg_optimizer = segmentation.make_optimizer(cfg.train, steps_per_epoch)
    critic_optimizer = segmentation.make_optimizer(cfg.train, steps_per_epoch)
    # Compiled too, so that its saved checkpoints load and evaluate as the baseline's do.
    segmentor.compile(
        optimizer=seg_optimizer,
        loss=losses_lib.get_loss(s.supervised_loss or cfg.train.loss),
        metrics=metrics_lib.default_metrics(threshold=cfg.train.threshold, from_logits=True),
    )
    model = SegANTrainer(
        segmentor, critic, clip=s.clip, supervised_loss=s.supervised_loss,
        supervised_weight=s.supervised_weight, threshold=cfg.train.threshold,
        hard_mining_weight=s.hard_mining_weight, hard_mining_count=s.hard_mining_count,
    )
    model.compile(seg_optimizer=seg_optimizer, critic_optimizer=critic_optimizer)
    return model


def isbi_critic_kernels(blocks):
    """The ISBI critic's kernels, finest block first: the segmentor decoder's, reversed.

    Xue et al. (ISBI 2018), Fig. 1: the critic "has the similar structure as the
    decoder in S, but with direction in reverse"; the decoder runs 11, 9, 7 from
    coarse to fine, so the critic runs 7, 9, 11 (then 11) from fine to coarse.
    """
    return tuple(reversed(decoder_kernels(blocks)))


THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


THRESHOLD_METRICS = ("jaccard", "threshold_jaccard", "dice")


def search_threshold(model, dataset, grid=THRESHOLD_GRID, metric="jaccard"):
    """Grid search of the probability threshold that maximises a mean per-image score.

    The paper picks its final threshold (0.4 with k = 0.3) this way on validation.
    An image whose truth and prediction are both empty scores 1, as in `metrics`.

    Args:
        model: keras.Model. Returns logits.
        dataset: iterable of (images, masks) batches.
        grid: sequence of float in (0, 1). Thresholds tried. Defaults to 0.05, ..., 0.95.
        metric: str. `"jaccard"` (ISIC 2017), `"threshold_jaccard"` (ISIC 2018: an
            image's Jaccard counts 0 below 0.65) or `"dice"`. Defaults to `"jaccard"`.

    Returns:
        (best threshold, {threshold: mean score}); ties go to the one nearest 0.5.
    """
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"`metric` must be one of {THRESHOLD_METRICS}. Received: {metric!r}")
    grid = np.asarray(grid, np.float64)
    totals, count = np.zeros(len(grid)), 0
    for x, y in dataset:
        probs = 1.0 / (1.0 + np.exp(-np.asarray(model.predict_on_batch(x), np.float64)))
        truth = np.asarray(y, np.float64) >= 0.5
        pred = probs[None] >= grid[:, None, None, None, None]  # (T, B, H, W, K)
        inter = np.logical_and(pred, truth[None]).sum(axis=(2, 3))
        union = np.logical_or(pred, truth[None]).sum(axis=(2, 3))
        score = np.where(union == 0, 1.0, inter / np.maximum(union, 1))  # Jaccard (T, B, K)
        if metric == "dice":
            score = 2.0 * score / (1.0 + score)
        elif metric == "threshold_jaccard":
            score = np.where(score >= metrics_lib.ISIC_JACCARD_FLOOR, score, 0.0)
        totals += score.mean(axis=2).sum(axis=1)
        count += score.shape[1]
    if not count:
        raise ValueError("search_threshold: the dataset is empty.")
    scores = totals / count
    best = max(range(len(grid)), key=lambda i: (round(scores[i], 9), -abs(grid[i] - 0.5)))
    return float(grid[best]), {float(t): float(v) for t, v in zip(grid, scores)}


def after_fit(cfg, model, val_ds, log=print):
    """Stores the validation-optimal threshold in the config (when `segan.threshold_search`).

    Returns:
        (cfg with `train.threshold` set, `model` recompiled with metrics at it).
    """
    if not cfg.segan.threshold_search or val_ds is None:  # no validation images: nothing to search
        return cfg, model
    metric = cfg.segan.threshold_metric
    threshold, scores = search_threshold(model, val_ds, metric=metric)
    log(f"threshold search on validation: {threshold:.2f} "
        f"(mean {metric} {scores[threshold]:.4f}; at {cfg.train.threshold:.2f}: "
        f"{scores.get(round(cfg.train.threshold, 2), float('nan')):.4f})")
    model.compile(
        loss=model.loss,
        metrics=metrics_lib.default_metrics(threshold=threshold, from_logits=True),
    )
    return cfg.override({"train.threshold": threshold}), model


def callbacks(cfg):
    """The k annealing of the adaptive logistic and, if set, the warm-up switch."""
    s = cfg.segan
    out = [AnnealLogisticK(decay=s.k_decay, every=s.k_every, floor=s.k_floor)]
    if s.warmup_epochs:
        out.append(AdversarialWarmup(s.warmup_epochs))
    return out


@method.register
class Segan(SegmentationMethod):
    """Segmentor against a multi-scale L1 critic (Xue, Xu, Huang 2018; ISIC 2018 report)."""

    name = "segan"
    default_model = "segan"
    freezes_encoder = True

    def check(self):
        super().check()
        check_config(self.cfg)

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def method_callbacks(self, data):
        return callbacks(self.cfg)

    def after_fit(self, best, val_ds, data, log):
        self.cfg, best = after_fit(self.cfg, best, val_ds, log)
        return best
