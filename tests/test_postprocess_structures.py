"""`evaluate --postprocess` and `--report` for K-structure (smile / multiclass) models."""

import json
import re
import types

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from _helpers import untrained_run
from lesionkeras import config as config_lib
from lesionkeras import metrics, postprocess
from lesionkeras.cli import main
from lesionkeras.data import pipeline, sources, synthetic
from lesionkeras.inference.evaluate import evaluate, postprocess_config
from lesionkeras.inference.loading import load_predictor

SIZE = 32
NAMES = ("lesion", "globules")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def smile_run(tmp_path_factory):
    """An untrained two-structure SMILE U-Net and its run config."""
    return untrained_run(
        tmp_path_factory.mktemp("smile") / "run", size=SIZE, seed=4, out_channels=len(NAMES),
        overrides={"method": "smile", "smile.structures": ",".join(NAMES),
                   "postprocess.min_component_fraction": 0.01})


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    """Five synthetic ISIC 2018 cases with lesion and attribute masks."""
    return synthetic.write_isic(tmp_path_factory.mktemp("isic"), count=5, size=48)


def _dice(truth, mask, threshold):
    return float(metrics.per_image_scores(truth, mask.astype(np.float32),
                                          threshold=threshold)["dice"][0])


def test_morph_runs_per_structure_on_a_model(smile_run, synthetic_data, tmp_path):
    predictor = load_predictor(smile_run)
    df = sources.load_manifest(str(synthetic_data))
    # Decoded as `evaluate` decodes them (JPEG decoders differ in the last bit).
    images = [pipeline.decode_image(p).numpy() for p in df["image"]]
    probs = predictor.probabilities(images)
    # The untrained model's median probability as threshold: fragmented raw masks.
    thr = round(float(np.median(np.concatenate([p.ravel() for p in probs]))), 4)
    predictor.threshold = thr
    cfg = postprocess_config(smile_run)
    per, summary = evaluate(predictor, df, out_dir=tmp_path, postprocess=("morph",),
                                      post_cfg=cfg)
    assert len(per) == 5
    changed = 0
    for i, prob in enumerate(probs):
        for k, s in enumerate(NAMES):
            raw = prob[..., k] >= thr
            expected = postprocess.morphology(raw, cfg)  # this channel alone
            changed += int((expected != raw).any())
            column = "mask" if s == "lesion" else f"attr_{s}"
            truth = np.asarray(Image.open(df[column].iloc[i]).convert("L")) >= 128
            assert per[f"dice_{s}_post"].iloc[i] == pytest.approx(
                _dice(truth, expected, thr), abs=1e-5)
            assert per[f"dice_{s}"].iloc[i] == pytest.approx(_dice(truth, raw, thr), abs=1e-5)
    assert changed > 0  # morphology did change masks
    post = summary["postprocess"]
    assert post["steps"] == ["morph"] and set(post["structures"]) == set(NAMES)
    for s in NAMES:
        assert post["structures"][s]["dice"] == pytest.approx(per[f"dice_{s}_post"].mean(),
                                                              abs=1e-6)
    assert post["dice"] == pytest.approx(
        np.mean([post["structures"][s]["dice"] for s in NAMES]), abs=1e-6)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["postprocess"]["structures"]["globules"]["images"] == 5


def test_cli_crf_morph_side_by_side_and_report(smile_run, synthetic_data, tmp_path):
    out = tmp_path / "ev"
    res = invoke("evaluate", smile_run, "--data", synthetic_data, "--out", out,
                 "--postprocess", "crf,morph", "--report")
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()
            if line.split() and line.split()[0] in (*NAMES, "mean")}
    assert set(rows) == {*NAMES, "mean"}
    for s in NAMES:  # dice raw, dice after crf+morph, ...
        assert rows[s][1:3] == [f"{summary['structures'][s]['dice']:.4f}",
                                f"{summary['postprocess']['structures'][s]['dice']:.4f}"]

    per = pd.read_csv(out / "per_image.csv")
    assert len(per) == 5 and {"dice_lesion_post", "dice_globules_post", "dice_mean_post"} <= set(per)
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http" not in page
    ids = re.findall(r"<tr><td>\d+</td><td>([^<]+)</td>", page)
    assert ids == per.sort_values(["dice_mean_post", "id"])["id"].tolist()  # worst first
    shown = [float(x) for x in re.findall(r"<tr><td>\d+</td><td>[^<]+</td><td>([\d.]+)</td>", page)]
    assert shown == sorted(shown)
    sources_ = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources_) == 5 * len(NAMES)  # one panel per image and structure
    for src in sources_:
        w, h = Image.open(out / src).size
        assert (w, h) == (2 * 48 + 4, 48)
    by_id = per.set_index("id")
    assert sources_[:2] == [by_id.loc[ids[0], f"overlay_{s}"] for s in NAMES]


def _write_case(folder, name, image, truths):
    (folder / "img").mkdir(exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    Image.fromarray(image).save(folder / "img" / f"{name}.png")
    row = {"id": name, "image": str(folder / "img" / f"{name}.png")}
    for s, truth in truths.items():
        path = folder / "gt" / f"{name}_{s}.png"
        Image.fromarray(truth.astype(np.uint8) * 255).save(path)
        row["mask" if s == "lesion" else f"attr_{s}"] = str(path)
    return row


def test_morph_golden_per_structure(tmp_path):
    """Lesion: a square plus a speck; globules: a square with a hole. Morph fixes both."""
    square = np.zeros((16, 16), bool)
    square[4:10, 4:10] = True  # 36 pixels
    lesion = square.copy()
    lesion[14, 14] = True  # a 1-pixel speck, 1/256 < 0.01 of the image
    globules = square.copy()
    globules[6:8, 6:8] = False  # a 4-pixel hole
    prob = np.stack([lesion, globules], -1).astype(np.float32) * 0.8 + 0.1
    df = pd.DataFrame([_write_case(tmp_path, "c0", np.full((16, 16, 3), 128, np.uint8),
                                   {"lesion": square, "globules": square})])
    fake = types.SimpleNamespace(
        structures=NAMES, threshold=0.5, source="fake",
        probabilities=lambda images: [prob for _ in images],
    )
    cfg = config_lib.PostprocessConfig(min_component_fraction=0.01, fill_holes=True,
                                       keep_largest=True)
    per, summary = evaluate(fake, df, postprocess=("morph",), post_cfg=cfg)
    row = per.iloc[0]
    assert row["dice_lesion"] == pytest.approx(2 * 36 / 73, abs=1e-5)
    assert row["dice_globules"] == pytest.approx(2 * 32 / 68, abs=1e-5)
    assert row["dice_lesion_post"] == pytest.approx(1.0) and row["dice_globules_post"] == pytest.approx(1.0)
    assert row["dice_mean"] == pytest.approx((2 * 36 / 73 + 2 * 32 / 68) / 2, abs=1e-5)
    assert summary["postprocess"]["dice"] == pytest.approx(1.0)
    assert summary["dice"] < 0.97
