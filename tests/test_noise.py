"""Polygon noise (Mirikharaji et al. 2019, section 3): shapes with known answers."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras.cli import main
from lesionkeras.data import noise
from lesionkeras.data.synthetic import make_sample
from lesionkeras.errors import ConfigError, DataError


def rect(h=16, w=16, r=(4, 12), c=(2, 10)):
    m = np.zeros((h, w), np.uint8)
    m[r[0] : r[1], c[0] : c[1]] = 1
    return m


def disc(size=48, radius=15.0, centre=(24, 22)):
    yy, xx = np.mgrid[:size, :size] + 0.5
    return ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2).astype(np.uint8)


def test_rectangle_boundary_is_its_four_corners():
    poly = noise.trace_boundary(rect().astype(bool))
    np.testing.assert_array_equal(poly, [[4, 2], [4, 10], [12, 10], [12, 2]])


@pytest.mark.parametrize("level, corners", [("7-vertex", 4), ("3-vertex", 3), ("4-axis", 4)])
def test_rectangle_polygon_per_level(level, corners):
    # A rectangle has 4 corners: 7 vertices keep them all, 3 drop one, the box is itself.
    poly = noise.noisy_polygon(rect(), level)
    assert len(poly) == corners
    assert {tuple(v) for v in poly} <= {(4, 2), (4, 10), (12, 10), (12, 2)}


@pytest.mark.parametrize("level", ["7-vertex", "4-axis"])
def test_a_rectangle_stays_a_rectangle(level):
    m = rect()
    np.testing.assert_array_equal(noise.noisy_mask(m, level), m)


def test_triangle_is_half_a_square():
    out = noise.noisy_mask(rect(r=(0, 8), c=(0, 8), h=8, w=8), "3-vertex")
    # Any 3 of the 4 corners: a right triangle over the diagonal, 28 of 64
    # pixel centres strictly inside plus the 8 on one side of the diagonal.
    assert out.sum() in (28, 36)


def test_vertex_counts_and_nesting():
    m = disc()
    p7 = noise.noisy_polygon(m, "7-vertex", seed=3)
    p3 = noise.noisy_polygon(m, "3-vertex", seed=3)
    assert p7.shape == (7, 2) and p3.shape == (3, 2)
    # The 3-vertex polygon continues the 7-vertex simplification.
    assert {tuple(v) for v in p3} <= {tuple(v) for v in p7}
    rows, cols = np.nonzero(noise.noisy_mask(m, "7-vertex", seed=3))
    rows3, cols3 = np.nonzero(noise.noisy_mask(m, "3-vertex", seed=3))
    assert rows3.min() >= rows.min() and rows3.max() <= rows.max()
    assert cols3.min() >= cols.min() and cols3.max() <= cols.max()


def test_levels_are_ordered_by_noise_on_a_disc():
    m = disc()
    def dice(level):
        n = noise.noisy_mask(m, level)
        return 2 * (n & m).sum() / (n.sum() + m.sum())
    assert dice("7-vertex") > 0.9
    assert dice("7-vertex") > dice("3-vertex") and dice("maximal") < 0.6
    # A disc's bounding square: pi/4 of it is lesion.
    assert dice("4-axis") == pytest.approx(2 * np.pi / 4 / (1 + np.pi / 4), abs=0.03)


def test_four_axis_is_the_bounding_box_of_the_largest_component():
    m = np.zeros((20, 20), np.uint8)
    m[2:4, 2:4] = 1  # a speck
    m[8:12, 5:9] = 1
    m[12:15, 7:16] = 1
    out = noise.noisy_mask(m, "4-axis")
    np.testing.assert_array_equal(np.nonzero(out.any(1))[0][[0, -1]], [8, 14])
    np.testing.assert_array_equal(np.nonzero(out.any(0))[0][[0, -1]], [5, 15])
    assert out[2:4, 2:4].sum() == 0


def test_maximal_band_and_empty_masks():
    out = noise.noisy_mask(np.zeros((64, 64)), "maximal")
    assert out.sum() == (64 - 4) ** 2 and out[0].sum() == 0 and out[2, 2] == 1
    assert noise.noisy_mask(np.zeros((64, 64)), "maximal", band=5).sum() == 54**2
    for level in ("7-vertex", "3-vertex", "4-axis"):
        assert noise.noisy_mask(np.zeros((16, 16)), level).sum() == 0


def test_diagonal_pinch_keeps_the_outer_boundary():
    m = np.zeros((8, 8), bool)
    m[1:4, 1:4] = True
    m[4:7, 4:7] = True
    m[1:4, 4:6] = True
    poly = noise.trace_boundary(noise.largest_component(m))
    np.testing.assert_array_equal(noise.fill_polygon(poly, m.shape), m)


def test_synthetic_lesion_and_seed_determinism():
    m = make_sample(0, 1, 64).mask
    a = noise.noisy_mask(m, "3-vertex", seed=1)
    assert a.shape == m.shape and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    np.testing.assert_array_equal(a, noise.noisy_mask(m, "3-vertex", seed=1))


def test_importance_favours_sharp_long_corners():
    poly = np.array([[0, 0], [0, 10], [1, 11], [10, 10], [10, 0]], float)
    imp = noise.vertex_importance(poly)
    # The two vertices of the short bump matter least; the right angles most.
    assert set(np.argsort(imp)[:2]) == {1, 2}
    assert imp[0] == imp[4] == pytest.approx(np.pi / 2 * 10 * 10 / 20)
    kept = noise.simplify_polygon(poly, 4).tolist()
    assert [0, 0] in kept and [10, 0] in kept and [10, 10] in kept


def test_bad_level():
    with pytest.raises(ConfigError, match="`level`"):
        noise.noisy_mask(rect(), "5-vertex")


def _write_masks(folder, masks):
    folder.mkdir()
    for name, m in masks.items():
        Image.fromarray(m * np.uint8(255)).save(folder / name)


def test_cli_writes_all_masks_atomically(tmp_path):
    _write_masks(tmp_path / "in", {"a_segmentation.png": rect(), "b.bmp": disc(32, 10, (16, 16))})
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["data", "noise", "--level", "3-vertex", "--in",
                                    str(tmp_path / "in"), "--out", str(out), "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["a_segmentation.png", "b.png"]
    b = np.asarray(Image.open(out / "b.png"))
    assert b.shape == (32, 32) and set(np.unique(b)) == {0, 255}
    # Same command again: the output folder is not empty -> exit 2, one line.
    res = CliRunner().invoke(main, ["data", "noise", "--level", "3-vertex", "--in",
                                    str(tmp_path / "in"), "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output


def test_cli_bad_mask_writes_nothing(tmp_path):
    _write_masks(tmp_path / "in", {"a.png": rect()})
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["data", "noise", "--level", "maximal", "--in",
                                    str(tmp_path / "in"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "broken.png" in res.output
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(DataError, match="no such"):
        noise.list_masks(tmp_path / "missing")
