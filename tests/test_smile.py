"""SMILE loss (golden values, gradients), the DeepLab model and `fit --method smile`."""

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras import losses

LOG2 = math.log(2.0)


def _bce(z, x):
    return max(x, 0) - x * z + math.log1p(math.exp(-abs(x)))


def test_smile_loss_golden_4x4():
    # One image, two structures, logits 0 everywhere but pixel (0, 0) of structure 0 (x = 2).
    y = np.zeros((1, 4, 4, 2), np.float32)
    y[0, :2, :2, 0] = 1
    x = np.zeros_like(y)
    x[0, 0, 0, 0] = 2.0
    w = np.ones_like(y)
    w[0, ..., 1] = 0
    w[0, :2, :2, 1] = 1  # structure 1 missing: known negatives = structure 0's 4 pixels
    expected = (_bce(1, 2.0) + 3 * LOG2 + 12 * LOG2 + 4 * LOG2) / (16 + 4)
    got = float(losses.smile_loss(y, x, w))
    assert got == pytest.approx(expected, rel=1e-6)
    # All weights 1: the plain mean BCE; no weighted pixel: 0, not NaN.
    assert float(losses.smile_loss(y, x, np.ones_like(y))) == pytest.approx(
        (_bce(1, 2.0) + 31 * LOG2) / 32, rel=1e-6
    )
    assert float(losses.smile_loss(y, x, np.zeros_like(y))) == 0.0


@pytest.mark.parametrize(
    "z, x, expected",
    [(1.0, 0.0, LOG2), (0.0, 0.0, LOG2), (1.0, 100.0, 0.0), (0.0, -100.0, 0.0),
     (0.0, 3.0, 3.0 + math.log1p(math.exp(-3.0)))],
)
def test_pixel_bce_values(z, x, expected):
    v = losses.pixel_binary_crossentropy(np.full((1, 1, 1, 1), z, "float32"),
                                         np.full((1, 1, 1, 1), x, "float32"))
    assert float(v[0, 0, 0, 0]) == pytest.approx(expected, abs=1e-6)


def test_smile_loss_class_matches_function_through_sample_weight():
    rng = np.random.default_rng(0)
    y = (rng.random((2, 4, 4, 3)) > 0.5).astype("float32")
    x = rng.normal(size=y.shape).astype("float32")
    w = (rng.random(y.shape) > 0.4).astype("float32")
    via_keras = float(losses.SmileLoss()(y, x, sample_weight=w))
    assert via_keras == pytest.approx(float(losses.smile_loss(y, x, w)), rel=1e-6)
    clone = losses.SmileLoss.from_config(losses.SmileLoss().get_config())
    assert clone.reduction == "mean_with_sample_weight"


def test_masked_pixels_get_zero_gradient():
    rng = np.random.default_rng(1)
    y = (rng.random((1, 4, 4, 2)) > 0.5).astype("float32")
    w = np.ones_like(y)
    w[0, 1:3, :, 1] = 0
    x = tf.Variable(rng.normal(size=y.shape).astype("float32"))
    with tf.GradientTape() as tape:
        loss = losses.smile_loss(y, x, w)
    g = tape.gradient(loss, x).numpy()
    assert np.all(g[w == 0] == 0) and np.all(g[w == 1] != 0)


def test_smile_loss_shape_mismatch_raises():
    with pytest.raises(ValueError):
        losses.smile_loss(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 3)))


def test_deeplab_k_heads_and_mc_dropout():
    from lesionkeras.inference.predictor import mc_dropout_predict
    from lesionkeras.models import deeplab, registry

    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    model = registry.build("resnet18_deeplab", out_channels=3, filters=8, dropout=0.5)
    assert model.output_shape == (None, None, None, 3)
    assert model.predict(x, verbose=0).shape == (2, 32, 32, 3)
    _, std = mc_dropout_predict(model, x, samples=3)
    assert std.max() > 0
    # Off again after the call: deterministic inference.
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    plain = registry.build("resnet18_deeplab", out_channels=3, filters=8, dropout=0.0)
    _, std = mc_dropout_predict(plain, x, samples=2)
    assert std.max() == 0
    with pytest.raises(ValueError, match="multiples of 32"):
        deeplab.build_resnet_deeplab((48, 48, 3))


