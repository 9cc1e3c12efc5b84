"""Image manifests, and scoring a predictor on them: per_image.csv, summary.json, summary table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import files
from lesionkeras import metrics as metrics_lib
from lesionkeras import postprocess as postprocess_lib
from lesionkeras.data import layout, pipeline
from lesionkeras.data.missing.labels import mask_column
from lesionkeras.errors import DataError
from lesionkeras.inference.predictor import _average
from lesionkeras.inference.report import (
    REPORT_DIR, _safe_name, report_panel, write_report,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif"}
SCORE_COLUMNS = metrics_lib.SCORE_NAMES
# The per-structure scores of a K-structure model (a narrower table).
STRUCTURE_SCORES = ("dice", "jaccard", "sensitivity", "specificity")
# Summary key: the images (per structure) whose boundary scores are undefined.
UNDEFINED = "boundary_undefined"


def list_images(source) -> pd.DataFrame:
    """Manifest of the images to predict: one file, a known layout, or a plain folder."""
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{source}: not an image file (expected {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths = [source]
    elif source.is_dir():
        try:
            return layout.build_manifest(source)
        except DataError:
            paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise layout.no_images_error(source)
    else:
        raise DataError(f"{source}: no such file or folder")
    return pd.DataFrame(
        {"id": [p.stem for p in paths], "image": [str(p.resolve()) for p in paths], "mask": ""}
    )


def _read_batches(df, batch_size, with_masks):
    """Yields lists of (row index, image uint8, mask float32 or None) at original size."""
    paths = df["image"].astype(str).tolist()
    masks = df["mask"].astype(str).tolist() if with_masks else [""] * len(df)
    ds = tf.data.Dataset.from_tensor_slices((paths, masks))

    def load(i, m):
        img = pipeline.decode_image(i)
        mask = pipeline.decode_mask(m) if with_masks else tf.zeros((0, 0, 1))
        return img, mask

    ds = ds.map(load, num_parallel_calls=pipeline.AUTOTUNE, deterministic=True).prefetch(
        pipeline.AUTOTUNE
    )
    batch = []
    for idx, (img, mask) in enumerate(ds):
        batch.append((idx, img, mask if with_masks else None))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def postprocess_config(model_path):
    """The `[postprocess]` config of a model: from the config.toml of its run, else defaults."""
    path = Path(model_path)
    cfg_file = path / "config.toml" if path.is_dir() else path.parent / "config.toml"
    if cfg_file.exists():
        return config_lib.load_config(cfg_file).postprocess
    return config_lib.PostprocessConfig()


def _post_summary(steps, post_cfg):
    """What post-processing ran: `steps` and their parameters (summary.json, postprocess.json)."""
    cfg = post_cfg or config_lib.PostprocessConfig()
    return {"steps": list(steps), "config": dataclasses.asdict(cfg)}


def evaluate(predictor, df, *, out_dir=None, batch_size=8, progress=None, postprocess=(),
             post_cfg=None, report=False, pixel_spacing=None):
    """Scores every image at its original size, structure by structure.

    A single-structure model (one output channel, or one named structure) is
    scored against the manifest's `mask` column with every score of
    `SCORE_COLUMNS`: per-image columns `<score>`. A K-structure model
    (`smile`, `multiclass`: `predictor.structures` names its K output
    channels) is scored per structure with `STRUCTURE_SCORES`: columns
    `<score>_<structure>` plus `dice_mean`, the mean Dice over the image's
    scored structures. Structure k of an image is scored when the manifest has
    a mask file for it (`mask` for `lesion`, `attr_<name>` otherwise), whatever
    its `annotated_<name>` flag: labels removed by `data drop-labels` keep
    their file, so evaluation uses the full truth. Images without the file are
    left out of that structure's mean (its columns are empty).

    Boundary scores (`metrics.boundary`) follow the same columns: `hd95` and
    `assd` (`hd95_<structure>`, ...), distances in pixels of the original
    image between the outlines of the truth and the thresholded prediction,
    and `hd95_mm`, `assd_mm` when `pixel_spacing` is given. They are 0 when
    truth and prediction are both empty and NaN (an empty cell) when exactly
    one is: such images are left out of the boundary means and counted in the
    summary as `boundary_undefined` (per structure, and in total). The mean
    over structures of a boundary score is over the structures that have one.

    Post-processing works per structure: the dense CRF refines each output
    channel as its own two-label problem and morphology cleans each channel's
    mask on its own, with the one `[postprocess]` table of the run (so
    `keep_largest` keeps one component of every structure; switch it off for
    scattered attributes such as globules). The post-processed scores are the
    same columns with a `_post` suffix, and `summary["postprocess"]` holds
    their means beside the raw ones.

    An ensemble of single-structure models (a predictor with member `names`)
    also has each member scored alone: `summary["members"]`.

    Args:
        predictor: a predictor (`inference.predictor`); its `structures`
            name its output channels when there are several.
        df: manifest (`list_images` or a dataset layout).
        out_dir: str, Path or None. Where per_image.csv and summary.json go,
            checked first (`files.check_output`); each file is written whole or
            not at all. Defaults to None (nothing written).
        batch_size: int. Images per forward pass. Defaults to 8.
        progress: callable or None. Called with the number of images done.
        postprocess: sequence of step names (`postprocess.STEPS`). Defaults to ().
        post_cfg: `config.PostprocessConfig` or None (defaults).
        report: bool. Also write the failure report (`report.write_report`)
            to `out_dir` (required then): one panel per image and structure
            (image | prediction tinted red, truth outlined green) in
            `report/<rank>_<id>[_<structure>].png`. Defaults to False.
        pixel_spacing: None, or millimetres per pixel of the original images:
            one number, or (row, column). Adds the `_mm` boundary scores.
            Defaults to None (pixels only).

    Returns:
        (per-image DataFrame, summary dict). The summary holds the means of
        the scores (over structures for K > 1), `boundary_undefined`,
        `pixel_spacing` ([row, column] or None) and, for K > 1, `structures`:
        {name: {"images": n, score: mean, "boundary_undefined": m}}.
    """
    if report and out_dir is None:
        raise ValueError("`report=True` needs an `out_dir`.")
    spacing = metrics_lib.check_spacing(pixel_spacing)
    boundary_names = metrics_lib.BOUNDARY_NAMES + (metrics_lib.BOUNDARY_MM_NAMES if spacing else ())
    if out_dir is not None:
        out_dir = files.check_output(out_dir)
    names = tuple(getattr(predictor, "structures", ()))
    # One unnamed structure: the `mask` column, unsuffixed columns, every score.
    structures = names if len(names) > 1 else (None,)
    single = structures == (None,)
    score_names = SCORE_COLUMNS if single else STRUCTURE_SCORES
    all_names = score_names + boundary_names
    suffixes = ("", "_post") if postprocess else ("",)
    if report:
        (Path(out_dir) / REPORT_DIR).mkdir(parents=True, exist_ok=True)
    # K structures: each structure's truth file per image ("" when there is none).
    truth_files = {} if single else {
        s: (df[c].fillna("").astype(str).tolist() if c in df else [""] * len(df))
        for s, c in ((s, mask_column(s)) for s in structures)
    }
    members = getattr(predictor, "names", []) if single else []
    rows, member_rows = [], {n: [] for n in members}
    threshold = predictor.threshold

    def scores_of(truth, pred):
        scores = metrics_lib.per_image_scores(truth, pred, threshold=threshold, from_logits=False)
        # The same binarisation as the overlap scores: truth at 0.5, prediction at the threshold.
        return {k: float(np.asarray(scores[k]).reshape(-1)[0]) for k in score_names} | (
            metrics_lib.boundary_scores(truth >= 0.5, pred >= threshold, spacing))

    for batch in _read_batches(df, batch_size, with_masks=single):
        images = [img for _, img, _ in batch]
        if members:
            # An ensemble: score each member alone too, from the same maps.
            by_member = predictor.member_probabilities(images)
            probs = _average(by_member, members)
            for name, maps in zip(members, by_member):
                member_rows[name] += [scores_of(m.numpy()[..., 0], p[..., 0])
                                      for (_, _, m), p in zip(batch, maps)]
        else:
            probs = predictor.probabilities(images)
        for (idx, img, mask), prob in zip(batch, probs):
            if prob.shape[-1] != len(structures):
                raise DataError(
                    f"{predictor.source}: the model gives {prob.shape[-1]} output channels "
                    f"for {len(structures)} structure(s) ({', '.join(names) or 'no names'}); "
                    "a K-structure model needs the config.toml of its run")
            row = {"id": df["id"].iloc[idx], "image": df["image"].iloc[idx]}
            masks = {"": prob >= threshold}
            if postprocess:
                masks["_post"] = postprocess_lib.apply(
                    postprocess, np.asarray(img), prob, threshold, post_cfg)[1]
            truths = [mask.numpy()[..., 0]] if single else [
                _read_structure_mask(truth_files[s][idx].strip(), prob.shape[:2])
                for s in structures]
            for k, (s, truth) in enumerate(zip(structures, truths)):
                for suffix in suffixes:
                    pred = prob[..., k] if not suffix else masks[suffix][..., k].astype(np.float32)
                    scores = (dict.fromkeys(all_names, np.nan) if truth is None
                              else scores_of(truth, pred))
                    row |= {_column(key, s, suffix): v for key, v in scores.items()}
            if not single:
                for suffix in suffixes:
                    dice = [row[_column("dice", s, suffix)]
                            for s, truth in zip(structures, truths) if truth is not None]
                    row[f"dice_mean{suffix}"] = float(np.mean(dice)) if dice else np.nan
            if report:
                final = masks[suffixes[-1]]
                for k, (s, truth) in enumerate(zip(structures, truths)):
                    stem = _safe_name(row["id"]) + ("" if s is None else f"_{_safe_name(s)}")
                    row[_column("overlay", s)] = f"{REPORT_DIR}/{len(rows):05d}_{stem}.png"
                    truth = np.zeros(prob.shape[:2]) if truth is None else truth
                    panel = report_panel(np.asarray(img), truth > 0.5, final[..., k])
                    files.save_image(panel, out_dir / row[_column("overlay", s)])
            rows.append(row)
        if progress:
            progress(len(batch))
    per_image = pd.DataFrame(rows)
    summary = {"model": predictor.source, "images": len(per_image), "threshold": threshold,
               "pixel_spacing": list(spacing) if spacing else None}
    for suffix in suffixes:
        per_structure, overall = _means(per_image, structures, score_names, boundary_names, suffix)
        if not single:
            overall["structures"] = per_structure
        if suffix:
            summary["postprocess"] = _post_summary(postprocess, post_cfg) | overall
        else:
            summary |= overall
    if members:
        summary["members"] = {
            n: {k: float(pd.DataFrame(r)[k].mean()) for k in all_names}
            | {UNDEFINED: int(pd.DataFrame(r)["hd95"].isna().sum())}
            for n, r in member_rows.items()
        }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(out_dir / "per_image.csv") as tmp:
            per_image.to_csv(tmp, index=False, float_format="%.6f")
        files.write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        if report:
            write_report(per_image, summary, out_dir / "report.html")
    return per_image, summary


def _column(score, structure, suffix=""):
    """Per-image column of `score`: `dice[_post]`, or `dice_<structure>[_post]` when named."""
    return f"{score}{suffix}" if structure is None else f"{score}_{structure}{suffix}"


def _means(per_image, structures, score_names, boundary_names, suffix):
    """Per structure, its scored images and mean scores; and the means over structures.

    A boundary score's mean skips the images where it is undefined (NaN: one
    of truth and prediction empty), which `UNDEFINED` counts; over structures,
    it is the mean of the structures that have one.
    """
    per_structure = {}
    for s in structures:
        scored = per_image[_column("dice", s, suffix)].notna() if len(per_image) else []
        n = int(np.sum(scored))
        rows = per_image.loc[scored] if n else None
        per_structure[s] = {
            "images": n,
            **{k: float(rows[_column(k, s, suffix)].mean()) if n else float("nan")
               for k in score_names + boundary_names},
            UNDEFINED: int(rows[_column("hd95", s, suffix)].isna().sum()) if n else 0,
        }
    scored = [v for v in per_structure.values() if v["images"]]
    overall = {k: float(np.mean([v[k] for v in scored])) if scored else float("nan")
               for k in score_names}
    for k in boundary_names:
        defined = [v[k] for v in scored if not np.isnan(v[k])]
        overall[k] = float(np.mean(defined)) if defined else float("nan")
    overall[UNDEFINED] = sum(v[UNDEFINED] for v in per_structure.values())
    return per_structure, overall


def _read_structure_mask(path, shape):
    """A 0/1 float32 (H, W) truth mask at `shape`, or None when there is no file."""
    if not path:
        return None
    try:
        with Image.open(path) as im:
            m = im.convert("L")
            if m.size != (shape[1], shape[0]):
                m = m.resize((shape[1], shape[0]), Image.NEAREST)
            return (np.asarray(m) >= 128).astype(np.float32)
    except OSError as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None


def boundary_keys(values):
    """The boundary scores present in a summary (or one structure's entry of it)."""
    return [k for k in metrics_lib.BOUNDARY_NAMES + metrics_lib.BOUNDARY_MM_NAMES if k in values]


def _boundary_note(summary):
    """The line under the table: units, and the images left out of the boundary means."""
    spacing = summary.get("pixel_spacing")
    units = "hd95, assd: pixels of the original image"
    if spacing:
        units += f"; _mm: millimetres at {spacing[0]:g} x {spacing[1]:g} mm per pixel (row x column)"
    count = summary.get(UNDEFINED, 0)
    post = summary.get("postprocess")
    if post:
        count = f"{count} raw, {post.get(UNDEFINED, 0)} post-processed"
    return (f"{units}. Left out of their means (prediction or truth empty, not both): "
            f"{count}")


def _boundary_table(summary):
    """The boundary scores of K structures: one row per score (then its post row), one
    column per structure and the mean; `boundary_undefined` counts the images left out."""
    per = summary["structures"]
    post = summary.get("postprocess")
    keys = boundary_keys(summary) + [UNDEFINED]
    label = max(len(k) for k in keys) + len(" post")
    width = max(11, *(len(s) for s in per))
    lines = [f"{'boundary':<{label}}" + "".join(f"  {s:>{width}}" for s in [*per, "mean"])]
    for k in keys:
        for tag, values in (("", summary), (" post", post)) if post else (("", summary),):
            cells = [values["structures"][s][k] for s in per] + [values[k]]
            lines.append(f"{k + tag:<{label}}" + "".join(
                f"  {c:>{width}}" if k == UNDEFINED else f"  {c:>{width}.4f}" for c in cells))
    return lines


def _format_structures(summary) -> str:
    """One row per structure (raw and post-processed scores side by side), then the mean;
    below, the boundary scores with one column per structure."""
    per = summary["structures"]
    post = summary.get("postprocess")
    width = max(len("structure"), max(len(s) for s in per), len("mean"))

    def cells(values, post_values=None):
        out = []
        for k in STRUCTURE_SCORES:
            out.append(f"{values[k]:>11.4f}")
            if post_values is not None:
                out.append(f"{post_values[k]:>11.4f}")
        return "  ".join(out)

    if post:
        name = "+".join(post["steps"])
        heads = [h for k in STRUCTURE_SCORES for h in (k, "post")]
        lines = [f"each score raw, then after {name} (post)"]
    else:
        heads = list(STRUCTURE_SCORES)
        lines = []
    lines.append(f"{'structure':<{width}}  " + "  ".join(f"{h:>11}" for h in heads) + "  images")
    for s, v in per.items():
        lines.append(f"{s:<{width}}  " + cells(v, post["structures"][s] if post else None)
                     + f"  {v['images']:>6}")
    lines.append(f"{'mean':<{width}}  " + cells(summary, post) + f"  {summary['images']:>6}")
    if boundary_keys(summary):
        lines += [""] + _boundary_table(summary) + [_boundary_note(summary)]
    return "\n".join(lines)


def format_summary(summary) -> str:
    """The summary of `evaluate` as the text table `lesionkeras evaluate` prints."""
    if "structures" in summary:
        return _format_structures(summary)
    width = max(len(k) for k in SCORE_COLUMNS)
    post = summary.get("postprocess")
    keys = list(SCORE_COLUMNS) + boundary_keys(summary)
    if post:
        # Side by side: the raw masks and the post-processed ones.
        name = "+".join(post["steps"])
        lines = [f"{'metric':<{width}}  {'raw':>9}  {name:>9}   mean over {summary['images']} images"]
        lines += [f"{k:<{width}}  {summary[k]:9.4f}  {post[k]:9.4f}" for k in keys]
    else:
        lines = [f"{'metric':<{width}}  mean over {summary['images']} images"]
        lines += [f"{k:<{width}}  {summary[k]:.4f}" for k in keys]
    if boundary_keys(summary):
        lines.append(_boundary_note(summary))
    for name, scores in summary.get("members", {}).items():
        lines.append(f"{name} alone: " + ", ".join(
            f"{k} {scores[k]:.4f}" for k in ("dice", "jaccard", "threshold_jaccard") if k in scores
        ))
    return "\n".join(lines)
