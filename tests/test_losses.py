"""Tests of lesionkeras.losses: golden values worked out by hand on 2x2 masks."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras import losses as L


def softplus(x):
    return math.log1p(math.exp(x))


def image(rows, channels=1):
    """A (1, H, W, 1) float32 batch from a nested list."""
    a = np.asarray(rows, dtype="float32")[None, :, :, None]
    return np.repeat(a, channels, axis=-1) if channels > 1 else a


def np_(x):
    return keras.ops.convert_to_numpy(x)


# --------------------------------------------------------------------------
# Binary cross-entropy
# --------------------------------------------------------------------------

# BCE of one pixel with logit x and target z is softplus(x) - x * z, so:
# (x=0, any z) -> log 2; (x, z=0) -> softplus(x); (x, z=1) -> softplus(-x).
BCE_CASES = [
    ("all_zero_logits", [[1, 0], [0, 1]], [[0, 0], [0, 0]], math.log(2.0)),
    (
        "mixed",
        [[1, 0], [0, 1]],
        [[0, 2], [-1, 3]],
        (math.log(2.0) + softplus(2) + softplus(-1) + softplus(-3)) / 4,
    ),
    (
        "soft_target",
        [[0.5, 0.5], [0.5, 0.5]],
        [[2, 2], [-2, -2]],
        # softplus(2) - 2 * 0.5 equals softplus(-2) + 2 * 0.5
        softplus(2) - 1.0,
    ),
]


@pytest.mark.parametrize("_, z, x, expected", BCE_CASES, ids=[c[0] for c in BCE_CASES])
def test_bce_golden(_, z, x, expected):
    got = np_(L.binary_crossentropy_with_logits(image(z), image(x)))
    assert got.shape == (1,)
    np.testing.assert_allclose(got, [expected], rtol=1e-6)
    # The class reduces the single per-image value to itself.
    got_cls = float(L.BinaryCrossentropyWithLogits()(image(z), image(x)))
    assert got_cls == pytest.approx(expected, rel=1e-6)


def test_bce_stable_for_huge_logits():
    z = image([[0, 1], [1, 0]])
    x = image([[100, -100], [100, -100]])
    got = np_(L.binary_crossentropy_with_logits(z, x))
    assert np.all(np.isfinite(got))
    # Two pixels are confidently wrong by a logit of 100, two are right.
    np.testing.assert_allclose(got, [(100.0 + 100.0) / 4], rtol=1e-6)
    right = np_(L.binary_crossentropy_with_logits(z, image([[-100, 100], [100, -100]])))
    np.testing.assert_allclose(right, [0.0], atol=1e-6)


# (label z, logit x, loss, d loss / dx): hand-derived from softplus(x) - x z, whose
# derivative is sigmoid(x) - z; 0.5 - z at x = 0 (a relu/abs form gives -z there).
BCE_VALUE_AND_GRADIENT = [
    (0.0, 0.0, math.log(2.0), 0.5),
    (1.0, 0.0, math.log(2.0), -0.5),
    (0.3, 0.0, math.log(2.0), 0.2),
    (1.0, 80.0, 0.0, 0.0),
    (0.0, 80.0, 80.0, 1.0),
    (1.0, -80.0, 80.0, -1.0),
    (0.0, -80.0, 0.0, 0.0),
    (0.0, 1e4, 1e4, 1.0),
    (1.0, -1e4, 1e4, -1.0),
]


@pytest.mark.parametrize("z, x, value, grad", BCE_VALUE_AND_GRADIENT)
def test_pixel_bce_value_and_gradient(z, x, value, grad):
    logits = tf.constant([[[[x]]]], tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = L.pixel_binary_crossentropy(tf.constant([[[[z]]]]), logits)
    assert float(loss[0, 0, 0, 0]) == pytest.approx(value, rel=1e-6, abs=1e-30)
    assert float(tape.gradient(loss, logits)[0, 0, 0, 0]) == pytest.approx(grad, abs=1e-7)


def test_one_bce_for_the_package():
    """Meta-reweighting and the multitask trainer use the losses module's BCE."""
    from lesionkeras.methods import multitask, reweight_step as meta

    assert meta.pixel_bce is L.pixel_binary_crossentropy
    z = tf.constant([[[[1.0], [0.0]]]])
    x = tf.constant([[[[0.0], [2.0]]]])
    got = multitask.weighted_pixel_bce(z, x, tf.ones_like(z))
    assert float(got) == pytest.approx((math.log(2.0) + softplus(2.0)) / 2, rel=1e-6)


