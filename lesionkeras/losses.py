"""Segmentation losses for binary, multi-channel lesion masks.

All tensors are channels-last `(B, H, W, K)`: `B` images, `K` independent
binary structures (K=1 for lesion segmentation, K=5 for the ISIC 2018
attribute masks). Each channel is a separate sigmoid output, so every loss
here treats channels independently and averages them.

The pure functions return one value per image, shape `(B,)`. The `Loss`
classes return the same per-image values from `call`, so Keras applies
`sample_weight` (one weight per image) and the reduction as for any built-in
loss.

Everything is computed in float32: under mixed precision the model emits
float16/bfloat16 logits, and the sums over a whole image and the
`log1p(exp(.))` term are not accurate enough in half precision.

Example:
    import numpy as np
    y_true = np.zeros((2, 4, 4, 1), "float32")
    logits = np.zeros((2, 4, 4, 1), "float32")
    binary_crossentropy_with_logits(y_true, logits)  # log(2) per image
    model.compile(optimizer="adam", loss=get_loss("bce+dice"))
"""

import keras
import numpy as np
from keras import ops

from lesionkeras.shapes import as_float32, check_shapes

LOSS_NAMES = ("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")

_PACKAGE = "lesionkeras"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _prepare(y_true, y_pred, what):
    y_pred = ops.convert_to_tensor(y_pred)
    if keras.backend.standardize_dtype(y_pred.dtype) == "float64":
        # Kept: float64 models are the numerical references of the tests.
        y_true = ops.cast(y_true, "float64")
    else:
        y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    check_shapes(y_true, y_pred, what)
    return y_true, y_pred


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


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


def binary_crossentropy_with_logits(y_true, logits):
    """Per-image mean sigmoid cross-entropy, computed from logits.

    The mean of `pixel_binary_crossentropy`: finite for logits of any
    magnitude, with the exact gradient `sigmoid(x) - z` everywhere.

    Args:
        y_true: Target masks, shape `(B, H, W, K)`, values in [0, 1] (soft
            targets are allowed).
        logits: Raw model outputs (pre-sigmoid), same shape as `y_true`.

    Returns:
        float32 tensor of shape `(B,)`: mean over H, W and K.

    Raises:
        ValueError: If the shapes are not `(B, H, W, K)` or differ.

    Example:
        z = np.ones((1, 2, 2, 1), "float32")
        x = np.zeros((1, 2, 2, 1), "float32")
        binary_crossentropy_with_logits(z, x)  # [log 2] = [0.6931]
    """
    z, x = _prepare(y_true, logits, "binary_crossentropy_with_logits")
    return ops.mean(sigmoid_cross_entropy(z, x), axis=(1, 2, 3))


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


