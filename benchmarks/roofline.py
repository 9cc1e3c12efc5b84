"""Achieved training FLOP/s of the default U-Net vs the machine's 3x3 conv FLOP/s.

(a) Reference ("peak"): a large 3x3 convolution, `tf.nn.conv2d` of an
(8, 128, 128, 64) input with 64 filters in a `tf.function`,
FLOPs = 2*B*H*W*Cin*Cout*9.
(b) Achieved: `train_on_batch` of the model `baseline.build` compiles for the
default config (U-Net depth 4, 16 filters, batch norm, bilinear up-sampling),
FLOPs = 3 x the forward FLOPs of its convolutions, counted from the layer
shapes. The reference and the model steps are called in turn, one call each,
`rounds x steps` times, and every time is the best (minimum) of its samples:
the call least disturbed by other jobs, as the question is what the machine
can do.

Configurations: 96 and 128 px at batch 8 (the goal), with XLA
(`jit_compile=True`) and at batch 16. The investigation (skip it with
`--no-breakdown`; `--quick` skips it) times every layer of the 128 px model alone (forward and
backward), per U-Net level, the step without the compiled metrics, and `fit`
steps on a fixed batch vs on the `make_dataset` pipeline.

Goal: achieved / reference >= 0.7 for the default configuration.

    python benchmarks/roofline.py [--quick]
"""

from __future__ import annotations

import collections
import time

import _common

GOAL = 0.7
PEAK_SHAPE = (8, 128, 128, 64)
CONFIGS = [  # (size, batch, jit_compile)
    (96, 8, False), (128, 8, False), (96, 8, True), (128, 8, True), (96, 16, False), (128, 16, False),
]
KINDS = ("conv", "batch norm", "ReLU", "pool/resize/concat")


def probe_model(cfg, size):
    """The `cfg` model with a fixed input size, so every layer has a static shape."""
    from lesionkeras.models import registry
    from lesionkeras.training import segmentation

    return registry.build(
        cfg.model_name, input_shape=(size, size, 3), out_channels=1,
        **segmentation.model_options(cfg.model, cfg.model_name),
    )


def layer_kind(layer) -> str:
    import keras

    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
        return "conv"
    if isinstance(layer, keras.layers.BatchNormalization):
        return "batch norm"
    if isinstance(layer, keras.layers.Activation):
        return "ReLU"
    return "pool/resize/concat"


def forward_flops(layer) -> int:
    """Forward FLOPs of a conv layer of a probe model, per image (2 per multiply-add)."""
    import keras

    (hi, wi, ci), (ho, wo, co) = layer.input.shape[1:], layer.output.shape[1:]
    kh, kw = layer.kernel_size
    # A transposed conv scatters every input pixel through the kernel.
    h, w = (hi, wi) if isinstance(layer, keras.layers.Conv2DTranspose) else (ho, wo)
    return 2 * h * w * ci * co * kh * kw


def train_flops(cfg, size, batch) -> int:
    """Training FLOPs of one step: 3 x forward (input and weight gradients) of every conv."""
    layers = probe_model(cfg, size).layers
    return 3 * batch * sum(forward_flops(l) for l in layers if layer_kind(l) == "conv")


