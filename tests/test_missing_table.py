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
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path / "full")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'full'}: output folder exists and is not empty"
