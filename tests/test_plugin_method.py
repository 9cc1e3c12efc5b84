"""A method defined outside the package: one class, one config table, one flag (docs/ARCHITECTURE.md)."""

import dataclasses
import json

import keras
import pandas as pd
import pytest
from click.testing import CliRunner

from lesionkeras import config
from lesionkeras.cli import main
from lesionkeras.training import method
from lesionkeras.training.segmentation import SegmentationMethod, build_model, compile_plain


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    lr_scale: float = config.field(
        1.0, "toy: the learning rate is train.lr times this.", minimum=0.0, flag=True)


class Toy(SegmentationMethod):
    """Plain supervised training at a scaled learning rate."""

    name = "toy"

    def build(self, data, steps_per_epoch):
        cfg = self.cfg.override({"train.lr": self.cfg.train.lr * self.cfg.toy.lr_scale})
        return compile_plain(build_model(cfg), cfg, steps_per_epoch)


@pytest.fixture
def toy_registered():
    config.register_section("toy", ToyConfig)
    method.register(Toy)
    yield
    method.unregister("toy")
    config.unregister_section("toy")


def test_a_method_from_outside_the_package_runs_end_to_end(tmp_path, toy_registered):
    runner = CliRunner()
    help_text = runner.invoke(main, ["fit", "--help"]).output
    assert "--lr-scale" in help_text and "toy" in help_text
    out = tmp_path / "run"
    res = runner.invoke(main, [
        "fit", "--method", "toy", "--lr-scale", "0.25", "--lr", "0.004", "--epochs", "2",
        "--image-size", "32", "--filters", "4", "--depth", "2", "--limit", "16",
        "--batch-size", "4", "--no-progress", "--out", str(out),
    ])
    assert res.exit_code == 0, res.output
    saved = config.load_config(out / "config.toml")
    assert saved.method == "toy" and saved.toy.lr_scale == 0.25
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert history["learning_rate"].tolist() == pytest.approx([0.001, 0.001])
    assert keras.saving.load_model(out / "model.keras").count_params() > 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_unregistered_the_method_and_its_table_are_unknown(tmp_path):
    with pytest.raises(config.ConfigError, match="`method` must be one of"):
        config.Config().override({"method": "toy"})
    with pytest.raises(config.ConfigError, match="unknown config key `toy`"):
        config.from_dict({"toy": {"lr_scale": 0.5}})
