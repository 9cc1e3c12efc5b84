"""Polygon noise: turn exact lesion masks into cheap, annotator-like ones.

Mirikharaji, Yan, Hamarneh, "Learning to Segment Skin Lesions from Noisy
Annotations" (MICCAI DART 2019), section 3: the lesion boundary is a closed
polygon that is simplified by dropping its least important vertex again and
again, a vertex mattering more the sharper its angle and the longer its two
segments. The noise levels of the paper:

* ``7-vertex`` and ``3-vertex``: the simplified polygon with 7 or 3 vertices;
* ``4-axis``: the axis-aligned 4-vertex polygon, i.e. the lesion's bounding
  rectangle;
* ``maximal``: the whole image but a thin band along its border (the
  "unsupervised" extreme; it ignores the mask).

The boundary is traced along pixel edges (vertices on the integer corner grid),
so a mask that already is a polygon with few vertices, such as a rectangle,
comes back unchanged. A vertex's importance is the relevance measure of
discrete curve evolution (Latecki & Lakaemper 1999):
``turn_angle * l1 * l2 / (l1 + l2)``. Only the largest connected component
(4-connectivity, holes filled) is kept: crowd annotators draw one outline per
lesion, and the specks around a lesion would otherwise become triangles.

Example:

```python
mask = np.zeros((32, 32), bool); mask[8:20, 4:28] = True
noisy_mask(mask, "3-vertex", seed=0)   # uint8 0/1, a triangle inside the box
```
"""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from lesionkeras.data import synthetic
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.files import atomic_folder, check_output

LEVELS = ("7-vertex", "3-vertex", "4-axis", "maximal")
_VERTICES = {"7-vertex": 7, "3-vertex": 3}
_MASK_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".gif", ".tif", ".tiff")


def _check_level(level):
    if level not in LEVELS:
        raise ConfigError(f"`level` must be one of {', '.join(LEVELS)}. Received: {level!r}")


def largest_component(mask) -> np.ndarray:
    """The largest 4-connected component of a binary mask, holes filled.

    Args:
        mask: array (H, W). Non-zero = lesion.

    Returns:
        bool array (H, W); all False when the mask is empty.
    """
    mask = np.asarray(mask) != 0
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    # Ties go to the lowest label (the first component in raster order).
    keep = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(keep)


def trace_boundary(mask) -> np.ndarray:
    """Outer boundary of a hole-free component, as polygon corners.

    The polygon runs along pixel edges: pixel (r, c) is the square
    [r, r+1] x [c, c+1] and the vertices are the corners where the boundary
    turns (collinear corners are dropped). Orientation: clockwise on screen.

    Args:
        mask: bool array (H, W) holding one component (see `largest_component`).

    Returns:
        float64 array (N, 2) of (row, col) corners, N >= 4; (0, 2) if empty.
    """
    m = np.pad(np.asarray(mask, bool), 1)
    if not m.any():
        return np.zeros((0, 2))
    inside = m[1:-1, 1:-1]
    # Boundary edges of every lesion pixel, as (start, end) corners in the
    # unpadded frame; each kind is found with one vectorised comparison.
    edges = []
    r, c = np.nonzero(inside & ~m[:-2, 1:-1])  # top: left -> right
    edges.append(np.stack([r, c, r, c + 1], 1))
    r, c = np.nonzero(inside & ~m[1:-1, 2:])  # right: top -> bottom
    edges.append(np.stack([r, c + 1, r + 1, c + 1], 1))
    r, c = np.nonzero(inside & ~m[2:, 1:-1])  # bottom: right -> left
    edges.append(np.stack([r + 1, c + 1, r + 1, c], 1))
    r, c = np.nonzero(inside & ~m[1:-1, :-2])  # left: bottom -> top
    edges.append(np.stack([r + 1, c, r, c], 1))
    edges = np.concatenate(edges)
    nexts = {}
    for r0, c0, r1, c1 in edges.tolist():
        nexts.setdefault((r0, c0), []).append((r1, c1))
    # Start on the top-most, left-most corner: always on the outer boundary.
    start = min(nexts)
    path = [start]
    prev, cur = start, nexts[start][0]
    while cur != start:
        path.append(cur)
        options = nexts[cur]
        if len(options) == 1:
            nxt = options[0]
        # A corner where the lesion touches itself diagonally: on a clockwise
        # walk the left turn hugs the outside, so the outer boundary is kept.
        else:
            d = (cur[0] - prev[0], cur[1] - prev[1])
            left = (-d[1], d[0])
            nxt = next(
                (o for o in options if (o[0] - cur[0], o[1] - cur[1]) == left),
                next(
                    (o for o in options if (o[0] - cur[0], o[1] - cur[1]) == d),
                    options[0],
                ),
            )
        prev, cur = cur, nxt
    pts = np.asarray(path, dtype=np.float64)
    before = pts - np.roll(pts, 1, axis=0)
    after = np.roll(pts, -1, axis=0) - pts
    turning = (before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) != 0
    return pts[turning]


