"""The HTML failure report of `evaluate --report` and the pictures it shows."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from lesionkeras import files
from lesionkeras.metrics.boundary import BOUNDARY_MM_NAMES, BOUNDARY_NAMES
from lesionkeras.metrics.scores import SCORE_NAMES


REPORT_DIR = "report"


def overlay(image, mask, color=(255, 40, 40), alpha=0.45):
    """The image with the mask tinted and its border drawn solid."""
    img = image.astype(np.float32)
    m = mask.astype(bool)
    tinted = np.where(m[..., None], (1 - alpha) * img + alpha * np.array(color), img)
    # Border pixels: inside the mask with an outside 4-neighbour.
    pad = np.pad(m, 1, mode="edge")
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    border = m & ~inner
    tinted[border] = color
    return tinted.astype(np.uint8)


def _safe_name(text):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))[:80]


def report_panel(image, truth, prediction):
    """Image | overlay, side by side: prediction tinted red, truth outlined green."""
    shown = overlay(image, prediction)
    t = np.asarray(truth, bool)
    pad = np.pad(t, 1, mode="edge")
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    shown[t & ~inner] = (40, 220, 40)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([np.asarray(image, np.uint8), gap, shown], axis=1)


def write_report(per_image, summary, path):
    """A self-contained HTML failure report: score table, then every image worst Dice first.

    The page has no scripts or external styles; it references the PNG panels
    that `evaluate(..., report=True)` wrote (the `overlay` column, or
    `overlay_<structure>` for a K-structure model, relative to the page).
    Images are sorted by Dice after post-processing when there was any, else
    by raw Dice: the image's Dice for a single-structure model, its mean Dice
    over the structures it has a truth mask for (`dice_mean`) for K structures,
    whose rows also show the Dice of each structure (`-` where the structure
    has no truth mask) and one panel per structure. The score table ends with
    the boundary scores (HD95, ASSD; `-` where undefined) and the count of
    images left out of their means; single-structure rows show each image's
    HD95 beside its Jaccard.

    Args:
        per_image: DataFrame from `evaluate(..., report=True)`.
        summary: dict from that `evaluate`; a `structures` entry means K structures.
        path: str or Path. The HTML file written.
    """
    names = tuple(summary.get("structures", ()))
    post = summary.get("postprocess")
    suffix = "_post" if post else ""
    key = f"dice_mean{suffix}" if names else f"dice{suffix}"
    rows = per_image.sort_values([key, "id"], kind="stable", na_position="last")
    if names:
        style = "img{max-width:480px}\nfigure{display:inline-block;margin:2px}"
        about = (f", {len(names)} structures. Each panel: the image, then that\nstructure's "
                 "prediction tinted red with its truth outlined green. Sorted by "
                 f"{key} (mean\nDice over the structures an image has a truth mask for)")
        case_heads = "".join(f"<th>dice {html.escape(s)}</th>" for s in names) + "<th>overlays</th>"
    else:
        style = "img{max-width:640px}"
        about = (". Each panel: the image, then the prediction tinted red with the\n"
                 f"truth outlined green. Sorted by {key}")
        case_heads = f"<th>jaccard{suffix}</th><th>hd95{suffix} (px)</th><th>overlay</th>"
    cases = "".join(
        f"<tr><td>{i + 1}</td><td>{html.escape(str(r['id']))}</td><td>{_cell(r[key])}</td>"
        + _image_cells(r, names, suffix) + "</td></tr>\n"
        for i, (_, r) in enumerate(rows.iterrows())
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lesionkeras failure report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}{style}</style>
</head><body>
<h1>Failure report</h1>
<p>Model: {html.escape(str(summary['model']))}. {summary['images']} images, threshold
{summary['threshold']:g}{about}, worst first.</p>
<table>{_score_table(summary, names, post)}</table>
{_boundary_paragraph(summary)}
<h2>Images, worst {key} first</h2>
<table><tr><th>rank</th><th>id</th><th>{key}</th>{case_heads}</tr>
{cases}</table>
</body></html>
"""
    files.write_text(path, page)


def _cell(value):
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)  # a count
    return "-" if pd.isna(value) else f"{value:.4f}"


def _boundary_paragraph(summary):
    """What the boundary scores measure, in which unit, and how empty masks count."""
    if "hd95" not in summary:
        return ""
    spacing = summary.get("pixel_spacing")
    mm = (f" (<code>_mm</code>: millimetres, {spacing[0]:g} x {spacing[1]:g} mm per pixel)"
          if spacing else "")
    return ("<p>hd95: 95th percentile, assd: mean of the distances between the outlines of "
            f"truth and prediction, in pixels of the original image{mm}; 0 when both masks "
            "are empty, undefined (<code>-</code>, left out of the means, counted in "
            "boundary_undefined) when exactly one is.</p>")


def _score_table(summary, names, post):
    """The mean scores: one row per score (raw, post), or one row per structure for K."""
    steps = html.escape("+".join(post["steps"])) if post else ""
    if not names:
        head = "<tr><th>metric</th><th>raw</th>" + (f"<th>{steps}</th>" if post else "") + "</tr>"
        keys = SCORE_NAMES + tuple(k for k in (*BOUNDARY_NAMES, *BOUNDARY_MM_NAMES,
                                               "boundary_undefined") if k in summary)
        return head + "".join(
            f"<tr><td>{k}</td><td>{_cell(summary[k])}</td>"
            + (f"<td>{_cell(post[k])}</td>" if post else "") + "</tr>"
            for k in keys
        )
    # The scores of each structure, as `evaluate` recorded them after its image count.
    scores = [k for k in summary["structures"][names[0]] if k != "images"]
    head = "<tr><th>structure</th>" + "".join(
        f"<th>{k}</th>" + (f"<th>{k} {steps}</th>" if post else "") for k in scores
    ) + "<th>images</th></tr>"
    post_structures = post["structures"] if post else {}
    return head + "".join(
        f"<tr><td>{html.escape(s)}</td>" + "".join(
            f"<td>{_cell(v[k])}</td>" + (f"<td>{_cell(post_structures[s][k])}</td>" if post else "")
            for k in scores) + f"<td>{v['images']}</td></tr>"
        for s, v in summary["structures"].items()
    )


def _image_cells(r, names, suffix):
    """An image's row after its sort score: its other scores, then its panel(s)."""
    alt = html.escape(str(r["id"]))
    if not names:
        return (f"<td>{_cell(r['jaccard' + suffix])}</td><td>{_cell(r.get('hd95' + suffix))}</td>"
                f"<td><img src=\"{html.escape(r['overlay'])}\" alt=\"{alt}\">")
    return "".join(f"<td>{_cell(r[f'dice_{s}{suffix}'])}</td>" for s in names) + "<td>" + "".join(
        f"<figure><img src=\"{html.escape(r[f'overlay_{s}'])}\" alt=\"{alt} {html.escape(s)}\">"
        f"<figcaption>{html.escape(s)}</figcaption></figure>" for s in names)
