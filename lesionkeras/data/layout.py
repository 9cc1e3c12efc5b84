"""Turn the dataset layouts we understand into one pandas manifest.

Every loader in the package works from a manifest: a DataFrame with one row
per image. This module knows the folder conventions (ISIC 2016-2018, PH2,
``images/`` + ``masks/``, an explicit manifest CSV) and nothing else; it never
opens an image, so a few thousand files index in milliseconds. Decoding and
content checks live in :mod:`lesionkeras.data.check`.

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
import re

import pandas as pd

from lesionkeras.data.classes import ATTRIBUTES, DIAGNOSES
from lesionkeras.errors import ConfigError, DataError

LAYOUTS = ("isic", "ph2", "generic", "manifest")

BASE_COLUMNS = ("id", "image", "mask", "split", "fold", "clean")
ATTRIBUTE_COLUMNS = tuple(f"attr_{name}" for name in ATTRIBUTES)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MANIFEST_NAME = "manifest.csv"

_UNKNOWN_LAYOUT = "unknown layout (expected ISIC, PH2, images/+masks/ or a manifest CSV)"

# Extensions are matched case-insensitively because archives unpacked on
# Windows or by some tools upper-case them.
_ISIC_IMAGE = re.compile(r"(ISIC_\d{7})\.(?:jpg|jpeg|png)", re.IGNORECASE)
_ISIC_MASK = re.compile(r"(ISIC_\d{7})_[sS]egmentation\.png", re.IGNORECASE)
_ISIC_ATTRIBUTE = re.compile(
    r"(ISIC_\d{7})_attribute_(" + "|".join(ATTRIBUTES) + r")\.png", re.IGNORECASE
)
_ISIC_ANY = re.compile(r"ISIC_\d{7}\.(?:jpg|jpeg|png)", re.IGNORECASE)
_PH2_IMAGE = re.compile(r"(IMD\d{3})\.bmp", re.IGNORECASE)
_PH2_IMAGE_DIR = re.compile(r"(IMD\d{3})_Dermoscopic_Image", re.IGNORECASE)
_MASK_SUFFIXES = ("_mask", "_segmentation", "_lesion")
_GROUND_TRUTH = "groundtruth"
# Folders that never hold data: VCS/notebook clutter and the resource-fork
# copies macOS puts in zip archives (``__MACOSX/._ISIC_...jpg``).
_SKIP_DIRS = ("__MACOSX",)

_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


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
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        out.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- #
# Scanning
# --------------------------------------------------------------------------- #


def _existing_path(source):
    root = os.path.abspath(os.path.expanduser(os.fspath(source)))
    if not os.path.exists(root):
        raise DataError(f"{root}: no such file or folder")
    return root


def _scan(root):
    """Walk `root` once; return a list of (dirpath, relative_parts, dirnames, filenames)."""
    tree = []
    # Symlinked subfolders are common for datasets kept on another disk, so
    # they are followed; real paths already seen are pruned to avoid loops.
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS
        )
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == os.curdir else tuple(rel.split(os.sep))
        files = sorted(f for f in filenames if not f.startswith("."))
        tree.append((dirpath, parts, dirnames, files))
    return tree


def _is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _detect_in_tree(tree, root):
    any_image = False
    isic = False
    for _, _, dirnames, filenames in tree:
        if any(_PH2_IMAGE_DIR.fullmatch(d) for d in dirnames):
            return "ph2"
        for name in filenames:
            if not isic and _ISIC_ANY.fullmatch(name):
                isic = True
            if not any_image and _is_image_name(name):
                any_image = True
    if isic:
        return "isic"
    if any_image:
        raise DataError(f"{root}: {_UNKNOWN_LAYOUT}")
    raise DataError(f"{root}: empty folder: no images found")


def _raise_nothing_found(tree, root, layout):
    if any(_is_image_name(f) for _, _, _, files in tree for f in files):
        expected = {
            "isic": "ISIC_nnnnnnn.jpg images",
            "ph2": "IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp images",
        }[layout]
        raise DataError(f"{root}: no {expected} found")
    raise DataError(f"{root}: empty folder: no images found")


class _Registry:
    """Maps an id to one path and remembers every id claimed twice."""

    def __init__(self, what):
        self.what = what
        self.paths = {}
        self.duplicates = {}

    def add(self, key, path):
        if key in self.paths:
            self.duplicates.setdefault(key, [self.paths[key]]).append(path)
        else:
            self.paths[key] = path

    def problems(self):
        # One entry per extra file: each offending file is named on its own line.
        out = []
        for key, paths in sorted(self.duplicates.items()):
            label = key if isinstance(key, str) else " ".join(key)
            first = paths[0]
            for other in paths[1:]:
                out.append((other, f"same {self.what} {label} as {first}"))
        return out


def _raise_duplicates(root, registries):
    problems = [p for registry in registries for p in registry.problems()]
    if not problems:
        return
    path, problem = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise DataError(f"{root}: duplicate ids: {path}: {problem}{more}", problems=problems)


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
# ISIC
# --------------------------------------------------------------------------- #


def _build_isic(tree, root):
    images = _Registry("ISIC image id")
    masks = _Registry("ISIC mask id")
    attributes = _Registry("ISIC attribute")
    csv_files = []
    for dirpath, parts, _, filenames in tree:
        # Only folders below root count, so a root that happens to be named
        # "...GroundTruth..." does not hide its images.
        in_ground_truth = any(_GROUND_TRUTH in p.lower() for p in parts)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.lower().endswith(".csv"):
                csv_files.append(path)
                continue
            match = _ISIC_IMAGE.fullmatch(name)
            if match and not in_ground_truth:
                images.add(match.group(1).upper(), path)
                continue
            match = _ISIC_MASK.fullmatch(name)
            if match and in_ground_truth:
                masks.add(match.group(1).upper(), path)
                continue
            match = _ISIC_ATTRIBUTE.fullmatch(name)
            if match:
                attributes.add((match.group(1).upper(), match.group(2).lower()), path)
    _raise_duplicates(root, (images, masks, attributes))

    rows = [_row(i, p, masks.paths.get(i, "")) for i, p in images.paths.items()]
    extra = []
    diagnoses = _isic_diagnoses(csv_files)
    if diagnoses is not None:
        extra.append("diagnosis")
        for row in rows:
            row["diagnosis"] = diagnoses.get(row["id"], "")
    if attributes.paths:
        extra.extend(ATTRIBUTE_COLUMNS)
        for row in rows:
            for name in ATTRIBUTES:
                row[f"attr_{name}"] = attributes.paths.get((row["id"], name), "")
    return _frame(rows, extra)


def _csv_header(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            line = f.readline()
    except (OSError, UnicodeDecodeError):
        return []
    return [c.strip() for c in line.strip().split(",")]


def _isic_diagnoses(csv_files):
    """Read Task 3 style ground-truth CSVs; return {id: diagnosis} or None if none found."""
    found = None
    sources = {}
    conflicts = []
    for path in csv_files:
        header = _csv_header(path)
        if "image" in header and all(d in header for d in DIAGNOSES):
            labels = _read_one_hot(path)
        elif "image_id" in header and "melanoma" in header:
            labels = _read_isic2017_classes(path, has_sk="seborrheic_keratosis" in header)
        else:
            continue  # metadata or unrelated CSV
        found = {} if found is None else found
        for image_id, label in labels.items():
            if image_id in found and label and found[image_id] and found[image_id] != label:
                conflicts.append(
                    (path, f"{image_id} is {label} here but {found[image_id]} in {sources[image_id]}")
                )
                continue
            if label or image_id not in found:
                found[image_id] = label
                sources[image_id] = path
    if conflicts:
        path, problem = conflicts[0]
        raise DataError(f"{path}: conflicting diagnosis: {problem}", problems=conflicts)
    return found


def _read_label_csv(path, columns):
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        # A blank cell means "not this class"; anything else must be a number.
        values = {c: pd.to_numeric(df[c].replace("", "0")) for c in columns}
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot read ground-truth CSV: {_first_line(exc)}") from exc
    return df, values


def _read_one_hot(path):
    df, values = _read_label_csv(path, DIAGNOSES)
    one_hot = pd.DataFrame(values)
    # Rows that are all zero (or NaN) carry no label rather than a wrong one.
    labels = one_hot.idxmax(axis=1).where(one_hot.max(axis=1) >= 0.5, "")
    return dict(zip(df["image"].str.strip(), labels.astype(str)))


def _read_isic2017_classes(path, has_sk):
    columns = ("melanoma", "seborrheic_keratosis") if has_sk else ("melanoma",)
    df, values = _read_label_csv(path, columns)
    melanoma = values["melanoma"] >= 0.5
    if has_sk:
        sk = values["seborrheic_keratosis"] >= 0.5
        labels = ["MEL" if m else "BKL" if s else "NV" for m, s in zip(melanoma, sk)]
    else:
        # Without the seborrheic keratosis column a non-melanoma may be either
        # NV or BKL, so it stays unlabelled rather than guessed.
        labels = ["MEL" if m else "" for m in melanoma]
    return dict(zip(df["image_id"].str.strip(), labels))


# --------------------------------------------------------------------------- #
# PH2
# --------------------------------------------------------------------------- #


def _build_ph2(tree, root):
    images = _Registry("PH2 image id")
    files = {dirpath: set(filenames) for dirpath, _, _, filenames in tree}
    rows = {}
    for dirpath, _, _, filenames in tree:
        folder = _PH2_IMAGE_DIR.fullmatch(os.path.basename(dirpath))
        if not folder:
            continue
        for name in filenames:
            match = _PH2_IMAGE.fullmatch(name)
            if not match or match.group(1).upper() != folder.group(1).upper():
                continue
            image_id = match.group(1)
            image = os.path.join(dirpath, name)
            images.add(image_id, image)
            lesion_dir = os.path.join(os.path.dirname(dirpath), f"{image_id}_lesion")
            mask = ""
            for candidate in files.get(lesion_dir, ()):
                if candidate.lower() == f"{image_id}_lesion.bmp".lower():
                    mask = os.path.join(lesion_dir, candidate)
            rows.setdefault(image_id, _row(image_id, image, mask))
    _raise_duplicates(root, (images,))
    return _frame(list(rows.values()))


# --------------------------------------------------------------------------- #
# Generic images/ + masks/
# --------------------------------------------------------------------------- #


def _list_images(folder):
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as entries:
        return sorted(
            (e.name, e.path)
            for e in entries
            if not e.name.startswith(".") and e.is_file() and _is_image_name(e.name)
        )


def _build_generic(root):
    image_dir = os.path.join(root, "images")
    images = _Registry("image id (file stem)")
    for name, path in _list_images(image_dir):
        images.add(os.path.splitext(name)[0], path)

    # A mask file may serve under its own stem or, for "<stem>_mask" and the
    # like, under the stem with the suffix removed.
    masks_by_key = {}
    for name, path in _list_images(os.path.join(root, "masks")):
        stem = os.path.splitext(name)[0]
        masks_by_key.setdefault(stem, []).append(path)
        for suffix in _MASK_SUFFIXES:
            if stem.lower().endswith(suffix) and len(stem) > len(suffix):
                masks_by_key.setdefault(stem[: -len(suffix)], []).append(path)

    problems = images.problems()
    rows = []
    for image_id, image in images.paths.items():
        candidates = masks_by_key.get(image_id, [])
        if len(candidates) > 1:
            problems.extend(
                (path, f"more than one mask for {image}; also {candidates[0]}")
                for path in candidates[1:]
            )
        rows.append(_row(image_id, image, candidates[0] if candidates else ""))
    if problems:
        path, problem = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{root}: ambiguous files: {path}: {problem}{more}", problems=problems)
    if not rows:
        raise DataError(f"{image_dir}: empty folder: no images found")
    return _frame(rows)


# --------------------------------------------------------------------------- #
# Manifest CSV
# --------------------------------------------------------------------------- #


def _manifest_csv(root):
    if os.path.isfile(root):
        return root
    path = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{root}: no {MANIFEST_NAME} in this folder")
    return path


def _path_columns(columns):
    return [c for c in columns if c in ("image", "mask") or str(c).startswith("attr_")]


def _build_from_csv(csv_path):
    base = os.path.dirname(csv_path)
    try:
        header = pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig").columns
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty manifest: no header and no rows") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: cannot read manifest: {_first_line(exc)}") from exc
    if "image" not in header:
        raise DataError(f"{csv_path}: manifest has no 'image' column")

    known = [c for c in header if c in BASE_COLUMNS or c == "diagnosis" or c.startswith("attr_")]
    extras = [c for c in header if c not in known]
    try:
        raw = pd.read_csv(
            csv_path, dtype=str, usecols=known, keep_default_na=False, encoding="utf-8-sig"
        )
        # Extra columns are the user's; let pandas infer their types as usual.
        user = pd.read_csv(csv_path, usecols=extras, encoding="utf-8-sig") if extras else None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DataError(f"{csv_path}: cannot read manifest: {_first_line(exc)}") from exc
    if raw.empty:
        raise DataError(f"{csv_path}: empty manifest: no images listed")

    problems = []

    def bad(row_index, message):
        # +2: one for the header line, one because CSV lines count from 1.
        problems.append((csv_path, f"line {row_index + 2}: {message}"))

    def paths(column):
        if column not in raw:
            return [""] * len(raw)
        return [_absolute(v.strip(), base) for v in raw[column]]

    df = pd.DataFrame({"image": paths("image")})
    for i in df.index[df["image"] == ""]:
        bad(i, "empty 'image' cell")
    given_ids = raw["id"].str.strip() if "id" in raw else pd.Series([""] * len(raw))
    stems = [os.path.splitext(os.path.basename(p))[0] for p in df["image"]]
    df.insert(0, "id", [g or s for g, s in zip(given_ids, stems)])
    df["mask"] = paths("mask")
    df["split"] = raw["split"].str.strip() if "split" in raw else ""
    df["fold"] = [_parse_fold(v, i, bad) for i, v in enumerate(raw.get("fold", [""] * len(raw)))]
    df["clean"] = [_parse_clean(v, i, bad) for i, v in enumerate(raw.get("clean", [""] * len(raw)))]
    if "diagnosis" in raw:
        df["diagnosis"] = [_parse_diagnosis(v, i, bad) for i, v in enumerate(raw["diagnosis"])]
    attr_columns = [c for c in known if c.startswith("attr_")]
    for column in attr_columns:
        df[column] = paths(column)

    seen = {}
    for i, image_id in enumerate(df["id"]):
        if image_id in seen:
            bad(i, f"id {image_id} already used on line {seen[image_id] + 2}")
        else:
            seen[image_id] = i
    if problems:
        path, problem = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{path}: {problem}{more}", problems=problems)

    extra = (["diagnosis"] if "diagnosis" in raw else []) + attr_columns
    out = _frame(df.to_dict("records"), extra)
    if user is not None:
        # Re-attach the user's columns by id, since _frame sorted the rows.
        user.index = df["id"]
        out = out.join(user, on="id")
    return out


def _parse_fold(value, i, bad):
    value = value.strip()
    if not value:
        return -1
    try:
        number = float(value)
        if number == int(number):
            return int(number)
    except (ValueError, OverflowError):
        pass
    bad(i, f"fold must be an integer, got {value!r}")
    return -1


def _parse_clean(value, i, bad):
    value = value.strip().lower()
    if not value or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    bad(i, f"clean must be true or false, got {value!r}")
    return True


def _parse_diagnosis(value, i, bad):
    value = value.strip().upper()
    if value and value not in DIAGNOSES:
        bad(i, f"diagnosis must be one of {', '.join(DIAGNOSES)} or empty, got {value!r}")
        return ""
    return value


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
