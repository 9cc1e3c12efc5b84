"""Post-processing: morphology golden cases, dense CRF on a synthetic lesion, step parsing."""

import numpy as np
import pytest
from scipy import ndimage

from lesionkeras import postprocess
from lesionkeras.config import PostprocessConfig
from lesionkeras.data import synthetic
from lesionkeras.errors import DataError


def grid(*rows):
    return np.array([[c == "#" for c in r] for r in rows])


RING = grid(".....", ".###.", ".#.#.", ".###.", ".....")
SQUARE = grid(".....", ".###.", ".###.", ".###.", ".....")
# Area 36; components of 1 (corner speck), 2 (bar) and 8 pixels (two blocks touching
# only at a corner: one component under 8-connectivity).
SPECKS = grid(
    "#....#",
    ".....#",
    "##....",
    "##....",
    "..##..",
    "..##..",
)


@pytest.mark.parametrize("mask, expected", [
    (RING, SQUARE),
    (SQUARE, SQUARE),
    (grid("###", "#.#", "#.."), grid("###", "#.#", "#..")),  # open at the border: no hole
    (np.zeros((3, 3), bool), np.zeros((3, 3), bool)),
])
def test_fill_holes(mask, expected):
    np.testing.assert_array_equal(postprocess.fill_holes(mask), expected)


@pytest.mark.parametrize("fraction, expected", [
    (0.0, SPECKS),
    # 0.05 * 36 = 1.8: the single corner pixel goes.
    (0.05, grid(".....#", ".....#", "##....", "##....", "..##..", "..##..")),
    # 0.1 * 36 = 3.6: the 2-pixel bar goes too; the 8-connected 8-pixel chain stays.
    (0.1, grid("......", "......", "##....", "##....", "..##..", "..##..")),
    (0.25, np.zeros((6, 6), bool)),
])
def test_remove_small_components(fraction, expected):
    np.testing.assert_array_equal(postprocess.remove_small_components(SPECKS, fraction), expected)


@pytest.mark.parametrize("mask, expected", [
    (SPECKS, grid("......", "......", "##....", "##....", "..##..", "..##..")),
    (grid("##..", "....", "..##"), grid("##..", "....", "....")),  # tie: the first one
    (np.zeros((2, 2), bool), np.zeros((2, 2), bool)),
])
def test_keep_largest_component(mask, expected):
    np.testing.assert_array_equal(postprocess.keep_largest_component(mask), expected)


def test_morphology_combines_the_steps_per_channel():
    mask = np.zeros((8, 8, 2), bool)
    mask[1:6, 1:6, 0] = RING
    mask[7, 7, 0] = True  # speck: 1/64 of the image
    mask[0:2, 0:2, 1] = True
    mask[4:8, 4:8, 1] = True
    cfg = PostprocessConfig(min_component_fraction=0.02)
    out = postprocess.morphology(mask, cfg)
    expected0 = np.zeros((8, 8), bool)
    expected0[1:6, 1:6] = SQUARE
    np.testing.assert_array_equal(out[..., 0], expected0)
    expected1 = np.zeros((8, 8), bool)
    expected1[4:8, 4:8] = True
    np.testing.assert_array_equal(out[..., 1], expected1)
    # Each switch is honoured.
    off = PostprocessConfig(min_component_fraction=0.0, fill_holes=False, keep_largest=False)
    np.testing.assert_array_equal(postprocess.morphology(mask, off), mask)


@pytest.mark.parametrize("text, steps", [
    ("crf,morph", ("crf", "morph")),
    ("morph, crf", ("crf", "morph")),  # CRF needs probabilities, so it always runs first
    ("morph", ("morph",)),
    ("", ()),
    ("none", ()),
])
def test_parse_steps(text, steps):
    assert postprocess.parse_steps(text) == steps


def test_parse_steps_rejects_unknown():
    with pytest.raises(DataError, match="unknown --postprocess step 'erode'"):
        postprocess.parse_steps("morph,erode")


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_crf_improves_a_blurred_prediction(seed):
    sample = synthetic.make_sample(seed, 0, size=64)
    truth = np.asarray(sample.mask).squeeze() > 0
    # A too-large, blurred prediction (as a low-resolution model gives).
    blurred = ndimage.gaussian_filter(
        ndimage.binary_dilation(truth, iterations=3).astype(np.float32), 4)
    prob = 0.1 + 0.8 * blurred
    before = _dice(prob >= 0.5, truth)
    refined = postprocess.dense_crf(sample.image, prob)
    assert refined.shape == prob.shape and refined.dtype == np.float32
    assert 0.0 <= refined.min() and refined.max() <= 1.0
    after = _dice(refined >= 0.5, truth)
    assert after > before + 0.05, (before, after)

    # apply() = CRF then threshold then morphology, with (H, W, K) maps.
    out_prob, mask = postprocess.apply(("crf", "morph"), sample.image, prob[..., None], 0.5)
    np.testing.assert_allclose(out_prob[..., 0], refined, atol=1e-6)
    assert mask.shape == (64, 64, 1)
    assert _dice(mask[..., 0], truth) >= after - 0.01


def test_crf_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match=r"image.shape=\(8, 8, 3\), prob.shape=\(6, 8, 1\)"):
        postprocess.dense_crf(np.zeros((8, 8, 3), np.uint8), np.zeros((6, 8), np.float32))
