"""Post-processing of probability maps: threshold, morphology, dense CRF, ensembling.

Steps are chosen by name (`--postprocess crf,morph`) and always run in the
order of `STEPS`: the dense CRF refines the probability map using the image
(Krähenbühl & Koltun 2011: a Gaussian smoothness kernel plus a bilateral
appearance kernel that keeps boundaries on colour edges), then the map is
thresholded and morphology cleans the mask (fill holes, drop specks, keep the
largest component: a dermoscopy image shows one lesion). Parameters live in
the `[postprocess]` table of the config (`config.PostprocessConfig`).

Example:

```python
from lesionkeras import postprocess

steps = postprocess.parse_steps("crf,morph")
prob, mask = postprocess.apply(steps, image, prob, threshold=0.5)
```
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lesionkeras.config import PostprocessConfig
from lesionkeras.errors import DataError

STEPS = ("crf", "morph")
# 8-connectivity: pixels touching at a corner belong to the same component.
_CONNECTIVITY = np.ones((3, 3), bool)


def parse_steps(text):
    """Post-processing steps from a comma-separated list (`""`/`none` = no step).

    Returns:
        tuple of step names in the order they run (`STEPS` order).

    Raises:
        DataError: an unknown step name.
    """
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        raise DataError(
            f"unknown --postprocess step {unknown[0]!r} (expected a comma-separated list of "
            f"{', '.join(STEPS)})"
        )
    return tuple(s for s in STEPS if s in names)


def threshold(prob, value=0.5):
    """Boolean mask `prob >= value`."""
    return np.asarray(prob) >= value


def fill_holes(mask):
    """Fills the background regions the mask encloses completely (2-D boolean)."""
    return ndimage.binary_fill_holes(np.asarray(mask, bool))


def remove_small_components(mask, min_fraction):
    """Drops connected components smaller than `min_fraction` of the image area.

    Args:
        mask: 2-D boolean array.
        min_fraction: float >= 0. Fraction of `mask.size`; 0 keeps everything.
    """
    mask = np.asarray(mask, bool)
    if min_fraction <= 0 or not mask.any():
        return mask.copy()
    labels, count = ndimage.label(mask, structure=_CONNECTIVITY)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= min_fraction * mask.size
    keep[0] = False
    return keep[labels]


def keep_largest_component(mask):
    """Keeps only the largest connected component (the first one on a tie)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask.copy()
    labels, _ = ndimage.label(mask, structure=_CONNECTIVITY)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return labels == int(np.argmax(areas))


def morphology(mask, cfg=None):
    """Fill holes, remove small components, keep the largest, as `cfg` switches them.

    Args:
        mask: boolean array `(H, W)` or `(H, W, K)` (each channel on its own).
        cfg: `config.PostprocessConfig` or None (defaults).
    """
    cfg = cfg or PostprocessConfig()
    mask = np.asarray(mask, bool)
    if mask.ndim == 3:
        return np.stack([morphology(mask[..., k], cfg) for k in range(mask.shape[-1])], -1)
    if mask.ndim != 2:
        raise ValueError(f"`mask` must be (H, W) or (H, W, K). Received: shape={mask.shape}")
    # Small specks go first, so a hole-filled speck cannot win `keep_largest`.
    mask = remove_small_components(mask, cfg.min_component_fraction)
    if cfg.fill_holes:
        mask = fill_holes(mask)
    if cfg.keep_largest:
        mask = keep_largest_component(mask)
    return mask


def dense_crf(image, prob, cfg=None):
    """Refines a probability map with a fully connected CRF on the image.

    Each channel is a two-label problem (background, structure) whose unary
    term is the negative log of the map; mean-field inference returns the
    refined probability of the structure.

    Args:
        image: uint8 `(H, W, 3)` RGB image.
        prob: float `(H, W)` or `(H, W, K)` probabilities at the image's size.
        cfg: `config.PostprocessConfig` or None (defaults).

    Returns:
        float32 array of `prob`'s shape.
    """
    import pydensecrf.densecrf as dcrf

    cfg = cfg or PostprocessConfig()
    # A writable C-ordered copy: the CRF library refuses read-only buffers (e.g. tensor views).
    image = np.array(image, np.uint8, order="C", copy=True)
    prob = np.asarray(prob, np.float32)
    squeeze = prob.ndim == 2
    prob = prob[..., None] if squeeze else prob
    if image.ndim != 3 or image.shape[-1] != 3 or image.shape[:2] != prob.shape[:2]:
        raise ValueError(
            "`image` must be (H, W, 3) at the size of `prob`. "
            f"Received: image.shape={image.shape}, prob.shape={prob.shape}"
        )
    h, w = prob.shape[:2]
    out = np.empty_like(prob)
    for k in range(prob.shape[-1]):
        p = np.clip(prob[..., k], 1e-5, 1 - 1e-5)
        unary = -np.log(np.stack([1 - p, p]).reshape(2, -1))
        crf = dcrf.DenseCRF2D(w, h, 2)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
        crf.addPairwiseGaussian(sxy=cfg.crf_gaussian_sxy, compat=cfg.crf_gaussian_compat)
        crf.addPairwiseBilateral(sxy=cfg.crf_bilateral_sxy, srgb=cfg.crf_bilateral_srgb,
                                 rgbim=image, compat=cfg.crf_bilateral_compat)
        q = np.asarray(crf.inference(cfg.crf_iterations), np.float32).reshape(2, h, w)
        out[..., k] = q[1]
    return out[..., 0] if squeeze else out


def apply(steps, image, prob, threshold_value=0.5, cfg=None):
    """Runs the chosen steps on one map.

    Args:
        steps: sequence of step names (see `parse_steps`).
        image: uint8 `(H, W, 3)` image (used by `crf`).
        prob: float `(H, W, K)` probability map at the image's size.
        threshold_value: float. Probability threshold of the mask.
        cfg: `config.PostprocessConfig` or None (defaults).

    Returns:
        (prob, mask): the (CRF-refined) probabilities and the final boolean mask.
    """
    prob = np.asarray(prob, np.float32)
    if "crf" in steps:
        prob = dense_crf(image, prob, cfg)
    mask = threshold(prob, threshold_value)
    if "morph" in steps:
        mask = morphology(mask, cfg)
    return prob, mask


def average(maps, weights=None):
    """Ensembling: the (weighted) mean of several probability maps of one image."""
    maps = np.stack([np.asarray(m, np.float32) for m in maps])
    return np.average(maps, axis=0, weights=weights).astype(np.float32)
