"""Eq. 7-8 of Mirikharaji et al. 2019 against a reference that uses neither mechanism.

The meta score of a noisy pixel p is `U_p = -eta dLc(theta_hat)/dw_p` at `w = 0`,
with `theta_hat = theta - alpha sum_p w_p grad l_p`, so `U_p = eta alpha <grad l_p,
grad Lc>`: the directional derivative of the pixel's loss along the clean gradient.
The reference takes that derivative by central finite differences of a float64
copy of the network (two plain forward passes, batch norm in training mode as in
the meta step) and the clean gradient by one first-order tape on that copy; the
package's `nested` (second-order tapes) and `forward` (forward-mode) modes each
have to match it, sign included, on every registered segmentation model.

Dropout is off in these models: its random masks cannot be replayed by the
reference's extra forward passes.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras.models import registry
from lesionkeras.methods.reweight import MetaReweighter

ALPHA = 0.05
# (model, builder options). Tiny widths; encoders as small as their builders allow.
# Encoders that reduce by 32 run at 64 px: at 32 px their last batch norm would see
# 2 values per channel (a 1x1 map, 2 images), an ill-conditioned function that no
# finite difference resolves.
CASES = [
    ("unet", dict(depth=2, filters=8, batch_norm=True)),
    ("unet", dict(depth=2, filters=8, batch_norm=False)),
    ("unet", dict(depth=2, filters=8, batch_norm=True, upsampling="transpose")),
    ("resnet18_unet", dict(filters=8, batch_norm=True)),
    ("resnet18_unet", dict(filters=8, batch_norm=False)),
    ("resnet34_unet", dict(filters=8)),
    ("resnet50_unet", dict(filters=8)),
    ("resnet18_deeplab", dict(filters=8, dropout=0.0)),
    ("resnet34_deeplab", dict(filters=8, dropout=0.0)),
    ("resnet50_deeplab", dict(filters=8, dropout=0.0)),
    ("deeplabv3plus", dict(filters=1, dropout=0.0)),
    ("vgg19se", dict(filters=8, encoder_filters=8)),
    ("segan", dict(filters=8)),
]
FLOAT32_EXACT = {"unet", "segan"}
HEAVY = {"resnet50_unet", "resnet50_deeplab", "deeplabv3plus", "resnet34_deeplab", "segan", "unet",
         "vgg19se", "resnet18_unet"}


def _ids(case):
    name, opts = case
    return name + "".join(f"-{k}={v}" for k, v in sorted(opts.items()))


def test_every_segmentation_model_is_covered():
    assert {name for name, _ in CASES} == set(registry.names("segment"))


def _size(name):
    return 32 if name in ("unet", "segan") else 64


def _data(size=32, seed=0, noisy=3, clean=3):
    rng = np.random.default_rng(seed)
    image = lambda n: rng.normal(size=(n, size, size, 3)).astype("float32")  # noqa: E731
    # Masks of blobs rather than coin flips, so the scores have structure.
    yy, xx = np.mgrid[:size, :size]

    def masks(n):
        out = []
        for _ in range(n):
            cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
            r = rng.uniform(0.15 * size, 0.35 * size)
            out.append(((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)[..., None])
        return np.asarray(out, "float32")

    return image(noisy), masks(noisy), image(clean), masks(clean)


def _randomise_biases(net, seed=0):
    """Non-zero biases: with zero biases a dead region feeds exact zeros to the next
    ReLU or max-pool, where the loss has a kink that finite differences straddle."""
    rng = np.random.default_rng(seed)
    for v in net.trainable_variables:
        if v.path.endswith("bias") or v.path.endswith("beta"):
            v.assign(rng.normal(0.0, 0.1, v.shape).astype(v.dtype))


def _float64_copy(model):
    """The same network with every layer computing in float64, same weights."""

    def retype(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and "config" in node:
                return {**node, "config": {**node["config"], "name": "float64"}}
            return {k: ("float64" if k == "dtype" and isinstance(v, str) else retype(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [retype(v) for v in node]
        return node

    config = retype(keras.saving.serialize_keras_object(model))
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights([np.asarray(w, np.float64) for w in model.get_weights()])
    assert all(v.dtype == "float64" for v in copy.trainable_weights)
    return copy


def _bce64(z, x):
    # softplus(x) - x z, written independently of the package's loss.
    return tf.nn.softplus(x) - x * z


def reference_scores(net64, x_noisy, y_noisy, x_clean, y_clean, alpha, eta):
    """`U` of eq. 7 by finite differences of the float64 network `net64`."""
    theta = [tf.constant(v, tf.float64) for v in net64.trainable_variables]
    fixed = [tf.constant(v, tf.float64) for v in net64.non_trainable_variables]
    f64 = lambda a: tf.constant(a, tf.float64)  # noqa: E731

    def pixel_losses(params, x, y):
        logits, _ = net64.stateless_call(params, fixed, f64(x), training=True)
        return _bce64(f64(y), logits)

    with tf.GradientTape() as tape:
        tape.watch(theta)
        clean = tf.reduce_mean(pixel_losses(theta, x_clean, y_clean))
    g = tape.gradient(clean, theta)
    # A step of 1e-9 in parameter norm: far below the distance to the nearest
    # ReLU/max-pool kink, far above float64 rounding.
    norm = tf.sqrt(sum(tf.reduce_sum(t * t) for t in g))
    h = 1e-9 / norm
    plus = pixel_losses([t + h * d for t, d in zip(theta, g)], x_noisy, y_noisy)
    minus = pixel_losses([t - h * d for t, d in zip(theta, g)], x_noisy, y_noisy)
    directional = (plus - minus) / (2.0 * h)
    return (eta * alpha * directional).numpy()


def _check(scores, weights, ref):
    scale = np.abs(ref).max()
    assert scale > 0
    err = np.abs(scores - ref).max() / scale
    assert err < 1e-4, f"max |U - U_ref| / max |U_ref| = {err:.2e}"
    clear = np.abs(ref) > 1e-3 * scale
    assert clear.mean() > 0.5
    assert (np.sign(scores[clear]) == np.sign(ref[clear])).all()
    positive = np.maximum(ref, 0.0)
    expected = positive / positive.sum()
    np.testing.assert_allclose(weights, expected, atol=1e-4 * expected.max())


def package_scores(net, data, mode, granularity="pixel"):
    """`U` and `W` from the package's `MetaReweighter.meta_weights`."""
    model = MetaReweighter(net, meta_grad=mode, granularity=granularity)
    model.compile(optimizer=keras.optimizers.SGD(ALPHA), jit_compile=False)
    dtype = net.trainable_variables[0].dtype
    # float32 runs as training does, in a graph; the float64 check of the mathematics
    # runs eagerly, which skips minutes of graph optimisation on the deep encoders.
    fn = tf.function(model.meta_weights) if dtype == "float32" else model.meta_weights
    out = fn(*[np.asarray(a, dtype) for a in data])
    return out["scores"].numpy(), out["weights"].numpy()