@pytest.mark.slow
def test_fit_smile_end_to_end(tmp_path):
    from lesionkeras import config as config_lib
    from lesionkeras.training import run

    cfg = config_lib.load_config("configs/smile.toml", {
        "out": str(tmp_path / "run"), "data.image_size": 32, "data.synthetic_count": 16,
        "train.epochs": 1, "train.batch_size": 4, "model.filters": 8,
        "train.progress": False, "smile.simulate_missing": 0.5,
    })
    result = run.fit(cfg, verbose=0, log=lambda *_: None)
    names = cfg.smile.structures.split(",")
    for key in ["loss", "dice"] + [f"dice_{n}" for n in names]:
        assert math.isfinite(result.metrics[key]), key
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    assert "dice_lesion" in saved
    ann = (result.run_dir / "annotations.csv").read_text().splitlines()
    assert ann[0].startswith("id,annotated_lesion") and "dropped_streaks" in ann[0]
    model = keras.saving.load_model(result.run_dir / "model.keras")
    assert model.output_shape[-1] == len(names)
    # evaluate: one row per structure, scored with the sigmoid heads.
    from lesionkeras.data import sources
    from lesionkeras.inference.evaluate import evaluate, format_summary
    from lesionkeras.inference.loading import load_predictor

    predictor = load_predictor(result.run_dir)
    assert predictor.structures == tuple(names)
    df = sources.load_manifest("synthetic", limit=3, synthetic_count=16, synthetic_size=32)
    per_image, summary = evaluate(predictor, df)
    assert list(summary["structures"]) == names
    assert summary["dice"] == pytest.approx(
        np.mean([v["dice"] for v in summary["structures"].values() if v["images"]]))
    assert per_image.shape[0] == 3 and f"dice_{names[-1]}" in per_image
    lines = format_summary(summary).splitlines()
    # Header, one row per structure, the mean; then (after a blank line) the boundary table.
    assert lines[len(names) + 1].startswith("mean") and lines[len(names) + 2] == ""


# --------------------------------------------------------------------------- #
# The (K+1)-way softmax baseline (`--method multiclass`)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "pixel, container, label",
    [
        ((0, 0, 0), 0, 0),      # nothing: background
        ((1, 0, 0), 0, 1),      # lesion only
        ((1, 1, 0), 0, 2),      # attribute inside the lesion: the attribute
        ((1, 1, 1), 0, 3),      # two attributes: the one listed last
        ((0, 1, 1), None, 3),   # no container: the one listed last
        ((1, 1, 0), None, 2),
        ((1, 1, 0), 1, 1),      # container 1 loses to structure 0
    ],
)
def test_multiclass_labels_rule(pixel, container, label):
    masks = np.asarray(pixel, "float32").reshape(1, 1, 1, 3)
    assert int(losses.multiclass_labels(masks, container)[0, 0, 0]) == label


def test_multiclass_probabilities_and_loss_golden():
    logits = np.log(np.asarray([0.1, 0.6, 0.2, 0.1], "float32")).reshape(1, 1, 1, 4)
    p = np.asarray(losses.multiclass_probabilities(logits, container=0))[0, 0, 0]
    np.testing.assert_allclose(p, [0.9, 0.2, 0.1], atol=1e-6)
    p = np.asarray(losses.multiclass_probabilities(logits))[0, 0, 0]
    np.testing.assert_allclose(p, [0.6, 0.2, 0.1], atol=1e-6)
    # Lesion + structure 1: label 2, loss -log 0.2; nothing: label 0, -log 0.1.
    y = np.asarray([[1, 1, 0], [0, 0, 0]], "float32").reshape(1, 1, 2, 3)
    x = np.concatenate([logits, logits], axis=2)
    got = float(losses.MulticlassLoss(container=0)(y, x))
    assert got == pytest.approx((-math.log(0.2) - math.log(0.1)) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="K \\+ 1 channels"):
        losses.MulticlassLoss()(y, x[..., :3])
    assert losses.MulticlassLoss.from_config(losses.MulticlassLoss(2).get_config()).container == 2


