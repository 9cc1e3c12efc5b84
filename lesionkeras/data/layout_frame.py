"""The manifest's columns, building a frame in their order, and the path-cell helpers the layout readers share."""

import os

import pandas as pd

from lesionkeras.data.classes import ATTRIBUTES
from lesionkeras.errors import DataError

BASE_COLUMNS = ("id", "image", "mask", "split", "fold", "clean")
ATTRIBUTE_COLUMNS = tuple(f"attr_{name}" for name in ATTRIBUTES)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def no_images_error(folder):
    """The `DataError` for a folder without image files: empty, or images only in subfolders."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        count = sum(1 for f in filenames if _is_image_name(f) and not f.startswith("."))
        if count and dirpath != os.fspath(folder):
            top = os.path.relpath(dirpath, folder).split(os.sep)[0]
            found[top] = found.get(top, 0) + count
    if not found:
        return DataError(f"{folder}: empty folder: no images found")
    names = ", ".join(f"{name}/" for name in list(found)[:3]) + (", ..." if len(found) > 3 else "")
    return DataError(f"{folder}: no images in the folder itself, only in its subfolders "
                     f"({sum(found.values())} in {names}); give a subfolder, or a known "
                     "layout (ISIC, PH2, images/ + masks/, a manifest CSV)")


def _frame(rows, extra_columns=()):
    """Build the manifest frame from dict rows in the canonical column order."""
    columns = list(BASE_COLUMNS) + list(extra_columns)
    df = pd.DataFrame(rows, columns=columns)
    df["fold"] = df["fold"].astype("int64")
    df["clean"] = df["clean"].astype(bool)
    for column in columns:
        if column not in ("fold", "clean"):
            df[column] = df[column].astype(str)
    return df.sort_values("id", kind="stable").reset_index(drop=True)


def _row(image_id, image, mask=""):
    return {"id": image_id, "image": image, "mask": mask, "split": "", "fold": -1, "clean": True}


# --------------------------------------------------------------------------- #
# Small helpers
# --------------------------------------------------------------------------- #


def _cell(value):
    """A path cell as str; NaN/None (e.g. from a hand-built frame) become ""."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _absolute(path, base):
    if not path:
        return ""
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _relative(path, folder):
    if not path:
        return ""
    try:
        return os.path.relpath(path, folder)
    except ValueError:
        # Different drive on Windows: no relative form exists.
        return path


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
