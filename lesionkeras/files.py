"""Files written whole or not at all, output locations checked before anything is written.

A file is written under a temporary name in the same folder, then renamed
(`atomic_path`); a folder written as a whole is filled under a temporary
sibling name, then renamed (`atomic_folder`). A process killed while writing
leaves the previous file (or none) and at most a hidden `.NAME.PID.tmp` file or
`.NAME.tmp-XXXX` folder, never a truncated one under the real name.
`check_output` refuses, in one line, an output location the command could not
write (read-only, a file in the way, a name too long), before anything is written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import signal
import tempfile
from pathlib import Path

from lesionkeras.errors import ConfigError, DataError

# Used when the file system does not say (`os.pathconf` fails): the common limit.
_DEFAULT_NAME_MAX = 255


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
    tag = f".{os.getpid()}.tmp{suffixes}"
    tmp = path.with_name("." + _shortened(stem, path.parent, len(tag) + 1) + tag)
    try:
        yield tmp
        _fsync_file(tmp)
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


@contextlib.contextmanager
def scratch_folder(path):
    """Yields a new temporary folder beside `path`, removed with its contents on exit.

    Beside, so that files made in it can be renamed to `path` (one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "." + _shortened(path.name, path.parent, len(".tmp-") + 8 + 1) + ".tmp-"
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path):
    """Yields a new temporary folder beside `path`; on success it becomes `path` in one rename.

    For outputs that are only complete as a whole (a dataset, a SavedModel):
    after a kill `path` is absent (or still the empty folder it was), never
    half-filled. `path` must be absent or an empty folder (callers check and say
    so first). On an exception the temporary folder is removed.

    Example:

    ```python
    with atomic_folder("exported/lesion") as tmp:
        (tmp / "model.json").write_text("{}")
    ```
    """
    path = Path(path)
    with scratch_folder(path) as tmp:
        # mkdtemp makes the folder private; an output (a served model, a dataset)
        # must be readable by others, as a folder made by mkdir is.
        os.chmod(tmp, 0o755)
        yield tmp
        _fsync_tree(tmp)
        if path.is_dir():
            path.rmdir()  # empty; renaming onto a folder is not portable
        os.replace(tmp, path)
    _fsync_folder(path.parent)


def _fsync_tree(folder):
    """Flushes every file below `folder` to disk.

    In parallel: the file system commits concurrent flushes together, which
    makes a folder of thousands of small files (a dataset) several times
    quicker to flush than one file after the other.
    """
    paths = [Path(d) / name for d, _, names in os.walk(folder) for name in names]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(_fsync_file, paths))


def _fsync_file(path):
    if os.path.islink(path):
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _name_max(folder):
    """The longest file name (bytes) the file system of `folder` (an existing folder) takes."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _DEFAULT_NAME_MAX
    return limit if limit and limit > 0 else _DEFAULT_NAME_MAX


def _existing_ancestor(path):
    path = Path(os.path.abspath(path))
    # os.path, not Path: it answers False for a name too long, where Path raises.
    while not os.path.isdir(path) and path != path.parent:
        path = path.parent
    return path


def _shortened(name, folder, reserve):
    """`name` cut so that `reserve` more bytes still fit in a file name in `folder`."""
    room = max(1, _name_max(_existing_ancestor(folder)) - reserve)
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return name


def check_output(path, *, kind="folder", whole=False, empty=False):
    """Refuses an output location that cannot be written, before anything is written.

    Checks, without creating anything: every name in `path` fits the file
    system (`PC_NAME_MAX`, and `PC_PATH_MAX` for the whole path); every existing
    part of it is a folder; `path` itself, if it exists, is of the expected
    kind; the folder that will receive the output is writable.

    Args:
        path: str or os.PathLike. The output: a folder the command writes into,
            or a file.
        kind: str. `"folder"` or `"file"`. Defaults to `"folder"`.
        whole: bool. The output is built under a temporary name beside `path`
            and renamed into place (`atomic_folder`), so `path`'s parent must be
            writable even when `path` exists. Defaults to False.
        empty: bool. A folder `path` must be absent or empty. Defaults to False.

    Returns:
        Path of `path`.

    Raises:
        DataError: one line naming the path and the problem.

    Example:

    ```python
    out = check_output(args.out)  # before loading the model
    ```
    """
    if kind not in ("folder", "file"):
        raise ValueError(f"`kind` must be 'folder' or 'file'. Received: kind={kind!r}")
    given = Path(path)
    if not str(path):
        raise DataError("the output path is empty")
    full = Path(os.path.abspath(os.path.expanduser(path)))
    existing = _existing_ancestor(full)
    limit = _name_max(existing)
    for part in full.relative_to(existing).parts:  # the names still to be created
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:16]}...{part[-16:]}"
            raise DataError(f"{_short(given)}: the name {shown!r} is {size} bytes long; this "
                            f"file system allows at most {limit}")
    try:
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 0
    if path_max and path_max > 0 and len(os.fsencode(str(full))) >= path_max:
        raise DataError(f"{_short(given)}: the path is {len(os.fsencode(str(full)))} bytes long; "
                        f"this file system allows at most {path_max - 1}")
    # Below the last existing folder, the next part must not exist (or be `full` itself).
    blocker = full
    while blocker != existing and blocker.parent != existing:
        blocker = blocker.parent
    if blocker not in (full, existing):
        if os.path.islink(blocker) and not os.path.exists(blocker):
            raise DataError(f"{blocker}: a broken symbolic link is in the way of {given}")
        if os.path.exists(blocker):
            raise DataError(f"{blocker}: is a file, not a folder, so {given} cannot be created")
    if os.path.islink(full) and not os.path.exists(full):
        raise DataError(f"{given}: a broken symbolic link (its target is missing)")
    if kind == "folder" and os.path.exists(full) and not os.path.isdir(full):
        raise DataError(f"{given}: exists and is a file, not a folder")
    if kind == "file" and os.path.isdir(full):
        raise DataError(f"{given}: is a folder; a file name is expected here")
    if empty and os.path.isdir(full) and any(os.scandir(full)):
        raise DataError(f"{given}: output folder exists and is not empty")
    # The folder that receives new entries: the output folder itself, or (a file, a
    # folder built whole under a temporary name, or one still to be created) its
    # nearest existing ancestor.
    if os.path.isdir(full):
        _check_writable(full.parent if whole else full, given)
    else:
        _check_writable(existing, given)
    return given


def _check_writable(folder, given):
    if _writable(folder):
        return
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
    where = "" if Path(os.path.abspath(given)) == folder else f"; cannot write {given}"
    raise DataError(f"{folder}: {why}{where}")


def _writable(folder):
    # Effective ids: what the kernel checks when this process writes.
    if os.access in os.supports_effective_ids:
        return os.access(folder, os.W_OK | os.X_OK, effective_ids=True)
    return os.access(folder, os.W_OK | os.X_OK)


def _short(path):
    """`path` for a message: a very long name is cut in the middle."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"


def write_bytes(path, data: bytes):
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str):
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_image(image, path, **params):
    """Saves a PIL image (or a uint8 array) to `path` atomically; the suffix picks the format."""
    from PIL import Image  # here: most users of this module write no images

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    with atomic_path(path) as tmp:
        image.save(tmp, **params)


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