def test_softmax_structure_score_matches_sigmoid_dice():
    from lesionkeras import metrics

    y = np.zeros((1, 4, 4, 2), "float32")
    y[0, :2, :, 0] = 1  # lesion: top half
    y[0, :2, :2, 1] = 1  # attribute: top-left quarter, inside
    labels = np.asarray(losses.multiclass_labels(y, 0))
    logits = 10.0 * np.eye(3, dtype="float32")[labels]  # a perfect softmax
    for k in range(2):
        m = metrics.SoftmaxStructureScore("dice", container=0, class_id=k, name=f"d{k}")
        m.update_state(y, logits)
        assert float(m.result()) == pytest.approx(1.0)
    logits[0, :, :, 2] = -10.0  # the attribute is never predicted
    m = metrics.SoftmaxStructureScore("dice", container=0, class_id=1, name="d1")
    m.update_state(y, logits)
    assert float(m.result()) == pytest.approx(0.0, abs=1e-6)


def _tiny_cfg(tmp_path, method, **extra):
    from lesionkeras import config as config_lib

    return config_lib.load_config("configs/smile.toml", {
        "method": method, "out": str(tmp_path / method), "data.image_size": 32,
        "data.synthetic_count": 16, "train.epochs": 1, "train.batch_size": 4,
        "model.name": "unet", "model.filters": 8, "model.depth": 2,
        "train.progress": False, "train.image_every": 1, "smile.structures": "lesion,globules,streaks",
        **extra,
    })


