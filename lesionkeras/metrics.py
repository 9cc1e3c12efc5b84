"""Per-image segmentation scores, as the ISIC challenges compute them.

Every score is computed for each image and each channel from a thresholded
prediction, then averaged over channels and over images. This is not the
same as pooling all pixels of a batch: with pooling a large lesion drowns a
small one, whereas the ISIC leaderboards give every image equal weight.

Tensors are channels-last `(B, H, W, K)`; `K` independent binary structures.
Targets are binarised at 0.5 (`t >= 0.5` is foreground), predictions at
`threshold` (`p >= threshold`, or `logit >= log(t / (1 - t))` for logits).

Conventions for empty masks, chosen so no score is ever NaN and a correct
"nothing here" answer scores perfectly:
* dice = 2TP / (2TP + FP + FN), and 1 when truth and prediction are both
  empty; jaccard = TP / (TP + FP + FN), likewise 1 when both are empty.
  An empty prediction of a non-empty truth (or the reverse) scores 0.
* sensitivity = TP / (TP + FN), and 1 when the truth has no foreground.
* specificity = TN / (TN + FP), and 1 when the truth has no background.
* pixel_accuracy = (TP + TN) / (TP + FP + FN + TN), and 1 for an image of
  zero pixels.
* threshold_jaccard = jaccard if jaccard >= 0.65 else 0, per image and
  channel (ISIC 2018 Task 1).

Example:
    import numpy as np
    truth = np.zeros((64, 64), "uint8"); truth[16:48, 16:48] = 255
    scores = per_image_scores(truth, truth / 255.0)
    scores["dice"]  # array([1.], dtype=float32)
    model.compile(optimizer="adam", loss="...", metrics=default_metrics())
"""

import math

import keras
import numpy as np
from keras import ops

from lesionkeras.shapes import as_float32, check_shapes
from lesionkeras.losses.smile import multiclass_probabilities

_PACKAGE = "lesionkeras"

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


