"""Tensor helpers shared by the losses and the metrics."""

from keras import ops


def as_float32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def check_shapes(y_true, y_pred, what, shapes=None):
    """Raises ValueError unless both are `(B, H, W, K)` with equal shapes.

    Args:
        y_true: Tensor.
        y_pred: Tensor.
        what: str. Caller name for the message.
        shapes: Optional pair of shapes to report instead (the caller's
            original shapes, before a batch axis was added).
    """
    true_shape = tuple(y_true.shape)
    pred_shape = tuple(y_pred.shape)
    shown = shapes or (true_shape, pred_shape)
    if len(true_shape) != 4 or len(pred_shape) != 4:
        raise ValueError(
            f"{what}: expected y_true and y_pred of shape (B, H, W, K); got "
            f"y_true.shape={shown[0]} and y_pred.shape={shown[1]}."
        )
    # Only static dimensions can be compared; None (unknown in a traced
    # function) never counts as a mismatch.
    for a, b in zip(true_shape, pred_shape):
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"{what}: y_true and y_pred shapes differ: "
                f"y_true.shape={shown[0]}, y_pred.shape={shown[1]}."
            )
