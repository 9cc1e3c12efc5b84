"""A run killed with SIGKILL at any moment resumes to the uninterrupted run's result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

import lesionkeras.inference.loading  # noqa: F401 - registers what model.keras holds

EPOCHS = 16
TINY = f"""seed = 5
[data]
synthetic_count = 12
synthetic_size = 32
image_size = 16
val_fraction = 0.25
[model]
filters = 4
depth = 1
dropout = 0.2
[augment]
rotation = 10.0
brightness = 0.1
[train]
batch_size = 3
epochs = {EPOCHS}
progress = false
image_every = 0
"""


@pytest.mark.slow
def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_result(tmp_path):
    """22 children are killed (SIGKILL) at seeded random moments: at commit points
    around the renames of every file the run writes, or after a random delay; each
    next child resumes the run. The run ends with each epoch's row once, a loadable
    best model, no temporary file, and the reference run's weights and history."""
    config, run, reference = tmp_path / "tiny.toml", tmp_path / "run", tmp_path / "reference"
    log = tmp_path / "kills.jsonl"
    config.write_text(TINY)
    env = dict(os.environ, LESIONKERAS_CACHE=str(tmp_path / "cache"))
    script = Path(__file__).with_name("_kill_runs.py")
    proc = subprocess.run(
        [sys.executable, str(script), str(config), str(run), str(reference), "22", "0", str(log)],
        capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"reference": 0}, proc.stderr[-3000:]
    assert lines[-1] == {"final": 0}, proc.stderr[-3000:]
    children = [line for line in lines if "child" in line]
    # Killed, or (a child whose delay outlived the run) finished; never a failure.
    assert all(c["exit"] in (-9, 0) for c in children), (children, proc.stderr[-3000:])
    killed = [c for c in children if c["exit"] == -9]
    assert len(killed) >= 20, children
    assert any(c["kill"].startswith("commit point") for c in killed)
    assert any(c["kill"].startswith("after") for c in killed)

    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == list(range(EPOCHS))
    ref_hist = pd.read_csv(reference / "history.csv")
    np.testing.assert_allclose(hist["loss"], ref_hist["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(hist["val_dice"], ref_hist["val_dice"], rtol=0, atol=1e-6)
    keras.saving.load_model(run / "model.keras")
    got = keras.saving.load_model(run / "last.keras").get_weights()
    want = keras.saving.load_model(reference / "last.keras").get_weights()
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, want)) <= 1e-6
    assert json.loads((run / "metrics.json").read_text())["epochs"] == EPOCHS
    assert not [p for p in run.rglob(".*") if ".tmp" in p.name]
