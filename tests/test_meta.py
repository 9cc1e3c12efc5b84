"""`--method meta` (Mirikharaji et al. 2019, eq. 6-9): weights, both meta-gradients, BN, CLI."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from click.testing import CliRunner

from lesionkeras.cli import main
from lesionkeras.models.unet import build_unet
from lesionkeras.methods.reweight_step import MetaReweighter, normalize_weights
from _helpers import fit_on_two_cpus, shared_dir


def batch(seed=0, noisy=2, clean=4, size=32):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype("float32")  # noqa: E731
    m = lambda *s: (rng.random(s) > 0.5).astype("float32")  # noqa: E731
    return {
        "noisy_image": f(noisy, size, size, 3), "noisy_mask": m(noisy, size, size, 1),
        "clean_image": f(clean, size, size, 3), "clean_mask": m(clean, size, size, 1),
    }


def trainer(meta_grad="nested", lr=0.1, seed=0):
    keras.utils.set_random_seed(seed)
    net = build_unet((32, 32, 3), filters=8, depth=2, batch_norm=True)
    model = MetaReweighter(net, meta_grad=meta_grad)
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), jit_compile=False)
    model.optimizer.build(net.trainable_variables)
    return model


def weights_of(model, data):
    out = tf.function(model.meta_weights)(
        data["noisy_image"], data["noisy_mask"], data["clean_image"], data["clean_mask"]
    )
    return {k: v.numpy() for k, v in out.items()}


@pytest.mark.parametrize(
    "u, expected, positive",
    [
        ([-1.0, 1.0, 3.0, 0.0], [0.0, 0.25, 0.75, 0.0], True),
        ([2.0, 2.0, 2.0, 2.0], [0.25] * 4, True),
        ([-1.0, 0.0, -3.0, 0.0], [0.0] * 4, False),
    ],
)
def test_normalize_weights(u, expected, positive):
    w, pos = normalize_weights(tf.reshape(tf.constant(u), (1, 2, 2, 1)))
    np.testing.assert_allclose(w.numpy().ravel(), expected, rtol=1e-6)
    assert bool(pos) is positive


def test_normalize_weights_sums_over_the_global_batch():
    # ReductionToOneDevice: no collective ops, whose instance keys would clash
    # with those of the other MirroredStrategy objects of the test session.
    strategy = tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    values = [tf.constant([[1.0, 1.0]]), tf.constant([[2.0, -5.0]])]
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: values[ctx.replica_id_in_sync_group]
    )
    out = strategy.run(lambda u: normalize_weights(u)[0], args=(per_replica,))
    got = [t.numpy().ravel().tolist() for t in strategy.experimental_local_results(out)]
    assert got == [[0.25, 0.25], [0.5, 0.0]]


def test_nested_and_forward_give_the_same_weight_maps():
    data = batch()
    nested = weights_of(trainer("nested"), data)
    forward = weights_of(trainer("forward"), data)
    for w in (nested["weights"], forward["weights"]):
        assert w.shape == (2, 32, 32, 1)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0, rel=1e-5)
        assert 0 < (w == 0).mean() < 1  # eq. 8 rectifies some pixels, not all
    rel = np.abs(nested["weights"] - forward["weights"]).max() / np.abs(nested["weights"]).max()
    assert rel < 1e-4
    assert nested["clean_loss"] == pytest.approx(forward["clean_loss"], rel=1e-5)


@pytest.mark.parametrize("meta_grad", ["nested", "forward"])
def test_virtual_passes_leave_batch_norm_statistics_alone(meta_grad):
    data = batch(1)
    model = trainer(meta_grad)
    net = model.network
    before = [v.numpy().copy() for v in net.non_trainable_variables]
    weights_of(model, data)  # eq. 6-8 only
    for b, v in zip(before, net.non_trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())
    # One real step moves the statistics exactly as one training-mode pass
    # over the noisy batch does: the clean (virtual) batch leaves no trace.
    reference = build_unet((32, 32, 3), filters=8, depth=2, batch_norm=True)
    reference.set_weights(net.get_weights())
    reference(data["noisy_image"], training=True)
    logs = model.train_on_batch(data, return_dict=True)
    for r, v in zip(reference.non_trainable_variables, net.non_trainable_variables):
        np.testing.assert_allclose(r.numpy(), v.numpy(), rtol=1e-5, atol=1e-6)
    assert np.isfinite(logs["loss"]) and logs["zero_weight_steps"] == 0
    assert int(model.optimizer.iterations) == 1


def test_all_zero_weights_update_nothing_and_are_counted():
    # A zero learning rate makes U = 0 (eq. 7), so every weight is 0.
    model = trainer("forward", lr=0.0)
    before = [v.numpy().copy() for v in model.network.trainable_variables]
    logs = model.train_on_batch(batch(2), return_dict=True)
    assert logs["zero_weight_steps"] == 1 and logs["zero_weight_fraction"] == 1.0
    assert int(model.optimizer.iterations) == 0  # the optimiser did not step
    for b, v in zip(before, model.network.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


TINY = ["--method", "meta", "--simulate-noise", "3-vertex", "--clean-count", "4",
        "--clean-batch-size", "2", "--batch-size", "2", "--image-size", "32", "--filters", "8",
        "--depth", "2", "--limit", "16", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def forward_meta_run(tmp_path_factory):
    """`fit --method meta --meta-grad forward` on TINY, trained once for the tests that
    read it."""

    def build(path):
        res = CliRunner().invoke(main, ["fit", *TINY, "--meta-grad", "forward",
                                        "--out", str(path / "run")])
        assert res.exit_code == 0, res.output

    return shared_dir(tmp_path_factory, "meta_forward_run", build) / "run"


@pytest.mark.slow
def test_cli_fit_meta_writes_a_plain_segmentation_model(forward_meta_run):
    run = forward_meta_run
    hist = pd.read_csv(run / "history.csv")
    for key in ("loss", "noisy_loss", "clean_loss", "zero_weight_fraction",
                "zero_weight_steps", "dice", "val_dice"):
        assert key in hist and np.isfinite(hist[key]).all(), key
    model = keras.saving.load_model(run / "model.keras")
    assert not isinstance(model, MetaReweighter)
    assert model.output_shape == (None, None, None, 1)
    assert "dice" in json.loads((run / "metrics.json").read_text())


def test_cli_meta_needs_clean_and_noisy_masks(tmp_path):
    res = CliRunner().invoke(main, ["fit", "--method", "meta", "--limit", "8",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--simulate-noise" in res.output


@pytest.mark.slow
def test_meta_under_mirrored_strategy(tmp_path):
    # A process of its own: TensorFlow keys collective ops per process, and the
    # many MirroredStrategy objects of one test session collide on those keys
    # ("shape mismatch in the collective instance"), which a real run, with one
    # strategy per process, never meets.
    run = tmp_path / "run"
    res = fit_on_two_cpus([*TINY, "--strategy", "mirrored", "--out", run])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 replica" in res.stdout
    hist = pd.read_csv(run / "history.csv")
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["val_dice"]).all()


# ---------------------------------------------------------------------- #
# `--method image-reweight` (Ren et al. 2018): one weight per image
# ---------------------------------------------------------------------- #


def image_trainer(meta_grad="nested", lr=0.1, seed=0):
    keras.utils.set_random_seed(seed)
    net = build_unet((32, 32, 3), filters=8, depth=2, batch_norm=True)
    model = MetaReweighter(net, meta_grad=meta_grad, granularity="image")
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9), jit_compile=False)
    model.optimizer.build(net.trainable_variables)
    return model


def test_image_weights_are_one_per_image_and_agree_between_meta_grads():
    data = batch(3, noisy=4)
    nested = weights_of(image_trainer("nested"), data)["weights"]
    forward = weights_of(image_trainer("forward"), data)["weights"]
    for w in (nested, forward):
        assert w.shape == (4, 1, 1, 1)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(nested, forward, rtol=1e-4, atol=1e-7)


def test_image_reweight_train_step_and_config_round_trip():
    model = image_trainer("forward")
    logs = model.train_on_batch(batch(4), return_dict=True)
    assert np.isfinite(logs["loss"]) and int(model.optimizer.iterations) == 1
    assert model.get_config()["granularity"] == "image"
    with pytest.raises(ValueError, match="granularity"):
        MetaReweighter(model.network, granularity="region")


def test_cli_fit_image_reweight(tmp_path):
    run = tmp_path / "run"
    args = ["fit", *TINY, "--out", str(run)]
    args[args.index("meta")] = "image-reweight"
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    hist = pd.read_csv(run / "history.csv")
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["val_dice"]).all()
    assert not isinstance(keras.saving.load_model(run / "model.keras"), MetaReweighter)


# ---------------------------------------------------------------------- #
# TensorBoard: weight maps, Fig. 3 overlay, weight on mislabelled pixels
# ---------------------------------------------------------------------- #


def test_weight_overlay_and_split_golden():
    from lesionkeras.methods.reweight_maps import weight_overlay, weight_split

    w = np.array([0.0, 0.5, 0.5, 0.0]).reshape(1, 2, 2, 1)
    noisy = np.array([1, 1, 0, 0]).reshape(1, 2, 2, 1)
    true = np.array([0, 1, 0, 1]).reshape(1, 2, 2, 1)  # pixels 0 and 3 mislabelled
    rgb = weight_overlay(w, noisy, true).reshape(4, 3)
    # cyan = mislabelled and ignored; nothing else is low or wrong
    np.testing.assert_array_equal(rgb, [[0, 255, 255], [0, 0, 0], [0, 0, 0], [0, 255, 255]])
    assert weight_split(w, noisy, true) == (0.0, 2.0)  # times 4 pixels


@pytest.mark.slow
def test_cli_fit_meta_writes_weight_maps_and_fig3(forward_meta_run):
    run = forward_meta_run
    tags = set()
    for f in (run / "tensorboard" / "weights").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(f)):
            tags.update(v.tag for v in event.summary.value)
    assert {"weights/maps", "weights/fig3_overlay", "weights/mislabelled_mean",
            "weights/correct_mean"} <= tags


@pytest.mark.parametrize("clean_in_noisy, noisy_rows", [(True, 10), (False, 7)])
def test_clean_images_stay_in_the_noisy_stream(clean_in_noisy, noisy_rows):
    """Mirikharaji et al. 2019 assume D^c in D^n: the clean images also train in the
    noisy stream, with their clean masks (meta, image-reweight and finetune's first stage)."""
    from lesionkeras import config as config_lib
    from lesionkeras.methods.reweight import split_streams

    df = pd.DataFrame({"id": [f"i{k}" for k in range(10)], "mask": [f"m{k}" for k in range(10)],
                       "clean": [k < 3 for k in range(10)]})
    cfg = config_lib.load_config(None, {"method": "meta", "meta.clean_in_noisy": clean_in_noisy})
    noisy, clean = split_streams(cfg, df)
    assert len(noisy) == noisy_rows and list(clean["id"]) == ["i0", "i1", "i2"]
    assert set(clean["id"]) <= set(noisy["id"]) if clean_in_noisy else not set(clean["id"]) & set(noisy["id"])
    assert config_lib.load_config(None).meta.clean_in_noisy is True


def test_models_saved_with_keras_bilinear_upsampling_still_load(tmp_path):
    """Run directories written before BilinearUpSampling2D (Keras UpSampling2D, ResizeLike
    in models.deeplab) load and predict as before; meta training refuses them instead."""
    from lesionkeras.models.layers import ResizeLike

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = keras.layers.Add()([x, ResizeLike()([pooled, x])])
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    old = keras.Model(inputs, keras.layers.Conv2D(1, 1)(x))
    old.save(tmp_path / "old.keras")
    again = keras.saving.load_model(tmp_path / "old.keras")
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(images, verbose=0), old.predict(images, verbose=0),
                               atol=1e-6)


@pytest.mark.slow
def test_meta_then_finetune_adds_the_clean_stage(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", *TINY, "--meta-grad", "forward", "--then-finetune",
                                    "--finetune-epochs", "1", "--out", str(run)])
    assert res.exit_code == 0, res.output
    hist = pd.read_csv(run / "history.csv")
    assert len(hist) == 2 and np.isfinite(hist["loss"]).all()
    # The meta epoch weighs pixels; the fine-tuning epoch trains plainly at lr / 10.
    assert hist["zero_weight_fraction"].iloc[0] > 0 and hist["zero_weight_fraction"].iloc[1] == 0
    assert hist["learning_rate"].iloc[1] == pytest.approx(hist["learning_rate"].iloc[0] / 10)
