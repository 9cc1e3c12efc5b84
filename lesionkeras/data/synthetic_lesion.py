"""The synthetic lesion's appearance: per-class styles, skin, outline, field of view and lesion colours."""

import numpy as np

from lesionkeras.data.synthetic_paint import (
    _BLACK, _BLUEGREY, _BROWN, _DARK, _DEEP_PINK, _PEARL, _PINK, _PURPLE, _RED, _SKIN_TONES,
    _TAN, _WHITE, _blend, _noise, _smoothstep)

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
