"""Built-in synthetic dermoscopy dataset.

Generates dermoscopy-like images of skin lesions together with their exact
lesion masks, the five ISIC 2018 Task 2 dermoscopic attribute masks and an
ISIC 2018 Task 3 diagnosis, and can write them in the ISIC 2018 folder
layouts. It lets the package be trained, tested and demonstrated without
downloading the real (licensed, multi-gigabyte) ISIC archive.

Every sample is a pure function of `(seed, index, size)`: the generator is
seeded with both numbers, so sample `i` is identical whatever the size of the
dataset it belongs to.

The module deliberately depends only on numpy, pillow and scipy, so that data
can be prepared without importing TensorFlow.
"""

import csv
import dataclasses
import functools
import os
import pathlib
import shutil

import numpy as np
from PIL import Image

from lesionkeras.data.classes import ATTRIBUTES, DIAGNOSES
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

# Per-class appearance statistics.
#   area: range of the lesion area as a fraction of the image (log-uniform).
#   irregular: amplitude of the low Fourier harmonics of the outline.
#   rough: amplitude of the fine border wobble (harmonics 6-16).
#   elong: largest aspect ratio of the lesion.
#   blur: range of the border blend half-width, in pixels at 64 px.
#   attrs: probability that each of ATTRIBUTES is present.
_STYLES = {
    "MEL": dict(area=(0.06, 0.85), irregular=(0.10, 0.26), rough=(0.02, 0.05), elong=1.6,
                blur=(0.8, 2.5), attrs=(0.35, 0.10, 0.35, 0.60, 0.45)),
    "NV": dict(area=(0.03, 0.55), irregular=(0.02, 0.09), rough=(0.005, 0.02), elong=1.4,
               blur=(0.8, 2.0), attrs=(0.40, 0.20, 0.08, 0.80, 0.08)),
    "BCC": dict(area=(0.03, 0.45), irregular=(0.06, 0.16), rough=(0.01, 0.03), elong=1.5,
                blur=(1.0, 2.5), attrs=(0.15, 0.15, 0.04, 0.06, 0.08)),
    "AKIEC": dict(area=(0.05, 0.60), irregular=(0.06, 0.16), rough=(0.02, 0.04), elong=1.6,
                  blur=(1.2, 3.0), attrs=(0.05, 0.20, 0.04, 0.10, 0.03)),
    "BKL": dict(area=(0.05, 0.65), irregular=(0.04, 0.14), rough=(0.01, 0.03), elong=1.6,
                blur=(0.6, 1.8), attrs=(0.10, 0.60, 0.05, 0.30, 0.05)),
    "DF": dict(area=(0.02, 0.12), irregular=(0.02, 0.08), rough=(0.005, 0.02), elong=1.3,
               blur=(1.0, 2.2), attrs=(0.10, 0.10, 0.20, 0.60, 0.03)),
    "VASC": dict(area=(0.02, 0.30), irregular=(0.03, 0.10), rough=(0.005, 0.015), elong=1.4,
                 blur=(0.5, 1.2), attrs=(0.05, 0.05, 0.02, 0.02, 0.03)),
}

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


# --------------------------------------------------------------------------
# Image layers


def _skin(rng, size, yy, xx):
    """Skin tone and background: shading plus texture at two scales."""
    pos = rng.beta(1.5, 2.4) * (len(_SKIN_TONES) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(_SKIN_TONES) - 1)
    tone = _SKIN_TONES[lo] + (pos - lo) * (_SKIN_TONES[hi] - _SKIN_TONES[lo])
    tone = tone * rng.uniform(0.95, 1.05, 3).astype(np.float32)

    gy, gx = rng.normal(0.0, 0.06, 2)
    shade = (
        rng.uniform(0.03, 0.08) * _noise(rng, size, 3)
        + (gy * (yy / size - 0.5) + gx * (xx / size - 0.5))
        + rng.uniform(0.01, 0.03) * _noise(rng, size, 12)
        + rng.uniform(0.015, 0.035) * _noise(rng, size, 32)
    )
    skin = tone[None, None, :] * (1.0 + shade)[..., None]
    # Patchy erythema: skin is redder here and there.
    red = rng.uniform(0.0, 8.0) * _noise(rng, size, 5)
    skin += red[..., None] * np.array([1.0, -0.5, -0.4], np.float32)
    return skin.astype(np.float32), tone.astype(np.float32)


