import dataclasses
import re

import pytest

from lesionkeras import config as config_lib
from lesionkeras.errors import ConfigError


def test_defaults_and_override():
    cfg = config_lib.load_config(None, {"train.epochs": 3, "seed": 7, "data.source": "x"})
    assert cfg.train.epochs == 3 and cfg.seed == 7 and cfg.data.source == "x"
    assert cfg.train.lr == 1e-3  # untouched keys keep defaults


def test_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('seed = 3\n[train]\nlr = 0.01\nepochs = 5\n')
    cfg = config_lib.load_config(f, {"train.epochs": 9})
    assert (cfg.seed, cfg.train.lr, cfg.train.epochs) == (3, 0.01, 9)


@pytest.mark.parametrize(
    "text, key",
    [
        ("[train]\nlrr = 0.1\n", "train.lrr"),
        ("bogus = 1\n", "bogus"),
        ("[train]\nepochs = 'ten'\n", "train.epochs"),
        ("[train]\noptimizer = 'rmsprop'\n", "train.optimizer"),
        ("[model]\nbatch_norm = 1\n", "model.batch_norm"),
        ("[train]\nepochs = 0\n", "train.epochs"),
        ("[data]\nval_fraction = 1.5\n", "data.val_fraction"),
        ("[nope]\nx = 1\n", "nope"),
    ],
)
def test_bad_key_or_value_names_it(tmp_path, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"`{key}")) as info:
        config_lib.load_config(f)
    assert str(f) in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_lib.load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        config_lib.load_config(tmp_path / "missing.toml")


def test_save_round_trip(tmp_path):
    cfg = config_lib.load_config(None, {"data.mean": [1, 2, 3], "data.std": [4, 5, 6]})
    cfg.save(tmp_path / "c.toml")
    again = config_lib.load_config(tmp_path / "c.toml")
    assert again == cfg
    assert again.data.mean == (1.0, 2.0, 3.0)


def test_baseline_toml_documents_every_key():
    text = open("configs/baseline.toml").read()
    cfg = config_lib.load_config("configs/baseline.toml")
    assert cfg == config_lib.Config()
    tables = config_lib.sections()
    keys = [f.name for f in dataclasses.fields(config_lib.Config)
            if f.name not in tables and f.name != "tables"]
    keys += [f"{name}.{g.name}" for name, table in tables.items()
             for g in dataclasses.fields(table)]
    for key in keys:
        name = key.split(".")[-1]
        assert re.search(rf"^{name} = ", text, re.M), f"{key} is not documented"


def test_ronneberger_config_builds_the_seed_papers_unet():
    from lesionkeras.training import segmentation

    cfg = config_lib.load_config("configs/unet_ronneberger.toml")
    model = segmentation.build_model(cfg)
    assert not any(type(l).__name__ == "BatchNormalization" for l in model.layers)
    assert 31_000_000 < model.count_params() < 31_100_000


def test_method_default_model():
    assert config_lib.load_config(None).model_name == "unet"
    cfg = config_lib.load_config(None, {"method": "segan"})
    assert cfg.model.name == "" and cfg.model_name == "segan"
    assert config_lib.load_config(None, {"method": "segan", "model.name": "unet"}).model_name == "unet"
