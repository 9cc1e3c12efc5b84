"""Commands behind `bin/noise-table`, `bin/clean-size-curve` (see `experiments`) and
`bin/missing-table` (see `experiments.missing_table`)."""

from __future__ import annotations

import sys

import click

from lesionkeras import config as config_lib
from lesionkeras.console import handle_errors, quiet_tensorflow_import

# Flag -> dotted config key, shared by both commands.
SHARED_FLAGS = {
    "data": "data.source", "image_size": "data.image_size", "limit": "data.limit",
    "val_fraction": "data.val_fraction", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "seed",
    "filters": "model.filters", "clean_batch_size": "meta.clean_batch_size",
    "finetune_epochs": "meta.finetune_epochs", "meta_grad": "meta.meta_grad",
}


def _shared_options(fn):
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                     help="TOML config shared by every run; flags override its keys."),
        click.option("--out", required=True, help="Folder of the runs and the table files."),
        click.option("--data", default=None, help="Data folder (default: synthetic)."),
        click.option("--image-size", type=click.IntRange(min=16), default=None),
        click.option("--limit", type=click.IntRange(min=0), default=None),
        click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=None),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Epochs of every run (finetune: of its noisy stage)."),
        click.option("--finetune-epochs", type=click.IntRange(min=1), default=None,
                     help="finetune: epochs of the clean stage."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Batch size (meta: noisy images per step)."),
        click.option("--clean-batch-size", type=click.IntRange(min=1), default=None),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None),
        click.option("--filters", type=click.IntRange(min=1), default=None),
        click.option("--meta-grad", type=click.Choice(["nested", "forward"]), default=None),
        click.option("--seed", type=int, default=None),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _base_config(config_file, flags):
    overrides = {SHARED_FLAGS[k]: v for k, v in flags.items() if k in SHARED_FLAGS and v is not None}
    # The runs report their validation Dice; progress is one line per epoch.
    overrides["train.progress"] = False
    return config_lib.load_config(config_file, overrides)


def _run(fn, out, name, markdown=None):
    from lesionkeras import files

    files.check_output(out)  # before the first run: a file in the way, no write access...
    try:
        df = fn()
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; run the same command again to continue ({out})", err=True)
        sys.exit(130)
    if markdown is None:
        from lesionkeras.experiments.noisy import _markdown as markdown

    click.echo(markdown(df))
    click.echo(f"wrote {out}/{name}.csv, .md, .png")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_shared_options
@click.option("--levels", default="7-vertex,4-axis,3-vertex,maximal",
              help="Comma-separated noise levels.")
@click.option("--clean-count", type=click.IntRange(min=1), default=100,
              help="Clean training images (paper: 100).")
@handle_errors
def noise_table(config_file, out, levels, clean_count, **flags):
    """Table 1 of Mirikharaji et al. 2019: fine-tuning vs meta-reweighting per noise level.

    Trains the supervised baseline, then for each level the baseline on the noisy
    masks, fine-tuning and meta-reweighting; writes OUT/noise_table.{csv,md,png}.
    Run the same command again to continue an interrupted table.
    """
    from lesionkeras.data import noise

    chosen = [s.strip() for s in levels.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in noise.LEVELS]
    if unknown or not chosen:
        raise click.BadParameter(
            f"unknown noise level {unknown[0] if unknown else '(none given)'}; "
            f"choose from {', '.join(noise.LEVELS)}", param_hint="--levels",
        )
    cfg = _base_config(config_file, flags)
    quiet_tensorflow_import()
    from lesionkeras.experiments import noisy as experiments

    _run(lambda: experiments.noise_table(cfg, out, levels=chosen, clean_count=clean_count,
                                         log=click.echo), out, "noise_table")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_shared_options
@click.option("--sizes", default="10,25,50,100", help="Comma-separated clean-set sizes.")
@click.option("--level", type=click.Choice(["7-vertex", "3-vertex", "4-axis", "maximal"]),
              default="3-vertex", help="Noise of the other training images.")
@click.option("--methods", default="finetune,image-reweight,meta",
              help="Comma-separated methods (finetune, image-reweight, meta).")
@handle_errors
def clean_size_curve(config_file, out, sizes, level, methods, **flags):
    """Fig. 2 of Mirikharaji et al. 2019: Dice against the number of clean images.

    Writes OUT/clean_size_curve.{csv,md,png}; run again to continue.
    """
    sizes = config_lib.parse_int_list(sizes, "--sizes")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in ("finetune", "image-reweight", "meta")]
    if bad or not chosen or not sizes:
        raise click.BadParameter(
            f"expected comma-separated finetune, image-reweight, meta; got {methods!r}",
            param_hint="--methods",
        )
    cfg = _base_config(config_file, flags)
    quiet_tensorflow_import()
    from lesionkeras.experiments import noisy as experiments

    _run(lambda: experiments.clean_size_curve(cfg, out, sizes=sizes, level=level,
                                              methods=chosen, log=click.echo),
         out, "clean_size_curve")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", required=True, help="Folder of the runs and the table files.")
@click.option("--data", default=None, help="Data folder, manifest CSV or `synthetic`.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config every run starts from.")
@click.option("--alphas", default="0,0.5,0.7", show_default=True,
              help="Comma-separated fractions of removed annotations.")
@click.option("--methods", default="multiclass,smile,smiler", show_default=True)
@click.option("--structures", default=None, help="Comma-separated structures.")
@click.option("--image-size", type=click.IntRange(min=16), default=None)
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--relabel-epochs", type=click.IntRange(min=1), default=None)
@click.option("--relabel-rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--model", default=None, help="Registered model name.")
@click.option("--filters", type=click.IntRange(min=1), default=None)
@click.option("--limit", type=click.IntRange(min=0), default=None)
@click.option("--seed", type=int, default=None)
@handle_errors
def missing_table(out, config_file, alphas, methods, relabel_rounds, **flags):
    """Baseline (softmax) vs SMILE vs SMILEr at several missing-label rates alpha.

    Writes OUT/missing_table.{csv,md,png} and one run directory per (method,
    alpha) in OUT/runs/; run the same command again to continue.
    """
    try:
        alpha_values = [float(a) for a in alphas.split(",") if a.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers; got {alphas!r}",
                                 param_hint="--alphas") from None
    keys = {"data": "data.source", "structures": "smile.structures",
            "image_size": "data.image_size", "epochs": "train.epochs",
            "relabel_epochs": "smile.relabel_epochs", "model": "model.name",
            "filters": "model.filters", "limit": "data.limit", "seed": "seed"}
    overrides = {keys[k]: v for k, v in flags.items() if v is not None}
    overrides["train.progress"] = False
    quiet_tensorflow_import()
    from lesionkeras.experiments import missing_table as mt

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    _run(lambda: mt.missing_table(out, alphas=alpha_values, methods=chosen, config=config_file,
                                  overrides=overrides, relabel_rounds=relabel_rounds,
                                  log=click.echo),
         out, "missing_table",
         markdown=lambda t: mt.to_markdown(t, [c[5:] for c in t.columns if c.startswith("dice_")]))
