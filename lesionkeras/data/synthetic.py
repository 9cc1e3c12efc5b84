"""Built-in synthetic dermoscopy dataset.

Generates dermoscopy-like images of skin lesions together with their exact
lesion masks, the five ISIC 2018 Task 2 dermoscopic attribute masks and an
ISIC 2018 Task 3 diagnosis, and can write them in the ISIC 2018 folder
layouts. It lets the package be trained, tested and demonstrated without
downloading the real (licensed, multi-gigabyte) ISIC archive.

Every sample is a pure function of `(seed, index, size)`: the generator is
seeded with both numbers, so sample `i` is identical whatever the size of the
dataset it belongs to.

The drawing lives in `synthetic_paint` (primitives and palette),
`synthetic_lesion` (skin, outline, lesion colours) and `synthetic_structures`
(the dermoscopic attributes); this module composes a sample and writes datasets.

The module deliberately depends only on numpy, pillow and scipy, so that data
can be prepared without importing TensorFlow.
"""

import csv
import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image

from lesionkeras import files
from lesionkeras.data.classes import ATTRIBUTES, DIAGNOSES
from lesionkeras.data.synthetic_lesion import _STYLES, _Shape, _lesion_body, _skin, _vignette
from lesionkeras.data.synthetic_paint import _blend, _curves, _grid
from lesionkeras.data.synthetic_structures import _DRAWERS, _Context, _draw_class_extras
from lesionkeras.errors import DataError

__all__ = [
    "ATTRIBUTES",
    "DIAGNOSES",
    "SyntheticSample",
    "make_sample",
    "make_dataset",
    "write_isic",
    "cache_root",
    "cached_dataset",
]

# NV dominates as in ISIC, but far less than the real 67 %, so that every
# class is seen often enough in a few hundred images.
_PRIOR = {"MEL": 0.20, "NV": 0.35, "BCC": 0.10, "AKIEC": 0.09, "BKL": 0.12, "DF": 0.07, "VASC": 0.07}
_PRIOR_P = np.array([_PRIOR[d] for d in DIAGNOSES])


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    """One synthetic dermoscopy image with its ground truth.

    Compare samples with `np.array_equal` on the fields; `==` on the dataclass
    would compare arrays element-wise.

    Attributes:
        image: (size, size, 3) uint8 RGB image.
        mask: (size, size) uint8 lesion mask in {0, 1}. It is exact: the
            pixels where the lesion/skin blend of the image is >= 0.5.
        attributes: dict mapping every name of ATTRIBUTES to a (size, size)
            uint8 {0, 1} mask, all zeros when the structure is absent. Each is
            a subset of `mask`.
        diagnosis: one of DIAGNOSES.
    """

    image: np.ndarray
    mask: np.ndarray
    attributes: dict
    diagnosis: str


# --------------------------------------------------------------------------
# Small helpers


def _check_positive_int(name, value, minimum):
    # bool is an int subclass; True as a count is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --------------------------------------------------------------------------
# Public API


def make_sample(seed: int, index: int, size: int = 64) -> SyntheticSample:
    """Generate one synthetic dermoscopy sample.

    Args:
        seed: int >= 0, the dataset seed.
        index: int >= 0, the sample number within the dataset.
        size: int >= 16, side of the square image in pixels.

    Returns:
        SyntheticSample. Depends only on (seed, index, size).

    Raises:
        ValueError: an argument is out of range.
    """
    _check_positive_int("seed", seed, 0)
    _check_positive_int("index", index, 0)
    _check_positive_int("size", size, 16)
    rng = np.random.default_rng([int(seed), int(index)])
    s = size / 64.0
    yy, xx = _grid(size)

    diag = DIAGNOSES[rng.choice(len(DIAGNOSES), p=_PRIOR_P)]
    style = _STYLES[diag]
    present = rng.random(len(ATTRIBUTES)) < np.asarray(style["attrs"])

    img, tone = _skin(rng, size, yy, xx)
    shape = _Shape(rng, style, size, yy, xx)
    vis, dark = _vignette(rng, size, yy, xx)
    if vis is not None:
        # The lesion is only what can be seen inside the field of view, which
        # is also how ISIC masks treat lesions cut by the dermoscope border.
        shape.alpha = np.minimum(shape.alpha, vis)
    mask = shape.alpha >= 0.5

    body = _lesion_body(rng, diag, shape, tone, size)
    img += (body - img) * shape.alpha[..., None]

    ctx = _Context(size, yy, xx, shape, mask, tone)
    _draw_class_extras(rng, img, diag, ctx)
    attributes = {}
    for name, wanted in zip(ATTRIBUTES, present):
        region = _DRAWERS[name](rng, img, ctx) if wanted else None
        attributes[name] = (
            np.zeros((size, size), np.uint8) if region is None else (region & mask).astype(np.uint8)
        )

    # Hairs lie on top of everything and are never part of the lesion.
    n_hairs = 0 if rng.random() < 0.4 else int(rng.integers(1, 10))
    hairs = _curves(rng, size, n_hairs, (0.8 * s, 1.7 * s), (0.3, 1.2))
    hair_colour = np.asarray([38, 28, 22], np.float32) * rng.uniform(0.5, 1.3)
    _blend(img, hair_colour, 0.9 * hairs)

    # Light falls off towards the edge of the dermoscope lens.
    falloff = rng.uniform(0.0, 0.2) * ((yy / size - 0.5) ** 2 + (xx / size - 0.5) ** 2) * 2.0
    img *= (1.0 - falloff)[..., None]
    if vis is not None:
        _blend(img, (dark, dark * 0.9, dark * 0.85), 1.0 - vis)

    img += rng.uniform(1.0, 3.0) * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(img + 0.5, 0.0, 255.0).astype(np.uint8)
    return SyntheticSample(image=image, mask=mask.astype(np.uint8), attributes=attributes, diagnosis=diag)