def vertex_importance(poly) -> np.ndarray:
    """Discrete-curve-evolution relevance of every vertex of a closed polygon.

    `turn * l1 * l2 / (l1 + l2)`, with `turn` the turning angle at the vertex
    (0 for collinear, pi for a spike: the more acute the angle between the two
    segments, the larger) and `l1`, `l2` the lengths of its two segments.

    Args:
        poly: array (N, 2) of vertices, N >= 3.

    Returns:
        float64 array (N,).
    """
    poly = np.asarray(poly, np.float64)
    a = poly - np.roll(poly, 1, axis=0)
    b = np.roll(poly, -1, axis=0) - poly
    l1 = np.linalg.norm(a, axis=1)
    l2 = np.linalg.norm(b, axis=1)
    denom = np.maximum(l1 * l2, 1e-12)
    cos = np.clip(np.sum(a * b, axis=1) / denom, -1.0, 1.0)
    turn = np.arccos(cos)
    return turn * l1 * l2 / np.maximum(l1 + l2, 1e-12)


def simplify_polygon(poly, vertices: int, seed: int = 0) -> np.ndarray:
    """Drops the least important vertex until `vertices` remain.

    The result of a smaller `vertices` is always a subset of the result of a
    larger one (same seed): the 3-vertex polygon is a continuation of the
    7-vertex simplification.

    Args:
        poly: array (N, 2) of vertices of a closed polygon.
        vertices: int >= 3. Vertices to keep; a polygon that already has no
            more is returned as it is.
        seed: int. Breaks ties between equally important vertices.

    Returns:
        float64 array (min(N, vertices), 2), in the input order.
    """
    if vertices < 3:
        raise ValueError(f"`vertices` must be >= 3. Received: vertices={vertices}")
    poly = np.asarray(poly, np.float64)
    rng = np.random.default_rng(seed)
    tiebreak = rng.random(len(poly))
    while len(poly) > vertices:
        order = np.lexsort((tiebreak, vertex_importance(poly)))
        drop = order[0]
        poly = np.delete(poly, drop, axis=0)
        tiebreak = np.delete(tiebreak, drop)
    return poly


def fill_polygon(poly, shape) -> np.ndarray:
    """Pixels whose centre lies inside a polygon (even-odd rule).

    Args:
        poly: array (N, 2) of (row, col) vertices on the corner grid (pixel
            (r, c) has its centre at (r + 0.5, c + 0.5)).
        shape: (H, W).

    Returns:
        uint8 array (H, W) of 0/1.
    """
    h, w = shape
    out = np.zeros((h, w), bool)
    poly = np.asarray(poly, np.float64)
    if len(poly) < 3:
        return out.astype(np.uint8)
    y = np.arange(h)[:, None] + 0.5
    x = np.arange(w)[None, :] + 0.5
    for (r1, c1), (r2, c2) in zip(poly, np.roll(poly, -1, axis=0)):
        if r1 == r2:
            continue  # a horizontal edge never crosses a row of centres
        spans = (r1 > y) != (r2 > y)
        cross_x = c1 + (y - r1) * (c2 - c1) / (r2 - r1)
        out ^= spans & (x < cross_x)
    return out.astype(np.uint8)


