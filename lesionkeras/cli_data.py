"""The `lesionkeras data` command group: synth, noise, drop-labels, check."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lesionkeras import files
from lesionkeras.console import handle_errors


@click.group()
def data():
    """Create and inspect datasets."""


@data.command()
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--count", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--size", type=click.IntRange(min=16), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def synth(out, count, size, seed):
    """Write the built-in synthetic dataset in the ISIC 2018 layouts (Tasks 1, 2, 3)."""
    from lesionkeras.data import synthetic

    files.check_output(out, whole=True, empty=True)  # before the progress bar starts
    with click.progressbar(length=count, label="generating", file=sys.stderr) as bar:
        path = synthetic.write_isic(out, count=count, size=size, seed=seed,
                                    progress=lambda n: bar.update(1))
    click.echo(f"wrote {count} synthetic images ({size} px, seed {seed}) to {path}")


@data.command()
@click.option("--level", required=True, type=click.Choice(["7-vertex", "3-vertex", "4-axis", "maximal"]),
              help="Noise level (Mirikharaji et al. 2019, section 3).")


@click.option("--in", "source", required=True, type=click.Path(),
              help="Folder of masks (or one mask file).")


@click.option("--out", required=True, type=click.Path(),
              help="Output folder (must not exist or be empty).")


@click.option("--seed", type=int, default=0, show_default=True, help="Tie-breaking seed.")
@click.option("--band", type=click.IntRange(min=0), default=None,
              help="Empty border of `maximal` masks in pixels (default: 1/32 of the side).")


@handle_errors
def noise(level, source, out, seed, band):
    """Write polygon-simplified (noisy) 0/255 PNG masks, one per input mask."""
    from lesionkeras.data import noise as noise_lib

    files.check_output(out, whole=True, empty=True)  # before the progress bar starts
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


@click.option("--out", required=True, type=click.Path(),
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
    """Report counts, sizes, mask coverage and every problem of a dataset.

    Every image and mask (attribute masks too) is decoded; broken symbolic links
    and masks without an image are listed as warnings.
    """
    from lesionkeras.data import check, layout

    df = layout.build_manifest(source)
    with click.progressbar(length=len(df), label="checking", file=sys.stderr) as bar:
        report = check.check_manifest(
            df, require_masks=not no_masks, mask_columns=check.all_mask_columns(df),
            progress=lambda done, total: bar.update(done - bar.pos)
        )
    report.problems.extend(check.stray_files(source, df))
    click.echo(check.format_report(report, root=source))
    if report.errors:
        sys.exit(2)
