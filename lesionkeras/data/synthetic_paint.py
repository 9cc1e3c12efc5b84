"""Painting primitives of the synthetic dataset: palette, smooth noise, anti-aliased discs and curves, blending.

Like `synthetic`, it depends only on numpy, so that data can be prepared
without importing TensorFlow.
"""

import functools

import numpy as np

# Light to dark skin (RGB); a tone is interpolated between neighbours.
_SKIN_TONES = np.array(
    [[243, 214, 198], [230, 188, 165], [210, 156, 124], [172, 118, 88], [120, 82, 62]],
    dtype=np.float32,
)

# Melanin absorbs blue most, so brown pigments are multiplicative
# transmissions of the skin tone; they then stay visible on any skin.
_TAN = (0.80, 0.66, 0.58)
_BROWN = (0.60, 0.44, 0.36)
_DARK = (0.38, 0.26, 0.22)
_BLACK = (0.22, 0.16, 0.15)
# Non-melanin colours (blood, collagen, deep pigment) are absolute colours
# mixed into the skin.
_BLUEGREY = (95, 110, 140)
_PINK = (232, 150, 152)
_DEEP_PINK = (214, 116, 128)
_PEARL = (238, 200, 198)
_RED = (196, 62, 76)
_PURPLE = (112, 40, 84)
_WHITE = (242, 234, 226)
_MILIA = (250, 244, 204)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@functools.lru_cache(maxsize=32)
def _grid(size):
    yy, xx = np.indices((size, size), dtype=np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


@functools.lru_cache(maxsize=64)
def _interp_matrix(size, cells):
    # Gaussian weights from a coarse lattice to the pixels. Smooth noise is
    # then W @ G @ W.T: two small matrix products instead of filtering a
    # full-resolution field, and the feature scale is relative to the image,
    # so a sample looks alike at every size.
    nodes = np.linspace(-0.5, size - 0.5, cells, dtype=np.float64)
    spacing = nodes[1] - nodes[0]
    px = np.arange(size, dtype=np.float64)
    w = np.exp(-0.5 * ((px[:, None] - nodes[None, :]) / (0.7 * spacing)) ** 2)
    w /= w.sum(axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def _noise(rng, size, cells):
    """Smooth random field with zero mean and unit standard deviation.

    Args:
        rng: np.random.Generator.
        size: int, side of the square field.
        cells: int, lattice nodes per side; features are about size/cells px.

    Returns:
        (size, size) float32 array.
    """
    cells = max(2, int(cells))
    w = _interp_matrix(size, cells)
    grid = rng.standard_normal((cells, cells), dtype=np.float32)
    # einsum rather than `@`: these products are too small for BLAS, and a
    # multithreaded BLAS made them up to 50x slower on a 2-core machine.
    field = np.einsum("ij,kj->ik", np.einsum("ij,jk->ik", w, grid), w)
    field -= field.mean()
    field /= field.std() + 1e-6
    return field


def _discs(size, centres, radii):
    """Anti-aliased coverage (max over discs) of a few discs.

    Args:
        size: int, image side.
        centres: (n, 2) array of (y, x) pixel coordinates.
        radii: (n,) array of radii in pixels.

    Returns:
        (size, size) float32 coverage in [0, 1].
    """
    cover = np.zeros((size, size), np.float32)
    axis = np.arange(size, dtype=np.float32)
    # A loop over a handful of discs, each touching only its bounding box, is
    # cheaper than broadcasting every disc over the whole image.
    for (cy, cx), r in zip(centres, radii):
        y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, size)
        x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, size)
        if y0 >= y1 or x0 >= x1:
            continue
        d = np.hypot(axis[y0:y1, None] - cy, axis[None, x0:x1] - cx)
        np.maximum(cover[y0:y1, x0:x1], np.clip(r + 0.5 - d, 0.0, 1.0), out=cover[y0:y1, x0:x1])
    return cover


def _curves(rng, size, count, width, length):
    """Anti-aliased coverage of random quadratic Bezier curves.

    Args:
        rng: np.random.Generator.
        size: int, image side.
        count: int, number of curves.
        width: (lo, hi) stroke width range in pixels.
        length: (lo, hi) chord length range as a fraction of `size`.

    Returns:
        (size, size) float32 coverage in [0, 1].
    """
    if count == 0:
        return np.zeros((size, size), np.float32)
    points, weights = [], []
    for _ in range(count):
        p0 = rng.uniform(-0.1, 1.1, 2) * size
        angle = rng.uniform(0.0, 2.0 * np.pi)
        chord = rng.uniform(*length) * size
        direction = np.array([np.cos(angle), np.sin(angle)])
        p2 = p0 + chord * direction
        normal = np.array([-direction[1], direction[0]])
        p1 = 0.5 * (p0 + p2) + rng.uniform(-0.35, 0.35) * chord * normal
        n = int(chord * 3) + 2
        t = np.linspace(0.0, 1.0, n)[:, None]
        p = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        step = np.hypot(*np.diff(p, axis=0).T).sum() / (n - 1)
        points.append(p)
        # Each sample stands for step x width of ink; splatting that area
        # bilinearly gives anti-aliased strokes whose darkness does not
        # depend on the sampling density.
        weights.append(np.full(n, step * rng.uniform(*width)))
    p = np.concatenate(points)
    wt = np.concatenate(weights)
    x0 = np.floor(p[:, 0]).astype(np.int64)
    y0 = np.floor(p[:, 1]).astype(np.int64)
    fx = p[:, 0] - x0
    fy = p[:, 1] - y0
    canvas = np.zeros(size * size, np.float64)
    for dy, dx, wk in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                       (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        yi, xi = y0 + dy, x0 + dx
        ok = (yi >= 0) & (yi < size) & (xi >= 0) & (xi < size)
        canvas += np.bincount(yi[ok] * size + xi[ok], weights=(wt * wk)[ok], minlength=size * size)
    return np.minimum(canvas, 1.0).astype(np.float32).reshape(size, size)


def _blend(img, colour, weight):
    """In place: img = img * (1 - weight) + colour * weight."""
    img += (np.asarray(colour, np.float32) - img) * weight[..., None]
