"""Inference speed, size and agreement of every deployment artefact of one model.

One U-Net (the default: depth 4, 16 filters) is trained at 256 px on the
synthetic set (96 images, 10 epochs: about 90 steps, a validation Dice near
0.8; the header reports it) so that its masks resemble a deployed model's,
then exported as a SavedModel, as TFLite float32, float16, dynamic-range
and int8 (calibrated on synthetic images that are not among the test images),
and as ONNX (run with ONNX Runtime; the row is left out, with a note, when the
extra `lesionkeras[onnx]` is not installed).
Each contender is timed in alternation over several rounds (medians):
per-image latency at batch 1 and images/s at batch 16. Keras is timed with
`model.predict` on already normalised input (its reference in the goal); the
artefacts take raw images and run their baked-in preprocessing. Agreement is
the pooled Dice of each artefact's thresholded masks with the Keras model's
on held-out synthetic images, and the largest absolute difference of its
probabilities from Keras' there (the float exports' parity).
TFLite and ONNX Runtime run with 2 threads, TensorFlow with its default.

Goals (issue 6): TFLite int8 file <= 0.3 x the float32 file; int8 Dice
agreement >= 0.98; TFLite float32 batch-1 latency <= Keras `model.predict`
batch-1 latency.

    python benchmarks/inference.py [--quick]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import _common

SIZE = 256
QUANTISED = ("none", "float16", "dynamic", "int8")


def disk_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train(out: Path, seed: int, quick: bool) -> Path:
    from lesionkeras import config as config_lib
    from lesionkeras.training import run as run_lib

    cfg = config_lib.load_config(None, {
        # A barely trained model (4 epochs of 48 images: validation Dice 0.3-0.5,
        # 61% foreground) puts ~8% of the pixels within 0.5 of the decision
        # logit, so int8 rounding flips many of them; the agreement it measures
        # is that of an unusable model, not of a deployed one.
        "data.image_size": SIZE, "data.limit": 32 if quick else 96,
        "train.epochs": 2 if quick else 10,
        "train.batch_size": 8, "train.progress": False, "train.lr": 3e-3, "seed": seed,
        "train.image_every": 0, "out": str(out),
    })
    run_lib.fit(cfg, verbose=0, log=lambda *a: None)
    return out


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=0, help="Timing rounds (default 5, quick 3).")
    p.add_argument("--images", type=int, default=16, help="Held-out images for Dice agreement.")
    args = p.parse_args()
    _common.setup(args.cache)

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from lesionkeras import export, export_onnx
    from lesionkeras.data import pipeline, synthetic
    from lesionkeras.errors import DataError
    from lesionkeras.inference.loading import TFLiteRunner, load_predictor
    from lesionkeras.inference.onnx_runner import OnnxRunner

    rounds = args.rounds or (3 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="lesionkeras-inference-bench-"))
    started = time.perf_counter()
    run = train(work / "run", args.seed, args.quick)
    train_s = time.perf_counter() - started

    rep = work / "representative"
    rep.mkdir()
    for i in range(32):
        Image.fromarray(synthetic.make_sample(args.seed + 1000, i, size=SIZE).image).save(
            rep / f"r{i:02d}.png")

    artefacts = {"SavedModel": work / "savedmodel"}
    export.export_model(run, artefacts["SavedModel"])
    for q in QUANTISED:
        name = "TFLite float32" if q == "none" else f"TFLite {q}"
        artefacts[name] = work / f"model_{q}.tflite"
        export.export_model(run, artefacts[name], format="tflite", quantize=q,
                            representative_data=rep if q == "int8" else None, min_dice=0.0)
    notes = []
    try:
        export_onnx.check_available()
    except DataError as e:
        notes.append(f"ONNX row left out: {e}")
    else:
        artefacts["ONNX"] = work / "model.onnx"
        started_onnx = time.perf_counter()
        export.export_model(run, artefacts["ONNX"], format="onnx")
        notes.append(f"ONNX export (conversion and parity check): "
                     f"{time.perf_counter() - started_onnx:.1f} s")

    predictor = load_predictor(run)
    model = predictor.model
    raw = export.parity_images(SIZE, args.images, seed=args.seed + 2000).astype(np.float32)
    norm = pipeline.normalizer(predictor.mean, predictor.std)(raw).numpy()

    # One function per contender: raw 0-255 batch -> probabilities (Keras normalises
    # outside the timed call: `model.predict` on normalised input is the reference).
    loaded = tf.saved_model.load(str(artefacts["SavedModel"])).signatures["serving_default"]
    interpreters = {}

    def tflite(name):
        # Whole batches: the runner resizes the interpreter's input to the batch.
        runner = TFLiteRunner(artefacts[name], num_threads=2)
        interpreters[name] = runner
        return lambda x: runner(x)["probabilities"]

    contenders = {
        # The model returns logits; the artefacts include the activation, so Keras does too.
        "Keras": lambda x: np.asarray(predictor.to_probabilities(
            model.predict(x, batch_size=len(x), verbose=0))),
        "SavedModel": lambda x: loaded(images=tf.constant(x))["probabilities"].numpy(),
    }
    contenders.update({name: tflite(name) for name in artefacts if name.startswith("TFLite")})
    if "ONNX" in artefacts:
        onnx_runner = OnnxRunner(artefacts["ONNX"], num_threads=2)
        contenders["ONNX"] = lambda x: onnx_runner(x)["probabilities"]
    inputs = {"Keras": norm}

    def call(name, batch):
        fn, x = contenders[name], inputs.get(name, raw)[:batch]
        return lambda: fn(x)

    calls = {(name, b): call(name, b) for name in contenders for b in (1, 16)}
    for fn in calls.values():  # warm-up: tracing, allocation, delegate set-up
        fn()
    times = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            reps = 10 if key[1] == 1 else 2
            times[key].append(_common.timed(lambda: [fn() for _ in range(reps)]) / reps)

    agreement, max_diff = {}, {}
    reference_probs = export.keras_probabilities(predictor, raw)
    reference = reference_probs >= predictor.threshold
    for name, fn in contenders.items():
        x = inputs.get(name, raw)
        probs = np.concatenate([np.asarray(fn(x[i : i + 1])) for i in range(len(x))])
        agreement[name] = export.mask_dice(probs >= predictor.threshold, reference)
        max_diff[name] = float(np.abs(probs - reference_probs).max())

    sizes = {"Keras": disk_size(run / "model.keras")}
    sizes.update({name: disk_size(path) for name, path in artefacts.items()})
    rows = []
    for name in contenders:
        b1 = _common.median(times[(name, 1)])
        b16 = _common.median(times[(name, 16)])
        rows.append([name, b1 * 1000, 16 / b16, sizes[name] / 1e6, agreement[name],
                     f"{max_diff[name]:.2g}"])
    table = _common.table(
        ["model", "batch-1 latency (ms/image)", "batch-16 images/s", "size (MB)",
         "mask Dice vs Keras", "max abs diff vs Keras"], rows)

    by = {r[0]: r for r in rows}
    fg = float(reference.mean())
    val_dice = json.loads((run / "metrics.json").read_text())["dice"]
    lines = [
        f"# Inference benchmark ({SIZE} px, default U-Net, {rounds} rounds, medians; "
        f"{args.images} held-out synthetic images for Dice, Keras foreground {fg:.2f}; "
        f"trained {train_s:.0f} s, validation Dice {val_dice:.2f})",
        "",
        table,
        "",
        "Goals:",
        "- TFLite int8 size / TFLite float32 size: "
        + _common.verdict(sizes["TFLite int8"] / sizes["TFLite float32"], 0.3, False),
        "- TFLite int8 mask Dice vs Keras: "
        + _common.verdict(agreement["TFLite int8"], 0.98, True),
        "- TFLite float32 / Keras model.predict batch-1 latency: "
        + _common.verdict(by["TFLite float32"][1] / by["Keras"][1], 1.0, False),
    ]
    if "ONNX" in by:
        lines.append(f"- ONNX / SavedModel batch-1 latency: {by['ONNX'][1] / by['SavedModel'][1]:.2f}; "
                     f"ONNX / TFLite float32: {by['ONNX'][1] / by['TFLite float32'][1]:.2f}")
    lines += ["", *notes]
    _common.emit("inference", "\n".join(lines), write=not args.no_write)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
