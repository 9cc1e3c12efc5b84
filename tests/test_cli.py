"""The `lesionkeras` commands, driven with click's CliRunner."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import __version__
from lesionkeras.cli import main

TINY = ["--image-size", "32", "--filters", "8", "--depth", "2", "--batch-size", "4",
        "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_generic(root, n=6, size=(40, 48), seed=0):
    """images/ + masks/ with rectangles of known position."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = rng.integers(0, 80, size + (3,), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[8:28, 10 + i : 30 + i] = 255
        img[mask > 0] += 150
        Image.fromarray(img).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
    return root


def test_version_and_help():
    assert invoke("--version").output.strip().endswith(__version__)
    out = invoke("--help").output
    for command in ("fit", "evaluate", "predict", "data"):
        assert command in out
    assert "synth" in invoke("data", "--help").output


def test_data_synth_and_check(tmp_path):
    out = tmp_path / "synth"
    res = invoke("data", "synth", "--out", out, "--count", 5, "--size", 32, "--seed", 3)
    assert res.exit_code == 0, res.output
    masks = sorted((out / "ISIC2018_Task1_Training_GroundTruth").glob("*.png"))
    assert len(masks) == 5
    attrs = list((out / "ISIC2018_Task2_Training_GroundTruth_v3").glob("*_attribute_*.png"))
    assert len(attrs) == 25
    csv = pd.read_csv(
        out / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    )
    assert len(csv) == 5 and (csv.drop(columns="image").sum(axis=1) == 1).all()
    res = invoke("data", "check", out)
    assert res.exit_code == 0 and "5" in res.output
    # Writing again into the same non-empty folder is refused.
    res = invoke("data", "synth", "--out", out, "--count", 2, "--size", 32)
    assert res.exit_code == 2 and "not empty" in res.output


def test_data_check_reports_every_bad_file(tmp_path):
    root = write_generic(tmp_path / "d")
    (root / "images" / "case0.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "case1.png")
    (root / "masks" / "case2.png").unlink()
    res = invoke("data", "check", root)
    assert res.exit_code == 2
    for name in ("images/case0.png", "masks/case1.png", "case2.png"):
        assert name in res.output
    assert "Traceback" not in res.output


def test_fit_evaluate_predict_on_a_folder(tmp_path):
    data = write_generic(tmp_path / "d", n=8)
    run = tmp_path / "run"
    res = invoke("fit", "--data", data, "--out", run, "--epochs", 2, *TINY, "--seed", 1)
    assert res.exit_code == 0, res.output
    for name in ("config.toml", "model.keras", "last.keras", "history.csv", "metrics.json"):
        assert (run / name).exists(), name
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 2
    assert {"loss", "val_dice", "val_threshold_jaccard", "learning_rate"} <= set(hist.columns)
    assert np.allclose(hist["learning_rate"], 1e-3)
    assert f"tensorboard --logdir {run / 'tensorboard'}" in res.output
    events = list((run / "tensorboard").rglob("events.out.tfevents*"))
    assert any("images" in str(e) for e in events) and any("train" in str(e) for e in events)
    cfg_text = (run / "config.toml").read_text()
    assert "mean = [" in cfg_text and "std = [" in cfg_text
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["val_images"] == 2

    res = invoke("evaluate", run, "--data", data, "--out", tmp_path / "ev", "--threshold", 0.4)
    assert res.exit_code == 0, res.output
    per_image = pd.read_csv(tmp_path / "ev" / "per_image.csv")
    assert len(per_image) == 8 and per_image["dice"].between(0, 1).all()
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["threshold"] == 0.4
    assert summary["dice"] == pytest.approx(per_image["dice"].mean(), abs=1e-5)
    assert "threshold_jaccard" in res.output

    res = invoke("predict", run, data / "images", "--out", tmp_path / "pred", "--overlay",
                 "--probabilities")
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(tmp_path / "pred" / "case3_mask.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(tmp_path / "pred" / "case3_overlay.png")).shape == (40, 48, 3)
    assert (tmp_path / "pred" / "case3_prob.png").exists()
    # A single file, and a .keras file path instead of the run directory.
    res = invoke("predict", run / "model.keras", data / "images" / "case1.png",
                 "--out", tmp_path / "one")
    assert res.exit_code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == [
        "case1_mask.png"
    ]


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("corrupt", "cannot decode image"),
        ("mask_size", "mask is 10x10 but image is 48x40"),
        ("no_mask", "no mask for this image"),
    ],
)
def test_fit_refuses_bad_input_before_writing(tmp_path, breakage, message):
    data = write_generic(tmp_path / "d")
    if breakage == "corrupt":
        (data / "images" / "case2.png").write_bytes(b"\x89PNG broken")
    elif breakage == "mask_size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "masks" / "case2.png")
    else:
        (data / "masks" / "case2.png").unlink()
    run = tmp_path / "run"
    res = invoke("fit", "--data", data, "--out", run, "--epochs", 1, *TINY)
    assert res.exit_code == 2
    assert message in res.output and "case2.png" in res.output
    assert "Traceback" not in res.output
    assert not run.exists()


