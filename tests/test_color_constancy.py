"""`data.color_constancy`: Shades of Gray applied once when decoding, and at inference."""

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras.inference.predictor import Predictor
from lesionkeras.data import pipeline
from lesionkeras.data.color import apply_color_constancy, shades_of_gray
from lesionkeras.errors import ConfigError


def _tinted_rows(tmp_path, count=2, size=32):
    rng = np.random.default_rng(0)
    rows = []
    for k in range(count):
        grey = rng.uniform(40, 140, (size, size, 1)).repeat(3, axis=-1)
        image = (grey * [1.4, 1.0, 0.6]).clip(0, 255).astype(np.uint8)  # reddish light
        mask = np.zeros((size, size), np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(image).save(tmp_path / f"i{k}.png")
        Image.fromarray(mask).save(tmp_path / f"m{k}.png")
        rows.append({"id": f"i{k}", "image": str(tmp_path / f"i{k}.png"),
                     "mask": str(tmp_path / f"m{k}.png")})
    return pd.DataFrame(rows)


def test_decoded_dataset_balances_once_before_the_cache(tmp_path):
    df = _tinted_rows(tmp_path)
    plain = list(pipeline.decoded_dataset(df, 32, cache=False))
    balanced = list(pipeline.decoded_dataset(df, 32, cache=True, color_constancy="shades_of_gray"))
    for (img0, m0), (img1, m1) in zip(plain, balanced):
        assert img1.dtype == np.uint8 and img1.shape == (32, 32, 3)
        np.testing.assert_array_equal(m0, m1)
        expected = np.round(np.asarray(shades_of_gray(img0))).astype(np.uint8)
        np.testing.assert_array_equal(img1, expected)
        # The cast is gone: channel means agree to within rounding.
        means = np.asarray(img1, np.float32).mean(axis=(0, 1))
        assert means.max() - means.min() < 2.0
        raw = np.asarray(img0, np.float32).mean(axis=(0, 1))
        assert raw.max() - raw.min() > 20.0


def test_none_is_identity_and_bad_method_raises():
    x = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert apply_color_constancy(x, "none") is x
    with pytest.raises(ValueError, match="method"):
        apply_color_constancy(x, "grey_world")
    with pytest.raises(ConfigError, match="data.color_constancy"):
        config_lib.load_config(None, {"data.color_constancy": "grey_world"})
    with pytest.raises(ConfigError, match="color_constancy"):
        config_lib.load_config(None, {"method": "smile", "data.color_constancy": "shades_of_gray"})


def test_predictor_applies_the_runs_color_constancy(tmp_path):
    # A "model" whose logit is (red - green) / 10 shows the colour cast it is fed.
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, keras.layers.Lambda(lambda t: (t[..., :1] - t[..., 1:2]) / 10.0)(inp))
    image = np.asarray(Image.open(_tinted_rows(tmp_path, count=1)["image"][0]))
    outputs = {}
    for method in ("none", "shades_of_gray"):
        p = Predictor(model, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.5, "t",
                                color_constancy=method)
        outputs[method] = p.probabilities([image])[0]
    assert outputs["none"].mean() > 0.9  # reddish input
    np.testing.assert_allclose(outputs["shades_of_gray"].mean(), 0.5, atol=0.05)
