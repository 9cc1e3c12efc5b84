"""Losses for missing labels (SMILE, Petit, Thome et al. 2018) and its (K+1)-way softmax baseline."""

import keras
import numpy as np
from keras import ops

from lesionkeras.losses.common import _PACKAGE
from lesionkeras.losses.crossentropy import pixel_binary_crossentropy
from lesionkeras.shapes import as_float32, check_shapes


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
