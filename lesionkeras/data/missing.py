"""Multi-structure data with missing annotations (SMILE, Petit, Thome et al. 2018).

Every image has K structures (by default the lesion and the five ISIC 2018
Task 2 attributes). For each image and structure the manifest holds the mask
path (`mask` for `lesion`, `attr_<name>` otherwise) and a flag
`annotated_<name>`: was this structure drawn by the annotator of this image?

Annotated / not annotated, when the manifest has no `annotated_<name>` column
(the ISIC 2018 Task 2 rule):
* no mask file (empty path cell)  -> not annotated (unknown);
* an empty mask file               -> annotated, and the structure is absent,
  unless `empty_means_missing=True`, which makes it "not annotated".

A non-annotated structure has an all-zero target, and its SMILE weight map
(`smile_weights`) keeps only the pixels that are known negatives for it: the
pixels annotated as positive for another annotated structure. That rule
assumes the structures exclude one another, as the organs of the paper do.
Dermoscopic attributes do not: they lie inside the lesion and overlap each
other. With `container="lesion"` (`smile.container`, the default for the
lesion + attributes set) the known labels follow the nesting instead:
* lesion not annotated: pixels of an annotated attribute are known lesion
  pixels (target 1, weight 1); everything else is unknown;
* attribute not annotated, lesion annotated: pixels outside the lesion are
  known negatives (weight 1); inside the lesion it is unknown.

`drop_annotations` implements the paper's protocol (remove the annotation of
each structure from a fraction alpha of the images, independently per
structure). Dropped annotations keep their path, so evaluation can use the
full truth; only the flag changes, and `dropped_<name>` records it.

Example:
```python
df = annotate(layout.build_manifest("ISIC2018/"), ("lesion", "globules"))
df = drop_annotations(df, ("lesion", "globules"), alpha=0.5, seed=0)
ds = make_dataset(decoded_dataset(df, ("lesion", "globules"), 64), batch_size=8,
                  mean=(0, 0, 0), std=(1, 1, 1), training=True)
image, masks, weights = next(iter(ds))  # (8, 64, 64, 3), (8, 64, 64, 2), (8, 64, 64, 2)
```
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from lesionkeras.data import pipeline
from lesionkeras.data.classes import ATTRIBUTES
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.data import layout

#: The default structures: the lesion, then the ISIC 2018 Task 2 attributes.
DEFAULT_STRUCTURES = ("lesion",) + ATTRIBUTES
_NAME = re.compile(r"[a-z0-9_]+")
_TRUE = ("true", "1", "yes", "y", "t", "1.0")
_FALSE = ("false", "0", "no", "n", "f", "0.0", "")


def parse_structures(spec) -> tuple:
    """Structure names from a comma-separated string (or a sequence).

    Args:
        spec: str or sequence of str. E.g. `"lesion,globules"`; empty means
            `DEFAULT_STRUCTURES`.

    Returns:
        tuple of str.

    Raises:
        ConfigError: a name is malformed or repeated.
    """
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        return DEFAULT_STRUCTURES
    for n in names:
        if not _NAME.fullmatch(n):
            raise ConfigError(
                f"`smile.structures`: names are lower-case letters, digits and _. Received: {n!r}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"`smile.structures`: a name is repeated. Received: {','.join(names)}")
    return tuple(names)


def mask_column(name: str) -> str:
    """Manifest column holding the mask path of structure `name`."""
    return "mask" if name == "lesion" else f"attr_{name}"


def _parse_flag(value, where):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not pd.isna(value):
        if value in (0, 1):
            return bool(value)
    text = "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value)
    text = text.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(f"{where}: must be true or false, got {value!r}")


def _is_empty_mask(path):
    try:
        with Image.open(path) as im:
            return int(np.asarray(im.convert("L")).max()) < 128
    except OSError as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None


def annotate(df: pd.DataFrame, structures, *, empty_means_missing=False, source="data"):
    """Adds the `annotated_<name>` flags of every structure (see the module rule).

    Args:
        df: manifest DataFrame.
        structures: sequence of str. Structure names.
        empty_means_missing: bool. An empty mask file means "not annotated".
            Defaults to False.
        source: str. Named in error messages.

    Returns:
        A copy of `df` with one bool column `annotated_<name>` per structure.

    Raises:
        DataError: a structure has no mask column, a flag is not a boolean, a
            flagged structure has no mask file, or a mask file is missing.
    """
    df = df.copy()
    for name in structures:
        column = mask_column(name)
        if column not in df:
            raise DataError(
                f"{source}: no `{column}` column for structure `{name}` "
                "(Task 2 attribute masks or a manifest column are needed)"
            )
        paths = df[column].fillna("").astype(str).str.strip()
        flag_col = f"annotated_{name}"
        if flag_col in df:
            flags = [
                _parse_flag(v, f"{source}: row {df.at[i, 'id']}: `{flag_col}`")
                for i, v in zip(df.index, df[flag_col])
            ]
        else:
            flags = [p != "" for p in paths]
        for i, (flag, path) in enumerate(zip(flags, paths)):
            if flag and not path:
                raise DataError(
                    f"{source}: row {df['id'].iat[i]}: `{flag_col}` is true but `{column}` is empty"
                )
            if path and not os.path.exists(path):
                raise DataError(f"{path}: {name} mask file not found")
            if flag and empty_means_missing and flag_col not in df and _is_empty_mask(path):
                flags[i] = False
        df[flag_col] = np.asarray(flags, dtype=bool)
    return df


def drop_annotations(df: pd.DataFrame, structures, alpha: float, seed: int, rows=None):
    """Removes the annotation of each structure from a fraction `alpha` of the images.

    Independently per structure (the paper's protocol), `round(alpha * n_k)`
    of the `n_k` images annotated for structure k (among `rows`) lose it. The
    mask path is kept so that the full truth stays available for evaluation.

    Args:
        df: manifest with `annotated_<name>` columns (see `annotate`).
        structures: sequence of str.
        alpha: float in [0, 1]. Fraction of annotations removed per structure.
        seed: int. Seed of the choice; structure k draws from `(seed, k)`, so
            adding a structure does not change the choices of the others.
        rows: boolean array or None. Rows that may lose annotations
            (e.g. the training split); None = all rows.

    Returns:
        A copy of `df` with the flags cleared and bool `dropped_<name>` columns.

    Raises:
        ConfigError: `alpha` is outside [0, 1].
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"`alpha` must be in [0, 1]. Received: {alpha}")
    df = df.copy()
    allowed = np.ones(len(df), bool) if rows is None else np.asarray(rows, bool)
    for k, name in enumerate(structures):
        flags = df[f"annotated_{name}"].to_numpy(bool).copy()
        candidates = np.flatnonzero(flags & allowed)
        count = int(round(alpha * len(candidates)))
        rng = np.random.default_rng([int(seed), k])
        chosen = rng.choice(candidates, size=count, replace=False) if count else []
        dropped = np.zeros(len(df), bool)
        dropped[chosen] = True
        flags[dropped] = False
        df[f"annotated_{name}"] = flags
        previous = df[f"dropped_{name}"].to_numpy(bool) if f"dropped_{name}" in df else False
        df[f"dropped_{name}"] = dropped | previous
    return df


