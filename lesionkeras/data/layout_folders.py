"""Folder layouts: scan a dataset tree, detect ISIC or PH2, index ISIC, PH2 and `images/` + `masks/`."""

import os
import re

import pandas as pd

from lesionkeras.data.classes import ATTRIBUTES, DIAGNOSES
from lesionkeras.data.layout_frame import (
    ATTRIBUTE_COLUMNS, _first_line, _frame, _is_image_name, _row, no_images_error)
from lesionkeras.errors import DataError

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


# --------------------------------------------------------------------------- #
# Scanning
# --------------------------------------------------------------------------- #


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
        raise no_images_error(image_dir)
    return _frame(rows)