def noisy_polygon(mask, level: str, seed: int = 0) -> np.ndarray:
    """The noisy annotation polygon of a mask (all levels but `maximal`).

    Args:
        mask: array (H, W). Non-zero = lesion.
        level: str. `7-vertex`, `3-vertex` or `4-axis`.
        seed: int. Tie-breaking seed.

    Returns:
        float64 array (N, 2) of (row, col) corners; (0, 2) for an empty mask.
    """
    _check_level(level)
    if level == "maximal":
        raise ValueError("`maximal` is not a polygon of the lesion; use `noisy_mask`.")
    comp = largest_component(mask)
    if not comp.any():
        return np.zeros((0, 2))
    if level == "4-axis":
        rows = np.nonzero(comp.any(axis=1))[0]
        cols = np.nonzero(comp.any(axis=0))[0]
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        return np.array([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], np.float64)
    return simplify_polygon(trace_boundary(comp), _VERTICES[level], seed=seed)


def default_band(shape) -> int:
    """Width of the empty border of a `maximal` mask: 1/32 of the short side, >= 1."""
    return max(1, round(min(shape) / 32))


def noisy_mask(mask, level: str, seed: int = 0, band: int | None = None) -> np.ndarray:
    """A noisy version of a binary mask at one of the paper's noise levels.

    Args:
        mask: array (H, W). Non-zero = lesion.
        level: str. One of `LEVELS`.
        seed: int. Tie-breaking seed of the simplification.
        band: int or None. Border width left empty by `maximal`. Defaults to
            `default_band(shape)`.

    Returns:
        uint8 array (H, W) of 0/1. An empty mask stays empty (but `maximal`).

    Example:

    >>> m = np.zeros((16, 16), np.uint8); m[4:12, 2:10] = 1
    >>> bool((noisy_mask(m, "7-vertex") == m).all())  # a rectangle stays itself
    True
    """
    _check_level(level)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be 2-D (H, W). Received shape {mask.shape}")
    if level == "maximal":
        band = default_band(mask.shape) if band is None else int(band)
        out = np.zeros(mask.shape, np.uint8)
        out[band : mask.shape[0] - band, band : mask.shape[1] - band] = 1
        return out
    return fill_polygon(noisy_polygon(mask, level, seed), mask.shape)


def read_mask(path) -> np.ndarray:
    """A mask file as bool (H, W): channels averaged, 0/1 or 0/255, cut at 128.

    Raises:
        DataError: the file cannot be read as an image.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.float32)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path}: cannot read mask ({e})") from None
    if arr.max() <= 1.0:
        arr = arr * 255.0
    return arr >= 128.0


def file_seed(seed: int, name: str) -> int:
    """Per-file seed, independent of which other files are processed."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def list_masks(source) -> list[Path]:
    """Mask files of a folder (not recursive, sorted) or a single file."""
    src = Path(source)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DataError(f"{source}: no such file or folder")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _MASK_SUFFIXES)
    if not files:
        raise DataError(f"{source}: no mask images (png, bmp, jpg, gif, tif) in this folder")
    return files