def flags_array(df, structures) -> np.ndarray:
    """(N, K) float32 annotated flags."""
    return np.stack(
        [df[f"annotated_{s}"].to_numpy(bool) for s in structures], axis=1
    ).astype(np.float32)


# --------------------------------------------------------------------------- #
# Weight maps and tf.data
# --------------------------------------------------------------------------- #


def smile_weights(masks, flags):
    """SMILE binary weight maps w_k, vectorised over the batch and structures.

    w_k = 1 on every pixel if structure k is annotated in the image; otherwise
    w_k = 1 only on the pixels annotated positive for another annotated
    structure (known negatives for k), 0 elsewhere (unknown, ignored).

    Args:
        masks: float `(..., H, W, K)` targets in {0, 1}.
        flags: float or bool `(..., K)`: 1 where the structure is annotated.

    Returns:
        float32 `(..., H, W, K)` weights in {0, 1}.
    """
    masks = tf.cast(masks, tf.float32)
    flags = tf.cast(flags, tf.float32)[..., None, None, :]
    known_pos = masks * flags
    # Annotated positives of the other structures: all of them minus our own.
    others = tf.reduce_sum(known_pos, axis=-1, keepdims=True) - known_pos
    return tf.maximum(flags, tf.cast(others > 0, tf.float32)) * tf.ones_like(masks)


