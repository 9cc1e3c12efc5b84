"""SegAN (Xue, Xu, Huang, ISBI 2018): segmentor, critic, multi-scale L1, k annealing, trainer."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from click.testing import CliRunner

from lesionkeras import config as config_lib
from lesionkeras import losses
from lesionkeras.training.callbacks import AnnealLogisticK, logistic_k
from lesionkeras.cli import main
from lesionkeras.models import registry
from lesionkeras.models.blocks import apply_global_conv
from lesionkeras.models.critic import build_critic
from lesionkeras.models.segan import AdaptiveLogistic, build_segan, decoder_kernels, encoder_kernels
from lesionkeras.methods.segan import SegANTrainer


def kernel_shapes(model, prefix):
    return sorted(
        tuple(l.kernel.shape[:2]) for l in model.layers
        if l.name.startswith(prefix) and isinstance(l, keras.layers.Conv2D)
    )


# ---------------------------------------------------------------------- models


# depth 2 by hand: down0 7x7 conv+bias 592, residual (bias, no BN) 188; down1 5x5 800 + BN 32,
# residual 800; up1 two-way 9-conv 864 + BN 16, residual 224; up0 7x7 1568 + BN 16,
# residual 224; logits 5; k 1: 5,330.
@pytest.mark.parametrize("depth, size, params", [(2, 32, 5_330), (3, 64, 16_082)])
def test_segmentor_shapes_and_parameter_counts(depth, size, params):
    model = registry.build("segan", input_shape=(None, None, 3), depth=depth, filters=4)
    out = model(np.zeros((2, size, size, 3), "float32"))
    assert out.shape == (2, size, size, 1) and out.dtype == "float32"
    assert model.count_params() == params


def test_segmentor_follows_the_paper():
    assert encoder_kernels(3) == (7, 5, 4) and decoder_kernels(3) == (11, 9, 7)
    assert encoder_kernels(4) == (7, 5, 4, 4) and decoder_kernels(4) == (11, 11, 9, 7)
    model = build_segan((32, 32, 3), depth=3, filters=4)
    # Stride-2 convolutions 7, 5, 4 down; 11 and 9 as two-way global convolutions up, 7 plain.
    assert kernel_shapes(model, "down0_conv") == [(7, 7)]
    assert kernel_shapes(model, "down2_conv") == [(4, 4)]
    assert kernel_shapes(model, "up2_conv") == [(1, 11), (1, 11), (11, 1), (11, 1)]
    assert kernel_shapes(model, "up1_conv") == [(1, 9), (1, 9), (9, 1), (9, 1)]
    assert kernel_shapes(model, "up0_conv") == [(7, 7)]
    names = [l.name for l in model.layers]
    assert not any(n.startswith("down0") and "bn" in n for n in names)
    assert any(n.startswith("down1") and "bn" in n for n in names)
    assert any(isinstance(l, keras.layers.LeakyReLU) for l in model.layers)
    assert any(l.name.startswith("down1_res_conv") for l in model.layers)
    assert isinstance(model.layers[-1], AdaptiveLogistic)
    with pytest.raises(ValueError, match="divisible"):
        build_segan((36, 36, 3), depth=3)


def test_global_conv_is_two_way_k_by_1_plus_1_by_k():
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, apply_global_conv(inputs, 5, 9, name="g"))
    assert kernel_shapes(model, "g_l") == [(1, 9), (9, 1)]
    assert kernel_shapes(model, "g_r") == [(1, 9), (9, 1)]
    # Two branches of (9 x 1 x 3 x 5) + (1 x 9 x 5 x 5), no bias.
    assert model.count_params() == 2 * (9 * 3 * 5 + 9 * 5 * 5)
    assert model(np.zeros((1, 16, 16, 3), "float32")).shape == (1, 16, 16, 5)


def test_critic_returns_the_input_and_every_block():
    critic = build_critic((32, 32, 3), filters=4, max_filters=16)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    feats = critic(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 32, 3), (2, 16, 16, 4), (2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 16), (2, 1, 1, 16)
    ]
    np.testing.assert_array_equal(feats[0], x)
    assert kernel_shapes(critic, "block0_gcn") == [(1, 9), (1, 9), (9, 1), (9, 1)]
    assert not any(l.name.startswith("block0") and "bn" in l.name for l in critic.layers)
    # By hand: block0 (no BN, biases) 512 + 148; block1 1,728 + 32 + 576 + 32;
    # block2 6,912 + 64 + 2,304 + 64; blocks 3-4 9,216 + 64 + 2,304 + 64 each.
    assert critic.count_params() == 35_668


def test_adaptive_logistic_is_saved_with_the_model(tmp_path):
    model = build_segan((32, 32, 3), depth=2, filters=4)
    layer = model.get_layer("adaptive_logistic")
    assert [w.name for w in layer.non_trainable_weights] == ["k"] and not layer.trainable_weights
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    z = model.get_layer("logits").output
    z = keras.Model(model.input, z)(x)
    layer.k.assign(0.5)
    # The model returns z / k: sigmoid(output) = f(z) = 1 / (1 + exp(-z / k)).
    np.testing.assert_allclose(model(x), z / 0.5, rtol=1e-6)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert float(again.get_layer("adaptive_logistic").k) == 0.5
    np.testing.assert_allclose(again(x), model(x), atol=1e-6)


# ---------------------------------------------------------------------- loss


def _maps(*arrays):
    return [np.asarray(a, "float32") for a in arrays]


@pytest.mark.parametrize(
    "a, b, expected",
    [
        # One 2x2 map: mean |a - b| = (1 + 0 + 2 + 1) / 4.
        (_maps([[[[1], [0]], [[2], [1]]]]), _maps([[[[0], [0]], [[0], [0]]]]), [1.0]),
        # Two scales: mean of the per-map means, (1 + 3) / 2.
        (_maps(np.ones((1, 2, 2, 1)), np.zeros((1, 1, 1, 2))),
         _maps(np.zeros((1, 2, 2, 1)), np.full((1, 1, 1, 2), 3.0)), [2.0]),
        # Per image: the second image is identical in both.
        (_maps(np.stack([np.ones((2, 2, 1)), np.zeros((2, 2, 1))])),
         _maps(np.zeros((2, 2, 2, 1))), [1.0, 0.0]),
    ],
)
def test_multiscale_l1_golden(a, b, expected):
    np.testing.assert_allclose(losses.multiscale_l1(a, b), expected, rtol=1e-6)


def test_multiscale_l1_and_masking_reject_bad_input():
    with pytest.raises(ValueError, match="equally long"):
        losses.multiscale_l1(_maps(np.zeros((1, 2, 2, 1))), [])
    with pytest.raises(ValueError, match="feature map 0 shapes differ"):
        losses.multiscale_l1(_maps(np.zeros((1, 2, 2, 1))), _maps(np.zeros((1, 2, 2, 2))))
    with pytest.raises(ValueError, match="same"):
        losses.mask_image(np.zeros((1, 4, 4, 3)), np.zeros((1, 2, 2, 1)))


def test_mask_image_multiplies_every_channel():
    x = np.arange(1, 13, dtype="float32").reshape(1, 2, 2, 3)
    m = np.array([1, 0, 0, 1], "float32").reshape(1, 2, 2, 1)
    out = np.asarray(losses.mask_image(x, m))
    np.testing.assert_array_equal(out[0, 0, 0], [1, 2, 3])
    np.testing.assert_array_equal(out[0, 0, 1], [0, 0, 0])
    two = np.asarray(losses.mask_image(x, np.concatenate([m, 1 - m], -1)))
    assert two.shape == (1, 2, 2, 6)
    np.testing.assert_array_equal(two[0, 0, 1], [0, 0, 0, 4, 5, 6])


# ---------------------------------------------------------------------- k annealing


@pytest.mark.parametrize(
    "epoch, k", [(0, 1.0), (24, 1.0), (25, 0.9), (49, 0.9), (50, 0.81), (275, 0.9**11), (300, 0.3), (1000, 0.3)]
)
def test_logistic_k_schedule(epoch, k):
    assert logistic_k(epoch) == pytest.approx(k)


def test_anneal_callback_sets_k_of_the_wrapped_segmentor():
    trainer = _trainer()
    cb = AnnealLogisticK(decay=0.5, every=1, floor=0.2)
    cb.set_model(trainer)
    logs = {}
    for epoch in range(4):
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, logs)
    assert float(trainer.network.get_layer("adaptive_logistic").k) == pytest.approx(0.2)
    assert logs["logistic_k"] == pytest.approx(0.2)


# ---------------------------------------------------------------------- trainer


def _batch(seed=0, n=2, size=32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    y = np.stack([((yy - size / 2) ** 2 + (xx - size / 2 - 4 * i) ** 2 < (size / 4) ** 2)
                  for i in range(n)])[..., None].astype("float32")
    return x, y


def _trainer(clip=0.05, seg_lr=1e-3, critic_lr=1e-3, **kwargs):
    keras.utils.set_random_seed(0)
    seg = build_segan((32, 32, 3), depth=2, filters=4)
    critic = build_critic((32, 32, 3), filters=4, max_filters=16)
    model = SegANTrainer(seg, critic, clip=clip, **kwargs)
    model.compile(
        seg_optimizer=keras.optimizers.Adam(seg_lr),
        critic_optimizer=keras.optimizers.Adam(critic_lr),
    )
    return model


def _loss(model, x, y):
    logits = model.network(x, training=True)
    return float(model.multiscale_loss(x, tf.sigmoid(logits), y, training=True))


@pytest.fixture(scope="module")
def stepped_trainer():
    """The default trainer (clip 0.05) after one `train_on_batch` on `_batch()`, its logs,
    and the critic's largest weight before the step. Its users only read it (one trace
    of the SegAN step for them all)."""
    model = _trainer(clip=0.05)
    x, y = _batch()
    critic_max_before = max(float(np.abs(v).max()) for v in model.critic.trainable_variables)
    logs = model.train_on_batch(x, y, return_dict=True)
    return model, logs, critic_max_before


def test_clamping_holds_after_a_step(stepped_trainer):
    model, logs, critic_max_before = stepped_trainer
    assert critic_max_before > 0.05
    assert max(float(np.abs(v).max()) for v in model.critic.trainable_variables) <= np.float32(0.05)
    for key in ("loss", "critic_loss", "adversarial_loss", "dice", "jaccard"):
        assert np.isfinite(logs[key]), key


def test_critic_step_increases_the_loss():
    model = _trainer(clip=100.0, critic_lr=1e-2)
    x, y = _batch()
    probs = tf.sigmoid(model.network(x, training=False))
    before = float(model.multiscale_loss(x, probs, y, training=True))
    seg_before = [v.numpy() for v in model.network.weights]
    critic_step = tf.function(model.critic_step)  # traced once, not at every call
    for _ in range(3):
        critic_step(x, probs, y)
    assert float(model.multiscale_loss(x, probs, y, training=True)) > before
    for a, b in zip(seg_before, model.network.weights):
        np.testing.assert_array_equal(a, b)  # the segmentor is fixed


def test_segmentor_step_decreases_the_loss():
    # A critic that does not move (learning rate 0, no clamping effect):
    # only the segmentor step acts.
    model = _trainer(clip=100.0, critic_lr=0.0, seg_lr=1e-2)
    x, y = _batch()
    critic_before = [v.numpy() for v in model.critic.trainable_variables]
    before = _loss(model, x, y)
    for _ in range(3):
        model.train_on_batch(x, y)
    assert _loss(model, x, y) < before
    for a, b in zip(critic_before, model.critic.trainable_variables):
        np.testing.assert_array_equal(a, b)


def test_supervised_term_and_warmup_switch():
    model = _trainer(supervised_loss="bce+dice", supervised_weight=0.5)
    x, y = _batch()
    model.adversarial_weight.assign(0.0)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(0.5 * logs["supervised_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="two objects"):
        opt = keras.optimizers.Adam()
        model.compile(seg_optimizer=opt, critic_optimizer=opt)


def test_save_writes_the_segmentor_alone(stepped_trainer, tmp_path):
    model = stepped_trainer[0]
    x, y = _batch()
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")  # no custom_objects
    assert again.name == "segan" and not isinstance(again, SegANTrainer)
    np.testing.assert_allclose(again(x), model.network(x), atol=1e-5)


@pytest.mark.slow
def test_trainer_under_mirrored_strategy_on_two_logical_cpus():
    # ReductionToOneDevice: no collective ops, whose instance keys would clash
    # with those of the other MirroredStrategy objects of the test session.
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    x, y = _batch(n=4)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4).repeat(2)
    with strategy.scope():
        # Both optimisers are built here, in compile (keras-team/keras#20164).
        model = _trainer(clip=0.05)
        assert model.seg_optimizer.built and model.critic_optimizer.built
    hist = model.fit(ds, validation_data=ds.take(1), epochs=1, verbose=0,
                     callbacks=[AnnealLogisticK()])
    for key in ("loss", "critic_loss", "adversarial_loss", "dice", "val_dice", "val_loss"):
        assert np.isfinite(hist.history[key]).all(), key
    assert max(float(np.abs(v).max()) for v in model.critic.trainable_variables) <= np.float32(0.05)
    # Trainable weights stay in sync (batch-norm statistics are per replica, as in Keras).
    for v in model.network.trainable_weights + model.critic.trainable_weights:
        copies = [c.numpy() for c in strategy.experimental_local_results(v.value)]
        np.testing.assert_allclose(copies[0], copies[1], atol=1e-6, err_msg=v.path)


TINY = ["--method", "segan", "--batch-size", "2", "--image-size", "32",
        "--filters", "4", "--depth", "2", "--limit", "8", "--epochs", "2", "--no-progress"]


def test_cli_fit_segan_writes_the_segmentor(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", *TINY, "--out", str(run)])
    assert res.exit_code == 0, res.output
    hist = pd.read_csv(run / "history.csv")
    for key in ("loss", "critic_loss", "adversarial_loss", "dice", "val_dice", "logistic_k"):
        assert key in hist and np.isfinite(hist[key]).all(), key
    model = keras.saving.load_model(run / "model.keras")
    assert model.name == "segan" and model.get_layer("adaptive_logistic") is not None
    assert "dice" in json.loads((run / "metrics.json").read_text())
    threshold = config_lib.load_config(run / "config.toml").train.threshold
    assert threshold in [round(0.05 * i, 2) for i in range(1, 20)]
    assert "threshold search on validation" in res.output


def test_cli_fit_segan_without_validation_images_keeps_its_threshold(tmp_path):
    """`data.val_fraction = 0`: no threshold search (nothing to search on), no crash."""
    run = tmp_path / "run"
    (tmp_path / "c.toml").write_text("[data]\nval_fraction = 0.0\n")
    res = CliRunner().invoke(main, ["fit", *TINY, "--config", str(tmp_path / "c.toml"),
                                    "--out", str(run)])
    assert res.exit_code == 0, res.output
    assert "threshold search" not in res.output
    assert config_lib.load_config(run / "config.toml").train.threshold == 0.5
    assert (run / "metrics.json").exists()


def test_cli_segan_bad_settings_exit_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('method = "segan"\n[segan]\nwarmup_epochs = 2\n')
    res = CliRunner().invoke(main, ["fit", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "segan.supervised_loss" in res.output
    assert not (tmp_path / "r").exists()


def test_isbi2018_config_builds_the_papers_networks():
    from lesionkeras import config as config_lib
    from lesionkeras.methods import segan

    cfg = config_lib.load_config(
        "configs/segan_isbi2018.toml", {"model.filters": 4, "segan.critic_filters": 4}
    )
    assert (cfg.method, cfg.model.name, cfg.data.crop_size, cfg.train.threshold) == (
        "segan", "segan", 128, 0.4
    )
    model = segan.build(cfg, steps_per_epoch=2)
    assert model.clip == 0.05 and len(model.critic.outputs) == 6
    assert kernel_shapes(model.network, "down0_conv") == [(7, 7)]
    # The ISBI critic: the decoder's kernels (coarse to fine 11, 11, 11, 9, 7) in reverse,
    # a plain 7x7 convolution, then global convolutions; leaky ReLU.
    critic = model.critic
    assert kernel_shapes(critic, "block0_gcn") == [(7, 7)]
    assert kernel_shapes(critic, "block1_gcn") == [(1, 9), (1, 9), (9, 1), (9, 1)]
    for b in (2, 3, 4):
        assert kernel_shapes(critic, f"block{b}_gcn") == [(1, 11), (1, 11), (11, 1), (11, 1)]
    acts = {type(layer).__name__ for layer in critic.layers if "relu" in layer.name}
    assert acts == {"LeakyReLU"}
    assert cfg.segan.threshold_metric == "jaccard"


def test_isic2018_config_uses_the_reports_critic_and_threshold_jaccard():
    from lesionkeras import config as config_lib

    cfg = config_lib.load_config("configs/segan_vgg19se_isic2018.toml")
    assert (cfg.segan.critic, cfg.segan.critic_kernel) == ("isic2018", 9)
    assert cfg.segan.threshold_metric == "threshold_jaccard"


class _Fixed:
    """A 'model' whose logits are given: predict_on_batch returns them."""

    def __init__(self, logits):
        self.logits = logits

    def predict_on_batch(self, x):
        return self.logits[x]


def test_threshold_search_golden():
    from lesionkeras.methods.segan import search_threshold

    # One image, 4 pixels, truth [1, 1, 0, 0], probabilities [0.9, 0.35, 0.3, 0.1]:
    # t <= 0.3 predicts 3 pixels (J = 2/3), 0.3 < t <= 0.35 gives J = 1, above: J = 1/2.
    p = np.array([0.9, 0.35, 0.3, 0.1])
    logits = np.log(p / (1 - p)).reshape(1, 2, 2, 1)
    y = np.array([1, 1, 0, 0], "float32").reshape(1, 2, 2, 1)
    best, scores = search_threshold(_Fixed(logits), [(slice(None), y)], grid=(0.2, 0.35, 0.6))
    assert best == 0.35
    assert scores == pytest.approx({0.2: 2 / 3, 0.35: 1.0, 0.6: 0.5})


def test_threshold_search_maximises_the_configured_metric():
    from lesionkeras.methods.segan import search_threshold

    # Two images of 10 pixels, truth = the first 5 of each. Image A's probabilities put
    # 6 pixels above 0.3 and 5 above 0.5 (J 5/6 then 1); image B's 10 above 0.3, 3
    # above 0.5 (J 1/2 then 3/5). Mean Jaccard: t=0.3: (5/6 + 1/2)/2 = 0.667,
    # t=0.5: (1 + 3/5)/2 = 0.8. Threshold Jaccard (0 below 0.65): 0.417 vs 0.5.
    # Dice, per image 2J/(1+J): t=0.3: (10/11 + 2/3)/2 = 0.788, t=0.5: (1 + 3/4)/2 = 0.875.
    pa = np.array([0.9] * 5 + [0.4] + [0.1] * 4)
    pb = np.array([0.9] * 3 + [0.4] * 7)
    p = np.stack([pa, pb]).reshape(2, 2, 5, 1)
    logits = np.log(p / (1 - p))
    y = np.tile(np.array([1] * 5 + [0] * 5, "float32"), (2, 1)).reshape(2, 2, 5, 1)
    expected = {
        "jaccard": {0.3: (5 / 6 + 1 / 2) / 2, 0.5: (1 + 3 / 5) / 2},
        "threshold_jaccard": {0.3: (5 / 6 + 0) / 2, 0.5: (1 + 0) / 2},
        "dice": {0.3: (10 / 11 + 2 / 3) / 2, 0.5: (1 + 3 / 4) / 2},
    }
    for metric, want in expected.items():
        best, scores = search_threshold(_Fixed(logits), [(slice(None), y)], grid=(0.3, 0.5),
                                        metric=metric)
        assert scores == pytest.approx(want), metric
        assert best == 0.5
    with pytest.raises(ValueError, match="metric"):
        search_threshold(_Fixed(logits), [(slice(None), y)], metric="accuracy")


# ---------------------------------------------------------------------- hard mining (ISIC 2018)


def _ones_scaled(*scales):
    t = np.ones((len(scales), 2, 2, 1), "float32")
    return t, t * np.asarray(scales, "float32").reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "scales, count, expected",
    [
        # Per-image soft-Dice losses (smooth 1) of p = 1, 0.5, 0 on a full 2x2 mask:
        # 0, 1 - 5/7 = 2/7, 1 - 1/5 = 0.8. The two worst: (0.8 + 2/7) / 2.
        ((1.0, 0.5, 0.0), 2, (0.8 + 2 / 7) / 2),
        ((1.0, 0.5, 0.0), 1, 0.8),
        # Fewer images than `count`: all of them.
        ((1.0, 0.5, 0.0), 5, (0.0 + 2 / 7 + 0.8) / 3),
        ((0.0, 1.0), 5, 0.4),
    ],
)
def test_hard_mining_dice_loss_golden(scales, count, expected):
    t, p = _ones_scaled(*scales)
    assert float(losses.hard_mining_dice_loss(t, p, count=count)) == pytest.approx(expected, rel=1e-6)


def test_hard_mining_dice_loss_bad_input():
    t, p = _ones_scaled(1.0, 0.5)
    with pytest.raises(ValueError, match="count=0"):
        losses.hard_mining_dice_loss(t, p, count=0)
    with pytest.raises(ValueError, match="shape"):
        losses.hard_mining_dice_loss(t, p[:, :1], count=2)


@pytest.mark.slow
def test_hard_mining_term_in_the_segmentor_step(stepped_trainer):
    model = _trainer(hard_mining_weight=0.5, hard_mining_count=1)
    x, y = _batch(n=3)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["hard_mining_loss"] > 0
    assert logs["loss"] == pytest.approx(
        logs["adversarial_loss"] + 0.5 * logs["hard_mining_loss"], rel=1e-5
    )
    # The default trainer (no hard mining) logs no such term.
    assert "hard_mining_loss" not in stepped_trainer[1]
    with pytest.raises(ValueError, match="hard_mining_count=0"):
        _trainer(hard_mining_weight=1.0, hard_mining_count=0)


def test_hard_mining_config_reaches_the_trainer():
    from lesionkeras.methods import segan

    cfg = config_lib.load_config(None, {
        "method": "segan", "model.filters": 4, "model.depth": 2, "segan.critic_filters": 4,
        "segan.hard_mining_weight": 0.3, "segan.hard_mining_count": 2,
    })
    model = segan.build(cfg, steps_per_epoch=1)
    assert (model.hard_mining_weight, model.hard_mining_count) == (0.3, 2)
    assert model.get_config()["hard_mining_count"] == 2


def test_isic2018_vgg19se_config_builds_the_reports_networks():
    from lesionkeras.methods import segan

    path = "configs/segan_vgg19se_isic2018.toml"
    full = config_lib.load_config(path)
    assert (full.method, full.model_name, full.data.crop_size, full.train.batch_size) == (
        "segan", "vgg19se", 224, 25
    )
    assert (full.train.lr, full.train.schedule, full.train.freeze_encoder_epochs) == (
        0.001, "linear_decay", 50
    )
    assert full.augment.flip and full.augment.rotate90 and full.augment.hue > 0
    assert full.model.encoder_filters == 64 and full.segan.hard_mining_weight == 0.0
    segan.Segan(full).check()  # 224 is a multiple of 32; the encoder can be frozen
    cfg = config_lib.load_config(
        path, {"model.encoder_filters": 4, "model.filters": 2, "segan.critic_filters": 4}
    )
    model = segan.build(cfg, steps_per_epoch=2)
    assert model.network.name == "vgg19se" and len(model.critic.outputs) == 6
    assert model.network.get_layer("encoder").get_layer("block5_conv4").filters == 32
    assert model.network.get_layer("adaptive_logistic") is not None


def test_segmentor_step_sees_the_updated_and_clamped_critic():
    """Alg. of Xue et al.: the critic is updated and clamped, then the segmentor steps
    against that critic. The segmentor's SGD update is predicted from each candidate
    critic (after the step, before it, updated but not clamped); only the first fits."""
    keras.utils.set_random_seed(0)
    seg = build_segan((32, 32, 3), depth=2, filters=4)
    critic = build_critic((32, 32, 3), filters=4, max_filters=16)
    model = SegANTrainer(seg, critic, clip=0.02)
    seg_lr, critic_lr = 0.5, 0.5
    model.compile(seg_optimizer=keras.optimizers.SGD(seg_lr),
                  critic_optimizer=keras.optimizers.SGD(critic_lr))
    x, y = _batch()
    theta0 = [v.numpy() for v in seg.trainable_variables]
    seg_fixed = [v.numpy() for v in seg.non_trainable_variables]
    c0 = [v.numpy() for v in critic.trainable_variables]
    c_fixed = [v.numpy() for v in critic.non_trainable_variables]

    def probs_at(theta):
        logits, _ = seg.stateless_call(theta, seg_fixed, x, training=True)
        return tf.sigmoid(logits)

    # The critic update alone, by hand: gradient ascent on the loss, no clamp.
    c0_t = [tf.constant(v) for v in c0]
    with tf.GradientTape() as tape:
        tape.watch(c0_t)
        loss = model.multiscale_loss(x, tf.constant(probs_at(theta0)), y, training=True,
                                     variables=(c0_t, c_fixed))
    unclamped = [c + critic_lr * g.numpy() for c, g in zip(c0, tape.gradient(loss, c0_t))]
    assert max(np.abs(u).max() for u in unclamped) > 0.02  # the clamp bites

    model.train_on_batch(x, y)
    theta1 = [v.numpy() for v in seg.trainable_variables]
    c1 = [v.numpy() for v in critic.trainable_variables]
    np.testing.assert_allclose(np.concatenate([c.ravel() for c in c1]),
                               np.clip(np.concatenate([u.ravel() for u in unclamped]), -0.02, 0.02),
                               atol=1e-5)

    def predicted_update(critic_weights):
        theta = [tf.constant(t) for t in theta0]
        with tf.GradientTape() as tape:
            tape.watch(theta)
            loss = model.multiscale_loss(x, probs_at(theta), y, training=True,
                                         variables=([tf.constant(c) for c in critic_weights], c_fixed))
        return np.concatenate([(t - seg_lr * g.numpy()).ravel()
                               for t, g in zip(theta0, tape.gradient(loss, theta))])

    got = np.concatenate([t.ravel() for t in theta1])
    moved = np.abs(got - np.concatenate([t.ravel() for t in theta0])).max()
    errors = {name: np.abs(got - predicted_update(c)).max() / moved
              for name, c in (("after", c1), ("before", c0), ("unclamped", unclamped))}
    assert errors["after"] < 1e-3, errors
    assert errors["before"] > 1e-2 and errors["unclamped"] > 1e-2, errors
