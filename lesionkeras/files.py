"""Files written whole or not at all: a temporary name in the same folder, then a rename.

A process killed while writing leaves the previous file (or none) and at most a
hidden `.NAME.PID.tmp` file, never a truncated one under the real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


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

    The temporary name keeps `path`'s suffix, so writers that choose a format by
    suffix (`.keras`, `.h5`, `.npz`) accept it. On an exception the temporary
    file is removed and `path` is left as it was.

    Example:

    ```python
    with atomic_path(run_dir / "model.keras") as tmp:
        model.save(tmp)
    ```
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


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
