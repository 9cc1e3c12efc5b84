"""Atomic writes and the run-directory lock (`lesionkeras.files`)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from lesionkeras import files
from lesionkeras.cli import main
from lesionkeras.errors import ConfigError


def test_atomic_path_keeps_every_suffix_and_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "epoch3.weights.h5"
    with files.atomic_path(target) as tmp:
        # Keras chooses the format by the whole `.weights.h5` suffix.
        assert tmp.name.endswith(".weights.h5") and tmp.parent == tmp_path
        tmp.write_bytes(b"first")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["epoch3.weights.h5"]


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with files.run_lock(tmp_path):
        with pytest.raises(ConfigError, match=rf"in use by another lesionkeras process \(PID {os.getpid()}\)"):
            with files.run_lock(tmp_path):
                pass
    with files.run_lock(tmp_path):  # released on exit
        pass


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lesionkeras.files import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"PID {holder.pid}"):
            with files.run_lock(tmp_path):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the lock with the process
        try:
            with files.run_lock(tmp_path):
                break
        except ConfigError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_fit_on_a_locked_run_directory_is_one_line_exit_2_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with files.run_lock(run):
        res = CliRunner().invoke(main, ["fit", "--out", str(run), "--limit", "8",
                                        "--image-size", "32", "--epochs", "1"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        f"error: {run}: in use by another lesionkeras process (PID {os.getpid()}); "
        "wait for it to finish or stop it"]
    assert [p.name for p in run.iterdir()] == [files.LOCK_NAME]
