"""Turn the dataset layouts we understand into one pandas manifest.

Every loader in the package works from a manifest: a DataFrame with one row
per image. This module knows the folder conventions (ISIC 2016-2018, PH2,
``images/`` + ``masks/``, an explicit manifest CSV) and nothing else; it never
opens an image, so a few thousand files index in milliseconds. Decoding and
content checks live in :mod:`lesionkeras.data.check`.

The layouts themselves are read by `layout_folders` (ISIC, PH2, generic) and
`layout_csv` (manifest CSV); `layout_frame` owns the columns below.

Manifest columns, in this order:

* ``id`` (str): unique per row; rows are sorted by it.
* ``image`` (str): absolute path of the image.
* ``mask`` (str): absolute path of the lesion mask, ``""`` when there is none.
* ``split`` (str): ``""`` when unassigned.
* ``fold`` (int): ``-1`` when unassigned.
* ``clean`` (bool): ``True`` unless the annotation is known to be noisy.
* ``diagnosis`` (str, optional): one of :data:`DIAGNOSES` or ``""``.
* ``attr_<name>`` (str, optional): Task 2 attribute mask path or ``""``.

A user manifest CSV may carry further columns; they are kept after these.
"""

import os

from lesionkeras.data.classes import ATTRIBUTES, DIAGNOSES
from lesionkeras.data.layout_csv import MANIFEST_NAME, _build_from_csv, _manifest_csv, _path_columns
from lesionkeras.data.layout_folders import (
    _UNKNOWN_LAYOUT, _build_generic, _build_isic, _build_ph2, _detect_in_tree, _raise_nothing_found, _scan)
from lesionkeras.data.layout_frame import (
    ATTRIBUTE_COLUMNS, BASE_COLUMNS, IMAGE_EXTENSIONS, _cell, _relative, no_images_error)
from lesionkeras import files
from lesionkeras.errors import ConfigError, DataError

__all__ = [
    "ATTRIBUTES", "DIAGNOSES", "LAYOUTS", "BASE_COLUMNS", "ATTRIBUTE_COLUMNS", "IMAGE_EXTENSIONS",
    "MANIFEST_NAME", "detect_layout", "build_manifest", "write_manifest", "no_images_error",
]

LAYOUTS = ("isic", "ph2", "generic", "manifest")


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def detect_layout(root):
    """Guess which layout a path holds.

    Checked in this order: a ``.csv`` file or a folder with ``manifest.csv``
    ("manifest"), a folder with an ``images/`` subfolder ("generic"), any
    ``IMDnnn_Dermoscopic_Image`` folder below it ("ph2"), any
    ``ISIC_nnnnnnn`` image below it ("isic").

    Args:
        root: str or os.PathLike. A dataset folder or a manifest CSV file.

    Returns:
        str, one of :data:`LAYOUTS`.

    Raises:
        DataError: the path does not exist, holds no image files, or holds
            images in none of the known layouts.
    """
    root = _existing_path(root)
    if os.path.isfile(root):
        if root.lower().endswith(".csv"):
            return "manifest"
        raise DataError(f"{root}: {_UNKNOWN_LAYOUT}")
    if os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        return "manifest"
    if os.path.isdir(os.path.join(root, "images")):
        return "generic"
    return _detect_in_tree(_scan(root), root)


def build_manifest(source, *, layout="auto"):
    """Index a dataset into a manifest DataFrame.

    Args:
        source: str or os.PathLike. A dataset folder, or a manifest CSV file
            (or a folder holding ``manifest.csv``).
        layout: str. ``"auto"`` (see :func:`detect_layout`) or one of
            :data:`LAYOUTS` to skip detection.

    Returns:
        pandas.DataFrame with the columns described in the module docstring,
        one row per image, sorted by ``id``, with a fresh RangeIndex. It is
        never empty.

    Raises:
        ConfigError: `layout` is not a known layout name.
        DataError: the source is missing, empty, ambiguous (two files claim
            the same id or the same mask) or, for a manifest, malformed. All
            problems found are listed in ``DataError.problems``.
    """
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(
            f"unknown layout {layout!r} (expected auto, {', '.join(LAYOUTS)})"
        )
    root = _existing_path(source)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "manifest":
        return _build_from_csv(_manifest_csv(root))

    if not os.path.isdir(root):
        raise DataError(f"{root}: not a folder (the {layout} layout needs a folder)")
    if layout == "generic":
        df = _build_generic(root)
    else:
        tree = _scan(root)
        df = _build_isic(tree, root) if layout == "isic" else _build_ph2(tree, root)
        if df.empty:
            _raise_nothing_found(tree, root, layout)
    return df


def write_manifest(df, path):
    """Write a manifest as CSV that :func:`build_manifest` reads back.

    Path columns (``image``, ``mask``, ``attr_*``) are written relative to the
    CSV's folder so a dataset folder can be moved or shared with its manifest.
    The file is written to a temporary name and renamed, so a failure never
    leaves a half-written manifest behind.

    Args:
        df: pandas.DataFrame. A manifest; it needs at least an ``image`` column.
        path: str or os.PathLike. Destination ``.csv`` file; its parent
            folders are created.

    Raises:
        DataError: `df` has no ``image`` column.
    """
    path = os.path.abspath(os.fspath(path))
    if "image" not in df.columns:
        raise DataError(f"{path}: manifest to write has no 'image' column")
    folder = os.path.dirname(path)
    out = df.copy()
    for column in _path_columns(out.columns):
        out[column] = [_relative(_cell(p), folder) for p in out[column]]
    os.makedirs(folder, exist_ok=True)
    with files.atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)


def _existing_path(source):
    root = os.path.abspath(os.path.expanduser(os.fspath(source)))
    if not os.path.exists(root):
        raise DataError(f"{root}: no such file or folder")
    return root
