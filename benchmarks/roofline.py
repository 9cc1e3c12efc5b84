"""Achieved training FLOP/s of the default U-Net vs the machine's 3x3 conv FLOP/s.

(a) Peak: a large 3x3 convolution, `tf.nn.conv2d` of an (8, 128, 128, 64)
input with 64 filters in a `tf.function`, FLOPs = 2*B*H*W*Cin*Cout*9.
(b) Achieved: `train_on_batch` of the model `baseline.build` compiles for the
default config (U-Net depth 4, 16 filters, batch norm, bilinear up-sampling),
FLOPs = 3 x the forward FLOPs of its convolutions (counted from the layer
shapes). Peak and model steps are measured in alternation, several rounds.

Configurations: 96 and 128 px at batch 8 (the goal), with XLA
(`jit_compile=True`) and at batch 16. The investigation (skip with
`--no-breakdown`) times every convolution (forward + both gradients) and every
batch norm + ReLU of the 128 px model in isolation, per U-Net level, the step
without the compiled metrics, and `fit` steps with and without the input
pipeline.

Goal: achieved / peak >= 0.7 for the default configuration.

    python benchmarks/roofline.py [--quick]
"""

from __future__ import annotations

import collections
import time

import _common

GOAL = 0.7
PEAK_SHAPE = (8, 128, 128, 64)


def conv_layers(cfg, size):
    """(layer name, (H_in, W_in, C_in), (H_out, W_out, C_out), kernel) of every conv."""
    import keras

    from lesionkeras.models import registry
    from lesionkeras.trainers import baseline

    probe = registry.build(
        cfg.model.name, input_shape=(size, size, 3), out_channels=1,
        **baseline.model_options(cfg.model),
    )
    convs = []
    for layer in probe.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)):
            convs.append(
                (layer.name, tuple(layer.input.shape[1:]), tuple(layer.output.shape[1:]),
                 tuple(layer.kernel_size), isinstance(layer, keras.layers.Conv2DTranspose))
            )
    return convs


def forward_flops(conv) -> int:
    """Forward FLOPs of one conv for one image (2 per multiply-add)."""
    _, (hi, wi, ci), (ho, wo, co), (kh, kw), transpose = conv
    # A transposed conv scatters every input pixel through the kernel.
    h, w = (hi, wi) if transpose else (ho, wo)
    return 2 * h * w * ci * co * kh * kw