def nested_targets_and_weights(masks, flags, container):
    """SMILE targets and weights when the other structures lie inside `container`.

    Args:
        masks: float `(..., H, W, K)` targets in {0, 1} (0 where not annotated).
        flags: float or bool `(..., K)`: 1 where the structure is annotated.
        container: int. Channel of the enclosing structure (the lesion).

    Returns:
        (targets, weights), float32 `(..., H, W, K)`: the container's target
        gains the pixels of annotated inner structures when it is itself not
        annotated; weights follow the rules in the module docstring.
    """
    masks = tf.cast(masks, tf.float32)
    flags = tf.cast(flags, tf.float32)[..., None, None, :]
    k = masks.shape[-1]
    is_container = tf.one_hot(container, k, dtype=tf.float32)  # (K,)
    inner = 1.0 - is_container
    flag_c = flags[..., container : container + 1]
    mask_c = masks[..., container : container + 1] * flag_c
    # Any annotated inner structure marks its pixels as container pixels.
    inner_pos = tf.reduce_max(masks * flags * inner, axis=-1, keepdims=True)
    container_target = tf.maximum(mask_c, inner_pos * (1.0 - flag_c))
    targets = masks * inner + container_target * is_container
    container_weight = tf.maximum(flag_c, inner_pos)
    # Outside an annotated container, every inner structure is known absent.
    inner_weight = tf.maximum(flags, flag_c * (1.0 - mask_c))
    weights = container_weight * is_container + inner_weight * inner
    return targets, weights * tf.ones_like(masks)


def decoded_dataset(df: pd.DataFrame, structures, image_size: int, cache: bool = True):
    """(image uint8 (S,S,3), masks uint8 (S,S,K), flags float32 (K,)) per row.

    The masks of non-annotated structures are all zero (their truth, if any,
    is not used for training); a missing file decodes as zeros.
    """
    structures = tuple(structures)
    paths = np.stack(
        [df[mask_column(s)].fillna("").astype(str).to_numpy() for s in structures], axis=1
    )
    flags = flags_array(df, structures)
    ds = tf.data.Dataset.from_tensor_slices((df["image"].astype(str).tolist(), paths, flags))

    def one_mask(path):
        def read():
            m = pipeline.decode_mask(path)
            m = tf.image.resize(m, (image_size, image_size), method="bilinear", antialias=True)
            return tf.cast(m >= 0.5, tf.uint8)

        return tf.cond(
            tf.equal(path, ""), lambda: tf.zeros((image_size, image_size, 1), tf.uint8), read
        )

    def load(image_path, mask_paths, f):
        img = pipeline.decode_image(image_path)
        img = tf.image.resize(img, (image_size, image_size), method="bilinear", antialias=True)
        img = tf.cast(tf.round(tf.clip_by_value(img, 0, 255)), tf.uint8)
        masks = tf.concat([one_mask(mask_paths[k]) for k in range(len(structures))], axis=-1)
        masks = masks * tf.cast(f > 0, tf.uint8)
        return img, masks, f

    ds = ds.map(load, num_parallel_calls=pipeline.AUTOTUNE, deterministic=True)
    return ds.cache() if cache else ds


def make_dataset(
    decoded, *, batch_size, mean, std, training, augment=None, crop_size=0, seed=0,
    with_weights=True, container=None,
):
    """Batched `(image, masks, weights)` for `fit`/`evaluate` (weights = SMILE maps).

    Args:
        decoded: dataset from `decoded_dataset`.
        batch_size: int.
        mean, std: per-channel statistics on the 0-255 scale.
        training: bool. Shuffle, random crop, augmentation.
        augment: `AugmentConfig` or None.
        crop_size: int. Random (training) or centre crop side; 0 = off.
        seed: int. Seed of shuffling, cropping and augmentation.
        with_weights: bool. SMILE weight maps as the third element; if False,
            all-ones maps (the naive baseline: missing = background).
        container: int or None. Channel that encloses the others (see
            `nested_targets_and_weights`); None uses the paper's rule.
    """
    def finish(i, m, f):
        if not with_weights:
            return i, m, tf.ones_like(m)
        if container is not None:
            m, w = nested_targets_and_weights(m, f, container)
            return i, m, w
        return i, m, smile_weights(m, f)

    return pipeline.make_dataset(
        decoded, batch_size=batch_size, mean=mean, std=std, training=training, augment=augment,
        crop_size=crop_size, seed=seed, finish=finish,
    )


