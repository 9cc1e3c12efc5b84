import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras.cli import main
from lesionkeras.training import lr_find


def _tiny_model_and_data():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.0], "float32"))[:, None]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    import tensorflow as tf

    # One full batch: the loss then depends on the rate only, not on batch noise.
    return model, tf.data.Dataset.from_tensor_slices((x, y)).batch(64)


def test_range_test_finds_a_rate_in_range_and_restores_weights():
    model, ds = _tiny_model_and_data()
    before = [w.copy() for w in model.get_weights()]
    result = lr_find.lr_range_test(model, ds, min_lr=1e-4, max_lr=100.0, steps=60)
    assert 1e-4 <= result.suggestion <= 100.0
    # SGD on a linear least-squares problem diverges above lr ~ 2 / max eigenvalue.
    assert result.diverged and result.lrs[-1] < 100.0
    assert 1e-3 < result.suggestion < 1.0
    assert np.all(np.diff(result.lrs) > 0) and len(result.losses) == len(result.lrs)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert int(model.optimizer.iterations) == 0
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_suggest_is_steepest_descent():
    lrs = np.logspace(-5, 0, 6)
    smoothed = np.array([1.0, 0.99, 0.9, 0.5, 0.45, 2.0])
    assert lr_find.suggest(lrs, smoothed, skip_start=1, skip_end=1) == pytest.approx(1e-3)


def test_plot_writes_a_png(tmp_path):
    model, ds = _tiny_model_and_data()
    result = lr_find.lr_range_test(model, ds, min_lr=1e-4, max_lr=10.0, steps=20)
    lr_find.plot(result, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (640, 420)


def test_cli_lr_find_on_tiny_unet(tmp_path):
    out = tmp_path / "lr"
    res = CliRunner().invoke(main, [
        "lr-find", "--out", str(out), "--image-size", "32", "--filters", "4", "--depth", "2",
        "--limit", "8", "--batch-size", "4", "--steps", "8", "--min-lr", "1e-5", "--max-lr", "1",
    ])
    assert res.exit_code == 0, res.output
    assert "suggested learning rate:" in res.output
    table = pd.read_csv(out / "lr_find.csv")
    assert list(table.columns) == ["learning_rate", "loss", "smoothed_loss"]
    # The ramp may stop early on divergence, but never runs past --steps.
    assert len(table) in range(1, 9)
    assert table["learning_rate"].iloc[0] == pytest.approx(1e-5)
    assert (out / "lr_find.png").exists()


def test_cli_lr_find_bad_range(tmp_path):
    res = CliRunner().invoke(main, ["lr-find", "--out", str(tmp_path), "--min-lr", "1",
                                    "--max-lr", "0.1"])
    assert res.exit_code == 2 and "--min-lr" in res.output


def test_conclusive_only_when_the_loss_falls_beyond_its_noise():
    rng = np.random.default_rng(0)
    n = 30
    # Flat: the loss of a trained model, batch noise of std 0.04 around 0.22.
    flat = 0.22 + 0.04 * rng.standard_normal(n)
    smoothed_flat = pd.Series(flat).ewm(alpha=0.02, adjust=True).mean().to_numpy()
    assert not lr_find.is_conclusive(flat, smoothed_flat)
    # Falling: from 0.74 to 0.40 with noise 0.01.
    falling = np.linspace(0.74, 0.40, n) + 0.01 * rng.standard_normal(n)
    smoothed_falling = pd.Series(falling).ewm(alpha=0.02, adjust=True).mean().to_numpy()
    assert lr_find.is_conclusive(falling, smoothed_falling)
    assert not lr_find.is_conclusive(falling[:5], smoothed_falling[:5])  # too short to tell
    # A noisy first batch above a flat curve (ISIC, fold 2, 128 px stage 2): not a fall.
    isic = [0.282, 0.216, 0.138, 0.165, 0.290, 0.141, 0.149, 0.145, 0.220, 0.177, 0.249,
            0.206, 0.306, 0.282, 0.491, 0.454, 0.140]
    smoothed_isic = pd.Series(isic).ewm(alpha=0.02, adjust=True).mean().to_numpy()
    assert not lr_find.is_conclusive(isic, smoothed_isic)


def test_full_batch_range_test_is_conclusive():
    model, ds = _tiny_model_and_data()
    result = lr_find.lr_range_test(model, ds, min_lr=1e-4, max_lr=100.0, steps=60)
    assert result.conclusive
