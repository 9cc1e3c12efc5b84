"""Overhead of `lesionkeras fit` over a plain `keras.Model.fit` of the same U-Net.

A is `lesionkeras.training.run.fit(cfg)` in-process: the `lesionkeras fit
--method baseline` code path, with its tf.data pipeline (augmentation), the
compiled metrics and all its callbacks (backup, NaN stop, learning-rate log,
two checkpoints, CSV, TensorBoard, image grid). B is the same model builder,
loss, optimizer and train/val split as in-memory tf.data datasets, compiled
with no metrics and fitted with no callbacks. Runs alternate (A B A B ...,
the order rotated every round). A timing callback, appended last to every
fit, reads the step times (intervals between batch ends) and, per epoch, the
first step, validation and epoch-end times; the first epoch (tracing) is
excluded. Both run at verbose=0.

Unless `--no-breakdown`, two more variants attribute the difference:
C = B + the lesionkeras metrics, D = C + the lesionkeras input pipeline
(so A - D is the callbacks). The time spent in each callback's hooks is
measured inside the A runs.

Goal: A / B <= 1.10 in time per training step (whole epoch, incl. validation
and epoch-end work, divided by the training steps).

    python benchmarks/fit_overhead.py [--quick]
"""

from __future__ import annotations

import collections
import contextlib
import gc
import time
from pathlib import Path

import _common

GOAL = 1.10


def make_epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        """Wall times of each epoch; append it last so it sees the others' epoch-end work.

        Args:
            hook_totals: dict. Running seconds per instrumented callback; a copy
                is stored at every epoch end.
        """

        # It only reads the clock, so Keras may keep dispatching batch ends
        # asynchronously, as it does when no callback has batch hooks.
        async_safe = True

        def __init__(self, hook_totals):
            super().__init__()
            self.hook_totals = hook_totals
            self.epochs = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._test = None
            self._batch_ends = []

        def on_train_batch_end(self, batch, logs=None):
            self._batch_ends.append(time.perf_counter())

        def on_test_begin(self, logs=None):
            self._test = [time.perf_counter(), None]

        def on_test_end(self, logs=None):
            self._test[1] = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            end = time.perf_counter()
            test = self._test or (end, end)
            self.epochs.append(
                dict(
                    first=self._batch_ends[0] - self._start,
                    steps=[b - a for a, b in zip(self._batch_ends, self._batch_ends[1:])],
                    train=test[0] - self._start,
                    val=test[1] - test[0],
                    rest=end - test[1],
                    epoch=end - self._start,
                    hooks=dict(self.hook_totals),
                )
            )

    return EpochTimer


def instrument(callbacks, totals):
    """Wraps every overridden `on_*` hook of `callbacks` to add its seconds to `totals`.

    Default (not overridden) hooks are left alone: Keras dispatches batch-end
    hooks asynchronously only when no callback overrides them.
    """
    names = collections.Counter()
    for cb in callbacks:
        names[type(cb).__name__] += 1
        key = f"{type(cb).__name__}#{names[type(cb).__name__]}"
        totals.setdefault(key, 0.0)
        for attr in (a for a in dir(cb) if a.startswith("on_")):
            method = getattr(cb, attr)
            if callable(method) and not getattr(method, "_is_default", False):
                setattr(cb, attr, _timed_hook(method, totals, key))