# --------------------------------------------------------------------------
# Loss classes
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BinaryCrossentropyWithLogits(keras.losses.Loss):
    """Sigmoid cross-entropy on logits, one value per image.

    Args:
        reduction: Keras reduction over the per-image values.
        name: Loss name.
        dtype: Keras dtype of the reduced loss. The computation itself is
            always float32.

    Example:
        model.compile(optimizer="adam", loss=BinaryCrossentropyWithLogits())
    """

    def __init__(
        self,
        reduction="sum_over_batch_size",
        name="binary_crossentropy_with_logits",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return binary_crossentropy_with_logits(y_true, y_pred)


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


# --------------------------------------------------------------------------
# SMILE (Petit, Thome et al. 2018): missing labels
# --------------------------------------------------------------------------


def pixel_binary_crossentropy(y_true, logits):
    """Per-pixel, per-structure sigmoid cross-entropy from logits, `(B, H, W, K)`, float32.

    The one binary cross-entropy of the package (the losses, the meta-
    reweighting and the multitask trainers all call it). Finite for logits of
    any magnitude, with the exact gradient `sigmoid(x) - z`, also at `x = 0`.
    """
    z, x = _prepare(y_true, logits, "pixel_binary_crossentropy")
    return sigmoid_cross_entropy(z, x)


def sigmoid_cross_entropy(y_true, logits):
    """Element-wise sigmoid cross-entropy from logits, any shape, float32 (float64 kept).

    TensorFlow's `sigmoid_cross_entropy_with_logits` (Keras' from-logits BCE, no
    reduction): `max(x, 0) - x z + log1p(exp(-|x|))` written with `where(x >= 0)`,
    which keeps the gradient `sigmoid(x) - z` exact at x = 0 (a `relu`/`abs` form
    gives `-z` there).
    """
    x = ops.convert_to_tensor(logits)
    dtype = "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"
    return ops.binary_crossentropy(ops.cast(y_true, dtype), ops.cast(x, dtype), from_logits=True)


def smile_loss(y_true, logits, weights):
    """SMILE loss: `sum_k sum_px w_k L_k / sum_k sum_px w_k` over a batch.

    The weighted sum over structures of per-pixel binary cross-entropies,
    normalised by the number of weighted pixels, so an image whose labels
    are mostly unknown does not count as mostly correct. A batch with no
    weighted pixel has loss 0 (and zero gradient).

    Reference: Petit, Thome, Soler et al., "Handling missing annotations for
    semantic segmentation with deep ConvNets", DLMIA 2018.

    Args:
        y_true: `(B, H, W, K)` targets in {0, 1}.
        logits: `(B, H, W, K)` raw outputs of K independent sigmoids.
        weights: `(B, H, W, K)` binary weight maps (`data.missing.smile_weights`).

    Returns:
        float32 scalar.

    Example:
        z = np.zeros((1, 2, 2, 1), "float32"); w = np.ones_like(z)
        smile_loss(z, np.zeros_like(z), w)  # log 2
    """
    per_pixel = pixel_binary_crossentropy(y_true, logits)
    w = as_float32(weights)
    check_shapes(per_pixel, w, "smile_loss")
    return ops.divide_no_nan(ops.sum(per_pixel * w), ops.sum(w))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SmileLoss(keras.losses.Loss):
    """SMILE loss through Keras' `sample_weight`: per-pixel BCE on logits.

    `call` returns the per-pixel cross-entropy `(B, H, W, K)`; Keras
    multiplies it by the `sample_weight` given with the data (the SMILE weight
    maps, same shape) and the default reduction `"mean_with_sample_weight"`
    divides by their sum: exactly `smile_loss`. Without sample weights it is
    the plain mean BCE.

    Args:
        reduction: Keras reduction. Defaults to `"mean_with_sample_weight"`.
        name: Loss name.
        dtype: Keras dtype of the reduced loss.

    Example:
        model.compile(optimizer="adam", loss=SmileLoss())
        model.fit(dataset_of_image_masks_weights)
    """

    def __init__(self, reduction="mean_with_sample_weight", name="smile_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        return pixel_binary_crossentropy(y_true, y_pred)


# --------------------------------------------------------------------------
# The (K+1)-way softmax baseline of SMILE (`--method multiclass`)
# --------------------------------------------------------------------------


def _priorities(k, container):
    """Label priority of each structure: later listed wins; the container loses to all."""

    rank = np.arange(2, k + 2, dtype="float32")
    if container is not None:
        rank[int(container)] = 1.0
    return rank


def multiclass_labels(masks, container=None):
    """One class per pixel from K (possibly overlapping) binary masks.

    Class 0 is background; class k + 1 is structure k. A pixel inside several
    structures takes the one listed last, except that the `container` (the
    lesion, which encloses the attributes) loses to every other structure, so
    an attribute pixel is labelled with the attribute. Structures that were
    not annotated have all-zero masks and so count as background: this is the
    naive baseline SMILE is compared with.

    Args:
        masks: `(..., H, W, K)` targets in {0, 1}.
        container: int or None. Channel of the enclosing structure.

    Returns:
        int32 `(..., H, W)` labels in [0, K].

    Example:
        multiclass_labels(np.array([[[[1, 1, 0]]]]), container=0)  # [[[2]]]
    """
    m = as_float32(masks)
    k = m.shape[-1]
    ranked = m * ops.convert_to_tensor(_priorities(k, container))
    winner = ops.cast(ops.argmax(ranked, axis=-1), "int32") + 1
    return ops.where(ops.max(m, axis=-1) > 0.5, winner, ops.zeros_like(winner))


def multiclass_probabilities(logits, container=None):
    """Per-structure probabilities `(..., K)` from (K+1)-way softmax logits.

    Structure k's probability is that of class k + 1, except the container's,
    which is `1 - p(background)`: every other structure lies inside it (the
    inverse of the labelling rule of `multiclass_labels`).

    Args:
        logits: `(..., H, W, K + 1)`; channel 0 is background.
        container: int or None. Channel (among the K structures) of the container.

    Returns:
        float32 `(..., H, W, K)` probabilities in [0, 1].
    """
    p = ops.softmax(as_float32(logits), axis=-1)
    probs = p[..., 1:]
    if container is None:
        return probs
    k = probs.shape[-1]
    is_c = ops.convert_to_tensor(
        [1.0 if i == int(container) else 0.0 for i in range(k)], dtype="float32"
    )
    return probs * (1.0 - is_c) + (1.0 - p[..., :1]) * is_c


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MulticlassLoss(keras.losses.Loss):
    """Softmax cross-entropy over K structures + background, from K binary masks.

    `y_true` holds the K structure masks (as for SMILE); they become one label
    per pixel with `multiclass_labels`. `y_pred` are K + 1 logits. The mean
    over pixels (Petit, Thome et al. 2018, the baseline of their Table 1).

    Args:
        container: int or None. See `multiclass_labels`. Defaults to None.
        name: Loss name.

    Example:
        model.compile(optimizer="adam", loss=MulticlassLoss(container=0))
    """

    def __init__(self, container=None, reduction="sum_over_batch_size",
                 name="multiclass_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.container = None if container is None else int(container)

    def call(self, y_true, y_pred):
        y_true = as_float32(y_true)
        y_pred = as_float32(y_pred)
        if y_true.shape[-1] is not None and y_pred.shape[-1] is not None and (
            y_pred.shape[-1] != y_true.shape[-1] + 1
        ):
            raise ValueError(
                "multiclass_loss: y_pred needs K + 1 channels for K structures. Received: "
                f"y_true {tuple(y_true.shape)}, y_pred {tuple(y_pred.shape)}"
            )
        labels = multiclass_labels(y_true, self.container)
        return ops.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)

    def get_config(self):
        return {**super().get_config(), "container": self.container}


# --------------------------------------------------------------------------
# SegAN (Xue, Xu, Huang, ISBI 2018)
# --------------------------------------------------------------------------


def mask_image(images, masks):
    """`x o y` of SegAN: every image channel multiplied by every mask channel.

    Args:
        images: `(B, H, W, C)` images.
        masks: `(B, H, W, K)` label maps (probabilities or 0/1 truth).

    Returns:
        float32 tensor `(B, H, W, K * C)`: the image masked by mask 0, then by
        mask 1, ... (just `images * masks` when K = 1).

    Raises:
        ValueError: If the batch or spatial shapes differ.
    """
    x = as_float32(images)
    m = as_float32(masks)
    if len(x.shape) != 4 or len(m.shape) != 4 or any(
        a is not None and b is not None and a != b for a, b in zip(x.shape[:3], m.shape[:3])
    ):
        raise ValueError(
            "mask_image: expected images (B, H, W, C) and masks (B, H, W, K) of the same "
            f"B, H, W; got images.shape={tuple(x.shape)} and masks.shape={tuple(m.shape)}."
        )
    if m.shape[-1] == 1:
        return x * m
    return ops.concatenate([x * m[..., k : k + 1] for k in range(m.shape[-1])], axis=-1)


def multiscale_l1(features_a, features_b):
    """Multi-scale L1 loss of SegAN (eq. 1-2), per image.

    `(1 / L) * sum_i mean |f_C^i(x o S(x)) - f_C^i(x o y)|`: for each of the L
    critic feature maps, the mean absolute difference over H, W and channels,
    then the mean over the L maps. Averaging each map (rather than summing)
    keeps the layers of different sizes on an equal footing.

    Args:
        features_a: sequence of L tensors `(B, H_i, W_i, C_i)`: critic
            features of the image masked by the prediction.
        features_b: sequence of L tensors of the same shapes: critic features
            of the image masked by the truth.

    Returns:
        float32 tensor of shape `(B,)`.

    Raises:
        ValueError: If the two sequences differ in length, are empty, or a
            pair of maps differs in shape.

    Example:
        a = [np.ones((1, 2, 2, 1), "float32"), np.zeros((1, 1, 1, 2), "float32")]
        b = [np.zeros((1, 2, 2, 1), "float32"), np.full((1, 1, 1, 2), 3.0, "float32")]
        multiscale_l1(a, b)  # [(1 + 3) / 2] = [2.0]
    """
    features_a, features_b = list(features_a), list(features_b)
    if not features_a or len(features_a) != len(features_b):
        raise ValueError(
            "multiscale_l1: expected two equally long, non-empty lists of feature maps; "
            f"got {len(features_a)} and {len(features_b)}."
        )
    per_layer = []
    for i, (a, b) in enumerate(zip(features_a, features_b)):
        a, b = as_float32(a), as_float32(b)
        if tuple(a.shape) != tuple(b.shape) and any(
            p is not None and q is not None and p != q for p, q in zip(a.shape, b.shape)
        ) or len(a.shape) != len(b.shape):
            raise ValueError(
                f"multiscale_l1: feature map {i} shapes differ: "
                f"{tuple(a.shape)} and {tuple(b.shape)}."
            )
        per_layer.append(ops.mean(ops.abs(a - b), axis=tuple(range(1, len(a.shape)))))
    return ops.mean(ops.stack(per_layer, axis=0), axis=0)