class _Shape:
    """Lesion geometry: blend weight and polar coordinates."""

    def __init__(self, rng, style, size, yy, xx):
        s = size / 64.0
        area = np.exp(rng.uniform(*np.log(style["area"])))
        r0 = np.sqrt(area / np.pi) * size
        elong = rng.uniform(1.0, style["elong"])
        sx, sy = np.sqrt(elong), 1.0 / np.sqrt(elong)
        rot = rng.uniform(0.0, np.pi)
        # Small lesions wander further from the centre than large ones, which
        # dermatologists centre in the field of view.
        reach = max(0.0, 0.5 * size - r0 * sx) * 0.6 + 0.04 * size
        self.cy, self.cx = 0.5 * size + rng.uniform(-reach, reach, 2)

        # Radius as a function of angle: a few low harmonics give the overall
        # asymmetry, higher ones a wobbly border.
        k = np.arange(1, 17)
        amp = np.where(k <= 5, rng.uniform(*style["irregular"]), rng.uniform(*style["rough"]))
        amp = amp * rng.uniform(0.3, 1.0, k.size) / k**0.5
        amp[0] *= 0.4  # the first harmonic only shifts the lesion
        amp *= min(1.0, 0.6 / amp.sum())  # keep the radius positive
        phase = rng.uniform(0.0, 2.0 * np.pi, k.size)
        table_t = np.linspace(-np.pi, np.pi, 361)
        table_r = r0 * (1.0 + (amp * np.cos(np.outer(table_t, k) + phase)).sum(axis=1))

        dy, dx = yy - self.cy, xx - self.cx
        c, sn = np.cos(rot), np.sin(rot)
        u = (dx * c + dy * sn) / sx
        v = (-dx * sn + dy * c) / sy
        self.rho = np.hypot(u, v)
        self.theta = np.arctan2(v, u)
        self.radius = np.interp(self.theta, table_t, table_r).astype(np.float32)
        self.rho_rel = self.rho / self.radius  # 0 at the centre, 1 on the border
        self.depth = np.clip(1.0 - self.rho_rel, 0.0, 1.0)
        self.r0 = r0
        # Signed distance (px, approx.) to the border, positive inside.
        inside = self.radius - self.rho
        half_width = rng.uniform(*style["blur"]) * s
        self.alpha = _smoothstep(0.5 + inside / (2.0 * half_width))


def _vignette(rng, size, yy, xx):
    """Field of view of the dermoscope: 1 inside, 0 in the dark corners."""
    s = size / 64.0
    kind = rng.random()
    if kind < 0.3:
        return None, 0.0
    radius = rng.uniform(0.62, 0.78) if kind < 0.65 else rng.uniform(0.5, 0.66)
    cy, cx = 0.5 + rng.normal(0.0, 0.03, 2)
    ay = rng.uniform(0.9, 1.1)
    e = np.hypot((yy / size - cy) / ay, (xx / size - cx) * ay)
    soft = rng.uniform(1.0, 4.0) * s
    vis = _smoothstep(0.5 + (radius - e) * size / (2.0 * soft))
    return vis.astype(np.float32), rng.uniform(4.0, 30.0)


