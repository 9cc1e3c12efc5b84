"""Output locations are checked before anything is written, and outputs are written whole.

Every command that writes (`fit`, `lr-find`, `predict`, `evaluate`, `export`,
`data synth|noise|drop-labels`) refuses, in one line with exit code 2, an output
it could not write: a read-only folder, a file in the way, a name longer than the
file system allows. Its files appear whole or not at all (`lesionkeras.files`).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import files
from lesionkeras.cli import main
from lesionkeras.data import synthetic
from lesionkeras.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from _helpers import untrained_run  # noqa: E402

SIZE = 32
TINY = ["--image-size", SIZE, "--filters", 8, "--depth", 2, "--batch-size", 2]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree(folder):
    """Every path below `folder` (hidden ones too), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 synthetic ISIC images (32 px) with lesion and attribute masks."""
    return synthetic.write_isic(tmp_path_factory.mktemp("data") / "isic", 8, size=SIZE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("model") / "run", size=SIZE, seed=0,
                         overrides={})


@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write.

    A folder without write permission; root ignores permissions, so for root
    `/proc/sys`, which nobody can create files in.
    """
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if not os.access(folder, os.W_OK):
            yield folder
        elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
            yield Path("/proc/sys")
        else:
            pytest.skip("no folder this user cannot write")
    finally:
        folder.chmod(0o755)


# Each command with OUT as its output; `file` marks a file output.
COMMANDS = {
    "fit": lambda d, r, out: ["fit", "--data", d, "--out", out, "--epochs", 1, "--no-progress",
                              *TINY],
    "lr-find": lambda d, r, out: ["lr-find", "--data", d, "--out", out, "--steps", 2, *TINY],
    "predict": lambda d, r, out: ["predict", r, d / "ISIC2018_Task1-2_Training_Input",
                                  "--out", out],
    "evaluate": lambda d, r, out: ["evaluate", r, "--data", d, "--out", out],
    "export": lambda d, r, out: ["export", r, "--out", out],
    "export-tflite": lambda d, r, out: ["export", r, "--format", "tflite", "--out", out],
    "data-synth": lambda d, r, out: ["data", "synth", "--out", out, "--count", 2, "--size", 32],
    "data-noise": lambda d, r, out: ["data", "noise", "--level", "maximal", "--in",
                                     d / "ISIC2018_Task1_Training_GroundTruth", "--out", out],
    "data-drop-labels": lambda d, r, out: ["data", "drop-labels", "--alpha", 0.5, "--in", d,
                                           "--out", out],
}
FILE_OUTPUTS = {"export-tflite"}


def _case(case, command, tmp_path, read_only):
    """(OUT, what the error line says) of each bad output location."""
    suffix = ".tflite" if command in FILE_OUTPUTS else ""
    if case == "wrong kind":
        out = tmp_path / f"taken{suffix}"
        if command in FILE_OUTPUTS:
            out.mkdir()
            return out, "is a folder; a file name is expected here"
        out.write_text("a file")
        return out, "exists and is a file, not a folder"
    if case == "below a file":
        (tmp_path / "taken").write_text("a file")
        return tmp_path / "taken" / f"out{suffix}", "is a file, not a folder, so"
    if case == "name too long":
        name = "n" * 300 + suffix
        return tmp_path / name, f"is {len(name)} bytes long; this file system allows at most"
    if case == "read-only":
        return read_only / f"out{suffix}", ("is not writable", "is on a read-only file system")
    raise ValueError(case)


