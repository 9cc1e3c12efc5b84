"""HD95/ASSD in `evaluate`: columns, means, empty cases, millimetres, CLI and report."""

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from _helpers import untrained_run
from lesionkeras import export, metrics
from lesionkeras.cli import main
from lesionkeras.inference.evaluate import evaluate, format_summary, list_images
from lesionkeras.inference.loading import load_predictor

SIZE = 32
SHAPE = (20, 24)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _square(top=4, left=3, side=10):
    m = np.zeros(SHAPE, bool)
    m[top : top + side, left : left + side] = True
    return m


def _write_case(folder, name, truths):
    """An image and its truth PNG(s): `mask` for the lesion, `attr_<name>` for others."""
    (folder / "img").mkdir(exist_ok=True)
    (folder / "gt").mkdir(exist_ok=True)
    Image.fromarray(np.full((*SHAPE, 3), 128, np.uint8)).save(folder / "img" / f"{name}.png")
    row = {"id": name, "image": str(folder / "img" / f"{name}.png")}
    for s, truth in truths.items():
        column = "mask" if s == "lesion" else f"attr_{s}"
        if truth is None:
            row[column] = ""
            continue
        path = folder / "gt" / f"{name}_{s}.png"
        Image.fromarray(truth.astype(np.uint8) * 255).save(path)
        row[column] = str(path)
    return row


def _fake(probs, structures=()):
    """A predictor that returns the given probability maps, in order."""
    maps = iter(probs)
    return types.SimpleNamespace(structures=structures, threshold=0.5, source="fake",
                                 probabilities=lambda images: [next(maps) for _ in images])


def _prob(*masks):
    return np.stack(masks, -1).astype(np.float32) * 0.8 + 0.1


def test_single_structure_golden(tmp_path):
    """Shifted square (hd95 3, assd 1.5: tests/test_boundary.py), a missed lesion, a clean
    image with nothing predicted, and a perfect prediction."""
    truth = _square()
    empty = np.zeros(SHAPE, bool)
    df = pd.DataFrame([_write_case(tmp_path, f"c{i}", {"lesion": t})
                       for i, t in enumerate([truth, truth, empty, truth])])
    probs = [_prob(np.roll(truth, 3, axis=1)), _prob(empty), _prob(empty), _prob(truth)]
    per, summary = evaluate(_fake(probs), df, out_dir=tmp_path / "ev", batch_size=3,
                            pixel_spacing=0.05)
    np.testing.assert_allclose(per["hd95"], [3.0, np.nan, 0.0, 0.0])
    np.testing.assert_allclose(per["assd"], [1.5, np.nan, 0.0, 0.0])
    np.testing.assert_allclose(per["hd95_mm"], [0.15, np.nan, 0.0, 0.0])
    np.testing.assert_allclose(per["assd_mm"], [0.075, np.nan, 0.0, 0.0])
    # Means over the three images where the score is defined; the missed lesion counted.
    assert summary["hd95"] == pytest.approx(1.0) and summary["assd"] == pytest.approx(0.5)
    assert summary["hd95_mm"] == pytest.approx(0.05)
    assert summary["boundary_undefined"] == 1 and summary["pixel_spacing"] == [0.05, 0.05]
    saved = pd.read_csv(tmp_path / "ev" / "per_image.csv")
    assert saved["hd95"].isna().tolist() == [False, True, False, False]  # an empty cell
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["boundary_undefined"] == 1
    text = format_summary(summary)
    assert "hd95_mm" in text and "pixels of the original image" in text
    assert text.splitlines()[-1].endswith(": 1")


def test_no_spacing_no_mm_columns(tmp_path):
    truth = _square()
    df = pd.DataFrame([_write_case(tmp_path, "c0", {"lesion": truth})])
    per, summary = evaluate(_fake([_prob(truth)]), df)
    assert {"hd95", "assd"} <= set(per) and "hd95_mm" not in per
    assert summary["pixel_spacing"] is None and "assd_mm" not in summary


