"""Dermoscopic structures of the synthetic dataset: the five ISIC 2018 attributes and the class-specific extras.

Each drawer paints into `img` (weighted by the lesion blend so that it fades
out with the lesion) and returns its region as a bool mask, or None if it
ended up with no pixel inside the lesion.
"""

import numpy as np

from lesionkeras.data.synthetic_paint import (
    _BLACK, _DARK, _MILIA, _PURPLE, _RED, _WHITE, _blend, _curves, _discs, _noise, _smoothstep)


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