@pytest.mark.parametrize("case", ["wrong kind", "below a file", "name too long", "read-only"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_output_location_is_one_line_and_exit_2_with_nothing_written(
        command, case, dataset, run_dir, tmp_path, read_only):
    out, expected = _case(case, command, tmp_path, read_only)
    before = tree(tmp_path), tree(dataset), tree(run_dir)
    res = invoke(*COMMANDS[command](dataset, run_dir, out))
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and "Traceback" not in res.output
    expected = (expected,) if isinstance(expected, str) else expected
    assert any(e in lines[0] for e in expected), lines[0]
    assert (tree(tmp_path), tree(dataset), tree(run_dir)) == before


def test_check_output_names_the_blocking_part_and_accepts_good_locations(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(DataError, match="dangling: a broken symbolic link is in the way"):
        files.check_output(tmp_path / "dangling" / "out")
    with pytest.raises(DataError, match="output folder exists and is not empty"):
        files.check_output(tmp_path, empty=True)
    with pytest.raises(DataError, match="the path is .* bytes long"):
        files.check_output(tmp_path.joinpath(*["d" * 200] * 30))
    # Absent (several levels), an existing folder, an existing file to replace: fine.
    assert files.check_output(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    files.check_output(tmp_path)
    files.check_output(tmp_path / "file", kind="file")
    assert tree(tmp_path) == ["dangling", "file"]


def test_temporary_names_fit_beside_a_name_of_the_longest_length(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "m" * (limit - len(".keras")) + ".keras"
    with files.atomic_path(tmp_path / name) as tmp:
        assert tmp.name.endswith(".keras") and len(tmp.name) <= limit
        tmp.write_bytes(b"model")
    with files.atomic_folder(tmp_path / ("f" * limit)) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [limit, limit]


class _FullDisk:
    """Makes the `n`-th call of `method` on `cls` write a partial file, then fail (ENOSPC)."""

    def __init__(self, monkeypatch, cls, method, n):
        self.calls, real = 0, getattr(cls, method)

        def flaky(obj, target, *args, **kwargs):
            self.calls += 1
            if self.calls == n:
                Path(target).write_bytes(b"partial")
                raise OSError(28, "No space left on device")
            return real(obj, target, *args, **kwargs)

        monkeypatch.setattr(cls, method, flaky)


def _only_whole_files(folder):
    """No temporary leftovers, and every PNG decodes."""
    names = [p.name for p in Path(folder).rglob("*")]
    assert not [n for n in names if n.startswith(".") or ".tmp" in n], names
    for png in Path(folder).rglob("*.png"):
        Image.open(png).load()


def test_predict_writes_each_mask_whole(dataset, run_dir, tmp_path, monkeypatch):
    _FullDisk(monkeypatch, Image.Image, "save", 3)
    out = tmp_path / "masks"
    res = invoke("predict", run_dir, dataset / "ISIC2018_Task1-2_Training_Input", "--out", out)
    assert isinstance(res.exception, OSError)
    assert len(list(out.iterdir())) == 2  # the masks before the failure, whole
    _only_whole_files(out)


def test_evaluate_writes_its_files_whole(dataset, run_dir, tmp_path, monkeypatch):
    _FullDisk(monkeypatch, pd.DataFrame, "to_csv", 1)
    out = tmp_path / "eval"
    res = invoke("evaluate", run_dir, "--data", dataset, "--out", out, "--report")
    assert isinstance(res.exception, OSError)
    # The report's panels were written (whole); no per_image.csv, half or whole.
    assert not (out / "per_image.csv").exists() and not (out / "summary.json").exists()
    assert len(list((out / "report").iterdir())) == 8
    _only_whole_files(out)


def test_export_builds_the_savedmodel_under_a_temporary_name(run_dir, tmp_path, monkeypatch):
    from lesionkeras import export

    def half_written(model, path, *args, **kwargs):
        Path(path, "saved_model.pb").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_savedmodel", half_written)
    res = invoke("export", run_dir, "--out", tmp_path / "exports" / "1")
    assert isinstance(res.exception, OSError)
    assert tree(tmp_path) == ["exports"]


def test_lr_find_writes_its_files_whole(dataset, tmp_path, monkeypatch):
    from lesionkeras.training import lr_find

    def fake_test(model, ds, **kwargs):
        lrs = np.geomspace(1e-4, 1.0, 8)
        losses = np.linspace(1.0, 0.5, 8)
        return lr_find.LRFindResult(lrs, losses, losses, 1e-2, False)

    monkeypatch.setattr(lr_find, "lr_range_test", fake_test)
    _FullDisk(monkeypatch, Image.Image, "save", 1)
    out = tmp_path / "lr"
    res = invoke("lr-find", "--data", dataset, "--out", out, *TINY)
    assert isinstance(res.exception, OSError)
    assert tree(out) == ["lr_find.csv"]
    assert len(pd.read_csv(out / "lr_find.csv")) == 8


def test_drop_labels_writes_both_files_or_neither(dataset, tmp_path, monkeypatch):
    _FullDisk(monkeypatch, pd.DataFrame, "to_csv", 2)  # dropped.csv, after manifest.csv
    res = invoke("data", "drop-labels", "--alpha", 0.5, "--in", dataset,
                 "--out", tmp_path / "dropped")
    assert isinstance(res.exception, OSError)
    assert tree(tmp_path) == []
    monkeypatch.undo()
    res = invoke("data", "drop-labels", "--alpha", 0.5, "--in", dataset,
                 "--out", tmp_path / "dropped")
    assert res.exit_code == 0, res.output
    assert tree(tmp_path / "dropped") == ["dropped.csv", "manifest.csv"]
    manifest = pd.read_csv(tmp_path / "dropped" / "manifest.csv")
    # Paths relative to the output folder (written from its temporary sibling).
    assert (tmp_path / "dropped" / manifest["image"][0]).resolve().is_file()
    assert json.loads(json.dumps(list(manifest.columns)))[0] == "id"
