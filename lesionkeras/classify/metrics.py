"""The official metrics of ISIC 2018 Tasks 2 and 3, and their reports.

Task 3 was ranked by balanced accuracy (the mean of the per-class recalls);
Task 2 by the Jaccard index of each attribute with the pixels pooled over the
whole set (one TP/FP/FN count per attribute, not a mean of per-image scores),
then averaged over the five attributes.
"""

import csv
from pathlib import Path

import keras
import numpy as np
from keras import ops

from lesionkeras import files


def confusion_matrix(y_true, y_pred, num_classes):
    """(K, K) int counts; row = true class, column = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same length. Received: {y_true.shape} "
            f"and {y_pred.shape}"
        )
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_scores(cm):
    """(recall, precision) arrays from a confusion matrix; NaN where undefined."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), np.nan)
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), np.nan)
    return recall, precision


def balanced_accuracy(y_true, y_pred, num_classes):
    """Mean recall over the classes present in `y_true` (ISIC 2018 Task 3's metric)."""
    recall, _ = per_class_scores(confusion_matrix(y_true, y_pred, num_classes))
    return float(np.nanmean(recall))


def classification_report(y_true, y_pred, classes):
    """Dict: balanced_accuracy, accuracy, recall_<c>, precision_<c>, count_<c> and `confusion`."""
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    recall, precision = per_class_scores(cm)
    report = {
        "balanced_accuracy": float(np.nanmean(recall)),
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "images": int(cm.sum()),
    }
    for i, c in enumerate(classes):
        # None (JSON null) where a class was never true / never predicted.
        report[f"recall_{c}"] = _finite_or_none(recall[i])
        report[f"precision_{c}"] = _finite_or_none(precision[i])
        report[f"count_{c}"] = int(cm[i].sum())
    report["confusion"] = cm.tolist()
    return report


def _finite_or_none(value):
    return float(value) if np.isfinite(value) else None


def _fmt(value):
    return "     n/a" if value is None else f"{value:.4f}"


def format_report(report, classes):
    """Human-readable table of a `classification_report`."""
    lines = [
        f"balanced accuracy {report['balanced_accuracy']:.4f}  accuracy {report['accuracy']:.4f}"
        f"  ({report['images']} images)",
        f"{'class':<8}{'n':>6}{'recall':>9}{'precision':>11}",
    ]
    for c in classes:
        lines.append(f"{c:<8}{report[f'count_{c}']:>6}{_fmt(report[f'recall_{c}']):>9}"
                     f"{_fmt(report[f'precision_{c}']):>11}")
    return "\n".join(lines)


def write_confusion(cm, classes, out_dir):
    """Writes `confusion.csv` (rows true, columns predicted) and `confusion.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cm = np.asarray(cm)
    with files.atomic_path(out_dir / "confusion.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["true\\predicted", *classes])
        for c, row in zip(classes, cm):
            w.writerow([c, *map(int, row)])
    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.7 * k))
    with np.errstate(invalid="ignore"):
        rate = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if rate[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xticks(range(k), classes, rotation=45)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    with files.atomic_path(out_dir / "confusion.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_dir / "confusion.csv", out_dir / "confusion.png"


@keras.saving.register_keras_serializable(package="lesionkeras")
class BalancedAccuracy(keras.metrics.Metric):
    """Streaming balanced accuracy from a confusion matrix held as a metric variable.

    `y_true` are class indices (B,) and `y_pred` scores (B, K); classes absent
    from the labels seen so far are left out of the mean.

    Args:
        num_classes: int. K.
        name: str. Defaults to `"balanced_accuracy"`.
    """

    def __init__(self, num_classes, name="balanced_accuracy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.matrix = self.add_variable(
            shape=(self.num_classes, self.num_classes), initializer="zeros", name="matrix"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        true = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        pred = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        k = self.num_classes
        counts = ops.sum(ops.one_hot(true * k + pred, k * k), axis=0)
        self.matrix.assign_add(ops.reshape(counts, (k, k)))

    def result(self):
        support = ops.sum(self.matrix, axis=1)
        recall = ops.diagonal(self.matrix) / ops.maximum(support, 1.0)
        present = ops.cast(support > 0, "float32")
        return ops.sum(recall * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.matrix.assign(ops.zeros_like(self.matrix))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def pooled_jaccard_counts(truth, pred):
    """(intersection, union) per attribute, summed over images and pixels.

    Args:
        truth, pred: arrays (N, H, W, A) of {0, 1} (or booleans).

    Returns:
        Two int arrays of shape (A,).
    """
    truth = np.asarray(truth).astype(bool)
    pred = np.asarray(pred).astype(bool)
    if truth.shape != pred.shape:
        raise ValueError(
            f"`truth` and `pred` must have the same shape. Received: {truth.shape} and "
            f"{pred.shape}"
        )
    axes = tuple(range(truth.ndim - 1))
    return (np.sum(truth & pred, axis=axes).astype(np.int64),
            np.sum(truth | pred, axis=axes).astype(np.int64))


def pooled_jaccard(intersection, union):
    """Jaccard per attribute from pooled counts (NaN where truth and prediction are empty)."""
    intersection = np.asarray(intersection, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


@keras.saving.register_keras_serializable(package="lesionkeras")
class PooledJaccard(keras.metrics.Metric):
    """Mean over attributes of the Jaccard with pixels pooled over everything seen.

    `y_true` are (B, H, W, A) masks in {0, 1}, `y_pred` (B, H, W, A) logits;
    `sample_weight` (same shape) leaves unknown pixels (weight 0) out.
    Attributes with an empty pooled union are left out of the mean.

    Args:
        num_attributes: int. A.
        threshold: float. Probability threshold. Defaults to 0.5.
        name: str. Defaults to `"jaccard"`.
    """

    def __init__(self, num_attributes, threshold=0.5, name="jaccard", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_attributes, self.threshold = int(num_attributes), float(threshold)
        self.intersection = self.add_variable(shape=(self.num_attributes,),
                                              initializer="zeros", name="intersection")
        self.union = self.add_variable(shape=(self.num_attributes,), initializer="zeros",
                                       name="union")

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth = ops.cast(y_true, "float32") > 0.5
        pred = ops.sigmoid(ops.cast(y_pred, "float32")) >= self.threshold
        w = 1.0 if sample_weight is None else ops.cast(sample_weight, "float32")
        axes = (0, 1, 2)
        self.intersection.assign_add(
            ops.sum(ops.cast(ops.logical_and(truth, pred), "float32") * w, axis=axes))
        self.union.assign_add(
            ops.sum(ops.cast(ops.logical_or(truth, pred), "float32") * w, axis=axes))

    def per_attribute(self):
        return self.intersection / ops.maximum(self.union, 1.0)

    def result(self):
        present = ops.cast(self.union > 0, "float32")
        return ops.sum(self.per_attribute() * present) / ops.maximum(ops.sum(present), 1.0)

    def reset_state(self):
        self.intersection.assign(ops.zeros_like(self.intersection))
        self.union.assign(ops.zeros_like(self.union))

    def get_config(self):
        return {**super().get_config(), "num_attributes": self.num_attributes,
                "threshold": self.threshold}
