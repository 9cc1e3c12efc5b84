"""Helpers shared by the benchmark scripts: environment, data, timing, tables.

Import this module before TensorFlow: `setup` sets environment variables that
TensorFlow and the synthetic-data cache read when they start.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="About one minute instead of five.")
    p.add_argument("--seed", type=int, default=0, help="Seed of data, weights and augmentation.")
    p.add_argument(
        "--cache", default="",
        help="Synthetic-data cache to use (and keep); default: a temporary folder.",
    )
    p.add_argument(
        "--no-write", action="store_true",
        help="Only print the table; do not write benchmarks/results/<name>.md.",
    )
    return p


def setup(cache: str = "") -> str:
    """Quiets TensorFlow and points `LESIONKERAS_CACHE` at `cache` or a temp folder.

    Args:
        cache: str. Folder to use and keep; empty for a temporary folder that
            is removed at exit.

    Returns:
        str. The cache folder.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not cache:
        cache = tempfile.mkdtemp(prefix="lesionkeras-bench-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    os.environ["LESIONKERAS_CACHE"] = cache
    _quiet_tensorflow_import()
    return cache


def _quiet_tensorflow_import():
    # TensorFlow prints its C++ start-up lines (oneDNN, CUDA probing) before
    # honouring TF_CPP_MIN_LOG_LEVEL; mute the file descriptor for the import.
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(null, 2)
        import tensorflow as tf

        tf.config.list_logical_devices("CPU")
        # Many models are built on purpose; their retracing warnings are noise here.
        tf.get_logger().setLevel("ERROR")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def synthetic_decoded(count: int, size: int):
    """Decoded synthetic dataset at `size` px, cache warm, and its statistics.

    Returns:
        (decoded dataset, mean, std): `decoded_dataset` of `count` synthetic
        images, already iterated once by `compute_stats`.
    """
    from lesionkeras.data import pipeline, sources

    df = sources.load_manifest("synthetic", synthetic_count=count, synthetic_size=size)
    decoded = pipeline.decoded_dataset(df, size)
    mean, std = pipeline.compute_stats(decoded)
    return decoded, mean, std


def timed(fn, *args, **kwargs) -> float:
    """Seconds taken by `fn(*args, **kwargs)`."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def median(values) -> float:
    return statistics.median(values)


def table(headers, rows) -> str:
    """A markdown table; floats are printed with 3 significant digits."""

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def emit(name: str, text: str, write: bool = True) -> None:
    """Prints `text` and, if `write`, saves it as benchmarks/results/<name>.md."""
    print(text)
    if write:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / f"{name}.md"
        path.write_text(text + "\n")
        print(f"\n(written to {path})")


def verdict(ratio: float, goal: float, higher_is_better: bool) -> str:
    met = ratio >= goal if higher_is_better else ratio <= goal
    sign = ">=" if higher_is_better else "<="
    return f"ratio {ratio:.2f} (goal {sign} {goal}): {'MET' if met else 'NOT MET'}"
