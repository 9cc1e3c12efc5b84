import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras.models.blocks import FusedBatchNormalization


def _pair(shape, **kwargs):
    ref = keras.layers.BatchNormalization(**kwargs)
    fused = FusedBatchNormalization(**kwargs)
    for layer in (ref, fused):
        layer.build(shape)
    rng = np.random.default_rng(0)
    for v_ref, v_fused in zip(ref.weights, fused.weights):
        value = rng.uniform(0.5, 1.5, v_ref.shape).astype("float32")
        v_ref.assign(value)
        v_fused.assign(value)
    return ref, fused


@pytest.mark.parametrize("training", [True, False])
def test_fused_batch_norm_matches_keras(training):
    x = tf.random.stateless_normal((4, 6, 5, 3), seed=(1, 2)) * 3 + 1
    ref, fused = _pair(x.shape, momentum=0.9)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y_ref = ref(x, training=training)
        y_fused = fused(x, training=training)
        loss_ref = tf.reduce_sum(tf.sin(y_ref))
        loss_fused = tf.reduce_sum(tf.sin(y_fused))
    np.testing.assert_allclose(y_fused, y_ref, rtol=1e-4, atol=1e-4)
    g_ref = tape.gradient(loss_ref, [x, ref.gamma, ref.beta])
    g_fused = tape.gradient(loss_fused, [x, fused.gamma, fused.beta])
    for a, b in zip(g_fused, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fused.moving_mean, ref.moving_mean, rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance, ref.moving_variance, rtol=1e-4)


def test_frozen_fused_batch_norm_uses_moving_statistics():
    x = tf.random.stateless_normal((2, 4, 4, 3), seed=(3, 4))
    ref, fused = _pair(x.shape)
    fused.trainable = False
    before = fused.moving_mean.numpy().copy()
    np.testing.assert_allclose(fused(x, training=True), ref(x, training=False), atol=1e-5)
    np.testing.assert_array_equal(fused.moving_mean, before)


def test_other_layouts_fall_back_to_keras():
    x = tf.random.stateless_normal((4, 7), seed=(5, 6))
    ref, fused = _pair(x.shape)
    np.testing.assert_allclose(fused(x, training=True), ref(x, training=True), atol=1e-5)
