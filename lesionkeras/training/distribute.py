"""`--strategy` name -> `tf.distribute` strategy, replica counts, and the mixed-precision policy."""

import json
import os

import keras
import tensorflow as tf

from lesionkeras.errors import ConfigError

STRATEGIES = ("auto", "default", "mirrored", "multiworker")


def resolve_strategy(name="auto"):
    """Returns the strategy for `name`.

    - `auto`: `MirroredStrategy` over the GPUs if there are two or more,
      `MultiWorkerMirroredStrategy` when `TF_CONFIG` names several workers,
      otherwise the default (single device) strategy.
    - `default`: the default strategy.
    - `mirrored`: all GPUs; on a machine without GPUs, all logical CPU devices
      (tests split the CPU into two with `tf.config.set_logical_device_configuration`).
    - `multiworker`: `MultiWorkerMirroredStrategy`; needs `TF_CONFIG`.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"`--strategy` must be one of {', '.join(STRATEGIES)}. Received: {name!r}")
    # Physical devices: listing logical ones initialises the TensorFlow runtime, after
    # which MultiWorkerMirroredStrategy can no longer configure its collective ops.
    gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        if _tf_config_workers() > 1:
            name = "multiworker"
        elif len(gpus) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")
        ]
        return tf.distribute.MirroredStrategy(devices=devices)
    if not os.environ.get("TF_CONFIG"):
        raise ConfigError(
            "`--strategy multiworker` needs the TF_CONFIG environment variable "
            "(cluster spec and this worker's task)"
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def replicas_in_sync():
    """Replicas of the current distribution strategy (1 outside one).

    Custom train steps divide their loss by it, so that the gradients summed
    over replicas are those of the global batch.
    """
    ctx = tf.distribute.get_replica_context()
    return ctx.num_replicas_in_sync if ctx is not None else 1


def check_batch_size(batch_size, strategy):
    """Returns the strategy's replica count; `batch_size` must split evenly across them."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ConfigError(
            f"`train.batch_size` ({batch_size}) must be a multiple of the "
            f"{replicas} replicas of the distribution strategy"
        )
    return replicas


def _tf_config_workers():
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        raise ConfigError("TF_CONFIG is not valid JSON") from None
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def set_precision(mixed: bool):
    """Sets the global Keras dtype policy (bfloat16 compute on CPU, float16 on GPU)."""
    if not mixed:
        keras.mixed_precision.set_global_policy("float32")
        return "float32"
    policy = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy
