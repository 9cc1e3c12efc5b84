"""Keras metrics that average a per-image score over images (`Dice`, `Jaccard`, ...) and `default_metrics`."""

import keras
from keras import ops

from lesionkeras.metrics.scores import ISIC_JACCARD_FLOOR, SCORE_NAMES, _channel_scores, _check_threshold
from lesionkeras.shapes import as_float32, check_shapes

_PACKAGE = "lesionkeras"


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
