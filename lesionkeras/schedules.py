"""Learning-rate schedules: one-cycle, slanted triangular, linear decay, plateau-divide.

The first three are `keras.optimizers.schedules.LearningRateSchedule`
subclasses evaluated at the optimizer's step, so they are saved with the
optimizer in `.keras` files and continue where they were after `--resume`.
Plateau-divide depends on validation results, so it is a callback.

Example:

```python
schedule = OneCycle(max_lr=1e-3, total_steps=1000)
optimizer = keras.optimizers.Adam(schedule)
```
"""

import math

import keras
from keras import ops

SCHEDULES = ("constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau")


def _fraction(step, start, length):
    """(step - start) / length clipped to [0, 1], as float32."""
    t = (ops.cast(step, "float32") - float(start)) / float(max(length, 1))
    return ops.clip(t, 0.0, 1.0)


def _anneal(start, end, t, mode):
    if mode == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + ops.cos(math.pi * t))


def _check_steps(total_steps):
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an integer >= 1. Received: total_steps={total_steps!r}")


@keras.saving.register_keras_serializable(package="lesionkeras")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Smith's one-cycle policy, in the annealed form fast.ai uses.

    The rate rises from `max_lr / div_factor` to `max_lr` over the first
    `pct_start` of the steps, then falls to `max_lr / div_factor /
    final_div_factor` at `total_steps` (and stays there). With
    `anneal="cos"` both phases are half cosines (fast.ai, PyTorch
    `OneCycleLR`); `"linear"` gives Smith's original triangle.

    Reference: L. N. Smith, "A disciplined approach to neural network
    hyper-parameters: Part 1", 2018 (arXiv:1803.09820).

    Args:
        max_lr: float. Peak learning rate.
        total_steps: int. Optimizer steps of the whole cycle.
        pct_start: float. Fraction of the steps spent rising. Defaults to 0.3.
        div_factor: float. `max_lr / initial_lr`. Defaults to 25.
        final_div_factor: float. `initial_lr / final_lr`. Defaults to 1e4.
        anneal: str. `"cos"` or `"linear"`. Defaults to `"cos"`.
        name: str. Defaults to `"one_cycle"`.

    Example:

    >>> s = OneCycle(1.0, total_steps=100, pct_start=0.25)
    >>> float(s(25))
    1.0
    """

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0,
                 final_div_factor=1e4, anneal="cos", name="one_cycle"):
        _check_steps(total_steps)
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"`pct_start` must be in (0, 1). Received: pct_start={pct_start}")
        if div_factor < 1.0 or final_div_factor < 1.0:
            raise ValueError(
                "`div_factor` and `final_div_factor` must be >= 1. Received: "
                f"div_factor={div_factor}, final_div_factor={final_div_factor}"
            )
        if anneal not in ("cos", "linear"):
            raise ValueError(f"`anneal` must be 'cos' or 'linear'. Received: anneal={anneal!r}")
        self.max_lr = float(max_lr)
        self.total_steps = total_steps
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)
        self.anneal = anneal
        self.name = name

    def __call__(self, step):
        up = max(int(round(self.pct_start * self.total_steps)), 1)
        initial = self.max_lr / self.div_factor
        final = initial / self.final_div_factor
        rising = _anneal(initial, self.max_lr, _fraction(step, 0, up), self.anneal)
        falling = _anneal(self.max_lr, final, _fraction(step, up, self.total_steps - up), self.anneal)
        return ops.where(ops.cast(step, "float32") < up, rising, falling)

    def get_config(self):
        return {
            "max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
            "div_factor": self.div_factor, "final_div_factor": self.final_div_factor,
            "anneal": self.anneal, "name": self.name,
        }


@keras.saving.register_keras_serializable(package="lesionkeras")
class SlantedTriangular(keras.optimizers.schedules.LearningRateSchedule):
    """Slanted triangular learning rate (Howard & Ruder 2018, eq. 3).

    `cut = floor(T * cut_frac)`; `p = t / cut` for `t < cut`, else
    `1 - (t - cut) / (cut * (1 / cut_frac - 1))`; the rate is
    `max_lr * (1 + p * (ratio - 1)) / ratio`, so it climbs linearly for a short
    while and then decays linearly for long, from and to `max_lr / ratio`.

    Reference: J. Howard, S. Ruder, "Universal Language Model Fine-tuning for
    Text Classification", ACL 2018.

    Args:
        max_lr: float. Peak learning rate.
        total_steps: int. T, the number of optimizer steps.
        cut_frac: float. Fraction of the steps spent rising. Defaults to 0.1.
        ratio: float. How much smaller the lowest rate is than `max_lr`. Defaults to 32.
        name: str. Defaults to `"slanted_triangular"`.

    Example:

    >>> s = SlantedTriangular(0.01, total_steps=1000)
    >>> round(float(s(100)), 6)
    0.01
    """

    def __init__(self, max_lr, total_steps, cut_frac=0.1, ratio=32.0, name="slanted_triangular"):
        _check_steps(total_steps)
        if not 0.0 < cut_frac < 1.0:
            raise ValueError(f"`cut_frac` must be in (0, 1). Received: cut_frac={cut_frac}")
        if ratio < 1.0:
            raise ValueError(f"`ratio` must be >= 1. Received: ratio={ratio}")
        self.max_lr = float(max_lr)
        self.total_steps = total_steps
        self.cut_frac = float(cut_frac)
        self.ratio = float(ratio)
        self.name = name

    def __call__(self, step):
        cut = max(math.floor(self.total_steps * self.cut_frac), 1)
        t = ops.minimum(ops.cast(step, "float32"), float(self.total_steps))
        p = ops.where(
            t < cut,
            t / cut,
            1.0 - (t - cut) / (cut * (1.0 / self.cut_frac - 1.0)),
        )
        p = ops.maximum(p, 0.0)
        return self.max_lr * (1.0 + p * (self.ratio - 1.0)) / self.ratio

    def get_config(self):
        return {
            "max_lr": self.max_lr, "total_steps": self.total_steps,
            "cut_frac": self.cut_frac, "ratio": self.ratio, "name": self.name,
        }


@keras.saving.register_keras_serializable(package="lesionkeras")
class LinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear decay from `initial_lr` to `final_lr` over `total_steps`, then constant.

    Args:
        initial_lr: float. Rate at step 0.
        total_steps: int. Steps until `final_lr` is reached.
        final_lr: float. Rate from `total_steps` on. Defaults to 0.
        name: str. Defaults to `"linear_decay"`.

    Example:

    >>> float(LinearDecay(1.0, total_steps=10)(5))
    0.5
    """

    def __init__(self, initial_lr, total_steps, final_lr=0.0, name="linear_decay"):
        _check_steps(total_steps)
        if final_lr < 0:
            raise ValueError(f"`final_lr` must be >= 0. Received: final_lr={final_lr}")
        self.initial_lr = float(initial_lr)
        self.total_steps = total_steps
        self.final_lr = float(final_lr)
        self.name = name

    def __call__(self, step):
        return _anneal(self.initial_lr, self.final_lr, _fraction(step, 0, self.total_steps), "linear")

    def get_config(self):
        return {
            "initial_lr": self.initial_lr, "total_steps": self.total_steps,
            "final_lr": self.final_lr, "name": self.name,
        }


