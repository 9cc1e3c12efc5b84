"""The training commands of the CLI: `fit` (its flags, method flags from the config tables) and `lr-find`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from lesionkeras import config as config_lib
from lesionkeras.cli_options import BATCH_OPTION, DATA_OPTION, LIMIT_OPTION
from lesionkeras.console import handle_errors, quiet_tensorflow_import

# Flag name -> dotted config key; every flag overrides the config file.
FIT_FLAGS = {
    "method": "method", "task": "task", "data": "data.source", "out": "out", "model": "model.name",
    "epochs": "train.epochs", "batch_size": "train.batch_size",
    "image_size": "data.image_size", "lr": "train.lr", "seed": "seed",
    "limit": "data.limit", "strategy": "train.strategy",
    "mixed_precision": "train.mixed_precision", "optimizer": "train.optimizer",
    "weight_decay": "train.weight_decay", "loss": "train.loss",
    "val_fraction": "data.val_fraction", "filters": "model.filters", "depth": "model.depth",
    "progress": "train.progress", "progress_metrics": "train.progress_metrics",
    "encoder_weights": "model.encoder_weights", "schedule": "train.schedule",
    "freeze_encoder_epochs": "train.freeze_encoder_epochs",
}
# Options named `<table>__<key>` set `table.key`: the methods' own flags.
TABLE_SEP = "__"


def _table_option(table, f):
    """The `fit` option of a method's config key with `flag` metadata."""
    meta = f.metadata
    default = f.default
    decl = meta["flag"] if isinstance(meta["flag"], str) else "--" + f.name.replace("_", "-")
    if isinstance(default, bool) and "/" not in decl:
        decl = f"{decl}/--no-{decl[2:]}"
    if meta.get("choices"):
        kind = click.Choice([c for c in meta["choices"] if c != ""])
    elif isinstance(default, bool):
        kind = bool
    elif isinstance(default, int):
        kind = click.IntRange(min=meta.get("minimum"), max=meta.get("maximum"))
    elif isinstance(default, float):
        kind = click.FloatRange(min=meta.get("minimum"), max=meta.get("maximum"))
    else:
        kind = str
    return click.Option([decl, f"{table}{TABLE_SEP}{f.name}"], type=kind, default=None,
                        help=meta["help"])


class _FitCommand(click.Command):
    """A command whose `--method`/`--task` choices and method flags come from the registries.

    They are read when the command is used (parsing or its own --help), not when
    the CLI starts: the methods' modules import TensorFlow.
    """

    def get_params(self, ctx):
        if not hasattr(self, "_own_params"):
            self._own_params = list(self.params)
        quiet_tensorflow_import()
        tables = [
            _table_option(table, f)
            for table, cls in config_lib.sections().items()
            if table not in config_lib.SHARED_SECTIONS
            for f in dataclasses.fields(cls) if f.metadata.get("flag")
        ]
        self.params = [
            click.Option(["--method"], type=click.Choice(config_lib.methods()), default=None,
                         help="Training method (default: baseline)."),
            click.Option(["--task"], type=click.Choice(config_lib.TASKS), default=None,
                         help="ISIC task: segment (default), attributes (--method multitask) "
                              "or classify (--method triplet or softmax)."),
            *self._own_params, *tables,
        ]
        return super().get_params(ctx)


def _overrides(flags):
    """{dotted key: value} of the flags given (shared flags and method-table flags)."""
    out = {}
    for name, value in flags.items():
        if value is None:
            continue
        out[name.replace(TABLE_SEP, ".") if TABLE_SEP in name else FIT_FLAGS[name]] = value
    for cls in config_lib.sections().values():
        hook = getattr(cls, "cli_overrides", None)
        if hook is not None:
            out = hook(out)
    return out


@click.command(cls=_FitCommand)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config; flags override its keys.")


@DATA_OPTION
@click.option("--out", default=None, help="Run directory (default: runs/<method>-<time>).")
@click.option("--model", default=None, help="Registered model name (default: the method's own model).")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@BATCH_OPTION
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Model input side in pixels.")


@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate.")


@click.option("--seed", type=int, default=None, help="Seed of every random choice.")
@LIMIT_OPTION
@click.option("--strategy", type=click.Choice(["auto", "default", "mirrored", "multiworker"]),
              default=None, help="Distribution strategy.")


@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted run in this directory.")


@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="Mixed precision (bfloat16 on CPU, float16 on GPU).")


@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None)
@click.option("--loss", type=click.Choice(["bce", "dice", "jaccard", "bce+dice", "bce+jaccard"]),
              default=None)


