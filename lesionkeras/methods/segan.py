"""`--method segan`: adversarial training with a multi-scale L1 critic.

Xue, Xu, Huang, "Adversarial learning with multi-scale loss for skin lesion
segmentation" (ISBI 2018).

This module owns the method, its `[segan]` config table, building the
compiled model, the validation threshold search and the callbacks; the step
itself (critic and segmentor updates) and the wrapper model `SegANTrainer` are
in `segan_step`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lesionkeras import config
from lesionkeras import losses as losses_lib
from lesionkeras import metrics as metrics_lib
from lesionkeras.methods.segan_step import AdversarialWarmup, SegANTrainer
from lesionkeras.training.callbacks import AnnealLogisticK
from lesionkeras.training import method
from lesionkeras.training.segmentation import SegmentationMethod
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