def make_dataset(count: int, size: int = 64, seed: int = 0) -> list:
    """Generate `count` samples: make_sample(seed, i, size) for i in range(count).

    Args:
        count: int >= 1.
        size: int >= 16, image side in pixels.
        seed: int >= 0.

    Returns:
        list of SyntheticSample.

    Raises:
        ValueError: an argument is out of range.
    """
    _check_positive_int("count", count, 1)
    _check_positive_int("size", size, 16)
    return [make_sample(seed, i, size) for i in range(count)]


_INPUT_DIR = "ISIC2018_Task1-2_Training_Input"
_TASK1_DIR = "ISIC2018_Task1_Training_GroundTruth"
_TASK2_DIR = "ISIC2018_Task2_Training_GroundTruth_v3"
_TASK3_DIR = "ISIC2018_Task3_Training_GroundTruth"
_TASK3_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"


def write_isic(out_dir, count: int, size: int = 64, seed: int = 0, progress=None) -> pathlib.Path:
    """Write a synthetic dataset in the ISIC 2018 Task 1, 2 and 3 layouts.

    Writes, for image ids ISIC_0000000, ISIC_0000001, ...:
    `ISIC2018_Task1-2_Training_Input/<id>.jpg`,
    `ISIC2018_Task1_Training_GroundTruth/<id>_segmentation.png`,
    `ISIC2018_Task2_Training_GroundTruth_v3/<id>_attribute_<name>.png` for
    every name in ATTRIBUTES, and the one-hot diagnosis CSV
    `ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv`.

    The folder appears complete or not at all: everything is written into a
    temporary sibling folder, renamed into place at the end and removed on
    any error (`files.atomic_folder`).

    Args:
        out_dir: str or path-like. Must not exist, or be an empty folder.
        count: int >= 1, number of images.
        size: int >= 16, image side in pixels.
        seed: int >= 0.
        progress: optional callable, called as progress(n_done) with the
            number of images written so far, after each image.

    Returns:
        pathlib.Path of the written folder.

    Raises:
        ValueError: an argument is out of range.
        DataError: `out_dir` exists and is not an empty folder, or cannot be
            written (`files.check_output`).
    """
    _check_positive_int("count", count, 1)
    _check_positive_int("size", size, 16)
    _check_positive_int("seed", seed, 0)
    out = files.check_output(out_dir, whole=True, empty=True)
    with files.atomic_folder(out) as tmp:
        for sub in (_INPUT_DIR, _TASK1_DIR, _TASK2_DIR, _TASK3_DIR):
            (tmp / sub).mkdir(parents=True)
        rows = []
        for i in range(count):
            sample = make_sample(seed, i, size)
            image_id = f"ISIC_{i:07d}"
            Image.fromarray(sample.image).save(tmp / _INPUT_DIR / f"{image_id}.jpg", quality=95)
            Image.fromarray(sample.mask * np.uint8(255)).save(tmp / _TASK1_DIR / f"{image_id}_segmentation.png")
            for name in ATTRIBUTES:
                Image.fromarray(sample.attributes[name] * np.uint8(255)).save(
                    tmp / _TASK2_DIR / f"{image_id}_attribute_{name}.png"
                )
            rows.append([image_id] + ["1.0" if d == sample.diagnosis else "0.0" for d in DIAGNOSES])
            if progress is not None:
                progress(i + 1)
        with open(tmp / _TASK3_DIR / _TASK3_CSV, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["image", *DIAGNOSES])
            writer.writerows(rows)
    return out


def cache_root() -> pathlib.Path:
    """Folder holding cached synthetic datasets.

    Returns:
        pathlib.Path: $LESIONKERAS_CACHE if set, else
        $XDG_CACHE_HOME/lesionkeras, else ~/.cache/lesionkeras.
    """
    explicit = os.environ.get("LESIONKERAS_CACHE")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "lesionkeras"
    return pathlib.Path.home() / ".cache" / "lesionkeras"


def cached_dataset(count: int, size: int = 64, seed: int = 0) -> pathlib.Path:
    """Path of a synthetic ISIC-layout dataset in the cache, written if absent.

    Args:
        count: int >= 1, number of images.
        size: int >= 16, image side in pixels.
        seed: int >= 0.

    Returns:
        pathlib.Path: cache_root()/f"synthetic-s{size}-n{count}-seed{seed}".
        write_isic is atomic, so an existing folder is complete and is
        returned without any work.

    Raises:
        ValueError: an argument is out of range.
    """
    _check_positive_int("count", count, 1)
    _check_positive_int("size", size, 16)
    _check_positive_int("seed", seed, 0)
    path = cache_root() / f"synthetic-s{size}-n{count}-seed{seed}"
    if path.is_dir():
        return path
    try:
        write_isic(path, count, size=size, seed=seed)
    except (DataError, OSError):
        # Another process may have written the same dataset meanwhile; its
        # copy is as good as ours.
        if path.is_dir() and any(path.iterdir()):
            return path
        raise
    return path
