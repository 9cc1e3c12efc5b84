"""SMILE loss (golden values, gradients), the DeepLab model and `fit --method smile`."""

import json
import math

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
    from lesionkeras.models import deeplab, registry

    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    model = registry.build("resnet18_deeplab", out_channels=3, filters=8, dropout=0.5)
    assert model.output_shape == (None, None, None, 3)
    assert model.predict(x, verbose=0).shape == (2, 32, 32, 3)
    _, std = deeplab.mc_dropout_predict(model, x, samples=3)
    assert std.max() > 0
    # Off again after the call: deterministic inference.
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    plain = registry.build("resnet18_deeplab", out_channels=3, filters=8, dropout=0.0)
    _, std = deeplab.mc_dropout_predict(plain, x, samples=2)
    assert std.max() == 0
    with pytest.raises(ValueError, match="multiples of 32"):
        deeplab.build_resnet_deeplab((48, 48, 3))


def test_fit_smile_end_to_end(tmp_path):
    from lesionkeras import config as config_lib
    from lesionkeras.trainers import run

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