def _lesion_colours(diag, tone, rng):
    """Colours of the lesion rim and core, and of its blotches."""

    def pig(t):
        return tone * np.asarray(t, np.float32) * rng.uniform(0.92, 1.08)

    def mix(colour, lo, hi):
        m = rng.uniform(lo, hi)
        return tone * (1 - m) + np.asarray(colour, np.float32) * m

    blotches = []  # (colour, amount, noise threshold)
    if diag == "MEL":
        rim = pig(_TAN if rng.random() < 0.4 else _BROWN)
        core = pig(_DARK if rng.random() < 0.6 else _BLACK)
        core_at = rng.uniform(0.15, 0.5)
        if rng.random() < 0.75:
            blotches.append((mix(_BLUEGREY, 0.6, 0.9), rng.uniform(0.6, 0.95), rng.uniform(0.2, 1.0)))
        if rng.random() < 0.3:
            blotches.append((mix(_RED, 0.4, 0.7), rng.uniform(0.4, 0.8), rng.uniform(0.5, 1.2)))
        if rng.random() < 0.25:
            blotches.append((mix(_WHITE, 0.5, 0.8), rng.uniform(0.4, 0.8), rng.uniform(0.7, 1.3)))
    elif diag == "NV":
        rim = pig(_TAN)
        core = pig(_BROWN if rng.random() < 0.7 else _DARK)
        core_at = rng.uniform(0.2, 0.6)
        if rng.random() < 0.2:
            blotches.append((pig(_DARK), rng.uniform(0.3, 0.6), rng.uniform(0.8, 1.4)))
    elif diag == "BCC":
        rim = mix(_PINK, 0.55, 0.85)
        core = mix(_DEEP_PINK, 0.6, 0.9)
        core_at = rng.uniform(0.2, 0.6)
        if rng.random() < 0.85:
            blotches.append((mix(_BLUEGREY, 0.7, 0.95), rng.uniform(0.7, 1.0), rng.uniform(0.5, 1.3)))
        if rng.random() < 0.5:  # shiny white areas
            blotches.append((mix(_PEARL, 0.7, 0.9), rng.uniform(0.5, 0.8), rng.uniform(0.6, 1.2)))
    elif diag == "AKIEC":
        rim = mix(_PINK, 0.6, 0.85)
        core = mix(_RED, 0.45, 0.7)
        core_at = rng.uniform(0.2, 0.6)
    elif diag == "BKL":
        rim = pig((0.84, 0.72, 0.64))
        core = pig((0.66, 0.52, 0.44) if rng.random() < 0.8 else _BROWN)
        core_at = rng.uniform(0.1, 0.5)
        if rng.random() < 0.3:
            blotches.append((pig(_TAN), rng.uniform(0.4, 0.8), rng.uniform(0.3, 1.0)))
    elif diag == "DF":
        # A brown ring around a whitish scar-like centre.
        rim = pig(_BROWN)
        core = mix(_WHITE, 0.7, 0.9)
        core_at = rng.uniform(0.35, 0.6)
    else:  # VASC
        rim = mix(_RED, 0.8, 0.95)
        core = mix(_PURPLE, 0.6, 0.9)
        core_at = rng.uniform(0.2, 0.6)
    return rim, core, core_at, blotches


def _lesion_body(rng, diag, shape, tone, size):
    """Colour of the lesion everywhere (used where the blend weight is > 0)."""
    rim, core, core_at, blotches = _lesion_colours(diag, tone, rng)
    # The noise makes the core eccentric and ragged rather than concentric.
    core_w = _smoothstep((shape.depth + 0.2 * _noise(rng, size, 5) - core_at) / 0.35)
    body = rim + (core - rim) * core_w[..., None]
    for colour, amount, threshold in blotches:
        _blend(body, colour, amount * _smoothstep((_noise(rng, size, 7) - threshold) / 0.6))
    # BKL (seborrhoeic keratosis) has a coarse, cerebriform surface.
    coarse = rng.uniform(0.06, 0.12) if diag == "BKL" else rng.uniform(0.02, 0.05)
    tex = coarse * _noise(rng, size, 14) + rng.uniform(0.02, 0.05) * _noise(rng, size, 30)
    body *= (1.0 + tex)[..., None]
    return body


# --------------------------------------------------------------------------
# Dermoscopic structures. Each draws into `img` (weighted by the lesion blend
# so that it fades out with the lesion) and returns its region as a bool
# mask, or None if it ended up with no pixel inside the lesion.


def _patch(rng, size, shape, mask):
    """Soft patch covering part (40-100 %) of the lesion, and its mask."""
    weight = _smoothstep((_noise(rng, size, 4) - rng.uniform(-1.5, 0.3)) / 0.8)
    region = (weight >= 0.5) & mask
    return weight * shape.alpha, region


