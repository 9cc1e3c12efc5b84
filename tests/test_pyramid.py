"""unet34: pyramid transfer (sizes in turn, one model, one continuous run) and LR find per stage."""

import functools
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
from lesionkeras.training import lr_find, run
from lesionkeras.methods import unet34

TINY = {
    "method": "unet34", "model.name": "resnet18_unet", "model.filters": 4,
    "data.image_size": 64, "data.limit": 12, "train.batch_size": 4, "train.progress": False,
    "train.image_every": 0, "unet34.schedule": "constant", "unet34.stage1_lr": 0.01,
    "unet34.stage2_lr": 0.002,
}


def _cfg(**extra):
    return config_lib.load_config(None, {**TINY, **extra})


def test_plan_runs_both_stages_at_each_size():
    cfg = _cfg(**{"unet34.pyramid": "32,64", "unet34.stage1_epochs": 3,
                  "unet34.stage2_epochs": 2})
    assert unet34.plan(cfg) == [(32, 1, 3), (32, 2, 2), (64, 1, 3), (64, 2, 2)]
    cfg = cfg.override({"unet34.pyramid_epochs": "4,0,1,5"})
    assert unet34.plan(cfg) == [(32, 1, 4), (64, 1, 1), (64, 2, 5)]
    assert unet34.plan(_cfg(**{"unet34.stage1_epochs": 7})) == [(64, 1, 7), (64, 2, 10)]


