"""HD95 and ASSD (`metrics.boundary`): hand-derived golden cases and a brute-force reference."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from lesionkeras.metrics import boundary_scores, check_spacing, surface, surface_distances

SQRT5, SQRT8 = math.sqrt(5), math.sqrt(8)


def _square(shape, top, left, side):
    m = np.zeros(shape, bool)
    m[top : top + side, left : left + side] = True
    return m


# ----------------------------------------------------------------------------- surface


def test_surface_of_a_square_is_its_ring():
    m = _square((7, 7), 2, 2, 3)
    expected = m.copy()
    expected[3, 3] = False
    np.testing.assert_array_equal(surface(m), expected)


def test_surface_uses_4_neighbours():
    # A plus sign: the centre's four 4-neighbours are all inside, so it is interior
    # although its diagonal neighbours are outside.
    plus = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    padded = np.pad(plus, 1)
    expected = np.pad(np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool), 1)
    np.testing.assert_array_equal(surface(padded), expected)


def test_image_edge_is_surface():
    full = np.ones((4, 5), bool)
    expected = full.copy()
    expected[1:3, 1:4] = False
    np.testing.assert_array_equal(surface(full), expected)
    assert surface(np.ones((1, 1))).sum() == 1


# ----------------------------------------------------------------------------- golden


def test_identical_masks_score_zero():
    m = _square((20, 20), 3, 4, 9)
    assert boundary_scores(m, m) == {"hd95": 0.0, "assd": 0.0}


def test_square_shifted_by_three_pixels():
    """10x10 square, the same shifted 3 columns right.

    From each surface pixel of A to B's surface (B's is A's mirrored): the top and
    bottom rows give 0 (7 pixels each) and 3, 2, 1 (the 3 left of B); the left
    column's 8 inner pixels 3 each; the right column's 8 inner pixels, min(row,
    9 - row, 3): 1, 2, 3, 3, 3, 3, 2, 1. Per direction: 14 zeros, 4 ones, 4 twos,
    14 threes over 36 pixels, sum 54. Pooled: mean 1.5; 72 values with 28 threes
    on top, so the 95th percentile (rank 67.45 of 0..71) is 3.
    """
    a = _square((16, 20), 3, 2, 10)
    b = np.roll(a, 3, axis=1)
    d_ab, d_ba = surface_distances(a, b)
    assert sorted(d_ab) == sorted([0] * 14 + [1] * 4 + [2] * 4 + [3] * 14)
    assert sorted(d_ba) == sorted(d_ab)
    assert boundary_scores(a, b) == pytest.approx({"hd95": 3.0, "assd": 1.5})
    # Shifting rows instead of columns is the transposed problem.
    assert boundary_scores(a.T, b.T) == pytest.approx({"hd95": 3.0, "assd": 1.5})


def test_concentric_squares():
    """A 9x9 square around a 5x5 one, 2 pixels apart on every side.

    Inner ring (16 pixels) to the outer: 2 each. Outer ring (32 pixels) to the
    inner: 2 for the 5 pixels of each side facing it (20), sqrt(1 + 4) for the
    next 2 per side (8), sqrt(4 + 4) for the 4 corners. Pooled: 48 values, 36 of
    them 2; mean (72 + 8 sqrt5 + 4 sqrt8) / 48; the 95th percentile, rank 44.65
    of 0..47, falls among the four corners (ranks 44-47): sqrt8.
    """
    outer = _square((15, 15), 3, 3, 9)
    inner = _square((15, 15), 5, 5, 5)
    d_out, d_in = surface_distances(outer, inner)
    np.testing.assert_allclose(np.sort(d_in), [2.0] * 16)
    np.testing.assert_allclose(np.sort(d_out), [2.0] * 20 + [SQRT5] * 8 + [SQRT8] * 4)
    got = boundary_scores(outer, inner)
    assert got["hd95"] == pytest.approx(SQRT8)
    assert got["assd"] == pytest.approx((72 + 8 * SQRT5 + 4 * SQRT8) / 48)
    # Not the mean of the two directed means (older medpy releases), in which each
    # surface pixel of the shorter outline weighs more.
    mean_of_means = ((40 + 8 * SQRT5 + 4 * SQRT8) / 32 + 2.0) / 2
    assert abs(got["assd"] - mean_of_means) > 0.02
    assert boundary_scores(inner, outer) == pytest.approx(got)  # symmetric


def test_hd95_is_the_pooled_percentile_not_the_larger_directed_one():
    """A 10x10 square; the prediction adds a 3-pixel false line 5 pixels to its right.

    Pooled: 72 zeros and three 5s; the 95th percentile (rank 70.3 of 0..74) is 0.
    The larger directed 95th percentile (MONAI, surface-distance) would be 5: the
    prediction's own 39 distances hold three 5s at ranks 36-38, rank 36.1 wanted.
    """
    truth = _square((20, 24), 4, 2, 10)
    pred = truth.copy()
    pred[8:11, 16] = True  # 5 columns right of the square's last column (11)
    d_tp, d_pt = surface_distances(truth, pred)
    assert np.count_nonzero(d_tp) == 0 and sorted(d_pt)[-3:] == [5.0] * 3
    got = boundary_scores(truth, pred)
    assert got["hd95"] == 0.0
    assert got["assd"] == pytest.approx(15 / 75)
    assert np.percentile(d_pt, 95) == 5.0  # what the other definition would report


def test_empty_masks():
    empty = np.zeros((8, 8), bool)
    lesion = _square((8, 8), 2, 2, 3)
    assert boundary_scores(empty, empty) == {"hd95": 0.0, "assd": 0.0}
    both = boundary_scores(empty, empty, spacing=0.1)
    assert both == {"hd95": 0.0, "assd": 0.0, "hd95_mm": 0.0, "assd_mm": 0.0}
    for truth, pred in ((empty, lesion), (lesion, empty)):
        got = boundary_scores(truth, pred, spacing=0.1)
        assert set(got) == {"hd95", "assd", "hd95_mm", "assd_mm"}
        assert all(math.isnan(v) for v in got.values())
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, lesion)


# ----------------------------------------------------------------------------- spacing


def test_isotropic_spacing_scales_pixels():
    a = _square((16, 20), 3, 2, 10)
    got = boundary_scores(a, np.roll(a, 3, axis=1), spacing=0.02)
    assert got == pytest.approx({"hd95": 3.0, "assd": 1.5, "hd95_mm": 0.06, "assd_mm": 0.03})


def test_single_pixels_with_anisotropic_spacing():
    """Rows 2 mm apart, columns 0.5 mm: an offset of (3, 4) pixels is sqrt(6^2 + 2^2) mm."""
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[0, 0] = b[3, 4] = True
    got = boundary_scores(a, b, spacing=(2.0, 0.5))
    assert got["hd95"] == pytest.approx(5.0) and got["assd"] == pytest.approx(5.0)
    assert got["hd95_mm"] == pytest.approx(math.sqrt(40)) and got["assd_mm"] == pytest.approx(math.sqrt(40))


def test_anisotropic_spacing_changes_the_nearest_pixel():
    """A = {(0, 0)}; B = {(0, 3), (2, 0)}; rows 2 mm apart, columns 0.5 mm.

    Pixels: A -> B is 2 (to (2, 0)); B -> A is 3 and 2; pooled [2, 2, 3]: mean 7/3,
    95th percentile 2 + 0.9 * 1. Millimetres: (0, 3) is now nearer, 1.5 mm, against
    4 mm for (2, 0): pooled [1.5, 1.5, 4]: mean 7/3, 95th percentile 1.5 + 0.9 * 2.5.
    Scaling the pixel distances by any one factor could not give both.
    """
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0, 0] = b[0, 3] = b[2, 0] = True
    got = boundary_scores(a, b, spacing=(2.0, 0.5))
    assert got == pytest.approx({"hd95": 2.9, "assd": 7 / 3, "hd95_mm": 3.75, "assd_mm": 7 / 3})


@pytest.mark.parametrize("spacing", [0, -1, (1, 2, 3), float("nan"), (1.0, float("inf"))])
def test_bad_spacing_raises(spacing):
    with pytest.raises(ValueError, match="spacing"):
        check_spacing(spacing)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"truth.shape=\(4, 4\), pred.shape=\(4, 5\)"):
        boundary_scores(np.ones((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"\(2, 4, 4\)"):
        boundary_scores(np.ones((2, 4, 4)), np.ones((2, 4, 4)))


def test_accepts_numbers_and_a_channel_axis():
    a = _square((16, 20), 3, 2, 10)
    b = np.roll(a, 3, axis=1)
    got = boundary_scores(a[..., None] * 255.0, b.astype(np.float32) * 0.9)
    assert got == pytest.approx({"hd95": 3.0, "assd": 1.5})


# ----------------------------------------------------------------------------- brute force


def _brute_surface(mask):
    """Mask pixels with a 4-neighbour outside the mask or the image, by looking at each."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            if mask[i, j]:
                out[i, j] = any(
                    not (0 <= i + di < h and 0 <= j + dj < w) or not mask[i + di, j + dj]
                    for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_pairwise_distances(seed):
    """Random blobs (touching the image edge too) against all-pairs distances."""
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(12, 30)), int(rng.integers(12, 30)))
    spacing = (float(rng.uniform(0.2, 2)), float(rng.uniform(0.2, 2)))
    masks = []
    for _ in range(2):
        noise = rng.random(shape)
        masks.append(ndimage.uniform_filter(noise, 5) > 0.5)
    a, b = masks
    assert a.any() and b.any()
    np.testing.assert_array_equal(surface(a), _brute_surface(a))
    pa = np.argwhere(_brute_surface(a)) * spacing
    pb = np.argwhere(_brute_surface(b)) * spacing
    pair = cdist(pa, pb)
    pooled = np.concatenate([pair.min(axis=1), pair.min(axis=0)])
    got = boundary_scores(a, b, spacing=spacing)
    assert got["hd95_mm"] == pytest.approx(np.percentile(pooled, 95), abs=1e-9)
    assert got["assd_mm"] == pytest.approx(pooled.mean(), abs=1e-9)
    pix = cdist(np.argwhere(_brute_surface(a)), np.argwhere(_brute_surface(b)))
    pooled_px = np.concatenate([pix.min(axis=1), pix.min(axis=0)])
    assert got["hd95"] == pytest.approx(np.percentile(pooled_px, 95), abs=1e-9)
    assert got["assd"] == pytest.approx(pooled_px.mean(), abs=1e-9)