def time_calls(fn, *args, repeats=5, warmup=2) -> list:
    """Seconds of each of `repeats` calls of `fn(*args)`, after `warmup` calls."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def make_peak():
    """(function, args, FLOPs) of the reference convolution."""
    import tensorflow as tf

    b, h, w, c = PEAK_SHAPE
    x = tf.random.normal(PEAK_SHAPE, seed=1)
    k = tf.random.normal((3, 3, c, c), seed=2)
    fn = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
    return fn, (x, k), 2 * b * h * w * c * c * 9


def model_and_batch(size, batch, jit, seed, with_metrics=True):
    """(config, compiled default model, fixed random batch x, y)."""
    import keras
    import tensorflow as tf

    from lesionkeras.config import load_config
    from lesionkeras.methods import baseline

    cfg = load_config(
        None,
        {"seed": seed, "data.image_size": size, "train.batch_size": batch,
         "train.jit_compile": "true" if jit else "auto"},
    )
    keras.utils.set_random_seed(seed)
    model = baseline.build(cfg)
    if not with_metrics:
        model.compile(optimizer=model.optimizer, loss=model.loss, jit_compile=model.jit_compile)
    x = tf.random.normal((batch, size, size, 3), seed=seed)
    y = tf.cast(tf.random.uniform((batch, size, size, 1), seed=seed) > 0.7, tf.float32)
    return cfg, model, x, y


def train_step_time(model, x, y, steps) -> list:
    return time_calls(model.train_on_batch, x, y, repeats=steps, warmup=0)


def fit_step_time(model, ds, steps) -> list:
    """Intervals between the batch ends of a `model.fit` epoch of `steps` steps."""
    import keras

    class BatchEnds(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    ends = BatchEnds()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=[ends])
    return [b - a for a, b in zip(ends.times, ends.times[1:])]


def layer_step(layer, batch, probe):
    """(`tf.function` running `layer` forward and backward at the probe's shapes, its inputs)."""
    import tensorflow as tf

    inputs = layer.input if isinstance(layer.input, list) else [layer.input]
    xs = [tf.random.normal((batch, *t.shape[1:])) for t in inputs]
    dy = tf.random.normal((batch, *layer.output.shape[1:]))
    watch = not any(t is probe.inputs[0] for t in inputs)  # no gradient of the image

    @tf.function
    def step(*xs):
        with tf.GradientTape() as tape:
            if watch:
                tape.watch(xs)
            out = layer(list(xs) if len(xs) > 1 else xs[0], training=True)
        sources = (list(xs) if watch else []) + layer.trainable_variables
        return tape.gradient(out, sources, output_gradients=dy)

    return step, xs


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="Measurement rounds.")
    p.add_argument("--steps", type=int, default=5, help="Calls of each contender per round.")
    p.add_argument("--no-breakdown", action="store_true", help="Skip the investigation.")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.no_breakdown = 2, 3, True
    _common.setup(args.cache)

    peak_fn, peak_args, peak_flops = make_peak()
    models = {}
    for c in CONFIGS:
        cfg, model, x, y = model_and_batch(*c, args.seed)
        train_step_time(model, x, y, 2)  # trace (and XLA-compile) the step
        models[c] = (model, x, y)
    # One call of each in turn, so every contender samples the whole run.
    peak_s, step_s = [], collections.defaultdict(list)
    for _ in range(args.rounds * args.steps):
        peak_s += time_calls(peak_fn, *peak_args, repeats=1, warmup=0)
        for c, (model, x, y) in models.items():
            step_s[c] += train_step_time(model, x, y, 1)
    del models
    peak = peak_flops / min(peak_s)

    rows = [["reference: conv 3x3 " + "x".join(map(str, PEAK_SHAPE)) + " -> 64",
             peak_flops / 1e9, 1000 * min(peak_s), peak / 1e9, 1.0]]
    fraction = {}
    for (size, batch, jit), times in step_s.items():
        flops, seconds = train_flops(cfg, size, batch), min(times)
        fraction[(size, batch, jit)] = flops / seconds / peak
        name = f"U-Net train step {size} px, batch {batch}" + (", XLA" if jit else "")
        rows.append([name, flops / 1e9, 1000 * seconds, flops / seconds / 1e9, fraction[(size, batch, jit)]])
    lines = [
        "## Roofline: U-Net training FLOP/s vs a large 3x3 conv "
        f"(best of {args.rounds * args.steps} interleaved calls each)",
        "",
        _common.table(["what", "GFLOP", "ms", "GFLOP/s", "fraction of reference"], rows),
        "",
    ]
    for size in (96, 128):
        verdict = _common.verdict(fraction[(size, 8, False)], GOAL, True)
        lines.append(f"- default at {size} px, batch 8: {verdict.replace('ratio', 'fraction')}")
    if not args.no_breakdown:
        lines += ["", *breakdown(cfg, args)]
    _common.emit("roofline", "\n".join(lines), write=not args.no_write)


