"""VGG19-SE U-Net: the segmentor of Xue et al.'s ISIC 2018 report.

The encoder is keras-hub's `VGGBackbone` in its VGG19 layout (Simonyan &
Zisserman 2014; never downloaded: built from its architecture and, if asked,
reading weights from a local file). Every encoder feature the decoder uses
passes through a squeeze-and-excitation block (Hu et al. 2017), which
re-weights its channels from their global average. The decoder is a U-Net
one: bilinear x2 up-sampling, concatenation with the SE-weighted encoder
feature of the same stride, two 3x3 convolutions.

The last layer is SegAN's `AdaptiveLogistic` (k = 1 is the plain sigmoid),
so the model returns logits `z / k` like every model of the package and the
SegAN trainer can anneal k. The nested encoder model is named `"encoder"`, so
`--freeze-encoder-epochs` (the report: 50) and the staged-training helpers
find it.

Reference: Xue, Gong, Peng, Huang, Zheng, "Automatic Skin Lesion Analysis
with Deep Networks", ISIC 2018 challenge report.
"""


import keras
from keras import layers

from lesionkeras.models.blocks import apply_conv_block, apply_upsample, check_builder_args
from lesionkeras.models.registry import register
from lesionkeras.models.resnet_unet import load_hub_backbone
from lesionkeras.models.segan import AdaptiveLogistic

#: VGG19: convolutions per block.
VGG19_REPEATS = (2, 2, 4, 4, 4)
#: Input sides must be multiples of this (five 2x2 max-poolings).
SIZE_MULTIPLE = 32


def vgg19_filters(encoder_filters=64):
    """Filters of the five VGG19 blocks: (w, 2w, 4w, 8w, 8w); w = 64 is VGG19."""
    w = int(encoder_filters)
    return (w, 2 * w, 4 * w, 8 * w, 8 * w)


def make_backbone(input_shape=(None, None, 3), encoder_filters=64):
    """A randomly initialised keras-hub `VGGBackbone` with the VGG19 layout (no download).

    Args:
        input_shape: tuple. (H, W, C). Defaults to (None, None, 3).
        encoder_filters: int. Filters of the first block; 64 is VGG19. Defaults to 64.

    Returns:
        A `keras_hub.models.VGGBackbone`.
    """
    import keras_hub

    return keras_hub.models.VGGBackbone(
        stackwise_num_repeats=list(VGG19_REPEATS),
        stackwise_num_filters=list(vgg19_filters(encoder_filters)),
        image_shape=tuple(input_shape),
    )


def load_backbone(input_shape, encoder_weights, encoder_filters=64):
    """The VGG19 backbone, with weights from a local `.weights.h5` file or preset folder.

    Args:
        input_shape: tuple. (H, W, C).
        encoder_weights: str or None. Local path; None or "" keeps random weights.
        encoder_filters: int. First-block filters (must match the weights).

    Raises:
        ConfigError: the path is missing, not a weights file, or does not match.
    """
    if not encoder_weights:
        return make_backbone(input_shape, encoder_filters)
    return load_hub_backbone(
        "VGGBackbone", input_shape, encoder_weights,
        lambda: make_backbone(input_shape, encoder_filters), "VGG19",
    )


def make_encoder(backbone):
    """Wraps a VGG backbone as a model returning `{"P0": ..., "P5": ...}` (stride 2**k).

    P0-P4 are the last convolution of blocks 1-5 (before pooling), P5 the
    last pooling.
    """
    blocks = len(backbone.stackwise_num_repeats)
    features = {
        f"P{i}": backbone.get_layer(f"block{i + 1}_conv{n}").output
        for i, n in enumerate(backbone.stackwise_num_repeats)
    }
    features[f"P{blocks}"] = backbone.output
    return keras.Model(backbone.inputs, features, name="encoder")


def apply_se_block(x, ratio=16, *, name="se"):
    """Squeeze-and-excitation (Hu et al. 2017): channels scaled by a gate of their means.

    Args:
        x: tensor (B, H, W, C).
        ratio: int. Reduction of the hidden layer (at least one unit). Defaults to 16.
        name: str. Prefix of the layer names.

    Returns:
        tensor (B, H, W, C).
    """
    c = x.shape[-1]
    s = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_squeeze")(x)
    s = layers.Conv2D(max(c // ratio, 1), 1, activation="relu", name=f"{name}_reduce")(s)
    s = layers.Conv2D(c, 1, activation="sigmoid", name=f"{name}_expand")(s)
    return layers.Multiply(name=f"{name}_scale")([x, s])


@register("vgg19se", size_multiple=32, encoder=True)
def build_vgg_se_unet(
    input_shape=(None, None, 3),
    out_channels=1,
    encoder_weights=None,
    encoder_filters=64,
    filters=16,
    batch_norm=True,
    se_ratio=16,
    k=1.0,
    name="vgg19se",
):
    """Builds the VGG19-SE U-Net; returns logits `z / k` (see `AdaptiveLogistic`).

    Decoder level k (stride 2**k, k = 4..0) has `filters * 2**k` filters, as in
    `build_resnet_unet`; the stride-32 bottleneck gets a conv block of
    `filters * 16`. Every encoder feature is SE-weighted before it is used.

    Args:
        input_shape: tuple. (H, W, C); H and W multiples of 32, or None.
            Defaults to (None, None, 3).
        out_channels: int. Output logit channels. Defaults to 1.
        encoder_weights: str. Local `.weights.h5` of a keras-hub `VGGBackbone`
            (VGG19 layout) or a keras-hub preset folder; None or "" for random
            weights. Nothing is downloaded. Defaults to None.
        encoder_filters: int. Filters of the first VGG block (64 is VGG19;
            smaller for tests). Defaults to 64.
        filters: int. Decoder filters at full resolution. Defaults to 16.
        batch_norm: bool. Batch norm in the decoder. Defaults to True.
        se_ratio: int. Reduction ratio of the SE blocks. Defaults to 16.
        k: float. Initial k of the adaptive logistic. Defaults to 1.0.
        name: str. Model name. Defaults to `"vgg19se"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) images to (B, H, W,
        out_channels) float32 logits; `model.get_layer("encoder")` is the encoder.

    Example:

    >>> model = build_vgg_se_unet((64, 64, 3), encoder_filters=8, filters=8)
    >>> model.output_shape
    (None, 64, 64, 1)
    """
    check_builder_args(
        input_shape, SIZE_MULTIPLE, filters=filters, out_channels=out_channels,
        encoder_filters=encoder_filters, se_ratio=se_ratio,
    )
    enc = make_encoder(load_backbone(input_shape, encoder_weights, encoder_filters))
    inputs = keras.Input(shape=input_shape, name="image")
    features = enc(inputs)
    x = apply_se_block(features["P5"], se_ratio, name="se5")
    x = apply_conv_block(x, filters * 16, batch_norm=batch_norm, name="center")
    for level in (4, 3, 2, 1, 0):
        f = filters * 2**level
        x = apply_upsample(x, f, name=f"up{level}")
        skip = apply_se_block(features[f"P{level}"], se_ratio, name=f"se{level}")
        x = layers.Concatenate(name=f"up{level}_concat")([x, skip])
        x = apply_conv_block(x, f, batch_norm=batch_norm, name=f"up{level}")
    z = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    outputs = AdaptiveLogistic(k=k, name="adaptive_logistic")(z)
    return keras.Model(inputs, outputs, name=name)