def test_k_structures_golden(tmp_path):
    """Lesion: shifted square, then perfect. Globules: predicted nothing on a real
    truth (undefined), then no truth file at all (not scored)."""
    lesion = _square()
    globules = _square(top=2, left=12, side=5)
    empty = np.zeros(SHAPE, bool)
    df = pd.DataFrame([
        _write_case(tmp_path, "c0", {"lesion": lesion, "globules": globules}),
        _write_case(tmp_path, "c1", {"lesion": lesion, "globules": None}),
    ])
    probs = [_prob(np.roll(lesion, 3, axis=1), empty), _prob(lesion, globules)]
    per, summary = evaluate(_fake(probs, ("lesion", "globules")), df,
                            pixel_spacing=(0.1, 0.1))
    np.testing.assert_allclose(per["hd95_lesion"], [3.0, 0.0])
    np.testing.assert_allclose(per["assd_mm_lesion"], [0.15, 0.0])  # <score>_<structure>
    assert per["hd95_globules"].isna().all()  # undefined, then unscored
    per_s = summary["structures"]
    assert per_s["lesion"]["hd95"] == pytest.approx(1.5)
    assert per_s["lesion"]["boundary_undefined"] == 0
    assert per_s["globules"]["images"] == 1 and per_s["globules"]["boundary_undefined"] == 1
    assert math.isnan(per_s["globules"]["hd95"])
    # Over structures: the structures with a defined mean (the lesion only here).
    assert summary["hd95"] == pytest.approx(1.5) and summary["assd"] == pytest.approx(0.75)
    assert summary["boundary_undefined"] == 1
    rows = {line.split()[0]: line.split() for line in format_summary(summary).splitlines()
            if line.split()}
    assert rows["boundary"] == ["boundary", "lesion", "globules", "mean"]
    assert rows["hd95"] == ["hd95", "1.5000", "nan", "1.5000"]
    assert rows["boundary_undefined"] == ["boundary_undefined", "0", "1", "1"]
    assert rows["lesion"][1] == f"{per_s['lesion']['dice']:.4f}"  # the overlap table's row


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("bnd") / "run", size=SIZE, seed=2,
                         overrides={"train.threshold": 0.5})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "images").mkdir()
    (data / "masks").mkdir()
    for i in range(4):
        image = export.parity_images(48, 1, seed=70 + i)[0]  # 48 px: not the model's 32
        Image.fromarray(image).save(data / "images" / f"case{i}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        if i:  # case0 has no lesion
            mask[4 * i : 20 + 5 * i, 6 : 18 + 5 * i] = 255
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")
    return data


def test_cli_columns_at_original_size_mm_and_report(run_dir, data_dir, tmp_path):
    out = tmp_path / "ev"
    res = invoke("evaluate", run_dir, "--data", data_dir, "--out", out,
                 "--pixel-spacing", "0.02", "--report")
    assert res.exit_code == 0, res.output
    per = pd.read_csv(out / "per_image.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert {"hd95", "assd", "hd95_mm", "assd_mm"} <= set(per)
    # Scored on each image's own 48x48 grid, after the prediction is resized back.
    predictor = load_predictor(run_dir)
    images = [np.asarray(Image.open(p)) for p in list_images(data_dir)["image"]]
    for i, prob in enumerate(predictor.probabilities(images)):
        assert prob.shape[:2] == (48, 48)
        truth = np.asarray(Image.open(data_dir / "masks" / f"case{i}.png")) > 127
        pred = prob[..., 0] >= 0.5
        expected = metrics.boundary_scores(truth, pred)
        if truth.any() == pred.any():  # both empty or both not: defined
            assert np.isfinite(per.loc[i, ["hd95", "assd"]].to_numpy(float)).all()
        assert per.loc[i, "hd95"] == pytest.approx(expected["hd95"], abs=1e-5, nan_ok=True)
        assert per.loc[i, "assd"] == pytest.approx(expected["assd"], abs=1e-5, nan_ok=True)
    np.testing.assert_allclose(per["hd95_mm"], per["hd95"] * 0.02, atol=1e-6)
    assert summary["hd95"] == pytest.approx(per["hd95"].mean(), abs=1e-5)
    assert summary["boundary_undefined"] == int(per["hd95"].isna().sum())
    assert any(line.startswith("hd95_mm ") for line in res.output.splitlines())
    page = (out / "report.html").read_text()
    assert "<td>hd95</td>" in page and "<td>boundary_undefined</td>" in page


def test_cli_anisotropic_spacing_and_bad_spacing(run_dir, data_dir, tmp_path):
    res = invoke("evaluate", run_dir, "--data", data_dir, "--out", tmp_path / "a",
                 "--pixel-spacing", "0.02,0.04")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["pixel_spacing"] == [0.02, 0.04]
    for bad in ("-1", "0", "abc", "1,2,3", "inf"):
        res = invoke("evaluate", run_dir, "--data", data_dir, "--out", tmp_path / "b",
                     "--pixel-spacing", bad)
        assert res.exit_code == 2 and "--pixel-spacing" in res.output, res.output
        assert "Traceback" not in res.output and not (tmp_path / "b").exists()
