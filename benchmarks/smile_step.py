"""Cost of a SMILE step against a plain sigmoid-BCE step, and of MC-dropout inference.

A = one SMILE step: the weight maps built from the masks and annotated
flags (`missing.nested_targets_and_weights`, as the data pipeline does),
then a step of the ResNet-DeepLab with `SmileLoss` and the maps as
`sample_weight`; B = one step of the same network (same initial weights)
with `keras.losses.BinaryCrossentropy(from_logits=True)` and no weights.
Both on fixed random batches, timed alternately (A B A B ..., order rotated
every round) after a warm-up step each; the ratio of medians is reported
(goal <= 1.05: the weight maps must cost next to nothing). Then MC-dropout
inference: seconds per Monte-Carlo sample of `mc_dropout_predict` over one
plain `predict` of the same batch.

    python benchmarks/smile_step.py [--quick] [--size 64] [--batch 8] [--filters 32]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--filters", type=int, default=32)
    p.add_argument("--samples", type=int, default=10, help="MC-dropout samples.")
    args = p.parse_args()
    _common.setup(args.cache)
    import keras
    import numpy as np
    import tensorflow as tf

    from lesionkeras import losses
    from lesionkeras.data import missing
    from lesionkeras.inference.predictor import mc_dropout_predict
    from lesionkeras.models import deeplab

    k = len(missing.DEFAULT_STRUCTURES)
    rounds = 7 if args.quick else 21
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    masks = (rng.random((args.batch, args.size, args.size, k)) > 0.7).astype("float32")
    flags = (rng.random((args.batch, k)) > 0.5).astype("float32")

    def model(loss):
        keras.utils.set_random_seed(args.seed)
        m = deeplab.build_resnet_deeplab(
            (args.size, args.size, 3), out_channels=k, filters=args.filters, dropout=0.1,
            seed=args.seed,
        )
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, jit_compile=False)
        return m

    smile = model(losses.SmileLoss())
    plain = model(keras.losses.BinaryCrossentropy(from_logits=True))
    maps = tf.function(lambda m, f: missing.nested_targets_and_weights(m, f, 0))

    def smile_step():
        t, w = maps(masks, flags)
        smile.train_on_batch(x, t, sample_weight=w)

    steps = {"smile": smile_step, "plain": lambda: plain.train_on_batch(x, masks)}
    times = {name: [] for name in steps}
    for f in steps.values():
        f()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    ratio = med["smile"] / med["plain"]

    smile.predict(x, verbose=0, batch_size=args.batch)
    mc_dropout_predict(smile, x, samples=1, batch_size=args.batch)
    predict_s = statistics.median(
        _common.timed(smile.predict, x, verbose=0, batch_size=args.batch) for _ in range(3))
    mc_s = _common.timed(mc_dropout_predict, smile, x, samples=args.samples,
                         batch_size=args.batch)
    lines = [
        f"# SMILE step ({args.size} px, batch {args.batch}, K = {k}, resnet18_deeplab "
        f"filters {args.filters}, {rounds} rounds)", "",
        "| measure | value |", "| --- | --- |",
        f"| SMILE step incl. weight maps (median) | {med['smile'] * 1e3:.0f} ms |",
        f"| plain sigmoid BCE step (median) | {med['plain'] * 1e3:.0f} ms |",
        f"| SMILE / plain | {ratio:.3f} |",
        f"| predict, one batch | {predict_s * 1e3:.0f} ms |",
        f"| MC-dropout, per sample ({args.samples} samples) | {mc_s / args.samples * 1e3:.0f} ms |",
        f"| MC-dropout per sample / predict | {mc_s / args.samples / predict_s:.2f} |",
        "", _common.verdict(ratio, 1.05, higher_is_better=False),
    ]
    _common.emit("smile_step", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
