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
from lesionkeras import export, inference
from lesionkeras.cli import main
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
    expected = inference.load_predictor(run_dir).probabilities([decoded])[0]
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
    predictor = inference.load_predictor(run_dir)
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
        predictor = inference.load_predictor(path)
        assert predictor.threshold == 0.4 and predictor.image_size == SIZE
        df = inference.list_images(data)
        _, summary = inference.evaluate(predictor, df)
        inference.predict(predictor, df, tmp_path / kind, probabilities=True)
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
