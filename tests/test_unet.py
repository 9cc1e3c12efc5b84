import keras
import numpy as np
import pytest

from lesionkeras.models import registry
from lesionkeras.models.unet import build_unet


@pytest.mark.parametrize("upsampling", ["bilinear", "transpose"])
@pytest.mark.parametrize("size", [32, 64])
def test_shapes(upsampling, size):
    model = build_unet((None, None, 3), depth=3, filters=8, upsampling=upsampling)
    out = model(np.zeros((2, size, size, 3), "float32"))
    assert out.shape == (2, size, size, 1)
    assert out.dtype == "float32"


def test_seed_paper_shape_has_no_batch_norm():
    model = build_unet((64, 64, 3), depth=4, filters=64, batch_norm=False, upsampling="transpose")
    kinds = {type(l).__name__ for l in model.layers}
    assert "BatchNormalization" not in kinds and "Conv2DTranspose" in kinds
    # 3x3 convs of the original U-Net: 31.0M parameters with 3-channel input, 1 output.
    assert 31_000_000 < model.count_params() < 31_100_000


def test_registry_and_errors():
    assert "unet" in registry.names()
    model = registry.build("unet", input_shape=(32, 32, 3), depth=2, filters=4, out_channels=3)
    assert model.output_shape == (None, 32, 32, 3)
    with pytest.raises(KeyError, match="Unknown model `nope`"):
        registry.get("nope")
    with pytest.raises(ValueError, match="upsampling"):
        build_unet(upsampling="nearest")
    with pytest.raises(ValueError, match="divisible"):
        build_unet((30, 30, 3), depth=2)


def test_mixed_precision_keeps_float32_logits():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_unet((32, 32, 3), depth=2, filters=4)
    assert model(np.zeros((1, 32, 32, 3), "float32")).dtype == "float32"


def test_save_load_round_trip(tmp_path):
    model = build_unet((32, 32, 3), depth=2, filters=4, dropout=0.1)
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(again(x), model(x), atol=1e-6)
