"""Training-step cost of the second-order-exact bilinear up-sampling (issue 13).

The default U-Net (depth 4, 16 filters, batch norm, bilinear up-sampling) is
built three times: with Keras' `UpSampling2D(interpolation="bilinear")`
(TensorFlow's fused resize kernel, whose second derivative is dropped), with
the package's `BilinearUpSampling2D` as every model uses it (the same fused
kernel unless switched), and with its resize layers switched to the matrix
products that meta steps use (`second_order_exact`, exact to any order;
batch norm left fused so that the row shows the resize alone). The
`train_on_batch` steps are called in turn, `rounds x steps` times, and each is
timed by its fastest call (the one least disturbed by other jobs). Also the
layers alone, forward + backward, at the U-Net's finest decoder level.

Goal: package / Keras step time <= 1.05 at 96 and 128 px, batch 8. The
switched row is the price meta steps pay for exact second derivatives.

    python benchmarks/upsampling.py [--quick]
"""

from __future__ import annotations

import time

import _common

GOAL = 1.05
CONFIGS = [(96, 8), (128, 8)]


CONTENDERS = ("keras", "package", "switched")


def build(size, contender, seed):
    import keras

    from lesionkeras import config as config_lib
    from lesionkeras.models import blocks
    from lesionkeras.methods import baseline

    original = blocks.BilinearUpSampling2D
    if contender == "keras":
        blocks.BilinearUpSampling2D = lambda size, name: keras.layers.UpSampling2D(
            size, interpolation="bilinear", name=name)
    try:
        keras.utils.set_random_seed(seed)
        cfg = config_lib.load_config(None, {"data.image_size": size})
        model = baseline.build(cfg)
    finally:
        blocks.BilinearUpSampling2D = original
    if contender == "switched":
        switched = _switch_resizes(model)
        assert switched > 0, "no resize layer switched"
    return model


def _switch_resizes(model):
    from lesionkeras.models.layers import BilinearUpSampling2D, ResizeLike

    count, stack = 0, list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, (BilinearUpSampling2D, ResizeLike)):
            layer.second_order_exact = True
            count += 1
        stack.extend(getattr(layer, "layers", ()))
    return count


def step_seconds(model, x, y):
    t = time.perf_counter()
    model.train_on_batch(x, y)
    return time.perf_counter() - t


def layer_seconds(layer, x, dy, calls):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            out = layer(x)
        return tape.gradient(out, x, output_gradients=dy)

    step(x)
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        step(x).numpy()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="Measurement rounds.")
    p.add_argument("--steps", type=int, default=5, help="Calls of each contender per round.")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
    _common.setup(args.cache)
    import keras
    import numpy as np

    from lesionkeras.models.layers import BilinearUpSampling2D

    rng = np.random.default_rng(args.seed)
    models = {}
    for size, batch in CONFIGS:
        x = rng.normal(size=(batch, size, size, 3)).astype("float32")
        y = (rng.random((batch, size, size, 1)) > 0.5).astype("float32")
        for contender in CONTENDERS:
            model = build(size, contender, args.seed)
            step_seconds(model, x, y)
            step_seconds(model, x, y)
            models[(size, batch, contender)] = (model, x, y)
    times = {k: float("inf") for k in models}
    for _ in range(args.rounds * args.steps):
        for k, (model, x, y) in models.items():
            times[k] = min(times[k], step_seconds(model, x, y))

    rows, ratios = [], []
    for size, batch in CONFIGS:
        old, new, exact = (times[(size, batch, c)] for c in CONTENDERS)
        ratios.append(new / old)
        rows.append([f"U-Net train step {size} px, batch {batch}", 1000 * old, 1000 * new,
                     new / old, 1000 * exact, exact / old])
    for size, batch in CONFIGS:
        # The finest decoder level: (batch, size/2, size/2, 32) -> (batch, size, size, 32).
        h = size // 2
        x = rng.normal(size=(batch, h, h, 32)).astype("float32")
        dy = rng.normal(size=(batch, size, size, 32)).astype("float32")
        calls = args.rounds * args.steps * 4
        old = layer_seconds(keras.layers.UpSampling2D(2, interpolation="bilinear"), x, dy, calls)
        new = layer_seconds(BilinearUpSampling2D(2), x, dy, calls)
        switched = BilinearUpSampling2D(2)
        switched.second_order_exact = True
        exact = layer_seconds(switched, x, dy, calls)
        rows.append([f"resize alone {h}->{size} px, 32 ch, fwd+bwd", 1000 * old, 1000 * new,
                     new / old, 1000 * exact, exact / old])
    worst = max(ratios)
    text = "\n".join([
        "# Bilinear up-sampling: exact second order vs Keras UpSampling2D",
        "",
        _common.table(["", "Keras UpSampling2D ms", "BilinearUpSampling2D ms", "ratio",
                       "switched (meta steps) ms", "ratio"], rows),
        "",
        f"Worst train-step ratio {worst:.3f} (goal <= {GOAL}): "
        + _common.verdict(worst, GOAL, higher_is_better=False),
    ])
    _common.emit("upsampling", text, write=not args.no_write)


if __name__ == "__main__":
    main()