def test_fit_reports_all_bad_files_at_once(tmp_path):
    data = write_generic(tmp_path / "d")
    (data / "images" / "case0.png").write_bytes(b"junk")
    (data / "masks" / "case4.png").unlink()
    res = invoke("fit", "--data", data, "--out", tmp_path / "run", *TINY)
    assert res.exit_code == 2
    error_lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 2
    assert "case0.png" in error_lines[0] and "case4.png" in error_lines[1]


def test_fit_converts_grey_and_rgba_and_warns_once_on_soft_masks(tmp_path):
    data = write_generic(tmp_path / "d", n=6)
    grey = np.asarray(Image.open(data / "images" / "case0.png").convert("L"))
    Image.fromarray(grey).save(data / "images" / "case0.png")
    rgba = np.asarray(Image.open(data / "images" / "case1.png").convert("RGBA"))
    Image.fromarray(rgba).save(data / "images" / "case1.png")
    for i in (2, 3, 4):
        m = np.asarray(Image.open(data / "masks" / f"case{i}.png")).copy()
        m[m > 0] = 200  # soft, non-binary values
        m[0, 0] = 90
        Image.fromarray(m).save(data / "masks" / f"case{i}.png")
    res = invoke("fit", "--data", data, "--out", tmp_path / "run", "--epochs", 1, *TINY)
    assert res.exit_code == 0, res.output
    assert "grayscale image" in res.output and "case0.png" in res.output
    assert "alpha channel dropped" in res.output
    soft = [l for l in res.output.splitlines() if "not binary" in l]
    assert len(soft) == 1 and "2 more files" in soft[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--data", "/nonexistent/folder"], "no such file or folder"),
        (["--optimizer", "rmsprop"], "rmsprop"),
        (["--image-size", "36", "--depth", "4"], "must be a multiple of 16"),
        (["--model", "bogus"], "`--model bogus` is not a segmentation model"),
        (["--model", "resnet_classifier"], "choose from deeplabv3plus"),
    ],
)
def test_fit_usage_errors_exit_2(tmp_path, args, needle):
    res = invoke("fit", "--out", tmp_path / "run", *args)
    assert res.exit_code == 2 and needle in res.output
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


def test_fit_empty_folder_and_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    res = invoke("fit", "--data", tmp_path / "empty", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "empty folder" in res.output
    (tmp_path / "odd").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "odd" / "x.png")
    res = invoke("fit", "--data", tmp_path / "odd", "--out", tmp_path / "run")
    assert res.exit_code == 2 and "unknown layout" in res.output


def test_fit_bad_config_key_names_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochz = 3\n")
    res = invoke("fit", "--config", cfg, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "train.epochz" in res.output and str(cfg) in res.output
    cfg.write_text("[train]\nlr = 'fast'\n")
    res = invoke("fit", "--config", cfg, "--out", tmp_path / "run")
    assert res.exit_code == 2 and "train.lr" in res.output


def test_flags_override_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nepochs = 5\nlr = 0.01\n[data]\nlimit = 16\n")
    run = tmp_path / "run"
    res = invoke("fit", "--config", cfg, "--epochs", 1, "--out", run, *TINY)
    assert res.exit_code == 0, res.output
    text = (run / "config.toml").read_text()
    assert "epochs = 1" in text and "lr = 0.01" in text and "limit = 16" in text


def test_evaluate_and_predict_bad_inputs(tmp_path):
    res = invoke("evaluate", tmp_path / "nope", "--data", "synthetic")
    assert res.exit_code == 2 and "nope" in res.output
    (tmp_path / "m.txt").write_text("x")
    res = invoke("predict", tmp_path / "m.txt", tmp_path, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "unknown model format" in res.output


def test_evaluate_split_rebuilds_the_runs_validation_set(tmp_path):
    data = write_generic(tmp_path / "d", n=10)
    run = tmp_path / "run"
    assert invoke("fit", "--data", data, "--out", run, "--epochs", 1, *TINY,
                  "--val-fraction", 0.3).exit_code == 0
    res = invoke("evaluate", run, "--split", "val")
    assert res.exit_code == 0, res.output
    per_image = pd.read_csv(run / f"eval-{data.name}-val" / "per_image.csv")
    assert len(per_image) == 3
    res = invoke("evaluate", run / "model.keras", "--split", "val")
    assert res.exit_code == 2 and "run directory" in res.output


def test_ctrl_c_names_the_run_to_resume_or_says_nothing_was_written(tmp_path, monkeypatch):
    from lesionkeras.training import run

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    args = ["fit", "--limit", "8", *TINY, "--epochs", "1"]
    # Before the run's first file: nothing to resume.
    monkeypatch.setattr(run.files, "run_lock", interrupt)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130
    assert res.output.strip().splitlines()[-1] == "interrupted before the run wrote anything"
    monkeypatch.undo()
    # In training, with no --out: the command names the folder that was made.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "_run_stages", interrupt)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 130
    (made,) = [p for p in (tmp_path / "runs").iterdir() if (p / "config.toml").exists()]
    assert res.output.strip().splitlines()[-1] == (
        f"interrupted; continue with: lesionkeras fit --resume {made.relative_to(tmp_path)}")
