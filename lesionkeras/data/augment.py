"""Joint image/mask augmentation built from Keras 3 preprocessing layers.

Geometric layers see the image and its mask concatenated on the channel axis,
so both get the same flip, rotation and zoom; the mask is re-binarised after
interpolation. Colour jitter touches the image only.
"""

import keras
import tensorflow as tf

from lesionkeras.data import epochs


@keras.saving.register_keras_serializable(package="lesionkeras")
class RandomRotate90(keras.layers.Layer):
    """Rotates each square image of a batch by a random multiple of 90 degrees.

    Keras has no layer for the dihedral rotations that dermoscopy allows (a
    lesion has no "up"), and `RandomRotation` would interpolate and fill corners.

    Args:
        seed: int. Seed of the rotation choices. Defaults to None.
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True, seed=None):
        """`seed`: a `SeedGenerator` to draw from instead of the layer's own."""
        if not training:
            return images
        batch = tf.shape(images)[0]
        k = keras.random.randint((batch,), 0, 4, seed=seed or self.seed_generator)
        # Rotating by 90 degrees k times is a transpose and/or flips; computing
        # all four views of the batch and picking one per sample stays vectorised.
        views = tf.stack(
            [
                images,
                tf.image.rot90(images, 1),
                tf.image.rot90(images, 2),
                tf.image.rot90(images, 3),
            ],
            axis=1,
        )
        return tf.gather(views, tf.cast(k, tf.int32), axis=1, batch_dims=1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="lesionkeras")
class RandomDihedral(keras.layers.Layer):
    """Applies one of the 8 symmetries of the square to each image, uniformly.

    The dihedral group D4: rotations by 0, 90, 180 and 270 degrees, each with
    or without a left-right flip first. Each image draws its own element with
    probability exactly 1/8 (Guth & deCampos 2018, section 3.6, after fast.ai).
    Random flips followed by `RandomRotate90` also reach all 8, but this draws
    them with one seeded choice, so the element of each image is known.

    Args:
        seed: int. Seed of the choices. Defaults to None.

    Example:

    ```python
    layer = RandomDihedral(seed=0)
    out = layer(images)  # (batch, side, side, channels), square
    ```
    """

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def draw(self, batch, seed=None):
        """Element index per image: `k % 4` quarter turns after a flip if `k >= 4`.

        `seed`: a `SeedGenerator` to draw from instead of the layer's own.
        """
        seed = seed or self.seed_generator
        return tf.cast(keras.random.randint((batch,), 0, 8, seed=seed), tf.int32)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        return apply_dihedral(images, self.draw(tf.shape(images)[0], seed))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


def apply_dihedral(images, k):
    """Element `k[i]` (0-7) of the dihedral group applied to `images[i]`.

    Args:
        images: tensor (batch, side, side, channels).
        k: int tensor (batch,). `k % 4` quarter turns counter-clockwise, after a
            left-right flip when `k >= 4`.
    """
    flip = tf.reshape(k >= 4, (-1, 1, 1, 1))
    images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    views = tf.stack([tf.image.rot90(images, t) for t in range(4)], axis=1)
    return tf.gather(views, k % 4, axis=1, batch_dims=1)


class Augmenter:
    """Callable `(images, masks) -> (images, masks)` for batched tensors.

    Args:
        cfg: `AugmentConfig`. Which transforms to apply.
        seed: int. Seed of every transform.
    """

    def __init__(self, cfg, seed=0):
        geometric = []
        if cfg.dihedral:
            # All 8 symmetries of the square, uniformly; flip and rotate90 are subsumed.
            geometric.append(RandomDihedral(seed=seed + 5))
        if cfg.flip and not cfg.dihedral:
            geometric.append(keras.layers.RandomFlip("horizontal_and_vertical", seed=seed))
        if cfg.rotate90 and not cfg.dihedral:
            geometric.append(RandomRotate90(seed=seed + 1))
        if cfg.rotation:
            geometric.append(
                keras.layers.RandomRotation(
                    cfg.rotation / 360.0, fill_mode="reflect", seed=seed + 2
                )
            )
        if cfg.zoom:
            geometric.append(
                keras.layers.RandomZoom(
                    (-cfg.zoom, cfg.zoom), fill_mode="reflect", seed=seed + 3
                )
            )
        self.geometric = geometric
        # The colour layers `RandomColorJitter` chains, in its order, so that each
        # takes a per-batch key (`__call__`); the jitter layer draws from its own state.
        color = []
        if cfg.brightness:
            color.append(keras.layers.RandomBrightness(
                cfg.brightness, value_range=(0, 255), seed=seed + 4))
        if cfg.contrast:
            color.append(keras.layers.RandomContrast(
                cfg.contrast, value_range=(0, 255), seed=seed + 6))
        if cfg.saturation:
            color.append(keras.layers.RandomSaturation(
                (max(0.0, 1 - cfg.saturation), 1 + cfg.saturation), value_range=(0, 255),
                seed=seed + 7))
        if cfg.hue:
            color.append(keras.layers.RandomHue(cfg.hue, value_range=(0, 255), seed=seed + 8))
        self.color = color

    @property
    def active(self):
        return bool(self.geometric or self.color)

    def __call__(self, images, masks, key=None):
        """Augmented `(images, masks)`; with `key` (int64 (2,)), a pure function of it.

        Without `key` every layer draws from its own `SeedGenerator` (state that
        advances with each call). The training pipeline passes a key per batch
        (`epochs.key`), so an epoch's augmentation does not depend on the ones
        before it, and a resumed run sees what the uninterrupted one saw.
        """
        def apply(layer, x, i):
            if key is None:
                return layer(x, training=True)
            seed = epochs.KeyedSeed(epochs.key_from(key, i))
            if isinstance(layer, (RandomDihedral, RandomRotate90)):
                return layer(x, training=True, seed=seed)
            transform = layer.get_random_transformation(x, training=True, seed=seed)
            return layer.transform_images(x, transform, training=True)

        if self.geometric:
            channels = images.shape[-1]
            both = tf.concat([images, masks], axis=-1)
            for i, layer in enumerate(self.geometric):
                both = apply(layer, both, i)
            images, masks = both[..., :channels], both[..., channels:]
            masks = tf.cast(masks > 0.5, masks.dtype)
        for i, layer in enumerate(self.color):
            images = tf.clip_by_value(apply(layer, images, 100 + i), 0.0, 255.0)
        return images, masks
