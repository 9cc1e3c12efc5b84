"""Which structures are annotated: names, mask columns, `annotated_<name>` flags, dropped annotations."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
from PIL import Image

from lesionkeras.data import check, layout
from lesionkeras.data.classes import ATTRIBUTES
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.files import atomic_folder, check_output

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
            flagged structure has no mask file, or a mask file is missing, does
            not decode or has another size than its image (`check.validate`;
            every bad file is listed in `problems`).
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
    # Every listed mask file is read by training (annotated or not): each must decode
    # and match its image's size, checked now rather than by TensorFlow mid-run.
    check.validate(df, require_masks=False, mask_columns=[mask_column(n) for n in structures],
                   image_sizes_only=True, source=source)
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

    out = check_output(out_dir, whole=True, empty=True)
    df = layout.build_manifest(source)
    df = annotate(df, structures, empty_means_missing=empty_means_missing, source=str(source))
    df = drop_annotations(df, structures, alpha, seed)
    rows = [
        (i, s) for s in structures for i in df.loc[df[f"dropped_{s}"], "id"]
    ]
    # Both files or neither. The manifest's relative paths are the same from the
    # temporary folder as from `out`: they are siblings.
    with atomic_folder(out) as tmp:
        layout.write_manifest(df, tmp / "manifest.csv")
        pd.DataFrame(rows, columns=["id", "structure"]).to_csv(tmp / "dropped.csv", index=False)
    return df
