import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from lesionkeras.config import AugmentConfig
from lesionkeras.data import pipeline
from lesionkeras.data.augment import RandomRotate90


def _write(path, array, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 12 + i : 30 + i] = 255
        rows.append(
            {
                "id": f"im{i}",
                "image": _write(tmp_path / f"im{i}.png", img),
                "mask": _write(tmp_path / f"im{i}_mask.png", mask),
            }
        )
    return pd.DataFrame(rows)


def test_decode_channel_variants(tmp_path):
    grey = np.full((5, 7), 77, np.uint8)
    rgba = np.zeros((5, 7, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 10
    for name, arr in [("g.png", grey), ("a.png", rgba), ("b.bmp", np.dstack([grey] * 3))]:
        img = pipeline.decode_image(_write(tmp_path / name, arr)).numpy()
        assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    assert (pipeline.decode_image(str(tmp_path / "g.png")).numpy() == 77).all()
    assert (pipeline.decode_image(str(tmp_path / "a.png")).numpy()[..., 0] == 200).all()


def test_decode_mask_variants(tmp_path):
    zero_one = np.array([[0, 1], [1, 0]], np.uint8)
    grey = np.array([[0, 127], [128, 255]], np.uint8)
    rgb = np.dstack([grey] * 3)
    np.testing.assert_array_equal(
        pipeline.decode_mask(_write(tmp_path / "a.png", zero_one)).numpy()[..., 0], zero_one
    )
    expected = np.array([[0, 0], [1, 1]])
    for name, arr in [("b.png", grey), ("c.png", rgb)]:
        np.testing.assert_array_equal(
            pipeline.decode_mask(_write(tmp_path / name, arr)).numpy()[..., 0], expected
        )


def test_decoded_dataset_resizes_and_keeps_masks_binary(files):
    ds = pipeline.decoded_dataset(files, 32)
    img, mask = next(iter(ds))
    assert img.shape == (32, 32, 3) and img.dtype == tf.uint8
    assert mask.shape == (32, 32, 1) and set(np.unique(mask.numpy())) <= {0, 1}
    assert 0.1 < mask.numpy().mean() < 0.3  # 20x18 of 40x48 = 0.19


def test_stats_match_numpy(files):
    ds = pipeline.decoded_dataset(files, 32)
    mean, std = pipeline.compute_stats(ds)
    allpix = np.stack([i.numpy() for i, _ in ds]).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, allpix.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, allpix.std(0), rtol=1e-4)


def test_make_dataset_normalises_and_batches(files):
    dec = pipeline.decoded_dataset(files, 32)
    mean, std = pipeline.compute_stats(dec)
    ds = pipeline.make_dataset(dec, batch_size=4, mean=mean, std=std, training=False)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    x = np.concatenate([b[0].numpy() for b in batches])
    assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05
    train = pipeline.make_dataset(dec, batch_size=4, mean=mean, std=std, training=True)
    assert [b[0].shape[0] for b in train] == [4]  # the single-image tail is dropped


def _epoch(files, seed, aug):
    dec = pipeline.decoded_dataset(files, 32)
    ds = pipeline.make_dataset(
        dec, batch_size=3, mean=(0, 0, 0), std=(1, 1, 1), training=True, augment=aug,
        crop_size=16, seed=seed,
    )
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_augmentation_is_seeded_and_joint(files):
    aug = AugmentConfig(rotation=30, zoom=0.1, brightness=0.2)
    tf.random.set_seed(0)
    a = _epoch(files, 1, aug)
    tf.random.set_seed(0)
    b = _epoch(files, 1, aug)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    c = _epoch(files, 2, aug)
    assert any(not np.array_equal(p[0], q[0]) for p, q in zip(a, c))
    for x, y in a:
        assert x.shape[1:] == (16, 16, 3) and set(np.unique(y)) <= {0.0, 1.0}


def test_geometric_augmentation_moves_image_and_mask_together():
    # The mask is a copy of the image's first channel: after any flip or
    # 90-degree rotation the two must still agree pixel for pixel.
    rng = np.random.default_rng(0)
    m = (rng.uniform(size=(8, 16, 16, 1)) > 0.5).astype("float32")
    x = np.concatenate([m * 255] * 3, axis=-1)
    from lesionkeras.data.augment import Augmenter

    xa, ma = Augmenter(AugmentConfig(flip=True, rotate90=True), seed=3)(x, m)
    np.testing.assert_array_equal(xa.numpy()[..., :1] / 255, ma.numpy())
    assert not np.array_equal(ma.numpy(), m)


def test_rotate90_is_a_permutation_of_dihedral_views():
    x = np.arange(2 * 4 * 4, dtype="float32").reshape(2, 4, 4, 1)
    out = RandomRotate90(seed=0)(x).numpy()
    for i in range(2):
        views = [np.rot90(x[i], k) for k in range(4)]
        assert any(np.array_equal(out[i], v) for v in views)
    np.testing.assert_array_equal(RandomRotate90(seed=0)(x, training=False), x)


def test_assign_splits():
    df = pd.DataFrame({"id": [f"i{k}" for k in range(10)], "split": "", "fold": -1})
    a = pipeline.assign_splits(df, val_fraction=0.2, seed=1)
    assert (a["split"] == "val").sum() == 2
    assert a.equals(pipeline.assign_splits(df, val_fraction=0.2, seed=1))
    assert not a["split"].equals(pipeline.assign_splits(df, val_fraction=0.2, seed=2)["split"])
    b = pipeline.assign_splits(df, val_ids=["i3", "i4"])
    assert list(b.loc[b["split"] == "val", "id"]) == ["i3", "i4"]
    c = pipeline.assign_splits(df, folds=3, fold=1, seed=0)
    assert sorted(c["fold"].value_counts().tolist()) == [3, 3, 4]
    assert (c["split"] == "val").sum() == (c["fold"] == 1).sum()
    d = df.assign(split=["train"] * 7 + ["val"] * 3)
    assert list(pipeline.assign_splits(d, seed=5)["split"]) == list(d["split"])


def test_decode_formats_tf_cannot_read(tmp_path):
    # 1-bit BMP masks (PH2) and TIFF images go through Pillow.
    bits = np.zeros((6, 9), bool)
    bits[1:4, 2:7] = True
    Image.fromarray(bits).save(tmp_path / "m.bmp")
    np.testing.assert_array_equal(
        pipeline.decode_mask(str(tmp_path / "m.bmp")).numpy()[..., 0], bits.astype(np.float32)
    )
    rgb = np.random.default_rng(1).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "i.tif")
    np.testing.assert_array_equal(pipeline.decode_image(str(tmp_path / "i.TIF".lower())).numpy(), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.bmp")
    assert pipeline.decode_image(str(tmp_path / "g.bmp")).numpy().shape == (6, 9, 3)


@pytest.mark.parametrize(
    "n, batch, replicas, expected",
    [(10, 4, 1, 4), (9, 4, 2, None), (11, 4, 2, 4), (5, 4, 2, None), (13, 8, 2, 8),
     (9, 8, 2, 6), (4, 8, 2, 8), (12, 6, 4, 4)],
)
def test_eval_batch_size_splits_evenly_and_leaves_no_replica_empty(n, batch, replicas, expected):
    b = pipeline.eval_batch_size(n, batch, replicas)
    assert b == expected
    if b is not None and replicas > 1:
        assert min(b, n) % replicas == 0
        assert n <= b or n % b == 0 or n % b >= replicas
