"""Dispatch of `evaluate`/`predict` on the run config's `task` (`classify`, `attributes`)."""

from __future__ import annotations

from pathlib import Path

from lesionkeras import config as config_lib
from lesionkeras.classify import attributes
from lesionkeras.classify import metrics, runner


def run_task(model_path) -> str:
    """The `task` recorded in a run directory's config.toml (`segment` for anything else)."""
    path = Path(model_path) / "config.toml"
    if not path.is_file():
        return "segment"
    return config_lib.load_config(path).task


def evaluate(model_path, **kwargs):
    """(summary text lines, out folder) of the run's task."""
    if run_task(model_path) == "classify":
        report, classes, out = runner.evaluate(model_path, **kwargs)
        return [metrics.format_report(report, classes),
                f"confusion matrix: {out / 'confusion.csv'} and {out / 'confusion.png'}",
                f"per-image predictions: {out / 'per_image.csv'}"], out

    return attributes.evaluate(model_path, **kwargs)


def predict(model_path, input_path, out, batch_size=None):
    """One summary line of what was written."""
    if run_task(model_path) == "classify":
        path = runner.predict(model_path, input_path, out, batch_size=batch_size)
        return f"wrote the ISIC Task 3 submission CSV {path}"

    count = attributes.predict(model_path, input_path, out, batch_size=batch_size)
    return f"wrote {count} x 5 attribute masks (<image>_attribute_<name>.png) to {out}"
