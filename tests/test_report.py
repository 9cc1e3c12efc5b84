"""`evaluate --postprocess` side by side, `evaluate --report`, `predict --postprocess`."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage

from _helpers import untrained_run
from lesionkeras import export, postprocess
from lesionkeras.cli import main
from lesionkeras.inference.evaluate import evaluate, list_images, postprocess_config
from lesionkeras.inference.loading import load_predictor

SIZE = 32


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("rep") / "run", size=SIZE, seed=2, overrides={
        "train.threshold": 0.5, "postprocess.min_component_fraction": 0.01})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "images").mkdir()
    (data / "masks").mkdir()
    for i in range(5):
        image = export.parity_images(48, 1, seed=50 + i)[0]
        Image.fromarray(image).save(data / "images" / f"case{i}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[4 * i : 20 + 5 * i, 6 : 18 + 5 * i] = 255  # different truths -> different Dice
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")
    return data


def test_evaluate_postprocess_side_by_side_and_report(run_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    res = invoke("evaluate", run_dir, "--data", data_dir, "--out", out,
                 "--postprocess", "crf,morph", "--report")
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if line.startswith("metric"))
    assert header.split()[1:3] == ["raw", "crf+morph"]
    dice_line = next(line for line in res.output.splitlines() if line.startswith("dice "))
    summary = json.loads((out / "summary.json").read_text())
    post = summary["postprocess"]
    assert post["steps"] == ["crf", "morph"]
    assert post["config"]["min_component_fraction"] == 0.01  # from the run's config.toml
    assert dice_line.split()[1:] == [f"{summary['dice']:.4f}", f"{post['dice']:.4f}"]

    per = pd.read_csv(out / "per_image.csv")
    assert {"dice", "dice_post", "jaccard_post"} <= set(per.columns) and len(per) == 5
    assert per["dice_post"].mean() == pytest.approx(post["dice"], abs=1e-5)
    assert per["dice"].nunique() > 1

    # The report: every referenced image exists; rows run from worst to best Dice.
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http" not in page  # self-contained
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 5
    for src in sources:
        png = out / src
        assert png.exists(), src
        w, h = Image.open(png).size
        assert h == 48 and w == 2 * 48 + 4  # image | overlay
    ids = re.findall(r"<tr><td>\d+</td><td>([^<]+)</td>", page)
    expected = per.sort_values(["dice_post", "id"])["id"].tolist()
    assert ids == expected
    shown = [float(x) for x in re.findall(r"<tr><td>\d+</td><td>[^<]+</td><td>([\d.]+)</td>", page)]
    assert shown == sorted(shown) and shown[0] < shown[-1]
    # Each id's panel is the one written for that id.
    by_id = dict(zip(per["id"], per["overlay"]))
    assert sources == [by_id[i] for i in ids]


def test_report_without_postprocess_sorts_by_raw_dice(run_dir, data_dir, tmp_path):
    predictor = load_predictor(run_dir)
    df = list_images(data_dir)
    per, _ = evaluate(predictor, df, out_dir=tmp_path, report=True)
    page = (tmp_path / "report.html").read_text()
    ids = re.findall(r"<tr><td>\d+</td><td>([^<]+)</td>", page)
    assert ids == per.sort_values(["dice", "id"])["id"].tolist()
    assert all((tmp_path / s).exists() for s in re.findall(r'<img src="([^"]+)"', page))
    # The panel's right half: red tint where predicted, green outline of the truth.
    panel = np.asarray(Image.open(tmp_path / per["overlay"].iloc[0]))
    assert (panel[..., 1] == 220).any()


def test_predict_postprocess_morph(run_dir, data_dir, tmp_path):
    predictor = load_predictor(run_dir)
    images = [np.asarray(Image.open(data_dir / "images" / f"case{i}.png")) for i in range(5)]
    probs = predictor.probabilities(images)
    # The untrained model's median probability as threshold: fragmented raw masks.
    thr = round(float(np.median(probs[0])), 4)
    res = invoke("predict", run_dir, data_dir / "images", "--out", tmp_path / "p",
                 "--postprocess", "morph", "--threshold", thr)
    assert res.exit_code == 0, res.output
    logged = json.loads((tmp_path / "p" / "postprocess.json").read_text())
    assert logged["steps"] == ["morph"] and logged["config"]["keep_largest"] is True
    cfg = postprocess_config(run_dir)
    raw_components = []
    for i, prob in enumerate(probs):
        expected = postprocess.morphology(prob[..., 0] >= thr, cfg)
        got = np.asarray(Image.open(tmp_path / "p" / f"case{i}_mask.png")) > 127
        np.testing.assert_array_equal(got, expected)
        assert ndimage.label(got, structure=np.ones((3, 3)))[1] <= 1
        raw_components.append(ndimage.label(prob[..., 0] >= thr, structure=np.ones((3, 3)))[1])
    assert max(raw_components) > 1  # the raw masks did need cleaning


def test_bad_postprocess_step_exits_2(run_dir, data_dir, tmp_path):
    res = invoke("evaluate", run_dir, "--data", data_dir, "--out", tmp_path / "e",
                 "--postprocess", "crf,blur")
    assert res.exit_code == 2 and "unknown --postprocess step 'blur'" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "e").exists()
