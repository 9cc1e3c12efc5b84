"""`--method unet34`: frozen-encoder stage, then all-but-batch-norm stage, one run."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from _helpers import WeightRecorder
from click.testing import CliRunner

from lesionkeras import config as config_lib
from lesionkeras.cli import main
from lesionkeras.errors import ConfigError
from lesionkeras.methods import unet34

TINY_TOML = """
method = "unet34"
[data]
image_size = 32
limit = 12
[model]
name = "resnet18_unet"
filters = 4
[train]
batch_size = 4
lr = 0.01
progress = false
image_every = 0
[unet34]
schedule = "constant"
stage1_epochs = 2
stage1_lr = 0.01
stage2_epochs = 1
stage2_lr = 0.002
"""


@pytest.mark.slow
def test_cli_unet34_two_stages_frozen_encoder(tmp_path, monkeypatch):
    recorder = WeightRecorder("encoder")
    monkeypatch.setattr(unet34.Unet34, "method_callbacks", lambda self, data: [recorder])
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    run = tmp_path / "run"
    res = CliRunner().invoke(
        main, ["fit", "--config", str(tmp_path / "tiny.toml"), "--out", str(run)]
    )
    assert res.exit_code == 0, res.output
    # ResNet18 traces in about half the time of the default ResNet34 (the default
    # is checked in test_stage_rates_and_epochs); the stages do not depend on it.
    assert "resnet18_unet" in res.output
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2]
    np.testing.assert_allclose(hist["learning_rate"], [0.01, 0.01, 0.002], rtol=1e-5)
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["val_dice"]).all()
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    # One TensorBoard run, written by both stages.
    assert len(list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2

    assert len(recorder.fits) == 2
    (s1_begin, s1_end), (s2_begin, s2_end) = recorder.fits
    for before, after in zip(s1_begin, s1_end):
        np.testing.assert_array_equal(before, after)
    assert any(not np.array_equal(b, a) for b, a in zip(s2_begin, s2_end))
    # Stage 2 keeps the encoder's batch norms frozen.
    model = keras.saving.load_model(run / "last.keras")
    bns = [l for l in model.get_layer("encoder").layers
           if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and not any(l.trainable for l in bns)


def test_stage_rates_and_epochs():
    cfg = config_lib.load_config(None, {"method": "unet34", "train.lr": 0.01})
    assert cfg.model_name == "resnet34_unet"
    assert unet34.stage_lr(cfg, 1) == 0.01
    assert unet34.stage_lr(cfg, 2) == pytest.approx(0.001)
    cfg = cfg.override({"unet34.stage1_lr": 0.003, "unet34.stage2_lr": 1e-4,
                        "unet34.stage2_epochs": 7})
    assert (unet34.stage_lr(cfg, 1), unet34.stage_lr(cfg, 2)) == (0.003, 1e-4)
    t2 = unet34.stage_train_config(cfg, 2)
    assert (t2.schedule, t2.lr, t2.epochs) == ("one_cycle", 1e-4, 7)
    with pytest.raises(ValueError, match="stage"):
        unet34.stage_lr(cfg, 3)


def test_unet34_refuses_a_model_without_encoder():
    cfg = config_lib.load_config(None, {"method": "unet34", "model.name": "unet",
                                        "model.filters": 4, "model.depth": 2})
    with pytest.raises(ConfigError, match="encoder"):
        unet34.build(cfg, steps_per_epoch=2)


def test_unet34_isic2018_config_loads():
    cfg = config_lib.load_config("configs/unet34_isic2018.toml")
    assert cfg.method == "unet34" and cfg.model_name == "resnet34_unet"
    assert cfg.unet34.schedule == "slanted_triangular"
    assert cfg.train.loss == "bce" and cfg.train.optimizer == "adam"


def test_each_stage_gets_a_fresh_schedule_and_trainable_set():
    cfg = config_lib.load_config(None, {
        "method": "unet34", "model.name": "resnet18_unet", "model.filters": 4,
        "unet34.stage1_lr": 0.01, "unet34.stage2_lr": 0.002,
    })
    model = unet34.build(cfg, steps_per_epoch=5)
    enc = model.get_layer("encoder")
    assert not enc.trainable
    # One-cycle starts at max_lr / div_factor (25), on the stage's own clock.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01 / 25, rel=1e-5)
    stem = enc.get_layer("conv1_conv").kernel
    assert id(stem) not in {id(w) for w in model.trainable_weights}
    unet34.compile_stage(model, cfg, 2, steps_per_epoch=5)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.002 / 25, rel=1e-5)
    assert id(stem) in {id(w) for w in model.trainable_weights}
    bn_ids = {id(w) for l in enc.layers if isinstance(l, keras.layers.BatchNormalization)
              for w in l.weights}
    assert bn_ids and not bn_ids & {id(w) for w in model.trainable_weights}
