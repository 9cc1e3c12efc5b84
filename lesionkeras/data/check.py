"""Validate the files of a manifest before any training starts.

Every image and every mask the caller will read (the lesion ``mask``, the
attribute masks ``attr_<name>`` of the methods that use them) is opened with
PIL and fully decoded, so a corrupt or mis-sized file is reported here, with
its name, instead of crashing a ``tf.data`` pipeline hours into a run. All
problems are collected; nothing stops at the first one, so the user can fix a
whole folder in one go. `stray_files` lists what a folder holds that its
manifest leaves out (broken symbolic links, masks with no image).

Severity ``"error"`` means the file cannot be used (training would fail or
learn from garbage); ``"warning"`` means the pipeline copes by converting the
file, but the user may want to know.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from lesionkeras.data.layout_csv import MANIFEST_NAME
from lesionkeras.data.layout_folders import _scan
from lesionkeras.data.layout_frame import _is_image_name
from lesionkeras.errors import DataError

ERROR = "error"
WARNING = "warning"

# Modes the pipeline turns into RGB without losing anything the model needs.
_GRAY_MODES = ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_COLOR_MODES = ("CMYK", "YCbCr")
# Single-channel mask modes, read as they are (palette via its colours).
_MASK_SINGLE = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_MASK_MULTI = {"LA": 2, "PA": 2, "RGB": 3, "RGBA": 4}


@dataclasses.dataclass
class Problem:
    """One problem with one file.

    Attributes:
        path: str. The file the problem is about.
        message: str. What is wrong, in a few words.
        severity: str. ``"error"`` or ``"warning"``.
    """

    path: str
    message: str
    severity: str


@dataclasses.dataclass
class CheckReport:
    """What :func:`check_manifest` found.

    Attributes:
        n_images: int. Rows of the manifest.
        n_masks: int. Rows that name a mask file (whether or not it is usable).
        sizes: collections.Counter. ``(width, height)`` of every decodable
            image -> number of images.
        coverage_mean: float. Mean lesion fraction (pixels >= 128, or == 1 for
            0/1 masks) over decodable masks; NaN when there are none.
        coverage_min: float. Smallest lesion fraction; NaN when no masks.
        coverage_max: float. Largest lesion fraction; NaN when no masks.
        problems: list of Problem, in manifest order.
    """

    n_images: int
    n_masks: int
    sizes: collections.Counter
    coverage_mean: float
    coverage_min: float
    coverage_max: float
    problems: list

    @property
    def errors(self):
        """list of Problem: the problems of severity ``"error"``."""
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self):
        """list of Problem: the problems of severity ``"warning"``."""
        return [p for p in self.problems if p.severity == WARNING]


def all_mask_columns(df):
    """Every mask column of a manifest: ``mask`` and the attribute masks ``attr_<name>``."""
    return [c for c in df.columns if c == "mask" or str(c).startswith("attr_")]


def check_manifest(df, *, require_masks=True, mask_columns=("mask",), image_sizes_only=False,
                   workers=8, progress=None, source=None):
    """Decode every image and mask of a manifest and report what is wrong.

    Args:
        df: pandas.DataFrame. A manifest (see :mod:`lesionkeras.data.layout`);
            only its ``image`` column and the `mask_columns` are read.
        require_masks: bool. If True an image without a ``mask`` is an error
            (training, evaluation); if False it is fine (prediction). Masks
            that are listed are checked either way.
        mask_columns: sequence of str. The mask columns to check (those the
            caller will read): every listed file must decode as a mask of the
            image's size. Columns the manifest lacks are skipped. Defaults to
            ``("mask",)``; :func:`all_mask_columns` gives every one (``data check``).
        image_sizes_only: bool. Read only the images' sizes (their headers),
            for a caller whose images were checked already. Defaults to False.
        workers: int. Threads decoding files in parallel (PIL releases the
            GIL while decoding); ``1`` checks in the calling thread.
        progress: callable or None. Called as ``progress(done, total)`` in
            the calling thread after each image (with its mask) is checked.
        source: str or os.PathLike or None. Where the manifest came from,
            used only in the error message for an empty manifest.

    Returns:
        CheckReport.

    Raises:
        DataError: the manifest has no rows.
    """
    if len(df) == 0:
        raise DataError(f"{source if source is not None else 'manifest'}: empty folder: no images found")
    images = [_cell(v) for v in df["image"]]
    masks = [_cell(v) for v in df["mask"]] if "mask" in df.columns else [""] * len(images)
    # Masks that are required are checked too.
    columns = [c for c in (["mask"] if require_masks else []) + list(mask_columns)
               if c in df.columns]
    columns = list(dict.fromkeys(columns))
    cells = [[_cell(v) for v in df[c]] for c in columns]
    jobs = [(image, list(zip(columns, row))) for image, row in
            zip(images, zip(*cells) if cells else [()] * len(images))]
    total = len(jobs)

    def run(job):
        image, masks = job[0], tuple(job[1])
        stamps = (_stamp(image),) + tuple(_stamp(path) for _, path in masks)
        return _check_row_once(image, masks, require_masks, image_sizes_only, stamps)

    results = []
    if workers <= 1:
        for job in jobs:
            results.append(run(job))
            if progress is not None:
                progress(len(results), total)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            # map() keeps manifest order, which makes the report reproducible.
            for result in pool.map(run, jobs):
                results.append(result)
                if progress is not None:
                    progress(len(results), total)

    sizes = collections.Counter(r.size for r in results if r.size is not None)
    coverages = [r.coverage for r in results if r.coverage is not None]
    return CheckReport(
        n_images=total,
        n_masks=sum(1 for m in masks if m),
        sizes=sizes,
        coverage_mean=float(np.mean(coverages)) if coverages else math.nan,
        coverage_min=float(min(coverages)) if coverages else math.nan,
        coverage_max=float(max(coverages)) if coverages else math.nan,
        problems=[p for r in results for p in r.problems],
    )


def validate(df, *, require_masks=True, **kw):
    """Check a manifest and fail with every error at once.

    Args:
        df: pandas.DataFrame. A manifest.
        require_masks: bool. See :func:`check_manifest`.
        **kw: passed to :func:`check_manifest` (``workers``, ``progress``,
            ``source``).

    Returns:
        CheckReport. It may hold warnings, never errors.

    Raises:
        DataError: the manifest is empty, or some file has an error. The
            message names the first bad file; ``problems`` lists every error
            as ``(path, message)``.
    """
    report = check_manifest(df, require_masks=require_masks, **kw)
    errors = report.errors
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
        raise DataError(
            f"{first.path}: {first.message}{more}",
            problems=[(p.path, p.message) for p in errors],
        )
    return report


# Names and folders that hold masks in the layouts `layout` reads.
_MASK_NAME = re.compile(r".*(_segmentation|_attribute_[a-z_]+|_mask|_lesion)\.[a-z]+", re.IGNORECASE)
_MASK_FOLDER = re.compile(r"masks|.*groundtruth.*|.*_lesion", re.IGNORECASE)


def stray_files(source, df):
    """Warnings for the files of a dataset folder that its manifest leaves out, unseen.

    A broken symbolic link (its target is missing) with an image name, and a
    mask with no image (by its name, or a folder of masks such as ``masks/``
    or ``*_GroundTruth/``). Other files (e.g. ISIC superpixels) are not listed.

    Args:
        source: str or os.PathLike. The dataset folder `df` was built from; a
            manifest CSV (or a folder with ``manifest.csv``) names its files
            itself and has no strays.
        df: pandas.DataFrame. Its manifest.

    Returns:
        list of Problem of severity ``"warning"``, sorted by path.
    """
    root = os.path.abspath(os.fspath(source))
    if not os.path.isdir(root) or os.path.isfile(os.path.join(root, MANIFEST_NAME)):
        return []
    used = {os.path.abspath(_cell(v)) for c in ["image", *all_mask_columns(df)] if c in df
            for v in df[c] if _cell(v)}
    problems = []
    for dirpath, parts, _, names in _scan(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if path in used or not _is_image_name(name):
                continue
            if os.path.islink(path) and not os.path.exists(path):
                problems.append(Problem(path, f"broken symbolic link (its target "
                                              f"{os.readlink(path)} is missing); not used", WARNING))
            elif _MASK_NAME.fullmatch(name) or any(_MASK_FOLDER.fullmatch(p) for p in parts):
                problems.append(Problem(path, "mask with no image; not used", WARNING))
    return sorted(problems, key=lambda p: p.path)


def format_report(report, root=None):
    """Render a report as text for ``lesionkeras data check``.

    Args:
        report: CheckReport.
        root: str or os.PathLike or None. If given, paths below it are shown
            relative to it, which keeps lines short.

    Returns:
        str, several lines, no trailing newline: counts, the most common
        image sizes, mask coverage, then one line per problem
        (``"error: <path>: <message>"`` or ``"warning: ..."``).
    """
    lines = [f"images: {report.n_images}", f"masks: {report.n_masks}"]
    if report.sizes:
        common = report.sizes.most_common(3)
        text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in common)
        others = len(report.sizes) - len(common)
        if others:
            rest = sum(report.sizes.values()) - sum(n for _, n in common)
            text += f", {others} other sizes ({rest})"
        lines.append(f"image sizes: {text}")
    else:
        lines.append("image sizes: none decodable")
    if math.isnan(report.coverage_mean):
        lines.append("mask coverage: no masks")
    else:
        lines.append(
            "mask coverage: mean {:.1%}, min {:.1%}, max {:.1%}".format(
                report.coverage_mean, report.coverage_min, report.coverage_max
            )
        )
    lines.append(f"problems: {len(report.errors)} errors, {len(report.warnings)} warnings")
    for problem in report.problems:
        lines.append(f"{problem.severity}: {_show(problem.path, root)}: {problem.message}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# Per-file checks (run in worker threads)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class _RowResult:
    size: tuple = None
    coverage: float = None
    problems: list = dataclasses.field(default_factory=list)


def _stamp(path):
    """What tells a file's versions apart without reading it: (inode, size, mtime ns)."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns) if st else None


