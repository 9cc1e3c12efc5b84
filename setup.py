"""Install lesionkeras: `pip install -e .` (add `[test]` for the test suite, `[onnx]` for ONNX export)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "lesionkeras" / "__init__.py").read_text()
).group(1)

setup(
    name="lesionkeras",
    version=VERSION,
    description="Skin-lesion segmentation from imperfect annotations, in Keras 3",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lesionkeras", "lesionkeras.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.5",
        "keras-hub",
        # TensorFlow 2.21 no longer pulls TensorBoard in; `fit` writes its logs.
        "tensorboard",
        "numpy",
        "pillow",
        "pandas",
        "click",
        # scipy.ndimage: Gaussian filtering for the synthetic lesions and the
        # morphology of post-processing; a well-kept library beats hand-rolled code.
        "scipy",
        # tomllib only reads TOML; the resolved run config must also be written.
        "tomli-w",
        # The TFLite interpreter (TensorFlow's own `tf.lite.Interpreter` is deprecated);
        # `export --format tflite` checks its file with it.
        "ai-edge-litert",
        # Dense CRF refinement of post-processing (`--postprocess crf`): the reference
        # fully connected CRF (Kraehenbuehl & Koltun 2011), kept building on current Pythons.
        "pydensecrf2",
        # Plots of the experiment tables and curves (bar charts, legends, log axes).
        "matplotlib",
        # tomllib is stdlib from 3.11 on; tomli is the same parser for 3.10.
        "tomli; python_version < '3.11'",
    ],
    # pytest-xdist: the suite runs in two worker processes (-n 2); most of a test's time is
    # single-threaded graph building, so two processes use both cores.
    extras_require={
        "test": ["pytest", "pytest-xdist"],
        # `export --format onnx`: tf2onnx converts the serving function (1.17 is the
        # first release without the protobuf < 4 pin that clashes with TensorFlow
        # >= 2.20), onnxruntime runs the parity check and `predict`/`evaluate`.
        "onnx": ["tf2onnx>=1.17", "onnx", "onnxruntime"],
    },
    scripts=["bin/noise-table", "bin/clean-size-curve", "bin/missing-table"],
    entry_points={"console_scripts": ["lesionkeras=lesionkeras.cli:main"]},
)
