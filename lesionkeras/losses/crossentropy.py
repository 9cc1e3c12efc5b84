"""The package's one binary cross-entropy: per pixel, per image, and as a Keras `Loss`."""

import keras
from keras import ops

from lesionkeras.losses.common import _PACKAGE, _prepare


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
