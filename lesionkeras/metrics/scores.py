"""Per-image segmentation scores as pure functions (confusion counts, scores, the ISIC Jaccard floor)."""

import math

import numpy as np
from keras import ops

from lesionkeras.shapes import as_float32, check_shapes

SCORE_NAMES = (
    "dice",
    "jaccard",
    "pixel_accuracy",
    "sensitivity",
    "specificity",
    "threshold_jaccard",
)

ISIC_JACCARD_FLOOR = 0.65


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_threshold(threshold):
    # Strictly inside (0, 1): the logit of 0 or 1 is infinite, and a
    # threshold of 0 would mark every pixel of every image as lesion.
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(
            f"`threshold` must be in the open interval (0, 1); got {threshold}."
        )


def _cutoff(threshold, from_logits):
    """The value `y_pred` is compared with (>=) to call a pixel positive."""
    threshold = float(threshold)
    if from_logits:
        # sigmoid(x) >= t  <=>  x >= log(t / (1 - t)); comparing logits
        # avoids sigmoid saturating to exactly 1.0 in float32.
        return math.log(threshold / (1.0 - threshold))
    return threshold


def _binarize(y_pred, threshold, from_logits):
    """Boolean prediction mask: `y_pred >= cutoff`."""
    return ops.greater_equal(as_float32(y_pred), _cutoff(threshold, from_logits))


def _as_mask(x):
    """Boolean mask from bool, 0/1, 0/255 or soft values (>= 0.5 is True)."""
    x = ops.convert_to_tensor(x)
    if x.dtype == "bool":
        return x
    return ops.greater_equal(as_float32(x), 0.5)


def _safe_ratio(numerator, denominator, empty_value):
    """numerator / denominator, or `empty_value` where denominator == 0."""
    is_empty = ops.equal(denominator, 0.0)
    # Dividing by 1 where empty keeps both where() branches finite, so no
    # NaN can leak out (nor into a gradient, were one ever taken).
    safe_denominator = ops.where(is_empty, ops.ones_like(denominator), denominator)
    return ops.where(
        is_empty,
        ops.full_like(numerator, empty_value),
        numerator / safe_denominator,
    )


def _add_batch_axis(x, which):
    """Accepts (H, W), (H, W, 1) or (B, H, W, K); returns rank 4."""
    rank = len(x.shape)
    if rank == 4:
        return x
    if rank == 2:
        return ops.expand_dims(ops.expand_dims(x, 0), -1)
    if rank == 3 and x.shape[-1] == 1:
        return ops.expand_dims(x, 0)
    raise ValueError(
        f"per_image_scores: {which} must have shape (H, W), (H, W, 1) or "
        f"(B, H, W, K); got {which}.shape={tuple(x.shape)}."
    )

# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


def confusion_counts(y_true, y_pred_binary):
    """Per-image, per-channel confusion counts.

    Args:
        y_true: Target masks, shape `(B, H, W, K)`; binarised at 0.5
            (`>= 0.5` is foreground), so 0/1, 0/255 and soft masks all work.
        y_pred_binary: Binary prediction, same shape: bool, or 0/1 values
            (values `>= 0.5` count as positive).

    Returns:
        Tuple `(tp, fp, fn, tn)` of float32 tensors, each `(B, K)`, summed
        over H and W.

    Raises:
        ValueError: If the shapes are not `(B, H, W, K)` or differ.

    Example:
        tp, fp, fn, tn = confusion_counts(masks, ops.cast(probs >= 0.5, "float32"))
    """
    t = _as_mask(y_true)
    p = _as_mask(y_pred_binary)
    check_shapes(t, p, "confusion_counts")
    spatial = (1, 2)

    # Count in integers and convert once: a float32 running sum of ones can
    # stop counting past 2**24 pixels (the largest ISIC images have ~3e7),
    # whereas a single final rounding is off by at most 1 part in 1.6e7.
    def count(m):
        return ops.cast(ops.count_nonzero(m, axis=spatial), "float32")

    # Three reductions instead of four: the rest follows from the totals
    # (this runs for every metric on every training batch).
    tp = count(ops.logical_and(t, p))
    positives_true = count(t)
    positives_pred = count(p)
    pixels = ops.cast(ops.shape(t)[1] * ops.shape(t)[2], "float32")
    fp = positives_pred - tp
    fn = positives_true - tp
    tn = pixels - tp - fp - fn
    return tp, fp, fn, tn