def test_bce_matches_keras_builtin():
    rng = np.random.default_rng(0)
    z = (rng.random((3, 5, 5, 2)) > 0.5).astype("float32")
    x = rng.normal(scale=4.0, size=(3, 5, 5, 2)).astype("float32")
    ours = np_(L.binary_crossentropy_with_logits(z, x))
    ref = np_(keras.ops.binary_crossentropy(z, x, from_logits=True))
    ref = ref.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


# --------------------------------------------------------------------------
# Soft Dice / Jaccard
# --------------------------------------------------------------------------

# probs [[.5, 1], [0, .5]] vs truth [[1, 1], [0, 0]]:
# I = 1.5, sum p = 2, sum t = 2.
OVERLAP_CASES = [
    # id, truth, probs, smooth, dice loss, jaccard loss
    ("partial_s1", [[1, 1], [0, 0]], [[0.5, 1], [0, 0.5]], 1.0,
     1 - 4 / 5, 1 - 2.5 / 3.5),
    ("partial_s0.5", [[1, 1], [0, 0]], [[0.5, 1], [0, 0.5]], 0.5,
     1 - 3.5 / 4.5, 1 - 2 / 3),
    ("both_empty", [[0, 0], [0, 0]], [[0, 0], [0, 0]], 1.0, 0.0, 0.0),
    ("empty_pred", [[1, 1], [1, 1]], [[0, 0], [0, 0]], 1.0, 1 - 1 / 5, 1 - 1 / 5),
    ("perfect", [[1, 0], [1, 0]], [[1, 0], [1, 0]], 1.0, 0.0, 0.0),
]


@pytest.mark.parametrize(
    "_, t, p, smooth, dice, jaccard", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES]
)
def test_soft_overlap_golden(_, t, p, smooth, dice, jaccard):
    got_d = np_(L.soft_dice_loss(image(t), image(p), smooth=smooth))
    got_j = np_(L.soft_jaccard_loss(image(t), image(p), smooth=smooth))
    np.testing.assert_allclose(got_d, [dice], atol=1e-6)
    np.testing.assert_allclose(got_j, [jaccard], atol=1e-6)
    # Same through the classes, given probabilities.
    d = L.SoftDiceLoss(from_logits=False, smooth=smooth)(image(t), image(p))
    j = L.SoftJaccardLoss(from_logits=False, smooth=smooth)(image(t), image(p))
    assert float(d) == pytest.approx(dice, abs=1e-6)
    assert float(j) == pytest.approx(jaccard, abs=1e-6)


def test_soft_overlap_averages_channels():
    # Channel 0 perfect (loss 0), channel 1 an empty prediction (loss 0.8).
    t = np.stack([image([[1, 0], [0, 0]])[..., 0], image([[1, 1], [1, 1]])[..., 0]], -1)
    p = np.stack([image([[1, 0], [0, 0]])[..., 0], image([[0, 0], [0, 0]])[..., 0]], -1)
    np.testing.assert_allclose(np_(L.soft_dice_loss(t, p)), [0.4], atol=1e-6)
    np.testing.assert_allclose(np_(L.soft_jaccard_loss(t, p)), [0.4], atol=1e-6)


