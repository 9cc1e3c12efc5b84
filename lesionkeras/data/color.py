"""Colour constancy: Shades of Gray (Finlayson & Trezzi 2004).

Dermoscopes light lesions with different colours; Shades of Gray estimates
the illuminant per channel as the Minkowski p-norm mean of the pixels and
divides it out, so every image looks lit by the same white light. Guth &
deCampos 2018 (after Barata et al. 2015) use p = 6.
"""

import tensorflow as tf


def shades_of_gray(image, p=6):
    """Colour-balances an RGB image (or a batch) on the 0-255 scale.

    Args:
        image: tensor (H, W, 3) or (B, H, W, 3), any real or integer dtype, 0-255.
        p: float. Minkowski norm; 1 is Gray World, infinity is max-RGB. Defaults to 6.

    Returns:
        float32 tensor of the same shape, in [0, 255].

    Example:

    >>> out = shades_of_gray(tf.fill((4, 4, 3), 100.0))
    >>> float(out[0, 0, 0])  # a grey image stays grey
    100.0
    """
    if p < 1:
        raise ValueError(f"`p` must be >= 1. Received: p={p}")
    x = tf.cast(image, tf.float32)
    axes = [-3, -2]
    # Normalising by the brightest channel first keeps x**6 in float32 range.
    scale = tf.reduce_max(x, axis=axes + [-1], keepdims=True) + 1e-6
    illum = tf.reduce_mean((x / scale) ** p, axis=axes, keepdims=True) ** (1.0 / p) * scale
    # Keep the image's overall brightness: scale each channel to the mean illuminant.
    gain = tf.reduce_mean(illum, axis=-1, keepdims=True) / (illum + 1e-6)
    return tf.clip_by_value(x * gain, 0.0, 255.0)


#: Values of `data.color_constancy`.
COLOR_CONSTANCY = ("none", "shades_of_gray")


def apply_color_constancy(image, method="none"):
    """Applies the colour balance `method` to an image or a batch (0-255).

    Args:
        image: tensor (H, W, 3) or (B, H, W, 3). uint8 in, uint8 out (rounded);
            any other dtype gives float32.
        method: str. `"none"` (returned unchanged) or `"shades_of_gray"` (p = 6).
            Defaults to `"none"`.

    Returns:
        The balanced image.

    Example:

    >>> apply_color_constancy(tf.zeros((2, 2, 3), tf.uint8), "shades_of_gray").dtype
    tf.uint8
    """
    if method not in COLOR_CONSTANCY:
        raise ValueError(
            f"`method` must be one of {COLOR_CONSTANCY}. Received: method={method!r}"
        )
    if method == "none":
        return image
    out = shades_of_gray(image, p=6)
    if tf.as_dtype(image.dtype) == tf.uint8:
        return tf.cast(tf.round(out), tf.uint8)
    return out
