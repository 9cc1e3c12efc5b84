"""Volumes: `(D, H, W, C)` `.npy` stacks sliced into 2D samples, with splits and dropped labels drawn per volume."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lesionkeras.data.missing.labels import drop_annotations, mask_column
from lesionkeras.errors import DataError


def is_volume_manifest(source) -> bool:
    """True when `source` is a CSV whose `image` column holds `.npy` volumes."""
    if not str(source).lower().endswith(".csv") or not os.path.isfile(source):
        return False
    try:
        head = pd.read_csv(source, nrows=5, dtype=str)
    except (OSError, ValueError, pd.errors.ParserError):
        return False
    return "image" in head and head["image"].fillna("").str.lower().str.endswith(".npy").any()


def _load_volume(path, what):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read {what} volume ({e})") from None


def slice_volumes(manifest_csv, structures, out_dir):
    """Slices the `.npy` volumes of a manifest into 2D PNG samples sharing their flags.

    The manifest has one row per volume: `id`, `image` (a `(D, H, W, C)` stack,
    C = 1 or 3; uint8 is kept, any other dtype is scaled per volume to 0-255),
    one mask column per structure (`mask` for `lesion`, `attr_<name>`
    otherwise; `(D, H, W)` or `(D, H, W, 1)`, > 0 = inside; empty = not
    annotated) and optional `annotated_<name>` flags. Paths are relative to
    the CSV's folder. Slice d of volume v becomes sample `<v>_<d:04d>` with
    the volume's paths and flags (the paper's CT volumes: an organ is
    annotated, or not, in the whole volume) and `volume = v`, so splits and
    simulated missing labels can be drawn per volume. Without a `lesion`
    structure, the `mask` column (read by single-mask tools: image statistics,
    the TensorBoard grid) holds the first structure that has a file.

    Args:
        manifest_csv: str. The volume manifest.
        structures: sequence of str.
        out_dir: str. Folder for the slices (created; written files are replaced).

    Returns:
        The slice manifest DataFrame (one row per slice).

    Raises:
        DataError: a missing column or file, a bad rank, or masks whose shape
            differs from the image volume's; the message names the file.
    """


    csv = Path(manifest_csv)
    vols = pd.read_csv(csv, dtype=str).fillna("")
    for column in ["id", "image"] + [mask_column(s) for s in structures]:
        if column not in vols:
            raise DataError(f"{csv}: no `{column}` column in the volume manifest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for _, v in vols.iterrows():
        image_path = (csv.parent / v["image"]).resolve()
        image = _load_volume(image_path, "image")
        if image.ndim != 4 or image.shape[-1] not in (1, 3):
            raise DataError(
                f"{image_path}: image volume must be (D, H, W, C) with C = 1 or 3, "
                f"got shape {image.shape}"
            )
        if image.dtype != np.uint8:
            lo, hi = float(np.min(image)), float(np.max(image))
            image = np.round((np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-12) * 255)
        image = np.asarray(image).astype(np.uint8)
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        masks = {}
        for s in structures:
            rel = v[mask_column(s)].strip()
            if not rel:
                continue
            path = (csv.parent / rel).resolve()
            m = _load_volume(path, f"{s} mask")
            m = m[..., 0] if m.ndim == 4 and m.shape[-1] == 1 else m
            if m.shape != image.shape[:3]:
                raise DataError(
                    f"{path}: {s} mask volume has shape {m.shape}, the image volume "
                    f"{image.shape[:3]}"
                )
            masks[s] = (np.asarray(m) > 0).astype(np.uint8) * 255
        for d in range(image.shape[0]):
            sid = f"{v['id']}_{d:04d}"
            row = {"id": sid, "image": str(out / f"{sid}.png"), "volume": v["id"], "slice": d}
            Image.fromarray(image[d]).save(row["image"])
            for s in structures:
                path = ""
                if s in masks:
                    path = str(out / f"{sid}_{s}.png")
                    Image.fromarray(masks[s][d]).save(path)
                row[mask_column(s)] = path
                if f"annotated_{s}" in vols:
                    row[f"annotated_{s}"] = v[f"annotated_{s}"]
            if "lesion" not in structures:
                # Single-mask consumers (image statistics, the TensorBoard grid) read
                # `mask`: the first structure with a file, else a blank mask.
                row["mask"] = next((row[mask_column(s)] for s in structures if s in masks), "")
                if not row["mask"]:
                    row["mask"] = str(out / f"{sid}_blank.png")
                    Image.fromarray(np.zeros(image.shape[1:3], np.uint8)).save(row["mask"])
            rows.append(row)
    if not rows:
        raise DataError(f"{csv}: the volume manifest lists no volume")
    return pd.DataFrame(rows)


def split_by_volume(df, val_fraction, seed):
    """`split` column drawn per volume (all slices of a volume on the same side)."""
    volumes = np.asarray(sorted(df["volume"].unique()))
    n_val = int(round(val_fraction * len(volumes)))
    if val_fraction > 0 and len(volumes) > 1:
        n_val = min(max(n_val, 1), len(volumes) - 1)
    else:
        n_val = 0
    chosen = np.random.default_rng([int(seed), 7]).choice(volumes, size=n_val, replace=False)
    df = df.copy()
    df["split"] = np.where(df["volume"].isin(chosen), "val", "train")
    return df


def drop_annotations_by_volume(df, structures, alpha, seed, rows=None):
    """`drop_annotations` drawn per volume: all slices of a volume lose a label together."""
    rows = np.ones(len(df), bool) if rows is None else np.asarray(rows, bool)
    first = df[rows].drop_duplicates("volume").reset_index(drop=True)
    dropped = drop_annotations(first, structures, alpha, seed).set_index("volume")
    df = df.copy()
    for s in structures:
        hit = df["volume"].map(dropped[f"dropped_{s}"]).fillna(False).to_numpy(bool) & rows
        df[f"annotated_{s}"] = df[f"annotated_{s}"].to_numpy(bool) & ~hit
        previous = df[f"dropped_{s}"].to_numpy(bool) if f"dropped_{s}" in df else False
        df[f"dropped_{s}"] = hit | previous
    return df