@pytest.mark.parametrize("cls", [L.SoftDiceLoss, L.SoftJaccardLoss])
def test_perfect_logits_give_about_zero(cls):
    t = np.zeros((2, 4, 4, 1), "float32")
    t[0, 1:3, 1:3] = 1.0
    logits = 20.0 * (2.0 * t - 1.0)
    assert float(cls(from_logits=True)(t, logits)) < 1e-6


def test_per_image_values_and_sample_weight():
    t = np.concatenate([image([[1, 1], [1, 1]]), image([[1, 0], [1, 0]])])
    p = np.concatenate([image([[0, 0], [0, 0]]), image([[1, 0], [1, 0]])])
    per_image = np_(L.SoftDiceLoss(from_logits=False, reduction=None)(t, p))
    np.testing.assert_allclose(per_image, [0.8, 0.0], atol=1e-6)
    # sum_over_batch_size: (1 * 0.8 + 0 * 0) / 2.
    weights = np.array([1.0, 0.0])
    weighted = L.SoftDiceLoss(from_logits=False)(t, p, sample_weight=weights)
    assert float(weighted) == pytest.approx(0.4, abs=1e-6)


def test_float16_logits_are_computed_in_float32():
    t = np.zeros((1, 4, 4, 1), "float32")
    x = np.full((1, 4, 4, 1), 30.0, "float16")
    for loss in (L.BinaryCrossentropyWithLogits(), L.CombinedLoss(1, 1, 1)):
        value = loss(t, keras.ops.convert_to_tensor(x))
        assert value.dtype == "float32"
        assert np.isfinite(float(value))
    bce = np_(L.binary_crossentropy_with_logits(t, x))
    assert bce.dtype == np.float32
    np.testing.assert_allclose(bce, [30.0], rtol=1e-5)


# --------------------------------------------------------------------------
# CombinedLoss and get_loss
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wb, wd, wj", [(1, 0, 0), (0, 1, 0), (0.3, 0.7, 2.0), (1, 1, 0), (0, 0, 1)]
)
def test_combined_is_weighted_sum(wb, wd, wj):
    rng = np.random.default_rng(1)
    t = (rng.random((3, 4, 4, 2)) > 0.5).astype("float32")
    x = rng.normal(scale=2.0, size=t.shape).astype("float32")
    p = np_(keras.ops.sigmoid(x))
    expected = (
        wb * np_(L.binary_crossentropy_with_logits(t, x))
        + wd * np_(L.soft_dice_loss(t, p))
        + wj * np_(L.soft_jaccard_loss(t, p))
    )
    loss = L.CombinedLoss(
        bce_weight=wb, dice_weight=wd, jaccard_weight=wj, reduction=None
    )
    np.testing.assert_allclose(np_(loss(t, x)), expected, rtol=1e-5)
    mean_loss = L.CombinedLoss(bce_weight=wb, dice_weight=wd, jaccard_weight=wj)
    assert float(mean_loss(t, x)) == pytest.approx(expected.mean(), rel=1e-5)


def test_combined_needs_a_nonzero_weight():
    with pytest.raises(ValueError, match="non-zero weight"):
        L.CombinedLoss(bce_weight=0.0)


def test_combined_rejects_negative_weight():
    with pytest.raises(ValueError, match=">= 0"):
        L.CombinedLoss(bce_weight=1.0, dice_weight=-1.0)


