"""`tf.data` input pipeline: decode, resize, cache, augment, normalise, batch.

Images are decoded and resized once, in parallel, and cached as uint8 at the
model resolution; everything per epoch (shuffle, crop, augmentation,
normalisation) runs on batched tensors.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from lesionkeras.data import epochs
from lesionkeras.data.augment import Augmenter
from lesionkeras.data.color import apply_color_constancy

AUTOTUNE = tf.data.AUTOTUNE
# ImageNet statistics on the 0-255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# TensorFlow decodes JPEG, PNG and GIF natively (in parallel, without the GIL).
# BMP (TF's decoder rejects the 1- and 8-bit files PH2 ships) and TIFF go through
# Pillow. Decoding happens once per run: the decoded images are cached.
_PIL_SUFFIXES = r".*\.(bmp|tif|tiff)$"


def _pil_read(path, mode):
    # Eager calls pass str, graph calls bytes (or 0-d arrays of them).
    path, mode = (v.item() if isinstance(v, np.ndarray) else v for v in (path, mode))
    path, mode = (v.decode() if isinstance(v, bytes) else v for v in (path, mode))
    with Image.open(path) as im:
        arr = np.asarray(im.convert(mode))
    return arr.reshape(arr.shape[0], arr.shape[1], -1)


def _read_any(path, pil_mode):
    def with_pil():
        arr = tf.numpy_function(_pil_read, [path, pil_mode], tf.uint8, stateful=False)
        arr.set_shape([None, None, None])
        return arr

    def with_tf():
        return tf.io.decode_image(tf.io.read_file(path), expand_animations=False)

    use_pil = tf.strings.regex_full_match(tf.strings.lower(path), _PIL_SUFFIXES)
    return tf.cond(use_pil, with_pil, with_tf)


def decode_image(path):
    """Reads an image file as (H, W, 3) uint8, whatever its format and channel count."""
    img = _read_any(path, "RGB")
    channels = tf.shape(img)[-1]
    # Grayscale is repeated to RGB; an alpha channel is dropped (as `data check` reports).
    img = tf.cond(
        channels < 3,
        lambda: tf.repeat(img[..., :1], 3, axis=-1),
        lambda: img[..., :3],
    )
    img.set_shape([None, None, 3])
    return img


def decode_mask(path):
    """Reads a mask file as (H, W, 1) float32 in {0, 1}.

    The colour channels of a multi-channel mask are averaged (alpha ignored);
    0/1 masks are accepted as well as 0/255; anything else is thresholded at 128.
    """
    m = _read_any(path, "L")
    channels = tf.shape(m)[-1]
    m = tf.cond(channels >= 3, lambda: m[..., :3], lambda: m[..., :1])
    m = tf.reduce_mean(tf.cast(m, tf.float32), axis=-1, keepdims=True)
    m = tf.cond(tf.reduce_max(m) <= 1.0, lambda: m * 255.0, lambda: m)
    m = tf.cast(m >= 128.0, tf.float32)
    m.set_shape([None, None, 1])
    return m


def _resize_pair(image, mask, size):
    image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    image = tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8)
    mask = tf.image.resize(mask, (size, size), method="bilinear", antialias=True)
    mask = tf.cast(mask >= 0.5, tf.uint8)
    return image, mask


def decoded_dataset(
    df: pd.DataFrame, image_size: int, cache: bool = True, color_constancy: str = "none"
):
    """(image uint8 (S,S,3), mask uint8 (S,S,1)) per manifest row, in row order.

    `color_constancy` (`data.color_constancy`) is applied once to the resized
    image, before the cache, so it costs nothing per epoch.
    """

    ds = tf.data.Dataset.from_tensor_slices(
        (df["image"].astype(str).tolist(), df["mask"].astype(str).tolist())
    )

    def load(i, m):
        image, mask = _resize_pair(decode_image(i), decode_mask(m), image_size)
        return apply_color_constancy(image, color_constancy), mask

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.cache() if cache else ds


def compute_stats(ds) -> tuple[tuple, tuple]:
    """Per-channel mean and std (0-255 scale) of the images of a decoded dataset.

    Iterating it also fills the dataset's cache, so training decodes nothing again.
    """

    def add(acc, batch):
        x = tf.cast(batch[0], tf.float64)
        x = tf.reshape(x, (-1, 3))
        return (
            acc[0] + tf.reduce_sum(x, axis=0),
            acc[1] + tf.reduce_sum(tf.square(x), axis=0),
            acc[2] + tf.cast(tf.shape(x)[0], tf.float64),
        )

    zero = tf.zeros(3, tf.float64)
    s, ss, n = ds.batch(64).reduce((zero, zero, tf.constant(0.0, tf.float64)), add)
    mean = s / n
    std = tf.sqrt(tf.maximum(ss / n - tf.square(mean), 1e-6))
    return tuple(float(v) for v in mean.numpy()), tuple(float(v) for v in std.numpy())


def normalizer(mean, std):
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return lambda x: (tf.cast(x, tf.float32) - mean) / std


def make_dataset(
    decoded,
    *,
    batch_size: int,
    mean,
    std,
    training: bool,
    augment=None,
    crop_size: int = 0,
    seed: int = 0,
    shuffle_buffer: int | None = None,
    repeat: bool = False,
    finish=None,
):
    """Batched `(normalised image float32, masks float32, *rest)` for fit/evaluate.

    The one batch builder of the package: `decoded` yields `(image uint8, masks
    uint8[, rest...])` (one mask channel for Task 1, K for SMILE with their
    annotation flags as `rest`); the noisy and clean streams of the reweighting
    methods and SMILE's batches all come from here.

    Args:
        decoded: dataset from `decoded_dataset` (or `missing.decoded_dataset`).
        batch_size: int. Global batch size.
        mean, std: per-channel statistics on the 0-255 scale.
        training: bool. Shuffle, random crop and augmentation when True.
        augment: `AugmentConfig` or None.
        crop_size: int. Random crop (training) or centre crop (otherwise) side; 0 = off.
        seed: int. Seed of shuffling, cropping and augmentation.
        shuffle_buffer: int or None. Defaults to the whole dataset.
        repeat: bool. Repeat forever (full batches only), e.g. a clean stream.
        finish: callable(image, masks, *rest) -> element, or None. Last step on each
            batch, given the normalised images (default: `(image, masks, *rest)`).
    """
    norm = normalizer(mean, std)
    n = int(decoded.cardinality())
    if training:
        ds = _training_stream(decoded, n, batch_size=batch_size, augment=augment,
                              crop_size=crop_size, seed=seed, shuffle_buffer=shuffle_buffer,
                              repeat=repeat)
    else:
        ds = decoded.repeat() if repeat else decoded
        if crop_size:
            ds = ds.map(lambda i, m, *rest: (*centre_crop(i, m, crop_size), *rest))
        ds = ds.batch(batch_size, drop_remainder=repeat)
        ds = ds.map(lambda i, m, *rest: (tf.cast(i, tf.float32), tf.cast(m, tf.float32), *rest))
    if finish is None:
        ds = ds.map(lambda i, m, *rest: (norm(i), m, *rest), num_parallel_calls=AUTOTUNE)
    else:
        ds = ds.map(lambda i, m, *rest: finish(norm(i), m, *rest), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def _training_stream(decoded, n, *, batch_size, augment, crop_size, seed, shuffle_buffer,
                     repeat):
    """Shuffled, cropped, augmented float32 batches; each epoch's draws keyed by (seed, epoch).

    Every random choice (the order, each crop, each batch's augmentation) is a
    stateless draw from a key derived from `seed`, the epoch on `epochs.clock()`
    and the element's or batch's position, so epoch k is the same whether the
    run got there uninterrupted or resumed (`epochs`). A repeating stream
    reshuffles on each pass with its own key.
    """
    aug = Augmenter(augment, seed=seed) if augment is not None else None
    drop = repeat or n >= batch_size  # a last batch of one image breaks batch norm

    def one_pass(k):
        ds = epochs.shuffled(decoded, n, k, shuffle_buffer)
        if crop_size:
            ds = ds.enumerate().map(lambda j, item: (*random_crop(
                item[0], item[1], crop_size, epochs.key_from(k, j)), *item[2:]))
        return ds

    def one_epoch(k):
        if repeat:
            ds = tf.data.Dataset.counter().flat_map(lambda r: one_pass(epochs.key_from(k, r)))
        else:
            ds = one_pass(k)
        ds = ds.batch(batch_size, drop_remainder=drop)
        ds = ds.map(lambda i, m, *rest: (tf.cast(i, tf.float32), tf.cast(m, tf.float32), *rest))
        if aug is not None and aug.active:
            augment_key = epochs.key_from(k, -1)
            ds = ds.enumerate().map(lambda b, item: (*aug(
                item[0], item[1], epochs.key_from(augment_key, b)), *item[2:]))
        return ds

    batches = tf.data.INFINITE_CARDINALITY if repeat else (
        n // batch_size if drop else -(-n // batch_size))
    return epochs.per_epoch(one_epoch, seed=seed, cardinality=batches)

def eval_batch_size(n: int, batch_size: int, replicas: int = 1):
    """Batch size <= `batch_size` for evaluating `n` images on `replicas` replicas.

    Under a distribution strategy every batch is split across the replicas.
    Keras builds the model from the first batch averaged over replicas, so that
    batch must split evenly, and a last batch smaller than the replica count
    would leave a replica with an empty batch, which the CPU kernels reject.
    Choosing the batch size (rather than dropping or repeating images) keeps
    the metrics exact. Returns None when no batch size works (tiny odd sets).
    """
    if replicas == 1:
        return batch_size
    for b in range(batch_size - batch_size % replicas, 0, -replicas):
        first, rest = min(b, n), (n % b if n > b else 0)
        if first % replicas == 0 and (rest == 0 or rest >= replicas):
            return b
    return None


def validation_batches(n: int, batch_size: int, replicas: int = 1, log=print):
    """(images kept, batch size) to evaluate `n` validation images on `replicas` replicas.

    All `n` images at `eval_batch_size` when it finds a size; otherwise (tiny
    odd sets) the first multiple of `replicas` images, one per replica, with a
    warning through `log`.
    """
    batch = eval_batch_size(n, batch_size, replicas)
    if batch is not None:
        return n, batch
    keep = n - n % replicas
    log(f"warning: validating on {keep} of {n} images so that {replicas} replicas get "
        "equal batches")
    return keep, replicas


def random_crop(image, masks, size, key):
    """The same random `size` x `size` window of `image` and its mask channels.

    `key`: int64 (2,), the stateless seed of the window.
    """
    both = tf.concat([image, masks], axis=-1)
    channels = both.shape[-1] if both.shape[-1] is not None else tf.shape(both)[-1]
    both = tf.image.stateless_random_crop(both, tf.stack([size, size, channels]), seed=key)
    return both[..., :3], both[..., 3:]


def centre_crop(image, masks, size):
    """The centre `size` x `size` window of `image` and its mask channels."""
    off = (tf.shape(image)[0] - size) // 2
    return image[off : off + size, off : off + size], masks[off : off + size, off : off + size]


def assign_splits(
    df: pd.DataFrame,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    val_ids=None,
    folds: int = 0,
    fold: int = -1,
) -> pd.DataFrame:
    """Returns a copy with `split` ("train"/"val") and `fold` columns filled.

    A split already present in the manifest (a user CSV) is kept. Otherwise:
    an explicit id list, else fold `fold` of a `folds`-way split, else a
    seeded random `val_fraction`.
    """
    df = df.copy()
    n = len(df)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if folds:
        fold_of = np.empty(n, dtype=int)
        fold_of[order] = np.arange(n) % folds
        df["fold"] = fold_of
    existing = df["split"].astype(str).str.strip() if "split" in df else pd.Series([""] * n)
    if existing.isin(["train", "val"]).all():
        df["split"] = existing.values
        return df
    if val_ids is not None:
        val = df["id"].isin(set(val_ids)).values
    elif folds and fold >= 0:
        val = df["fold"].values == fold
    else:
        n_val = int(round(val_fraction * n))
        if val_fraction > 0 and n > 1:
            n_val = min(max(n_val, 1), n - 1)
        val = np.zeros(n, dtype=bool)
        val[order[:n_val]] = True
    df["split"] = np.where(val, "val", "train")
    return df