@functools.lru_cache(maxsize=200_000)
def _check_row_once(image_path, masks, require_masks, image_sizes_only, stamps):
    """`_check_row`, remembered while the files keep their stamps (`_stamp`).

    The folds of `fit --folds K` and the cells of an experiment table each
    validate the same files in one process: each file is decoded once.
    """
    return _check_row(image_path, list(masks), require_masks, image_sizes_only)


def _check_row(image_path, masks, require_masks, image_sizes_only=False):
    """Checks one image and its masks, `masks` being (column, path) pairs."""
    result = _RowResult()

    def error(path, message):
        result.problems.append(Problem(path, message, ERROR))

    def warn(path, message):
        result.problems.append(Problem(path, message, WARNING))

    if not os.path.isfile(image_path):
        if os.path.islink(image_path):
            error(image_path, f"image is a broken symbolic link (to {os.readlink(image_path)})")
        else:
            error(image_path, "image file not found")
    else:
        try:
            with Image.open(image_path) as im:
                if not image_sizes_only:
                    im.load()
                mode, size, info = im.mode, im.size, im.info
        except Exception as exc:  # PIL raises many types for bad data
            error(image_path, f"cannot decode image: {_reason(exc)}")
        else:
            result.size = size
            if not image_sizes_only:
                _check_image_mode(image_path, mode, info, error, warn)

    if require_masks and not dict(masks).get("mask"):
        error(image_path, "no mask for this image")
    for column, mask_path in masks:
        if mask_path:
            coverage = _check_mask(image_path, column, mask_path, result.size, error, warn)
            if column == "mask":
                result.coverage = coverage
    return result


