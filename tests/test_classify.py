"""ISIC 2018 Task 3: triplet mining, nearest class mean, balanced accuracy, data, CLI, learning."""

import csv
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import cli
from lesionkeras.classify import data as cdata
from lesionkeras.classify import metrics as cmetrics
from lesionkeras.classify import triplet
from lesionkeras.errors import ConfigError, DataError
from _helpers import tiny_classify_config

# Hand-made batch: class 0 (minority) = rows 0, 1; class 1 (majority) = rows 2, 3, 4.
EMB = np.array([[0, 0], [1, 0], [0, 2], [2, 0], [0, -1.5]], np.float32)
LABELS = np.array([0, 0, 1, 1, 1])


def test_pairwise_distances_golden():
    d = keras.ops.convert_to_numpy(triplet.pairwise_squared_distances(EMB))
    assert d[0, 1] == pytest.approx(1.0) and d[1, 3] == pytest.approx(1.0)
    assert d[0, 4] == pytest.approx(2.25) and d[1, 2] == pytest.approx(5.0)
    np.testing.assert_allclose(np.diag(d), 0.0, atol=1e-6)


def test_hardest_negative_mining_picks_the_closest_majority_sample():
    d = triplet.pairwise_squared_distances(EMB)
    positive, negative = triplet.triplet_masks(LABELS, majority=1)
    index, has = triplet.hardest_negatives(d, negative)
    index, has = keras.ops.convert_to_numpy(index), keras.ops.convert_to_numpy(has)
    # Anchor 0: negatives at 4, 4, 2.25 -> row 4; anchor 1: 5, 1, 3.25 -> row 3.
    assert index[0] == 4 and index[1] == 3
    # Majority samples never anchor.
    assert has.tolist() == [True, True, False, False, False]
    pos = keras.ops.convert_to_numpy(positive)
    assert pos.sum() == 2 and pos[0, 1] and pos[1, 0]


def test_other_negatives_lets_every_class_anchor():
    positive, negative = triplet.triplet_masks(LABELS, negatives="other")
    pos, neg = keras.ops.convert_to_numpy(positive), keras.ops.convert_to_numpy(negative)
    assert pos.sum() == 2 + 6 and neg[2, 0] and not neg[2, 3]


def test_triplet_loss_golden_value():
    # (0, 1): 1 + 0.5 - 2.25 < 0 -> 0; (1, 0): 1 + 0.5 - 1 = 0.5; mean over 2 triplets.
    loss, count = triplet.triplet_loss(EMB, LABELS, margin=0.5, majority=1, normalize=False)
    assert float(loss) == pytest.approx(0.25) and float(count) == 2


def test_triplet_loss_without_valid_triplets_is_zero_and_bad_options_raise():
    loss, count = triplet.triplet_loss(EMB, np.ones(5, int), majority=1, normalize=False)
    assert float(loss) == 0.0 and float(count) == 0
    with pytest.raises(ValueError, match="negatives"):
        triplet.triplet_masks(LABELS, 1, negatives="hard")
    with pytest.raises(ValueError, match="majority"):
        triplet.triplet_masks(LABELS, None, negatives="majority")


def test_nearest_class_mean_on_a_toy_embedding():
    refs = np.array([[0, 0], [0, 2], [10, 0]], np.float32)
    ref_labels = np.array([0, 0, 1])
    queries = np.array([[0, 1], [6, 0]], np.float32)
    d = keras.ops.convert_to_numpy(
        triplet.nearest_class_mean_distances(queries, refs, ref_labels, 3))
    np.testing.assert_allclose(d[0, :2], [1.0, np.sqrt(101)], rtol=1e-5)
    np.testing.assert_allclose(d[1, :2], [(6 + np.sqrt(40)) / 2, 4.0], rtol=1e-5)
    assert np.isinf(d[:, 2]).all()  # class 2 has no reference
    assert d.argmin(axis=1).tolist() == [0, 1]