def _network(rng, size, yy, xx, period, line_width):
    """Coverage of the walls of a warped Voronoi tessellation: a reticulum.

    Cell centres sit on a jittered lattice; a pixel's distance to the wall
    between its two nearest centres is about half the difference of their
    distances, which only needs the 3 x 3 neighbouring lattice cells.
    """
    a = rng.uniform(0.0, np.pi)
    c, sn = np.cos(a), np.sin(a)
    u = (xx * c + yy * sn) / period + 0.25 * _noise(rng, size, 8)
    v = (-xx * sn + yy * c) / period + 0.25 * _noise(rng, size, 8)
    u -= np.floor(u.min()) - 1
    v -= np.floor(v.min()) - 1
    iu, iv = np.floor(u).astype(np.intp), np.floor(v).astype(np.intp)
    n = int(max(iu.max(), iv.max())) + 3
    jitter = rng.uniform(0.1, 0.9, (2, n, n)).astype(np.float32)
    d1 = np.full(u.shape, np.inf, np.float32)
    d2 = np.full(u.shape, np.inf, np.float32)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            cu, cv = iu + du, iv + dv
            d = np.hypot(cu + jitter[0, cu, cv] - u, cv + jitter[1, cu, cv] - v)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    dist = 0.5 * (d2 - d1) * period
    lines = np.clip(0.5 * line_width + 0.5 - dist, 0.0, 1.0)
    # Real networks are patchy: some segments faint, some broken.
    return lines * np.clip(0.75 + 0.35 * _noise(rng, size, 10), 0.0, 1.0)


def _draw_pigment_network(rng, img, ctx):
    weight, region = _patch(rng, ctx.size, ctx.shape, ctx.mask)
    if not region.any():
        return None
    lines = _network(rng, ctx.size, ctx.yy, ctx.xx, rng.uniform(3.5, 5.0) * ctx.s, rng.uniform(0.6, 1.0) * ctx.s)
    colour = ctx.tone * np.asarray(_BLACK, np.float32) * rng.uniform(1.0, 1.6)
    _blend(img, colour, rng.uniform(0.35, 0.65) * lines * weight)
    return region


def _draw_negative_network(rng, img, ctx):
    weight, region = _patch(rng, ctx.size, ctx.shape, ctx.mask)
    if not region.any():
        return None
    lines = _network(rng, ctx.size, ctx.yy, ctx.xx, rng.uniform(4.5, 6.5) * ctx.s, rng.uniform(1.0, 1.5) * ctx.s)
    # Dark holes inside light, serpiginous lines.
    img *= (1.0 - 0.3 * (1.0 - lines) * weight)[..., None]
    light = 0.5 * ctx.tone + 0.5 * np.asarray(_WHITE, np.float32)
    _blend(img, light, rng.uniform(0.5, 0.8) * lines * weight)
    return region


def _spots(rng, ctx, count, radius, min_depth):
    """Random disc centres inside the lesion, clustered in a patch."""
    candidates = np.flatnonzero(ctx.mask.ravel() & (ctx.shape.depth.ravel() >= min_depth))
    if candidates.size == 0:
        return None, None
    # Clustering around a focus keeps the region compact, like ISIC areas.
    focus = candidates[rng.integers(candidates.size)]
    fy, fx = divmod(focus, ctx.size)
    cy, cx = np.divmod(candidates, ctx.size)
    spread = rng.uniform(0.3, 1.0) * ctx.shape.r0
    near = np.exp(-0.5 * ((cy - fy) ** 2 + (cx - fx) ** 2) / spread**2)
    picked = rng.choice(candidates, size=count, p=near / near.sum())
    py, px = np.divmod(picked, ctx.size)
    jitter = rng.uniform(-0.5, 0.5, (count, 2))
    centres = np.stack([py, px], axis=1) + jitter
    radii = rng.uniform(*radius, count) * ctx.s
    return centres, radii


def _draw_globules(rng, img, ctx):
    centres, radii = _spots(rng, ctx, int(rng.integers(3, 13)), (0.8, 1.5), 0.1)
    if centres is None:
        return None
    cover = _discs(ctx.size, centres, radii)
    colour = ctx.tone * np.asarray(_DARK if rng.random() < 0.6 else _BLACK, np.float32)
    _blend(img, colour, 0.9 * cover * ctx.shape.alpha)
    # Annotators outline the area of the globules, a little wider than them.
    region = (_discs(ctx.size, centres, radii + 0.8 * ctx.s) >= 0.5) & ctx.mask
    return region if region.any() else None