def _check_mask(image_path, column, mask_path, image_size, error, warn):
    """Decodes one mask; returns its coverage, or None when it cannot be used."""
    what = "mask" if column == "mask" else f"{column[len('attr_'):]} mask"
    if not os.path.isfile(mask_path):
        target = f" (a broken symbolic link to {os.readlink(mask_path)})" if os.path.islink(mask_path) else ""
        error(image_path, f"{what} file not found: {mask_path}{target}")
        return None
    try:
        with Image.open(mask_path) as im:
            im.load()
            mask_mode, mask_size = im.mode, im.size
            # Palette and 1-bit masks are read through their colours, as an
            # image decoder would, so "white = lesion" holds for them too.
            array = np.asarray(im.convert("L") if im.mode in ("P", "1") else im)
    except Exception as exc:
        error(mask_path, f"cannot decode {what}: {_reason(exc)}")
        return None

    if image_size is not None and mask_size != image_size:
        error(
            mask_path,
            f"{what} is {mask_size[0]}x{mask_size[1]} "
            f"but image is {image_size[0]}x{image_size[1]}",
        )
    if mask_mode not in _MASK_SINGLE and mask_mode not in _MASK_MULTI:
        error(mask_path, f"unsupported {what} mode {mask_mode}")
        return None
    if mask_mode.startswith("I;16"):
        # Decoders hand 16-bit PNGs to the pipeline scaled to 8 bits; match that
        # so a 0/65535 mask counts as binary.
        array = array / 257.0
    array = _mask_to_single(mask_path, mask_mode, array, warn)
    return _coverage(mask_path, array, warn)


