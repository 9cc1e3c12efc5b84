"""Command-line plumbing shared by every entry point: quiet TensorFlow import, error exits.

Expected failures (bad input, bad config) print one line per problem and exit
2 with no traceback; a failed job (e.g. NaN loss, a parity check) exits 1.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from lesionkeras.errors import LesionKerasError, TrainingError


def quiet_tensorflow_import():
    """Imports TensorFlow with its C++ start-up lines (oneDNN, CUDA probing) hidden.

    TensorFlow 2.20+ prints them before its logging honours
    TF_CPP_MIN_LOG_LEVEL, so the file descriptor itself is muted for the import.
    """
    if "tensorflow" in sys.modules:
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(null, 2)
        import tensorflow as tf

        # Physical, not logical, devices: this probes CUDA (the noisy part) without
        # initialising the runtime, which MultiWorkerMirroredStrategy must configure first.
        tf.config.list_physical_devices("GPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def fail(lines, code):
    for line in lines:
        click.echo(f"error: {line}" if not line.startswith(("error:", "warning:")) else line, err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turns expected failures into one line each and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LesionKerasError as e:
            lines = e.lines() if hasattr(e, "lines") else [str(e)]
            fail(lines, 1 if isinstance(e, TrainingError) else 2)

    return wrapper