def _run_case(name, opts, granularity="pixel"):
    keras.utils.set_random_seed(0)
    size = _size(name)
    net = registry.build(name, input_shape=(size, size, 3), out_channels=1, **opts)
    _randomise_biases(net)
    data = _data(size)
    net64 = _float64_copy(net)
    ref = reference_scores(net64, *data, ALPHA, ALPHA)
    if granularity == "image":
        # One weight per image on its mean pixel loss: the derivative is the mean.
        ref = ref.mean(axis=(1, 2, 3), keepdims=True)
    # The package's code in float64 (exactness of the method) on every model, and in
    # float32 (what training runs, with the fused batch norm) on the U-Net and SegAN.
    # Deep randomly initialised encoders (VGG19, ResNet34/50) in training-mode batch
    # norm on three images lose up to ~1e-2 to float32 rounding, in both modes alike.
    nets = {"float64": net64}
    if name in FLOAT32_EXACT:
        nets["float32"] = net
    for dtype, n in nets.items():
        for mode in ("nested", "forward"):
            scores, weights = package_scores(n, data, mode, granularity)
            assert scores.shape == ref.shape, mode
            try:
                _check(scores, weights, ref)
            except AssertionError as e:
                raise AssertionError(f"{name} {opts} {dtype} meta_grad={mode}: {e}") from None


