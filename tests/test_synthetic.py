"""Tests of the synthetic dermoscopy dataset (lesionkeras.data.synthetic)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from lesionkeras.data import synthetic
from lesionkeras.data.synthetic import ATTRIBUTES, DIAGNOSES
from lesionkeras.errors import DataError


@pytest.fixture(scope="module")
def small_set():
    # 32 px keeps 200 samples well under a second.
    return synthetic.make_dataset(200, size=32, seed=0)


def _lesion_pixels(sample):
    return sample.image[sample.mask.astype(bool)].astype(np.float64)


def _dice(pred, truth):
    pred, truth = pred.astype(bool), truth.astype(bool)
    return 2.0 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)


def _naive_segment(image):
    """Otsu threshold on the smoothed colour distance from the border median."""
    rgb = image.astype(np.float64)
    border = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3),
                             rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    dist = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)
    dist = ndimage.gaussian_filter(dist, 1.0)
    hist, edges = np.histogram(dist, 64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    return dist > centres[np.argmax(w0 * w1 * (mu0 - mu1) ** 2)]


def _assert_same(a, b):
    assert a.diagnosis == b.diagnosis
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.attributes.keys() == b.attributes.keys()
    for name in a.attributes:
        np.testing.assert_array_equal(a.attributes[name], b.attributes[name])


# --------------------------------------------------------------------------
# Samples


def test_same_seed_and_index_give_identical_samples():
    _assert_same(synthetic.make_sample(3, 5, 32), synthetic.make_sample(3, 5, 32))


def test_different_seed_or_index_give_different_images():
    base = synthetic.make_sample(3, 5, 32).image
    assert not np.array_equal(base, synthetic.make_sample(4, 5, 32).image)
    assert not np.array_equal(base, synthetic.make_sample(3, 6, 32).image)


def test_sample_does_not_depend_on_dataset_count():
    short = synthetic.make_dataset(3, size=32, seed=7)
    long = synthetic.make_dataset(6, size=32, seed=7)
    assert len(short) == 3 and len(long) == 6
    for i in range(3):
        _assert_same(short[i], long[i])
        _assert_same(short[i], synthetic.make_sample(7, i, 32))


@pytest.mark.parametrize("size", [16, 48])
def test_shapes_dtypes_and_mask_values(size):
    for index in range(6):
        sample = synthetic.make_sample(1, index, size)
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (size, size) and sample.mask.dtype == np.uint8
        assert set(np.unique(sample.mask)) <= {0, 1}
        assert sample.mask.any()
        assert tuple(sample.attributes) == ATTRIBUTES
        for att in sample.attributes.values():
            assert att.shape == (size, size) and att.dtype == np.uint8
            assert set(np.unique(att)) <= {0, 1}
        assert sample.diagnosis in DIAGNOSES


def test_sample_is_frozen():
    sample = synthetic.make_sample(0, 0, 16)
    with pytest.raises(AttributeError):
        sample.diagnosis = "NV"


def test_attribute_masks_lie_inside_lesion_mask(small_set):
    for sample in small_set:
        for att in sample.attributes.values():
            assert not (att.astype(bool) & ~sample.mask.astype(bool)).any()


def test_each_attribute_present_in_some_images_and_absent_in_others(small_set):
    present = np.array([[s.attributes[n].any() for n in ATTRIBUTES] for s in small_set[:60]])
    counts = dict(zip(ATTRIBUTES, present.sum(axis=0).tolist()))
    for name, n in counts.items():
        assert 0 < n < 60, counts


def test_all_classes_occur_with_nv_most_common(small_set):
    counts = {d: sum(s.diagnosis == d for s in small_set) for d in DIAGNOSES}
    assert all(n >= 3 for n in counts.values()), counts
    assert max(counts, key=counts.get) == "NV", counts


def test_class_colour_statistics_differ(small_set):
    def mean_over(diag, stat):
        values = [stat(_lesion_pixels(s)) for s in small_set if s.diagnosis == diag]
        return float(np.mean(values))

    def redness(px):
        return (px[:, 0] - 0.5 * (px[:, 1] + px[:, 2])).mean()

    def brightness(px):
        return px.mean()

    assert mean_over("VASC", redness) > mean_over("MEL", redness) + 20
    assert mean_over("MEL", brightness) < mean_over("BKL", brightness) - 15
    assert mean_over("NV", brightness) < mean_over("AKIEC", brightness)


def test_lesion_area_spans_small_to_large(small_set):
    fractions = np.array([s.mask.mean() for s in small_set])
    assert fractions.min() < 0.05
    assert fractions.max() > 0.6


def test_naive_colour_segmenter_is_neither_useless_nor_perfect():
    samples = synthetic.make_dataset(100, size=64, seed=0)
    dice = np.mean([_dice(_naive_segment(s.image), s.mask) for s in samples])
    assert 0.4 < dice < 0.92, dice


@pytest.mark.parametrize(
    "call",
    [
        lambda: synthetic.make_sample(0, 0, size=8),
        lambda: synthetic.make_sample(-1, 0),
        lambda: synthetic.make_dataset(0),
        lambda: synthetic.make_dataset(2, size=15),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_module_does_not_import_tensorflow():
    code = "import sys, lesionkeras.data.synthetic; print(any(m in sys.modules for m in ('tensorflow', 'keras')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------
# write_isic


def _expected_files(count):
    files = {"ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"}
    for i in range(count):
        image_id = f"ISIC_{i:07d}"
        files.add(f"ISIC2018_Task1-2_Training_Input/{image_id}.jpg")
        files.add(f"ISIC2018_Task1_Training_GroundTruth/{image_id}_segmentation.png")
        for name in ATTRIBUTES:
            files.add(f"ISIC2018_Task2_Training_GroundTruth_v3/{image_id}_attribute_{name}.png")
    return files


def _listing(root):
    return {
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, files in os.walk(root)
        for f in files
    }


def test_write_isic_writes_the_isic_2018_layout(tmp_path):
    out = tmp_path / "data"
    calls = []
    result = synthetic.write_isic(out, 3, size=32, seed=4, progress=calls.append)
    assert result == out
    assert calls == [1, 2, 3]
    assert _listing(out) == _expected_files(3)
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary folder left

    with open(out / "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert len(rows) == 4
    for i, row in enumerate(rows[1:]):
        sample = synthetic.make_sample(4, i, 32)
        image_id = f"ISIC_{i:07d}"
        assert row[0] == image_id
        assert sorted(row[1:]) == ["0.0"] * 6 + ["1.0"]
        assert DIAGNOSES[row[1:].index("1.0")] == sample.diagnosis

        with Image.open(out / f"ISIC2018_Task1-2_Training_Input/{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
            jpeg = np.asarray(im, np.float64)
        assert np.abs(jpeg - sample.image).mean() < 6  # quality 95: close to the original

        with Image.open(out / f"ISIC2018_Task1_Training_GroundTruth/{image_id}_segmentation.png") as im:
            assert im.mode == "L"
            seg = np.asarray(im)
        assert set(np.unique(seg)) <= {0, 255}
        np.testing.assert_array_equal(seg, sample.mask * 255)

        for name in ATTRIBUTES:
            path = out / f"ISIC2018_Task2_Training_GroundTruth_v3/{image_id}_attribute_{name}.png"
            with Image.open(path) as im:
                assert im.mode == "L"
                att = np.asarray(im)
            np.testing.assert_array_equal(att, sample.attributes[name] * 255)


def test_write_isic_into_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    synthetic.write_isic(out, 1, size=16)
    assert _listing(out) == _expected_files(1)


def test_write_isic_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="output folder exists and is not empty"):
        synthetic.write_isic(out, 1, size=16)
    assert os.listdir(out) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["busy"]


def test_write_isic_removes_temporary_folder_on_failure(tmp_path, monkeypatch):
    real = synthetic.make_sample

    def failing(seed, index, size=64):
        if index == 1:
            raise RuntimeError("boom")
        return real(seed, index, size)

    monkeypatch.setattr(synthetic, "make_sample", failing)
    with pytest.raises(RuntimeError, match="boom"):
        synthetic.write_isic(tmp_path / "out", 3, size=16)
    assert os.listdir(tmp_path) == []


def test_write_isic_removes_temporary_folder_when_progress_fails(tmp_path):
    def progress(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synthetic.write_isic(tmp_path / "out", 2, size=16, progress=progress)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("count,size,value", [(0, 32, "0"), (-2, 32, "-2"), (2, 15, "15")])
def test_write_isic_validates_arguments(tmp_path, count, size, value):
    with pytest.raises(ValueError, match=value):
        synthetic.write_isic(tmp_path / "out", count, size=size)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------
# Cache


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LESIONKERAS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert synthetic.cache_root() == tmp_path / "home" / ".cache" / "lesionkeras"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synthetic.cache_root() == tmp_path / "xdg" / "lesionkeras"
    monkeypatch.setenv("LESIONKERAS_CACHE", str(tmp_path / "explicit"))
    assert synthetic.cache_root() == tmp_path / "explicit"


def test_cached_dataset_writes_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONKERAS_CACHE", str(tmp_path / "cache"))
    real = synthetic.write_isic
    writes = []

    def counting(*args, **kwargs):
        writes.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_isic", counting)
    path = synthetic.cached_dataset(2, size=16, seed=5)
    assert path == tmp_path / "cache" / "synthetic-s16-n2-seed5"
    assert _listing(path) == _expected_files(2)
    assert len(writes) == 1
    mtimes = {f: os.stat(path / f).st_mtime_ns for f in _listing(path)}

    assert synthetic.cached_dataset(2, size=16, seed=5) == path
    assert len(writes) == 1
    assert {f: os.stat(path / f).st_mtime_ns for f in _listing(path)} == mtimes

    # Any other parameter is another dataset.
    other = synthetic.cached_dataset(3, size=16, seed=5)
    assert other.name == "synthetic-s16-n3-seed5"
    assert len(writes) == 2