def _draw_milia(rng, img, ctx):
    centres, radii = _spots(rng, ctx, int(rng.integers(1, 7)), (0.8, 1.8), 0.05)
    if centres is None:
        return None
    cover = _discs(ctx.size, centres, radii)
    _blend(img, _MILIA, rng.uniform(0.7, 0.95) * cover * ctx.shape.alpha)
    region = (_discs(ctx.size, centres, radii + 0.5 * ctx.s) >= 0.5) & ctx.mask
    return region if region.any() else None


def _draw_streaks(rng, img, ctx):
    shape = ctx.shape
    inner = rng.uniform(0.45, 0.7)
    if rng.random() < 0.2:
        sector = np.ones_like(shape.theta)  # regular streaks all round (starburst)
    else:
        offset = np.angle(np.exp(1j * (shape.theta - rng.uniform(-np.pi, np.pi))))
        sector = _smoothstep((rng.uniform(0.5, 1.5) - np.abs(offset)) / 0.3)
    ring = _smoothstep((shape.rho_rel - inner) / 0.1)
    region = (sector >= 0.5) & (shape.rho_rel >= inner) & ctx.mask
    if not region.any():
        return None
    # Radial lines: distance in px to the nearest of `n` evenly spaced rays,
    # with a warp so that they are not perfectly straight.
    n = int(rng.integers(14, 30))
    turns = (shape.theta + 0.12 * _noise(rng, ctx.size, 6)) * n / (2 * np.pi) + rng.random()
    dist = np.abs(turns - np.round(turns)) * 2 * np.pi * shape.rho / n
    lines = np.clip(0.5 * rng.uniform(0.8, 1.3) * ctx.s + 0.5 - dist, 0.0, 1.0)
    colour = ctx.tone * np.asarray(_BLACK, np.float32) * rng.uniform(1.0, 1.5)
    _blend(img, colour, 0.85 * lines * sector * ring * shape.alpha)
    return region


_DRAWERS = {
    "globules": _draw_globules,
    "milia_like_cyst": _draw_milia,
    "negative_network": _draw_negative_network,
    "pigment_network": _draw_pigment_network,
    "streaks": _draw_streaks,
}


def _draw_class_extras(rng, img, diag, ctx):
    """Class-specific structures that are not ISIC attributes."""
    shape = ctx.shape
    if diag == "VASC":
        # Red-purple lacunae.
        centres, radii = _spots(rng, ctx, int(rng.integers(4, 14)), (1.0, 2.4), 0.1)
        if centres is not None:
            cover = _discs(ctx.size, centres, radii)
            _blend(img, np.asarray(_PURPLE, np.float32) * rng.uniform(0.9, 1.3), 0.7 * cover * shape.alpha)
    elif diag == "BCC" and rng.random() < 0.6:
        # Arborising vessels: thin red curves.
        vessels = _curves(rng, ctx.size, int(rng.integers(1, 4)), (0.6 * ctx.s, 1.0 * ctx.s), (0.1, 0.4))
        _blend(img, _RED, 0.8 * vessels * shape.alpha)
    elif diag == "AKIEC":
        # Whitish scale: sparse bright speckles.
        speckle = _smoothstep((_noise(rng, ctx.size, 40) - rng.uniform(0.8, 1.4)) / 0.6)
        _blend(img, _WHITE, rng.uniform(0.4, 0.7) * speckle * shape.alpha)


class _Context:
    """What the structure drawers need about the image being built."""

    def __init__(self, size, yy, xx, shape, mask, tone):
        self.size, self.s = size, size / 64.0
        self.yy, self.xx = yy, xx
        self.shape, self.mask, self.tone = shape, mask, tone


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
    any error.

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
        DataError: `out_dir` exists and is not an empty folder.
    """
    _check_positive_int("count", count, 1)
    _check_positive_int("size", size, 16)
    _check_positive_int("seed", seed, 0)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out_dir}: output folder exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed run that had our pid
    try:
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
        if out.exists():
            out.rmdir()  # empty (checked above); renaming onto a folder is not portable
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
