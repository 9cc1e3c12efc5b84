"""ResNet-DeepLabV3+ with K sigmoid heads and an MC-dropout layer (SMILE's network).

The encoder is the keras-hub `ResNetBackbone` wrapped as a pyramid-feature
model (`resnet_unet.make_encoder`, never downloaded), at output stride 16 by
default (its last stage unstrided and dilated by 2; 8 dilates the last two). On
its output an atrous spatial pyramid pooling (ASPP) block (Chen et al. 2017)
runs parallel 1x1 and dilated 3x3 convolutions plus image pooling; the DeepLabV3+
decoder (Chen et al. 2018) up-samples it to stride 4, concatenates the
projected stride-4 features, refines with two 3x3 convolutions, and a 1x1
convolution gives K logits, one independent binary classifier per structure
(Petit, Thome et al. 2018), bilinearly up-sampled to the input size.

An `MCDropout` layer sits before the head: ordinary dropout while training,
and at inference only when switched on (the Monte-Carlo loop of
`inference.predictor`), for Monte-Carlo uncertainty (Gal & Ghahramani 2016).
"""

import keras
from keras import layers, ops

from lesionkeras.models.blocks import apply_conv_block, check_builder_args
# ResizeLike lived here before it moved to layers.py; kept importable from here.
from lesionkeras.models.layers import BilinearUpSampling2D, ResizeLike  # noqa: F401
from lesionkeras.models.registry import register
from lesionkeras.models.resnet_unet import ENCODERS, SIZE_MULTIPLE, load_backbone, make_encoder

_PACKAGE = "lesionkeras"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MCDropout(layers.Layer):
    """Dropout that can stay on at inference (Monte-Carlo dropout).

    Active when `training=True`, or when its non-trainable `enabled`
    variable is 1 (set by `inference.predictor`'s MC loop); the identity otherwise. A
    variable rather than a Python flag, so compiled predict functions see it.

    Args:
        rate: float in [0, 1). Fraction of units dropped.
        seed: int or None. Seed of the dropout masks. Defaults to None.

    Example:
        x = MCDropout(0.3, seed=0)(features)
    """

    def __init__(self, rate, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(rate) < 1.0:
            raise ValueError(f"`rate` must be in [0, 1). Received: rate={rate}")
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.enabled = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="enabled", dtype="float32"
        )

    def call(self, inputs, training=None):
        if not self.rate:
            return inputs
        if training:
            return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)
        dropped = keras.random.dropout(inputs, self.rate, seed=self.seed_generator)
        on = ops.cast(self.enabled > 0.5, inputs.dtype)
        return on * dropped + (1 - on) * inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def apply_aspp_block(x, filters, rates, *, name="aspp"):
    """ASPP: 1x1 conv, dilated 3x3 convs at `rates`, image pooling; concat; 1x1 conv."""

    def conv_bn(y, kernel, rate, suffix):
        y = layers.Conv2D(filters, kernel, padding="same", dilation_rate=rate, use_bias=False,
                          name=f"{name}_{suffix}_conv")(y)
        y = layers.BatchNormalization(name=f"{name}_{suffix}_bn")(y)
        return layers.Activation("relu", name=f"{name}_{suffix}_relu")(y)

    branches = [conv_bn(x, 1, 1, "1x1")]
    branches += [conv_bn(x, 3, r, f"rate{r}") for r in rates]
    pooled = layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    pooled = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pool_conv")(pooled)
    pooled = layers.Activation("relu", name=f"{name}_pool_relu")(pooled)
    branches.append(ResizeLike(name=f"{name}_pool_resize")([pooled, x]))
    y = layers.Concatenate(name=f"{name}_concat")(branches)
    return conv_bn(y, 1, 1, "project")


# Output stride -> (stage strides of the ResNet, dilation of each stage, ASPP rates).
# DeepLabV3(+) (Chen et al. 2017, 2018): the stages past the output stride keep their
# resolution and dilate their 3x3 convolutions instead; the ASPP rates double when
# the stride halves.
OUTPUT_STRIDES = {
    32: ((1, 2, 2, 2), (1, 1, 1, 1), (6, 12, 18)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2), (6, 12, 18)),
    8: ((1, 2, 1, 1), (1, 1, 2, 4), (12, 24, 36)),
}


def dilate_stages(backbone, dilations):
    """Sets the dilation of the 3x3 convolutions of each ResNet stage (`stack{i}_...`).

    Only for stages of stride 1, whose convolutions pad `same`: the dilated
    convolutions keep the feature-map sizes, so the built graph stays valid,
    and the weights are unchanged (a pretrained encoder loads as before).
    """
    for i, rate in enumerate(dilations):
        if rate == 1:
            continue
        for layer in backbone.layers:
            if (layer.name.startswith(f"stack{i}_") and isinstance(layer, layers.Conv2D)
                    and layer.kernel_size != (1, 1)):
                if layer.strides != (1, 1) or layer.padding != "same":
                    raise ValueError(f"Cannot dilate strided layer {layer.name!r}.")
                layer.dilation_rate = (rate, rate)


