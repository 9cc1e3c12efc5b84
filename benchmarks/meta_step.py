"""Cost of one meta-reweighting step (`fit --method meta`) vs plain training steps.

Mirikharaji et al. 2019, eq. 6-9: a meta step on a noisy batch of 2 and a
clean batch of 10 does a virtual step, a clean pass at the virtual
parameters, the weight gradient (eq. 7) and the real update. The reference
cost is what the same network pays without meta-learning for the same data:
one plain training step on the noisy batch plus one on the clean batch
(`train_on_batch`, BCE from logits, SGD with momentum, no metrics; the meta
step also updates its Dice/Jaccard metrics, so the ratio is not flattered).

Two shapes: the paper's U-Net (64 base filters, depth 4, no batch norm,
transposed-conv up-sampling, 31 M parameters) and the package's default U-Net
(16 filters, depth 4, batch norm, bilinear), both at the paper's 96 px.

Timing: one process, the contenders called in turn (plain noisy + plain
clean, nested, forward; the order rotated every round), median over rounds
after two warm-up calls each (tracing). Memory: TensorFlow's CPU allocator
is invisible to `tracemalloc` and `tf.config.experimental.get_memory_info`
reports 0 on CPU, so each contender runs alone (3 calls) in a child process
that resets the kernel's peak-RSS mark after building model and optimiser
(`/proc/self/clear_refs`) and reads `VmHWM`, the peak resident set of the
steps; `resource.getrusage` max RSS is the fallback where that is not
possible (it would mostly show the TensorFlow import). Growth = peak minus the
resident set after building (activations, tapes, gradients, traced graphs).

Goals at the paper's shape (issue 3): forward <= 1.10, nested <= 1.25,
forward faster than nested and with a lower peak memory.

    python benchmarks/meta_step.py [--quick]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common

SHAPES = {
    "paper": dict(filters=64, depth=4, batch_norm=False, upsampling="transpose"),
    "default": dict(filters=16, depth=4, batch_norm=True, upsampling="bilinear"),
}
GOALS = {"forward": 1.10, "nested": 1.25}
CONTENDERS = ("plain", "nested", "forward")


def make_batches(size, noisy, clean, seed):
    """A fixed noisy and clean batch: normal images, blob-shaped masks."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def masks(n):
        yy, xx = np.mgrid[:size, :size]
        cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size
        r = rng.uniform(0.15, 0.35, (n, 1, 1)) * size
        return (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2)[..., None].astype("float32")

    return {
        "noisy_image": rng.normal(size=(noisy, size, size, 3)).astype("float32"),
        "noisy_mask": masks(noisy),
        "clean_image": rng.normal(size=(clean, size, size, 3)).astype("float32"),
        "clean_mask": masks(clean),
    }


def build(contender, shape, size, seed):
    """A callable running one step of `contender` on the fixed batches."""
    import keras

    from lesionkeras.models.unet import build_unet
    from lesionkeras.methods.reweight import MetaReweighter

    keras.utils.set_random_seed(seed)
    net = build_unet((size, size, 3), **SHAPES[shape])
    optimizer = keras.optimizers.SGD(1e-4, momentum=0.9)
    if contender == "plain":
        net.compile(
            optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True),
            jit_compile=False,
        )

        def step(b):
            net.train_on_batch(b["noisy_image"], b["noisy_mask"])
            net.train_on_batch(b["clean_image"], b["clean_mask"])

        return step, net.count_params()
    model = MetaReweighter(net, meta_grad=contender)
    model.compile(optimizer=optimizer, jit_compile=False)
    model.optimizer.build(net.trainable_variables)
    return (lambda b: model.train_on_batch(b)), net.count_params()


def _status_mb(field):
    """`VmRSS`/`VmHWM` of /proc/self/status in MB, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def _reset_peak():
    """Resets the kernel's peak-RSS mark (VmHWM); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args):
    """Memory of one contender alone: prints JSON {build_mb, peak_mb, source}.

    The TensorFlow import alone can hold the process's all-time peak, so the
    peak mark is reset after the model is built (Linux `clear_refs` 5) and
    read as `VmHWM`; without that, `getrusage` max RSS is the fallback.
    """
    b = make_batches(args.size, args.noisy, args.clean, args.seed)
    step, _ = build(args.child, args.shape, args.size, args.seed)
    built = _status_mb("VmRSS")
    reset = built is not None and _reset_peak()
    for _ in range(3):
        step(b)
    if reset:
        peak, source = _status_mb("VmHWM"), "VmHWM after reset"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
        built, source = built or 0.0, "getrusage ru_maxrss"
    print(json.dumps({"build_mb": built, "peak_mb": peak, "source": source}))


