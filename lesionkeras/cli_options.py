"""Command-line options shared by several `lesionkeras` commands."""

from __future__ import annotations

import click

# Shared options (module constants, as commands reuse them).
DATA_OPTION = click.option(
    "--data", "data", default=None,
    help="Data folder (ISIC, PH2, images/+masks/), manifest CSV, or `synthetic` (default).",
)
LIMIT_OPTION = click.option(
    "--limit", type=click.IntRange(min=0), default=None, help="Use only the first N images."
)
THRESHOLD_OPTION = click.option(
    "--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
    help="Probability threshold (default: the one stored with the model).",
)
BATCH_OPTION = click.option(
    "--batch-size", type=click.IntRange(min=1), default=None, help="Batch size."
)
