"""Running a `.onnx` file from `lesionkeras export --format onnx` with ONNX Runtime.

`onnxruntime` (like `tf2onnx` for the export) comes with the optional extra
`lesionkeras[onnx]`; it is imported only when an ONNX file is used, so every
other command works without it, and its absence is told in one line.
"""

from __future__ import annotations

import importlib

import numpy as np

from lesionkeras.errors import DataError

EXTRA = "onnx"
INSTALL_HINT = f"pip install 'lesionkeras[{EXTRA}]'"


def require(module, purpose):
    """Imports an optional dependency of the `onnx` extra, or says how to install it.

    Args:
        module: str. `onnxruntime`, `tf2onnx` or `onnx`.
        purpose: str. What needs it, for the message (e.g. "ONNX export").

    Returns:
        The imported module.

    Raises:
        DataError: the module is not installed (one line naming the extra).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(
            f"{purpose} needs `{module}` from the optional extra ({e}); install it: "
            f"{INSTALL_HINT}"
        ) from None


class OnnxRunner:
    """Runs the exported graph of a `.onnx` file on whole batches with ONNX Runtime.

    The graph takes raw 0-255 RGB images `images` float32 `(batch, S, S, 3)`
    and returns `probabilities` and `mask`, as the SavedModel's `serving_default`
    does. The batch dimension of our exports is symbolic, so any batch runs in
    one call; a file whose batch is fixed runs in chunks of that size.

    Args:
        path: str or Path. The `.onnx` file.
        num_threads: int or None. Intra-op threads; None lets ONNX Runtime choose.

    Example:

    ```python
    runner = OnnxRunner("model.onnx")
    probs = runner(images)["probabilities"]  # images: float32 (N, S, S, 3), 0-255
    ```
    """

    def __init__(self, path, num_threads=None):
        ort = require("onnxruntime", "running a .onnx model")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = int(num_threads)
        # Idle worker threads sleep instead of spinning for the next call: between
        # calls `predict` resizes and writes images on the same cores, and on a
        # busy 2-core machine spinning made a 256 px U-Net ~1.5x slower (93-107 vs 61-68 ms).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # The build's own providers in its order of preference (CUDA first in
        # onnxruntime-gpu), less Azure's, which only runs remote-endpoint ops.
        providers = [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            got = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise DataError(f"{path}: expected one image input (batch, S, S, 3), found {got}")
        self._input = inputs[0].name
        shape = inputs[0].shape
        self.image_size = int(shape[1])
        # A symbolic (str) or unknown (None) first dimension takes any batch.
        self.resizable = not isinstance(shape[0], int)
        self._batch = None if self.resizable else int(shape[0])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.version = f"onnxruntime {ort.__version__}"

    def _invoke(self, images):
        return dict(zip(self.outputs, self.session.run(self.outputs, {self._input: images})))

    def __call__(self, images):
        """Outputs for a float32 batch `(N, S, S, 3)` of raw images.

        Returns:
            dict of output name -> numpy array with a leading batch axis `N`.
        """
        images = np.ascontiguousarray(images, np.float32)
        if self.resizable or len(images) == self._batch:
            return self._invoke(images)
        step, n = self._batch, len(images)
        pad = -n % step
        if pad:
            images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.float32)])
        parts = [self._invoke(images[i : i + step]) for i in range(0, len(images), step)]
        return {k: np.concatenate([p[k] for p in parts])[:n] for k in self.outputs}
