"""`fit --folds K`: K fold runs, disjoint covering splits, and ensemble evaluate/predict."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from click.testing import CliRunner

from lesionkeras import config as config_lib
from lesionkeras.inference.loading import load_predictor
from lesionkeras.inference.predictor import EnsemblePredictor
from lesionkeras.cli import main
from lesionkeras.errors import ConfigError
from lesionkeras.training import run as run_lib

TINY = ["--image-size", "32", "--filters", "4", "--depth", "2", "--batch-size", "4",
        "--limit", "12", "--epochs", "1", "--no-progress"]


@pytest.mark.slow
def test_cli_folds_train_split_and_ensemble(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["fit", *TINY, "--folds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == 2 and set(summary["per_fold"]) == {"fold0", "fold1"}
    assert summary["mean"]["dice"] == pytest.approx(
        np.mean([summary["per_fold"][f]["dice"] for f in ("fold0", "fold1")]))

    # The validation parts are disjoint and cover the data.
    vals, ids = [], None
    for i in range(2):
        cfg = config_lib.load_config(out / f"fold{i}" / "config.toml")
        assert (cfg.data.folds, cfg.data.fold) == (2, i)
        df, _ = run_lib.prepare_data(cfg)
        ids = set(df["id"])
        vals.append(set(df.loc[df["split"] == "val", "id"]))
    assert not vals[0] & vals[1] and vals[0] | vals[1] == ids

    # evaluate on RUN averages the folds and reports each alone.
    res = CliRunner().invoke(main, ["evaluate", str(out), "--limit", "4",
                                    "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "fold0 alone" in res.output and "fold1 alone" in res.output
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(ev["members"]) == {"fold0", "fold1"}

    predictor = load_predictor(out)
    assert isinstance(predictor, EnsemblePredictor)
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    singles = [load_predictor(out / f"fold{i}").probabilities([image])[0]
               for i in range(2)]
    np.testing.assert_allclose(predictor.probabilities([image])[0],
                               (singles[0] + singles[1]) / 2, rtol=1e-5, atol=1e-6)
    Image.fromarray(image).save(tmp_path / "x.png")
    res = CliRunner().invoke(main, ["predict", str(out), str(tmp_path / "x.png"),
                                    "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pred" / "x_mask.png").exists()


def test_fit_folds_checks_its_arguments(tmp_path):
    cfg = config_lib.load_config(None, {"out": str(tmp_path / "r")})
    with pytest.raises(ConfigError, match="folds"):
        run_lib.fit_folds(cfg, 1)
    with pytest.raises(ConfigError, match="val_list"):
        run_lib.fit_folds(cfg.override({"data.val_list": "x.txt"}), 2)


class _InterruptAt(keras.callbacks.Callback):
    """Raises KeyboardInterrupt at the end of the n-th epoch seen over all folds."""

    def __init__(self, n):
        super().__init__()
        self.n, self.seen = n, 0

    def on_epoch_end(self, epoch, logs=None):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_folds_resume_where_they_stopped(tmp_path):
    out = tmp_path / "run"
    cfg = config_lib.load_config(None, {
        "out": str(out), "data.image_size": 32, "model.filters": 4, "model.depth": 2,
        "train.batch_size": 4, "data.limit": 12, "train.epochs": 2, "train.progress": False,
    })
    with pytest.raises(KeyboardInterrupt):
        # Fold 0 finishes its 2 epochs; fold 1 stops after its first.
        run_lib.fit_folds(cfg, 2, verbose=0, extra_callbacks=[_InterruptAt(3)])
    assert not (out / "summary.json").exists()
    fold0_model = (out / "fold0" / "model.keras").read_bytes()

    res = CliRunner().invoke(main, ["fit", "--resume", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fold 2 of 2" in res.output
    for i in range(2):
        history = pd.read_csv(out / f"fold{i}" / "history.csv")
        assert history["epoch"].tolist() == [0, 1]
    # Fold 0 was finished: resuming it trained nothing more.
    assert (out / "fold0" / "model.keras").read_bytes() == fold0_model
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_fold"]) == {"fold0", "fold1"}

    res = CliRunner().invoke(main, ["fit", "--resume", str(out), "--folds", "2"])
    assert res.exit_code == 2 and "--folds cannot be combined" in res.output