def breakdown(cfg, args, size=128, batch=8):
    """Report lines: where the time of a default 128 px, batch 8 step goes.

    Every layer runs forward and backward alone; these timings, the reference
    conv, the step with and without the compiled metrics and `fit` steps with
    and without the input pipeline are called in turn, as in `main`.
    """
    import keras
    import tensorflow as tf

    from lesionkeras.config import AugmentConfig
    from lesionkeras.data import pipeline

    probe = probe_model(cfg, size)
    layers = [l for l in probe.layers if not isinstance(l, keras.layers.InputLayer)]
    peak_fn, peak_args, peak_flops = make_peak()
    _, model, x, y = model_and_batch(size, batch, False, args.seed)
    _, bare, _, _ = model_and_batch(size, batch, False, args.seed, with_metrics=False)
    decoded, mean, std = _common.synthetic_decoded(64, size)
    data = {
        "fixed batch": tf.data.Dataset.from_tensors((x, y)).repeat(),
        "make_dataset": pipeline.make_dataset(
            decoded, batch_size=batch, mean=mean, std=std, training=True,
            augment=AugmentConfig(), seed=args.seed,
        ).repeat(),
    }
    loss = model.loss

    @tf.function
    def forward_backward(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    measures = {
        "forward+backward": lambda: time_calls(forward_backward, x, y, repeats=1, warmup=0),
        "peak": lambda: time_calls(peak_fn, *peak_args, repeats=1, warmup=0),
        "step": lambda: train_step_time(model, x, y, 1),
        "step, no metrics": lambda: train_step_time(bare, x, y, 1),
    }
    for layer in layers:
        fn, xs = layer_step(layer, batch, probe)
        measures[layer.name] = lambda fn=fn, xs=xs: time_calls(fn, *xs, repeats=1, warmup=0)
    fits = {f"fit, {name}": ds for name, ds in data.items()}
    for fn in measures.values():  # warm-up: tracing
        fn()
    for ds in fits.values():
        fit_step_time(model, ds, 2)
    times = collections.defaultdict(list)
    for i in range(args.rounds * args.steps):
        for name, fn in measures.items():
            times[name] += fn()
        if i % args.steps == 0:  # a fit epoch is longer: once per round
            for name, ds in fits.items():
                times[name] += fit_step_time(model, ds, 2 * args.steps)
    t = {name: min(v) for name, v in times.items()}
    peak = peak_flops / t["peak"]

    levels = {}
    for layer in layers:
        level = levels.setdefault(
            layer.name.split("_")[0], dict(flops=0, **{k: 0.0 for k in KINDS})
        )
        level[layer_kind(layer)] += t[layer.name]
        if layer_kind(layer) == "conv":
            level["flops"] += 3 * batch * forward_flops(layer)
            level["res"], level["ch"] = layer.output.shape[1], layer.output.shape[-1]
    total = {k: sum(lv[k] for lv in levels.values()) for k in ("flops", *KINDS)}
    rows = [
        [name, f"{lv['res']} px" if lv["res"] else "", lv["ch"], lv["flops"] / 1e9,
         *(1000 * lv[k] for k in KINDS), lv["flops"] / lv["conv"] / peak]
        for name, lv in [*levels.items(), ("total", dict(res="", ch="", **total))]
    ]
    step, layers_t = t["step"], sum(total[k] for k in KINDS)
    shares = ", ".join(f"{k} {100 * total[k] / step:.0f} %" for k in KINDS)
    return [
        f"### Where a default {size} px, batch {batch} step goes "
        "(each layer timed alone, forward + backward)",
        "",
        _common.table(
            ["level", "output", "channels", "train GFLOP", *(f"{k} ms" for k in KINDS),
             "conv fraction of reference"],
            rows,
        ),
        "",
        f"- reference conv in this section: {peak / 1e9:.0f} GFLOP/s; the model's convs alone "
        f"reach {total['flops'] / total['conv'] / 1e9:.0f} GFLOP/s "
        f"({total['flops'] / total['conv'] / peak:.2f} of it), the whole step "
        f"{total['flops'] / step / 1e9:.0f} GFLOP/s ({total['flops'] / step / peak:.2f})",
        f"- step {1000 * step:.0f} ms; the layers alone add up to {1000 * layers_t:.0f} ms "
        f"(share of the step: {shares})",
        f"- forward + backward of the whole model with the loss (GradientTape, no optimizer, "
        f"no metrics): {1000 * t['forward+backward']:.0f} ms, so the layers lose "
        f"{1000 * (t['forward+backward'] - layers_t):.0f} ms inside the graph (activations "
        f"leave the cache, scheduling) and the optimizer, metrics and Keras step add "
        f"{1000 * (step - t['forward+backward']):.0f} ms",
        f"- compiled metrics: step {1000 * t['step, no metrics']:.0f} ms without, "
        f"{1000 * step:.0f} ms with",
        f"- model.fit per step: {1000 * t['fit, fixed batch']:.0f} ms on a repeated in-memory "
        f"batch, {1000 * t['fit, make_dataset']:.0f} ms on the make_dataset pipeline "
        "(flips+rot90)",
    ]


if __name__ == "__main__":
    main()
