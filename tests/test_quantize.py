"""TFLite quantisation (`export --quantize`) on a tiny trained U-Net: parity by mask Dice."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lesionkeras import config as config_lib
from lesionkeras import export
from lesionkeras.inference.loading import load_predictor
from lesionkeras.cli import main
from lesionkeras.data import synthetic
from lesionkeras.training import run as run_lib
from _helpers import shared_dir

SIZE = 32


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A U-Net trained for a few epochs, so its masks are neither empty nor full (trained
    once for every test here, whichever worker runs it)."""

    def build(path):
        cfg = config_lib.load_config(None, {
            "data.image_size": SIZE, "model.filters": 8, "model.depth": 2,
            "train.batch_size": 8, "train.progress": False, "data.limit": 48,
            "train.epochs": 4, "train.lr": 3e-3, "out": str(path / "run"),
        })
        run_lib.fit(cfg, verbose=0, log=lambda *a: None)

    return shared_dir(tmp_path_factory, "quantize_trained_run", build) / "run"


@pytest.fixture(scope="module")
def representative(tmp_path_factory):
    folder = tmp_path_factory.mktemp("representative")
    for i in range(8):
        Image.fromarray(synthetic.make_sample(11, i, size=48).image).save(folder / f"r{i}.png")
    return folder


@pytest.fixture(scope="module")
def exports(trained_run, representative, tmp_path_factory):
    """One .tflite per quantisation mode, written through the CLI (once for every test)."""

    def build(folder):
        for mode in export.QUANTIZE:
            extra = ["--representative-data", representative] if mode == "int8" else []
            res = invoke("export", trained_run, "--format", "tflite", "--quantize", mode,
                         *extra, "--out", folder / f"{mode}.tflite")
            assert res.exit_code == 0, res.output
            assert "mask dice" in res.output

    folder = shared_dir(tmp_path_factory, "quantize_exports", build)
    return {mode: folder / f"{mode}.tflite" for mode in export.QUANTIZE}


@pytest.mark.slow
def test_trained_model_masks_are_not_trivial(trained_run):
    predictor = load_predictor(trained_run)
    probs = export.keras_probabilities(predictor, export.parity_images(SIZE, 4))
    fg = (probs >= predictor.threshold).mean()
    assert 0.05 < fg < 0.95


@pytest.mark.slow
@pytest.mark.parametrize("mode", export.QUANTIZE)
def test_each_mode_meets_its_parity_and_records_it(exports, trained_run, mode):
    meta = json.loads(exports[mode].with_suffix(".lesionkeras.json").read_text())
    assert meta["quantize"] == mode and meta["format"] == "tflite"
    if mode == "none":
        assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["tolerance"] == 1e-4
    else:
        assert meta["parity"]["dice"] >= 0.98 and meta["parity"]["min_dice"] == 0.98
        # Quantised probabilities move, but stay close to the float model's.
        assert 0 < meta["parity"]["max_abs_diff"] < 0.25
    assert meta["parity"].get("representative_images", 0) == (8 if mode == "int8" else 0)

    # The quantised file is served as any .tflite: float32 raw images in.
    predictor = load_predictor(exports[mode])
    images = export.parity_images(SIZE, 3, seed=4)
    got = np.stack(predictor.probabilities(list(images)))
    ref = export.keras_probabilities(load_predictor(trained_run), images)
    assert got.shape == ref.shape and got.dtype == np.float32
    assert export.mask_dice(got >= 0.5, ref >= 0.5) >= 0.95


@pytest.mark.slow
def test_quantised_files_are_smaller(exports):
    size = {mode: path.stat().st_size for mode, path in exports.items()}
    assert size["float16"] < 0.65 * size["none"]
    assert size["dynamic"] < 0.5 * size["none"]
    assert size["int8"] < 0.5 * size["none"]


@pytest.mark.slow
def test_int8_activations_are_quantised(exports):
    from ai_edge_litert.interpreter import Interpreter

    def dtypes(path):
        interpreter = Interpreter(model_path=str(path))
        return {d["dtype"] for d in interpreter.get_tensor_details()}

    assert np.int8 in dtypes(exports["int8"])
    # Dynamic range keeps float activations; only weights are int8.
    assert np.float32 in dtypes(exports["dynamic"])


@pytest.mark.slow
def test_quantised_parity_failure_exits_1_and_removes(trained_run, representative, tmp_path):
    out = tmp_path / "strict.tflite"
    res = invoke("export", trained_run, "--format", "tflite", "--quantize", "int8",
                 "--representative-data", representative, "--min-dice", "1.0", "--out", out)
    assert res.exit_code == 1, res.output
    assert "mask dice" in res.output and "artefact removed" in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--format", "tflite", "--quantize", "int8"], "needs --representative-data"),
    (["--format", "savedmodel", "--quantize", "float16"], "needs --format tflite"),
    (["--format", "tflite", "--representative-data", "{tmp}"], "only used by --quantize int8"),
    (["--format", "tflite", "--quantize", "int8", "--representative-data", "{tmp}/nope"],
     "nope: no such file or folder"),
    (["--format", "tflite", "--quantize", "int8", "--representative-data", "{tmp}/empty"],
     "empty folder"),
])
def test_bad_quantisation_usage_exits_2(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    run = tmp_path / "model.keras"
    from lesionkeras.models import registry

    registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=4, depth=2).save(run)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = invoke("export", run, *args, "--out", tmp_path / "out.tflite")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out.tflite").exists()