def _check_image_mode(path, mode, info, error, warn):
    if mode == "RGB":
        return
    if mode == "P":
        if "transparency" in info:
            warn(path, "palette image with transparency, alpha channel dropped")
        else:
            warn(path, "palette image, converted to RGB")
    elif mode in _GRAY_MODES:
        warn(path, f"grayscale image (mode {mode}), converted to RGB")
    elif mode in _ALPHA_MODES:
        warn(path, f"{mode} image, alpha channel dropped")
    elif mode in _COLOR_MODES:
        warn(path, f"{mode} image, converted to RGB")
    else:
        error(path, f"unsupported image mode {mode}")


def _mask_to_single(path, mode, array, warn):
    """Reduce a mask to one channel the way the pipeline does, warning if needed."""
    channels = _MASK_MULTI.get(mode)
    if channels is None:
        return array
    # Alpha says nothing about the lesion; averaging it in would lift the
    # background above zero.
    colour = array[..., :1] if mode in ("LA", "PA") else array[..., :3]
    alpha = " (alpha ignored)" if mode in ("RGBA", "LA", "PA") else ""
    if colour.shape[-1] == 1 or (colour == colour[..., :1]).all():
        warn(path, f"mask has {channels} channels; using the first{alpha}")
        return colour[..., 0]
    warn(path, f"mask has {channels} channels that differ; using their mean{alpha}")
    return colour.mean(axis=-1)


def _coverage(path, array, warn):
    if array.size == 0:
        return 0.0
    if array.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    else:
        present = np.unique(array)
    values = set(present.tolist())
    if values <= {0, 1}:
        # 0/1 masks (common from numpy tools) are binary, just on another scale.
        return float(np.count_nonzero(array == 1)) / array.size
    if not values <= {0, 255}:
        warn(path, "mask is not binary; thresholded at 128")
    return float(np.count_nonzero(array >= 128)) / array.size


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _cell(value):
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)


def _reason(exc):
    """A short, path-free reason for a decoding failure."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image file"
    text = str(exc).strip().splitlines()
    text = text[0] if text else ""
    if not text:
        return type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _show(path, root):
    if root is None:
        return path
    root = os.path.abspath(os.fspath(root))
    if os.path.isfile(root):
        root = os.path.dirname(root)
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith(os.pardir) else rel
