"""The `lesionkeras` command line: thin commands that parse, validate and call the API.

Expected failures (bad input, bad config) print one line per problem and exit
2 with no traceback; a failed job (e.g. NaN loss) exits 1.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import click

# TensorFlow's C++ start-up chatter hides the messages users need; keep errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from lesionkeras import __version__  # noqa: E402
from lesionkeras import config as config_lib  # noqa: E402
from lesionkeras.console import fail, handle_errors, quiet_tensorflow_import  # noqa: E402


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lesionkeras")
def main():
    """Skin-lesion segmentation from imperfect annotations (Keras 3 / TensorFlow)."""


# Flag name -> dotted config key; every flag overrides the config file.
FIT_FLAGS = {
    "method": "method", "task": "task", "data": "data.source", "out": "out", "model": "model.name",
    "epochs": "train.epochs", "batch_size": "train.batch_size",
    "image_size": "data.image_size", "lr": "train.lr", "seed": "seed",
    "limit": "data.limit", "strategy": "train.strategy",
    "mixed_precision": "train.mixed_precision", "optimizer": "train.optimizer",
    "weight_decay": "train.weight_decay", "loss": "train.loss",
    "val_fraction": "data.val_fraction", "filters": "model.filters", "depth": "model.depth",
    "progress": "train.progress",
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


@main.command(cls=_FitCommand)
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
    except KeyboardInterrupt:
        where = resume or cfg.out or "the run directory"
        click.echo(f"\ninterrupted; continue with: lesionkeras fit --resume {where}", err=True)
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


@main.command(name="lr-find")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML config; flags override its keys.")
@DATA_OPTION
@click.option("--out", required=True, type=click.Path(file_okay=False),
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


def _load_data(data, limit):
    from lesionkeras.data import sources

    return sources.load_manifest(data or "synthetic", limit=limit or 0)


ENSEMBLE_OPTION = click.option(
    "--ensemble", is_flag=True,
    help="Average the probabilities of several MODELs (any mix of runs, .keras, "
         "SavedModels and .tflite files of the same task).",
)
TTA_OPTION = click.option(
    "--tta", type=click.Choice(["none", "flips"]), default="none", show_default=True,
    help="Test-time augmentation: average over the 8 flips/rotations, each undone first.",
)


POSTPROCESS_OPTION = click.option(
    "--postprocess", default="",
    help="Comma-separated post-processing: `crf` (dense CRF on image and map), `morph` "
         "(fill holes, drop small components, keep the largest); parameters from the "
         "[postprocess] table of MODEL's config.toml.",
)


def _load_predictor(model_paths, ensemble, tta, threshold):
    from lesionkeras.inference import loading
    from lesionkeras.inference.predictor import with_tta

    if len(model_paths) > 1 and not ensemble:
        raise click.UsageError("several MODELs need --ensemble.")
    if ensemble and len(model_paths) < 2:
        raise click.UsageError("--ensemble needs at least two MODELs.")
    if ensemble:
        predictor = loading.load_ensemble(model_paths, threshold=threshold)
    else:
        predictor = loading.load_predictor(model_paths[0], threshold=threshold)
    for note in predictor.notes:
        click.echo(note, err=True)
    return with_tta(predictor, tta)


@main.command()
@click.argument("model_paths", metavar="MODEL...", nargs=-1, required=True)
@DATA_OPTION
@click.option("--out", default=None, help="Output folder (default: MODEL/eval-<data>).")
@THRESHOLD_OPTION
@BATCH_OPTION
@LIMIT_OPTION
@ENSEMBLE_OPTION
@TTA_OPTION
@POSTPROCESS_OPTION
@click.option("--report", is_flag=True,
              help="Also write report.html: metric table and every image's overlay of truth "
                   "and prediction, worst Dice first (PNGs in report/).")
@click.option("--split", type=click.Choice(["all", "train", "val"]), default="all",
              show_default=True,
              help="Score only the run's own training or validation images (needs a run "
                   "directory; the split is rebuilt from its config and seed).")
@handle_errors
def evaluate(model_paths, data, out, threshold, batch_size, limit, ensemble, tta, postprocess,
             report, split):
    """Score MODEL on a labelled folder: per-image CSV, summary JSON, table.

    With --ensemble, MODEL... are averaged (and each is also scored alone).
    With --postprocess, scores with and without it are shown side by side.
    """
    quiet_tensorflow_import()
    from lesionkeras import postprocess as postprocess_lib
    from lesionkeras.data import check
    from lesionkeras.inference import evaluate as evaluation

    model_path = model_paths[0]
    from lesionkeras.classify import tasks

    if tasks.run_task(model_path) != "segment":
        # ISIC 2018 Task 2/3 runs: their own metrics and reports.
        if len(model_paths) > 1 or tta != "none" or postprocess or report or split != "all":
            raise click.UsageError("--ensemble, --tta, --postprocess, --report and --split "
                                   "are for segmentation runs only.")
        lines, _ = tasks.evaluate(model_path, data=data, out=out, batch_size=batch_size,
                                  limit=limit)
        click.echo("\n".join(lines))
        return
    steps = postprocess_lib.parse_steps(postprocess)
    predictor = _load_predictor(model_paths, ensemble, tta, threshold)
    if split == "all":
        df = _load_data(data, limit)
        check.validate(df, require_masks=True, source=data or "synthetic")
    else:
        from lesionkeras.training import run

        if not Path(model_path).is_dir():
            raise click.UsageError("--split needs a run directory as MODEL.")
        cfg = run.load_run_config(model_path)
        if data:
            cfg = cfg.override({"data.source": data})
        if limit is not None:
            cfg = cfg.override({"data.limit": limit})
        df, _ = run.prepare_data(cfg)
        df = df[df["split"] == split].reset_index(drop=True)
        data = data or cfg.data.source
    if out is None:
        base = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        suffix = "" if split == "all" else f"-{split}"
        out = base / f"eval-{Path(data).name if data else 'synthetic'}{suffix}"
    with click.progressbar(length=len(df), label="evaluating", file=sys.stderr) as bar:
        _, summary = evaluation.evaluate(
            predictor, df, out_dir=out, batch_size=batch_size or 8, progress=bar.update,
            postprocess=steps, post_cfg=evaluation.postprocess_config(model_path),
            report=report,
        )
    click.echo(evaluation.format_summary(summary))
    click.echo(f"per-image scores: {Path(out) / 'per_image.csv'}")
    if report:
        click.echo(f"failure report: {Path(out) / 'report.html'}")


@main.command()
@click.argument("model_paths", metavar="MODEL...", nargs=-1, required=True)
@click.argument("input_path", metavar="INPUT")
@click.option("--out", required=True, help="Folder for the masks.")
@THRESHOLD_OPTION
@click.option("--probabilities", is_flag=True, help="Also write probability maps.")
@click.option("--overlay", is_flag=True, help="Also write overlays of the mask on the image.")
@BATCH_OPTION
@ENSEMBLE_OPTION
@TTA_OPTION
@POSTPROCESS_OPTION
@click.option("--mc-samples", type=click.IntRange(min=2), default=None,
              help="Monte-Carlo dropout: average N dropout draws (models with dropout) and "
                   "also write <id>_mean.png and <id>_std.png (std x 510).")
@handle_errors
def predict(model_paths, input_path, out, threshold, probabilities, overlay, batch_size,
            ensemble, tta, postprocess, mc_samples):
    """Segment an image file or a folder; writes 0/255 PNG masks at original size.

    With --ensemble, the probabilities of MODEL... are averaged.
    """
    quiet_tensorflow_import()
    from lesionkeras import postprocess as postprocess_lib
    from lesionkeras.data import check
    from lesionkeras.inference import evaluate as evaluation
    from lesionkeras.inference import predict as prediction

    from lesionkeras.classify import tasks

    if tasks.run_task(model_paths[0]) != "segment":
        # ISIC 2018 Task 2/3 runs write the challenge's submission formats.
        if len(model_paths) > 1 or tta != "none" or postprocess or mc_samples or overlay:
            raise click.UsageError("--ensemble, --tta, --postprocess, --mc-samples and "
                                   "--overlay are for segmentation runs only.")
        click.echo(tasks.predict(model_paths[0], input_path, out, batch_size=batch_size))
        return
    steps = postprocess_lib.parse_steps(postprocess)
    if mc_samples and (ensemble or tta != "none"):
        raise click.UsageError("--mc-samples combines with neither --ensemble nor --tta.")
    predictor = _load_predictor(model_paths, ensemble, tta, threshold)
    df = evaluation.list_images(input_path)
    check.validate(df, require_masks=False, source=input_path)
    with click.progressbar(length=len(df), label="predicting", file=sys.stderr) as bar:
        written = prediction.predict(
            predictor, df, out, probabilities=probabilities, overlays=overlay,
            batch_size=batch_size or 8, progress=bar.update, postprocess=steps,
            post_cfg=evaluation.postprocess_config(model_paths[0]), mc_samples=mc_samples or 0,
        )
    structures = getattr(predictor, "structures", ())
    if len(structures) > 1:
        click.echo(f"wrote {len(written)} x {len(structures)} masks (<id>_<structure>.png; "
                   f"{', '.join(structures)}) to {out}")
    else:
        click.echo(f"wrote {len(written)} masks to {out}")


@main.command(name="export")
@click.argument("model_path", metavar="MODEL")
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "tflite"]),
              default="savedmodel", show_default=True,
              help="SavedModel folder (TensorFlow Serving) or float32 .tflite file.")
@click.option("--out", required=True,
              help="Output folder (savedmodel) or .tflite file; must not exist yet.")
@THRESHOLD_OPTION
@click.option("--parity-images", type=click.IntRange(min=1), default=4, show_default=True,
              help="Synthetic images of the parity check against the Keras model.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest accepted absolute probability difference.")
@click.option("--quantize", type=click.Choice(["none", "float16", "dynamic", "int8"]),
              default="none", show_default=True,
              help="TFLite quantisation: float16 weights, dynamic-range int8 weights, or "
                   "int8 weights and activations (needs --representative-data).")
@click.option("--representative-data", type=click.Path(), default=None,
              help="int8: folder of real images calibrating the activation ranges.")
@click.option("--min-dice", type=click.FloatRange(0, 1), default=0.98, show_default=True,
              help="Quantised exports: smallest accepted mask Dice agreement with Keras.")
@handle_errors
def export_cmd(model_path, fmt, out, threshold, parity_images, tolerance, quantize,
               representative_data, min_dice):
    """Export MODEL (run directory or .keras) with preprocessing baked in, then check parity.

    The export is refused (exit 1, nothing left at --out) when the artefact's
    probabilities differ from the Keras model's by more than --tolerance, or,
    quantised, when its masks agree with the Keras masks below --min-dice.
    """
    quiet_tensorflow_import()
    from lesionkeras import export
    from lesionkeras.classify import tasks

    if tasks.run_task(model_path) != "segment":
        raise click.UsageError(
            f"{model_path}: export of `{tasks.run_task(model_path)}` runs is not supported yet "
            "(their model.keras loads with keras.saving.load_model)."
        )
    try:
        result = export.export_model(
            model_path, out, format=fmt, parity_count=parity_images, tolerance=tolerance,
            threshold=threshold, log=lambda line: click.echo(line, err=line.startswith("warning:")),
            quantize=quantize, representative_data=representative_data, min_dice=min_dice,
        )
    except export.ParityError as e:
        fail([str(e)], 1)
    click.echo(f"wrote {result.path} and {result.metadata_path}")


@main.group()
def data():
    """Create and inspect datasets."""


@data.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def synth(out, count, size, seed):
    """Write the built-in synthetic dataset in the ISIC 2018 layouts (Tasks 1, 2, 3)."""
    from lesionkeras.data import synthetic

    with click.progressbar(length=count, label="generating", file=sys.stderr) as bar:
        path = synthetic.write_isic(out, count=count, size=size, seed=seed,
                                    progress=lambda n: bar.update(1))
    click.echo(f"wrote {count} synthetic images ({size} px, seed {seed}) to {path}")


@data.command()
@click.option("--level", required=True, type=click.Choice(["7-vertex", "3-vertex", "4-axis", "maximal"]),
              help="Noise level (Mirikharaji et al. 2019, section 3).")
@click.option("--in", "source", required=True, type=click.Path(),
              help="Folder of masks (or one mask file).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (must not exist or be empty).")
@click.option("--seed", type=int, default=0, show_default=True, help="Tie-breaking seed.")
@click.option("--band", type=click.IntRange(min=0), default=None,
              help="Empty border of `maximal` masks in pixels (default: 1/32 of the side).")
@handle_errors
def noise(level, source, out, seed, band):
    """Write polygon-simplified (noisy) 0/255 PNG masks, one per input mask."""
    from lesionkeras.data import noise as noise_lib

    count = len(noise_lib.list_masks(source))
    with click.progressbar(length=count, label="simplifying", file=sys.stderr) as bar:
        path = noise_lib.write_noisy_masks(source, out, level, seed=seed, band=band,
                                           progress=lambda n: bar.update(1))
    click.echo(f"wrote {count} {level} masks (seed {seed}) to {path}")


@data.command(name="drop-labels")
@click.option("--alpha", required=True, type=click.FloatRange(0, 1),
              help="Fraction of the images that lose each structure's annotation.")
@click.option("--in", "source", required=True, type=click.Path(exists=True),
              help="Dataset folder (ISIC with Task 2 attributes) or manifest CSV.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (must not exist or be empty).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice.")
@click.option("--structures", default="", help="Comma-separated structures "
              "(default: lesion + the five ISIC 2018 attributes).")
@click.option("--empty-means-missing", is_flag=True,
              help="An empty mask file means not annotated (default: annotated, absent).")
@handle_errors
def drop_labels(alpha, source, out, seed, structures, empty_means_missing):
    """Remove each structure's annotation from a fraction ALPHA of the images (SMILE protocol).

    Writes OUT/manifest.csv (pointing at the input files, with annotated_<name>
    flags cleared for the removed annotations, so evaluation keeps the full
    truth) and OUT/dropped.csv (id,structure of every removed annotation).
    """
    from lesionkeras.data import missing

    names = missing.parse_structures(structures)
    df = missing.write_dropped(source, out, alpha=alpha, seed=seed, structures=names,
                               empty_means_missing=empty_means_missing)
    for name in names:
        click.echo(f"{name}: {int(df[f'dropped_{name}'].sum())} of "
                   f"{int(df[f'dropped_{name}'].sum() + df[f'annotated_{name}'].sum())} "
                   "annotations removed")
    click.echo(f"wrote {Path(out) / 'manifest.csv'} and {Path(out) / 'dropped.csv'}")


@data.command(name="check")
@click.argument("source", metavar="DIR")
@click.option("--no-masks", is_flag=True, help="Images only (data for predict).")
@handle_errors
def check_cmd(source, no_masks):
    """Report counts, sizes, mask coverage and every problem of a dataset."""
    from lesionkeras.data import check, layout

    df = layout.build_manifest(source)
    with click.progressbar(length=len(df), label="checking", file=sys.stderr) as bar:
        report = check.check_manifest(
            df, require_masks=not no_masks, progress=lambda done, total: bar.update(done - bar.pos)
        )
    click.echo(check.format_report(report, root=source))
    if report.errors:
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