@pytest.mark.parametrize("extra, message", [
    ({"unet34.pyramid": "32,48"}, "multiples of 32"),
    ({"unet34.pyramid": "32,x"}, "comma-separated integers"),
    ({"unet34.pyramid": "64,32"}, "must equal `data.image_size` (64)"),
    ({"unet34.pyramid": "32,64", "unet34.pyramid_epochs": "1,1"}, "needs 4 non-negative"),
    ({"unet34.pyramid": "32,64", "unet34.pyramid_epochs": "0,0,0,0"}, "not all 0"),
    ({"unet34.pyramid_epochs": "1,1"}, "needs `unet34.pyramid`"),
    ({"unet34.pyramid": "32,64", "data.crop_size": 32}, "crop_size"),
    ({"unet34.pyramid": "32,64", "method": "baseline"}, "needs `method"),
])
def test_bad_pyramid_is_refused(extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _cfg(**extra)


def test_cli_bad_pyramid_is_one_line_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["fit", "--method", "unet34", "--pyramid", "32,50",
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        "error: command line: `unet34.pyramid` sizes must be multiples of 32 (the ResNet "
        "encoder halves the input five times). Received: '32,50'"]
    assert not (tmp_path / "r").exists()


def test_stage_datasets_have_each_stages_size():
    cfg = _cfg(**{"unet34.pyramid": "32,64", "unet34.pyramid_epochs": "1,2,3,0"})
    df, _ = run.prepare_data(cfg)
    train_df = df[df["split"] == "train"].reset_index(drop=True)
    planned = unet34.stages(cfg, train_df, (120.0,) * 3, (50.0,) * 3)
    assert [stage.epochs for stage in planned] == [1, 2, 3]
    shapes = [tuple(next(iter(stage.dataset))[0].shape[1:3]) for stage in planned]
    masks = [tuple(next(iter(stage.dataset))[1].shape[1:3]) for stage in planned]
    assert shapes == masks == [(32, 32), (32, 32), (64, 64)]
    # One stream per size, shared by the stages at that size.
    assert planned[0].dataset is planned[1].dataset and planned[1].dataset is not planned[2].dataset


@pytest.mark.slow
def test_cli_pyramid_carries_weights_one_continuous_run(tmp_path, monkeypatch):
    recorder = WeightRecorder()
    monkeypatch.setattr(unet34.Unet34, "method_callbacks", lambda self, data: [recorder])
    seen = []
    real_stages = unet34.stages

    def recording_stages(*args):
        planned = real_stages(*args)
        seen.extend(stage.dataset for stage in planned)
        return planned

    monkeypatch.setattr(unet34, "stages", recording_stages)
    out = tmp_path / "run"
    (tmp_path / "c.toml").write_text('method = "unet34"\n[unet34]\nschedule = "constant"\n')
    res = CliRunner().invoke(main, [
        "fit", "--config", str(tmp_path / "c.toml"), "--model", "resnet18_unet",
        "--filters", "4", "--limit", "12", "--batch-size", "4", "--no-progress", "--lr", "0.01",
        "--pyramid", "32,64", "--pyramid-epochs", "0,1,1,1", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    cfg = config_lib.load_config(out / "config.toml")
    assert cfg.data.image_size == 64 and cfg.unet34.pyramid == "32,64"
    # The 32 px stage 1 is left out (one traced fit less); the weights still cross a
    # size (32 px stage 2 -> 64 px stage 1) and a stage (64 px stage 1 -> stage 2).
    assert [tuple(next(iter(ds))[0].shape[1:3]) for ds in seen] == [(32, 32)] + [(64, 64)] * 2

    # Each stage starts from the weights the previous one ended with, and trains.
    assert len(recorder.fits) == 3
    for (_, prev_end), (begin, _) in zip(recorder.fits, recorder.fits[1:]):
        for a, b in zip(prev_end, begin):
            np.testing.assert_array_equal(a, b)
    for begin, end in recorder.fits:
        assert any(not np.array_equal(a, b) for a, b in zip(begin, end))

    # One run: epochs numbered on, one TensorBoard folder written by every stage.
    hist = pd.read_csv(out / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2]
    assert np.isfinite(hist["val_dice"]).all()
    np.testing.assert_allclose(hist["learning_rate"], [0.001, 0.01, 0.001], rtol=1e-5)
    assert len(list((out / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 3
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_pyramid_run_resumes_inside_a_stage(tmp_path):
    # The 32 px stage 1 is left out (0 epochs): each stage is a fit of its own, traced
    # anew, and three stages are enough to resume inside one and run the next.
    cfg = _cfg(**{"unet34.pyramid": "32,64", "unet34.pyramid_epochs": "0,1,2,1",
                  "out": str(tmp_path / "run")})
    with pytest.raises(KeyboardInterrupt):
        run.fit(cfg, verbose=0, log=lambda line: None, extra_callbacks=[_Interrupt(2)])
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [0, 1]
    run.fit(run.load_run_config(tmp_path / "run"), resume_dir=tmp_path / "run", verbose=0,
            log=lambda line: None)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2, 3]
    # The 64 px stage 1 finished on its own rate, stage 2 on its own.
    np.testing.assert_allclose(hist["learning_rate"][2:], [0.01, 0.002], rtol=1e-5)


@pytest.mark.slow
def test_pyramid_run_resumes_at_a_stage_start(tmp_path):
    # Interrupted in the first epoch of the 64 px stage 1, before it wrote a backup
    # (the 32 px stage 1 is left out: one traced fit less, the same hand-over).
    cfg = _cfg(**{"unet34.pyramid": "32,64", "unet34.pyramid_epochs": "0,1,1,1",
                  "out": str(tmp_path / "run")})
    recorder = WeightRecorder()
    with pytest.raises(KeyboardInterrupt):
        run.fit(cfg, verbose=0, log=lambda line: None, extra_callbacks=[recorder, _Interrupt(1)])
    end_of_stage_2 = recorder.fits[0][1]
    resumed = WeightRecorder()
    run.fit(run.load_run_config(tmp_path / "run"), resume_dir=tmp_path / "run", verbose=0,
            log=lambda line: None, extra_callbacks=[resumed])
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [0, 1, 2]
    assert len(resumed.fits) == 2  # the two 64 px stages, not the whole run again
    for a, b in zip(end_of_stage_2, resumed.fits[0][0]):
        np.testing.assert_array_equal(a, b)


def _one_batch_ds(size=32):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, size, size, 3)).astype("float32")
    y = (rng.random((4, size, size, 1)) > 0.5).astype("float32")
    return tf.data.Dataset.from_tensors((x, y))


def test_lr_find_per_stage_uses_that_stages_model_and_restores_weights(tmp_path, monkeypatch):
    cfg = _cfg(**{"unet34.lr_find": True, "unet34.lr_find_steps": 8,
                  "unet34.schedule": "one_cycle", "out": str(tmp_path)})
    model = unet34.build(cfg, steps_per_epoch=2)
    before = [np.array(w) for w in model.weights]
    trainable_during_test = []
    real_test = lr_find.lr_range_test

    def spy(m, ds, **kw):
        trainable_during_test.append({id(w) for w in m.trainable_weights})
        return real_test(m, ds, **kw)

    monkeypatch.setattr(lr_find, "lr_range_test", spy)
    setups = [stage.setup for stage in unet34.stages(cfg, *_train_rows(cfg))]
    functools.partial(setups[1], dataset=_one_batch_ds())(model)  # stage 2: encoder convolutions trainable, batch norms not

    enc = model.get_layer("encoder")
    stem = enc.get_layer("conv1_conv").kernel
    bn_ids = {id(w) for l in enc.layers if isinstance(l, keras.layers.BatchNormalization)
              for w in l.weights}
    assert id(stem) in trainable_during_test[0] and not bn_ids & trainable_during_test[0]
    rates = json.loads((tmp_path / "lr_find" / "rates.json").read_text())
    found = rates["stage2"]
    assert 1e-7 <= found <= 10.0
    assert (tmp_path / "lr_find" / "stage2.csv").exists()
    assert len(pd.read_csv(tmp_path / "lr_find" / "stage2.csv")) >= 2
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, np.array(b))
    # The stage trains on the found rate (one-cycle starts at lr / div_factor).
    assert float(model.optimizer.learning_rate) == pytest.approx(found / 25, rel=1e-5)

    # A resumed run reuses the stored rate instead of testing again.
    monkeypatch.setattr(lr_find, "lr_range_test", lambda *a, **k: pytest.fail("re-ran"))
    assert unet34.find_stage_lr(model, cfg, 2, _one_batch_ds(), "stage2") == found


def _train_rows(cfg):
    df, _ = run.prepare_data(cfg)
    return df[df["split"] == "train"].reset_index(drop=True), (120.0,) * 3, (50.0,) * 3


STAGES_TOML = """
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
lr_find_steps = 6
[[unet34.stages]]
trainable = "decoder"
epochs = 1
lr = "find"
[[unet34.stages]]
trainable = "all"
epochs = 1
lr = 0.003
"""


def test_stages_tables_load_and_plan_with_pyramid(tmp_path):
    (tmp_path / "s.toml").write_text(STAGES_TOML)
    cfg = config_lib.load_config(tmp_path / "s.toml")
    assert cfg.unet34.stages == ({"trainable": "decoder", "epochs": 1, "lr": "find"},
                          {"trainable": "all", "epochs": 1, "lr": 0.003})
    cfg.save(tmp_path / "again.toml")
    assert config_lib.load_config(tmp_path / "again.toml") == cfg
    assert unet34.stage_finds_lr(cfg, 1) and not unet34.stage_finds_lr(cfg, 2)
    assert (unet34.stage_lr(cfg, 1), unet34.stage_lr(cfg, 2)) == (0.01, 0.003)
    three = cfg.override({"unet34.stages": [*cfg.unet34.stages, {"trainable": "all_but_bn", "epochs": 4}],
                          "unet34.pyramid": "32,64", "data.image_size": 64,
                          "unet34.pyramid_epochs": "1,2,3,4,5,6"})
    assert unet34.plan(three) == [(32, 1, 1), (32, 2, 2), (32, 3, 3),
                                  (64, 1, 4), (64, 2, 5), (64, 3, 6)]
    assert unet34.stage_lr(three, 3) == 0.01  # no lr: train.lr
    with pytest.raises(ConfigError, match="needs 6 non-negative"):
        three.override({"unet34.pyramid_epochs": "1,1,1,1"})
    with pytest.raises(ValueError, match="1 to 3"):
        unet34.stage_lr(three, 4)


@pytest.mark.parametrize("stage, message", [
    ({"trainable": "encoder", "epochs": 1}, "`unet34.stages[1].trainable` must be one of"),
    ({"trainable": "all", "epochs": 0}, "`unet34.stages[1].epochs` must be an integer >= 1"),
    ({"trainable": "all", "epochs": 1, "lr": "fast"}, "`unet34.stages[1].lr` must be a number > 0"),
    ({"trainable": "all", "epochs": 1, "lr": -1}, "`unet34.stages[1].lr` must be a number > 0"),
    ({"trainable": "all", "epochs": 1, "freeze": 1}, "unknown config key `unet34.stages[1].freeze`"),
    ({"epochs": 1}, "`unet34.stages[1]` needs `trainable`"),
])
def test_bad_stage_tables_name_the_key(stage, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _cfg(stages=[stage])


def test_stages_need_unet34_and_cli_says_so_in_one_line(tmp_path):
    (tmp_path / "s.toml").write_text(STAGES_TOML.replace('method = "unet34"', 'method = "baseline"'))
    res = CliRunner().invoke(main, ["fit", "--config", str(tmp_path / "s.toml"),
                                    "--out", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {tmp_path / 's.toml'}: `[[unet34.stages]]` needs `method = \"unet34\"`. "
        "Received: 'baseline'"]


def test_stage_trainable_all_trains_the_batch_norms_too():
    cfg = _cfg(stages=[{"trainable": "all", "epochs": 1}])
    model = unet34.build(cfg, steps_per_epoch=2)
    enc = model.get_layer("encoder")
    gammas = {id(l.gamma) for l in enc.layers if isinstance(l, keras.layers.BatchNormalization)}
    assert gammas and gammas <= {id(w) for w in model.trainable_weights}


@pytest.mark.slow
def test_cli_stage_with_lr_find_trains_on_the_found_rate(tmp_path):
    (tmp_path / "s.toml").write_text(STAGES_TOML)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", "--config", str(tmp_path / "s.toml"),
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    rates = json.loads((out / "lr_find" / "rates.json").read_text())
    assert list(rates) == ["stage1"] and 1e-7 <= rates["stage1"] <= 10.0
    assert len(pd.read_csv(out / "lr_find" / "stage1.csv")) >= 2
    hist = pd.read_csv(out / "history.csv")
    np.testing.assert_allclose(hist["learning_rate"], [rates["stage1"], 0.003], rtol=1e-5)


def test_paper_config_is_pyramid_of_two_found_stages_with_dihedral():
    cfg = config_lib.load_config("configs/unet34_isic2018.toml")
    assert unet34.plan(cfg) == [(128, 1, 30), (128, 2, 30), (256, 1, 30), (256, 2, 30)]
    assert [s["trainable"] for s in unet34.stage_specs(cfg)] == ["decoder", "all_but_bn"]
    assert unet34.stage_finds_lr(cfg, 1) and unet34.stage_finds_lr(cfg, 2)
    assert cfg.augment.dihedral and cfg.data.color_constancy == "shades_of_gray"


def test_inconclusive_range_test_keeps_the_previous_sizes_rate(tmp_path, monkeypatch):
    cfg = _cfg(**{"unet34.lr_find": True, "unet34.lr_find_steps": 8, "out": str(tmp_path)})
    model = unet34.build(cfg, steps_per_epoch=2)
    flat = lr_find.LRFindResult(np.logspace(-7, 1, 8), np.full(8, 0.2), np.full(8, 0.2),
                                suggestion=3e-7, diverged=False, conclusive=False)
    monkeypatch.setattr(lr_find, "lr_range_test", lambda *a, **k: flat)
    (tmp_path / "lr_find").mkdir()
    (tmp_path / "lr_find" / "rates.json").write_text(
        json.dumps({"128px-stage1": 0.03, "128px-stage2": 0.009}))
    logged = []
    rate = unet34.find_stage_lr(model, cfg, 2, _one_batch_ds(), "256px-stage2", log=logged.append)
    assert rate == pytest.approx(0.009)
    assert "no clear fall" in logged[0]
    assert json.loads((tmp_path / "lr_find" / "rates.json").read_text())["256px-stage2"] == 0.009
    # Without an earlier size: the configured rate of that stage.
    (tmp_path / "lr_find" / "rates.json").unlink()
    assert unet34.find_stage_lr(model, cfg, 1, _one_batch_ds(), "stage1",
                                log=logged.append) == pytest.approx(unet34.stage_lr(cfg, 1))