@pytest.mark.parametrize(
    "name, opts",
    [pytest.param(*c, marks=[pytest.mark.slow] if c[0] in HEAVY else [], id=_ids(c))
     for c in CASES],
)
def test_meta_scores_match_finite_differences(name, opts):
    _run_case(name, opts)


def _op_types(fn, *args):
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


def test_fused_batch_norm_is_switched_off_in_meta_steps():
    """The fused batch-norm kernel has no float64 version, so the float64 reference
    cannot vouch for its second derivative: meta steps run Keras' batch norm (checked
    by the reference on every model) and resize with matrix products, while plain
    training keeps both fast kernels."""
    keras.utils.set_random_seed(0)
    net = registry.build("unet", input_shape=(32, 32, 3), depth=2, filters=8, batch_norm=True)
    args = [tf.constant(np.asarray(a, "float32")) for a in _data(32)]

    def plain_gradient(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(_bce64(y, net(x, training=True)))
        return tape.gradient(loss, net.trainable_variables)

    plain = _op_types(plain_gradient, *args[:2])
    assert {"FusedBatchNormV3", "FusedBatchNormGradV3", "ResizeBilinearGrad"} <= plain
    for mode in ("nested", "forward"):
        model = MetaReweighter(net, meta_grad=mode)
        model.compile(optimizer=keras.optimizers.SGD(ALPHA), jit_compile=False)
        meta = _op_types(model.meta_weights, *args)
        assert not {t for t in meta if t.startswith("FusedBatchNorm") or t.startswith("Resize")}
        assert "BatchMatMulV2" in meta


def test_image_reweight_scores_match_finite_differences():
    _run_case("unet", dict(depth=2, filters=8, batch_norm=True), granularity="image")


def test_keras_bilinear_upsampling_fails_the_reference():
    """The check is sharp: Keras' bilinear UpSampling2D loses eq. 7's second-order term."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    x = keras.layers.Conv2D(1, 3, padding="same")(x)
    net = keras.Model(inputs, x)
    _randomise_biases(net)
    data = _data(32)
    ref = reference_scores(_float64_copy(net), *data, ALPHA, ALPHA)
    for mode in ("nested", "forward"):
        with pytest.raises(AssertionError):
            _check(*package_scores(net, data, mode), ref)


# ---------------------------------------------------------------------- #
# The guard: models whose second derivatives TensorFlow would get wrong
# ---------------------------------------------------------------------- #


def _keras_bilinear_net(input_shape=(None, None, 3), out_channels=1, filters=8, name=None):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear", name="old_up")(x)
    return keras.Model(inputs, keras.layers.Conv2D(out_channels, 1)(x), name=name)


def test_blockers_name_the_layer_and_op():
    from lesionkeras.models.blocks import make_second_order_exact
    from lesionkeras.models.second_order import second_order_blockers

    found = second_order_blockers(_keras_bilinear_net())
    assert [(layer, op) for layer, op, _ in found] == [("old_up", "ResizeBilinearGrad")]
    unet = registry.build("unet", input_shape=(None, None, 3), depth=2, filters=8)
    assert {op for _, op, _ in second_order_blockers(unet)} == {
        "FusedBatchNormGradV3", "ResizeBilinearGrad"}
    # 2 batch norms per conv block, 5 blocks; 2 up-samplings.
    assert make_second_order_exact(unet) == 12
    assert second_order_blockers(unet) == []


def test_fit_meta_refuses_a_model_without_exact_second_derivatives(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lesionkeras.cli import main
    from lesionkeras.models import registry as reg

    reg.names()  # the built-in models are registered first
    # Registered for this test only: other tests enumerate the registry.
    monkeypatch.setitem(reg._BUILDERS, "keras_bilinear_test_net", _keras_bilinear_net)
    monkeypatch.setitem(reg._CAPABILITIES, "keras_bilinear_test_net", reg.Capabilities())
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "fit", "--method", "meta", "--model", "keras_bilinear_test_net", "--limit", "12",
        "--image-size", "32", "--epochs", "1", "--simulate-noise", "3-vertex",
        "--clean-count", "3", "--no-progress", "--out", str(run),
    ])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "layer `old_up` runs `ResizeBilinearGrad`" in lines[0], res.output
    assert not run.exists()
