"""The `tf.data` side of missing labels: images with K masks and flags, batched with SMILE weight maps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from lesionkeras.data import pipeline
from lesionkeras.data.missing.labels import flags_array, mask_column
from lesionkeras.data.missing.weights import nested_targets_and_weights, smile_weights


def decoded_dataset(df: pd.DataFrame, structures, image_size: int, cache: bool = True):
    """(image uint8 (S,S,3), masks uint8 (S,S,K), flags float32 (K,)) per row.

    The masks of non-annotated structures are all zero (their truth, if any,
    is not used for training); a missing file decodes as zeros.
    """
    structures = tuple(structures)
    paths = np.stack(
        [df[mask_column(s)].fillna("").astype(str).to_numpy() for s in structures], axis=1
    )
    flags = flags_array(df, structures)
    ds = tf.data.Dataset.from_tensor_slices((df["image"].astype(str).tolist(), paths, flags))

    def one_mask(path):
        def read():
            m = pipeline.decode_mask(path)
            m = tf.image.resize(m, (image_size, image_size), method="bilinear", antialias=True)
            return tf.cast(m >= 0.5, tf.uint8)

        return tf.cond(
            tf.equal(path, ""), lambda: tf.zeros((image_size, image_size, 1), tf.uint8), read
        )

    def load(image_path, mask_paths, f):
        img = pipeline.decode_image(image_path)
        img = tf.image.resize(img, (image_size, image_size), method="bilinear", antialias=True)
        img = tf.cast(tf.round(tf.clip_by_value(img, 0, 255)), tf.uint8)
        masks = tf.concat([one_mask(mask_paths[k]) for k in range(len(structures))], axis=-1)
        masks = masks * tf.cast(f > 0, tf.uint8)
        return img, masks, f

    ds = ds.map(load, num_parallel_calls=pipeline.AUTOTUNE, deterministic=True)
    return ds.cache() if cache else ds


def make_dataset(
    decoded, *, batch_size, mean, std, training, augment=None, crop_size=0, seed=0,
    with_weights=True, container=None,
):
    """Batched `(image, masks, weights)` for `fit`/`evaluate` (weights = SMILE maps).

    Args:
        decoded: dataset from `decoded_dataset`.
        batch_size: int.
        mean, std: per-channel statistics on the 0-255 scale.
        training: bool. Shuffle, random crop, augmentation.
        augment: `AugmentConfig` or None.
        crop_size: int. Random (training) or centre crop side; 0 = off.
        seed: int. Seed of shuffling, cropping and augmentation.
        with_weights: bool. SMILE weight maps as the third element; if False,
            all-ones maps (the naive baseline: missing = background).
        container: int or None. Channel that encloses the others (see
            `nested_targets_and_weights`); None uses the paper's rule.
    """
    def finish(i, m, f):
        if not with_weights:
            return i, m, tf.ones_like(m)
        if container is not None:
            m, w = nested_targets_and_weights(m, f, container)
            return i, m, w
        return i, m, smile_weights(m, f)

    return pipeline.make_dataset(
        decoded, batch_size=batch_size, mean=mean, std=std, training=training, augment=augment,
        crop_size=crop_size, seed=seed, finish=finish,
    )
