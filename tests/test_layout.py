"""Tests of lesionkeras.data.layout on tiny folders written into tmp_path."""

import os
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkeras.data import layout
from lesionkeras.data.layout import (
    ATTRIBUTES,
    build_manifest,
    detect_layout,
    write_manifest,
)
from lesionkeras.errors import ConfigError, DataError

BASE = ["id", "image", "mask", "split", "fold", "clean"]
ATTR = [f"attr_{a}" for a in ATTRIBUTES]


def _img(path, size=(8, 8), mode="RGB"):
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    shape = (size[1], size[0], channels) if channels > 1 else (size[1], size[0])
    Image.fromarray(np.full(shape, 200, np.uint8), mode).save(path)
    return str(path)


def _touch(path, text=""):
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _check_types(df):
    assert list(df.index) == list(range(len(df)))
    assert list(df["id"]) == sorted(df["id"])
    for column in ("id", "image", "mask", "split"):
        assert pd.api.types.is_string_dtype(df[column]), column
    assert df["fold"].dtype == np.int64
    assert df["clean"].dtype == bool
    for path in df["image"]:
        assert os.path.isabs(path) and os.path.isfile(path)


# --------------------------------------------------------------------------- #
# ISIC
# --------------------------------------------------------------------------- #


def test_isic2016(tmp_path):
    data = tmp_path / "ISBI2016_ISIC_Part1_Training_Data"
    truth = tmp_path / "ISBI2016_ISIC_Part1_Training_GroundTruth"
    i1 = _img(data / "ISIC_0000001.jpg")
    i0 = _img(data / "ISIC_0000000.jpg")
    i2 = _img(data / "ISIC_0000002.jpg")  # no mask: allowed by the layout
    m0 = _img(truth / "ISIC_0000000_Segmentation.png", mode="L")
    m1 = _img(truth / "ISIC_0000001_Segmentation.png", mode="L")

    assert detect_layout(tmp_path) == "isic"
    df = build_manifest(tmp_path)
    assert list(df.columns) == BASE
    _check_types(df)
    assert list(df["id"]) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert list(df["image"]) == [i0, i1, i2]
    assert list(df["mask"]) == [m0, m1, ""]
    assert list(df["split"]) == ["", "", ""]
    assert list(df["fold"]) == [-1, -1, -1]
    assert df["clean"].all()


def test_isic2017_skips_superpixels_and_reads_part3_csv(tmp_path):
    data = tmp_path / "ISIC-2017_Training_Data"
    truth = tmp_path / "ISIC-2017_Training_Part1_GroundTruth"
    for i in range(3):
        _img(data / f"ISIC_000000{i}.jpg")
        _img(data / f"ISIC_000000{i}_superpixels.png")
        _img(truth / f"ISIC_000000{i}_segmentation.png", mode="L")
    _touch(data / "ISIC-2017_Training_Data_metadata.csv", "image_id,age_approximate,sex\n")
    _touch(
        tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv",
        "image_id,melanoma,seborrheic_keratosis\n"
        "ISIC_0000000,0.0,0.0\nISIC_0000001,1.0,0.0\nISIC_0000002,0.0,1.0\n",
    )

    df = build_manifest(tmp_path, layout="isic")
    assert list(df.columns) == BASE + ["diagnosis"]
    _check_types(df)
    assert list(df["id"]) == [f"ISIC_000000{i}" for i in range(3)]
    assert not any("superpixels" in p for p in df["image"])
    assert all(p.endswith("_segmentation.png") for p in df["mask"])
    assert list(df["diagnosis"]) == ["NV", "MEL", "BKL"]