@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=None)
@click.option("--filters", type=click.IntRange(min=1), default=None, help="U-Net base filters.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="U-Net depth.")
@click.option("--progress/--no-progress", default=None, help="Keras progress bar (default on).")
@click.option("--progress-metrics", type=click.Choice(["compact", "all"]), default=None,
              help="Progress bar: loss and Dice only (compact, default) or every metric (all).")
@click.option("--encoder-weights", type=click.Path(exists=True), default=None,
              help="ResNet U-Nets: local encoder weights (.weights.h5 or keras-hub preset folder).")


@click.option("--schedule", type=click.Choice(
    ["constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau"]), default=None,
    help="Learning-rate schedule (default: constant).")


@click.option("--freeze-encoder-epochs", type=click.IntRange(min=0), default=None,
              help="Encoder frozen for the first N epochs, then all trains (models with an "
                   "encoder, e.g. vgg19se; ISIC 2018 report: 50).")


@click.option("--folds", "kfold", type=click.IntRange(min=2), default=None,
              help="Train K models on a K-fold split (RUN/fold<i>/); evaluate and predict "
                   "on RUN average them.")


@handle_errors
def fit(config_file, resume, kfold, **flags):
    """Train a model; writes a run directory (config, checkpoints, TensorBoard)."""
    overrides = _overrides(flags)
    if resume:
        if config_file:
            raise click.UsageError("--resume reads the run's own config; drop --config.")
        if kfold:
            raise click.UsageError("--folds cannot be combined with --resume (a run with "
                                   "folds resumes all of them).")
        cfg = config_lib.load_config(Path(resume) / "config.toml")
        cfg = cfg.override(overrides)
    else:
        cfg = config_lib.load_config(config_file, overrides)

    quiet_tensorflow_import()
    from lesionkeras.training import run

    try:
        if kfold:
            result = run.fit_folds(cfg, kfold, log=click.echo)
        elif resume and (kfold := run.fold_count(resume)):
            result = run.fit_folds(cfg, resume_dir=resume, log=click.echo)
        else:
            result = run.fit(cfg, resume_dir=resume, log=click.echo)
    except KeyboardInterrupt as interrupt:
        where = getattr(interrupt, "run_dir", None)
        if where is not None and (Path(where) / "config.toml").exists():
            click.echo(f"\ninterrupted; continue with: lesionkeras fit --resume {where}", err=True)
        else:
            click.echo("\ninterrupted before the run wrote anything", err=True)
        sys.exit(130)
    click.echo(f"run directory: {result.run_dir}")
    shown = ["dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity",
             "balanced_accuracy", "balanced_accuracy_softmax", "balanced_accuracy_nearest_mean"]
    parts = [f"{k} {result.metrics[k]:.4f}" for k in shown if k in result.metrics]
    if parts:
        click.echo("validation (best checkpoint): " + ", ".join(parts))
    per_structure = [f"{k[5:]} {v:.4f}" for k, v in result.metrics.items() if k.startswith("dice_")]
    if per_structure:
        click.echo("per-structure dice: " + ", ".join(per_structure))
    # With folds, each fold has its own tensorboard/ below RUN.
    click.echo(f"tensorboard --logdir {result.run_dir if kfold else result.run_dir / 'tensorboard'}")


@click.command(name="lr-find")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config; flags override its keys.")


@DATA_OPTION
@click.option("--out", required=True, type=click.Path(),
              help="Folder for lr_find.csv and lr_find.png.")


@click.option("--model", default=None, help="Registered model name (default: the method's own model).")
@BATCH_OPTION
@click.option("--image-size", type=click.IntRange(min=16), default=None,
              help="Model input side in pixels.")


@click.option("--seed", type=int, default=None, help="Seed of every random choice.")
@LIMIT_OPTION
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None)
@click.option("--loss", type=click.Choice(["bce", "dice", "jaccard", "bce+dice", "bce+jaccard"]),
              default=None)


@click.option("--filters", type=click.IntRange(min=1), default=None, help="U-Net base filters.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="U-Net depth.")
@click.option("--encoder-weights", type=click.Path(exists=True), default=None,
              help="ResNet U-Nets: local encoder weights.")


@click.option("--steps", type=click.IntRange(min=2), default=100, show_default=True,
              help="Batches of the test (it stops earlier if the loss diverges).")


@click.option("--min-lr", type=click.FloatRange(min=0, min_open=True), default=1e-7,
              show_default=True)


@click.option("--max-lr", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True)


@handle_errors
def lr_find(config_file, out, steps, min_lr, max_lr, **flags):
    """Learning-rate range test: writes a CSV and a log-x plot, prints the suggested rate."""
    if min_lr >= max_lr:
        raise click.UsageError(f"--min-lr ({min_lr}) must be below --max-lr ({max_lr}).")
    overrides = _overrides(flags)
    cfg = config_lib.load_config(config_file, overrides)
    quiet_tensorflow_import()
    from lesionkeras.training import lr_find as lr_find_lib

    result = lr_find_lib.run_lr_find(cfg, out, min_lr=min_lr, max_lr=max_lr, steps=steps)
    stop = "the loss diverged" if result.diverged else "all steps run"
    click.echo(f"tried {len(result.lrs)} rates from {min_lr:.2g} to {result.lrs[-1]:.2g} ({stop})")
    click.echo(f"wrote {Path(out) / 'lr_find.csv'} and {Path(out) / 'lr_find.png'}")
    click.echo(f"suggested learning rate: {result.suggestion:.3g}")
    if not result.conclusive:
        click.echo("warning: the smoothed loss never fell by more than its batch-to-batch "
                   "noise; the suggestion is unreliable (a trained model? try more --steps)",
                   err=True)