def time_calls(fn, *args, repeats=5, warmup=2) -> float:
    """Median seconds of `fn(*args)` after `warmup` calls."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return _common.median(times)


def make_peak():
    """(function, args, FLOPs) of the reference convolution."""
    import tensorflow as tf

    b, h, w, c = PEAK_SHAPE
    x = tf.random.normal(PEAK_SHAPE, seed=1)
    k = tf.random.normal((3, 3, c, c), seed=2)
    fn = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME"))
    return fn, (x, k), 2 * b * h * w * c * c * 9


def model_and_batch(size, batch, jit, seed, with_metrics=True):
    """A compiled default model and a fixed random batch for it."""
    import keras
    import tensorflow as tf

    from lesionkeras.config import load_config
    from lesionkeras.trainers import baseline

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


def train_step_time(model, x, y, steps) -> float:
    return time_calls(model.train_on_batch, x, y, repeats=steps, warmup=0)


def isolated_times(convs, batch, repeats):
    """Per conv: seconds of forward + input and kernel gradients, and of BN + ReLU after it."""
    import keras
    import tensorflow as tf

    conv_t, bn_t = {}, {}
    cache = {}
    for conv in convs:
        name, (hi, wi, ci), (ho, wo, co), (kh, kw), _ = conv
        key = (hi, ci, co, kh)
        if key not in cache:
            x = tf.random.normal((batch, hi, wi, ci))
            k = tf.Variable(tf.random.normal((kh, kw, ci, co)) * 0.1)
            dy = tf.random.normal((batch, ho, wo, co))

            @tf.function
            def conv_step(x, k=k, dy=dy):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = tf.nn.conv2d(x, k, 1, "SAME")
                return tape.gradient(out, [x, k], output_gradients=dy)

            bn = keras.layers.BatchNormalization(momentum=0.9)
            bn.build((batch, ho, wo, co))

            @tf.function
            def bn_step(x, bn=bn):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = tf.nn.relu(bn(x, training=True))
                return tape.gradient(out, [x] + bn.trainable_variables, output_gradients=x)

            cache[key] = (
                time_calls(conv_step, x, repeats=repeats),
                time_calls(bn_step, dy, repeats=repeats),
            )
        conv_t[name], bn_t[name] = cache[key]
        if kh == 1:  # the 1x1 convs (up-projection, logits) have no batch norm
            bn_t[name] = 0.0
    return conv_t, bn_t


def fit_step_time(model, ds, steps) -> float:
    """Seconds per step of the second of two `model.fit` epochs of `steps` steps."""
    import keras

    class Epochs(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    timer = Epochs()
    model.fit(ds.repeat(), steps_per_epoch=steps, epochs=2, verbose=0, callbacks=[timer])
    return timer.seconds / steps


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="Alternating measurement rounds.")
    p.add_argument("--steps", type=int, default=5, help="Timed train steps per round.")
    p.add_argument("--no-breakdown", action="store_true", help="Skip the investigation.")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
    _common.setup(args.cache)

    import tensorflow as tf

    configs = [  # (size, batch, jit)
        (96, 8, False), (128, 8, False), (96, 8, True), (128, 8, True),
        (96, 16, False), (128, 16, False),
    ]
    peak_fn, peak_args, peak_flops = make_peak()
    models = {}
    for c in configs:
        cfg, model, x, y = model_and_batch(*c, args.seed)
        train_step_time(model, x, y, 2)  # trace (and XLA-compile) the step
        models[c] = (model, x, y)
    peak_s, step_s = [], collections.defaultdict(list)
    for _ in range(args.rounds):
        peak_s.append(time_calls(peak_fn, *peak_args, repeats=args.steps))
        for c, (model, x, y) in models.items():
            step_s[c].append(train_step_time(model, x, y, args.steps))
    peak = peak_flops / _common.median(peak_s)

    rows = []
    fraction = {}
    for (size, batch, jit), times in step_s.items():
        flops = 3 * batch * sum(forward_flops(c) for c in conv_layers(cfg, size))
        seconds = _common.median(times)
        fraction[(size, batch, jit)] = flops / seconds / peak
        rows.append([f"U-Net train step {size} px, batch {batch}" + (", XLA" if jit else ""),
                     flops / 1e9, 1000 * seconds, flops / seconds / 1e9,
                     fraction[(size, batch, jit)]])
    rows.insert(0, ["peak: conv 3x3 " + "x".join(map(str, PEAK_SHAPE)) + " -> 64",
                    peak_flops / 1e9, 1000 * _common.median(peak_s), peak / 1e9, 1.0])
    lines = [
        f"## Roofline: U-Net training FLOP/s vs measured 3x3 conv FLOP/s "
        f"(median of {args.rounds} alternating rounds x {args.steps} steps)",
        "",
        _common.table(["what", "GFLOP", "ms", "GFLOP/s", "fraction of peak"], rows),
        "",
    ]
    for c in [(96, 8, False), (128, 8, False)]:
        lines.append(f"- default at {c[0]} px, batch 8: "
                     f"{_common.verdict(fraction[c], GOAL, True).replace('ratio', 'fraction')}")
    if not args.no_breakdown:
        del models
        lines += ["", *breakdown(cfg, peak, args)]
    _common.emit("roofline", "\n".join(lines), write=not args.no_write)


def breakdown(cfg, peak, args, size=128, batch=8):
    """Report lines: where the time of a 128 px, batch 8 step goes."""
    import tensorflow as tf

    from lesionkeras.config import AugmentConfig
    from lesionkeras.data import pipeline

    repeats = 3 if args.quick else 5
    convs = conv_layers(cfg, size)
    conv_t, bn_t = isolated_times(convs, batch, repeats)
    _, model, x, y = model_and_batch(size, batch, False, args.seed)
    _, bare, _, _ = model_and_batch(size, batch, False, args.seed, with_metrics=False)
    train_step_time(bare, x, y, 2)
    step = {"with metrics": [], "without metrics": []}
    train_step_time(model, x, y, 2)
    for _ in range(args.rounds):
        step["with metrics"].append(train_step_time(model, x, y, args.steps))
        step["without metrics"].append(train_step_time(bare, x, y, args.steps))
    step = {k: _common.median(v) for k, v in step.items()}

    levels = collections.OrderedDict()
    for conv in convs:
        level = conv[0].split("_")[0]
        row = levels.setdefault(level, dict(res=conv[2][0], ch=set(), flops=0, conv=0.0, bn=0.0))
        row["ch"].add(conv[2][2])
        row["flops"] += 3 * batch * forward_flops(conv)
        row["conv"] += conv_t[conv[0]]
        row["bn"] += bn_t[conv[0]]
    rows = [
        [level, f"{r['res']} px", "/".join(map(str, sorted(r["ch"]))), r["flops"] / 1e9,
         1000 * r["conv"], r["flops"] / r["conv"] / peak, 1000 * r["bn"]]
        for level, r in levels.items()
    ]
    total_flops = sum(r["flops"] for r in levels.values())
    total_conv = sum(conv_t.values())
    total_bn = sum(bn_t.values())
    rows.append(["total", "", "", total_flops / 1e9, 1000 * total_conv,
                 total_flops / total_conv / peak, 1000 * total_bn])
    s = step["with metrics"]

    # The step alone vs fit on a repeated fixed batch vs fit on the real pipeline.
    decoded, mean, std = _common.synthetic_decoded(64, size)
    ds = pipeline.make_dataset(decoded, batch_size=batch, mean=mean, std=std, training=True,
                               augment=AugmentConfig(), seed=args.seed)
    fixed = tf.data.Dataset.from_tensors((x, y))
    fit_steps = 4 if args.quick else 10
    fit_fixed = fit_step_time(model, fixed, fit_steps)
    fit_pipe = fit_step_time(model, ds, fit_steps)

    return [
        f"### Where a {size} px, batch {batch} step goes (ops timed in isolation, "
        "forward + backward)",
        "",
        _common.table(
            ["level", "resolution", "channels", "train GFLOP", "conv ms", "conv fraction of peak",
             "BN+ReLU ms"],
            rows,
        ),
        "",
        f"- step (train_on_batch): {1000 * s:.0f} ms; convs alone {1000 * total_conv:.0f} ms "
        f"({100 * total_conv / s:.0f} %), BN+ReLU {1000 * total_bn:.0f} ms "
        f"({100 * total_bn / s:.0f} %), the rest (pool, resize, concat, loss, metrics, "
        f"optimizer, framework) {1000 * (s - total_conv - total_bn):.0f} ms "
        f"({100 * (s - total_conv - total_bn) / s:.0f} %)",
        f"- compiled metrics: step {1000 * step['without metrics']:.0f} ms without vs "
        f"{1000 * s:.0f} ms with ({100 * (s / step['without metrics'] - 1):+.0f} %)",
        f"- model.fit per step: {1000 * fit_fixed:.0f} ms on a repeated in-memory batch, "
        f"{1000 * fit_pipe:.0f} ms on the make_dataset pipeline "
        f"({100 * (fit_pipe / fit_fixed - 1):+.0f} %)",
    ]


if __name__ == "__main__":
    main()
