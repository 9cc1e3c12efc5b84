"""`--ensemble` (any mix of artefacts) and `--tta flips` for predict and evaluate."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from _helpers import untrained_run
from lesionkeras import config as config_lib
from lesionkeras import export
from lesionkeras.cli import main
from lesionkeras.inference.loading import load_ensemble, load_predictor
from lesionkeras.inference.predictor import TTA_VIEWS, TTAPredictor, with_tta
from lesionkeras.models import registry

SIZE = 32


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _run(folder, model):
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    config_lib.load_config(overrides={
        "data.image_size": SIZE, "data.mean": [120.0, 110.0, 100.0],
        "data.std": [50.0, 45.0, 40.0], "train.threshold": 0.5,
    }).save(folder / "config.toml")
    return folder


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory):
    keras.utils.set_random_seed(3)
    return _run(tmp_path_factory.mktemp("ens") / "unet",
                registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=8, depth=2))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    (data / "images").mkdir()
    (data / "masks").mkdir()
    for i in range(3):
        image = export.parity_images(48, 1, seed=30 + i)[0][:, : 40 + 4 * i]
        Image.fromarray(image).save(data / "images" / f"case{i}.png")
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[8:30, 10:30] = 255
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")
    return data


def _images(n=2):
    return [export.parity_images(48, 1, seed=40 + i)[0][:, : 36 + 6 * i] for i in range(n)]


def test_ensemble_of_the_same_model_twice_is_the_model(unet_run):
    single = load_predictor(unet_run)
    twice = load_ensemble([unet_run, unet_run / "model.keras"])
    for a, b in zip(single.probabilities(_images()), twice.probabilities(_images())):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_ensemble_averages_different_models(unet_run, tmp_path):
    keras.utils.set_random_seed(9)
    other = _run(tmp_path / "other",
                 registry.build("unet", input_shape=(SIZE, SIZE, 3), filters=8, depth=2))
    a, b = load_predictor(unet_run), load_predictor(other)
    ens = load_ensemble([unet_run, other])
    images = _images()
    got = ens.probabilities(images)[1]
    expected = (a.probabilities(images)[1] + b.probabilities(images)[1]) / 2
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(a.probabilities(images)[1] - b.probabilities(images)[1]).max() > 1e-3


def test_ensemble_of_different_tasks_is_refused(unet_run, tmp_path, data_dir):
    two = _run(tmp_path / "two", registry.build(
        "unet", input_shape=(SIZE, SIZE, 3), out_channels=2, filters=8, depth=2))
    res = invoke("evaluate", unet_run, two, "--ensemble", "--data", data_dir,
                 "--out", tmp_path / "ev")
    assert res.exit_code == 2 and "not the same task" in res.output
    assert "Traceback" not in res.output


def _structure_run(folder, structures, seed):
    return untrained_run(folder, size=SIZE, seed=seed, out_channels=len(structures.split(",")),
                         overrides={"method": "smile", "smile.structures": structures})


def test_ensemble_of_k_structure_runs_predicts_every_structure(tmp_path, data_dir):
    runs = [_structure_run(tmp_path / f"s{i}", "lesion,globules", seed=i) for i in (1, 2)]
    ens = load_ensemble(runs)
    assert ens.structures == ("lesion", "globules")
    singles = [load_predictor(r).probabilities(_images(1))[0] for r in runs]
    np.testing.assert_allclose(ens.probabilities(_images(1))[0], (singles[0] + singles[1]) / 2,
                               atol=1e-6)
    res = invoke("predict", "--ensemble", *runs, data_dir / "images", "--out", tmp_path / "p")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        f"case{i}_{s}.png" for i in range(3) for s in ("globules", "lesion")]
    other = _structure_run(tmp_path / "other", "lesion,streaks", seed=3)
    res = invoke("predict", "--ensemble", runs[0], other, data_dir / "images",
                 "--out", tmp_path / "q")
    assert res.exit_code == 2 and "structures differ" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow
def test_cli_ensemble_mixes_artefact_kinds(unet_run, data_dir, tmp_path):
    tflite = tmp_path / "m.tflite"
    export.export_model(unet_run, tflite, format="tflite")
    res = invoke("evaluate", unet_run, tflite, "--ensemble", "--data", data_dir,
                 "--out", tmp_path / "ens")
    assert res.exit_code == 0, res.output
    res = invoke("evaluate", unet_run, "--data", data_dir, "--out", tmp_path / "one")
    assert res.exit_code == 0, res.output
    ens = json.loads((tmp_path / "ens" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert set(ens["members"]) == {str(unet_run), str(tflite)}
    assert ens["dice"] == pytest.approx(one["dice"], abs=1e-3)
    assert ens["members"][str(tflite)]["dice"] == pytest.approx(one["dice"], abs=1e-3)

    res = invoke("predict", "--ensemble", unet_run, tflite, data_dir / "images",
                 "--out", tmp_path / "pred", "--probabilities")
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 3


@pytest.mark.parametrize("args, message", [
    (["{run}", "{run}", "{data}/images"], "several MODELs need --ensemble"),
    (["--ensemble", "{run}", "{data}/images"], "at least two MODELs"),
    (["--ensemble", "{run}", "{data}/missing.keras", "{data}/images"], "missing.keras"),
])
def test_bad_ensemble_usage_exits_2(unet_run, data_dir, tmp_path, args, message):
    args = [a.format(run=unet_run, data=data_dir) for a in args]
    res = invoke("predict", *args, "--out", tmp_path / "p")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


class LeftHalf:
    """A fake model: probability 1 on the left half of whatever it is shown."""

    threshold, source, notes, method, image_size = 0.5, "fake", [], "", SIZE

    def probabilities(self, images):
        maps = []
        for im in images:
            m = np.zeros(np.asarray(im).shape[:2] + (1,), np.float32)
            m[:, : m.shape[1] // 2] = 1.0
            maps.append(m)
        return maps


def test_tta_undoes_each_view_before_averaging():
    image = np.zeros((6, 4, 3), np.uint8)  # non-square: rotated views change the shape
    (prob,) = TTAPredictor(LeftHalf(), "flips").probabilities([image])
    assert prob.shape == (6, 4, 1)
    views = []
    for apply, undo in TTA_VIEWS.values():
        views.append(undo(LeftHalf().probabilities([apply(image)])[0]))
    np.testing.assert_allclose(prob, np.mean(views, axis=0), atol=1e-6)
    # Golden: each pixel lies in the shown left half in exactly 4 of the 8 views once
    # they are undone (identity/flip_ud vs flip_lr/rot180 split the columns, the four
    # 90-degree views split the rows), so the average is 0.5 everywhere. A view left
    # un-undone would tip one half towards 1.
    np.testing.assert_allclose(prob, 0.5, atol=1e-6)
    lr_only = TTA_VIEWS["flip_lr"][0]
    skipped = np.mean([LeftHalf().probabilities([lr_only(image)])[0],
                       LeftHalf().probabilities([image])[0]], axis=0)
    assert skipped[0, 0, 0] == 1.0  # the check above would catch a missing undo


def test_tta_of_an_equivariant_model_is_its_plain_prediction(tmp_path):
    # A 1x1 convolution treats every pixel alike, so it commutes with flips/rotations.
    keras.utils.set_random_seed(5)
    inputs = keras.Input((SIZE, SIZE, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(inputs))
    run = _run(tmp_path / "pointwise", model)
    plain = load_predictor(run)
    tta = with_tta(plain, "flips")
    images = [np.asarray(export.parity_images(SIZE, 1, seed=8)[0])]
    np.testing.assert_allclose(tta.probabilities(images)[0], plain.probabilities(images)[0],
                               atol=1e-5)


def test_tta_of_a_unet_averages_the_views(unet_run, data_dir, tmp_path):
    plain = load_predictor(unet_run)
    tta = with_tta(plain, "flips")
    image = _images(1)[0]
    expected = np.mean([undo(plain.probabilities([np.ascontiguousarray(apply(image))])[0])
                        for apply, undo in TTA_VIEWS.values()], axis=0)
    got = tta.probabilities([image])[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got - plain.probabilities([image])[0]).max() > 1e-4  # a U-Net is not equivariant

    res = invoke("predict", unet_run, data_dir / "images", "--tta", "flips",
                 "--out", tmp_path / "tta", "--probabilities")
    assert res.exit_code == 0, res.output
    written = np.asarray(Image.open(tmp_path / "tta" / "case0_prob.png"), np.float32) / 255
    tile = tta.probabilities([np.asarray(Image.open(data_dir / "images" / "case0.png"))])[0]
    assert np.abs(written - tile[..., 0]).max() <= 1 / 255 + 1e-6