def test_balanced_accuracy_golden_and_streaming_metric():
    y_true, y_pred = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 0, 2]
    expected = (2 / 3 + 1 / 2 + 1) / 3
    assert cmetrics.balanced_accuracy(y_true, y_pred, 3) == pytest.approx(expected)
    report = cmetrics.classification_report(y_true, y_pred, ("a", "b", "c"))
    assert report["recall_b"] == pytest.approx(0.5) and report["precision_a"] == pytest.approx(2 / 3)
    assert report["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    metric = cmetrics.BalancedAccuracy(4)  # class 3 never occurs: left out of the mean
    metric.update_state(np.array(y_true[:3]), keras.ops.one_hot(np.array(y_pred[:3]), 4))
    metric.update_state(np.array(y_true[3:]), keras.ops.one_hot(np.array(y_pred[3:]), 4))
    assert float(metric.result()) == pytest.approx(expected)
    with pytest.raises(ValueError, match="same length"):
        cmetrics.confusion_matrix([0, 1], [0], 2)


def test_confusion_files(tmp_path):
    csv_path, png = cmetrics.write_confusion([[3, 1], [0, 2]], ("MEL", "OTHER"), tmp_path)
    rows = list(csv.reader(open(csv_path)))
    assert rows == [["true\\predicted", "MEL", "OTHER"], ["MEL", "3", "1"], ["OTHER", "0", "2"]]
    assert Image.open(png).size[0] > 50


def _images(folder, ids, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in ids:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


@pytest.mark.parametrize(
    "header, rows, classes, names",
    [
        (["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"],
         [["ISIC_0000000", 1, 0, 0, 0, 0, 0, 0], ["ISIC_0000001", 0, 0, 0, 0, 0, 0, 1]],
         ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"), ["MEL", "VASC"]),
        (["lesion_id", "image_id", "dx"], [["L1", "ISIC_0000000", "nv"], ["L2", "ISIC_0000001", "df"]],
         ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"), ["NV", "DF"]),
        (["image_id", "melanoma"], [["ISIC_0000000", "1.0"], ["ISIC_0000001", "0.0"]],
         ("MEL", "OTHER"), ["MEL", "OTHER"]),
        (["image_id", "melanoma", "seborrheic_keratosis"],
         [["ISIC_0000000", "0.0", "1.0"], ["ISIC_0000001", "0.0", "0.0"]],
         ("MEL", "NV", "BKL"), ["BKL", "NV"]),
    ],
)
def test_label_formats(tmp_path, header, rows, classes, names):
    _images(tmp_path / "imgs", ["ISIC_0000000", "ISIC_0000001"])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    df, got = cdata.load_classification(str(tmp_path))
    assert got == classes and df["diagnosis"].tolist() == names
    assert [got[i] for i in df["label"]] == names


@pytest.mark.parametrize(
    "text, message",
    [
        ("image_id,dx\nISIC_0000000,xyz\n", "unknown class 'xyz'"),
        ("image_id,melanoma\nISIC_0000000,maybe\n", "`melanoma` must be a number"),
        ("image_id,melanoma\nISIC_0000009,1\n", "1 labelled images not found"),
        ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0000000,1,1,0,0,0,0,0\n", "exactly one class"),
    ],
)
def test_bad_labels_name_the_file(tmp_path, text, message):
    _images(tmp_path / "imgs", ["ISIC_0000000"])
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=message) as info:
        cdata.load_classification(str(tmp_path / "labels.csv"))
    assert "labels.csv" in str(info.value)


def test_stratified_split_keeps_every_class_in_validation():
    import pandas as pd

    df = pd.DataFrame({"id": [str(i) for i in range(12)], "label": [0] * 9 + [1] * 3})
    out = cdata.stratified_split(df, 0.25, seed=1)
    val = out[out["split"] == "val"]
    assert sorted(val["label"].tolist()) == [0, 0, 1]


def test_config_task_method_pairs():
    from lesionkeras import config as config_lib

    cfg = config_lib.load_config(None, {"task": "classify", "method": "softmax"})
    assert cfg.task == "classify"
    with pytest.raises(ConfigError, match="needs `method`"):
        config_lib.load_config(None, {"task": "classify", "method": "baseline"})
    with pytest.raises(ConfigError, match="needs `method`"):
        config_lib.load_config(None, {"method": "triplet"})  # task segment
    with pytest.raises(ConfigError, match="classify.crop"):
        config_lib.load_config(None, {"task": "classify", "method": "triplet",
                                      "classify.crop": 300})
    cfg = config_lib.load_config("configs/classify_triplet_isic2018.toml")
    assert (cfg.task, cfg.method, cfg.classify.backbone, cfg.train.optimizer) == (
        "classify", "triplet", "resnet101", "sgd")
    assert (cfg.classify.resize_width, cfg.classify.resize_height, cfg.classify.crop) == (360, 270, 256)


TINY = [
    "--data", "synthetic", "--epochs", "1", "--batch-size", "8", "--lr", "0.01",
    "--no-progress",
]


@pytest.mark.slow
def test_cli_classify_fit_evaluate_predict(tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(cli.main, ["fit", "--task", "classify", "--method", "triplet",
                                      "--config", tiny_classify_config(tmp_path), "--out", str(run), *TINY])
    assert result.exit_code == 0, result.output
    assert "balanced_accuracy" in result.output
    for name in ("model.keras", "last.keras", "classes.json", "references.npz", "history.csv",
                 "confusion.csv", "confusion.png"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["predict_by"] == "nearest_mean" and 0.0 <= metrics["balanced_accuracy"] <= 1.0
    assert "task = \"classify\"" in (run / "config.toml").read_text()
    refs = np.load(run / "references.npz")
    assert refs["embeddings"].shape[1] == 256
    np.testing.assert_allclose(np.linalg.norm(refs["embeddings"], axis=1), 1.0, rtol=1e-4)
    assert np.bincount(refs["labels"]).max() <= 3

    result = runner.invoke(cli.main, ["evaluate", str(run), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "balanced accuracy" in result.output and "VASC" in result.output
    assert (tmp_path / "ev" / "confusion.png").exists()
    per_image = list(csv.DictReader(open(tmp_path / "ev" / "per_image.csv")))
    assert len(per_image) == 40

    from lesionkeras.data import synthetic

    images = synthetic.cached_dataset(40, 40, 0) / "ISIC2018_Task1-2_Training_Input"
    result = runner.invoke(cli.main, ["predict", str(run), str(images), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(open(tmp_path / "p" / "predictions.csv")))
    assert rows[0] == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert len(rows) == 41
    assert sum(float(v) for v in rows[1][1:]) == pytest.approx(1.0, abs=1e-4)


def test_cli_bad_label_csv_is_one_line_exit_2(tmp_path):
    _images(tmp_path / "imgs", ["ISIC_0000000"])
    (tmp_path / "labels.csv").write_text("image_id,dx\nISIC_0000000,blue\n")
    result = CliRunner().invoke(cli.main, [
        "fit", "--task", "classify", "--method", "softmax", "--data", str(tmp_path / "labels.csv"),
        "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "labels.csv" in result.output
    assert "unknown class 'blue'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli.main, ["fit", "--task", "classify", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "triplet, softmax" in result.output


@pytest.mark.slow
def test_learning_beats_majority_and_triplet_does_not_hurt(tmp_path):
    """Tiny CNN in the TripletTrainer: synthetic melanoma vs the rest (ISIC 2017 CSV), 32 px.

    Majority-class prediction scores a balanced accuracy of 0.5. As in the ISIC 2018
    report, the CE-only model predicts by softmax and the CE + triplet model (joint,
    weight 0.3) by the nearest class mean of its training embeddings; both see the
    same data, seeds and steps, averaged over two seeds.
    """
    from keras import layers

    from lesionkeras.classify.runner import embed
    from lesionkeras.classify.triplet import nearest_class_mean_distances
    from lesionkeras.data import synthetic
    from lesionkeras.methods.triplet import TripletTrainer

    root = synthetic.cached_dataset(400, 40, 0)
    one_hot = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    rows = list(csv.DictReader(open(one_hot)))
    (tmp_path / "classes.csv").write_text(
        "image_id,melanoma\n" + "".join(f"{r['image']},{r['MEL']}\n" for r in rows))
    df, classes = cdata.load_classification(str(tmp_path / "classes.csv"), images=str(root))
    assert classes == ("MEL", "OTHER")
    df = cdata.stratified_split(df, 0.3, 0)
    train, val = df[df["split"] == "train"], df[df["split"] == "val"]

    def batches(part, training, seed):
        return cdata.make_dataset(part["image"].tolist(), part["label"].to_numpy(),
                                  resize=(36, 36), crop=32, batch_size=32, training=training,
                                  seed=seed)

    def images(part):
        return batches(part, False, 0).map(lambda x, y: x)

    def network():
        inputs = keras.Input((32, 32, 3))
        x = inputs
        for filters in (16, 32, 64):
            x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
            x = layers.MaxPooling2D()(x)
        emb = layers.Dense(32, name="embedding")(layers.GlobalAveragePooling2D()(x))
        return keras.Model(inputs, {"embedding": emb, "logits": layers.Dense(len(classes))(emb)})

    majority = int(np.bincount(train["label"]).argmax())
    scores = {False: [], True: []}
    for seed in (0, 1):
        for use_triplet in (False, True):
            keras.utils.set_random_seed(seed)
            model = TripletTrainer(network(), len(classes), majority, use_triplet=use_triplet,
                                   mode="joint", triplet_weight=0.3)
            model.compile(optimizer=keras.optimizers.Adam(0.003), jit_compile=False)
            history = model.fit(batches(train, True, seed), epochs=20, verbose=0, shuffle=False)
            assert np.isfinite(history.history["loss"]).all()
            if use_triplet:
                assert history.history["triplets"][-1] > 0
                refs = embed(model.network, images(train), True)
                pred = keras.ops.convert_to_numpy(nearest_class_mean_distances(
                    embed(model.network, images(val), True), refs, train["label"].to_numpy(),
                    2)).argmin(axis=1)
            else:
                pred = np.concatenate(
                    [model.network(x)["logits"].numpy() for x in images(val)]).argmax(1)
            scores[use_triplet].append(cmetrics.balanced_accuracy(val["label"], pred, 2))
    softmax, with_triplet = np.mean(scores[False]), np.mean(scores[True])
    assert softmax > 0.5 + 0.2, scores
    assert with_triplet > softmax - 0.05, scores


def test_cli_corrupt_image_is_named_exit_2(tmp_path):
    _images(tmp_path / "imgs", ["ISIC_0000000", "ISIC_0000001"])
    (tmp_path / "imgs" / "ISIC_0000001.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "labels.csv").write_text("image_id,melanoma\nISIC_0000000,1\nISIC_0000001,0\n")
    result = CliRunner().invoke(cli.main, [
        "fit", "--task", "classify", "--method", "triplet", "--data", str(tmp_path / "labels.csv"),
        "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "ISIC_0000001.jpg" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def _tiny_network(k=3):
    from keras import layers

    inputs = keras.Input((8, 8, 3))
    emb = layers.Dense(4, name="embedding")(layers.GlobalAveragePooling2D()(inputs))
    return keras.Model(inputs, {"embedding": emb, "logits": layers.Dense(k)(emb)})


def test_alternation_schedule():
    from lesionkeras.methods.triplet import TripletEpochs, TripletTrainer

    model = TripletTrainer(_tiny_network(), 3, 0, mode="alternate_batch", every=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    shares = []
    for step in range(6):
        model.optimizer.iterations.assign(step)
        shares.append(float(model.triplet_share()))
    assert shares == [0, 0, 1, 0, 0, 1]  # CE, CE, triplet, ...
    model = TripletTrainer(_tiny_network(), 3, 0, mode="alternate_epoch", every=2)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    callback = TripletEpochs(2)
    callback.set_model(model)
    seen = []
    for epoch in range(4):
        callback.on_epoch_begin(epoch)
        seen.append(float(model.triplet_share()))
    assert seen == [0, 1, 0, 1]
    softmax = TripletTrainer(_tiny_network(), 3, 0, use_triplet=False)
    softmax.compile(optimizer=keras.optimizers.SGD(0.1))
    assert float(softmax.triplet_share()) == 0.0
    with pytest.raises(ValueError, match="mode"):
        TripletTrainer(_tiny_network(), 3, 0, mode="sometimes")


def test_triplet_step_moves_only_the_embedding_and_backbone():
    """A triplet step gives the classifier no gradient; a CE step does."""
    from lesionkeras.methods.triplet import TripletTrainer

    keras.utils.set_random_seed(0)
    model = TripletTrainer(_tiny_network(2), 2, 1, mode="alternate_batch", every=2, margin=1.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 3)).astype(np.float32)
    y = np.array([0, 0, 0, 1, 1, 1])
    logits_layer = model.network.layers[-1]
    before = [w.numpy().copy() for w in logits_layer.weights]
    model.train_on_batch(x, y)  # step 0: cross-entropy
    after_ce = [w.numpy().copy() for w in logits_layer.weights]
    assert any(not np.allclose(a, b) for a, b in zip(before, after_ce))
    model.train_on_batch(x, y)  # step 1: triplet
    after_triplet = [w.numpy() for w in logits_layer.weights]
    assert all(np.allclose(a, b) for a, b in zip(after_ce, after_triplet))