def build_resnet_deeplab(
    input_shape=(None, None, 3),
    out_channels=1,
    encoder="resnet18",
    encoder_weights=None,
    filters=64,
    output_stride=16,
    rates=None,
    dropout=0.1,
    seed=None,
    name=None,
):
    """Builds a ResNet-DeepLabV3+ returning K logits (apply a sigmoid per channel).

    References: Chen et al., "Encoder-Decoder with Atrous Separable
    Convolution" (DeepLabV3+), ECCV 2018; Petit, Thome et al., SMILE, 2018.

    Args:
        input_shape: tuple. (H, W, C); H and W multiples of 32, or None.
            Defaults to (None, None, 3).
        out_channels: int. K, the number of structures. Defaults to 1.
        encoder: str. `"resnet18"`, `"resnet34"` or `"resnet50"`. Defaults to `"resnet18"`.
        encoder_weights: str. Local `.weights.h5` or keras-hub preset folder;
            None or "" for random weights (nothing is downloaded). Defaults to None.
        filters: int. Width of ASPP and decoder (the paper's DeepLab: 256).
            Defaults to 64.
        output_stride: int. 32, 16 or 8: the encoder's total stride; below 32 the
            last stage(s) are dilated instead of strided. Defaults to 16.
        rates: tuple of int or None. ASPP dilation rates; None follows the output
            stride ((6, 12, 18) at 16 and 32, (12, 24, 36) at 8). Defaults to None.
        dropout: float. Rate of the MC-dropout layer before the head. Defaults to 0.1.
        seed: int or None. Seed of the dropout masks. Defaults to None.
        name: str. Model name. Defaults to `f"{encoder}_deeplab"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) to (B, H, W, K) float32 logits.

    Example:

    >>> model = build_resnet_deeplab((64, 64, 3), out_channels=6, filters=16)
    >>> model.output_shape
    (None, 64, 64, 6)
    """
    if encoder not in ENCODERS:
        raise ValueError(
            f"`encoder` must be one of {tuple(ENCODERS)}. Received: encoder={encoder!r}"
        )
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"`output_stride` must be one of {tuple(OUTPUT_STRIDES)}. "
            f"Received: output_stride={output_stride}"
        )
    check_builder_args(input_shape, SIZE_MULTIPLE, dropout, filters=filters, out_channels=out_channels)
    name = name or f"{encoder}_deeplab"
    strides, dilations, default_rates = OUTPUT_STRIDES[output_stride]
    backbone = load_backbone(encoder, input_shape, encoder_weights, strides)
    dilate_stages(backbone, dilations)
    enc = make_encoder(backbone)
    inputs = keras.Input(shape=input_shape, name="image")
    features = enc(inputs)
    x = apply_aspp_block(features["P5"], filters, tuple(rates or default_rates))
    low = layers.Conv2D(max(filters // 4, 8), 1, use_bias=False, name="low_proj_conv")(features["P2"])
    low = layers.BatchNormalization(name="low_proj_bn")(low)
    low = layers.Activation("relu", name="low_proj_relu")(low)
    x = BilinearUpSampling2D(output_stride // 4, name="decoder_up")(x)
    x = layers.Concatenate(name="decoder_concat")([x, low])
    x = apply_conv_block(x, filters, batch_norm=True, name="decoder")
    x = MCDropout(dropout, seed=seed, name="mc_dropout")(x)
    x = layers.Conv2D(out_channels, 1, dtype="float32", name="head_logits")(x)
    outputs = BilinearUpSampling2D(4, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _variant(encoder):
    def build(
        input_shape=(None, None, 3), out_channels=1, encoder_weights=None, filters=64,
        output_stride=16, dropout=0.1, name=None,
    ):
        return build_resnet_deeplab(
            input_shape=input_shape, out_channels=out_channels, encoder=encoder,
            encoder_weights=encoder_weights, filters=filters, output_stride=output_stride,
            dropout=dropout, name=name,
        )

    build.__name__ = f"build_{encoder}_deeplab"
    build.__doc__ = f"`build_resnet_deeplab(encoder={encoder!r}, ...)`; see `build_resnet_deeplab`."
    return build


build_resnet18_deeplab = register("resnet18_deeplab", size_multiple=32, encoder=True, mc_dropout=True)(_variant("resnet18"))
build_resnet34_deeplab = register("resnet34_deeplab", size_multiple=32, encoder=True, mc_dropout=True)(_variant("resnet34"))
build_resnet50_deeplab = register("resnet50_deeplab", size_multiple=32, encoder=True, mc_dropout=True)(_variant("resnet50"))


@register("deeplabv3plus", size_multiple=32, encoder=True, mc_dropout=True)
def build_deeplabv3plus(
    input_shape=(None, None, 3), out_channels=1, encoder_weights=None, filters=16,
    output_stride=16, dropout=0.0, name="deeplabv3plus",
):
    """ResNet50-DeepLabV3+ for supervised training (the ISIC 2018 report's ensemble member).

    `build_resnet_deeplab` with a ResNet50 encoder, ASPP and decoder width
    `16 * filters` (the `[model]` default `filters = 16` gives the paper's
    256) and no dropout by default: the plain DeepLabV3+ of Chen et al. 2018,
    which Xue et al. (ISIC 2018) trained with pixel-wise cross-entropy and
    averaged with their SegAN models.

    Args:
        input_shape: tuple. (H, W, C); multiples of 32. Defaults to (None, None, 3).
        out_channels: int. Output logit channels. Defaults to 1.
        encoder_weights: str. Local ResNet50 `.weights.h5` or keras-hub preset
            folder; None or "" for random weights. Defaults to None.
        filters: int. A sixteenth of the ASPP/decoder width. Defaults to 16.
        output_stride: int. 16 or 8 (dilated encoder), or 32. Defaults to 16.
        dropout: float. Rate of the MC-dropout layer before the head. Defaults to 0.
        name: str. Model name. Defaults to `"deeplabv3plus"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) to (B, H, W, K) float32 logits.

    Example:

    >>> model = build_deeplabv3plus((64, 64, 3), filters=1)
    >>> model.output_shape
    (None, 64, 64, 1)
    """
    return build_resnet_deeplab(
        input_shape=input_shape, out_channels=out_channels, encoder="resnet50",
        encoder_weights=encoder_weights, filters=16 * filters, output_stride=output_stride,
        dropout=dropout, name=name,
    )
