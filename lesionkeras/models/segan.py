"""SegAN segmentor (Xue, Xu, Huang, "Adversarial learning with multi-scale loss
for skin lesion segmentation", ISBI 2018).

Encoder of stride-2 convolutions (kernels 7, 5, 4, then 4 for any further
level), each followed by a residual block (1x1, 3x3, 1x1); decoder of bilinear
x2 resizing + convolutions with kernels 11, 9, 7 (coarsest first; kernels > 7
are two-way global convolutions `k x 1 + 1 x k`), each followed by a residual
block; U-Net skip connections; batch norm after every convolution except in
the first down-sampling block; leaky ReLU going down, ReLU going up. The last
layer is the paper's adaptive logistic activation f(z) = 1 / (1 + exp(-z / k)),
kept in the package's logits convention: the model returns `z / k`, so
`sigmoid(output)` is f(z) and every loss and metric with `from_logits=True`
sees the sharpened probabilities.
"""

import keras
from keras import layers

from lesionkeras.models.blocks import FusedBatchNormalization, apply_global_conv, check_builder_args
from lesionkeras.models.layers import BilinearUpSampling2D
from lesionkeras.models.registry import register

ENCODER_KERNELS = (7, 5, 4)
DECODER_KERNELS = (11, 9, 7)
GLOBAL_CONV_ABOVE = 7  # the paper: "for kernel size greater than 7, global convolution"


@keras.saving.register_keras_serializable(package="lesionkeras")
class AdaptiveLogistic(layers.Layer):
    """Adaptive logistic activation of SegAN (eq. 3), returned as logits.

    f(z) = 1 / (1 + exp(-z / k)); this layer returns `z / k` so that
    `sigmoid(output) = f(z)` and the model keeps the package's logits
    convention. `k` is a non-trainable scalar variable: it is saved with the
    model's weights and annealed during training by
    `lesionkeras.training.callbacks.AnnealLogisticK` (the paper: 1.0, times 0.9 every
    25 epochs, down to 0.3).

    Args:
        k: float > 0. Initial steepness; 1.0 is the plain sigmoid. Defaults to 1.0.

    Example:

    >>> layer = AdaptiveLogistic(k=0.5)
    >>> float(layer(keras.ops.ones((1, 1))))
    2.0
    """

    def __init__(self, k=1.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if not float(k) > 0.0:
            raise ValueError(f"`k` must be > 0. Received: k={k}")
        self.initial_k = float(k)
        self.k = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_k),
            trainable=False,
            name="k",
        )

    def call(self, inputs):
        # float32 unless built for another dtype (float64 numerical references).
        return keras.ops.cast(inputs, self.compute_dtype) / keras.ops.cast(self.k, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "k": self.initial_k}


def _bn(x, name):
    # momentum 0.9 as in blocks.apply_conv_block: short CPU runs need usable statistics.
    return FusedBatchNormalization(momentum=0.9, name=name)(x)


def _act(x, leaky, name):
    if leaky:
        return layers.LeakyReLU(0.2, name=name)(x)
    return layers.ReLU(name=name)(x)


def apply_residual_block(x, *, leaky, batch_norm=True, name="res"):
    """SegAN residual block: 1x1, 3x3, 1x1 convolutions added to the input.

    Args:
        x: tensor (B, H, W, C).
        leaky: bool. Leaky ReLU (encoder) or ReLU (decoder).
        batch_norm: bool. Batch norm after each convolution. Defaults to True.
        name: str. Prefix of the layer names.

    Returns:
        tensor (B, H, W, C).
    """
    c = x.shape[-1]
    y = x
    for i, k in enumerate((1, 3, 1)):
        y = layers.Conv2D(
            c, k, padding="same", use_bias=not batch_norm,
            kernel_initializer="he_normal", name=f"{name}_conv{i}",
        )(y)
        if batch_norm:
            y = _bn(y, f"{name}_bn{i}")
        if i < 2:
            y = _act(y, leaky, f"{name}_act{i}")
    y = layers.Add(name=f"{name}_add")([x, y])
    return _act(y, leaky, f"{name}_out")


def apply_conv(x, filters, kernel_size, *, strides=1, use_bias=False, name="conv"):
    """A `k x k` convolution, or a two-way global convolution when k > 7."""
    if kernel_size > GLOBAL_CONV_ABOVE and strides == 1:
        return apply_global_conv(x, filters, kernel_size, use_bias=use_bias, name=name)
    return layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", use_bias=use_bias,
        kernel_initializer="he_normal", name=name,
    )(x)


def encoder_kernels(depth):
    """Kernels of the `depth` stride-2 convolutions: 7, 5, 4, then 4."""
    return tuple(ENCODER_KERNELS[i] if i < len(ENCODER_KERNELS) else 4 for i in range(depth))


def decoder_kernels(depth):
    """Kernels of the `depth` up-sampling blocks, coarsest first: ..., 11, 11, 9, 7."""
    tail = DECODER_KERNELS[-depth:] if depth <= len(DECODER_KERNELS) else DECODER_KERNELS
    return (DECODER_KERNELS[0],) * (depth - len(tail)) + tuple(tail)


@register("segan", size_multiple="depth")
def build_segan(
    input_shape=(None, None, 3),
    out_channels=1,
    depth=3,
    filters=16,
    k=1.0,
    name="segan",
):
    """Builds the SegAN segmentor; returns `z / k` logits (see `AdaptiveLogistic`).

    The paper's network has `depth=3` (kernels 7, 5, 4 down; 11, 9, 7 up) and
    64 base filters at 128 x 128; `depth` > 3 adds levels with kernel 4 down
    and 11 up.

    Args:
        input_shape: tuple. (H, W, C); H and W divisible by 2**depth, or None.
            Defaults to (None, None, 3).
        out_channels: int. Output channels (independent binary masks). Defaults to 1.
        depth: int. Number of stride-2 levels. Defaults to 3.
        filters: int. Filters of the first level, doubled per level. Defaults to 16.
        k: float. Initial steepness of the adaptive logistic. Defaults to 1.0.
        name: str. Model name. Defaults to `"segan"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) images to (B, H, W,
        out_channels) float32 logits `z / k`.

    Example:

    >>> model = build_segan((64, 64, 3), depth=3, filters=8)
    >>> model.output_shape
    (None, 64, 64, 1)
    """
    check_builder_args(
        input_shape, 2**depth, depth=depth, filters=filters, out_channels=out_channels
    )

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level, kernel in enumerate(encoder_kernels(depth)):
        first = level == 0
        x = apply_conv(
            x, filters * 2**level, kernel, strides=2, use_bias=first, name=f"down{level}_conv"
        )
        if not first:  # the paper: batch norm everywhere but the first down block
            x = _bn(x, f"down{level}_bn")
        x = _act(x, True, f"down{level}_act")
        x = apply_residual_block(x, leaky=True, batch_norm=not first, name=f"down{level}_res")
        skips.append(x)
    # Up block `level` brings the features to 1 / 2**level of the input size.
    for level, kernel in zip(reversed(range(depth)), decoder_kernels(depth)):
        f = filters * 2 ** max(level - 1, 0)
        x = BilinearUpSampling2D(2, name=f"up{level}_resize")(x)
        x = apply_conv(x, f, kernel, name=f"up{level}_conv")
        x = _bn(x, f"up{level}_bn")
        x = _act(x, False, f"up{level}_act")
        x = apply_residual_block(x, leaky=False, name=f"up{level}_res")
        if level > 0:
            x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level - 1]])
    z = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    outputs = AdaptiveLogistic(k=k, name="adaptive_logistic")(z)
    return keras.Model(inputs, outputs, name=name)