@pytest.mark.slow
def test_multiclass_fit_evaluate_predict(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from lesionkeras.cli import main
    from lesionkeras.training import run

    result = run.fit(_tiny_cfg(tmp_path, "multiclass"), verbose=0, log=lambda *_: None)
    model = keras.saving.load_model(result.run_dir / "model.keras")
    assert model.output_shape[-1] == 4  # background + 3 structures
    assert model.loss.__class__.__name__ == "MulticlassLoss" and model.loss.container == 0
    for key in ("dice", "dice_lesion", "dice_globules", "dice_streaks", "loss"):
        assert math.isfinite(result.metrics[key]), key

    runner = CliRunner()
    out = runner.invoke(main, ["evaluate", str(result.run_dir), "--limit", "5",
                               "--out", str(tmp_path / "eval")])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    rows = {l.split()[0]: l.split() for l in lines if l.split() and l.split()[0] in
            ("lesion", "globules", "streaks", "mean")}
    assert set(rows) == {"lesion", "globules", "streaks", "mean"}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["structures"]["lesion"]["images"] == 5
    assert 0.0 <= summary["structures"]["lesion"]["dice"] <= 1.0
    assert float(rows["lesion"][1]) == pytest.approx(summary["structures"]["lesion"]["dice"], abs=1e-4)

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(images / "a.png")
    out = runner.invoke(main, ["predict", str(result.run_dir), str(images), "--out",
                               str(tmp_path / "pred")])
    assert out.exit_code == 0, out.output
    written = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert written == ["a_globules.png", "a_lesion.png", "a_streaks.png"]
    mask = np.asarray(Image.open(tmp_path / "pred" / "a_lesion.png"))
    assert mask.shape == (40, 48) and set(np.unique(mask)) <= {0, 255}


# --------------------------------------------------------------------------- #
# SMILEr relabelling
# --------------------------------------------------------------------------- #


def test_relabel_adds_top_fraction_only_on_unknown_pixels_of_missing_structures():
    from lesionkeras.data import missing

    flags = np.asarray([[1, 0]], "float32")  # structure 0 annotated, 1 not
    w = np.ones((1, 4, 4, 2), "float32")
    w[0, :, :, 1] = 0
    w[0, 0, :, 1] = 1  # row 0 is known (negative) for structure 1
    scores = np.full((1, 4, 4, 2), 0.9, "float32")
    scores[0, 1, :, 1] = [0.95, 0.6, 0.7, 0.8]
    scores[0, 2, :, 1] = [0.1, 0.2, 0.3, 0.4]  # predicted negative: never added
    # Candidates of structure 1: rows 1 and 3 (8 pixels). gamma 0.5 -> 4 of them.
    added = missing.relabel(w, flags, scores, 0.5)
    assert added[..., 0].sum() == 0  # annotated: untouched
    assert added[0, 0, :, 1].sum() == 0 and added[0, 2, :, 1].sum() == 0
    assert added[..., 1].sum() == 4
    # Highest scores first: 0.95 and the four 0.9 of row 3 tie; 0.6-0.8 are left.
    assert added[0, 1, 0, 1] and not added[0, 1, 1:, 1].any()
    assert missing.relabel(w, flags, scores, 1.0)[..., 1].sum() == 8
    assert missing.relabel(w, flags, scores, 0.0).sum() == 0
    # MC-dropout: lowest standard deviation first.
    sd = np.ones_like(scores)
    sd[0, 1, 1, 1] = sd[0, 1, 2, 1] = 0.01
    added = missing.relabel(w, flags, scores, 0.25, std=sd)
    assert added.sum() == 2 and added[0, 1, 1, 1] and added[0, 1, 2, 1]
    with pytest.raises(Exception, match="gamma"):
        missing.relabel(w, flags, scores, 1.5)


def test_smiler_single_structure_paper_rule(tmp_path):
    import pandas as pd

    from lesionkeras.training import run

    # K = 1: no container, the paper's weight maps (a non-annotated image is all unknown).
    cfg = _tiny_cfg(tmp_path, "smile", **{
        "smile.simulate_missing": 0.5, "smile.relabel_rounds": 1, "smile.relabel_epochs": 1,
        "train.image_every": 0, "smile.structures": "lesion",
    })
    result = run.fit(cfg, verbose=0, log=lambda *_: None)
    table = pd.read_csv(result.run_dir / "relabel.csv")
    assert list(table["structure"]) == ["lesion"]
    # Every added pixel lies in an image whose truth the simulation kept: all scored.
    assert table["true_positives"][0] + table["false_positives"][0] == table["added"][0]


def test_smiler_rounds_record_true_and_false_positives(tmp_path):
    import pandas as pd

    from lesionkeras.training import run

    cfg = _tiny_cfg(tmp_path, "smile", **{
        "smile.simulate_missing": 0.5, "smile.relabel_rounds": 2, "smile.relabel_epochs": 1,
        "train.image_every": 0,
    })
    lines = []
    result = run.fit(cfg, verbose=0, log=lines.append)
    table = pd.read_csv(result.run_dir / "relabel.csv")
    assert list(table["round"]) == [1, 1, 1, 2, 2, 2]
    assert list(table["gamma"]) == pytest.approx([0.5] * 3 + [1.0] * 3)
    assert (table["true_positives"] + table["false_positives"] <= table["added"]).all()
    # Union over rounds: never fewer labels later.
    by_round = table.groupby("round")["added"].sum()
    assert by_round[2] >= by_round[1]
    assert sum("SMILEr round 2/2" in l and "true /" in l for l in lines) == 1
    assert len(pd.read_csv(result.run_dir / "history.csv")) == 1 + 2
    assert (result.run_dir / "smile.keras").exists()
    assert list((result.run_dir / "tensorboard" / "smiler").iterdir())


def test_smiler_resumed_mid_round_trains_on_the_same_labels(tmp_path):
    """The rounds are stages of the one run loop: a run interrupted inside round 2 resumes
    there, on the labels chosen before the interruption (not re-predicted), epochs numbered on."""
    import numpy as np
    import pandas as pd

    from _helpers import InterruptAfter
    from lesionkeras.training import run

    cfg = _tiny_cfg(tmp_path, "smile", **{
        "smile.simulate_missing": 0.5, "smile.relabel_rounds": 2, "smile.relabel_epochs": 2,
        "train.image_every": 0,
    })
    lines = []
    # Epoch 0: SMILE; 1-2: round 1; 3-4: round 2. Stop at the end of epoch 3.
    with pytest.raises(KeyboardInterrupt):
        run.fit(cfg, verbose=0, log=lines.append, extra_callbacks=[InterruptAfter(3)])
    run_dir = Path(cfg.out)
    assert sum("SMILEr round" in line for line in lines) == 2
    state = np.load(run_dir / "relabel_state.npz")
    added_before = state["added"].copy()
    assert int(state["round"]) == 2 and added_before.any()
    assert not (run_dir / "relabel.csv").exists()

    lines = []
    result = run.fit(cfg, resume_dir=run_dir, verbose=0, log=lines.append)
    assert not any("SMILEr round" in line for line in lines)  # nothing re-predicted
    assert result.epochs_run == 1
    assert list(pd.read_csv(run_dir / "history.csv")["epoch"]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(np.load(run_dir / "relabel_state.npz")["added"], added_before)
    table = pd.read_csv(run_dir / "relabel.csv")
    assert list(table["round"]) == [1, 1, 1, 2, 2, 2]
    assert table.groupby("round")["added"].sum()[2] == added_before.sum()
    # Validation Dice of each round's last epoch (2 and 4), read from history.csv.
    hist = pd.read_csv(run_dir / "history.csv").set_index("epoch")
    np.testing.assert_allclose(table["val_dice"][table["round"] == 2],
                               [hist.loc[4, f"val_dice_{s}"] for s in ("lesion", "globules", "streaks")])


def test_mc_dropout_relabelling_needs_dropout_model(tmp_path):
    from click.testing import CliRunner

    from lesionkeras.cli import main

    out = CliRunner().invoke(main, [
        "fit", "--method", "smile", "--model", "unet", "--relabel-rounds", "1",
        "--uncertainty", "mc-dropout", "--out", str(tmp_path / "r"), "--limit", "8",
    ])
    assert out.exit_code == 2
    assert "mc-dropout" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_smiler_with_mc_dropout_on_deeplab(tmp_path, monkeypatch):
    import pandas as pd

    from lesionkeras.inference import predictor as inference_predictor
    from lesionkeras.training import run

    calls = []
    real = inference_predictor.mc_dropout_predict

    def spy(model, images, samples=10, batch_size=8):
        mean, std = real(model, images, samples=samples, batch_size=batch_size)
        calls.append((samples, float(std.max())))
        return mean, std

    monkeypatch.setattr(inference_predictor, "mc_dropout_predict", spy)
    cfg = _tiny_cfg(tmp_path, "smile", **{
        "model.name": "resnet18_deeplab", "model.dropout": 0.3, "smile.simulate_missing": 0.5,
        "smile.relabel_rounds": 1, "smile.relabel_epochs": 1, "smile.uncertainty": "mc-dropout",
        "smile.mc_samples": 3, "train.image_every": 0,
    })
    result = run.fit(cfg, verbose=0, log=lambda *_: None)
    assert calls and calls[0][0] == 3 and calls[0][1] > 0  # dropout active: non-zero std
    table = pd.read_csv(result.run_dir / "relabel.csv")
    assert list(table["structure"]) == ["lesion", "globules", "streaks"]


def _global_dice(run_dir, cfg):
    """Dice per structure over all validation pixels (full truth), of a run's model."""
    from PIL import Image

    from lesionkeras.data.missing import mask_column
    from lesionkeras.inference.loading import load_predictor
    from lesionkeras.training import run

    df, _ = run.prepare_data(cfg)
    df = df[df["split"] == "val"].reset_index(drop=True)
    predictor = load_predictor(run_dir)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in df["image"]]
    probs = np.stack(predictor.probabilities(images))
    scores = []
    for k, s in enumerate(predictor.structures):
        truth = np.stack([np.asarray(Image.open(p).convert("L")) >= 128
                          for p in df[mask_column(s)]])
        pred = probs[..., k] >= 0.5
        scores.append(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))
    return np.asarray(scores)