class PlateauDivide(keras.callbacks.ReduceLROnPlateau):
    """Divides the learning rate by `divide` when `monitor` stops improving.

    Keras' `ReduceLROnPlateau` with the factor given the way the papers give
    it ("divide by 10 after 5 epochs without improvement").

    Args:
        monitor: str. Quantity watched. Defaults to `"val_dice"`.
        divide: float. Divisor (> 1). Defaults to 10.
        patience: int. Epochs without improvement before dividing. Defaults to 5.
        min_lr: float. Lower bound. Defaults to 0.
    """

    def __init__(self, monitor="val_dice", divide=10.0, patience=5, min_lr=0.0, **kwargs):
        if divide <= 1.0:
            raise ValueError(f"`divide` must be > 1. Received: divide={divide}")
        mode = "min" if "loss" in monitor else "max"
        super().__init__(
            monitor=monitor, factor=1.0 / divide, patience=patience, mode=mode,
            min_lr=min_lr, verbose=0, **kwargs,
        )


def make_schedule(train_cfg, steps_per_epoch):
    """The learning rate of `keras.optimizers.*` for the `[train]` table.

    Args:
        train_cfg: `TrainConfig`. Uses `schedule`, `lr`, `epochs` and the
            schedule's own keys; `lr` is the peak (one-cycle, STLR) or initial rate.
        steps_per_epoch: int or None. None with a step schedule raises.

    Returns:
        A float (constant, plateau) or a `LearningRateSchedule`.
    """
    kind = train_cfg.schedule
    if kind in ("constant", "plateau"):
        return train_cfg.lr
    if not steps_per_epoch:
        raise ValueError(f"schedule {kind!r} needs the number of steps per epoch")
    total = int(steps_per_epoch) * train_cfg.epochs
    if kind == "one_cycle":
        return OneCycle(
            train_cfg.lr, total, pct_start=train_cfg.pct_start,
            div_factor=train_cfg.div_factor, final_div_factor=train_cfg.final_div_factor,
        )
    if kind == "slanted_triangular":
        return SlantedTriangular(
            train_cfg.lr, total, cut_frac=train_cfg.cut_frac, ratio=train_cfg.stlr_ratio
        )
    if kind == "linear_decay":
        return LinearDecay(train_cfg.lr, total, final_lr=train_cfg.final_lr)
    raise ValueError(f"Unknown schedule {kind!r}; expected one of {SCHEDULES}")


def schedule_callbacks(train_cfg, monitor="val_dice"):
    """Callbacks a schedule needs (plateau-divide), else an empty list."""
    if train_cfg.schedule == "plateau":
        return [
            PlateauDivide(monitor, divide=train_cfg.plateau_divide,
                          patience=train_cfg.plateau_patience)
        ]
    return []


def make_optimizer(train_cfg, steps_per_epoch=None, learning_rate=None):
    """Adam, AdamW or SGD with momentum, as the `[train]` table says.

    Args:
        train_cfg: `TrainConfig`.
        steps_per_epoch: int or None. Needed by the step schedules
            (`one_cycle`, `slanted_triangular`, `linear_decay`).
        learning_rate: float or schedule, or None. Replaces `train.schedule`'s rate
            (e.g. the step decay of the ISIC 2018 classifiers).
    """
    lr = make_schedule(train_cfg, steps_per_epoch) if learning_rate is None else learning_rate
    if train_cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if train_cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train_cfg.weight_decay)
    return keras.optimizers.SGD(
        lr,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay or None,
    )
