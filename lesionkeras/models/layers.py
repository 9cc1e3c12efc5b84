"""Custom layers: bilinear resizing that can be differentiated to any order.

TensorFlow differentiates `ResizeBilinear` once (its gradient is the
`ResizeBilinearGrad` kernel) but registers `ResizeBilinearGrad` itself as not
differentiable, so second derivatives through `tf.image.resize` /
`keras.layers.UpSampling2D(interpolation="bilinear")` are silently zero, in
reverse mode (nested tapes) and in forward mode (a `ForwardAccumulator` gets
its JVPs by differentiating the gradient). Meta-learning (eq. 7 of Mirikharaji
et al. 2019, Ren et al. 2018) differentiates a gradient.

Bilinear resizing is separable and linear: `Y = A_h X A_w^T` per image and
channel, with interpolation matrices that have two non-zeros per row. Two
batched matrix products with those matrices (`resize_bilinear`) are exact to
any order of differentiation in both modes (the derivative of a matmul is a
matmul). They cost more than TensorFlow's fused kernel, though: a dense
product spends `size_in` multiply-adds per output value where the kernel
spends two, about 25 ms of a 96 px U-Net training step against 4 ms
(`benchmarks/upsampling.py`). So the layers below run the fused kernel by
default, the same values, and switch to the matrix products when their
`second_order_exact` attribute is set, which `blocks.make_second_order_exact`
does for every method that differentiates a gradient; `second_order.py`
checks that nothing was missed. A `tf.custom_gradient` pairing the kernel
with its adjoint was tried first: exact in reverse mode, but TensorFlow's
graph-mode forward accumulator ignores custom gradients, so forward-mode
meta-gradients stayed wrong. Composite alternatives (shifted slices, a
phase-wise depthwise convolution + `depth_to_space`, a strided transposed
depthwise convolution) are exact too but were no faster than the matrix
products.
"""

import functools

import keras
import numpy as np
import tensorflow as tf
from keras import layers

_PACKAGE = "lesionkeras"


def interpolation_matrix(size_in, size_out, dtype=tf.float32):
    """The (size_out, size_in) matrix of 1-D bilinear resizing.

    Half-pixel centres: output index `o` samples input coordinate
    `(o + 0.5) * size_in / size_out - 0.5`, clamped to the edge pixels, which
    is the convention of `tf.image.resize` and Keras' bilinear `UpSampling2D`.

    Args:
        size_in: int or scalar int tensor.
        size_out: int or scalar int tensor.
        dtype: dtype of the matrix. Defaults to float32.
    """
    size_in = tf.cast(size_in, tf.int32)
    scale = tf.cast(size_in, tf.float32) / tf.cast(size_out, tf.float32)
    src = (tf.range(size_out, dtype=tf.float32) + 0.5) * scale - 0.5
    floor = tf.floor(src)
    frac = (src - floor)[:, None]
    low = tf.clip_by_value(tf.cast(floor, tf.int32), 0, size_in - 1)
    high = tf.clip_by_value(tf.cast(floor, tf.int32) + 1, 0, size_in - 1)
    matrix = tf.one_hot(low, size_in) * (1.0 - frac) + tf.one_hot(high, size_in) * frac
    return tf.cast(matrix, dtype)


def resize_bilinear(images, size):
    """`tf.image.resize(images, size, method="bilinear")`, differentiable to any order.

    Args:
        images: float tensor (B, H, W, C).
        size: (int, int) or int32 tensor of shape (2,). Output height and width.

    Returns:
        Tensor (B, size[0], size[1], C) of the dtype of `images`.
    """
    x = tf.convert_to_tensor(images)
    shape = tf.shape(x)
    b, h, w, c = shape[0], shape[1], shape[2], shape[3]
    size = tf.convert_to_tensor(size, tf.int32)
    out_h, out_w = size[0], size[1]
    # Sizes known when the graph is traced (a fixed input size) give constant
    # matrices, computed once instead of at every step.
    static = [tf.get_static_value(v) for v in (h, out_h, w, out_w)]
    if all(v is not None for v in static):
        h, out_h, w, out_w = (int(v) for v in static)
    # Rows: (1, out_h, h) @ (B, h, W*C) -> (B, out_h, W*C), the batch broadcast.
    a_h = _matrix(h, out_h, x.dtype)[None]
    y = tf.linalg.matmul(a_h, tf.reshape(x, tf.stack([b, h, w * c])))
    # Columns: (1, out_w, w) @ (B*out_h, w, C) -> (B*out_h, out_w, C).
    a_w = _matrix(w, out_w, x.dtype)[None]
    y = tf.linalg.matmul(a_w, tf.reshape(y, tf.stack([b * out_h, w, c])))
    return tf.reshape(y, tf.stack([b, out_h, out_w, c]))


