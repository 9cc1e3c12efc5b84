"""The second-order-exact bilinear resize: TensorFlow's output, and exact second derivatives."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras.models.blocks import make_second_order_exact
from lesionkeras.models.layers import BilinearUpSampling2D, ResizeLike, resize_bilinear


def _images(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=shape).astype("float32"))


@pytest.mark.parametrize("shape, size", [
    ((2, 5, 7, 3), (10, 14)),   # x2
    ((1, 4, 6, 2), (12, 18)),   # x3
    ((2, 9, 8, 1), (4, 3)),     # shrinking, odd factors
    ((1, 7, 7, 4), (16, 11)),   # non-integer factors
])
def test_resize_matches_tensorflow(shape, size):
    x = _images(shape)
    expected = tf.image.resize(x, size, method="bilinear")
    np.testing.assert_allclose(resize_bilinear(x, size), expected, atol=1e-5)

    # The same with sizes unknown when the graph is traced (matrices built in the graph).
    dynamic = tf.function(resize_bilinear, input_signature=[
        tf.TensorSpec((None, None, None, shape[-1])), tf.TensorSpec((2,), tf.int32)])
    np.testing.assert_allclose(dynamic(x, tf.constant(size)), expected, atol=1e-5)


@pytest.mark.parametrize("factor", [2, 3, (2, 4)])
def test_layers_match_keras_and_survive_saving(factor, tmp_path):
    x = _images((2, 6, 5, 3), seed=1)
    keras_up = keras.layers.UpSampling2D(factor, interpolation="bilinear")
    for exact in (False, True):
        layer = BilinearUpSampling2D(factor)
        layer.second_order_exact = exact
        np.testing.assert_allclose(layer(x), keras_up(x), atol=1e-5)

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, BilinearUpSampling2D(factor)(inputs))
    model.save(tmp_path / "up.keras")
    again = keras.saving.load_model(tmp_path / "up.keras")
    np.testing.assert_allclose(again(x), keras_up(x), atol=1e-5)

    small = _images((2, 3, 4, 3), seed=2)
    for exact in (False, True):
        layer = ResizeLike()
        layer.second_order_exact = exact
        np.testing.assert_allclose(layer([small, x]),
                                   tf.image.resize(small, (6, 5), method="bilinear"), atol=1e-5)


def test_second_derivative_matches_finite_differences():
    """The Hessian-vector product of f(x) = sum(c * resize(tanh(x))**3), through two nested
    tapes, equals central differences of the gradient; TensorFlow's own resize drops the
    resize's part of it (ResizeBilinearGrad has no registered gradient)."""
    x = tf.constant(np.random.default_rng(3).normal(size=(1, 4, 5, 2)), tf.float64)
    v = tf.constant(np.random.default_rng(4).normal(size=(1, 4, 5, 2)), tf.float64)
    c = tf.constant(np.random.default_rng(5).normal(size=(1, 8, 10, 2)), tf.float64)

    def grad(x, resize):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(c * resize(tf.tanh(x), (8, 10)) ** 3)
        return tape.gradient(y, x)

    def hvp(resize):
        with tf.GradientTape() as outer:
            outer.watch(x)
            g = grad(x, resize)
        return outer.gradient(g, x, output_gradients=v, unconnected_gradients="zero")

    eps = 1e-5
    reference = (grad(x + eps * v, resize_bilinear) - grad(x - eps * v, resize_bilinear)) / (2 * eps)
    np.testing.assert_allclose(hvp(resize_bilinear), reference, rtol=1e-6, atol=1e-8)
    # TensorFlow's kernel: same first derivative, wrong second one.
    tf_resize = lambda t, s: tf.cast(tf.image.resize(t, s, method="bilinear"), t.dtype)  # noqa: E731
    np.testing.assert_allclose(grad(x, tf_resize), grad(x, resize_bilinear), rtol=1e-6)
    assert np.max(np.abs(hvp(tf_resize) - reference)) > 0.1 * np.max(np.abs(reference))


def test_switched_layers_have_exact_second_derivatives():
    """`make_second_order_exact` turns the layers' fused kernel (second derivative
    dropped) into the matrix products: the Hessian-vector product through a model
    of both layers then equals central differences of its gradient (taken on a
    float64 twin, which always resizes exactly: the kernel computes in float32)."""
    ref_image = _images((1, 5, 7, 1))

    def model(dtype):
        inputs = keras.Input((3, 4, 2), dtype=dtype)
        up = BilinearUpSampling2D(2, dtype=dtype)(inputs)
        return keras.Model(inputs, ResizeLike(dtype=dtype)([up, ref_image]))

    rng = np.random.default_rng(6)
    x, v, c = (rng.normal(size=s) for s in ((1, 3, 4, 2), (1, 3, 4, 2), (1, 5, 7, 2)))

    def grad(net, x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.cast(c, x.dtype) * net(tf.tanh(x)) ** 3)
        return tape.gradient(y, x)

    def hvp(net):
        x32 = tf.constant(x, tf.float32)
        with tf.GradientTape() as outer:
            outer.watch(x32)
            g = grad(net, x32)
        return outer.gradient(g, x32, output_gradients=tf.constant(v, tf.float32),
                              unconnected_gradients="zero").numpy()

    net64, eps = model("float64"), 1e-5
    x64, v64 = tf.constant(x), tf.constant(v)
    reference = ((grad(net64, x64 + eps * v64) - grad(net64, x64 - eps * v64)) / (2 * eps)).numpy()
    scale = np.max(np.abs(reference))
    net32 = model("float32")
    assert np.max(np.abs(hvp(net32) - reference)) > 0.1 * scale  # second derivative dropped
    assert make_second_order_exact(net32) == 2
    np.testing.assert_allclose(hvp(net32), reference, rtol=1e-4, atol=1e-5 * scale)
