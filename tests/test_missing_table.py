"""`bin/missing-table` and its API: baseline vs SMILE vs SMILEr at several alphas."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bin" / "missing-table"


@pytest.mark.slow
def test_missing_table_writes_csv_markdown_png(tmp_path):
    out = tmp_path / "table"
    config = tmp_path / "tiny.toml"
    config.write_text(
        'method = "smile"\n[data]\nsynthetic_count = 16\n[model]\ndepth = 2\n'
        "[train]\nbatch_size = 4\nimage_every = 0\n"
    )
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--alphas", "0.7",
         "--structures", "lesion,globules", "--image-size", "32", "--epochs", "1",
         "--relabel-epochs", "1", "--relabel-rounds", "1", "--model", "unet", "--filters", "8",
         "--config", str(config)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "LESIONKERAS_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out / "missing_table.csv")
    assert list(table["method"]) == ["multiclass", "smile", "smiler"]
    assert list(table["alpha"]) == [0.7] * 3
    assert table[["dice_lesion", "dice_globules", "mean_dice"]].notna().all().all()
    assert table["mean_dice"].between(0, 1).all()
    md = (out / "missing_table.md").read_text().splitlines()
    assert md[0] == "| method | alpha | lesion | globules | mean |" and len(md) == 5
    assert (out / "missing_table.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "runs" / "smiler-a0.7" / "relabel.csv").exists()
    assert "| smiler | 0.7 |" in proc.stdout


def test_missing_table_bad_input_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "t"), "--alphas", "0,1.5"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: `alphas` must be in [0, 1]. Received: 1.5"
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_missing_table_resumes_and_smiler_warm_starts_from_smile(tmp_path, monkeypatch):
    from lesionkeras.experiments import missing_table as mt
    from lesionkeras.training import run

    monkeypatch.setenv("LESIONKERAS_CACHE", str(tmp_path / "cache"))
    overrides = {"data.synthetic_count": 16, "data.image_size": 32, "model.depth": 2,
                 "model.filters": 8, "train.batch_size": 4, "train.image_every": 0,
                 "train.epochs": 2, "smile.structures": "lesion,globules",
                 "smile.relabel_epochs": 1, "train.progress": False}
    out = tmp_path / "t"
    fits = []
    real_fit = run.fit

    def counting_fit(cfg, **kwargs):
        fits.append((Path(cfg.out).name, kwargs.get("resume_dir") is not None))
        return real_fit(cfg, **kwargs)

    monkeypatch.setattr(run, "fit", counting_fit)
    table = mt.missing_table(out, alphas=(0.5,), methods=("smile", "smiler"),
                             overrides=overrides, relabel_rounds=1, log=lambda *_: None)
    # SMILEr is a copy of the SMILE run plus one round: no second SMILE training.
    assert fits == [("smile-a0.5", False), ("smiler-a0.5", True)]
    smiler = out / "runs" / "smiler-a0.5"
    history = pd.read_csv(smiler / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]  # 2 SMILE epochs + 1 relabel epoch
    assert (smiler / "smile.keras").read_bytes() == (out / "runs" / "smile-a0.5" / "model.keras").read_bytes()
    assert (smiler / "relabel.csv").exists()

    # Run again: every cell is finished, so nothing trains and the table is the same.
    fits.clear()
    again = mt.missing_table(out, alphas=(0.5,), methods=("smile", "smiler"),
                             overrides=overrides, relabel_rounds=1, log=lambda *_: None)
    assert fits == []
    pd.testing.assert_frame_equal(table, again)
