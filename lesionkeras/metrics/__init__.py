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

Boundary scores (`boundary`: HD95 and ASSD, numpy/scipy on full-size masks,
`evaluate` only) have their own definitions and empty-mask conventions there:
0 when both masks are empty, NaN when exactly one is.

The package holds `scores` (the pure functions), `per_image` (the Keras metric
classes and `default_metrics`), `boundary` and `softmax` (`SoftmaxStructureScore`); this
module re-exports their public names, and importing it registers every metric
class for loading saved models.

Example:
    import numpy as np
    truth = np.zeros((64, 64), "uint8"); truth[16:48, 16:48] = 255
    scores = per_image_scores(truth, truth / 255.0)
    scores["dice"]  # array([1.], dtype=float32)
    model.compile(optimizer="adam", loss="...", metrics=default_metrics())
"""

from lesionkeras.metrics.boundary import (
    BOUNDARY_MM_NAMES, BOUNDARY_NAMES, boundary_scores, check_spacing, surface, surface_distances)
from lesionkeras.metrics.per_image import (
    Dice, Jaccard, PerImageScore, PixelAccuracy, Sensitivity, Specificity, ThresholdJaccard,
    default_metrics)
from lesionkeras.metrics.scores import (
    ISIC_JACCARD_FLOOR, SCORE_NAMES, confusion_counts, per_image_scores, scores_from_counts,
    threshold_jaccard)
from lesionkeras.metrics.softmax import SoftmaxStructureScore

__all__ = [
    "ISIC_JACCARD_FLOOR", "SCORE_NAMES", "confusion_counts", "scores_from_counts",
    "threshold_jaccard", "per_image_scores", "PerImageScore", "Dice", "Jaccard",
    "ThresholdJaccard", "PixelAccuracy", "Sensitivity", "Specificity", "default_metrics",
    "SoftmaxStructureScore", "BOUNDARY_NAMES", "BOUNDARY_MM_NAMES", "boundary_scores",
    "check_spacing", "surface", "surface_distances",
]
