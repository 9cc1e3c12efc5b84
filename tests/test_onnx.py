"""ONNX export (extra `lesionkeras[onnx]`): contract, parity gate, predict/evaluate, missing extra."""

import gc
import json
import sys
import threading

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from _helpers import untrained_run
from lesionkeras import config as config_lib
from lesionkeras import export, export_onnx
from lesionkeras.cli import main
from lesionkeras.inference.evaluate import evaluate, list_images
from lesionkeras.inference.loading import load_ensemble, load_predictor
from lesionkeras.models import registry

SIZE = 32
MEAN, STD = (120.0, 110.0, 100.0), (50.0, 45.0, 40.0)
THRESHOLD = 0.4
EXTRA = "the onnx extra is not installed (pip install 'lesionkeras[onnx]')"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ort():
    for module in ("onnx", "tf2onnx"):
        pytest.importorskip(module, reason=EXTRA)
    return pytest.importorskip("onnxruntime", reason=EXTRA)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("onnx") / "run", size=SIZE, seed=0,
                         overrides={"train.threshold": THRESHOLD})


@pytest.fixture(scope="module")
def exported(ort, run_dir, tmp_path_factory):
    """The run exported with the CLI: (command output, .onnx path)."""
    out = tmp_path_factory.mktemp("onnx-export") / "model.onnx"
    res = invoke("export", run_dir, "--format", "onnx", "--out", out)
    assert res.exit_code == 0, res.output
    return res.output, out


def _expected(run, images):
    """Probabilities from first principles: the Keras model on (x - mean) / std, a sigmoid."""
    model = keras.saving.load_model(run / "model.keras")
    x = (np.asarray(images, np.float32) - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return 1.0 / (1.0 + np.exp(-np.asarray(model(x, training=False), np.float64)))


@pytest.mark.slow
def test_onnx_file_serves_raw_images_like_serving_default(ort, exported, run_dir):
    output, path = exported
    assert "max abs diff" in output
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.lesionkeras.json",
                                                              "model.onnx"]
    meta = json.loads((path.parent / "model.lesionkeras.json").read_text())
    assert meta["format"] == "onnx" and meta["opset"]["ai.onnx"] == export_onnx.OPSET
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["tolerance"] == 1e-4
    assert meta["threshold"] == THRESHOLD and meta["input_size"] == SIZE
    assert meta["converter"].startswith("tf2onnx ") and meta["checked_with"].startswith(
        "onnxruntime ")

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(float)"
    assert inp.shape == ["batch", SIZE, SIZE, 3]
    outputs = {o.name: o for o in session.get_outputs()}
    assert outputs["probabilities"].type == "tensor(float)"
    assert outputs["mask"].type == "tensor(uint8)"
    assert outputs["probabilities"].shape == ["batch", SIZE, SIZE, 1]

    images = export.parity_images(SIZE, 3, seed=7).astype(np.float32)
    expected = _expected(run_dir, images)
    for n in (3, 1):  # the batch dimension is open
        probs, mask = session.run(["probabilities", "mask"], {"images": images[:n]})
        np.testing.assert_allclose(probs, expected[:n], atol=1e-4)
        np.testing.assert_array_equal(mask, (probs >= THRESHOLD).astype(np.uint8))


