"""The 8 dihedral transforms: exact group elements, uniform draws, seeded, masks follow."""

import numpy as np
import pytest
import tensorflow as tf

from lesionkeras import config as config_lib
from lesionkeras.data.augment import Augmenter, RandomDihedral, apply_dihedral

SIDE = 5


def _square():
    return np.arange(SIDE * SIDE, dtype="float32").reshape(SIDE, SIDE, 1)


def _element(img, k):
    return np.rot90(np.fliplr(img) if k >= 4 else img, k % 4)


def _which(out, img):
    hits = [k for k in range(8) if np.array_equal(out, _element(img, k))]
    assert len(hits) == 1, "output is not exactly one dihedral element"
    return hits[0]


def test_apply_dihedral_gives_the_8_distinct_elements():
    img = _square()
    batch = np.repeat(img[None], 8, axis=0)
    out = apply_dihedral(tf.constant(batch), tf.range(8)).numpy()
    for k in range(8):
        np.testing.assert_array_equal(out[k], _element(img, k))
    assert len({o.tobytes() for o in out}) == 8
    # k = 4: a left-right flip; k = 1: a quarter turn counter-clockwise.
    np.testing.assert_array_equal(out[4][:, :, 0], img[:, ::-1, 0])
    np.testing.assert_array_equal(out[1][0, :, 0], img[:, -1, 0])


def test_random_dihedral_is_uniform_over_the_8_and_seeded():
    img = _square()
    batch = tf.constant(np.repeat(img[None], 1600, axis=0))
    out = RandomDihedral(seed=3)(batch, training=True).numpy()
    counts = np.bincount([_which(o, img) for o in out], minlength=8)
    # Binomial(1600, 1/8): mean 200, sd 13; every element appears, none far off.
    assert counts.sum() == 1600 and counts.min() > 150 and counts.max() < 250, counts
    again = RandomDihedral(seed=3)(batch, training=True).numpy()
    np.testing.assert_array_equal(out, again)
    other = RandomDihedral(seed=4)(batch, training=True).numpy()
    assert not np.array_equal(out, other)
    np.testing.assert_array_equal(RandomDihedral(seed=3)(batch, training=False), batch)


def test_augmenter_dihedral_replaces_flip_and_rotate90_and_masks_follow():
    cfg = config_lib.load_config(None, {"augment.dihedral": True}).augment
    assert cfg.flip and cfg.rotate90  # defaults, subsumed by dihedral
    aug = Augmenter(cfg, seed=0)
    assert [type(l).__name__ for l in aug.geometric] == ["RandomDihedral"]
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, size=(64, 8, 8, 3)).astype("float32")
    masks = (images[..., :1] > 128).astype("float32")
    out_img, out_mask = aug(tf.constant(images), tf.constant(masks))
    out_img, out_mask = out_img.numpy(), out_mask.numpy()
    np.testing.assert_array_equal(out_mask, (out_img[..., :1] > 128).astype("float32"))
    assert not np.array_equal(out_img, images)
    # Each output is a dihedral element of its own input, and several elements occur.
    seen = {_which(o[..., :1], i[..., :1]) for o, i in zip(out_img, images)}
    assert len(seen) >= 6


def test_dihedral_off_keeps_flip_and_rotate90():
    aug = Augmenter(config_lib.Config().augment, seed=0)
    assert [type(l).__name__ for l in aug.geometric] == ["RandomFlip", "RandomRotate90"]


@pytest.mark.parametrize("value", [1, "yes"])
def test_bad_dihedral_value_is_refused(value):
    with pytest.raises(config_lib.ConfigError, match="augment.dihedral"):
        config_lib.load_config(None, {"augment.dihedral": value})
