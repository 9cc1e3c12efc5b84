"""Tests of lesionkeras.metrics: golden scores worked out by hand on 4x4 masks."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from lesionkeras import losses as L
from lesionkeras import metrics as M


def mask(*rows):
    """A (4, 4) float32 mask from strings such as "1100"."""
    return np.array([[float(c) for c in row] for row in rows], dtype="float32")


def batch(*masks):
    """Stack (H, W) masks into a (B, H, W, 1) batch."""
    return np.stack(masks)[..., None]


def np_(x):
    return keras.ops.convert_to_numpy(x)


EMPTY = mask("0000", "0000", "0000", "0000")
CORNER = mask("1100", "1100", "0000", "0000")  # 4 pixels

# id, truth, prediction, then expected dice, jaccard, accuracy, sensitivity,
# specificity, each worked out from (tp, fp, fn, tn).
GOLDEN = [
    # tp=2 fp=1 fn=2 tn=11
    ("partial", CORNER, mask("1110", "0000", "0000", "0000"),
     4 / 7, 2 / 5, 13 / 16, 2 / 4, 11 / 12),
    # tp=fp=fn=0 tn=16: every convention says "perfect"
    ("both_empty", EMPTY, EMPTY, 1.0, 1.0, 1.0, 1.0, 1.0),
    # tp=0 fp=0 fn=4 tn=12
    ("empty_pred", CORNER, EMPTY, 0.0, 0.0, 12 / 16, 0.0, 1.0),
    # tp=0 fp=3 fn=0 tn=13: nothing to find, so sensitivity is 1
    ("empty_truth", EMPTY, mask("0000", "0000", "0111", "0000"),
     0.0, 0.0, 13 / 16, 1.0, 13 / 16),
    # tp=5 fp=0 fn=0 tn=11
    ("perfect", mask("0000", "0110", "0111", "0000"),
     mask("0000", "0110", "0111", "0000"), 1.0, 1.0, 1.0, 1.0, 1.0),
    # tp=8 fp=0 fn=8 tn=0: no background, so specificity is 1
    ("all_lesion", mask("1111", "1111", "1111", "1111"),
     mask("1111", "1111", "0000", "0000"), 2 / 3, 1 / 2, 1 / 2, 1 / 2, 1.0),
]
GOLDEN_PARAMS = [pytest.param(t, p, tuple(v), id=i) for i, t, p, *v in GOLDEN]
KEYS = ("dice", "jaccard", "pixel_accuracy", "sensitivity", "specificity")
METRIC_CLASSES = {
    "dice": M.Dice,
    "jaccard": M.Jaccard,
    "pixel_accuracy": M.PixelAccuracy,
    "sensitivity": M.Sensitivity,
    "specificity": M.Specificity,
}


@pytest.mark.parametrize("truth, pred, expected", GOLDEN_PARAMS)
def test_scores_from_counts_golden(truth, pred, expected):
    scores = M.scores_from_counts(*M.confusion_counts(batch(truth), batch(pred)))
    for key, value in zip(KEYS, expected):
        got = np_(scores[key])
        assert got.shape == (1, 1)
        assert got[0, 0] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("truth, pred, expected", GOLDEN_PARAMS)
def test_per_image_scores_numpy_single_image(truth, pred, expected):
    # The evaluate command's path: one full-size (H, W) numpy mask.
    shapes = [(truth, pred), (truth[..., None], pred[..., None]), (truth, pred[..., None])]
    for t, p in shapes:
        scores = M.per_image_scores(t, p)
        assert set(scores) == set(M.SCORE_NAMES)
        for key, value in zip(KEYS, expected):
            assert isinstance(scores[key], np.ndarray)
            assert scores[key].shape == (1,)
            assert scores[key][0] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("truth, pred, expected", GOLDEN_PARAMS)
def test_metric_classes_golden(truth, pred, expected):
    for key, value in zip(KEYS, expected):
        metric = METRIC_CLASSES[key](from_logits=False)
        metric.update_state(batch(truth), batch(pred))
        assert float(metric.result()) == pytest.approx(value, abs=1e-6), key


def test_confusion_counts_values_and_binarisation():
    # 0/255 truth and soft predictions are binarised at 0.5.
    truth = batch(CORNER * 255.0)
    pred = batch(mask("1110", "0000", "0000", "0000") * 0.9)
    tp, fp, fn, tn = (np_(c) for c in M.confusion_counts(truth, pred))
    assert (tp.item(), fp.item(), fn.item(), tn.item()) == (2.0, 1.0, 2.0, 11.0)
    assert tp.dtype == np.float32 and tp.shape == (1, 1)


def test_scores_are_never_nan():
    zeros = np.zeros((3, 2), "float32")
    scores = M.scores_from_counts(zeros, zeros, zeros, zeros)
    for key in KEYS:
        np.testing.assert_array_equal(np_(scores[key]), np.ones((3, 2)))


def test_per_image_scores_numpy_any_size():
    truth = np.zeros((37, 53), "uint8")
    truth[10:20, 5:25] = 255  # 200 pixels
    prob = np.zeros((37, 53), "float64")
    prob[10:20, 5:15] = 0.8  # half of the lesion
    scores = M.per_image_scores(truth, prob)
    assert scores["dice"][0] == pytest.approx(2 * 100 / (100 + 200), abs=1e-6)
    assert scores["jaccard"][0] == pytest.approx(0.5, abs=1e-6)
    assert scores["threshold_jaccard"][0] == 0.0
    assert scores["dice"].dtype == np.float32


def test_per_image_scores_tensors_in_tensors_out():
    t = tf.constant(batch(CORNER, EMPTY))
    scores = M.per_image_scores(t, t)
    assert keras.ops.is_tensor(scores["dice"])
    np.testing.assert_allclose(np_(scores["dice"]), [1.0, 1.0])


def test_per_image_scores_shape_errors():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        M.per_image_scores(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        M.per_image_scores(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="threshold"):
        M.per_image_scores(np.zeros((4, 4)), np.zeros((4, 4)), threshold=1.0)


def test_metric_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 1\).*\(1, 4, 4, 2\)"):
        M.Dice().update_state(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match=r"\(1, 4, 4, 1\).*\(1, 4, 4, 2\)"):
        M.confusion_counts(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 2)))


# --------------------------------------------------------------------------
# Thresholded Jaccard and per-image averaging
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "jaccard, expected",
    [(0.64, 0.0), (0.6499, 0.0), (0.65, 0.65), (0.9, 0.9), (0.0, 0.0), (1.0, 1.0)],
)
def test_threshold_jaccard_values(jaccard, expected):
    got = np_(M.threshold_jaccard(np.array([jaccard], "float32")))
    assert got[0] == pytest.approx(expected, abs=1e-7)


def test_threshold_jaccard_custom_floor():
    got = np_(M.threshold_jaccard(np.array([0.5, 0.7], "float32"), floor=0.8))
    np.testing.assert_array_equal(got, [0.0, 0.0])


# J = 2/4 = 0.5: truth 4 pixels, prediction 2 of them.
HALF_T, HALF_P = CORNER, mask("1100", "0000", "0000", "0000")
# J = 9/10 = 0.9: truth 10 pixels, prediction 9 of them.
NINE_T = mask("1111", "1111", "1100", "0000")
NINE_P = mask("1111", "1111", "1000", "0000")


def test_threshold_jaccard_is_per_image_then_mean():
    t, p = batch(HALF_T, NINE_T), batch(HALF_P, NINE_P)
    scores = M.per_image_scores(t, p)
    np.testing.assert_allclose(scores["jaccard"], [0.5, 0.9], atol=1e-6)
    np.testing.assert_allclose(scores["threshold_jaccard"], [0.0, 0.9], atol=1e-6)
    tj = M.ThresholdJaccard(from_logits=False)
    tj.update_state(t, p)
    assert float(tj.result()) == pytest.approx(0.45, abs=1e-6)
    j = M.Jaccard(from_logits=False)
    j.update_state(t, p)
    assert float(j.result()) == pytest.approx(0.7, abs=1e-6)
    # The threshold of the mean (0.7) would have kept 0.7: not the ISIC score.


def test_per_image_mean_differs_from_pooled():
    # Image 1: a full-frame lesion found exactly (dice 1). Image 2: a one-
    # pixel lesion missed (dice 0). Pooled pixels: 2*16 / (2*16 + 1) = 0.97.
    full = mask("1111", "1111", "1111", "1111")
    dot = mask("0000", "0100", "0000", "0000")
    t, p = batch(full, dot), batch(full, EMPTY)
    metric = M.Dice(from_logits=False)
    metric.update_state(t, p)
    assert float(metric.result()) == pytest.approx(0.5, abs=1e-6)
    pooled = 2 * 16 / (2 * 16 + 1)
    assert abs(float(metric.result()) - pooled) > 0.4


def test_mean_is_over_images_across_batches():
    metric = M.Dice(from_logits=False)
    metric.update_state(batch(CORNER, CORNER, CORNER), batch(CORNER, CORNER, CORNER))
    metric.update_state(batch(CORNER), batch(EMPTY))
    assert float(metric.result()) == pytest.approx(3 / 4, abs=1e-6)


# --------------------------------------------------------------------------
# Channels, logits, weights, state
# --------------------------------------------------------------------------

PARTIAL_T, PARTIAL_P = GOLDEN[0][1], GOLDEN[0][2]  # dice 4/7
BLOB = mask("0000", "0110", "0111", "0000")


def two_channel():
    t = np.stack([PARTIAL_T, BLOB], -1)[None]
    p = np.stack([PARTIAL_P, BLOB], -1)[None]
    return t, p


@pytest.mark.parametrize(
    "class_id, expected", [(None, (4 / 7 + 1.0) / 2), (0, 4 / 7), (1, 1.0)]
)
def test_class_id_selects_channel(class_id, expected):
    t, p = two_channel()
    metric = M.Dice(from_logits=False, class_id=class_id, name=f"dice_{class_id}")
    metric.update_state(t, p)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_per_image_scores_average_channels():
    t, p = two_channel()
    scores = M.per_image_scores(t, p)
    assert scores["dice"][0] == pytest.approx((4 / 7 + 1.0) / 2, abs=1e-6)
    # Threshold per channel: 2/5 -> 0, 1 -> 1.
    assert scores["threshold_jaccard"][0] == pytest.approx(0.5, abs=1e-6)


def test_class_id_out_of_range_and_invalid():
    t, p = two_channel()
    with pytest.raises(ValueError, match="class_id=2"):
        M.Dice(class_id=2).update_state(t, p)
    with pytest.raises(ValueError, match="class_id"):
        M.Dice(class_id=-1)


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.75])
def test_logits_match_probabilities(threshold):
    rng = np.random.default_rng(3)
    t = (rng.random((4, 6, 6, 2)) > 0.5).astype("float32")
    # Keep probabilities away from the thresholds: a tie may round either way.
    probs = rng.choice([0.05, 0.2, 0.4, 0.6, 0.7, 0.8, 0.95], size=t.shape)
    logits = np.log(probs / (1.0 - probs)).astype("float32")
    for cls in (M.Dice, M.Jaccard, M.Sensitivity, M.Specificity, M.PixelAccuracy):
        from_p = cls(threshold=threshold, from_logits=False)
        from_x = cls(threshold=threshold, from_logits=True)
        from_p.update_state(t, probs.astype("float32"))
        from_x.update_state(t, logits)
        assert float(from_x.result()) == pytest.approx(float(from_p.result()), abs=1e-7)
    expected = M.per_image_scores(t, probs, threshold=threshold)["dice"].mean()
    assert 0.0 < expected < 1.0  # a non-trivial case
    dice = M.Dice(threshold=threshold)
    dice.update_state(t, logits)
    assert float(dice.result()) == pytest.approx(float(expected), abs=1e-6)


def test_logit_zero_is_positive_at_default_threshold():
    t = batch(CORNER)
    logits = np.where(t > 0, 0.0, -1.0).astype("float32")  # sigmoid(0) = 0.5
    metric = M.Dice()
    metric.update_state(t, logits)
    assert float(metric.result()) == pytest.approx(1.0)


def test_float16_logits():
    t = batch(PARTIAL_T)
    logits = (8.0 * (batch(PARTIAL_P) - 0.5)).astype("float16")
    metric = M.Dice()
    metric.update_state(t, tf.constant(logits))
    assert float(metric.result()) == pytest.approx(4 / 7, abs=1e-6)


@pytest.mark.parametrize(
    "weights, expected",
    [([1.0, 1.0], 0.5), ([3.0, 1.0], 0.75), ([0.0, 2.0], 0.0), ([[1.0], [3.0]], 0.25)],
)
def test_sample_weight_per_image(weights, expected):
    t, p = batch(CORNER, CORNER), batch(CORNER, EMPTY)  # dice 1, 0
    metric = M.Dice(from_logits=False)
    metric.update_state(t, p, sample_weight=np.array(weights, "float32"))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_sample_weight_must_be_per_image():
    t = batch(CORNER, CORNER)
    with pytest.raises(ValueError, match="one weight per image"):
        M.Dice().update_state(t, t, sample_weight=np.ones((2, 4, 4)))
    with pytest.raises(ValueError, match="3 weights"):
        M.Dice().update_state(t, t, sample_weight=np.ones((3,)))


def test_reset_state_and_empty_result():
    metric = M.Jaccard(from_logits=False)
    assert float(metric.result()) == 0.0  # no image seen: 0, not NaN
    metric.update_state(batch(CORNER), batch(EMPTY))
    metric.reset_state()
    assert float(metric.result()) == 0.0
    metric.update_state(batch(CORNER), batch(CORNER))
    assert float(metric.result()) == pytest.approx(1.0)


def test_default_metrics():
    metrics = M.default_metrics(threshold=0.4, from_logits=False)
    assert [m.name for m in metrics] == [
        "dice", "jaccard", "threshold_jaccard", "pixel_accuracy",
        "sensitivity", "specificity",
    ]
    assert all(m.threshold == 0.4 and m.from_logits is False for m in metrics)


@pytest.mark.parametrize(
    "metric",
    M.default_metrics()
    + [
        M.Dice(threshold=0.3, from_logits=False, class_id=2, name="dice_globules"),
        M.ThresholdJaccard(floor=0.8, name="tj80"),
    ],
    ids=lambda m: m.name,
)
def test_metric_config_round_trip(metric):
    config = metric.get_config()
    clone = type(metric).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(metric)
    )
    assert type(restored) is type(metric)
    assert restored.get_config() == config


# --------------------------------------------------------------------------
# Inside Keras: compiled models, graph mode, distribution, saving
# --------------------------------------------------------------------------


def toy_data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 8, 8, 1), "float32")
    for i in range(n):
        r, c = rng.integers(0, 5, size=2)
        y[i, r : r + 3, c : c + 4] = 1.0
    y[-1] = 0.0  # one lesion-free image exercises the empty conventions
    x = (2.0 * y - 1.0 + rng.normal(scale=0.8, size=y.shape)).astype("float32")
    return x, y


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 3, padding="same")]
    )


def assert_matches_pure(results, y, logits):
    expected = M.per_image_scores(y, logits, from_logits=True)
    for name in M.SCORE_NAMES:
        want = float(expected[name].mean())
        assert results[name] == pytest.approx(want, abs=1e-5), name


def test_compiled_evaluate_matches_pure_function():
    x, y = toy_data()
    model = tiny_model()
    model.compile(loss=L.CombinedLoss(1.0, 1.0), metrics=M.default_metrics())
    # batch_size 4 over 6 images: the last batch is short, so the mean must
    # be over images, not over batches.
    results = model.evaluate(x, y, batch_size=4, return_dict=True, verbose=0)
    logits = model.predict(x, verbose=0)
    assert_matches_pure(results, y, logits)
    assert 0.0 < results["dice"] < 1.0


def test_weighted_metric_in_evaluate():
    x, y = toy_data()
    model = tiny_model()
    model.compile(loss=L.CombinedLoss(1.0, 1.0), weighted_metrics=[M.Dice()])
    w = np.array([1, 0, 2, 0, 1, 3], "float32")
    results = model.evaluate(
        x, y, sample_weight=w, batch_size=4, return_dict=True, verbose=0
    )
    logits = model.predict(x, verbose=0)
    per_image = M.per_image_scores(y, logits, from_logits=True)["dice"]
    want = float((w * per_image).sum() / w.sum())
    assert results["dice"] == pytest.approx(want, abs=1e-5)


def test_graph_mode_with_unknown_dims():
    spec = tf.TensorSpec((None, None, None, 1), tf.float32)
    metric = M.Dice(from_logits=False)

    @tf.function(input_signature=[spec, spec])
    def update(t, p):
        metric.update_state(t, p)
        return metric.result()

    update(batch(CORNER), batch(CORNER))
    result = update(batch(CORNER, CORNER), batch(EMPTY, CORNER))
    assert float(result) == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("devices", [["/cpu:0"], ["/cpu:0", "/cpu:1"]], ids=len)
def test_mirrored_strategy_evaluate(devices):
    # conftest splits the CPU into two logical devices before TensorFlow starts.
    assert len(tf.config.list_logical_devices("CPU")) >= len(devices)
    x, y = toy_data()
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        model = tiny_model()
        model.compile(loss=L.CombinedLoss(1.0, 1.0), metrics=M.default_metrics())
    results = model.evaluate(x, y, batch_size=4, return_dict=True, verbose=0)
    assert_matches_pure(results, y, model.predict(x, verbose=0))


def test_fit_and_saved_model_load_without_custom_objects(tmp_path):
    x, y = toy_data()
    model = tiny_model()
    model.compile(
        optimizer="adam",
        loss=L.get_loss("bce+dice"),
        metrics=M.default_metrics() + [M.Dice(class_id=0, name="dice_lesion")],
    )
    history = model.fit(x, y, epochs=1, batch_size=3, verbose=0).history
    for name in ("loss", "dice", "dice_lesion"):
        assert math.isfinite(history[name][0]), name
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # no custom_objects
    assert isinstance(loaded.loss, L.CombinedLoss)
    before = model.evaluate(x, y, return_dict=True, verbose=0)
    after = loaded.evaluate(x, y, return_dict=True, verbose=0)
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
