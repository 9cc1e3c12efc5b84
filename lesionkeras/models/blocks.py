"""Small reusable graph pieces shared by the model builders."""

import keras
from keras import layers


def apply_conv_block(x, filters, *, batch_norm=True, name="block"):
    """Two 3x3 convolutions, each followed by optional batch norm and ReLU."""
    for i in (1, 2):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i}",
        )(x)
        if batch_norm:
            # momentum 0.9: short CPU runs must get usable inference statistics.
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def apply_upsample(x, filters, *, mode="bilinear", name="up"):
    """Doubles the spatial size: bilinear resize + 1x1 conv, or a transposed conv."""
    if mode == "transpose":
        return layers.Conv2DTranspose(
            filters, 2, strides=2, padding="same", name=f"{name}_tconv"
        )(x)
    x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_resize")(x)
    return layers.Conv2D(filters, 1, padding="same", name=f"{name}_proj")(x)
