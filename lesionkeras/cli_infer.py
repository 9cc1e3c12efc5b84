"""The commands that use a trained model: `evaluate`, `predict` and `export`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lesionkeras import files
from lesionkeras.cli_options import BATCH_OPTION, DATA_OPTION, LIMIT_OPTION, THRESHOLD_OPTION
from lesionkeras.console import fail, handle_errors, quiet_tensorflow_import


def _load_data(data, limit):
    from lesionkeras.data import sources

    return sources.load_manifest(data or "synthetic", limit=limit or 0)


ENSEMBLE_OPTION = click.option(
    "--ensemble", is_flag=True,
    help="Average the probabilities of several MODELs (any mix of runs, .keras, "
         "SavedModels, .tflite and .onnx files of the same task).",
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


def _parse_spacing(ctx, param, value):
    """`--pixel-spacing`: one positive number, or ROW,COLUMN; returned as a float pair."""
    if value is None:
        return None
    try:
        parts = [float(v) for v in value.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not all(0 < v < float("inf") for v in parts):
        raise click.BadParameter(
            f"expected millimetres per pixel, one positive number or ROW,COLUMN; got {value!r}.")
    return tuple(parts)


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


@click.command()
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
@click.option("--pixel-spacing", metavar="MM[,MM]", default=None, callback=_parse_spacing,
              help="Millimetres per pixel of the original images (one number, or ROW,COLUMN): "
                   "also report hd95_mm and assd_mm. Default: boundary scores in pixels only.")


@handle_errors
def evaluate(model_paths, data, out, threshold, batch_size, limit, ensemble, tta, postprocess,
             report, split, pixel_spacing):
    """Score MODEL on a labelled folder: per-image CSV, summary JSON, table.

    Overlap scores (Dice, Jaccard, ...) and boundary scores (hd95, assd: outline
    distances in pixels of the original image; millimetres with --pixel-spacing).
    With --ensemble, MODEL... are averaged (and each is also scored alone).
    With --postprocess, scores with and without it are shown side by side.
    """
    if out is not None:
        files.check_output(out)  # before the model loads: that takes a while
    quiet_tensorflow_import()
    from lesionkeras import postprocess as postprocess_lib
    from lesionkeras.data import check
    from lesionkeras.data.missing.labels import mask_column
    from lesionkeras.inference import evaluate as evaluation

    model_path = model_paths[0]
    from lesionkeras.classify import tasks

    if tasks.run_task(model_path) != "segment":
        # ISIC 2018 Task 2/3 runs: their own metrics and reports.
        if (len(model_paths) > 1 or tta != "none" or postprocess or report or split != "all"
                or pixel_spacing):
            raise click.UsageError("--ensemble, --tta, --postprocess, --report, --split and "
                                   "--pixel-spacing are for segmentation runs only.")
        lines, _ = tasks.evaluate(model_path, data=data, out=out, batch_size=batch_size,
                                  limit=limit)
        click.echo("\n".join(lines))
        return
    steps = postprocess_lib.parse_steps(postprocess)
    predictor = _load_predictor(model_paths, ensemble, tta, threshold)
    if split == "all":
        df = _load_data(data, limit)
        # The masks evaluation reads: one per structure of a K-structure model.
        names = getattr(predictor, "structures", ())
        columns = [mask_column(s) for s in names] if len(names) > 1 else ["mask"]
        check.validate(df, require_masks=True, mask_columns=columns, source=data or "synthetic")
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
            report=report, pixel_spacing=pixel_spacing,
        )
    click.echo(evaluation.format_summary(summary))
    click.echo(f"per-image scores: {Path(out) / 'per_image.csv'}")
    if report:
        click.echo(f"failure report: {Path(out) / 'report.html'}")


@click.command()
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
    files.check_output(out)  # before the model loads: that takes a while
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
    # Only the images are read: a bad mask beside them is no reason to refuse.
    check.validate(df, require_masks=False, mask_columns=(), source=input_path)
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


@click.command(name="export")
@click.argument("model_path", metavar="MODEL")
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "tflite", "onnx"]),
              default="savedmodel", show_default=True,
              help="SavedModel folder (TensorFlow Serving), .tflite file, or .onnx file "
                   "(needs the extra: pip install 'lesionkeras[onnx]').")


@click.option("--out", required=True,
              help="Output folder (savedmodel), .tflite or .onnx file; must not exist yet.")


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