def _timed_hook(method, totals, key):
    def hook(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    return hook


@contextlib.contextmanager
def timed_fits(timer):
    """While active, every `keras.Model.fit` gets its callbacks instrumented and `timer` appended."""
    import keras

    original = keras.Model.fit

    def fit(self, *args, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        instrument(callbacks, timer.hook_totals)
        return original(self, *args, callbacks=callbacks + [timer], **kwargs)

    keras.Model.fit = fit
    try:
        yield
    finally:
        del keras.Model.fit  # back to the inherited trainer method


class Data:
    """The train/val split of `run.fit`, decoded, as in-memory arrays and statistics."""

    def __init__(self, cfg):
        import numpy as np

        from lesionkeras.data import pipeline
        from lesionkeras.training import run

        df, _ = run.prepare_data(cfg)
        decoded = {
            split: pipeline.decoded_dataset(
                df[df["split"] == split].reset_index(drop=True), cfg.data.image_size
            )
            for split in ("train", "val")
        }
        self.decoded = decoded
        self.mean, self.std = pipeline.compute_stats(decoded["train"])
        norm = pipeline.normalizer(self.mean, self.std)
        self.arrays = {}
        for split, ds in decoded.items():
            x, y = zip(*ds.as_numpy_iterator())
            self.arrays[split] = (norm(np.stack(x)).numpy(), np.stack(y).astype("float32"))

    def in_memory(self, batch, seed):
        import tensorflow as tf

        x, y = self.arrays["train"]
        train = (
            tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed)
            .batch(batch, drop_remainder=len(x) >= batch)
            .prefetch(tf.data.AUTOTUNE)
        )
        val = tf.data.Dataset.from_tensor_slices(self.arrays["val"]).batch(batch)
        return train, val

    def lesionkeras(self, cfg):
        from lesionkeras.data import pipeline

        common = dict(batch_size=cfg.train.batch_size, mean=self.mean, std=self.std)
        train = pipeline.make_dataset(
            self.decoded["train"], training=True, augment=cfg.augment, seed=cfg.seed, **common
        )
        val = pipeline.make_dataset(self.decoded["val"], training=False, **common)
        return train, val


def plain_fit(cfg, data, *, with_metrics, lesionkeras_data):
    """`keras.Model.fit` of the `cfg` U-Net with no callbacks (variants B, C, D)."""
    import keras

    from lesionkeras import losses, metrics
    from lesionkeras.training import segmentation

    keras.utils.set_random_seed(cfg.seed)
    model = segmentation.build_model(cfg)
    model.compile(
        optimizer=segmentation.make_optimizer(cfg.train),
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics.default_metrics(cfg.train.threshold) if with_metrics else None,
        jit_compile=segmentation.jit_option(cfg.train),
    )
    if lesionkeras_data:
        train, val = data.lesionkeras(cfg)
    else:
        train, val = data.in_memory(cfg.train.batch_size, cfg.seed)
    model.fit(train, validation_data=val, epochs=cfg.train.epochs, verbose=0, shuffle=False)


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="Image side in pixels.")
    p.add_argument("--count", type=int, default=320, help="Synthetic images (80%% train).")
    p.add_argument("--batch", type=int, default=8, help="Batch size.")
    p.add_argument("--epochs", type=int, default=4, help="Epochs per run (the first is excluded).")
    p.add_argument("--rounds", type=int, default=3, help="Alternating rounds.")
    p.add_argument("--no-breakdown", action="store_true", help="Run only A and B.")
    args = p.parse_args()
    if args.quick:
        args.count, args.epochs, args.rounds, args.no_breakdown = 240, 3, 2, True
    cache = _common.setup(args.cache)

    import keras

    from lesionkeras.config import load_config
    from lesionkeras.training import run

    cfg = load_config(
        None,
        {
            "seed": args.seed,
            "data.image_size": args.size,
            "data.synthetic_count": args.count,
            "train.batch_size": args.batch,
            "train.epochs": args.epochs,
        },
    )
    data = Data(cfg)
    steps = len(data.arrays["train"][0]) // args.batch
    variants = {
        "A lesionkeras fit": None,
        "B plain keras fit": dict(with_metrics=False, lesionkeras_data=False),
    }
    if not args.no_breakdown:
        variants["C = B + metrics"] = dict(with_metrics=True, lesionkeras_data=False)
        variants["D = C + lesionkeras pipeline"] = dict(with_metrics=True, lesionkeras_data=True)

    EpochTimer = make_epoch_timer()
    runs = collections.defaultdict(list)  # variant -> per-epoch records of each run
    wall = collections.defaultdict(list)  # variant -> seconds of the whole call
    names = list(variants)
    for r in range(args.rounds):
        # Rotate the order, so no variant always runs right after A's teardown.
        for name in names[r % len(names):] + names[: r % len(names)]:
            options = variants[name]
            keras.backend.clear_session()
            gc.collect()
            timer = EpochTimer({})
            start = time.perf_counter()
            with timed_fits(timer):
                if options is None:
                    out = Path(cache) / "runs" / f"round{r}"
                    run.fit(cfg.override({"out": str(out)}), verbose=0, log=lambda *a: None)
                else:
                    plain_fit(cfg, data, **options)
            wall[name].append(time.perf_counter() - start)
            runs[name].append(_per_epoch_hooks(timer.epochs))
            print(f"round {r + 1}/{args.rounds}: {name}: {wall[name][-1]:.1f} s", flush=True)
    print()
    text = report(args, runs, wall, steps, len(data.arrays["val"][0]))
    _common.emit("fit_overhead", text, write=not args.no_write)


