"""`--method finetune`: noisy pre-training, then clean fine-tuning, in one run directory."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from lesionkeras import config as config_lib
from lesionkeras.cli import main
from lesionkeras.errors import ConfigError
from lesionkeras.methods import finetune

TINY = ["--method", "finetune", "--simulate-noise", "3-vertex", "--clean-count", "4",
        "--batch-size", "2", "--image-size", "32", "--filters", "8", "--depth", "2",
        "--limit", "16", "--no-progress"]


@pytest.mark.slow
def test_cli_finetune_runs_both_stages_with_continuous_epochs(tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", *TINY, "--epochs", "2", "--finetune-epochs", "1",
                                    "--lr", "0.01", "--out", str(run)])
    assert res.exit_code == 0, res.output
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2]
    # Stage 2 runs at lr / 10 (the default fine-tuning rate).
    np.testing.assert_allclose(hist["learning_rate"], [0.01, 0.01, 0.001], rtol=1e-5)
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["val_dice"]).all()
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    # Both stages write their epochs to the one TensorBoard run.
    events = list((run / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert len(events) == 2


def test_finetune_config_and_rate():
    cfg = config_lib.load_config("configs/finetune_isic2017.toml")
    assert cfg.method == "finetune" and cfg.data.image_size == 96
    assert finetune.finetune_lr(cfg) == pytest.approx(cfg.train.lr / 10)
    assert finetune.finetune_lr(cfg.override({"meta.finetune_lr": 3e-6})) == 3e-6


def test_finetune_refuses_step_schedules():
    cfg = config_lib.load_config(None, {"method": "finetune", "train.schedule": "one_cycle"})
    with pytest.raises(ConfigError, match="schedule"):
        finetune.build(cfg, steps_per_epoch=4)