@pytest.mark.slow
def test_smile_beats_softmax_baseline_at_alpha_07(tmp_path):
    from lesionkeras.training import run

    dice = {}
    for method in ("multiclass", "smile"):
        cfg = _tiny_cfg(tmp_path, method, **{
            "smile.simulate_missing": 0.7, "smile.structures": "lesion,pigment_network",
            "data.synthetic_count": 48, "train.epochs": 6, "model.depth": 3,
            "train.image_every": 0, "train.lr": 3e-3, "seed": 0,
        })
        run.fit(cfg, verbose=0, log=lambda *_: None)
        dice[method] = _global_dice(cfg.out, cfg)
    print({m: d.round(3).tolist() for m, d in dice.items()})
    assert dice["smile"].mean() > dice["multiclass"].mean() + 0.05


def test_relabel_settings_are_checked():
    from lesionkeras import config as config_lib
    from lesionkeras.errors import ConfigError
    from lesionkeras.methods import smile

    with pytest.raises(ConfigError, match="needs `method = \"smile\"`"):
        smile._check_relabel(config_lib.load_config(
            None, {"method": "multiclass", "smile.relabel_rounds": 1}))
    with pytest.raises(ConfigError, match="gamma_max"):
        config_lib.load_config(None, {"smile.gamma_max": 1.5})
    with pytest.raises(ConfigError, match="uncertainty"):
        config_lib.load_config(None, {"smile.uncertainty": "entropy"})
    smile._check_relabel(config_lib.load_config(None, {
        "method": "smile", "smile.relabel_rounds": 2, "smile.uncertainty": "mc-dropout",
        "model.name": "resnet18_deeplab", "model.dropout": 0.2}))


