"""Runs `lesionkeras fit` many times in forked children, killing most of them (test_kills.py).

Usage: python _kill_runs.py CONFIG RUN REFERENCE KILLS SEED LOG

TensorFlow and the package are imported once here, before any TensorFlow op,
so each child starts in a fraction of a second; the children do all the work.
First an uninterrupted reference run (REFERENCE), then up to KILLS children on
RUN, each a fresh `fit` while RUN has no config.toml and `fit --resume` after,
each killed with SIGKILL: at a seeded random commit point (the moments around
each file's rename, `LESIONKERAS_KILL_AT`), or after a seeded random delay
(anywhere: inside a training step, halfway through writing a file). Then
`fit --resume RUN` runs to the end. Appends one JSON line per child to LOG.
"""

import json
import os
import random
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402,F401

import lesionkeras.cli  # noqa: E402
import lesionkeras.training.run  # noqa: E402,F401


def child(args, kill_at=None):
    """Forks a child running `lesionkeras ARGS`; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    if kill_at:
        os.environ["LESIONKERAS_KILL_AT"] = str(kill_at)
    code = 0
    try:
        lesionkeras.cli.main(args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported as exit code 3 with its traceback
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def fit_args(config, run):
    if os.path.exists(os.path.join(run, "config.toml")):
        return ["fit", "--resume", run]
    return ["fit", "--config", config, "--out", run]


def main(config, run, reference, kills, seed, log):
    rng = random.Random(seed)

    def report(**fields):
        with open(log, "a") as out:
            out.write(json.dumps(fields) + "\n")

    report(reference=wait(child(["fit", "--config", config, "--out", reference])))
    for i in range(kills):
        if rng.random() < 0.6:
            # Around one of the first renames of this child (about 8 per epoch).
            point = rng.randint(1, 10)
            code = wait(child(fit_args(config, run), kill_at=point))
            how = f"commit point {point}"
        else:
            delay = rng.uniform(0.5, 6.0)
            pid = child(fit_args(config, run))
            deadline = time.monotonic() + delay
            code = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    code = os.waitstatus_to_exitcode(status)
                    break
                time.sleep(0.02)
            if code is None:
                os.kill(pid, signal.SIGKILL)
                code = wait(pid)
            how = f"after {delay:.2f} s"
        report(child=i, kill=how, exit=code)
    report(final=wait(child(fit_args(config, run))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
