import numpy as np
import pytest

from lesionkeras.data.color import shades_of_gray


def test_grey_stays_and_colour_cast_is_removed():
    grey = np.full((4, 4, 3), 100.0, "float32")
    np.testing.assert_allclose(shades_of_gray(grey), grey, rtol=1e-5)
    rng = np.random.default_rng(0)
    scene = rng.uniform(20, 120, (8, 8, 1)).repeat(3, axis=-1).astype("float32")
    tinted = scene * np.array([1.5, 1.0, 0.6], "float32")  # a reddish light
    out = np.asarray(shades_of_gray(tinted[None]))[0]
    # The same grey scene under the tinted light comes back grey again.
    np.testing.assert_allclose(out[..., 0], out[..., 1], rtol=1e-4)
    np.testing.assert_allclose(out[..., 2], out[..., 1], rtol=1e-4)
    assert out.min() >= 0 and out.max() <= 255


def test_bad_p():
    with pytest.raises(ValueError, match="p"):
        shades_of_gray(np.zeros((2, 2, 3)), p=0.5)