def write_noisy_masks(source, out_dir, level: str, seed: int = 0, band=None, progress=None) -> Path:
    """Writes a noisy 0/255 PNG for every mask of a folder; all or nothing.

    Every output is named after its input with a `.png` suffix and has its
    size. Everything is written into a temporary sibling folder that is
    renamed into place at the end, so `out_dir` is complete or absent.

    Args:
        source: str or Path. Folder of masks, or one mask file.
        out_dir: str or Path. Must not exist, or be empty.
        level: str. One of `LEVELS`.
        seed: int. Seed (each file gets its own, from its name).
        band: int or None. See `noisy_mask`.
        progress: callable or None. Called with the number of files done.

    Returns:
        Path of `out_dir`.

    Raises:
        ConfigError: unknown level.
        DataError: no masks, unreadable masks (all listed), or `out_dir` not empty.
    """
    _check_level(level)
    out = check_output(out_dir, whole=True, empty=True)
    files = list_masks(source)
    names = [f.with_suffix(".png").name for f in files]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{source}: two masks would both be written as {dup}")
    return write_noisy_list(list(zip(files, names)), out, level, seed=seed, band=band,
                            progress=progress)


def write_noisy_list(pairs, out_dir, level: str, seed: int = 0, band=None, progress=None) -> Path:
    """Writes `noisy_mask` of each (mask path, output name) pair into `out_dir`; all or nothing.

    Args:
        pairs: list of (str or Path, str). Input mask file and output PNG name.
        out_dir, level, seed, band, progress: as in `write_noisy_masks`.

    Returns:
        Path of `out_dir`.

    Raises:
        DataError: unreadable masks (all listed) or `out_dir` not empty.
    """
    _check_level(level)
    out = check_output(out_dir, whole=True, empty=True)
    masks, problems = [], []
    for f, _ in pairs:
        try:
            masks.append(read_mask(f))
        except DataError as e:
            problems.append((str(f), str(e).split(": ", 1)[1]))
    if problems:
        raise DataError(f"{problems[0][0]}: {problems[0][1]}", problems)
    with atomic_folder(out) as tmp:
        for i, ((_, name), m) in enumerate(zip(pairs, masks)):
            noisy = noisy_mask(m, level, seed=file_seed(seed, name), band=band)
            Image.fromarray(noisy * np.uint8(255)).save(tmp / name)
            if progress is not None:
                progress(i + 1)
    return out


def _cache_key(*parts):
    return hashlib.sha1("\n".join(map(str, parts)).encode()).hexdigest()[:12]


def simulate_noise(df, level, clean_count, seed):
    """Experiment mode: keeps `clean_count` training images clean, the rest noisy.

    Noisy masks are written once to the cache (`synthetic.cache_root()/noisy-...`)
    and reused by later runs with the same masks, level and seed.

    Args:
        df: manifest with `split` filled.
        level: str. A `noise.LEVELS` entry.
        clean_count: int. Clean training images, chosen at random (seeded).
        seed: int.

    Returns:
        Copy of `df`: `clean` True for the clean training rows and every
        validation row; noisy rows get the cached noisy mask in `mask` and
        keep the true one in `true_mask`.
    """
    df = df.copy()
    train = np.flatnonzero(df["split"].values == "train")
    if not 0 < clean_count < len(train):
        raise ConfigError(
            f"`meta.clean_count` must be between 1 and {len(train) - 1} (the training images "
            f"but one). Received: {clean_count}"
        )
    rng = np.random.default_rng(seed)
    clean_rows = set(rng.choice(train, size=clean_count, replace=False).tolist())
    noisy_rows = [i for i in train if i not in clean_rows]
    masks = [df.at[i, "mask"] for i in noisy_rows]
    key = _cache_key(level, seed, *masks)
    folder = synthetic.cache_root() / f"noisy-{level}-seed{seed}-{key}"
    names = [f"{i:06d}.png" for i in range(len(noisy_rows))]
    if not folder.is_dir():
        write_noisy_list(list(zip(masks, names)), folder, level, seed=seed)
    df["true_mask"] = df["mask"]
    df["clean"] = True
    for i, name in zip(noisy_rows, names):
        df.at[i, "mask"] = str(folder / name)
        df.at[i, "clean"] = False
    return df
