"""U-Net (Ronneberger, Fischer, Brox, MICCAI 2015) with configurable shape."""

import keras
from keras import layers

from lesionkeras.models.blocks import apply_conv_block, apply_upsample, check_builder_args
from lesionkeras.models.registry import register

UPSAMPLING = ("bilinear", "transpose")


@register("unet", size_multiple="depth")
def build_unet(
    input_shape=(None, None, 3),
    out_channels=1,
    depth=4,
    filters=16,
    batch_norm=True,
    dropout=0.0,
    upsampling="bilinear",
    name="unet",
):
    """Builds a U-Net that returns logits.

    The seed paper's network is `depth=4, filters=64, batch_norm=False,
    upsampling="transpose"`; the default is a lighter variant with batch norm
    that trains well on a CPU.

    Args:
        input_shape: tuple. (H, W, C); H and W divisible by 2**depth, or None.
            Defaults to (None, None, 3).
        out_channels: int. Number of output logit channels. Defaults to 1.
        depth: int. Number of down-sampling levels. Defaults to 4.
        filters: int. Filters of the first level, doubled per level. Defaults to 16.
        batch_norm: bool. Batch norm after each conv. Defaults to True.
        dropout: float. Dropout rate at the bottleneck. Defaults to 0.
        upsampling: str. `"bilinear"` or `"transpose"`. Defaults to `"bilinear"`.
        name: str. Model name. Defaults to `"unet"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) images to (B, H, W,
        out_channels) float32 logits.

    Example:

    >>> model = build_unet((64, 64, 3), filters=8, depth=3)
    >>> model.output_shape
    (None, 64, 64, 1)
    """
    if upsampling not in UPSAMPLING:
        raise ValueError(
            f"`upsampling` must be one of {UPSAMPLING}. Received: upsampling={upsampling!r}"
        )
    check_builder_args(
        input_shape, 2**depth, dropout, depth=depth, filters=filters, out_channels=out_channels
    )

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = apply_conv_block(
            x, filters * 2**level, batch_norm=batch_norm, name=f"down{level}"
        )
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = apply_conv_block(x, filters * 2**depth, batch_norm=batch_norm, name="bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        f = filters * 2**level
        x = apply_upsample(x, f, mode=upsampling, name=f"up{level}")
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = apply_conv_block(x, f, batch_norm=batch_norm, name=f"up{level}")
    # Logits stay float32 under mixed precision so losses are computed stably.
    outputs = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)
