"""Tests of lesionkeras.data.check on tiny bad and good files in tmp_path."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkeras.data.check import check_manifest, format_report, validate
from lesionkeras.data.layout import build_manifest
from lesionkeras.errors import DataError

SIZE = 8


def _save(path, array, mode=None):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def _rgb(path, size=(SIZE, SIZE)):
    rng = np.random.default_rng(0)
    return _save(path, rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _mask(path, fraction=0.25, size=(SIZE, SIZE), high=255):
    """A mask whose first `fraction` of rows is lesion: exact coverage."""
    array = np.zeros((size[1], size[0]), np.uint8)
    array[: round(size[1] * fraction)] = high
    return _save(path, array)


def _pair(root, stem, fraction=0.25):
    image = _rgb(root / "images" / f"{stem}.png")
    mask = _mask(root / "masks" / f"{stem}.png", fraction)
    return image, mask


def _only(problems):
    assert len(problems) == 1, problems
    return problems[0]


def test_clean_folder_counts_sizes_coverage(tmp_path):
    _pair(tmp_path, "a", 0.25)
    _pair(tmp_path, "b", 0.5)
    _rgb(tmp_path / "images" / "c.jpg", size=(16, 8))
    _mask(tmp_path / "masks" / "c_mask.png", 0.75, size=(16, 8))
    df = build_manifest(tmp_path)

    report = validate(df)
    assert report.problems == []
    assert report.errors == [] and report.warnings == []
    assert report.n_images == 3 and report.n_masks == 3
    assert report.sizes == {(8, 8): 2, (16, 8): 1}
    assert report.coverage_mean == pytest.approx(0.5)
    assert report.coverage_min == pytest.approx(0.25)
    assert report.coverage_max == pytest.approx(0.75)

    text = format_report(report, root=tmp_path)
    assert "images: 3" in text and "masks: 3" in text
    assert "8x8 (2)" in text and "16x8 (1)" in text
    assert "mean 50.0%, min 25.0%, max 75.0%" in text
    assert "error:" not in text and "warning:" not in text


def test_workers_and_progress_give_the_same_report(tmp_path):
    for stem in "abcde":
        _pair(tmp_path, stem)
    _rgb(tmp_path / "images" / "f.png")  # one error, to compare problem order
    df = build_manifest(tmp_path)
    calls = []
    threaded = check_manifest(df, workers=4, progress=lambda done, total: calls.append((done, total)))
    inline = check_manifest(df, workers=1)
    assert threaded == inline
    assert calls == [(i, 6) for i in range(1, 7)]


def test_corrupt_image(tmp_path):
    _pair(tmp_path, "good")
    bad = tmp_path / "images" / "bad.jpg"
    bad.write_bytes(np.random.default_rng(1).bytes(500))
    _mask(tmp_path / "masks" / "bad.png")
    report = check_manifest(build_manifest(tmp_path))
    problem = _only(report.problems)
    assert problem.path == str(bad)
    assert problem.severity == "error"
    assert problem.message.startswith("cannot decode image: ")
    assert str(bad) not in problem.message  # the reason is short, path-free


def test_truncated_png(tmp_path):
    _pair(tmp_path, "good")
    path = _rgb(tmp_path / "images" / "cut.png", size=(32, 32))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    _mask(tmp_path / "masks" / "cut.png", size=(32, 32))
    problem = _only(check_manifest(build_manifest(tmp_path)).problems)
    assert problem.path == path
    assert problem.severity == "error"
    assert problem.message.startswith("cannot decode image: ")


def test_corrupt_mask(tmp_path):
    _rgb(tmp_path / "images" / "a.png")
    mask = tmp_path / "masks" / "a.png"
    mask.parent.mkdir()
    mask.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    problem = _only(check_manifest(build_manifest(tmp_path)).problems)
    assert (problem.path, problem.severity) == (str(mask), "error")
    assert problem.message.startswith("cannot decode mask: ")


def test_mask_of_another_size(tmp_path):
    _pair(tmp_path, "good")
    _rgb(tmp_path / "images" / "odd.png", size=(8, 8))
    mask = _mask(tmp_path / "masks" / "odd.png", size=(16, 12))
    problem = _only(check_manifest(build_manifest(tmp_path)).problems)
    assert problem.path == mask
    assert problem.severity == "error"
    assert problem.message == "mask is 16x12 but image is 8x8"


def test_image_without_mask(tmp_path):
    _pair(tmp_path, "good")
    lonely = _rgb(tmp_path / "images" / "lonely.png")
    df = build_manifest(tmp_path)
    problem = _only(check_manifest(df).problems)
    assert (problem.path, problem.message, problem.severity) == (
        lonely,
        "no mask for this image",
        "error",
    )
    # Prediction needs no masks at all.
    report = check_manifest(df, require_masks=False)
    assert report.problems == []
    no_masks = df.assign(mask="")
    report = validate(no_masks, require_masks=False)
    assert report.n_masks == 0 and math.isnan(report.coverage_mean)
    assert "mask coverage: no masks" in format_report(report)


def test_mask_file_not_found(tmp_path):
    image, mask = _pair(tmp_path, "a")
    df = build_manifest(tmp_path)
    os.remove(mask)
    problem = _only(check_manifest(df).problems)
    assert problem.path == image
    assert problem.message == f"mask file not found: {mask}"
    assert problem.severity == "error"


def test_image_file_not_found(tmp_path):
    image, _ = _pair(tmp_path, "a")
    df = build_manifest(tmp_path)
    os.remove(image)
    problem = _only(check_manifest(df).problems)
    assert (problem.path, problem.severity) == (image, "error")


def test_grayscale_image_is_a_warning(tmp_path):
    gray = _save(tmp_path / "images" / "g.png", np.full((SIZE, SIZE), 90, np.uint8))
    _mask(tmp_path / "masks" / "g.png")
    report = validate(build_manifest(tmp_path))
    problem = _only(report.problems)
    assert (problem.path, problem.severity) == (gray, "warning")
    assert problem.message == "grayscale image (mode L), converted to RGB"


def test_rgba_image_is_a_warning(tmp_path):
    rgba = _save(tmp_path / "images" / "r.png", np.full((SIZE, SIZE, 4), 90, np.uint8))
    _mask(tmp_path / "masks" / "r.png")
    problem = _only(validate(build_manifest(tmp_path)).problems)
    assert (problem.path, problem.severity) == (rgba, "warning")
    assert problem.message == "RGBA image, alpha channel dropped"


def test_palette_and_cmyk_images_are_warnings(tmp_path):
    pal = tmp_path / "images" / "p.png"
    _rgb(pal)
    Image.open(pal).convert("P").save(pal)
    cmyk = tmp_path / "images" / "c.jpg"
    Image.new("CMYK", (SIZE, SIZE), (0, 50, 100, 0)).save(cmyk)
    _mask(tmp_path / "masks" / "p.png")
    _mask(tmp_path / "masks" / "c.png")
    report = validate(build_manifest(tmp_path))
    assert [(p.path, p.severity, p.message) for p in report.problems] == [
        (str(cmyk), "warning", "CMYK image, converted to RGB"),
        (str(pal), "warning", "palette image, converted to RGB"),
    ]


def test_unsupported_image_mode_is_an_error(tmp_path):
    path = tmp_path / "images" / "f.tif"
    path.parent.mkdir()
    Image.fromarray(np.zeros((SIZE, SIZE), np.float32)).save(path)
    _mask(tmp_path / "masks" / "f.png")
    problem = _only(check_manifest(build_manifest(tmp_path)).problems)
    assert (problem.path, problem.severity) == (str(path), "error")
    assert problem.message == "unsupported image mode F"


def test_non_binary_mask_is_a_warning(tmp_path):
    _rgb(tmp_path / "images" / "soft.png")
    array = np.zeros((SIZE, SIZE), np.uint8)
    array[:2] = 255
    array[2:4] = 200  # still lesion after thresholding at 128
    array[4:6] = 100  # background after thresholding
    mask = _save(tmp_path / "masks" / "soft.png", array)
    report = validate(build_manifest(tmp_path))
    problem = _only(report.problems)
    assert (problem.path, problem.severity) == (mask, "warning")
    assert problem.message == "mask is not binary; thresholded at 128"
    assert report.coverage_mean == pytest.approx(0.5)


def test_zero_one_mask_is_binary(tmp_path):
    _rgb(tmp_path / "images" / "a.png")
    _mask(tmp_path / "masks" / "a.png", 0.25, high=1)
    report = validate(build_manifest(tmp_path))
    assert report.problems == []
    assert report.coverage_mean == pytest.approx(0.25)


def test_sixteen_bit_mask_is_binary(tmp_path):
    _rgb(tmp_path / "images" / "a.png")
    array = np.zeros((SIZE, SIZE), np.uint16)
    array[:6] = 65535
    mask = tmp_path / "masks" / "a.png"
    mask.parent.mkdir()
    Image.fromarray(array).save(mask)
    assert Image.open(mask).mode.startswith("I;16")
    report = validate(build_manifest(tmp_path))
    assert report.problems == []
    assert report.coverage_mean == pytest.approx(0.75)


def test_mask_with_three_channels(tmp_path):
    _rgb(tmp_path / "images" / "a.png")
    gray = np.zeros((SIZE, SIZE), np.uint8)
    gray[:2] = 255
    mask = _save(tmp_path / "masks" / "a.png", np.stack([gray] * 3, axis=-1))
    report = validate(build_manifest(tmp_path))
    problem = _only(report.problems)
    assert (problem.path, problem.severity) == (mask, "warning")
    assert problem.message.startswith("mask has 3 channels")
    assert report.coverage_mean == pytest.approx(0.25)


def test_rgba_mask_ignores_alpha(tmp_path):
    _rgb(tmp_path / "images" / "a.png")
    array = np.zeros((SIZE, SIZE, 4), np.uint8)
    array[..., 3] = 255
    array[:4, :, :3] = 255
    mask = _save(tmp_path / "masks" / "a.png", array)
    report = validate(build_manifest(tmp_path))
    problem = _only(report.problems)  # channel warning only: alpha does not make it non-binary
    assert (problem.path, problem.severity) == (mask, "warning")
    assert problem.message.startswith("mask has 4 channels")
    assert report.coverage_mean == pytest.approx(0.5)


def test_empty_manifest(tmp_path):
    empty = pd.DataFrame(columns=["id", "image", "mask", "split", "fold", "clean"])
    with pytest.raises(DataError) as info:
        check_manifest(empty, source=tmp_path)
    assert str(info.value) == f"{tmp_path}: empty folder: no images found"
    with pytest.raises(DataError, match="empty folder: no images found"):
        validate(empty, source=tmp_path)


def test_validate_lists_every_error_at_once(tmp_path):
    _pair(tmp_path, "good")
    corrupt = tmp_path / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"definitely not a jpeg")
    _mask(tmp_path / "masks" / "corrupt.png")
    _rgb(tmp_path / "images" / "odd.png")
    odd_mask = _mask(tmp_path / "masks" / "odd_mask.png", size=(4, 4))
    lonely = _rgb(tmp_path / "images" / "lonely.png")
    # A warning must not count as an error.
    _save(tmp_path / "images" / "gray.png", np.full((SIZE, SIZE), 90, np.uint8))
    _mask(tmp_path / "masks" / "gray.png")

    with pytest.raises(DataError) as info:
        validate(build_manifest(tmp_path))
    lines = info.value.lines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{corrupt}: cannot decode image")
    assert lines[1] == f"{lonely}: no mask for this image"
    assert lines[2] == f"{odd_mask}: mask is 4x4 but image is 8x8"
    assert str(info.value).startswith(f"{corrupt}: cannot decode image")
    assert "2 more" in str(info.value)

    text = format_report(check_manifest(build_manifest(tmp_path)), root=tmp_path)
    assert "error: images/corrupt.jpg: cannot decode image" in text
    assert "error: images/lonely.png: no mask for this image" in text
    assert "error: masks/odd_mask.png: mask is 4x4 but image is 8x8" in text
    assert "warning: images/gray.png: grayscale image (mode L), converted to RGB" in text


def test_files_are_decoded_once_until_they_change(tmp_path, monkeypatch):
    from lesionkeras.data import check

    for i in range(3):
        _pair(tmp_path, f"case{i}")
    df = build_manifest(tmp_path)
    decoded = []
    real = check._check_row
    monkeypatch.setattr(check, "_check_row",
                        lambda image, *a, **k: decoded.append(os.path.basename(image))
                        or real(image, *a, **k))
    check._check_row_once.cache_clear()
    assert validate(df).n_images == 3
    assert sorted(decoded) == ["case0.png", "case1.png", "case2.png"]
    validate(df)  # e.g. the next fold of `fit --folds`
    assert len(decoded) == 3
    # A mask rewritten at another size is read again and refused.
    os.remove(tmp_path / "masks" / "case1.png")
    _mask(tmp_path / "masks" / "case1.png", size=(SIZE, SIZE // 2))
    with pytest.raises(DataError, match="case1.png: mask is 8x4 but image is 8x8"):
        validate(df)
    assert decoded[3:] == ["case1.png"]
