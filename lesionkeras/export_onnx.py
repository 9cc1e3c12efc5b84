"""Conversion of the serving function to ONNX, for `export.export_model(format="onnx")`.

The converter is `tf2onnx` (`tf2onnx.convert.from_function`), run on the very
function behind the SavedModel's `serving_default` (`export.serving_functions`),
so the `.onnx` file has the same contract: `images` float32 `(batch, S, S, 3)`,
raw 0-255 RGB, -> `probabilities` float32 and `mask` uint8 `(batch, S, S, K)`,
with the colour balance, normalisation, activation and threshold inside the
graph. Keras' own `model.export(format="onnx")` calls the same converter but
only on `model.call`, which would leave the preprocessing to every client.

`tf2onnx`, `onnx` and `onnxruntime` come with the optional extra
`lesionkeras[onnx]` and are imported here only when an export runs.
tf2onnx 1.17 is the first release whose protobuf requirement admits the
protobuf that TensorFlow >= 2.20 needs (1.16 pins protobuf < 4), and its
constant folding no longer calls `np.cast`, gone in NumPy 2 (Keras patches
tf2onnx for that; the other function it patches, with `np.product`, runs
only for models over 2 GB, which are written with external data, not here).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading

import keras
import tensorflow as tf

from lesionkeras.inference.onnx_runner import require
from lesionkeras.inference.predictor import mc_dropout_layers
from lesionkeras.models.deeplab import MCDropout

# Opset 17 (ONNX 1.12, 2022) is read by every current runtime (ONNX Runtime >= 1.13,
# TensorRT, OpenVINO) and covers every op of our graphs.
OPSET = 17
BATCH = "batch"


def check_available():
    """Imports the converter and the runtime, or raises one line naming the extra.

    Called before anything is loaded or written, so a missing extra costs nothing.

    Raises:
        DataError: `tf2onnx`, `onnx` or `onnxruntime` is not installed.
    """
    for module in ("onnx", "tf2onnx", "onnxruntime"):
        require(module, "ONNX export")


def inference_model(model):
    """`model` with its `MCDropout` layers replaced by the identity they are when off.

    An `MCDropout` layer keeps its random draw in the graph (multiplied by its
    `enabled` switch, 0 outside `predict --mc-samples`), and tf2onnx has no
    ONNX op for TensorFlow's stateless random draws. The served model never
    switches dropout on, so the clone computes the same maps; every other
    layer is the same object, its weights shared. Models without the layer
    are returned as they are.
    """
    if not mc_dropout_layers(model):
        return model

    def swap(layer):
        if isinstance(layer, MCDropout):
            return keras.layers.Identity(name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=swap, recursive=True)


@contextlib.contextmanager
def _collecting_garbage(interval=0.25):
    """Runs Python's cyclic garbage collector every `interval` seconds in the block.

    tf2onnx's optimiser deep-copies the whole ONNX graph, weights included,
    before each of its ~12 passes (repeated until nothing changes) and drops
    the old copy, a cycle of nodes that only the collector frees; with the
    millions of objects TensorFlow keeps alive, the collector's own schedule
    runs a full collection too seldom, and the copies pile up (8 GB for a
    95 MB ResNet34 U-Net, 2.7 GB with this). The objects alive on entry are
    frozen (`gc.freeze`), so each collection looks at the new ones only.
    """
    freeze = gc.get_freeze_count() == 0  # a caller's own freeze is left alone
    if freeze:
        gc.freeze()
    stop = threading.Event()

    def collect():
        while not stop.wait(interval):
            gc.collect()

    worker = threading.Thread(target=collect, name="onnx-export-gc", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        if freeze:
            gc.unfreeze()


def write_onnx(serve, path, image_size, opset=OPSET):
    """Converts a serving function to a `.onnx` file with a symbolic batch dimension.

    Args:
        serve: callable. `serve(images)` -> dict with `probabilities` and
            `mask`, the first function of `export.serving_functions`.
        path: str or Path. The `.onnx` file written.
        image_size: int. Model input side `S`.
        opset: int. ONNX opset of the default domain. Defaults to `OPSET`.

    Returns:
        The `onnx.ModelProto` written.
    """
    tf2onnx = require("tf2onnx", "ONNX export")
    # Its INFO lines (versions, optimiser passes) are noise on the command line.
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")
    function = tf.function(serve, input_signature=[spec])
    with _collecting_garbage():
        model, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=opset)
    # tf2onnx names the unknown batch dimension `unk__N`, a new N per tensor;
    # one name says that inputs and outputs share it.
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH
    model.doc_string = (
        "lesionkeras segmentation: images float32 (batch, S, S, 3) raw 0-255 RGB -> "
        "probabilities float32 and mask uint8 (batch, S, S, K)"
    )
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return model
