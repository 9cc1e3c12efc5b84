"""SegAN critic (Xue, Xu, Huang, ISBI 2018): a multi-scale feature extractor.

Not a real/fake classifier: the critic maps an image masked by a label map to
the feature maps of every block, and the multi-scale L1 loss
(`lesionkeras.losses.multiscale_l1`) compares those of the image masked by the
prediction with those of the image masked by the truth.
"""

import keras
from keras import layers

from lesionkeras.models.blocks import FusedBatchNormalization
from lesionkeras.models.segan import apply_conv


def build_critic(
    input_shape=(None, None, 3),
    blocks=5,
    filters=16,
    max_filters=128,
    kernel_size=9,
    leaky=False,
    name="critic",
):
    """Builds the critic: `blocks` x (k x k conv, BN, act; 3x3 stride-2 conv, BN, act).

    Each block is a convolution of kernel `k` (for k > 7 a two-way global
    convolution, `1 x k` then `k x 1` plus `k x 1` then `1 x k`) followed by a
    3x3 stride-2 convolution, so block `i` sees the image at 1 / 2**(i+1) of its
    size. Batch norm follows every convolution except in the first block.

    Two published forms: the ISIC 2018 report's (ReLU, k = 9 in every block:
    `kernel_size=9`) and the ISBI 2018 paper's (leaky ReLU 0.2, kernels of the
    segmentor's decoder in reverse, 7, 9, 11, ...:
    `kernel_size=methods.segan.isbi_critic_kernels(blocks), leaky=True`).

    Args:
        input_shape: tuple. (H, W, C) of the masked images; H and W divisible
            by 2**blocks, or None. Defaults to (None, None, 3).
        blocks: int. Number of blocks (paper: 5). Defaults to 5.
        filters: int. Filters of the first block, doubled per block. Defaults to 16.
        max_filters: int. Cap on the filters of a block. Defaults to 128.
        kernel_size: int or tuple of int (one per block, finest first). `k` of
            each block's first convolution. Defaults to 9.
        leaky: bool. Leaky ReLU (slope 0.2) instead of ReLU. Defaults to False.
        name: str. Model name. Defaults to `"critic"`.

    Returns:
        A functional `keras.Model` returning a list of `blocks + 1` float32
        tensors: the input itself, then the output of every block.

    Example:

    >>> critic = build_critic((64, 64, 3), filters=8)
    >>> [tuple(s[1:3]) for s in critic.output_shape]
    [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    """
    kernels = (kernel_size,) * blocks if isinstance(kernel_size, int) else tuple(kernel_size)
    if blocks < 1 or filters < 1 or len(kernels) != blocks or min(kernels) < 1:
        raise ValueError(
            "`blocks` and `filters` must be >= 1 and `kernel_size` an int >= 1 or one per "
            f"block. Received: blocks={blocks}, filters={filters}, kernel_size={kernel_size}"
        )
    for side in input_shape[:2]:
        if side is not None and side % (2**blocks):
            raise ValueError(
                f"Input sides must be divisible by 2**blocks={2**blocks}. "
                f"Received: input_shape={tuple(input_shape)}, blocks={blocks}"
            )
    def act(t, name):
        return layers.LeakyReLU(0.2, name=name)(t) if leaky else layers.ReLU(name=name)(t)

    inputs = keras.Input(shape=input_shape, name="masked_image")
    features = [layers.Identity(name="input_features", dtype="float32")(inputs)]
    x = inputs
    for b in range(blocks):
        f = min(filters * 2**b, max(max_filters, filters))
        bn = b > 0
        x = apply_conv(x, f, kernels[b], use_bias=not bn, name=f"block{b}_gcn")
        if bn:
            x = FusedBatchNormalization(momentum=0.9, name=f"block{b}_gcn_bn")(x)
        x = act(x, f"block{b}_gcn_relu")
        x = layers.Conv2D(
            f, 3, strides=2, padding="same", use_bias=not bn,
            kernel_initializer="he_normal", name=f"block{b}_conv",
        )(x)
        if bn:
            x = FusedBatchNormalization(momentum=0.9, name=f"block{b}_bn")(x)
        x = act(x, f"block{b}_relu")
        features.append(layers.Identity(name=f"block{b}_features", dtype="float32")(x))
    return keras.Model(inputs, features, name=name)