# --------------------------------------------------------------------------
# Metric classes
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PerImageScore(keras.metrics.Metric):
    """Base class: mean over images of one per-image score.

    Subclasses set `score` to a key of `SCORE_NAMES`. State is a weighted
    sum of per-image scores and the sum of weights, so the result is exact
    across batches and replicas (both variables are summed, never averaged).

    Args:
        threshold: float in (0, 1). Probability at or above which a pixel is
            predicted foreground.
        from_logits: bool. Whether `y_pred` are logits (the compiled model
            outputs logits; True by default).
        class_id: Optional int. Score only this channel; None averages all
            channels. Give such metrics a distinct `name`, e.g.
            "dice_globules", or Keras will see duplicate names.
        name: Metric name.
        dtype: Keras dtype of the metric; the state is always float32.

    Example:
        Dice(class_id=2, name="dice_globules")
    """

    score = None

    def __init__(
        self, threshold=0.5, from_logits=True, class_id=None, name=None, dtype=None
    ):
        super().__init__(name=name, dtype=dtype)
        if self.score not in SCORE_NAMES:
            raise TypeError(
                f"{type(self).__name__} must set `score` to one of {SCORE_NAMES}."
            )
        _check_threshold(threshold)
        if class_id is not None:
            if isinstance(class_id, bool) or int(class_id) != class_id or class_id < 0:
                raise ValueError(
                    f"`class_id` must be None or an int >= 0; got {class_id!r}."
                )
            class_id = int(class_id)
        self.threshold = float(threshold)
        self.from_logits = bool(from_logits)
        self.class_id = class_id
        self.total = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="total"
        )
        self.count = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="count"
        )

    def _floor(self):
        return ISIC_JACCARD_FLOOR

    def per_image(self, y_true, y_pred):
        """The per-image score this metric averages, shape `(B,)`."""
        y_true = as_float32(y_true)
        y_pred = as_float32(y_pred)
        check_shapes(y_true, y_pred, self.name)
        if self.class_id is not None:
            channels = y_pred.shape[-1]
            if channels is not None and self.class_id >= channels:
                raise ValueError(
                    f"{self.name}: class_id={self.class_id} but y_pred has "
                    f"{channels} channels (shape {tuple(y_pred.shape)})."
                )
            # Slice before counting so a per-structure metric costs 1/K.
            k = self.class_id
            y_true = y_true[..., k : k + 1]
            y_pred = y_pred[..., k : k + 1]
        scores = _channel_scores(
            y_true, y_pred, self.threshold, self.from_logits, self._floor()
        )
        return ops.mean(scores[self.score], axis=-1)

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch.

        Args:
            y_true: Target masks, `(B, H, W, K)`.
            y_pred: Model outputs, same shape.
            sample_weight: None, a scalar, or one weight per image: `(B,)`
                (or `(B, 1)`). A weight of 0 leaves an image out.
        """
        values = self.per_image(y_true, y_pred)
        if sample_weight is None:
            weights = ops.ones_like(values)
        else:
            weights = as_float32(sample_weight)
            shape = tuple(weights.shape)
            if len(shape) == 0:
                weights = weights * ops.ones_like(values)
            else:
                if any(d is not None and d != 1 for d in shape[1:]):
                    raise ValueError(
                        f"{self.name}: sample_weight must hold one weight per "
                        f"image, shape (B,); got shape {shape}."
                    )
                weights = ops.reshape(weights, (-1,))
                n, b = weights.shape[0], values.shape[0]
                if n is not None and b is not None and n != b:
                    raise ValueError(
                        f"{self.name}: sample_weight has {n} weights for a "
                        f"batch of {b} images."
                    )
        self.total.assign_add(ops.sum(values * weights))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        # divide_no_nan: a metric that has seen no image reports 0, not NaN.
        return ops.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        config = super().get_config()
        config.update(
            threshold=self.threshold,
            from_logits=self.from_logits,
            class_id=self.class_id,
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dice(PerImageScore):
    """Mean per-image Dice coefficient of the thresholded prediction.

    Args: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[Dice(), Dice(class_id=0, name="dice_0")])
    """

    score = "dice"

    def __init__(
        self, threshold=0.5, from_logits=True, class_id=None, name="dice", dtype=None
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Jaccard(PerImageScore):
    """Mean per-image Jaccard index (IoU) of the thresholded prediction.

    Args: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[Jaccard(threshold=0.4)])
    """

    score = "jaccard"

    def __init__(
        self,
        threshold=0.5,
        from_logits=True,
        class_id=None,
        name="jaccard",
        dtype=None,
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ThresholdJaccard(PerImageScore):
    """Mean per-image thresholded Jaccard (ISIC 2018 Task 1 score).

    Each image's Jaccard below `floor` counts as 0, then images are averaged.

    Args:
        floor: float. Jaccard values below it count as 0.
        threshold, from_logits, class_id, name, dtype: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[ThresholdJaccard(floor=0.65)])
    """

    score = "threshold_jaccard"

    def __init__(
        self,
        floor=ISIC_JACCARD_FLOOR,
        threshold=0.5,
        from_logits=True,
        class_id=None,
        name="threshold_jaccard",
        dtype=None,
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)
        self.floor = float(floor)

    def _floor(self):
        return self.floor

    def get_config(self):
        config = super().get_config()
        config["floor"] = self.floor
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PixelAccuracy(PerImageScore):
    """Mean per-image fraction of correctly classified pixels.

    Args: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[PixelAccuracy()])
    """

    score = "pixel_accuracy"

    def __init__(
        self,
        threshold=0.5,
        from_logits=True,
        class_id=None,
        name="pixel_accuracy",
        dtype=None,
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Sensitivity(PerImageScore):
    """Mean per-image sensitivity (recall); 1 for an image with no lesion.

    Args: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[Sensitivity()])
    """

    score = "sensitivity"

    def __init__(
        self,
        threshold=0.5,
        from_logits=True,
        class_id=None,
        name="sensitivity",
        dtype=None,
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Specificity(PerImageScore):
    """Mean per-image specificity; 1 for an image with no background.

    Args: see `PerImageScore`.

    Example:
        model.compile(..., metrics=[Specificity()])
    """

    score = "specificity"

    def __init__(
        self,
        threshold=0.5,
        from_logits=True,
        class_id=None,
        name="specificity",
        dtype=None,
    ):
        super().__init__(threshold, from_logits, class_id, name, dtype)


def default_metrics(threshold=0.5, from_logits=True):
    """The six standard metrics, averaged over channels, default names.

    Args:
        threshold: float in (0, 1). Shared binarisation threshold.
        from_logits: bool. Whether the model outputs logits.

    Returns:
        list of new `Dice`, `Jaccard`, `ThresholdJaccard`, `PixelAccuracy`,
        `Sensitivity` and `Specificity` instances.

    Example:
        model.compile(optimizer="adam", loss=loss, metrics=default_metrics())
    """
    kwargs = dict(threshold=threshold, from_logits=from_logits)
    return [
        Dice(**kwargs),
        Jaccard(**kwargs),
        ThresholdJaccard(**kwargs),
        PixelAccuracy(**kwargs),
        Sensitivity(**kwargs),
        Specificity(**kwargs),
    ]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SoftmaxStructureScore(PerImageScore):
    """A per-image score of K structures predicted by a (K+1)-way softmax.

    `y_pred` are the K + 1 logits of `--method multiclass` (channel 0 is
    background); they become K per-structure probabilities with
    `losses.multiclass_probabilities` before scoring, so the scores compare
    directly with those of K sigmoid heads.

    Args:
        score: str. One of `SCORE_NAMES`, e.g. "dice".
        container: int or None. Channel of the enclosing structure.
        threshold, class_id, name, dtype: see `PerImageScore`.

    Example:
        SoftmaxStructureScore("dice", container=0, class_id=1, name="dice_globules")
    """

    def __init__(self, score="dice", container=None, threshold=0.5, class_id=None,
                 name=None, dtype=None):
        if score not in SCORE_NAMES:
            raise ValueError(f"`score` must be one of {SCORE_NAMES}. Received: score={score!r}")
        self.score = score
        self.container = None if container is None else int(container)
        super().__init__(threshold, False, class_id, name or score, dtype)

    def per_image(self, y_true, y_pred):
        return super().per_image(y_true, multiclass_probabilities(y_pred, self.container))

    def get_config(self):
        config = super().get_config()
        config.pop("from_logits", None)
        return {**config, "score": self.score, "container": self.container}
