"""Exact resume: an epoch's randomness depends on the seed and the epoch only."""

import shutil

import numpy as np
import pandas as pd
import pytest

import keras

from _helpers import InterruptAfter
from lesionkeras import config as config_lib
from lesionkeras.config_tables import AugmentConfig
from lesionkeras.data import epochs, pipeline
from lesionkeras.training import run as run_lib
from test_pipeline import files as image_mask_files

ALL_AUGMENTATIONS = AugmentConfig(flip=True, rotate90=True, rotation=20.0, zoom=0.1,
                                  brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)


def _batches(ds):
    return [tuple(np.asarray(t) for t in batch) for batch in ds]


def _same(a, b):
    return len(a) == len(b) and all(
        np.array_equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))


@pytest.fixture
def pairs(tmp_path):
    """Six 40x48 image/mask pairs (the manifest of test_pipeline's `files`)."""
    return image_mask_files.__wrapped__(tmp_path)


@pytest.mark.parametrize("repeat", [False, True])
def test_training_batches_depend_on_the_seed_and_the_epoch_only(pairs, repeat):
    """Order, crops and every augmentation: the same for the same epoch, whatever
    ran before and in whichever dataset object (a resumed process builds its own);
    different from one epoch to the next and from one seed to another."""
    decoded = pipeline.decoded_dataset(pairs, 24)

    def dataset(seed=3):
        ds = pipeline.make_dataset(decoded, batch_size=2, mean=(0, 0, 0), std=(1, 1, 1),
                                   training=True, augment=ALL_AUGMENTATIONS, crop_size=16,
                                   seed=seed, repeat=repeat)
        return ds.take(5) if repeat else ds

    first = dataset()
    epochs.set_epoch(1)
    one = _batches(first)
    assert len(one) == 3 if not repeat else len(one) == 5
    epochs.set_epoch(2)
    two = _batches(first)
    epochs.set_epoch(1)
    again = _batches(first)
    resumed = _batches(dataset())  # a new process at epoch 1
    other_seed = _batches(dataset(seed=4))
    assert _same(one, again) and _same(one, resumed)
    assert not _same(one, two) and not _same(one, other_seed)
    # The masks still match their images: a geometric change moves both.
    assert {tuple(np.unique(b[1])) for b in one} <= {(0.0,), (1.0,), (0.0, 1.0)}


def test_classify_batches_depend_on_the_epoch_only(pairs):
    from lesionkeras.classify import data as cdata

    paths = [str(p) for p in pairs["image"][:5]]

    def dataset():
        return cdata.make_dataset(paths, np.arange(5) % 2, resize=(24, 20), crop=16,
                                  batch_size=2, training=True, seed=1)

    epochs.set_epoch(3)
    three = _batches(dataset())
    epochs.set_epoch(4)
    four = _batches(dataset())
    epochs.set_epoch(3)
    assert _same(three, _batches(dataset())) and not _same(three, four)


def _cfg(tmp_path, out, **extra):
    over = {"data.limit": 16, "data.image_size": 40, "data.crop_size": 32, "model.filters": 8,
            "model.depth": 2, "model.dropout": 0.3, "train.batch_size": 4, "train.epochs": 3,
            "train.progress": False, "train.image_every": 0, "seed": 3,
            "augment.rotation": 20.0, "augment.brightness": 0.2, "out": str(tmp_path / out)}
    over.update(extra)
    return config_lib.load_config(None, over)


def _interrupted_then_resumed(tmp_path, after_epoch, **extra):
    """(uninterrupted run, run interrupted after `after_epoch` then resumed) folders."""
    run_lib.fit(_cfg(tmp_path, "straight", **extra), verbose=0)
    with pytest.raises(KeyboardInterrupt):
        run_lib.fit(_cfg(tmp_path, "resumed", **extra), verbose=0,
                    extra_callbacks=[InterruptAfter(after_epoch)])
    keras.backend.clear_session()
    run = tmp_path / "resumed"
    run_lib.fit(run_lib.load_run_config(run), resume_dir=run, verbose=0)
    return tmp_path / "straight", run


def _assert_same_run(straight, resumed):
    got = keras.saving.load_model(resumed / "last.keras").get_weights()
    want = keras.saving.load_model(straight / "last.keras").get_weights()
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, want)) <= 1e-6
    a, b = pd.read_csv(straight / "history.csv"), pd.read_csv(resumed / "history.csv")
    assert list(a.columns) == list(b.columns) and list(b["epoch"]) == list(range(len(a)))
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def baseline_pair(tmp_path_factory):
    """A baseline run (crops, augmentation, dropout) straight through, and the same run
    interrupted after its first epoch and resumed: their folders."""
    return _interrupted_then_resumed(tmp_path_factory.mktemp("pair"), after_epoch=0)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(baseline_pair):
    """Random crops, augmentation, shuffling and dropout all continue as if the run
    had never stopped (CPU, same seed): weights and every history value to 1e-6."""
    _assert_same_run(*baseline_pair)


@pytest.mark.slow
def test_resume_is_exact_across_stages(tmp_path):
    """SMILEr: the relabelling rounds are stages, each set up on the state the one
    before ended with; interrupted at the first round's end and resumed, the run
    ends as the uninterrupted one. (The clean stream of `meta` is a repeating
    stream, covered by the batch test above.)"""
    _assert_same_run(*_interrupted_then_resumed(
        tmp_path, after_epoch=1, method="smile", **{
            "model.name": "unet", "smile.relabel_rounds": 2, "smile.relabel_epochs": 1,
            "train.epochs": 1, "data.crop_size": 0, "data.image_size": 32, "data.limit": 12}))


def test_a_resume_the_saved_state_does_not_fit_changes_nothing(baseline_pair, tmp_path):
    """The backup is checked against the model the resume builds before `config.toml`
    takes the resume's overrides: a mismatch is one line, exit 2, no file changed."""
    from click.testing import CliRunner

    from lesionkeras.cli import main
    from lesionkeras.training import callbacks

    run = tmp_path / "run"
    shutil.copytree(baseline_pair[0], run)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    other.save_weights(callbacks.backup_weights(run / "backup"))  # another network's state

    def contents():
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = contents()
    res = CliRunner().invoke(main, ["fit", "--resume", str(run), "--epochs", "4", "--lr", "0.5"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {run}: cannot resume with these settings: the saved training state does not fit")
    assert contents() == before