def test_isic2017_melanoma_only_csv_leaves_non_melanoma_unlabelled(tmp_path):
    _img(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg")
    _img(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000001.jpg")
    _touch(
        tmp_path / "ISIC-2017_Training_Classes.csv",
        "image_id,melanoma\nISIC_0000000,0.0\nISIC_0000001,1.0\n",
    )
    df = build_manifest(tmp_path)
    assert list(df["diagnosis"]) == ["", "MEL"]


def test_isic2018_with_attributes_and_task3(tmp_path):
    data = tmp_path / "ISIC2018_Task1-2_Training_Input"
    truth = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    attrs = tmp_path / "ISIC2018_Task2_Training_GroundTruth_v3"
    _touch(data / "LICENSE.txt", "cc")
    for i in range(2):
        _img(data / f"ISIC_001000{i}.jpg")
        _img(truth / f"ISIC_001000{i}_segmentation.png", mode="L")
        for name in ATTRIBUTES:
            if (i, name) != (1, "streaks"):  # one attribute file missing
                _img(attrs / f"ISIC_001000{i}_attribute_{name}.png", mode="L")
    _touch(
        tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
        "ISIC_0010000,0.0,0.0,1.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0010001,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
        "ISIC_0099999,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n",
    )

    assert detect_layout(tmp_path) == "isic"
    df = build_manifest(tmp_path)
    assert list(df.columns) == BASE + ["diagnosis"] + ATTR
    _check_types(df)
    assert list(df["id"]) == ["ISIC_0010000", "ISIC_0010001"]
    assert list(df["diagnosis"]) == ["BCC", "VASC"]
    assert df.loc[1, "attr_streaks"] == ""
    assert df.loc[0, "attr_streaks"] == str(attrs / "ISIC_0010000_attribute_streaks.png")
    for name in ATTRIBUTES:
        if name != "streaks":
            assert df.loc[1, f"attr_{name}"] == str(attrs / f"ISIC_0010001_attribute_{name}.png")
    assert all(p.startswith(str(truth)) for p in df["mask"])


def test_isic_duplicate_ids_name_both_files(tmp_path):
    a = _img(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg")
    b = _img(tmp_path / "copy" / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg")
    _img(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000001.jpg")
    with pytest.raises(DataError) as info:
        build_manifest(tmp_path)
    assert a in str(info.value) and b in str(info.value)
    (line,) = info.value.lines()
    assert a in line and b in line


def test_isic_ignores_hidden_and_macos_folders(tmp_path):
    _img(tmp_path / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg")
    _img(tmp_path / "__MACOSX" / "ISIC-2017_Training_Data" / "ISIC_0000000.jpg")
    _img(tmp_path / ".cache" / "ISIC_0000000.jpg")
    assert list(build_manifest(tmp_path)["id"]) == ["ISIC_0000000"]


def test_isic_2000_images_index_fast(tmp_path):
    # Empty files suffice: the layout must never open them.
    data = tmp_path / "ISIC-2017_Training_Data"
    truth = tmp_path / "ISIC-2017_Training_Part1_GroundTruth"
    data.mkdir()
    truth.mkdir()
    for i in range(2000):
        (data / f"ISIC_{i:07d}.jpg").touch()
        (truth / f"ISIC_{i:07d}_segmentation.png").touch()
    start = time.perf_counter()
    df = build_manifest(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(df) == 2000 and (df["mask"] != "").all()
    assert elapsed < 1.0


# --------------------------------------------------------------------------- #
# PH2
# --------------------------------------------------------------------------- #


def test_ph2(tmp_path):
    root = tmp_path / "PH2Dataset" / "PH2 Dataset images"
    images, masks = {}, {}
    for n in ("IMD003", "IMD002"):
        images[n] = _img(root / n / f"{n}_Dermoscopic_Image" / f"{n}.bmp")
        _img(root / n / f"{n}_roi" / f"{n}_R1_Label4.bmp", mode="L")
    masks["IMD002"] = _img(root / "IMD002" / "IMD002_lesion" / "IMD002_lesion.bmp", mode="L")

    assert detect_layout(tmp_path) == "ph2"
    df = build_manifest(tmp_path)
    assert list(df.columns) == BASE
    _check_types(df)
    assert list(df["id"]) == ["IMD002", "IMD003"]
    assert list(df["image"]) == [images["IMD002"], images["IMD003"]]
    assert list(df["mask"]) == [masks["IMD002"], ""]


# --------------------------------------------------------------------------- #
# Generic
# --------------------------------------------------------------------------- #


def test_generic_mask_suffixes(tmp_path):
    img = {
        "a": _img(tmp_path / "images" / "a.png"),
        "b": _img(tmp_path / "images" / "b.JPG"),
        "c": _img(tmp_path / "images" / "c.bmp"),
        "d": _img(tmp_path / "images" / "d.tif"),
        "e": _img(tmp_path / "images" / "e.jpeg"),
    }
    msk = {
        "a": _img(tmp_path / "masks" / "a.png", mode="L"),
        "b": _img(tmp_path / "masks" / "b_mask.png", mode="L"),
        "c": _img(tmp_path / "masks" / "c_segmentation.tiff", mode="L"),
        "d": _img(tmp_path / "masks" / "d_lesion.bmp", mode="L"),
    }
    _touch(tmp_path / "images" / "notes.txt", "not an image")

    assert detect_layout(tmp_path) == "generic"
    df = build_manifest(tmp_path)
    assert list(df.columns) == BASE
    _check_types(df)
    assert list(df["id"]) == ["a", "b", "c", "d", "e"]
    assert list(df["image"]) == [img[k] for k in "abcde"]
    assert list(df["mask"]) == [msk[k] for k in "abcd"] + [""]


def test_generic_two_masks_for_one_image_is_an_error(tmp_path):
    _img(tmp_path / "images" / "a.png")
    m1 = _img(tmp_path / "masks" / "a.png", mode="L")
    m2 = _img(tmp_path / "masks" / "a_mask.png", mode="L")
    with pytest.raises(DataError) as info:
        build_manifest(tmp_path)
    text = "\n".join(info.value.lines())
    assert m1 in text and m2 in text


def test_generic_same_stem_two_extensions_is_an_error(tmp_path):
    a = _img(tmp_path / "images" / "a.png")
    b = _img(tmp_path / "images" / "a.jpg")
    with pytest.raises(DataError) as info:
        build_manifest(tmp_path)
    assert a in info.value.lines()[0] and b in info.value.lines()[0]


# --------------------------------------------------------------------------- #
# Manifest CSV
# --------------------------------------------------------------------------- #


def _manifest_folder(tmp_path):
    _img(tmp_path / "pics" / "x1.png")
    _img(tmp_path / "pics" / "x2.png")
    _img(tmp_path / "pics" / "x3.png")
    _img(tmp_path / "gt" / "x1.png", mode="L")
    _img(tmp_path / "gt" / "x2.png", mode="L")
    _touch(
        tmp_path / "manifest.csv",
        "image,mask,split,fold,clean,diagnosis,age,site\n"
        "pics/x2.png,gt/x2.png,val,1,false,nv,40,back\n"
        "pics/x1.png,gt/x1.png,train,0,true,MEL,55,arm\n"
        "pics/x3.png,,,,,,61,\n",
    )


def test_manifest_csv_relative_paths_and_extra_columns(tmp_path):
    _manifest_folder(tmp_path)
    assert detect_layout(tmp_path) == "manifest"
    assert detect_layout(tmp_path / "manifest.csv") == "manifest"
    df = build_manifest(tmp_path / "manifest.csv")
    assert list(df.columns) == BASE + ["diagnosis", "age", "site"]
    _check_types(df)
    assert list(df["id"]) == ["x1", "x2", "x3"]
    assert list(df["image"]) == [str(tmp_path / "pics" / f"x{i}.png") for i in (1, 2, 3)]
    assert list(df["mask"]) == [str(tmp_path / "gt" / "x1.png"), str(tmp_path / "gt" / "x2.png"), ""]
    assert list(df["split"]) == ["train", "val", ""]
    assert list(df["fold"]) == [0, 1, -1]
    assert list(df["clean"]) == [True, False, True]
    assert list(df["diagnosis"]) == ["MEL", "NV", ""]
    # Extra columns stay with their row after sorting, with their own types.
    assert list(df["age"]) == [55, 40, 61]
    assert list(df["site"].fillna("")) == ["arm", "back", ""]
    # A folder holding manifest.csv gives the same manifest.
    pd.testing.assert_frame_equal(build_manifest(tmp_path), df)


def test_manifest_wins_over_images_folder(tmp_path):
    _manifest_folder(tmp_path)
    _img(tmp_path / "images" / "z.png")
    assert detect_layout(tmp_path) == "manifest"


def test_manifest_id_column_and_attr_columns(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    _touch(
        tmp_path / "list.csv",
        "id,image,attr_globules\n0002,a.png,ga.png\n0001,b.png,\n",
    )
    df = build_manifest(tmp_path / "list.csv")
    assert list(df.columns) == BASE + ["attr_globules"]
    assert list(df["id"]) == ["0001", "0002"]  # kept as str, leading zeros intact
    assert list(df["attr_globules"]) == ["", str(tmp_path / "ga.png")]


def test_manifest_without_image_column(tmp_path):
    csv = _touch(tmp_path / "m.csv", "path,mask\na.png,b.png\n")
    with pytest.raises(DataError) as info:
        build_manifest(csv)
    assert csv in str(info.value) and "'image'" in str(info.value)


def test_manifest_bad_cells_all_reported(tmp_path):
    csv = _touch(
        tmp_path / "m.csv",
        "image,fold,clean,diagnosis\na.png,x,true,MEL\nb.png,1,maybe,XYZ\na.png,,,\n",
    )
    with pytest.raises(DataError) as info:
        build_manifest(csv)
    lines = info.value.lines()
    assert len(lines) == 4
    assert all(line.startswith(csv) for line in lines)
    assert "line 2" in lines[0] and "fold" in lines[0]
    assert any("line 4" in line and "already used" in line for line in lines)


def test_write_manifest_round_trip(tmp_path):
    _manifest_folder(tmp_path)
    df = build_manifest(tmp_path)
    out = tmp_path / "sub" / "copy.csv"
    write_manifest(df, out)
    text = out.read_text()
    assert str(tmp_path) not in text  # paths are relative to the CSV
    assert "../pics/x1.png" in text
    pd.testing.assert_frame_equal(build_manifest(out), df)


# --------------------------------------------------------------------------- #
# detect_layout errors and options
# --------------------------------------------------------------------------- #


def test_detect_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="no such file or folder") as info:
        detect_layout(missing)
    assert str(info.value) == f"{missing}: no such file or folder"


def test_detect_empty_folder(tmp_path):
    _touch(tmp_path / "readme.txt", "hello")
    with pytest.raises(DataError) as info:
        detect_layout(tmp_path)
    assert str(info.value) == f"{tmp_path}: empty folder: no images found"
    with pytest.raises(DataError, match="empty folder"):
        build_manifest(tmp_path)


def test_detect_unknown_layout(tmp_path):
    _img(tmp_path / "photos" / "holiday.jpg")
    with pytest.raises(DataError) as info:
        detect_layout(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: unknown layout (expected ISIC, PH2, images/+masks/ or a manifest CSV)"
    )


def test_explicit_layout_that_does_not_match(tmp_path):
    _img(tmp_path / "photos" / "holiday.jpg")
    with pytest.raises(DataError, match="no IMDnnn"):
        build_manifest(tmp_path, layout="ph2")
    with pytest.raises(ConfigError):
        build_manifest(tmp_path, layout="kaggle")


def test_layouts_constant():
    assert layout.LAYOUTS == ("isic", "ph2", "generic", "manifest")
