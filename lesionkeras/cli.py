"""The `lesionkeras` command line: thin commands that parse, validate and call the API.

Expected failures (bad input, bad config) print one line per problem and exit
2 with no traceback; a failed job (e.g. NaN loss) exits 1.

The commands live in `cli_train` (fit, lr-find), `cli_infer` (evaluate,
predict, export) and `cli_data` (the `data` group); this module is the group
that gathers them.
"""

from __future__ import annotations

import os

import click

# TensorFlow's C++ start-up chatter hides the messages users need; keep errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lesionkeras import __version__  # noqa: E402
from lesionkeras.cli_data import data  # noqa: E402
from lesionkeras.cli_infer import evaluate, export_cmd, predict  # noqa: E402
from lesionkeras.cli_train import fit, lr_find  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lesionkeras")
def main():
    """Skin-lesion segmentation from imperfect annotations (Keras 3 / TensorFlow)."""


for _command in (fit, lr_find, evaluate, predict, export_cmd, data):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main()
