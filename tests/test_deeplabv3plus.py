"""`deeplabv3plus`: the ResNet50-DeepLabV3+ of the ISIC 2018 report's ensemble."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from lesionkeras.cli import main
from lesionkeras.models import registry
from lesionkeras.models.resnet_unet import make_backbone


def test_registered_with_a_resnet50_encoder_and_the_v3plus_decoder():
    assert "deeplabv3plus" in registry.names()
    model = registry.build("deeplabv3plus", input_shape=(None, None, 3), filters=1)
    out = model(np.zeros((2, 64, 64, 3), "float32"))
    assert out.shape == (2, 64, 64, 1) and out.dtype == "float32"
    assert model.name == "deeplabv3plus"
    # keras-hub ResNet50 encoder, unchanged (23,561,152 parameters: no conv biases).
    encoder = model.get_layer("encoder")
    assert encoder.count_params() == make_backbone("resnet50").count_params() == 23_561_152
    # ASPP and decoder width 16 * filters; the stride-4 projection a quarter of it.
    assert model.get_layer("aspp_project_conv").filters == 16
    assert model.get_layer("decoder_conv1").filters == 16
    assert model.get_layer("low_proj_conv").filters == 8
    assert model.get_layer("mc_dropout").rate == 0.0  # plain DeepLabV3+, no dropout
    # The V3+ decoder joins the stride-4 features (P2) with the up-sampled ASPP output.
    concat = model.get_layer("decoder_concat")
    assert [tuple(t.shape) for t in concat.input] == [(None, None, None, 16), (None, None, None, 8)]
    with pytest.raises(ValueError, match="multiples of 32"):
        registry.build("deeplabv3plus", input_shape=(48, 48, 3))


def test_default_width_is_the_papers_256():
    model = registry.build("deeplabv3plus", input_shape=(None, None, 3))
    assert model.get_layer("aspp_project_conv").filters == 256


@pytest.mark.slow
def test_cli_supervised_fit_and_reload(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "fit", "--model", "deeplabv3plus", "--filters", "1", "--image-size", "32",
        "--batch-size", "2", "--limit", "6", "--epochs", "1", "--no-progress", "--out", str(run),
    ])
    assert res.exit_code == 0, res.output
    model = keras.saving.load_model(run / "model.keras")  # no custom_objects
    assert model.name == "deeplabv3plus"
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["dice"])
    res = CliRunner().invoke(main, [
        "fit", "--model", "deeplabv3plus", "--image-size", "48", "--out", str(tmp_path / "bad"),
    ])
    assert res.exit_code == 2 and "divisible by 2**model.depth = 32" in res.output
