"""SavedModel and TFLite export: signatures, bytes input, parity check, CLI exit codes."""

import base64
import io
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import export
from lesionkeras.cli import main
from lesionkeras.inference.evaluate import evaluate, list_images
from lesionkeras.inference.loading import TFLiteRunner, load_predictor
from lesionkeras.inference.predict import predict
from lesionkeras.models import registry

SIZE = 32
MEAN, STD = (120.0, 110.0, 100.0), (50.0, 45.0, 40.0)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a tiny untrained U-Net and its config."""
    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    model = registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=4, depth=2)
    model.save(run / "model.keras")
    config_lib.load_config(overrides={
        "method": "baseline", "data.image_size": SIZE, "model.filters": 4, "model.depth": 2,
        "data.mean": list(MEAN), "data.std": list(STD), "train.threshold": 0.4,
    }).save(run / "config.toml")
    keras.backend.clear_session()
    return run


@pytest.fixture(scope="module")
def saved_model(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lesion" / "1"
    result = export.export_model(run_dir, out)
    return result


def _encoded(image, fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.slow
def test_savedmodel_signatures_and_metadata(saved_model):
    assert saved_model.max_abs_diff <= 1e-4 and saved_model.dice == 1.0
    loaded = tf.saved_model.load(str(saved_model.path))
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}

    default = loaded.signatures["serving_default"]
    (spec,) = default.structured_input_signature[1].values()
    assert spec.name == "images" and spec.dtype == tf.float32
    assert spec.shape.as_list() == [None, SIZE, SIZE, 3]
    outs = default.structured_outputs
    assert outs["probabilities"].dtype == tf.float32 and outs["mask"].dtype == tf.uint8

    raw = loaded.signatures["serving_bytes"].structured_input_signature[1]
    assert raw["image_bytes"].dtype == tf.string and raw["image_bytes"].shape.rank == 0

    # Any batch size; probabilities in [0, 1]; the mask uses the run's threshold.
    images = export.parity_images(SIZE, 3, seed=5).astype(np.float32)
    res = default(images=tf.constant(images))
    probs, mask = res["probabilities"].numpy(), res["mask"].numpy()
    assert probs.shape == (3, SIZE, SIZE, 1) and mask.shape == probs.shape
    assert probs.min() >= 0 and probs.max() <= 1
    np.testing.assert_array_equal(mask, (probs >= 0.4).astype(np.uint8))
    assert default(images=tf.constant(images[:1]))["probabilities"].shape[0] == 1

    meta = json.loads(saved_model.metadata_path.read_text())
    assert saved_model.metadata_path.parent == saved_model.path
    assert meta["input_size"] == SIZE and meta["channels"] == 3 and meta["out_channels"] == 1
    assert meta["mean"] == list(MEAN) and meta["std"] == list(STD)
    assert meta["threshold"] == 0.4 and meta["method"] == "baseline"
    assert meta["version"] and meta["parity"]["max_abs_diff"] <= 1e-4
    # Written atomically: no temporary folder is left next to the export.
    assert [p.name for p in saved_model.path.parent.iterdir()] == ["1"]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_bytes_signature_decodes_and_returns_the_original_size(saved_model, run_dir, fmt):
    image = export.parity_images(64, 1, seed=3)[0][:40, :52]
    data = _encoded(image, fmt)
    loaded = tf.saved_model.load(str(saved_model.path))
    res = loaded.signatures["serving_bytes"](image_bytes=tf.constant(data))
    probs = res["probabilities"].numpy()
    assert probs.shape == (40, 52, 1) and res["mask"].shape == (40, 52, 1)
    # Same pixels as the server decodes -> same map as `predict` computes.
    decoded = tf.io.decode_image(data, channels=3).numpy()
    expected = load_predictor(run_dir).probabilities([decoded])[0]
    np.testing.assert_allclose(probs, expected, atol=1e-4)


@pytest.mark.slow
def test_tf_serving_request_bodies(saved_model):
    """The REST bodies the README documents, fed to the signatures in-process."""
    loaded = tf.saved_model.load(str(saved_model.path))
    images = export.parity_images(SIZE, 2, seed=7)
    body = json.loads(json.dumps({"instances": images.tolist()}))
    out = loaded.signatures["serving_default"](images=tf.constant(body["instances"], tf.float32))
    response = json.loads(json.dumps({"predictions": out["probabilities"].numpy().tolist()}))
    assert np.asarray(response["predictions"]).shape == (2, SIZE, SIZE, 1)

    png = base64.b64encode(_encoded(images[0], "PNG")).decode()
    body = json.loads(json.dumps(
        {"signature_name": "serving_bytes", "inputs": {"image_bytes": {"b64": png}}}
    ))
    fn = loaded.signatures[body["signature_name"]]
    raw = base64.b64decode(body["inputs"]["image_bytes"]["b64"])
    out = fn(image_bytes=tf.constant(raw))
    np.testing.assert_allclose(out["probabilities"].numpy()[None], response["predictions"][:1],
                               atol=1e-4)


def _corrupting_writer(monkeypatch):
    original = export.write_savedmodel

    def corrupt(model, *args, **kwargs):
        kernel = [layer for layer in model.layers if hasattr(layer, "kernel")][-1].kernel
        kernel.assign(kernel + 0.5)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(export, "write_savedmodel", corrupt)


@pytest.mark.slow
def test_parity_failure_refuses_and_removes_the_artefact(run_dir, tmp_path, monkeypatch):
    _corrupting_writer(monkeypatch)
    out = tmp_path / "exports" / "1"
    with pytest.raises(export.ParityError, match="max abs diff"):
        export.export_model(run_dir, out)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_cli_export_exit_codes(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "sm"
    res = invoke("export", run_dir, "--format", "savedmodel", "--out", out)
    assert res.exit_code == 0, res.output
    assert "max abs diff" in res.output and (out / "lesionkeras.json").exists()

    res = invoke("export", run_dir, "--out", out)
    assert res.exit_code == 2 and "already exists" in res.output
    res = invoke("export", tmp_path / "missing.keras", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = invoke("export", run_dir, "--format", "tflite", "--out", tmp_path / "model.bin")
    assert res.exit_code == 2 and ".tflite" in res.output

    _corrupting_writer(monkeypatch)
    res = invoke("export", run_dir, "--out", tmp_path / "broken")
    assert res.exit_code == 1 and "artefact removed" in res.output
    assert not (tmp_path / "broken").exists()


@pytest.mark.slow
def test_tflite_export_runs_in_litert(run_dir, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "model.tflite"
    res = invoke("export", run_dir, "--format", "tflite", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.lesionkeras.json", "model.tflite"]
    assert json.loads((tmp_path / "model.lesionkeras.json").read_text())["format"] == "tflite"
    interpreter = Interpreter(model_path=str(out))
    assert list(interpreter.get_signature_list()) == ["serving_default"]
    runner = interpreter.get_signature_runner("serving_default")
    images = export.parity_images(SIZE, 1, seed=9).astype(np.float32)
    probs = runner(images=images)["probabilities"]
    predictor = load_predictor(run_dir)
    np.testing.assert_allclose(probs, export.keras_probabilities(predictor, images), atol=1e-4)


@pytest.mark.slow
def test_predict_and_evaluate_on_every_artefact_kind(run_dir, saved_model, tmp_path):
    """A run, a SavedModel and a .tflite give the same masks and scores."""
    tflite = tmp_path / "model.tflite"
    export.export_model(run_dir, tflite, format="tflite")
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(3):
        image = export.parity_images(64, 1, seed=20 + i)[0][: 40 + i, :50]
        Image.fromarray(image).save(data / "images" / f"case{i}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[10:30, 12:40] = 255
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")

    results = {}
    for kind, path in (("run", run_dir), ("savedmodel", saved_model.path), ("tflite", tflite)):
        predictor = load_predictor(path)
        assert predictor.threshold == 0.4 and predictor.image_size == SIZE
        df = list_images(data)
        _, summary = evaluate(predictor, df)
        predict(predictor, df, tmp_path / kind, probabilities=True)
        results[kind] = summary
        assert (predictor.model is None) == (kind != "run")
    for kind in ("savedmodel", "tflite"):
        assert results[kind]["dice"] == pytest.approx(results["run"]["dice"], abs=1e-3)
        for i in range(3):
            ref = np.asarray(Image.open(tmp_path / "run" / f"case{i}_prob.png"), np.int16)
            got = np.asarray(Image.open(tmp_path / kind / f"case{i}_prob.png"), np.int16)
            assert np.abs(ref - got).max() <= 1

    res = invoke("predict", saved_model.path, data / "images", "--out", tmp_path / "cli")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "cli").glob("*_mask.png"))) == 3
    res = invoke("evaluate", tflite, "--data", data, "--out", tmp_path / "eval")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval" / "summary.json").exists()

    res = invoke("export", saved_model.path, "--out", tmp_path / "again")
    assert res.exit_code == 2 and "already exported" in res.output
    (tmp_path / "broken.tflite").write_bytes(b"not a flatbuffer")
    res = invoke("predict", tmp_path / "broken.tflite", data / "images", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "cannot load" in res.output


@pytest.mark.slow
def test_colour_constancy_is_baked_in(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    keras.utils.set_random_seed(1)
    registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=4, depth=2).save(
        run / "model.keras")
    config_lib.load_config(overrides={
        "data.image_size": SIZE, "data.color_constancy": "shades_of_gray",
    }).save(run / "config.toml")
    # The parity check compares both signatures with `predict`'s own preprocessing.
    result = export.export_model(run, tmp_path / "sm")
    meta = json.loads(result.metadata_path.read_text())
    assert meta["color_constancy"] == "shades_of_gray" and result.max_abs_diff <= 1e-4


# --------------------------------------------------------------------------- #
# Every model type of the registry, and K-structure (smile / multiclass) runs
# --------------------------------------------------------------------------- #

# Tiny options per covered builder; every other registered name shares a
# builder with one of them (`SAME_BUILDER`), so a new model must be added here.
MODEL_CASES = {
    "resnet18_unet": ("baseline", {"filters": 8}),
    "segan": ("segan", {"filters": 8, "depth": 3, "k": 0.05}),
    "vgg19se": ("baseline", {"encoder_filters": 8, "filters": 8, "k": 0.05}),
    "resnet18_deeplab": ("baseline", {"filters": 8, "dropout": 0.0}),
    "deeplabv3plus": ("baseline", {"filters": 1}),  # ResNet50 encoder, ASPP width 16
}
SAME_BUILDER = {
    "unet": "run_dir fixture above",
    "resnet34_unet": "resnet18_unet", "resnet50_unet": "resnet18_unet",
    "resnet34_deeplab": "resnet18_deeplab", "resnet50_deeplab": "resnet18_deeplab",
}


def _make_run(root, name, method, options, out_channels=1, size=SIZE, **overrides):
    """A run directory: an untrained `name` model and a config.toml of `method`."""
    run = root / f"{method}-{name}"
    run.mkdir(parents=True)
    keras.utils.set_random_seed(3)
    registry.build(name, input_shape=(size, size, 3), out_channels=out_channels,
                   **options).save(run / "model.keras")
    config_lib.load_config(overrides={
        "method": method, "data.image_size": size, "model.name": name,
        "data.mean": list(MEAN), "data.std": list(STD), **overrides,
    }).save(run / "config.toml")
    keras.backend.clear_session()
    return run


def _logits(run, images):
    """The raw model output on normalised images, computed here from first principles."""
    model = keras.saving.load_model(run / "model.keras")
    x = (np.asarray(images, np.float32) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.asarray(model(x, training=False), np.float64)


def _export_both(run, tmp_path):
    sm = export.export_model(run, tmp_path / "sm")
    tfl = export.export_model(run, tmp_path / "model.tflite", format="tflite")
    return sm, tfl


def _artefact_probabilities(sm_path, tflite_path, images):
    loaded = tf.saved_model.load(str(sm_path)).signatures["serving_default"]
    from_sm = loaded(images=tf.constant(images, tf.float32))["probabilities"].numpy()
    from_tflite = TFLiteRunner(tflite_path)(images)["probabilities"]
    return from_sm, from_tflite


def test_every_registered_model_is_covered():
    # Export serves segmentation models (the classifiers of ISIC Tasks 2/3 are not exported).
    assert set(registry.names(task="segment")) == set(MODEL_CASES) | set(SAME_BUILDER)
    assert set(SAME_BUILDER.values()) - {"run_dir fixture above"} <= set(MODEL_CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_export_parity_for_each_model_type(name, tmp_path):
    method, options = MODEL_CASES[name]
    run = _make_run(tmp_path, name, method, options)
    sm, tfl = _export_both(run, tmp_path)
    assert sm.max_abs_diff <= 1e-4 and tfl.max_abs_diff <= 1e-4

    images = export.parity_images(SIZE, 3, seed=31).astype(np.float32)
    from_sm, from_tflite = _artefact_probabilities(sm.path, tfl.path, images)
    # The package's logits convention: one sigmoid, for SegAN/VGG19-SE's adaptive
    # logistic too (the model returns z / k, the artefact f(z) = sigmoid(z / k)).
    expected = 1.0 / (1.0 + np.exp(-_logits(run, images)))
    keras_probs = np.stack(load_predictor(run).probabilities(list(images)))
    np.testing.assert_allclose(keras_probs, expected, atol=1e-4)
    np.testing.assert_allclose(from_sm, expected, atol=1e-4)
    np.testing.assert_allclose(from_tflite, expected, atol=1e-4)
    assert from_sm.shape == (3, SIZE, SIZE, 1)
    if "k" in options:
        # k = 0.05 spreads f(z) towards 0 and 1; a second sigmoid would squeeze
        # every value into [0.5, 0.731].
        assert from_sm.min() < 0.3 or from_sm.max() > 0.8
    meta = json.loads(sm.metadata_path.read_text())
    assert meta["activation"] == "sigmoid" and meta["method"] == method


def _softmax_structures(logits, container):
    """`multiclass` probabilities in numpy: softmax, drop background, container = 1 - p0."""
    e = np.exp(logits - logits.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    probs = p[..., 1:].copy()
    if container is not None:
        probs[..., container] = 1.0 - p[..., 0]
    return probs


@pytest.mark.slow
@pytest.mark.parametrize("container", ["lesion", ""])
def test_multiclass_export_uses_the_softmax_of_predict(container, tmp_path):
    names = ["lesion", "globules", "streaks"]
    run = _make_run(tmp_path, "unet", "multiclass", {"filters": 8, "depth": 2},
                    out_channels=len(names) + 1,
                    **{"smile.structures": ",".join(names), "smile.container": container})
    sm, tfl = _export_both(run, tmp_path)
    images = export.parity_images(SIZE, 3, seed=41).astype(np.float32)
    from_sm, from_tflite = _artefact_probabilities(sm.path, tfl.path, images)

    predictor = load_predictor(run)
    keras_probs = np.stack(predictor.probabilities(list(images)))
    expected = _softmax_structures(_logits(run, images), 0 if container else None)
    np.testing.assert_allclose(keras_probs, expected, atol=1e-4)
    for got in (from_sm, from_tflite):
        assert got.shape == (3, SIZE, SIZE, 3)
        np.testing.assert_allclose(got, keras_probs, atol=1e-4)
    logits = _logits(run, images)
    p0 = _softmax_structures(logits, None).sum(-1)  # 1 - p(background)
    if container:
        # The container is everything but background: it encloses the other structures.
        np.testing.assert_allclose(from_tflite[..., 0], p0, atol=1e-4)
        assert (from_tflite[..., 0] + 1e-5 >= from_tflite[..., 1:].sum(-1)).all()
    else:
        # Exclusive classes: the structures and the background sum to 1.
        np.testing.assert_allclose(from_tflite.sum(-1), p0, atol=1e-4)
    # A sigmoid per channel (the bug this guards against) gives other maps.
    assert np.abs(from_sm - 1.0 / (1.0 + np.exp(-logits[..., 1:]))).max() > 0.05

    meta = json.loads(sm.metadata_path.read_text())
    assert meta["activation"] == "softmax_structures" and meta["method"] == "multiclass"
    assert meta["structures"] == names and meta["out_channels"] == 3
    assert meta["container"] == (0 if container else -1)
    tmeta = json.loads(tfl.metadata_path.read_text())
    assert tmeta["activation"] == "softmax_structures" and tmeta["structures"] == names

    # The artefacts predict one mask per structure, like the run.
    for artefact in (sm.path, tfl.path):
        loaded = load_predictor(artefact)
        assert loaded.structures == tuple(names)
        np.testing.assert_allclose(np.stack(loaded.probabilities(list(images))), keras_probs,
                                   atol=1e-4)


def test_smile_k_structure_export_parity(tmp_path):
    names = ["lesion", "globules", "streaks"]
    run = _make_run(tmp_path, "unet", "smile", {"filters": 8, "depth": 2},
                    out_channels=len(names), **{"smile.structures": ",".join(names)})
    sm, tfl = _export_both(run, tmp_path)
    images = export.parity_images(SIZE, 2, seed=43).astype(np.float32)
    from_sm, from_tflite = _artefact_probabilities(sm.path, tfl.path, images)
    expected = 1.0 / (1.0 + np.exp(-_logits(run, images)))  # K independent sigmoid heads
    assert from_sm.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(from_sm, expected, atol=1e-4)
    np.testing.assert_allclose(from_tflite, expected, atol=1e-4)
    meta = json.loads(sm.metadata_path.read_text())
    assert meta["activation"] == "sigmoid" and meta["structures"] == names


# --------------------------------------------------------------------------- #
# Batched TFLite inference
# --------------------------------------------------------------------------- #


def test_tflite_runs_whole_batches(run_dir, tmp_path):
    out = tmp_path / "model.tflite"
    export.export_model(run_dir, out, format="tflite")
    images = export.parity_images(SIZE, 5, seed=13).astype(np.float32)
    runner = TFLiteRunner(out)
    assert runner.resizable
    batch = runner(images)["probabilities"]
    # The interpreter really ran all five at once.
    assert list(runner.interpreter.get_input_details()[0]["shape"]) == [5, SIZE, SIZE, 3]
    single = np.concatenate([runner(images[i : i + 1])["probabilities"] for i in range(5)])
    assert batch.shape == (5, SIZE, SIZE, 1)
    np.testing.assert_allclose(batch, single, atol=1e-6)
    np.testing.assert_allclose(batch, export.keras_probabilities(
        load_predictor(run_dir), images), atol=1e-4)
    # The predictor over the file batches too, with the same maps.
    predictor = load_predictor(out)
    together = predictor.probabilities(list(images.astype(np.uint8)))
    alone = [predictor.probabilities([im])[0] for im in images.astype(np.uint8)]
    np.testing.assert_allclose(np.stack(together), np.stack(alone), atol=1e-6)


def test_tflite_with_a_fixed_batch_falls_back_to_chunks(tmp_path):
    class Fixed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([2, 8, 8, 3], tf.float32, name="images")])
        def serve(self, images):
            return {"probabilities": tf.sigmoid(tf.reduce_mean(images, -1, keepdims=True) / 50.0
                                                - 2.0)}

    module = Fixed()
    tf.saved_model.save(module, str(tmp_path / "sm"),
                        signatures={"serving_default": module.serve})
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    (tmp_path / "fixed.tflite").write_bytes(converter.convert())

    runner = TFLiteRunner(tmp_path / "fixed.tflite")
    assert not runner.resizable
    images = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    got = runner(images)["probabilities"]
    expected = 1.0 / (1.0 + np.exp(-(images.mean(-1, keepdims=True) / 50.0 - 2.0)))
    assert got.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5)