def scores_from_counts(tp, fp, fn, tn):
    """Scores from confusion counts, with the empty-mask conventions above.

    Args:
        tp: True positives, any shape (typically `(B, K)`).
        fp: False positives, same shape.
        fn: False negatives, same shape.
        tn: True negatives, same shape.

    Returns:
        dict with keys "dice", "jaccard", "pixel_accuracy", "sensitivity",
        "specificity"; each a float32 tensor shaped like `tp`. Never NaN:
        dice and jaccard are 1 when truth and prediction are both empty,
        sensitivity is 1 when the truth has no foreground (tp + fn == 0),
        specificity is 1 when it has no background (tn + fp == 0).

    Example:
        scores = scores_from_counts(*confusion_counts(y_true, y_bin))
        scores["dice"]  # (B, K)
    """
    tp, fp, fn, tn = (as_float32(c) for c in (tp, fp, fn, tn))
    errors = fp + fn
    return {
        "dice": _safe_ratio(2.0 * tp, 2.0 * tp + errors, 1.0),
        "jaccard": _safe_ratio(tp, tp + errors, 1.0),
        "pixel_accuracy": _safe_ratio(tp + tn, tp + tn + errors, 1.0),
        "sensitivity": _safe_ratio(tp, tp + fn, 1.0),
        "specificity": _safe_ratio(tn, tn + fp, 1.0),
    }


def threshold_jaccard(jaccard, floor=ISIC_JACCARD_FLOOR):
    """ISIC 2018 Task 1 score: Jaccard below `floor` counts as 0.

    Apply it per image (and channel), before averaging: the mean of the
    thresholded values is the challenge score, the threshold of the mean is
    not.

    Args:
        jaccard: Per-image Jaccard values, any shape.
        floor: float. Values `>= floor` are kept, others become 0.

    Returns:
        float32 tensor shaped like `jaccard`.

    Example:
        threshold_jaccard(np.array([0.5, 0.9]))  # [0.0, 0.9], mean 0.45
    """
    jaccard = as_float32(jaccard)
    # Compare in float32 so a float32 Jaccard of exactly 0.65 passes a 0.65
    # floor (the float64 0.65 is a hair larger than the float32 one).
    floor = ops.cast(floor, "float32")
    return ops.where(
        ops.greater_equal(jaccard, floor), jaccard, ops.zeros_like(jaccard)
    )


def _channel_scores(y_true, y_pred, threshold, from_logits, floor):
    """All six scores per image and channel, each `(B, K)`."""
    y_bin = _binarize(y_pred, threshold, from_logits)
    scores = scores_from_counts(*confusion_counts(y_true, y_bin))
    scores["threshold_jaccard"] = threshold_jaccard(scores["jaccard"], floor)
    return scores


def per_image_scores(
    y_true, y_pred, threshold=0.5, from_logits=False, floor=ISIC_JACCARD_FLOOR
):
    """Scores of each image, averaged over its channels.

    Also the scorer of full-resolution masks: numpy inputs of any size, one
    image as `(H, W)` or `(H, W, 1)`, give numpy outputs computed with the
    same formulas as the training metrics.

    Args:
        y_true: Target masks, `(B, H, W, K)`, `(H, W)` or `(H, W, 1)`;
            binarised at 0.5.
        y_pred: Probabilities (or logits if `from_logits`), in any of the
            shapes accepted for `y_true`; after adding missing batch and
            channel axes the two shapes must be equal.
        threshold: float in (0, 1). Probability at or above which a pixel
            is predicted foreground.
        from_logits: bool. Whether `y_pred` are logits.
        floor: float. Floor of "threshold_jaccard".

    Returns:
        dict mapping each of `SCORE_NAMES` ("dice", "jaccard",
        "pixel_accuracy", "sensitivity", "specificity", "threshold_jaccard")
        to per-image float32 values of shape `(B,)` (`(1,)` for one image).
        numpy arrays if neither input is a tensor, tensors otherwise.

    Raises:
        ValueError: On a bad threshold, rank or shape mismatch.

    Example:
        truth = np.zeros((480, 640), "uint8"); truth[100:300, 200:400] = 255
        per_image_scores(truth, prob_map)["threshold_jaccard"]  # array([..])
    """
    _check_threshold(threshold)
    want_numpy = not (ops.is_tensor(y_true) or ops.is_tensor(y_pred))
    t = as_float32(y_true)
    p = as_float32(y_pred)
    original_shapes = (tuple(t.shape), tuple(p.shape))
    t = _add_batch_axis(t, "y_true")
    p = _add_batch_axis(p, "y_pred")
    check_shapes(t, p, "per_image_scores", shapes=original_shapes)
    scores = _channel_scores(t, p, threshold, from_logits, floor)
    out = {name: ops.mean(scores[name], axis=-1) for name in SCORE_NAMES}
    if want_numpy:
        out = {k: np.asarray(ops.convert_to_numpy(v)) for k, v in out.items()}
    return out
