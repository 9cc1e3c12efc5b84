"""Cost of online hardest-negative triplet mining against the forward pass of the classifier.

A = the triplet loss with its online mining on one batch of embeddings
(`lesionkeras.classify.triplet.triplet_loss`: B x B distances, masks, hardest
negative per anchor, hinge), compiled with `tf.function`; B = the forward
pass (training mode) of the ResNet classifier on the images of that batch,
compiled the same way. Timed alternately after a warm-up call each; the
ratio of medians A / B is reported (goal < 0.05: mining must be a rounding
error next to the network). ISIC 2018 report: ResNet-101, batch 64, 256 px;
the defaults are smaller so that it runs in about a minute on a CPU.

    python benchmarks/triplet_mining.py [--quick] [--backbone resnet18] [--size 128] [--batch 32]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18",
                   choices=("resnet18", "resnet34", "resnet50", "resnet101"))
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--rounds", type=int, default=0, help="Timed rounds (default 20, quick 8).")
    args = p.parse_args()
    _common.setup(args.cache)
    import keras
    import numpy as np
    import tensorflow as tf

    from lesionkeras.classify.triplet import triplet_loss
    from lesionkeras.models.resnet_classifier import build_resnet_classifier

    rounds = args.rounds or (8 if args.quick else 20)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images = tf.constant(rng.normal(size=(args.batch, args.size, args.size, 3)), tf.float32)
    # An ISIC-like imbalance: about two thirds of the batch in the majority class 1.
    labels = tf.constant(
        rng.choice(args.classes, size=args.batch,
                   p=[0.67 if k == 1 else 0.33 / (args.classes - 1) for k in range(args.classes)]),
        tf.int32,
    )
    network = build_resnet_classifier((args.size, args.size, 3), args.classes,
                                      backbone=args.backbone)
    embeddings = tf.constant(network(images)["embedding"])

    forward = tf.function(lambda x: network(x, training=True)["embedding"])
    mining = tf.function(lambda e, y: triplet_loss(e, y, margin=0.2, majority=1))
    contenders = {"mining": lambda: mining(embeddings, labels)[0].numpy(),
                  "forward": lambda: forward(images).numpy()}
    for fn in contenders.values():
        fn()  # trace and warm up
    times = {name: [] for name in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    med = {name: _common.median(v) for name, v in times.items()}
    ratio = med["mining"] / med["forward"]
    triplets = float(mining(embeddings, labels)[1])
    text = "\n".join([
        f"# Triplet mining vs forward pass ({args.backbone}, {args.size} px, batch {args.batch}, "
        f"{args.classes} classes, {rounds} rounds)",
        "",
        _common.table(
            ["contender", "median ms / batch"],
            [["hardest-negative mining + triplet loss", 1000 * med["mining"]],
             [f"{args.backbone} forward pass (training mode)", 1000 * med["forward"]]],
        ),
        "",
        f"valid triplets in the batch: {triplets:.0f}",
        _common.verdict(ratio, 0.05, higher_is_better=False),
    ])
    _common.emit("triplet_mining", text, write=not args.no_write)


if __name__ == "__main__":
    main()
