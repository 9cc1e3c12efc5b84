"""Learning-rate range test (Smith 2017; fast.ai's `lr_find`).

Trains for a few hundred batches while the rate grows exponentially from
`min_lr` to `max_lr`, records the loss of each batch, smooths it, stops once it
diverges, and suggests the rate where the smoothed loss falls fastest. The
model's weights and optimizer state are put back afterwards, so the test can
precede training of the same model (staged training does this).

Reference: L. N. Smith, "Cyclical Learning Rates for Training Neural
Networks", WACV 2017.

Example:

```python
result = lr_range_test(model, train_ds, steps=100)
result.suggestion  # e.g. 3e-3
```
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from lesionkeras import files
from lesionkeras.training import method as method_lib
from lesionkeras.training.method import RunData
from lesionkeras.training.segmentation import SegmentationMethod, build_model, compile_plain


@dataclasses.dataclass
class LRFindResult:
    """Rates tried, raw and smoothed losses, and the suggested rate."""

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestion: float
    diverged: bool
    # False when the smoothed loss never fell by more than the batch-to-batch
    # noise of the loss at the smallest rates: the curve is flat noise (typical
    # of a model already trained, e.g. after a pyramid transfer) and the
    # steepest point of it says nothing. See `is_conclusive`.
    conclusive: bool = True

    def write_csv(self, path):
        pd.DataFrame(
            {"learning_rate": self.lrs, "loss": self.losses, "smoothed_loss": self.smoothed}
        ).to_csv(path, index=False)


def suggest(lrs, smoothed, skip_start=None, skip_end=None):
    """The rate of steepest descent of the smoothed loss against log(lr).

    The first and last points are ignored (by default a tenth and a twentieth
    of them, at least one each): the smoothing's warm-up and the divergence
    make their slopes meaningless.
    """
    lrs, smoothed = np.asarray(lrs, float), np.asarray(smoothed, float)
    skip_start = max(len(lrs) // 10, 1) if skip_start is None else skip_start
    skip_end = max(len(lrs) // 20, 1) if skip_end is None else skip_end
    if len(lrs) < 3:
        return float(lrs[int(np.argmin(smoothed))]) if len(lrs) else float("nan")
    slopes = np.gradient(smoothed, np.log(lrs))
    lo, hi = min(skip_start, len(lrs) - 2), max(len(lrs) - skip_end, 2)
    return float(lrs[lo + int(np.argmin(slopes[lo:hi]))])


def is_conclusive(losses, smoothed):
    """Whether the smoothed loss fell by more than the noise of the raw loss.

    The noise is the standard deviation of the raw batch losses over the first
    third of the test, where the rate is too small to change the model; the
    fall is their mean minus the lowest smoothed value (not the first smoothed
    value, which is one noisy batch). A fall within the noise means the range
    test found no rate that clearly lowers the loss.
    """
    losses, smoothed = np.asarray(losses, float), np.asarray(smoothed, float)
    if len(losses) < 6:
        return False
    start = losses[: len(losses) // 3]
    return float(np.mean(start) - smoothed.min()) > float(np.std(start))


def lr_range_test(model, dataset, *, min_lr=1e-7, max_lr=10.0, steps=100, beta=0.98,
                  diverge=4.0):
    """Runs the range test on a compiled model and restores its state.

    Args:
        model: compiled `keras.Model` whose optimizer has a constant (not
            scheduled) learning rate.
        dataset: `tf.data.Dataset` of (image, mask) batches; repeated as needed.
        min_lr: float. First rate. Defaults to 1e-7.
        max_lr: float. Last rate. Defaults to 10.
        steps: int. Batches (at most). Defaults to 100.
        beta: float. Exponential smoothing of the loss (bias-corrected). Defaults to 0.98.
        diverge: float. Stop once the smoothed loss exceeds this times its best.
            Defaults to 4.

    Returns:
        `LRFindResult`.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(
            f"Need 0 < min_lr < max_lr. Received: min_lr={min_lr}, max_lr={max_lr}"
        )
    if steps < 2:
        raise ValueError(f"`steps` must be >= 2. Received: steps={steps}")
    optimizer = model.optimizer
    if isinstance(optimizer._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        raise ValueError("lr_range_test needs an optimizer with a constant learning rate")
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    saved_weights = [keras.ops.convert_to_numpy(v) for v in model.weights]
    saved_opt = [keras.ops.convert_to_numpy(v) for v in optimizer.variables]
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    try:
        for i, (x, y) in enumerate(dataset.repeat().take(steps)):
            lr = min_lr * (max_lr / min_lr) ** (i / (steps - 1))
            optimizer.learning_rate = lr
            loss = float(model.train_on_batch(x, y, return_dict=True)["loss"])
            if not math.isfinite(loss):
                diverged = True
                break
            avg = beta * avg + (1 - beta) * loss
            smooth = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(smooth)
            best = min(best, smooth)
            if i > 0 and smooth > diverge * best:
                diverged = True
                break
    finally:
        for v, value in zip(model.weights, saved_weights):
            v.assign(value)
        for v, value in zip(optimizer.variables, saved_opt):
            v.assign(value)
    return LRFindResult(
        np.array(lrs), np.array(losses), np.array(smoothed),
        suggest(lrs, smoothed), diverged, is_conclusive(losses, smoothed),
    )


def plot(result, path, size=(640, 420)):
    """Writes smoothed loss against log10(lr) as a PNG (Pillow; no matplotlib).

    The raw losses are light grey dots, the smoothed loss a line, and the
    suggested rate a red vertical line.
    """
    w, h = size
    left, right, top, bottom = 70, 20, 30, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    lx = np.log10(result.lrs) if len(result.lrs) else np.array([0.0, 1.0])
    ys = np.concatenate([result.smoothed, result.losses]) if len(result.lrs) else np.array([0, 1.0])
    x0, x1 = float(lx.min()), float(lx.max()) if lx.max() > lx.min() else float(lx.min()) + 1
    # The divergence can be huge; scale to what the smoothed curve shows.
    y0 = float(np.min(ys))
    shown = result.smoothed[:-1] if result.diverged and len(result.smoothed) > 2 else result.smoothed
    y1 = float(np.max(shown)) if len(shown) else 1.0
    y1 = y1 if y1 > y0 else y0 + 1.0

    def px(x, y):
        fx = (x - x0) / (x1 - x0)
        fy = (min(y, y1) - y0) / (y1 - y0)
        return left + fx * (w - left - right), h - bottom - fy * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for decade in range(math.ceil(x0), math.floor(x1) + 1):
        x, _ = px(decade, y0)
        draw.line([x, h - bottom, x, h - bottom + 5], fill="black")
        draw.text((x - 12, h - bottom + 8), f"1e{decade}", fill="black")
    for k in range(5):
        y_val = y0 + (y1 - y0) * k / 4
        _, y = px(x0, y_val)
        draw.line([left - 5, y, left, y], fill="black")
        draw.text((5, y - 6), f"{y_val:.3g}", fill="black")
    for x, y in zip(lx, result.losses):
        cx, cy = px(x, y)
        draw.point((cx, cy), fill=(170, 170, 170))
    if len(lx) > 1:
        draw.line([px(x, y) for x, y in zip(lx, result.smoothed)], fill=(30, 90, 200), width=2)
    if math.isfinite(result.suggestion):
        sx, _ = px(math.log10(result.suggestion), y0)
        draw.line([sx, top, sx, h - bottom], fill=(220, 30, 30), width=1)
        draw.text((sx + 4, top + 4), f"suggested {result.suggestion:.2g}", fill=(220, 30, 30))
    draw.text((w // 2 - 60, h - 18), "learning rate (log scale)", fill="black")
    draw.text((left, 8), "smoothed training loss", fill="black")
    img.save(path)


def train_dataset(cfg):
    """The training batches of `cfg` (augmented, normalised) and the training image count."""
    method = SegmentationMethod(cfg)
    method.check()
    df, _ = method_lib.create(cfg).manifest()  # the method's own data (e.g. simulated noise)
    data = RunData(df[df["split"] == "train"].reset_index(drop=True), df.iloc[:0])
    method.prepare(data)
    return method.train_dataset(data), len(data.train_df)


def run_lr_find(cfg, out_dir, *, min_lr=1e-7, max_lr=10.0, steps=100):
    """`lesionkeras lr-find`: range test of the model `cfg` describes.

    Writes `out_dir/lr_find.csv` and `out_dir/lr_find.png` (each whole or not at
    all; `out_dir` is checked first, `files.check_output`) and returns the
    `LRFindResult`. The schedule of `cfg` is ignored (the test drives the rate).
    """
    out = files.check_output(out_dir)  # before the data and the test: they take a while
    keras.utils.set_random_seed(cfg.seed)
    ds, _ = train_dataset(cfg)
    cfg = cfg.override({"train.schedule": "constant"})
    model = compile_plain(build_model(cfg), cfg)
    result = lr_range_test(model, ds, min_lr=min_lr, max_lr=max_lr, steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out / "lr_find.csv") as tmp:
        result.write_csv(tmp)
    with files.atomic_path(out / "lr_find.png") as tmp:
        plot(result, tmp)
    return result
