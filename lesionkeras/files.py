"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A process killed while writing leaves the previous file (or none) and at most a
hidden `.NAME.PID.tmp` file, never a truncated one under the real name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from pathlib import Path

from lesionkeras.errors import ConfigError


def _fsync_folder(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; on success it replaces `path` in one rename.

    The temporary name keeps `path`'s suffixes, so writers that choose a format by
    suffix (`.keras`, `.weights.h5`, `.npz`) accept it. On an exception the temporary
    file is removed and `path` is left as it was.

    Example:

    ```python
    with atomic_path(run_dir / "model.keras") as tmp:
        model.save(tmp)
    ```
    """
    path = Path(path)
    # All suffixes kept: Keras wants `.weights.h5` whole.
    suffixes = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffixes)]
    tmp = path.with_name(f".{stem}.{os.getpid()}.tmp{suffixes}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _commit_point()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    _commit_point()


# The crash test's hook: with LESIONKERAS_KILL_AT=N in the environment the process
# kills itself (SIGKILL, no clean-up) at the N-th commit point: the moments just
# before and just after each rename above, where a crash is most likely to
# expose an ordering mistake (tests/test_kills.py).
_KILL_AT = "LESIONKERAS_KILL_AT"
_commit_points = [0]


def _commit_point():
    target = os.environ.get(_KILL_AT)
    if target:
        _commit_points[0] += 1
        if _commit_points[0] == int(target):
            os.kill(os.getpid(), signal.SIGKILL)


def is_temporary(path) -> bool:
    """True for a temporary file of `atomic_path` (left behind when its writer was killed)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp" in name


def remove_temporaries(folder):
    """Deletes the temporary files killed writers left under `folder` (hold its lock first)."""
    for path in Path(folder).rglob(".*"):
        if path.is_file() and is_temporary(path):
            path.unlink(missing_ok=True)


def write_bytes(path, data: bytes):
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def copy(src, dst):
    """Copies the file `src` to `dst` atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(folder):
    """Holds an exclusive lock on `folder` (its `.lock` file) while the block runs.

    `fcntl.flock` locks die with their process, so a killed run leaves no
    stale lock; the file only tells the next process which PID holds it.

    Raises:
        ConfigError: another process holds the lock (named by its PID).
    """
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(f"{folder}: in use by another lesionkeras process "
                              f"(PID {holder}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
