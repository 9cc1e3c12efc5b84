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
    # Plain SGD: an optimiser without slot variables is built before the step is traced,
    # so Keras traces the ResNet50 train step once instead of twice (Adam creates its
    # slots in the first trace, which makes TensorFlow trace again).
    (tmp_path / "sgd.toml").write_text('[train]\noptimizer = "sgd"\nmomentum = 0.0\n')
    res = CliRunner().invoke(main, [
        "fit", "--model", "deeplabv3plus", "--filters", "1", "--image-size", "32",
        "--batch-size", "2", "--limit", "6", "--epochs", "1", "--no-progress", "--out", str(run),
        "--config", str(tmp_path / "sgd.toml"),
    ])
    assert res.exit_code == 0, res.output
    model = keras.saving.load_model(run / "model.keras")  # no custom_objects
    assert model.name == "deeplabv3plus"
    assert np.isfinite(json.loads((run / "metrics.json").read_text())["dice"])
    res = CliRunner().invoke(main, [
        "fit", "--model", "deeplabv3plus", "--image-size", "48", "--out", str(tmp_path / "bad"),
    ])
    assert res.exit_code == 2 and "must be a multiple of 32 for `deeplabv3plus`" in res.output


@pytest.mark.parametrize(
    "output_stride, rates, dilations",
    [(32, (6, 12, 18), set()), (16, (6, 12, 18), {2}), (8, (12, 24, 36), {2, 4})],
)
def test_output_stride_dilates_the_last_stages(output_stride, rates, dilations):
    import tensorflow as tf

    from lesionkeras.models.deeplab import build_resnet_deeplab

    model = build_resnet_deeplab((64, 64, 3), out_channels=2, filters=8, dropout=0.0,
                                 output_stride=output_stride)
    enc = model.get_layer("encoder")
    assert enc.output["P5"].shape[1:3] == (64 // output_stride,) * 2
    assert model.output_shape == (None, 64, 64, 2)
    # Same weights whatever the stride: a pretrained encoder loads into any of them.
    assert model.count_params() == 11_307_731
    aspp = sorted(layer.dilation_rate[0] for layer in model.layers
                  if layer.name.startswith("aspp_rate") and isinstance(layer, keras.layers.Conv2D))
    assert tuple(aspp) == rates
    convs = [layer for layer in enc.layers if isinstance(layer, keras.layers.Conv2D)]
    assert {c.dilation_rate[0] for c in convs} - {1} == dilations
    if dilations:
        # The dilation is what the layer computes: compare with a direct atrous convolution.
        conv = enc.get_layer("stack3_block1_1_conv")
        rate = conv.dilation_rate[0]
        x = tf.random.stateless_normal((1, 64 // output_stride, 64 // output_stride,
                                        conv.kernel.shape[2]), seed=(1, 2))
        expected = tf.nn.conv2d(x, conv.kernel, 1, "SAME", dilations=rate)
        np.testing.assert_allclose(conv(x), expected, atol=1e-4)
