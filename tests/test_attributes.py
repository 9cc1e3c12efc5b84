"""ISIC 2018 Task 2, multitask: heads, losses, pooled Jaccard, CLI on synthetic data."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import cli
from lesionkeras import config as config_lib
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.methods import multitask


def test_multitask_heads_shapes():
    from lesionkeras.models.attribute_net import build_attribute_net

    model = build_attribute_net((64, 64, 3), encoder_filters=4, filters=4)
    out = model(np.zeros((2, 64, 64, 3), np.float32))
    assert tuple(out["masks"].shape) == (2, 64, 64, 5)
    assert tuple(out["presence"].shape) == (2, 5)
    assert model.get_layer("encoder") is not None


def test_pooled_jaccard_golden_differs_from_per_image_mean():
    truth = np.zeros((2, 2, 2, 1), np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 0, :, 0] = 1  # image 1: 2 true pixels, 1 predicted
    pred[0, 0, 0, 0] = 1
    pred[1, 1, 0, 0] = 1  # image 2: empty truth, 1 false positive
    inter, union = cmetrics.pooled_jaccard_counts(truth, pred)
    assert (inter.tolist(), union.tolist()) == ([1], [3])
    assert cmetrics.pooled_jaccard(inter, union)[0] == pytest.approx(1 / 3)  # per-image: 0.25
    assert np.isnan(cmetrics.pooled_jaccard([0], [0])[0])
    metric = cmetrics.PooledJaccard(1)
    logits = np.where(pred > 0, 5.0, -5.0).astype(np.float32)
    metric.update_state(truth[:1], logits[:1])
    metric.update_state(truth[1:], logits[1:])
    assert float(metric.result()) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same shape"):
        cmetrics.pooled_jaccard_counts(truth, pred[:1])


def test_multilabel_soft_margin_and_weighted_bce_golden():
    labels = np.array([[1.0, 0.0]])
    logits = np.array([[0.0, 2.0]])
    # softplus(0) = ln 2; softplus(2) = 2.126928
    assert float(multitask.multilabel_soft_margin(labels, logits)) == pytest.approx(
        (np.log(2) + 2.126928) / 2, rel=1e-5)
    assert float(multitask.multilabel_soft_margin(labels, logits, [[1.0, 0.0]])) == pytest.approx(
        np.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        multitask.multilabel_soft_margin(labels, np.zeros((1, 3)))
    masks = np.array([[1.0, 0.0]])
    z = np.array([[0.0, 100.0]])  # the second pixel is badly wrong but unknown (weight 0)
    assert float(multitask.weighted_pixel_bce(masks, z, np.array([[1.0, 0.0]]))) == pytest.approx(
        np.log(2), rel=1e-5)


def test_missing_attribute_gets_no_presence_or_pixel_gradient():
    """SMILE weights: an attribute never annotated and never known must not move its head."""
    from lesionkeras.models.attribute_net import build_attribute_net

    keras.utils.set_random_seed(0)
    net = build_attribute_net((32, 32, 3), encoder_filters=4, filters=4)
    trainer = multitask.MultitaskTrainer(net)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    masks = np.zeros((2, 32, 32, 5), np.float32)
    masks[:, 8:16, 8:16, 0] = 1.0
    weights = np.ones_like(masks)
    weights[..., 4] = 0.0  # streaks not annotated anywhere
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = trainer._forward((x, masks, weights), True)[3]
    dense = net.get_layer("presence")
    grad = tape.gradient(loss, dense.kernel)
    assert np.abs(grad.numpy()[:, 4]).max() == 0.0
    assert np.abs(grad.numpy()[:, 0]).max() > 0.0


def test_config_file_is_valid():
    cfg = config_lib.load_config("configs/attributes_multitask_isic2018.toml")
    assert (cfg.task, cfg.method, cfg.data.image_size, cfg.train.batch_size) == (
        "attributes", "multitask", 224, 32)


def _config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text("[data]\nsynthetic_count = 24\nimage_size = 32\nval_fraction = 0.25\n"
                    "[model]\nencoder_filters = 4\nfilters = 4\n")
    return str(path)


@pytest.mark.slow
def test_cli_attributes_fit_evaluate_predict(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.main, [
        "fit", "--task", "attributes", "--method", "multitask", "--config", _config(tmp_path),
        "--out", str(run), "--epochs", "1", "--batch-size", "6", "--no-progress",
        "--simulate-missing", "0.5"])
    assert result.exit_code == 0, result.output
    assert "annotated: globules 9," in result.output  # half of the 18 training images
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["jaccard"] <= 1.0 and "jaccard_streaks" in metrics
    assert 'task = "attributes"' in (run / "config.toml").read_text()

    result = runner.invoke(cli.main, ["evaluate", str(run), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "pooled over 24 images" in result.output and "pigment_network" in result.output

    from lesionkeras.data import synthetic

    images = synthetic.cached_dataset(24, 32, 0) / "ISIC2018_Task1-2_Training_Input"
    result = runner.invoke(cli.main, ["predict", str(run), str(images / "ISIC_0000003.jpg"),
                                      "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written == [f"ISIC_0000003_attribute_{a}.png" for a in (
        "globules", "milia_like_cyst", "negative_network", "pigment_network", "streaks")]
    mask = np.asarray(Image.open(tmp_path / "p" / written[0]))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


def test_cli_attributes_without_task2_masks_is_one_line_exit_2(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / "d" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3 if sub == "images" else 1)[:3 if sub == "images" else 2],
                                 np.uint8)).save(tmp_path / "d" / sub / "a.png")
    result = CliRunner().invoke(cli.main, [
        "fit", "--task", "attributes", "--method", "multitask", "--data", str(tmp_path / "d"),
        "--out", str(tmp_path / "run"), "--image-size", "32"])
    assert result.exit_code == 2, result.output
    assert "no ISIC 2018 Task 2 attribute masks" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "run").exists()


def test_init_from_a_task1_segmentor_copies_the_encoder(tmp_path):
    from lesionkeras.classify.attributes import init_encoder
    from lesionkeras.errors import ConfigError
    from lesionkeras.models.attribute_net import build_attribute_net
    from lesionkeras.models.vgg_se_unet import build_vgg_se_unet

    task1 = build_vgg_se_unet((32, 32, 3), encoder_filters=4, filters=4)
    task1.save(tmp_path / "model.keras")
    net = build_attribute_net((32, 32, 3), encoder_filters=4, filters=4)
    init_encoder(net, str(tmp_path))
    for a, b in zip(net.get_layer("encoder").get_weights(), task1.get_layer("encoder").get_weights()):
        np.testing.assert_array_equal(a, b)
    wider = build_attribute_net((32, 32, 3), encoder_filters=8, filters=4)
    with pytest.raises(ConfigError, match="does not match"):
        init_encoder(wider, str(tmp_path / "model.keras"))
    with pytest.raises(ConfigError, match="not found"):
        init_encoder(net, str(tmp_path / "nope"))
