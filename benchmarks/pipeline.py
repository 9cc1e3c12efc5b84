"""Input pipeline throughput vs training throughput of the default U-Net.

The pipeline is the training dataset of `lesionkeras fit`
(`make_dataset(training=True)`: shuffle, batch, augment, normalise) over a
warm cache, iterated with no model. The training rate is `train_on_batch` of
the model `baseline.build` compiles, on one fixed in-memory batch. Both are
measured in alternation, several rounds, and the medians compared.

Goal: pipeline images/s >= 5 x training images/s, for every augmentation.

    python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import time

import _common

AUGMENTATIONS = {
    "flips+rot90 (default)": {},
    "+rotation/zoom/colour jitter": dict(
        rotation=20.0, zoom=0.1, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02
    ),
}
GOAL = 5.0


def pipeline_rate(ds, epochs: int) -> float:
    """Images per second of iterating `ds` for `epochs` passes."""
    images = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, _y in ds:
            images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def train_rate(model, x, y, steps: int) -> float:
    """Images per second of `steps` calls of `model.train_on_batch(x, y)`."""

    def run():
        for _ in range(steps):
            model.train_on_batch(x, y)

    return steps * int(x.shape[0]) / _common.timed(run)


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="Image side in pixels.")
    p.add_argument("--batch", type=int, default=8, help="Batch size.")
    p.add_argument("--count", type=int, default=256, help="Synthetic images.")
    p.add_argument("--rounds", type=int, default=5, help="Alternating measurement rounds.")
    p.add_argument("--epochs", type=int, default=3, help="Pipeline passes per measurement.")
    p.add_argument("--steps", type=int, default=15, help="Training steps per measurement.")
    args = p.parse_args()
    if args.quick:
        args.count, args.rounds, args.epochs, args.steps = 128, 3, 2, 6
    _common.setup(args.cache)

    import keras
    import tensorflow as tf

    from lesionkeras.config import AugmentConfig, load_config
    from lesionkeras.data import pipeline
    from lesionkeras.methods import baseline

    keras.utils.set_random_seed(args.seed)
    decoded, mean, std = _common.synthetic_decoded(args.count, args.size)
    datasets = {
        name: pipeline.make_dataset(
            decoded, batch_size=args.batch, mean=mean, std=std, training=True,
            augment=AugmentConfig(**opts), seed=args.seed,
        )
        for name, opts in AUGMENTATIONS.items()
    }
    cfg = load_config(
        None, {"seed": args.seed, "data.image_size": args.size, "train.batch_size": args.batch}
    )
    model = baseline.build(cfg)
    x, y = next(iter(datasets["flips+rot90 (default)"]))
    x, y = tf.constant(x), tf.constant(y)

    # Warm-up: trace the augmentation maps and the train step.
    for ds in datasets.values():
        pipeline_rate(ds, 1)
    train_rate(model, x, y, 3)

    pipe = {name: [] for name in datasets}
    train = []
    for _ in range(args.rounds):
        for name, ds in datasets.items():
            pipe[name].append(pipeline_rate(ds, args.epochs))
        train.append(train_rate(model, x, y, args.steps))

    train_ips = _common.median(train)
    rows = [["train step (U-Net, train_on_batch)", train_ips, "", ""]]
    lines = []
    for name, rates in pipe.items():
        ratio = _common.median(rates) / train_ips
        met = "yes" if ratio >= GOAL else "no"
        rows.append([f"pipeline: {name}", _common.median(rates), ratio, met])
        lines.append(f"- {name}: {_common.verdict(ratio, GOAL, True)}")
    text = "\n".join(
        [
            f"## Input pipeline vs training step ({args.size} px, batch {args.batch}, "
            f"{args.count} synthetic images, median of {args.rounds} alternating rounds)",
            "",
            _common.table(["what", "images/s", "pipeline / train", f"goal >= {GOAL:g}"], rows),
            "",
            *lines,
        ]
    )
    _common.emit("pipeline", text, write=not args.no_write)


if __name__ == "__main__":
    main()
