"""Training-step cost of the second-order-exact bilinear up-sampling (issue 13).

The default U-Net (depth 4, 16 filters, batch norm, bilinear up-sampling) is
built twice: with the package's `BilinearUpSampling2D` (two batched matrix
products, exact to any order) and with Keras' `UpSampling2D(interpolation=
"bilinear")` (TensorFlow's fused resize kernel, whose second derivative is
dropped). Both `train_on_batch` steps are called in turn, `rounds x steps`
times, and each is timed by its fastest call (the one least disturbed by other
jobs). Also the two layers alone, forward + backward, at the U-Net's finest
decoder level.

Goal: new / old step time <= 1.05 at 96 and 128 px, batch 8.

    python benchmarks/upsampling.py [--quick]
"""

from __future__ import annotations

import time

import _common

GOAL = 1.05
CONFIGS = [(96, 8), (128, 8)]


def build(size, keras_upsampling, seed):
    import keras

    from lesionkeras import config as config_lib
    from lesionkeras.models import blocks
    from lesionkeras.methods import baseline

    original = blocks.BilinearUpSampling2D
    if keras_upsampling:
        blocks.BilinearUpSampling2D = lambda size, name: keras.layers.UpSampling2D(
            size, interpolation="bilinear", name=name)
    try:
        keras.utils.set_random_seed(seed)
        cfg = config_lib.load_config(None, {"data.image_size": size})
        model = baseline.build(cfg)
    finally:
        blocks.BilinearUpSampling2D = original
    return model


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
        for old in (False, True):
            model = build(size, old, args.seed)
            step_seconds(model, x, y)
            step_seconds(model, x, y)
            models[(size, batch, old)] = (model, x, y)
    times = {k: float("inf") for k in models}
    for _ in range(args.rounds * args.steps):
        for k, (model, x, y) in models.items():
            times[k] = min(times[k], step_seconds(model, x, y))

    rows, ratios = [], []
    for size, batch in CONFIGS:
        new, old = times[(size, batch, False)], times[(size, batch, True)]
        ratios.append(new / old)
        rows.append([f"U-Net train step {size} px, batch {batch}", 1000 * old, 1000 * new, new / old])
    for size, batch in CONFIGS:
        # The finest decoder level: (batch, size/2, size/2, 32) -> (batch, size, size, 32).
        h = size // 2
        x = rng.normal(size=(batch, h, h, 32)).astype("float32")
        dy = rng.normal(size=(batch, size, size, 32)).astype("float32")
        calls = args.rounds * args.steps * 4
        old = layer_seconds(keras.layers.UpSampling2D(2, interpolation="bilinear"), x, dy, calls)
        new = layer_seconds(BilinearUpSampling2D(2), x, dy, calls)
        rows.append([f"resize alone {h}->{size} px, 32 ch, fwd+bwd", 1000 * old, 1000 * new, new / old])
    worst = max(ratios)
    text = "\n".join([
        "# Bilinear up-sampling: exact second order vs Keras UpSampling2D",
        "",
        _common.table(["", "Keras UpSampling2D ms", "BilinearUpSampling2D ms", "ratio"], rows),
        "",
        f"Worst train-step ratio {worst:.3f} (goal <= {GOAL}): "
        + _common.verdict(worst, GOAL, higher_is_better=False),
    ])
    _common.emit("upsampling", text, write=not args.no_write)


if __name__ == "__main__":
    main()