def measure_memory(args, shape, contender):
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", contender, "--shape", shape,
        "--size", str(args.size), "--noisy", str(args.noisy), "--clean", str(args.clean),
        "--seed", str(args.seed),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_times(args, shape):
    """Median seconds per call of each contender, interleaved."""
    b = make_batches(args.size, args.noisy, args.clean, args.seed)
    steps, params = {}, 0
    for c in CONTENDERS:
        steps[c], params = build(c, shape, args.size, args.seed)
        for _ in range(2):  # tracing, then one warm call
            steps[c](b)
    times = {c: [] for c in CONTENDERS}
    for r in range(args.rounds):
        order = CONTENDERS[r % 3:] + CONTENDERS[: r % 3]
        for c in order:
            start = time.perf_counter()
            steps[c](b)
            times[c].append(time.perf_counter() - start)
        print(
            f"{shape} round {r + 1}/{args.rounds}: "
            + ", ".join(f"{c} {times[c][-1]:.2f} s" for c in CONTENDERS),
            flush=True,
        )
    return {c: _common.median(t) for c, t in times.items()}, params


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=96, help="Image side in pixels (paper: 96).")
    p.add_argument("--noisy", type=int, default=2, help="Noisy batch size (paper: 2).")
    p.add_argument("--clean", type=int, default=10, help="Clean batch size (paper: 10).")
    p.add_argument("--rounds", type=int, default=7, help="Interleaved timing rounds.")
    p.add_argument("--shapes", default="paper,default", help="Comma-separated: paper, default.")
    p.add_argument("--no-memory", action="store_true", help="Skip the memory subprocesses.")
    p.add_argument("--child", choices=CONTENDERS, help=argparse_hidden())
    p.add_argument("--shape", choices=tuple(SHAPES), default="paper", help=argparse_hidden())
    args = p.parse_args()
    _common.setup(args.cache)
    if args.child:
        child(args)
        return
    if args.quick:
        args.rounds = 3
    rows, notes, source = [], [], "not measured"
    import keras

    for shape in args.shapes.split(","):
        med, params = measure_times(args, shape)
        keras.backend.clear_session()
        mem = {c: None for c in CONTENDERS}
        if not args.no_memory:
            mem = {c: measure_memory(args, shape, c) for c in CONTENDERS}
            source = mem["plain"]["source"]
        plain = med["plain"]
        for c in CONTENDERS:
            m = mem[c]
            rows.append([
                f"{shape} ({params / 1e6:.1f} M)", c, 1000 * med[c], med[c] / plain,
                f"{m['peak_mb']:.0f}" if m else "-",
                f"{m['peak_mb'] - m['build_mb']:.0f}" if m else "-",
            ])
        if shape == "paper":
            for c, goal in GOALS.items():
                notes.append(f"- paper shape, {c}: {_common.verdict(med[c] / plain, goal, False)}")
            notes.append(
                f"- paper shape, forward faster than nested: "
                f"{'yes' if med['forward'] < med['nested'] else 'NO'} "
                f"({med['forward'] / med['nested']:.2f})"
            )
            if mem["forward"] and mem["nested"]:
                lower = mem["forward"]["peak_mb"] < mem["nested"]["peak_mb"]
                notes.append(
                    "- paper shape, forward lower peak memory than nested: "
                    f"{'yes' if lower else 'NO'}"
                )
    text = "\n".join([
        f"## Meta step vs plain steps ({args.size} px, noisy batch {args.noisy} + clean batch "
        f"{args.clean}; median of {args.rounds} interleaved rounds)",
        "",
        _common.table(
            ["U-Net", "step", "ms", "/ plain pair", "peak RSS MB", "RSS growth in steps MB"],
            rows,
        ),
        "",
        "`plain` = one plain step on the noisy batch + one on the clean batch. Memory: peak "
        "resident set of a child process running that step alone (3 calls, tracing "
        f"included; {source}); growth = peak minus the RSS after building model and optimiser.",
        "",
        *notes,
    ])
    _common.emit("meta_step", text, write=not args.no_write)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
