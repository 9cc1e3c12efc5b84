"""The losses a config names: `CombinedLoss` (BCE + Dice + Jaccard), `LOSS_NAMES` and `get_loss`."""

import keras
from keras import ops

from lesionkeras.losses.common import _PACKAGE, _prepare
from lesionkeras.losses.crossentropy import BinaryCrossentropyWithLogits, binary_crossentropy_with_logits
from lesionkeras.losses.overlap import (
    SoftDiceLoss, SoftJaccardLoss, _check_smooth, soft_dice_loss, soft_jaccard_loss)

LOSS_NAMES = ("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CombinedLoss(keras.losses.Loss):
    """Weighted sum of BCE, soft Dice and soft Jaccard, per image.

    `loss = bce_weight * BCE + dice_weight * Dice + jaccard_weight * Jaccard`.
    Terms with weight 0 are not computed.

    Args:
        bce_weight: float >= 0. Weight of the cross-entropy term.
        dice_weight: float >= 0. Weight of the soft Dice term.
        jaccard_weight: float >= 0. Weight of the soft Jaccard term.
        from_logits: bool. Whether `y_pred` are logits. Must be True when
            `bce_weight > 0`: the cross-entropy is only computed from logits
            (recovering logits from probabilities is what makes BCE
            unstable in the first place).
        smooth: float > 0. Smoothing of the Dice and Jaccard terms.
        reduction: Keras reduction over the per-image values.
        name: Loss name.
        dtype: Keras dtype of the reduced loss.

    Raises:
        ValueError: If all weights are zero, any weight is negative, or
            `from_logits=False` is combined with `bce_weight > 0`.

    Example:
        loss = CombinedLoss(bce_weight=1.0, dice_weight=1.0)
        model.compile(optimizer="adam", loss=loss)
    """

    def __init__(
        self,
        bce_weight=1.0,
        dice_weight=0.0,
        jaccard_weight=0.0,
        from_logits=True,
        smooth=1.0,
        reduction="sum_over_batch_size",
        name="combined_loss",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        weights = {
            "bce_weight": float(bce_weight),
            "dice_weight": float(dice_weight),
            "jaccard_weight": float(jaccard_weight),
        }
        negative = {k: v for k, v in weights.items() if v < 0.0}
        if negative:
            raise ValueError(f"CombinedLoss weights must be >= 0; got {negative}.")
        if all(v == 0.0 for v in weights.values()):
            raise ValueError(
                "CombinedLoss needs at least one non-zero weight; got "
                f"bce_weight={bce_weight}, dice_weight={dice_weight}, "
                f"jaccard_weight={jaccard_weight}."
            )
        if weights["bce_weight"] > 0.0 and not from_logits:
            raise ValueError(
                "CombinedLoss: the BCE term needs logits, but from_logits=False "
                f"with bce_weight={bce_weight}. Use from_logits=True (model "
                "outputs logits) or set bce_weight=0."
            )
        _check_smooth(smooth)
        self.bce_weight = weights["bce_weight"]
        self.dice_weight = weights["dice_weight"]
        self.jaccard_weight = weights["jaccard_weight"]
        self.from_logits = bool(from_logits)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true, y_pred = _prepare(y_true, y_pred, "CombinedLoss")
        terms = []
        if self.bce_weight:
            bce = binary_crossentropy_with_logits(y_true, y_pred)
            terms.append(self.bce_weight * bce)
        if self.dice_weight or self.jaccard_weight:
            probs = ops.sigmoid(y_pred) if self.from_logits else y_pred
            if self.dice_weight:
                dice = soft_dice_loss(y_true, probs, self.smooth)
                terms.append(self.dice_weight * dice)
            if self.jaccard_weight:
                jaccard = soft_jaccard_loss(y_true, probs, self.smooth)
                terms.append(self.jaccard_weight * jaccard)
        return sum(terms[1:], terms[0])

    def get_config(self):
        config = super().get_config()
        config.update(
            bce_weight=self.bce_weight,
            dice_weight=self.dice_weight,
            jaccard_weight=self.jaccard_weight,
            from_logits=self.from_logits,
            smooth=self.smooth,
        )
        return config


def get_loss(name):
    """Builds a loss from its short name, for configs and the CLI.

    All returned losses expect logits (`from_logits=True`); combined losses
    weight both terms 1.0.

    Args:
        name: str. One of `LOSS_NAMES`: "bce", "dice", "jaccard", "bce+dice",
            "bce+jaccard". Case and spaces are ignored ("BCE + Dice").

    Returns:
        A new `keras.losses.Loss` instance.

    Raises:
        ValueError: If `name` is unknown; the message lists the valid names.

    Example:
        loss = get_loss("bce+dice")  # CombinedLoss(1.0, 1.0, 0.0)
    """
    key = "".join(str(name).split()).lower()
    if key == "bce":
        return BinaryCrossentropyWithLogits()
    if key == "dice":
        return SoftDiceLoss()
    if key == "jaccard":
        return SoftJaccardLoss()
    if key == "bce+dice":
        return CombinedLoss(bce_weight=1.0, dice_weight=1.0, name="bce_dice_loss")
    if key == "bce+jaccard":
        return CombinedLoss(
            bce_weight=1.0, jaccard_weight=1.0, name="bce_jaccard_loss"
        )
    raise ValueError(
        f"Unknown loss name {name!r}; valid names: {', '.join(LOSS_NAMES)}."
    )
