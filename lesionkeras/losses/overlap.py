"""Region-overlap losses: soft Dice, soft Jaccard (IoU) and hard-mining Dice, as functions and Keras `Loss` classes."""

import keras
from keras import ops

from lesionkeras.losses.common import _PACKAGE, _prepare
from lesionkeras.shapes import as_float32


def _check_smooth(smooth):
    # smooth > 0 also keeps the ratio defined when truth and prediction are
    # both empty (0/0 otherwise), which happens on lesion-free crops.
    if not float(smooth) > 0.0:
        raise ValueError(f"`smooth` must be > 0; got smooth={smooth}.")


def _overlap_sums(y_true, probs):
    """Per image, per channel: intersection and the two masses, each (B, K)."""
    spatial = (1, 2)
    intersection = ops.sum(y_true * probs, axis=spatial)
    true_sum = ops.sum(y_true, axis=spatial)
    pred_sum = ops.sum(probs, axis=spatial)
    return intersection, true_sum, pred_sum


def soft_dice_loss(y_true, probs, smooth=1.0):
    """Per-image soft Dice loss, averaged over channels.

    For each image and channel:
    `1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`.

    Args:
        y_true: Target masks, shape `(B, H, W, K)`, values in [0, 1].
        probs: Predicted probabilities (post-sigmoid), same shape.
        smooth: float > 0. Added to numerator and denominator; makes an
            empty prediction of an empty mask score a loss of 0.

    Returns:
        float32 tensor of shape `(B,)`.

    Raises:
        ValueError: If the shapes differ or `smooth <= 0`.

    Example:
        t = np.ones((1, 2, 2, 1), "float32")
        soft_dice_loss(t, t)  # ~[0.]
    """
    _check_smooth(smooth)
    t, p = _prepare(y_true, probs, "soft_dice_loss")
    intersection, true_sum, pred_sum = _overlap_sums(t, p)
    dice = (2.0 * intersection + smooth) / (pred_sum + true_sum + smooth)
    return ops.mean(1.0 - dice, axis=-1)


def hard_mining_dice_loss(y_true, probs, count=5, smooth=1.0):
    """Mean soft-Dice loss of the `count` worst images of the batch.

    The hard-mining auxiliary loss of Xue et al.'s ISIC 2018 report: rank
    the images by `1 - soft Dice` and back-propagate only through the
    `count` highest (all of them when the batch is smaller).

    Args:
        y_true: Target masks, shape `(B, H, W, K)`, values in [0, 1].
        probs: Predicted probabilities (post-sigmoid), same shape.
        count: int >= 1. Images kept. Defaults to 5 (the report).
        smooth: float > 0. As in `soft_dice_loss`. Defaults to 1.0.

    Returns:
        float32 scalar.

    Raises:
        ValueError: If the shapes differ, `count < 1` or `smooth <= 0`.

    Example:
        t = np.ones((3, 2, 2, 1), "float32")
        hard_mining_dice_loss(t, t * [[[[1.0]]], [[[0.5]]], [[[0.0]]]], count=2)
    """
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"`count` must be an integer >= 1. Received: count={count!r}")
    per_image = soft_dice_loss(y_true, probs, smooth)
    k = ops.minimum(int(count), ops.shape(per_image)[0])
    worst = ops.sort(per_image)[::-1]
    kept = ops.cast(ops.arange(ops.shape(per_image)[0]) < k, "float32")
    return ops.sum(worst * kept) / ops.cast(k, "float32")


def soft_jaccard_loss(y_true, probs, smooth=1.0):
    """Per-image soft Jaccard (IoU) loss, averaged over channels.

    For each image and channel, with `I = sum(p * t)`:
    `1 - (I + smooth) / (sum(p) + sum(t) - I + smooth)`.

    Args:
        y_true: Target masks, shape `(B, H, W, K)`, values in [0, 1].
        probs: Predicted probabilities (post-sigmoid), same shape.
        smooth: float > 0. See `soft_dice_loss`.

    Returns:
        float32 tensor of shape `(B,)`.

    Raises:
        ValueError: If the shapes differ or `smooth <= 0`.

    Example:
        t = np.ones((1, 2, 2, 1), "float32")
        soft_jaccard_loss(t, np.zeros_like(t))  # [1 - 1/5] = [0.8]
    """
    _check_smooth(smooth)
    t, p = _prepare(y_true, probs, "soft_jaccard_loss")
    intersection, true_sum, pred_sum = _overlap_sums(t, p)
    union = pred_sum + true_sum - intersection
    jaccard = (intersection + smooth) / (union + smooth)
    return ops.mean(1.0 - jaccard, axis=-1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class _OverlapLoss(keras.losses.Loss):
    """Shared plumbing of the Dice and Jaccard losses."""

    _fn = None

    def __init__(self, from_logits, smooth, reduction, name, dtype):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_smooth(smooth)
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        probs = as_float32(y_pred)
        if self.from_logits:
            probs = ops.sigmoid(probs)
        return type(self)._fn(y_true, probs, smooth=self.smooth)

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, smooth=self.smooth)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftDiceLoss(_OverlapLoss):
    """Soft Dice loss, per image, averaged over channels.

    Args:
        from_logits: bool. If True, `y_pred` are logits and go through a
            sigmoid first; if False, `y_pred` are probabilities.
        smooth: float > 0. See `soft_dice_loss`.
        reduction: Keras reduction over the per-image values.
        name: Loss name.
        dtype: Keras dtype of the reduced loss.

    Example:
        model.compile(optimizer="adam", loss=SoftDiceLoss(from_logits=True))
    """

    _fn = staticmethod(soft_dice_loss)

    def __init__(
        self,
        from_logits=True,
        smooth=1.0,
        reduction="sum_over_batch_size",
        name="soft_dice_loss",
        dtype=None,
    ):
        super().__init__(from_logits, smooth, reduction, name, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftJaccardLoss(_OverlapLoss):
    """Soft Jaccard (IoU) loss, per image, averaged over channels.

    Args:
        from_logits: bool. If True, `y_pred` are logits.
        smooth: float > 0. See `soft_jaccard_loss`.
        reduction: Keras reduction over the per-image values.
        name: Loss name.
        dtype: Keras dtype of the reduced loss.

    Example:
        model.compile(optimizer="adam", loss=SoftJaccardLoss())
    """

    _fn = staticmethod(soft_jaccard_loss)

    def __init__(
        self,
        from_logits=True,
        smooth=1.0,
        reduction="sum_over_batch_size",
        name="soft_jaccard_loss",
        dtype=None,
    ):
        super().__init__(from_logits, smooth, reduction, name, dtype)