@pytest.mark.slow
def test_predict_and_evaluate_accept_onnx(exported, run_dir, tmp_path):
    _, path = exported
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(3):
        image = export.parity_images(64, 1, seed=20 + i)[0][: 40 + i, :50]
        Image.fromarray(image).save(data / "images" / f"case{i}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[10:30, 12:40] = 255
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")

    for name, model in (("run", run_dir), ("onnx", path)):
        res = invoke("predict", model, data / "images", "--out", tmp_path / name,
                     "--probabilities")
        assert res.exit_code == 0, res.output
    for i in range(3):
        for kind, tol in (("prob", 1), ("mask", 0)):
            ref = np.asarray(Image.open(tmp_path / "run" / f"case{i}_{kind}.png"), np.int16)
            got = np.asarray(Image.open(tmp_path / "onnx" / f"case{i}_{kind}.png"), np.int16)
            assert ref.shape == got.shape == (40 + i, 50)
            assert np.abs(ref - got).max() <= tol

    predictor = load_predictor(path)
    assert predictor.model is None and predictor.threshold == THRESHOLD
    assert predictor.image_size == SIZE
    df = list_images(data)
    _, onnx_summary = evaluate(predictor, df)
    _, run_summary = evaluate(load_predictor(run_dir), df)
    assert onnx_summary["dice"] == pytest.approx(run_summary["dice"], abs=1e-3)
    res = invoke("evaluate", path, "--data", data, "--out", tmp_path / "eval")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "eval" / "summary.json").exists()

    # An ensemble of the run and its own export is the run.
    images = [export.parity_images(48, 1, seed=3)[0]]
    np.testing.assert_allclose(load_ensemble([run_dir, path]).probabilities(images)[0],
                               load_predictor(run_dir).probabilities(images)[0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("offset, refused", [(2e-4, True), (5e-5, False)])
def test_parity_gate(ort, run_dir, tmp_path, monkeypatch, offset, refused):
    """A file whose probabilities are `offset` away from Keras: refused above 1e-4 only."""
    original = export.serving_functions

    def shifted(*args, **kwargs):
        serve, serve_bytes = original(*args, **kwargs)

        def serve_shifted(images):
            out = serve(images)
            return {**out, "probabilities": out["probabilities"] + offset}

        return serve_shifted, serve_bytes

    monkeypatch.setattr(export, "serving_functions", shifted)
    out = tmp_path / "exports" / "model.onnx"
    res = invoke("export", run_dir, "--format", "onnx", "--out", out)
    if refused:
        assert res.exit_code == 1
        assert "onnx export differs from the Keras model (max abs diff 0.0002" in res.output
        assert "> 0.0001); artefact removed" in res.output
        assert list(out.parent.iterdir()) == []  # no file, no metadata, no scratch folder
    else:
        assert res.exit_code == 0, res.output
        meta = json.loads((out.parent / "model.lesionkeras.json").read_text())
        assert meta["parity"]["max_abs_diff"] == pytest.approx(offset, rel=0.05)


@pytest.mark.slow
def test_a_file_onnx_runtime_cannot_run_is_refused(ort, run_dir, tmp_path, monkeypatch):
    def garbage(serve, path, image_size, opset=export_onnx.OPSET):
        path.write_bytes(b"not an onnx protobuf")

    monkeypatch.setattr(export_onnx, "write_onnx", garbage)
    out = tmp_path / "exports" / "model.onnx"
    res = invoke("export", run_dir, "--format", "onnx", "--out", out)
    assert res.exit_code == 1
    assert "does not run in ONNX Runtime" in res.output and "artefact removed" in res.output
    assert list(out.parent.iterdir()) == []


def test_missing_extra_is_one_line_and_nothing_is_written(run_dir, tmp_path, monkeypatch):
    # A None entry makes `import tf2onnx` raise ImportError, as when it is not installed.
    for module in ("tf2onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "model.onnx"
    res = invoke("export", run_dir, "--format", "onnx", "--out", out)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
    assert "ONNX export needs `" in res.output
    assert "pip install 'lesionkeras[onnx]'" in res.output
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "model.onnx").write_bytes(b"")
    Image.fromarray(export.parity_images(SIZE, 1)[0]).save(tmp_path / "image.png")
    res = invoke("predict", tmp_path / "model.onnx", tmp_path / "image.png", "--out",
                 tmp_path / "pred")
    assert res.exit_code == 2 and "pip install 'lesionkeras[onnx]'" in res.output
    assert "onnxruntime" in res.output and not (tmp_path / "pred").exists()

    res = invoke("export", run_dir, "--format", "onnx", "--out", tmp_path / "model.tflite")
    assert res.exit_code == 2 and "needs a .onnx file name" in res.output


def test_a_broken_onnx_file_cannot_be_loaded(ort, tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    Image.fromarray(export.parity_images(SIZE, 1)[0]).save(tmp_path / "image.png")
    res = invoke("predict", tmp_path / "broken.onnx", tmp_path / "image.png", "--out",
                 tmp_path / "x")
    assert res.exit_code == 2 and "cannot load the exported model" in res.output


@pytest.mark.slow
def test_a_fixed_batch_runs_in_chunks(exported, tmp_path):
    import onnx

    from lesionkeras.inference.onnx_runner import OnnxRunner

    _, path = exported
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "fixed.onnx"))
    fixed, dynamic = OnnxRunner(tmp_path / "fixed.onnx"), OnnxRunner(path)
    assert not fixed.resizable and dynamic.resizable
    images = export.parity_images(SIZE, 3, seed=11).astype(np.float32)
    got = fixed(images)
    assert got["probabilities"].shape == (3, SIZE, SIZE, 1) and got["mask"].shape[0] == 3
    np.testing.assert_allclose(got["probabilities"], dynamic(images)["probabilities"],
                               atol=1e-6)


def _run(root, name, method, options, out_channels=1, **overrides):
    run = root / f"{method}-{name}"
    run.mkdir(parents=True)
    keras.utils.set_random_seed(3)
    registry.build(name, input_shape=(SIZE, SIZE, 3), out_channels=out_channels,
                   **options).save(run / "model.keras")
    config_lib.load_config(overrides={
        "method": method, "data.image_size": SIZE, "model.name": name,
        "data.mean": list(MEAN), "data.std": list(STD), **overrides,
    }).save(run / "config.toml")
    keras.backend.clear_session()
    return run


def test_mc_dropout_model_exports_without_its_random_draw(ort, tmp_path):
    # The DeepLabs' MCDropout keeps a stateless random draw in the graph, which
    # tf2onnx cannot convert; a two-convolution model with one stands in for them.
    from lesionkeras.models.deeplab import MCDropout

    run = tmp_path / "run"
    run.mkdir()
    keras.utils.set_random_seed(4)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = MCDropout(0.5, seed=2)(x)
    keras.Model(inputs, keras.layers.Conv2D(1, 1)(x)).save(run / "model.keras")
    config_lib.load_config(overrides={
        "data.image_size": SIZE, "data.mean": list(MEAN), "data.std": list(STD),
    }).save(run / "config.toml")
    result = export.export_model(run, tmp_path / "mc.onnx", format="onnx")
    assert result.max_abs_diff <= 1e-4
    images = export.parity_images(SIZE, 2, seed=5).astype(np.float32)
    got = load_predictor(result.path).forward(images)
    np.testing.assert_allclose(got, _expected(run, images), atol=1e-4)


@pytest.mark.slow
def test_multiclass_onnx_export_keeps_the_structures(ort, tmp_path):
    names = ["lesion", "globules", "streaks"]
    run = _run(tmp_path, "unet", "multiclass", {"filters": 8, "depth": 2},
               out_channels=len(names) + 1,
               **{"smile.structures": ",".join(names), "smile.container": "lesion"})
    result = export.export_model(run, tmp_path / "multi.onnx", format="onnx")
    meta = json.loads(result.metadata_path.read_text())
    assert meta["activation"] == "softmax_structures" and meta["structures"] == names
    loaded = load_predictor(result.path)
    assert loaded.structures == tuple(names)
    images = list(export.parity_images(SIZE, 2, seed=9))
    np.testing.assert_allclose(np.stack(loaded.probabilities(images)),
                               np.stack(load_predictor(run).probabilities(images)), atol=1e-4)


def test_inference_model_swaps_mc_dropout_for_identity():
    from lesionkeras.models.deeplab import MCDropout

    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 1, name="conv")(inputs)
    model = keras.Model(inputs, MCDropout(0.5, seed=1, name="drop")(x))
    clone = export_onnx.inference_model(model)
    assert isinstance(clone.get_layer("drop"), keras.layers.Identity)
    assert clone.get_layer("conv") is model.get_layer("conv")  # weights shared
    assert isinstance(model.get_layer("drop"), MCDropout)  # the original is untouched
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(model(x)))
    plain = keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))
    assert export_onnx.inference_model(plain) is plain


def test_garbage_collection_during_conversion_leaves_the_gc_as_it_was():
    frozen = gc.get_freeze_count()
    threads = threading.active_count()
    with export_onnx._collecting_garbage(interval=0.01):
        garbage = []
        garbage.append(garbage)  # a cycle only the collector frees
        del garbage
    assert gc.get_freeze_count() == frozen and threading.active_count() == threads
