"""`inference.loading`: what a run's output channels are, from what the run recorded."""

import types

import numpy as np
import pytest

from lesionkeras import config as config_lib
from lesionkeras.inference.loading import recorded_outputs
from lesionkeras.inference.predictor import probabilities_from_logits

THREE = "lesion,globules,streaks"


def _model(channels):
    return types.SimpleNamespace(output_shape=(None, None, None, channels))


@pytest.mark.parametrize("method, structures, container, channels, expected", [
    # baseline: one channel, the config keeps the default list of 6 structures.
    ("baseline", "", "lesion", 1, ((), "sigmoid", -1)),
    # smile: K sigmoid heads for the K structures.
    ("smile", THREE, "lesion", 3, (("lesion", "globules", "streaks"), "sigmoid", 0)),
    # multiclass: background + K structures, softmax; the container's channel.
    ("multiclass", THREE, "lesion", 4, (("lesion", "globules", "streaks"),
                                        "softmax_structures", 0)),
    ("multiclass", THREE, "", 4, (("lesion", "globules", "streaks"), "softmax_structures", -1)),
    ("multiclass", "globules,streaks", "lesion", 3, (("globules", "streaks"),
                                                     "softmax_structures", -1)),
    # One structure: no container (it would enclose nothing).
    ("smile", "lesion", "lesion", 1, (("lesion",), "sigmoid", -1)),
    ("multiclass", "lesion", "lesion", 2, (("lesion",), "softmax_structures", -1)),
    # A channel count that fits neither: one unnamed sigmoid map.
    ("smile", THREE, "lesion", 5, ((), "sigmoid", -1)),
])
def test_recorded_outputs(method, structures, container, channels, expected):
    cfg = config_lib.load_config(overrides={
        "method": method, "smile.structures": structures, "smile.container": container})
    assert recorded_outputs(cfg, _model(channels)) == expected


def test_the_method_name_does_not_choose_the_activation():
    # Same recorded structures and channels, another method name: same mapping.
    for method in ("smile", "multiclass", "baseline"):
        cfg = config_lib.load_config(overrides={"method": method, "smile.structures": THREE})
        assert recorded_outputs(cfg, _model(4))[1] == "softmax_structures"
        assert recorded_outputs(cfg, _model(3))[1] == "sigmoid"


def test_probabilities_from_logits_golden():
    # Logits (background, lesion, globules) = (0, ln 2, ln 3): softmax 1/6, 2/6, 3/6.
    logits = np.log(np.array([[[[1.0, 2.0, 3.0]]]], np.float32))
    np.testing.assert_allclose(
        np.asarray(probabilities_from_logits(logits, "softmax_structures"))[0, 0, 0],
        [2 / 6, 3 / 6], atol=1e-6)
    # The container (channel 0, the lesion) takes 1 - p(background).
    np.testing.assert_allclose(
        np.asarray(probabilities_from_logits(logits, "softmax_structures", 0))[0, 0, 0],
        [5 / 6, 3 / 6], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(probabilities_from_logits(np.zeros((1, 2), np.float32))), [[0.5, 0.5]])
    with pytest.raises(ValueError, match="activation"):
        probabilities_from_logits(logits, "multiclass")
