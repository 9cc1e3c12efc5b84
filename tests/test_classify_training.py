"""ISIC 2018 Tasks 2 and 3 training: offline triplets, resume, distribution, registry."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from lesionkeras import cli
from lesionkeras import config as config_lib
from lesionkeras.classify import triplet
from lesionkeras.models import registry
from _helpers import InterruptAfter, fit_on_two_cpus, tiny_classify_config

# Hand-made embedding: class 0 (minority) = rows 0, 1; class 1 (majority) = rows 2, 3, 4;
# class 2 (minority) = rows 5, 6, 7.
EMB = np.array([[0, 0], [1, 0], [0, 2], [2, 0], [0, -1.5], [3, 1], [4, 2], [1, 4]], np.float32)
LABELS = np.array([0, 0, 1, 1, 1, 2, 2, 2])


def test_regenerated_triplets_pick_the_hardest_majority_negative():
    triplets, dist = triplet.regenerate_triplets(EMB, LABELS, majority=1, positives=4,
                                                 normalize=False, seed=0)
    by_anchor = {}
    for (a, p, n), d in zip(triplets.tolist(), dist.tolist()):
        by_anchor.setdefault(a, []).append((p, n, d))
    # Anchor 0: majority distances 2, 2, 1.5 -> row 4; anchor 1: sqrt 5, 1, sqrt 3.25 -> row 3.
    # Class 2: row 3 (2, 0) is nearest to 5 (sqrt 2) and 6 (sqrt 8); row 2 (0, 2) to 7 (sqrt 5).
    hardest = {0: (4, 1.5), 1: (3, 1.0), 5: (3, np.sqrt(2)), 6: (3, np.sqrt(8)),
               7: (2, np.sqrt(5))}
    assert sorted(by_anchor) == [0, 1, 5, 6, 7]  # the majority never anchors
    for anchor, rows in by_anchor.items():
        for p, n, d in rows:
            assert (n, pytest.approx(d, rel=1e-5)) == (hardest[anchor][0], hardest[anchor][1])
            assert LABELS[p] == LABELS[anchor] and p != anchor
        # min(positives, class size - 1) distinct positives per anchor.
        assert len({p for p, _, _ in rows}) == len(rows) == (1 if anchor < 2 else 2)
    assert len(triplets) == triplet.triplet_capacity(LABELS, 1, positives=4) == 8


def test_regenerated_triplets_are_seeded_and_other_negatives_cross_classes():
    rng = np.random.default_rng(0)
    emb, labels = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    a = triplet.regenerate_triplets(emb, labels, majority=0, positives=2, seed=[1, 4])[0]
    b = triplet.regenerate_triplets(emb, labels, majority=0, positives=2, seed=[1, 4])[0]
    c = triplet.regenerate_triplets(emb, labels, majority=0, positives=2, seed=[1, 5])[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:, 1], c[:, 1])  # positives redrawn, negatives the same
    np.testing.assert_array_equal(a[:, 2], c[:, 2])
    # Small blocks give the same triplets as one block.
    np.testing.assert_array_equal(
        a, triplet.regenerate_triplets(emb, labels, majority=0, positives=2, seed=[1, 4],
                                       block=3)[0])
    other, _ = triplet.regenerate_triplets(EMB, LABELS, negatives="other", normalize=False)
    assert set(other[:, 0]) == set(range(8))
    # Row 3 (2, 0) anchors too; its nearest other-class sample is row 1 (1, 0).
    assert set(other[other[:, 0] == 3, 2]) == {1}
    assert (LABELS[other[:, 2]] != LABELS[other[:, 0]]).all()
    with pytest.raises(ValueError, match="positives"):
        triplet.regenerate_triplets(EMB, LABELS, majority=1, positives=0)


def test_offline_triplet_loss_golden():
    a = np.array([[0, 0], [0, 0]], np.float32)
    p = np.array([[1, 0], [1, 0]], np.float32)
    n = np.array([[0, 2], [0, 1]], np.float32)
    # Hinges: 1 + 0.5 - 4 -> 0 and 1 + 0.5 - 1 = 0.5.
    loss, count = triplet.offline_triplet_loss(a, p, n, margin=0.5, normalize=False)
    assert float(loss) == pytest.approx(0.25) and float(count) == 2
    loss, count = triplet.offline_triplet_loss(a, p, n, margin=0.5, normalize=False,
                                               weights=np.array([0.0, 1.0]))
    assert float(loss) == pytest.approx(0.5) and float(count) == 1
    loss, count = triplet.offline_triplet_loss(a, p, n, weights=np.zeros(2), normalize=False)
    assert float(loss) == 0.0 and float(count) == 0


def _tiny_network(k=3):
    from keras import layers

    inputs = keras.Input((8, 8, 3))
    emb = layers.Dense(2, name="embedding")(layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, {"embedding": emb, "logits": layers.Dense(k)(emb)})


def test_regeneration_callback_saves_restores_and_keeps_the_set_between_regenerations(tmp_path):
    from lesionkeras.methods.triplet import RegenerateTriplets, TripletTable, TripletTrainer

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    images = [x[:5], x[5:]]  # two batches
    model = TripletTrainer(_tiny_network(), 3, 1)
    state = tmp_path / "backup" / "triplets.npz"
    lines = []
    table = TripletTable(triplet.triplet_capacity(LABELS, 1))
    cb = RegenerateTriplets(2, images, LABELS, table, majority=1, seed=3, state=state,
                            log=lines.append)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_begin(0)
    emb = model.network(x)["embedding"].numpy()
    expected, dist = triplet.regenerate_triplets(emb, LABELS, 1, seed=[3, 0])
    np.testing.assert_array_equal(table.numpy(), expected)
    assert int(table.count.numpy()) == 8 and state.exists()
    assert lines == [f"epoch 1: regenerated 8 triplets of 8 training images (mean "
                     f"anchor-negative distance {dist.mean():.4f})"]
    logs = {}
    cb.on_epoch_end(0, logs)
    assert logs["regenerated_triplets"] == 8.0
    assert logs["anchor_negative_distance"] == pytest.approx(dist.mean())

    # A resumed run (new table, new callback) starts at epoch 1: it reuses the saved set.
    fresh = TripletTable(table.capacity)
    resumed = RegenerateTriplets(2, images, LABELS, fresh, majority=1, seed=3, state=state,
                                 log=lines.append)
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.on_epoch_begin(1)
    np.testing.assert_array_equal(fresh.numpy(), expected)
    assert len(lines) == 1
    resumed.on_epoch_begin(2)  # the next regeneration
    assert len(lines) == 2 and lines[1].startswith("epoch 3: regenerated 8 triplets")


def test_offline_batches_read_the_table_and_train_the_triplet_loss(tmp_path):
    """A training step on `{"image", "triplets", "triplet_valid"}` batches from the table."""
    import tensorflow as tf
    from PIL import Image

    from lesionkeras.classify import data as cdata
    from lesionkeras.methods.triplet import TripletTable, TripletTrainer

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"ISIC_{i:07d}.png"
        Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    table = TripletTable(4)
    ds = cdata.make_triplet_dataset(paths, table.triplets, table.count, resize=(12, 10), crop=8,
                                    triplets_per_batch=2, seed=0)
    images, valid = next(iter(ds))
    assert images.shape == (2, 3, 8, 8, 3) and valid.numpy().tolist() == [0.0, 0.0]
    table.set([[0, 1, 5], [2, 3, 4]])
    images, valid = next(iter(ds))
    assert valid.numpy().tolist() == [1.0, 1.0]

    keras.utils.set_random_seed(0)
    model = TripletTrainer(_tiny_network(2), 2, 1, mode="joint", margin=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    # The triplet term is the offline loss of each triplet's three embeddings (before the step).
    emb = model.network(tf.reshape(images, (-1, 8, 8, 3)))["embedding"].numpy().reshape(2, 3, -1)
    expected, _ = triplet.offline_triplet_loss(emb[:, 0], emb[:, 1], emb[:, 2], margin=1.0)
    x = tf.zeros((4, 8, 8, 3))
    batch = ({"image": x, "triplets": images, "triplet_valid": valid}, tf.constant([0, 0, 1, 1]))
    logs = model.train_on_batch(*batch, return_dict=True)
    assert logs["triplets"] == 2.0 and float(expected) > 0
    assert logs["triplet"] == pytest.approx(float(expected), rel=1e-5)
    assert logs["loss"] == pytest.approx(logs["ce"] + logs["triplet"], rel=1e-5)
    # Validation batches are plain images: online mining.
    assert np.isfinite(model.test_on_batch(x, tf.constant([0, 0, 1, 1]), return_dict=True)["loss"])


TINY = ["--data", "synthetic", "--batch-size", "8", "--lr", "0.01", "--no-progress"]


def _weights(path):
    return [np.asarray(w) for w in keras.saving.load_model(path).get_weights()]


@pytest.mark.slow
def test_cli_classify_resume_continues_the_epochs(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.main, ["fit", "--task", "classify", "--method", "triplet",
                                      "--config", tiny_classify_config(tmp_path), "--out", str(run),
                                      "--epochs", "2", *TINY])
    assert result.exit_code == 0, result.output
    last, best = _weights(run / "last.keras"), _weights(run / "model.keras")
    before = pd.read_csv(run / "history.csv")
    assert list(before["epoch"]) == [0, 1]

    result = runner.invoke(cli.main, ["fit", "--resume", str(run), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2]  # continued, not 1 + 3
    pd.testing.assert_frame_equal(hist.iloc[:2], before)
    assert config_lib.load_config(run / "config.toml").train.epochs == 3
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3
    after = _weights(run / "last.keras")
    assert any(not np.allclose(a, b) for a, b in zip(last, after))
    # The best checkpoint survives unless epoch 3 beat the best of epochs 1-2.
    scores = hist["val_balanced_accuracy"].to_numpy()
    same = all(np.array_equal(a, b) for a, b in zip(best, _weights(run / "model.keras")))
    assert same == (scores[2] <= scores[:2].max())

    # Keys that fix the data or the network cannot change on resume.
    result = runner.invoke(cli.main, ["fit", "--resume", str(run), "--seed", "7"])
    assert result.exit_code == 2 and "seed = 0" in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output


class _StartState(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.iterations = int(self.model.optimizer.iterations.numpy())
        self.weights = [w.numpy().copy() for w in self.model.network.weights]


@pytest.mark.slow
def test_attributes_resume_restores_optimizer_and_epoch(tmp_path):
    from lesionkeras.training import run as run_lib

    cfg = config_lib.load_config(None, {
        "task": "attributes", "method": "multitask", "out": str(tmp_path / "run"),
        "data.synthetic_count": 16, "data.image_size": 32, "data.val_fraction": 0.25,
        "model.encoder_filters": 4, "model.filters": 4, "train.batch_size": 4,
        "train.epochs": 3, "train.progress": False, "seed": 2,
    })
    with pytest.raises(KeyboardInterrupt):
        run_lib.fit(cfg, verbose=0, log=lambda line: None, extra_callbacks=[InterruptAfter(0)])
    run = tmp_path / "run"
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0]
    saved = _weights(run / "last.keras")
    start = _StartState()
    result = run_lib.fit(run_lib.load_run_config(run), resume_dir=run, verbose=0,
                         log=lambda line: None, extra_callbacks=[start])
    assert result.epochs_run == 2  # epochs 2 and 3 only
    assert start.iterations == 3  # 12 training images, batch 4: one epoch's steps
    for a, b in zip(saved, start.weights):
        np.testing.assert_array_equal(a, b)
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == [0, 1, 2] and result.metrics["epochs"] == 3
    assert np.isfinite(hist["loss"]).all()


@pytest.mark.slow
def test_cli_regenerated_triplets_train_with_a_finite_loss(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli.main, [
        "fit", "--task", "classify", "--method", "triplet", "--out", str(run), "--epochs", "2",
        "--config", tiny_classify_config(tmp_path, "regenerate_every = 1\n"), *TINY])
    assert result.exit_code == 0, result.output
    assert "triplets regenerated every 1 epochs" in result.output
    # 30 training images; minority classes anchor min(4, n - 1) positives each.
    assert result.output.count("regenerated 58 triplets of 30 training images") == 2
    hist = pd.read_csv(run / "history.csv")
    assert np.isfinite(hist["loss"]).all() and np.isfinite(hist["triplet"]).all()
    assert (hist["regenerated_triplets"] == 58).all() and (hist["triplets"] == 2).all()
    assert np.isfinite(hist["anchor_negative_distance"]).all()
    saved = np.load(run / "backup" / "triplets.npz")
    assert int(saved["epoch"]) == 1 and saved["triplets"].shape == (58, 3)


@pytest.mark.slow
def test_classify_under_mirrored_strategy_on_two_logical_cpus(tmp_path):
    # A process of its own: logical devices are set before TensorFlow starts, and
    # collective keys of several MirroredStrategy objects in one process collide.
    run = tmp_path / "run"
    args = ["--task", "classify", "--method", "triplet", "--config", tiny_classify_config(tmp_path),
            "--out", str(run), "--epochs", "1", "--strategy", "mirrored", *TINY]
    res = fit_on_two_cpus(args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MirroredStrategy with 2 replica(s)" in res.stdout
    hist = pd.read_csv(run / "history.csv")
    assert np.isfinite(hist["loss"]).all() and 0 <= hist["val_balanced_accuracy"].iloc[0] <= 1
    assert (run / "model.keras").exists() and (run / "references.npz").exists()


def test_task_models_are_registered_and_model_flag_is_checked(tmp_path):
    assert {"resnet_classifier", "attribute_net"} <= set(registry.names())
    assert registry.names("classify") == ("resnet_classifier",)
    assert registry.names("attributes") == ("attribute_net",)
    assert "resnet_classifier" not in registry.names("segment")
    net = registry.build("resnet_classifier", input_shape=(32, 32, 3), num_classes=2,
                         backbone="resnet18", embedding_dim=8)
    out = net(np.zeros((1, 32, 32, 3), np.float32))
    assert out["embedding"].shape == (1, 8) and out["logits"].shape == (1, 2)
    result = CliRunner().invoke(cli.main, ["fit", "--task", "classify", "--method", "softmax",
                                           "--model", "unet", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "resnet_classifier" in result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "r").exists()