# --------------------------------------------------------------------------- #
# drop-labels
# --------------------------------------------------------------------------- #


def write_dropped(source, out_dir, *, alpha, seed, structures=DEFAULT_STRUCTURES,
                  empty_means_missing=False):
    """`data drop-labels`: writes `manifest.csv` and `dropped.csv` into `out_dir`.

    The images and masks are not copied: the manifest points at the input
    files, with `annotated_<name>` false where an annotation was removed
    (and `dropped_<name>` true), so training sees the reduced labels and
    evaluation can still read the full truth. `dropped.csv` lists
    `id,structure` of every removed annotation.

    Args:
        source: str. Dataset folder or manifest CSV.
        out_dir: str. Must not exist or be empty.
        alpha: float in [0, 1].
        seed: int.
        structures: sequence of str.
        empty_means_missing: bool. See `annotate`.

    Returns:
        The written manifest DataFrame.
    """

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out_dir}: output folder exists and is not empty")
    df = layout.build_manifest(source)
    df = annotate(df, structures, empty_means_missing=empty_means_missing, source=str(source))
    df = drop_annotations(df, structures, alpha, seed)
    out.mkdir(parents=True, exist_ok=True)
    layout.write_manifest(df, out / "manifest.csv")
    rows = [
        (i, s) for s in structures for i in df.loc[df[f"dropped_{s}"], "id"]
    ]
    pd.DataFrame(rows, columns=["id", "structure"]).to_csv(out / "dropped.csv", index=False)
    return df


# --------------------------------------------------------------------------- #
# SMILEr relabelling
# --------------------------------------------------------------------------- #


def relabel(weights, flags, scores, gamma, *, threshold=0.5, std=None):
    """SMILEr: the new positive labels of one round (Petit, Thome et al. 2018, Alg. 1).

    For every image i and structure k that is *not annotated* in i, the
    candidates are the pixels predicted positive (`scores >= threshold`)
    whose label is still unknown (`weights == 0`); the top `gamma` fraction
    of them (rounded, per image and structure) become positive labels:
    highest score first, or, with `std` (MC-dropout), lowest predictive
    standard deviation first. Annotated structures and known labels never change.

    Args:
        weights: `(N, H, W, K)` SMILE weight maps before any relabelling (0 = unknown).
        flags: `(N, K)` annotated flags (1 = annotated).
        scores: `(N, H, W, K)` predicted probabilities (the MC mean with `std`).
        gamma: float in [0, 1]. Fraction of the candidates kept, gamma_t = t / T * gamma_max.
        threshold: float. Probability at which a pixel is predicted positive. Defaults to 0.5.
        std: `(N, H, W, K)` or None. MC-dropout standard deviations. Defaults to None.

    Returns:
        bool `(N, H, W, K)`: the pixels to add as positives.

    Example:
        added = relabel(w, flags, probs, gamma=1 / 3)
        targets, w = np.maximum(targets, added), np.maximum(w, added)
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise ConfigError(f"`gamma` must be in [0, 1]. Received: {gamma}")
    weights = np.asarray(weights)
    scores = np.asarray(scores, np.float32)
    n, h, w, k = scores.shape
    flags = np.asarray(flags).reshape(n, 1, 1, k)
    candidate = (flags <= 0) & (weights <= 0) & (scores >= threshold)
    # Order key per pixel: smaller = chosen first.
    key = np.asarray(std, np.float32) if std is not None else -scores
    key = np.where(candidate, key, np.inf).transpose(0, 3, 1, 2).reshape(n, k, h * w)
    rank = np.empty_like(key, dtype=np.int64)
    order = np.argsort(key, axis=-1, kind="stable")
    np.put_along_axis(rank, order, np.arange(h * w)[None, None, :], axis=-1)
    count = candidate.transpose(0, 3, 1, 2).reshape(n, k, h * w).sum(-1, keepdims=True)
    keep = rank < np.round(gamma * count)
    return keep.reshape(n, k, h, w).transpose(0, 2, 3, 1) & candidate


# --------------------------------------------------------------------------- #
# Volumes: (D, H, W, C) .npy stacks sliced into 2D samples
# --------------------------------------------------------------------------- #


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