def test_bce_with_probabilities_is_rejected():
    with pytest.raises(ValueError, match="from_logits=False"):
        L.CombinedLoss(bce_weight=1.0, dice_weight=1.0, from_logits=False)
    # Without a BCE term, probabilities are fine.
    loss = L.CombinedLoss(bce_weight=0.0, dice_weight=1.0, from_logits=False)
    t = image([[1, 1], [0, 0]])
    assert float(loss(t, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "name, cls, weights",
    [
        ("bce", L.BinaryCrossentropyWithLogits, None),
        ("dice", L.SoftDiceLoss, None),
        ("jaccard", L.SoftJaccardLoss, None),
        ("bce+dice", L.CombinedLoss, (1.0, 1.0, 0.0)),
        ("bce+jaccard", L.CombinedLoss, (1.0, 0.0, 1.0)),
        (" BCE + Dice ", L.CombinedLoss, (1.0, 1.0, 0.0)),
    ],
)
def test_get_loss(name, cls, weights):
    loss = L.get_loss(name)
    assert type(loss) is cls
    if weights is not None:
        assert (loss.bce_weight, loss.dice_weight, loss.jaccard_weight) == weights
    if hasattr(loss, "from_logits"):
        assert loss.from_logits is True


def test_loss_names_all_resolve():
    assert L.LOSS_NAMES == ("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")
    for name in L.LOSS_NAMES:
        assert isinstance(L.get_loss(name), keras.losses.Loss)


def test_get_loss_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        L.get_loss("focal")
    message = str(info.value)
    assert "'focal'" in message
    for name in L.LOSS_NAMES:
        assert name in message


# --------------------------------------------------------------------------
# Errors, config, gradients, training
# --------------------------------------------------------------------------

ALL_LOSSES = [
    L.BinaryCrossentropyWithLogits(),
    L.SoftDiceLoss(),
    L.SoftJaccardLoss(),
    L.CombinedLoss(1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda l: type(l).__name__)
def test_shape_mismatch_names_both_shapes(loss):
    t = np.zeros((2, 4, 4, 1), "float32")
    x = np.zeros((2, 4, 4, 2), "float32")
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 1\).*\(2, 4, 4, 2\)"):
        loss(t, x)


@pytest.mark.parametrize(
    "fn", [L.binary_crossentropy_with_logits, L.soft_dice_loss, L.soft_jaccard_loss]
)
def test_pure_functions_check_shapes(fn):
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 1\).*\(1, 4, 3, 1\)"):
        fn(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 3, 1)))
    with pytest.raises(ValueError, match=r"\(B, H, W, K\)"):
        fn(np.zeros((4, 4)), np.zeros((4, 4)))


def test_unknown_dims_in_graph_are_accepted():
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    loss = L.CombinedLoss(1, 1, 1)
    fn = tf.function(lambda t, x: loss(t, x), input_signature=[spec, spec])
    t = np.ones((2, 3, 5, 1), "float32")
    assert np.isfinite(float(fn(t, t)))


def test_smooth_must_be_positive():
    with pytest.raises(ValueError, match="smooth"):
        L.SoftDiceLoss(smooth=0.0)


@pytest.mark.parametrize(
    "loss",
    ALL_LOSSES
    + [
        L.SoftDiceLoss(from_logits=False, smooth=0.5, reduction="sum", name="d"),
        L.CombinedLoss(0.0, 0.25, 0.5, from_logits=False, smooth=2.0),
    ],
    ids=lambda l: f"{type(l).__name__}-{l.name}",
)
def test_get_config_round_trip(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert type(clone) is type(loss)
    assert clone.get_config() == config
    # Registered: Keras rebuilds it from the serialized form alone.
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss)
    )
    assert type(restored) is type(loss)
    assert restored.get_config() == config


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=lambda l: type(l).__name__)
def test_gradient_is_finite(loss):
    t = tf.constant(image([[1, 0], [1, 0]]))
    x = tf.Variable(image([[100, -100], [0, 3]]))
    with tf.GradientTape() as tape:
        value = loss(t, x)
    grad = tape.gradient(value, x).numpy()
    assert np.all(np.isfinite(grad))
    assert np.any(grad != 0)


def test_short_fit_lowers_combined_loss():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    y = (rng.random((32, 8, 8, 1)) > 0.5).astype("float32")
    # The image is a noisy +-1 copy of the mask: one conv can fit it.
    x = (2.0 * y - 1.0 + rng.normal(scale=0.3, size=y.shape)).astype("float32")
    model = keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 3, padding="same")]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=L.CombinedLoss(bce_weight=1.0, dice_weight=1.0),
    )
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < 0.6 * history[0]
