"""Small reusable graph pieces shared by the model builders."""

import keras
import tensorflow as tf
from keras import layers

from lesionkeras.models.layers import BilinearUpSampling2D, ResizeLike


@keras.saving.register_keras_serializable(package="lesionkeras")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` that runs TensorFlow's fused kernel on NHWC tensors.

    Keras 3 normalises with separate moment, subtract and scale ops; the fused
    kernel does the forward and backward pass in one sweep over memory, about
    five times faster on a CPU, which matters because batch norm is memory-bound
    and sits after every convolution. Same variables, same semantics (including
    frozen layers staying in inference mode); anything the fused kernel cannot
    do (masks, renorm, synchronised statistics, other layouts) falls back to
    the Keras implementation.
    """

    def _fusable(self, inputs, mask):
        return (
            mask is None
            and not getattr(self, "renorm", False)  # Keras >= 3.13
            and not getattr(self, "synchronized", False)
            and self.scale
            and self.center
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
            # The fused kernel has no float64 version (float64 models serve as
            # numerical references in the tests).
            and self.compute_dtype != "float64"
            # Meta-learning needs exact second derivatives (`make_second_order_exact`).
            and not getattr(self, "second_order_exact", False)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        gamma = tf.cast(self.gamma, tf.float32)
        beta = tf.cast(self.beta, tf.float32)
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta, mean=empty, variance=empty,
                epsilon=self.epsilon, is_training=True, data_format="NHWC",
            )
            # The kernel returns the unbiased variance; Keras tracks the biased one.
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
            m = self.momentum
            self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))
        else:
            y, _, _, _, _, _ = tf.raw_ops.FusedBatchNormV3(
                x=x, scale=gamma, offset=beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon, is_training=False, data_format="NHWC",
            )
        return tf.cast(y, self.compute_dtype)


def make_second_order_exact(model):
    """Makes every layer of `model` exact under second derivatives (meta-learning).

    Two kinds of layer run a fast kernel whose second derivative TensorFlow
    gets wrong, and have an exact path that gives the same values:

    - `FusedBatchNormalization`: the fused kernel has no float64 version, so
      the float64 finite-difference reference of eq. 7
      (`tests/test_meta_reference.py`) cannot vouch for the derivative of
      its gradient kernel (`FusedBatchNormGradV3`). Switched, it runs Keras'
      batch norm, which that reference checks on every model.
    - `BilinearUpSampling2D` and `ResizeLike`: TensorFlow drops the second
      derivative of its bilinear resize kernel. Switched, they resize with
      matrix products (`layers.resize_bilinear`).

    The switch lives on the layer objects (it is not saved), changes no
    forward value, and must happen before the model's functions are traced.
    Nested models are walked too; Keras' own `BatchNormalization` layers need
    nothing.

    Returns:
        int: how many layers were switched.
    """
    count = 0
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, (FusedBatchNormalization, BilinearUpSampling2D, ResizeLike)):
            layer.second_order_exact = True
            count += 1
        stack.extend(getattr(layer, "layers", ()))
    return count


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
            x = FusedBatchNormalization(momentum=0.9, name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def apply_upsample(x, filters, *, mode="bilinear", name="up"):
    """Doubles the spatial size: bilinear resize + 1x1 conv, or a transposed conv.

    The resize is `BilinearUpSampling2D` (exact under second derivatives once
    `make_second_order_exact` switched it, as meta-learning does).
    """
    if mode == "transpose":
        return layers.Conv2DTranspose(
            filters, 2, strides=2, padding="same", name=f"{name}_tconv"
        )(x)
    x = BilinearUpSampling2D(2, name=f"{name}_resize")(x)
    return layers.Conv2D(filters, 1, padding="same", name=f"{name}_proj")(x)


def apply_global_conv(x, filters, kernel_size, *, use_bias=False, name="gcn"):
    """Two-way global convolution (Peng et al., "Large Kernel Matters", CVPR 2017).

    The sum of a `k x 1` then `1 x k` branch and a `1 x k` then `k x 1` branch:
    a dense `k x k` receptive field with `4 * k` instead of `k * k` taps per
    channel pair, which is how SegAN (Xue et al. 2018) gets large kernels cheaply.

    Args:
        x: tensor (B, H, W, C).
        filters: int. Output channels.
        kernel_size: int. The `k` of both separable branches.
        use_bias: bool. Bias on the last convolution of each branch. Defaults to False
            (batch norm follows).
        name: str. Prefix of the layer names. Defaults to `"gcn"`.

    Returns:
        tensor (B, H, W, filters).
    """
    k = int(kernel_size)

    def conv(t, shape, suffix, bias):
        return layers.Conv2D(
            filters, shape, padding="same", use_bias=bias, kernel_initializer="he_normal",
            name=f"{name}_{suffix}",
        )(t)

    left = conv(conv(x, (k, 1), "l1", False), (1, k), "l2", use_bias)
    right = conv(conv(x, (1, k), "r1", False), (k, 1), "r2", use_bias)
    return layers.Add(name=f"{name}_sum")([left, right])


def check_builder_args(input_shape, multiple, dropout=0.0, **counts):
    """Validates the arguments every segmentation builder shares.

    Args:
        input_shape: tuple. (H, W, C); known sides must be multiples of `multiple`.
        multiple: int. Total down-sampling factor of the network.
        dropout: float. Must lie in [0, 1).
        **counts: ints that must be >= 1 (`filters`, `depth`, `out_channels`, ...).

    Raises:
        ValueError: naming the received values.
    """
    bad = {k: v for k, v in counts.items() if v < 1}
    if bad:
        received = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise ValueError(
            f"`{'`, `'.join(counts)}` must be >= 1. Received: {received}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    for side in input_shape[:2]:
        if side is not None and side % multiple:
            raise ValueError(
                f"Input sides must be multiples of {multiple} (divisible by the "
                "network's total down-sampling). "
                f"Received: input_shape={tuple(input_shape)}"
            )
