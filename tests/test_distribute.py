import json

import keras
import pytest
import tensorflow as tf

from lesionkeras.training.distribute import resolve_strategy, set_precision
from lesionkeras.errors import ConfigError


def test_auto_and_default_on_a_cpu_machine(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert resolve_strategy("auto").num_replicas_in_sync == 1
    assert resolve_strategy("default") is tf.distribute.get_strategy()


def test_mirrored_uses_the_logical_cpus():
    strategy = resolve_strategy("mirrored")
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == 2  # conftest splits the CPU in two


def test_multiworker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        resolve_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_strategy("auto")


def test_auto_picks_multiworker_when_tf_config_names_workers(monkeypatch):
    # Resolution only: building the strategy would start a gRPC server.
    from lesionkeras.training import distribute

    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                    "task": {"type": "worker", "index": 0}}),
    )
    assert distribute._tf_config_workers() == 2


def test_unknown_strategy_and_precision():
    with pytest.raises(ConfigError, match="--strategy"):
        resolve_strategy("tpu")
    assert set_precision(True) == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().compute_dtype == "bfloat16"
    assert set_precision(False) == "float32"