def resize(images, size, second_order_exact):
    """Bilinear resize: `resize_bilinear` if `second_order_exact` (or float64), else TensorFlow's kernel.

    Both give the values of `tf.image.resize(method="bilinear")` in the dtype of `images`.
    """
    x = tf.convert_to_tensor(images)
    # The kernel computes in float32 whatever the input dtype; float64 models
    # (numerical references in the tests) need float64 arithmetic.
    if second_order_exact or x.dtype == tf.float64:
        return resize_bilinear(x, size)
    return tf.cast(tf.image.resize(x, size, method="bilinear"), x.dtype)


def _matrix(size_in, size_out, dtype):
    if isinstance(size_in, int) and isinstance(size_out, int):
        # A graph constant: no ops in the step, and no eager op calls while tracing.
        return tf.constant(_numpy_matrix(size_in, size_out), dtype=dtype)
    return interpolation_matrix(size_in, size_out, dtype)


@functools.lru_cache(maxsize=256)
def _numpy_matrix(size_in, size_out):
    """`interpolation_matrix` for static sizes, in float64 numpy (cached per size pair)."""
    src = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    floor = np.floor(src)
    frac = (src - floor)[:, None]
    low = np.clip(floor.astype(np.int64), 0, size_in - 1)
    high = np.clip(floor.astype(np.int64) + 1, 0, size_in - 1)
    eye = np.eye(size_in)
    matrix = eye[low] * (1.0 - frac) + eye[high] * frac
    matrix.flags.writeable = False
    return matrix


def _pair(value, name):
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(
            f"`{name}` must be a positive int or a pair of positive ints. Received: {name}={value!r}"
        )
    return pair


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BilinearUpSampling2D(layers.Layer):
    """Bilinear up-sampling by an integer factor, differentiable to any order.

    Same output as `keras.layers.UpSampling2D(size, interpolation="bilinear")`.
    With `second_order_exact = True` (set on the layer object, not saved; see
    `blocks.make_second_order_exact`) it computes the resize as matrix
    products whose second derivatives (meta-gradients, Hessian-vector
    products) are exact; otherwise it runs TensorFlow's faster fused kernel,
    whose first derivative is exact and whose second is dropped.

    Args:
        size: int or (int, int). Up-sampling factors of height and width. Defaults to 2.

    Example:
        x = BilinearUpSampling2D(2, name="up0_resize")(features)
    """

    def __init__(self, size=2, **kwargs):
        super().__init__(**kwargs)
        self.size = _pair(size, "size")
        self.second_order_exact = False

    def call(self, inputs):
        h, w = inputs.shape[1:3]
        if h is None or w is None:
            shape = tf.shape(inputs)
            h, w = shape[1], shape[2]
        # Python ints when the size is known: static output shapes in the graph.
        target = (h * self.size[0], w * self.size[1])
        return resize(inputs, target, self.second_order_exact)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        scale = lambda s, f: None if s is None else s * f  # noqa: E731
        return (b, scale(h, self.size[0]), scale(w, self.size[1]), c)

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ResizeLike(layers.Layer):
    """Bilinearly resizes its first input to the spatial size of the second.

    Lets the image-pooling branch of ASPP work on inputs of any size. Exact
    to any order of differentiation when `second_order_exact` is set, as for
    `BilinearUpSampling2D`.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.second_order_exact = False

    def call(self, inputs):
        x, ref = inputs
        size = tuple(ref.shape[1:3])
        if None in size:
            size = tf.shape(ref)[1:3]
        return resize(x, size, self.second_order_exact)

    def compute_output_shape(self, input_shapes):
        x, ref = input_shapes
        return (x[0], ref[1], ref[2], x[3])

