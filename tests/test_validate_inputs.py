"""Inputs are checked before anything is written: folds, attribute masks, noisy/clean
folders, models; `data check` lists attribute masks, broken links and orphan masks.

Each bad input gives one line per bad file naming it, exit code 2, and nothing
written. None of these tests trains: every check happens before training.
"""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import files
from lesionkeras.cli import main
from lesionkeras.data import synthetic

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import untrained_run  # noqa: E402

SIZE = 32
TINY = ["--image-size", SIZE, "--filters", 8, "--depth", 2, "--batch-size", 2, "--epochs", 1,
        "--no-progress"]
ATTRIBUTES = "ISIC2018_Task2_Training_GroundTruth_v3"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(res):
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert "Traceback" not in res.output
    assert lines and all(line.startswith("error: ") for line in lines), res.output
    return lines


def write_generic(root, n=6, size=(SIZE, SIZE)):
    """images/ + masks/ with a rectangle lesion each."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros(size, np.uint8)
        mask[8:24, 4 + i : 20 + i] = 255
        image = rng.integers(0, 80, size + (3,), dtype=np.uint8)
        image[mask > 0] += 150
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    return synthetic.write_isic(tmp_path_factory.mktemp("data") / "isic", 8, size=SIZE)


@pytest.fixture
def bad_attributes(isic, tmp_path):
    """A copy of `isic` with a zero-byte attribute mask and one of the wrong size."""
    data = Path(shutil.copytree(isic, tmp_path / "isic"))
    (data / ATTRIBUTES / "ISIC_0000003_attribute_globules.png").write_bytes(b"")
    Image.new("L", (16, 16)).save(data / ATTRIBUTES / "ISIC_0000005_attribute_streaks.png")
    return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("model") / "run", size=SIZE, seed=0,
                         overrides={})


def test_fit_folds_checks_the_data_before_writing_folds_json(tmp_path):
    data = write_generic(tmp_path / "data")
    (data / "images" / "case4.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    res = invoke("fit", "--folds", 2, "--data", data, "--out", run, *TINY)
    assert res.exit_code == 2, res.output
    assert "case4.png: cannot decode image" in error_lines(res)[0]
    # Nothing written, so the corrected command is not refused as "not empty".
    assert not run.exists()


def test_fit_folds_holds_the_lock_of_the_folds_parent(tmp_path):
    data = write_generic(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    with files.run_lock(run):  # another process's run with folds, as far as fit can tell
        res = invoke("fit", "--folds", 2, "--data", data, "--out", run, *TINY)
    assert res.exit_code == 2, res.output
    assert f"PID {os.getpid()}" in error_lines(res)[0]
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


@pytest.mark.parametrize("method", [
    ["--method", "smile", "--model", "unet"],
    ["--method", "multiclass", "--model", "unet"],
    ["--task", "attributes", "--method", "multitask", "--model", "attribute_net"],
])
def test_bad_attribute_masks_are_refused_before_anything_is_written(
        method, bad_attributes, tmp_path):
    run = tmp_path / "run"
    res = invoke("fit", *method, "--data", bad_attributes, "--out", run, *TINY)
    assert res.exit_code == 2, res.output
    lines = error_lines(res)
    assert len(lines) == 2
    assert "ISIC_0000003_attribute_globules.png: cannot decode globules mask" in lines[0]
    assert "ISIC_0000005_attribute_streaks.png: streaks mask is 16x16 but image is 32x32" in lines[1]
    assert not run.exists()


def test_drop_labels_refuses_bad_attribute_masks(bad_attributes, tmp_path):
    res = invoke("data", "drop-labels", "--alpha", 0.5, "--in", bad_attributes,
                 "--out", tmp_path / "out")
    assert res.exit_code == 2 and "cannot decode globules mask" in error_lines(res)[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["meta", "image-reweight", "finetune"])
def test_a_bad_noisy_mask_is_refused_before_anything_is_written(method, tmp_path):
    clean = write_generic(tmp_path / "clean")
    noisy = write_generic(tmp_path / "noisy")
    Image.new("L", (SIZE, SIZE // 2)).save(noisy / "masks" / "case2.png")
    run = tmp_path / "run"
    res = invoke("fit", "--method", method, "--noisy-data", noisy, "--clean-data", clean,
                 "--out", run, *TINY)
    assert res.exit_code == 2, res.output
    assert "noisy/masks/case2.png: mask is 32x16 but image is 32x32" in error_lines(res)[0]
    assert not run.exists()


def test_data_check_reads_attribute_masks(bad_attributes):
    res = invoke("data", "check", bad_attributes)
    assert res.exit_code == 2
    assert "problems: 2 errors, 0 warnings" in res.output
    assert (f"error: {ATTRIBUTES}/ISIC_0000003_attribute_globules.png: cannot decode globules "
            "mask: not a recognised image file") in res.output
    assert (f"error: {ATTRIBUTES}/ISIC_0000005_attribute_streaks.png: streaks mask is 16x16 "
            "but image is 32x32") in res.output


def test_data_check_lists_broken_links_and_orphan_masks(isic, tmp_path):
    generic = write_generic(tmp_path / "generic", n=3)
    os.symlink(tmp_path / "elsewhere" / "gone.png", generic / "images" / "case9.png")
    Image.new("L", (SIZE, SIZE)).save(generic / "masks" / "lonely.png")
    res = invoke("data", "check", generic)
    assert res.exit_code == 0, res.output  # warnings only
    assert "images: 3" in res.output and "problems: 0 errors, 2 warnings" in res.output
    assert ("warning: images/case9.png: broken symbolic link (its target "
            f"{tmp_path / 'elsewhere' / 'gone.png'} is missing); not used") in res.output
    assert "warning: masks/lonely.png: mask with no image; not used" in res.output

    # ISIC: a lesion and an attribute mask of an image that is not there.
    data = Path(shutil.copytree(isic, tmp_path / "isic"))
    (data / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000007.jpg").unlink()
    res = invoke("data", "check", data)
    assert res.exit_code == 0, res.output
    assert "images: 7" in res.output and "problems: 0 errors, 6 warnings" in res.output
    assert ("warning: ISIC2018_Task1_Training_GroundTruth/ISIC_0000007_segmentation.png: "
            "mask with no image; not used") in res.output
    assert (f"warning: {ATTRIBUTES}/ISIC_0000007_attribute_globules.png: mask with no image; "
            "not used") in res.output


def test_a_folder_of_image_folders_is_not_called_empty(run_dir, isic, tmp_path):
    nested = tmp_path / "nested"
    for sub, image in (("2019", "ISIC_0000000.jpg"), ("2020", "ISIC_0000001.jpg")):
        (nested / sub).mkdir(parents=True)
        shutil.copy(isic / "ISIC2018_Task1-2_Training_Input" / image, nested / sub / "photo.jpg")
    res = invoke("predict", run_dir, nested, "--out", tmp_path / "out")
    assert res.exit_code == 2
    assert error_lines(res) == [
        f"error: {nested}: no images in the folder itself, only in its subfolders (2 in 2019/, "
        "2020/); give a subfolder, or a known layout (ISIC, PH2, images/ + masks/, a manifest CSV)"]
    assert not (tmp_path / "out").exists()

    generic = tmp_path / "generic"
    (generic / "masks").mkdir(parents=True)
    shutil.copytree(nested, generic / "images" / "scans")
    res = invoke("data", "check", generic)
    assert res.exit_code == 2
    assert "only in its subfolders (2 in scans/)" in error_lines(res)[0]


def test_predict_ignores_the_masks_it_does_not_read(run_dir, tmp_path):
    data = write_generic(tmp_path / "data", n=3)
    Image.new("L", (8, 8)).save(data / "masks" / "case1.png")  # wrong size
    (data / "masks" / "case2.png").write_bytes(b"")  # not an image at all
    res = invoke("predict", run_dir, data, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 3


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_a_truncated_model_is_named_as_such(command, run_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(run_dir / "config.toml", bad)
    (bad / "model.keras").write_bytes((run_dir / "model.keras").read_bytes()[:5000])
    data = write_generic(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = {"predict": ["predict", bad, data / "images", "--out", out],
            "evaluate": ["evaluate", bad / "model.keras", "--data", data, "--out", out],
            "export": ["export", bad, "--out", out]}[command]
    res = invoke(*args)
    assert res.exit_code == 2
    assert error_lines(res) == [f"error: {bad / 'model.keras'}: not a Keras model file "
                                "(truncated or corrupt: 5000 bytes, not a .keras zip archive)"]
    assert not out.exists()



@pytest.fixture
def writes(monkeypatch):
    """Names of the files written through `files.atomic_path` (config.toml, checkpoints...)."""
    names = []
    real_atomic_path = files.atomic_path

    def spy(path, *args, **kwargs):
        names.append(Path(path).name)
        return real_atomic_path(path, *args, **kwargs)

    monkeypatch.setattr(files, "atomic_path", spy)
    return names


def test_meta_without_clean_training_images_is_refused_before_anything_is_written(
        tmp_path, writes):
    # One clean image, sent to validation: none is left for the clean stream.
    clean = write_generic(tmp_path / "clean", n=1)
    noisy = write_generic(tmp_path / "noisy")
    run = tmp_path / "run"
    res = invoke("fit", "--method", "meta", "--noisy-data", noisy, "--clean-data", clean,
                 "--val-fraction", 0.6, "--out", run, *TINY)
    assert res.exit_code == 2, res.output
    assert "needs both noisy and clean training images (found 6 noisy, 0 clean)" in \
        error_lines(res)[0]
    assert writes == [] and not run.exists()


def test_multitask_init_from_a_missing_run_is_refused_before_anything_is_written(
        tmp_path, writes):
    config = tmp_path / "init.toml"
    config.write_text(f'[attributes]\ninit_from = "{tmp_path / "nowhere"}"\n')
    run = tmp_path / "run"
    res = invoke("fit", "--task", "attributes", "--method", "multitask", "--config", config,
                 "--out", run, "--image-size", SIZE, "--epochs", 1, "--no-progress")
    assert res.exit_code == 2, res.output
    assert "nowhere: `attributes.init_from` must be a run directory" in error_lines(res)[0]
    assert writes == [] and not run.exists()
