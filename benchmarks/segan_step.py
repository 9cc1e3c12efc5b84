"""Cost of a SegAN step, and images/s with 1 vs 2 logical CPU replicas.

A = one `SegANTrainer` step (segmentor forward, critic step on both masked
batches, weight clamping, segmentor step through the critic); B = one
supervised step (`bce+dice`) of the same SegAN segmentor. Both at 128 px on
fixed random batches, timed alternately (A B A B ..., order rotated every
round) after a warm-up step each; the ratio of medians is reported.
Then images/s of the SegAN step with the default strategy (1 replica) and
with MirroredStrategy over two logical CPU devices (same global batch): on a
CPU no speed-up is expected; the number documents the overhead.

    python benchmarks/segan_step.py [--quick] [--filters 16] [--batch 8]
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
    p.add_argument("--filters", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    import tensorflow as tf

    # Two logical CPUs for the 2-replica run; must precede any device initialisation.
    cpu = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    _common.setup(args.cache)

    import keras
    import numpy as np

    from lesionkeras import losses
    from lesionkeras.models.critic import build_critic
    from lesionkeras.models.segan import build_segan
    from lesionkeras.methods.segan import SegANTrainer

    rounds = 5 if args.quick else 15
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    y = (rng.random((args.batch, args.size, args.size, 1)) > 0.5).astype("float32")
    keras.utils.set_random_seed(args.seed)

    def segan(strategy=None):
        scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
        with scope:
            model = SegANTrainer(
                build_segan((args.size, args.size, 3), depth=3, filters=args.filters),
                build_critic((args.size, args.size, 3), filters=args.filters),
            )
            model.compile(seg_optimizer=keras.optimizers.Adam(1e-4),
                          critic_optimizer=keras.optimizers.Adam(1e-4))
        return model

    sup = build_segan((args.size, args.size, 3), depth=3, filters=args.filters)
    sup.compile(optimizer=keras.optimizers.Adam(1e-4), loss=losses.get_loss("bce+dice"),
                jit_compile=False)
    adv = segan()
    steps = {"segan": lambda: adv.train_on_batch(x, y), "supervised": lambda: sup.train_on_batch(x, y)}
    times = {k: [] for k in steps}
    for f in steps.values():
        f()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for k in order:
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch).repeat()
    rates = {}
    for name, strategy in (
        ("1 replica", None),
        ("2 replicas", tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
            cross_device_ops=tf.distribute.ReductionToOneDevice())),
    ):
        model = segan(strategy)
        model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)  # trace
        t = time.perf_counter()
        model.fit(ds, steps_per_epoch=rounds, epochs=1, verbose=0)
        rates[name] = rounds * args.batch / (time.perf_counter() - t)

    lines = [
        f"# SegAN step ({args.size} px, batch {args.batch}, filters {args.filters}, "
        f"{rounds} rounds)", "",
        "| measure | value |", "| --- | --- |",
        f"| SegAN step (median) | {med['segan'] * 1e3:.0f} ms |",
        f"| supervised step, same segmentor (median) | {med['supervised'] * 1e3:.0f} ms |",
        f"| SegAN / supervised | {med['segan'] / med['supervised']:.2f} |",
        f"| images/s, 1 replica | {rates['1 replica']:.1f} |",
        f"| images/s, 2 logical CPU replicas | {rates['2 replicas']:.1f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        _common.RESULTS_DIR.mkdir(exist_ok=True)
        (_common.RESULTS_DIR / "segan_step.md").write_text(text)


if __name__ == "__main__":
    main()