def report(args, runs, wall, steps, n_val):
    """The markdown report of the measured epochs.

    Per variant, over epochs 2..n of all runs: the median step (interval
    between batch ends), and the medians of the first step (iterator set-up
    included), validation and epoch-end work; an epoch is then
    first + (steps - 1) * step + validation + epoch end.
    """
    med = {}
    for name, rs in runs.items():
        later = [e for r in rs for e in r[1:]]
        m = {k: _common.median([e[k] for e in later]) for k in ("first", "val", "rest")}
        m["step"] = _common.median([s for e in later for s in e["steps"]])
        m["best step"] = min(s for e in later for s in e["steps"])
        m["epoch"] = m["first"] + (steps - 1) * m["step"] + m["val"] + m["rest"]
        m["hooks"] = {k: _common.median([e["hooks"][k] for e in later]) for k in later[0]["hooks"]}
        m["first hooks"] = {k: _common.median([r[0]["hooks"][k] for r in rs]) for k in m["hooks"]}
        med[name] = m
    a, b = med["A lesionkeras fit"], med["B plain keras fit"]
    rows = [
        [name, 1000 * m["step"], 1000 * m["first"], 1000 * m["val"], 1000 * m["rest"],
         1000 * m["epoch"] / steps, m["epoch"] / b["epoch"], _common.median(wall[name])]
        for name, m in med.items()
    ]
    ratio = a["epoch"] / b["epoch"]

    # Steps and validation grow with the data; the rest is paid once per epoch.
    def projected(m, n):
        return n * (m["step"] + m["val"] / steps) + m["first"] - m["step"] + m["rest"]

    hooks = sorted(
        ([key, 1000 * t, f"{100 * t / a['epoch']:.1f} %", 1000 * a["first hooks"][key]]
         for key, t in a["hooks"].items()),
        key=lambda row: -row[1],
    )
    lines = [
        f"## `lesionkeras fit` vs plain `keras.Model.fit` ({args.size} px, batch {args.batch}, "
        f"{steps} train steps/epoch, {n_val} val images; medians over epochs 2..{args.epochs} "
        f"of {args.rounds} alternating rounds)",
        "",
        _common.table(
            ["variant", "step ms", "first step ms", "validation ms/epoch", "epoch end ms/epoch",
             "epoch ms/step", "vs B", "whole call s"],
            rows,
        ),
        "",
        f"- time per training step, whole epoch: A / B {_common.verdict(ratio, GOAL, False)}",
        f"- step: A / B = {a['step'] / b['step']:.2f} (best steps: "
        f"{1000 * a['best step']:.1f} vs {1000 * b['best step']:.1f} ms, "
        f"{a['best step'] / b['best step']:.2f}); first step: "
        f"{a['first'] / b['first']:.2f}; validation: {a['val'] / b['val']:.2f}; "
        f"epoch end: A {1000 * a['rest']:.0f} ms vs B {1000 * b['rest']:.0f} ms",
        "- projected A / B for longer epochs (same step and validation share, same "
        "per-epoch work): "
        + ", ".join(f"{n} steps {projected(a, n) / projected(b, n):.2f}" for n in (100, 200, 1000)),
    ]
    if len(runs) > 2:
        c, d = med["C = B + metrics"], med["D = C + lesionkeras pipeline"]
        lines.append(
            "- attribution per epoch: metrics (C - B) "
            f"{1000 * (c['epoch'] - b['epoch']):+.0f} ms, pipeline (D - C) "
            f"{1000 * (d['epoch'] - c['epoch']):+.0f} ms, callbacks and the rest of "
            f"run.fit (A - D) {1000 * (a['epoch'] - d['epoch']):+.0f} ms"
        )
    lines += [
        "",
        "Time inside each callback's hooks in A (median per epoch; epoch 1 includes "
        "on_train_begin):",
        "",
        _common.table(["callback", "ms/epoch", "share of A's epoch", "ms in epoch 1"], hooks),
    ]
    return "\n".join(lines)


def _per_epoch_hooks(epochs):
    """Turns the cumulative hook totals of each epoch record into per-epoch seconds."""
    previous = collections.defaultdict(float)
    for e in epochs:
        totals = e["hooks"]
        e["hooks"] = {k: v - previous[k] for k, v in totals.items()}
        previous.update(totals)
    return epochs


if __name__ == "__main__":
    main()
