"""U-Net34 training step: images/s at 128 and 256 px, peak memory, stage 1 vs stage 2.

Stage 1 = the ResNet34 U-Net with its encoder frozen (`unet34` stage 1);
stage 2 = everything trainable except the batch norms (stage 2). Both are
compiled as `fit --method unet34` compiles them (Adam, BCE, the default
metrics) and timed with `train_on_batch` on a fixed random batch, alternately
(1 2 1 2 ..., order rotated every round) after a warm-up step each; medians
are reported. A frozen encoder needs no weight gradients and no backward pass
through the encoder (nothing trainable lies before it), so stage 1 should be
clearly cheaper: the goal is stage 1 / stage 2 <= 0.8.

Peak memory: on a GPU the device's peak (`tf.config.experimental.get_memory_info`),
else the process's peak resident set (`ru_maxrss`), which never goes down: it
is read before any model is built and after each size, sizes in increasing order.

    python benchmarks/unet34_step.py [--quick] [--batch 8] [--filters 16] [--sizes 128,256]
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _peak_mb(tf):
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20, "GPU peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--filters", type=int, default=16, help="Decoder filters (model.filters).")
    p.add_argument("--sizes", default="128,256")
    p.add_argument("--encoder", default="resnet34", choices=["resnet18", "resnet34", "resnet50"])
    args = p.parse_args()
    _common.setup(args.cache)
    import keras
    import numpy as np
    import tensorflow as tf

    from lesionkeras import config as config_lib
    from lesionkeras.methods import unet34

    sizes = [int(s) for s in args.sizes.split(",")]
    rounds = 3 if args.quick else 10
    cfg = config_lib.load_config(None, {
        "method": "unet34", "model.name": f"{args.encoder}_unet", "model.filters": args.filters,
        "unet34.schedule": "constant", "train.lr": 1e-4, "train.loss": "bce",
        "train.jit_compile": "false",
    })
    rng = np.random.default_rng(args.seed)
    rss0, mem_kind = _peak_mb(tf)
    rows, ratios = [], []
    for size in sizes:
        x = rng.normal(size=(args.batch, size, size, 3)).astype("float32")
        y = (rng.random((args.batch, size, size, 1)) > 0.5).astype("float32")
        models = {}
        for stage in unet34.STAGES:
            keras.utils.set_random_seed(args.seed)
            # Same weights for both; the input size is left open (fully convolutional).
            model = unet34.build(cfg, steps_per_epoch=1)
            models[stage] = unet34.compile_stage(model, cfg, stage, steps_per_epoch=1)
            models[stage].train_on_batch(x, y)  # trace and build the optimizer
        times = {s: [] for s in models}
        for r in range(rounds):
            for s in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t = time.perf_counter()
                models[s].train_on_batch(x, y)
                times[s].append(time.perf_counter() - t)
        med = {s: statistics.median(v) for s, v in times.items()}
        trainable = {s: sum(int(np.prod(w.shape)) for w in m.trainable_weights)
                     for s, m in models.items()}
        peak, _ = _peak_mb(tf)
        ratio = med[1] / med[2]
        ratios.append(ratio)
        rows.append((f"{size} px", f"{args.batch / med[1]:.2f}", f"{args.batch / med[2]:.2f}",
                     f"{med[1] * 1e3:.0f} / {med[2] * 1e3:.0f}",
                     f"{trainable[1]:,} / {trainable[2]:,}", f"{ratio:.2f}", f"{peak:.0f}"))
        del models
        keras.backend.clear_session()

    lines = [
        f"# U-Net34 training step ({args.encoder} encoder, decoder filters {args.filters}, "
        f"batch {args.batch}, {rounds} rounds, CPU threads shared)", "",
        "| size | images/s stage 1 (frozen encoder) | images/s stage 2 (all but BN) | "
        "ms per step 1 / 2 | trainable weights 1 / 2 | stage 1 / stage 2 time | "
        f"{mem_kind} after this size (MB) |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows], "",
        f"{mem_kind} before any model: {rss0:.0f} MB.",
        "",
        f"Stage 1 step takes {min(ratios):.2f}-{max(ratios):.2f} of a stage 2 step "
        f"({(1 - max(ratios)) * 100:.0f}-{(1 - min(ratios)) * 100:.0f} % cheaper); "
        + _common.verdict(max(ratios), 0.8, higher_is_better=False),
        f"256 px / 128 px images/s (stage 2): "
        + (f"{float(rows[-1][2]) / float(rows[0][2]):.2f} (4x the pixels)" if len(rows) > 1 else "n/a"),
    ]
    _common.emit("unet34_step", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
