"""`predict --mc-samples N`: Monte-Carlo dropout mean and standard deviation maps."""

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import export
from lesionkeras.cli import main
from lesionkeras.inference.loading import load_predictor
from lesionkeras.inference.predictor import mc_dropout_predictor, mc_probabilities
from lesionkeras.models import deeplab, registry

SIZE = 32


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _run(folder, model, **over):
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    config_lib.load_config(overrides={
        "data.image_size": SIZE, "data.mean": [100.0, 100.0, 100.0],
        "data.std": [50.0, 50.0, 50.0], **over,
    }).save(folder / "config.toml")
    return folder


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(export.parity_images(40, 1, seed=60 + i)[0][:, :36]).save(
            folder / f"img{i}.png")
    return folder


def test_mc_statistics_of_a_known_dropout_model(tmp_path):
    """Logit 4 or 0 with probability 1/2 each: mean and std follow from the sigmoid."""
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer=keras.initializers.Constant(
        [[[[1.0], [0.0], [0.0]]]]))(inputs)
    outputs = deeplab.MCDropout(0.5, seed=1)(x)
    run = _run(tmp_path / "run", keras.Model(inputs, outputs))
    predictor, layers = mc_dropout_predictor(load_predictor(run))
    assert len(layers) == 1
    image = np.full((SIZE, SIZE, 3), 200, np.uint8)  # normalised red channel: 2 -> logit 0 or 4
    (mean,), (std,) = mc_probabilities(predictor, [image], samples=40, layers=layers)
    hi = 1 / (1 + np.exp(-4.0))
    assert mean.shape == std.shape == (SIZE, SIZE, 1)
    assert mean.mean() == pytest.approx((0.5 + hi) / 2, abs=0.01)
    assert std.mean() == pytest.approx((hi - 0.5) / 2, abs=0.01)
    # Switched off again afterwards: the plain prediction is deterministic (logit 2).
    plain = predictor.probabilities([image])[0]
    np.testing.assert_allclose(plain, 1 / (1 + np.exp(-2.0)), atol=1e-5)


def test_unet_dropout_is_swapped_in_a_weight_sharing_clone(tmp_path):
    keras.utils.set_random_seed(4)
    model = registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=8, depth=2, dropout=0.5)
    run = _run(tmp_path / "run", model, **{"model.dropout": 0.5})
    plain = load_predictor(run)
    mc, layers = mc_dropout_predictor(plain)
    assert len(layers) == 1 and mc.model is not plain.model
    first = next(l for l in plain.model.layers if l.weights)
    assert any(w is first.weights[0] for w in mc.model.weights)  # shared, not copied
    image = export.parity_images(SIZE, 1, seed=2)[0]
    before = plain.probabilities([image])[0]
    (mean,), (std,) = mc_probabilities(mc, [image], samples=6, layers=layers)
    assert std.max() > 1e-3 and np.abs(mean - before).max() > 1e-4
    # Neither the original model nor the clone keeps dropout on afterwards.
    np.testing.assert_allclose(plain.probabilities([image])[0], before, atol=1e-6)
    np.testing.assert_allclose(mc.probabilities([image])[0], before, atol=1e-5)


@pytest.mark.slow
def test_cli_mc_samples_on_the_deeplab(tmp_path, images_dir):
    keras.utils.set_random_seed(6)
    model = registry.build("resnet18_deeplab", input_shape=(SIZE, SIZE, 3), filters=8,
                           dropout=0.5)
    run = _run(tmp_path / "run", model, **{"model.name": "resnet18_deeplab"})
    out = tmp_path / "mc"
    res = invoke("predict", run, images_dir, "--out", out, "--mc-samples", "5")
    assert res.exit_code == 0, res.output
    for i in range(2):
        mean = np.asarray(Image.open(out / f"img{i}_mean.png"), np.float32) / 255
        std = np.asarray(Image.open(out / f"img{i}_std.png"), np.float32) / 510
        mask = np.asarray(Image.open(out / f"img{i}_mask.png")) > 127
        assert mean.shape == std.shape == mask.shape == (40, 36)
        assert std.max() > 0.005
        # The mask is the thresholded mean (up to the PNG's 1/255 rounding).
        sure = np.abs(mean - 0.5) > 1 / 255
        np.testing.assert_array_equal(mask[sure], mean[sure] >= 0.5)


@pytest.mark.parametrize("kind, message", [
    ("no_dropout", "no dropout layer"),
    ("ensemble", "combines with neither"),
])
def test_mc_samples_refused_without_dropout(tmp_path, images_dir, kind, message):
    model = registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=8, depth=2)
    run = _run(tmp_path / "run", model)
    args = [run] if kind == "no_dropout" else ["--ensemble", run, run]
    res = invoke("predict", *args, images_dir, "--out", tmp_path / "out", "--mc-samples", "3")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mc_samples_refused_for_an_exported_model(tmp_path, images_dir):
    model = registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=8, depth=2, dropout=0.5)
    run = _run(tmp_path / "run", model)
    export.export_model(run, tmp_path / "m.tflite", format="tflite")
    res = invoke("predict", tmp_path / "m.tflite", images_dir, "--out", tmp_path / "out",
                 "--mc-samples", "3")
    assert res.exit_code == 2 and "needs a Keras model" in res.output
    assert not (tmp_path / "out").exists()
