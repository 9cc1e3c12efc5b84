"""Shared by every loss: the serialisation package name and input preparation (float32, shape checks)."""

import keras
from keras import ops

from lesionkeras.shapes import as_float32, check_shapes

_PACKAGE = "lesionkeras"


def _prepare(y_true, y_pred, what):
    y_pred = ops.convert_to_tensor(y_pred)
    if keras.backend.standardize_dtype(y_pred.dtype) == "float64":
        # Kept: float64 models are the numerical references of the tests.
        y_true = ops.cast(y_true, "float64")
    else:
        y_true, y_pred = as_float32(y_true), as_float32(y_pred)
    check_shapes(y_true, y_pred, what)
    return y_true, y_pred