@pytest.mark.slow
def test_smiler_round_adds_mostly_true_lesion_pixels(tmp_path):
    """Relabelling must find true pixels: after training at alpha 0.7, one SMILEr round adds
    lesion pixels to the images whose lesion mask was dropped, and most of them are lesion
    (scored against the full truth the simulation kept)."""
    import pandas as pd

    from lesionkeras.training import run

    cfg = _tiny_cfg(tmp_path, "smile", **{
        "smile.simulate_missing": 0.7, "smile.structures": "lesion", "smile.relabel_rounds": 1,
        "smile.relabel_epochs": 1, "smile.gamma_max": 0.3, "data.synthetic_count": 48,
        "train.epochs": 8,
        "model.depth": 3, "train.image_every": 0, "train.lr": 3e-3, "seed": 0,
    })
    result = run.fit(cfg, verbose=0, log=lambda *_: None)
    row = pd.read_csv(result.run_dir / "relabel.csv").iloc[0]
    print(row.to_dict())
    assert row["added"] > 0
    assert row["true_positives"] + row["false_positives"] == row["added"]
    # Lesions cover ~1/4 of an image, so pixels added at random would be ~0.25 true.
    # Seen: 0.78 on one machine, 0.69 on the CI machine (seed 0, same code; float
    # summation order differs), with a model at validation Dice ~0.58.
    assert row["true_positives"] / row["added"] >= 0.6
