import keras
import numpy as np
import pytest

from lesionkeras import config as config_lib
from lesionkeras.errors import ConfigError
from lesionkeras.models import registry
from lesionkeras.models.resnet_unet import (
    build_resnet_unet,
    encoder_layer,
    make_backbone,
    make_encoder,
)
from lesionkeras.training import segmentation


@pytest.mark.parametrize("size", [32, 64, 96])
def test_shapes_resnet18(size):
    model = build_resnet_unet((None, None, 3), encoder="resnet18", filters=4)
    out = model(np.zeros((2, size, size, 3), "float32"))
    assert out.shape == (2, size, size, 1) and out.dtype == "float32"


def test_encoder_pyramid_strides():
    enc = make_encoder(make_backbone("resnet34", (64, 64, 3)))
    feats = enc(np.zeros((1, 64, 64, 3), "float32"))
    got = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    assert got == {
        "P1": (32, 32, 64), "P2": (16, 16, 64), "P3": (8, 8, 128),
        "P4": (4, 4, 256), "P5": (2, 2, 512),
    }


@pytest.mark.slow
def test_resnet34_and_50_by_name():
    m34 = registry.build("resnet34_unet", input_shape=(32, 32, 3), filters=4)
    enc = encoder_layer(m34)
    # ResNet34 without its classifier: 21.28M trainable parameters (He et al. 2016).
    trainable = sum(int(np.prod(v.shape)) for v in enc.trainable_weights)
    assert 21_280_000 < trainable < 21_290_000
    assert m34.output_shape == (None, 32, 32, 1)
    m50 = registry.build("resnet50_unet", input_shape=(32, 32, 3), filters=4, out_channels=2)
    assert m50.output_shape == (None, 32, 32, 2)
    assert encoder_layer(m50).output["P5"].shape[-1] == 2048


def test_save_load_without_custom_objects(tmp_path):
    model = build_resnet_unet((None, None, 3), encoder="resnet18", filters=4)
    x = np.random.default_rng(0).random((1, 32, 32, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again(x), model(x), atol=1e-6)
    assert encoder_layer(again) is not None


def _first_kernel(model):
    return keras.ops.convert_to_numpy(encoder_layer(model).get_layer("conv1_conv").kernel)


def test_encoder_weights_from_file_and_preset(tmp_path):
    keras.utils.set_random_seed(1)
    source = make_backbone("resnet18", (None, None, 3))
    source.save_weights(tmp_path / "enc.weights.h5")
    source.save_to_preset(str(tmp_path / "preset"))
    expected = keras.ops.convert_to_numpy(source.get_layer("conv1_conv").kernel)
    keras.utils.set_random_seed(2)
    for path in (tmp_path / "enc.weights.h5", tmp_path / "preset"):
        model = build_resnet_unet(encoder="resnet18", filters=4, encoder_weights=str(path))
        np.testing.assert_array_equal(_first_kernel(model), expected)
    fresh = build_resnet_unet(encoder="resnet18", filters=4)
    assert not np.allclose(_first_kernel(fresh), expected)


def test_bad_encoder_weights(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_resnet_unet(encoder="resnet18", encoder_weights=str(tmp_path / "nope.weights.h5"))
    (tmp_path / "x.h5").write_text("junk")
    with pytest.raises(ConfigError, match="x.h5"):
        build_resnet_unet(encoder="resnet18", encoder_weights=str(tmp_path / "x.h5"))
    make_backbone("resnet18").save_weights(tmp_path / "r18.weights.h5")
    with pytest.raises(ConfigError, match="cannot load resnet50 encoder weights"):
        build_resnet_unet(encoder="resnet50", encoder_weights=str(tmp_path / "r18.weights.h5"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiples of 32"):
        build_resnet_unet((48, 48, 3), encoder="resnet18")
    with pytest.raises(ValueError, match="encoder"):
        build_resnet_unet(encoder="resnet101")


def test_model_options_match_each_builder():
    cfg = config_lib.load_config(None, {"model.name": "resnet18_unet", "model.filters": 4})
    opts = segmentation.model_options(cfg.model)
    assert "depth" not in opts and opts["filters"] == 4 and "encoder_weights" in opts
    unet_opts = segmentation.model_options(config_lib.Config().model)
    assert "encoder_weights" not in unet_opts and "depth" in unet_opts
    model = segmentation.build_model(cfg)
    assert model.name == "resnet18_unet"
