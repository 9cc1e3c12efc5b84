"""ResNet classifier with an embedding layer (Xue et al. 2018, ISIC 2018 report, section 3).

keras-hub `ResNetBackbone` (built from its architecture, never downloaded; a
local weights file is optional) -> global average pooling -> a 256-d linear
embedding -> a K-way linear classifier. The model returns a dict
`{"embedding": (B, 256), "logits": (B, K)}`: the triplet loss acts on the
first, cross-entropy on the second.
"""

import warnings
from pathlib import Path

import keras
from keras import layers

from lesionkeras.errors import ConfigError
from lesionkeras.models.registry import register

#: Backbones (He et al. 2016) as keras-hub `ResNetBackbone` arguments.
BACKBONES = {
    "resnet18": dict(stackwise_num_blocks=[2, 2, 2, 2], block_type="basic_block"),
    "resnet34": dict(stackwise_num_blocks=[3, 4, 6, 3], block_type="basic_block"),
    "resnet50": dict(stackwise_num_blocks=[3, 4, 6, 3], block_type="bottleneck_block"),
    "resnet101": dict(stackwise_num_blocks=[3, 4, 23, 3], block_type="bottleneck_block"),
}


def make_backbone(name="resnet101", input_shape=(None, None, 3), weights=""):
    """A keras-hub `ResNetBackbone` from its config (random weights unless `weights`).

    Args:
        name: str. One of `BACKBONES`. Defaults to `"resnet101"`.
        input_shape: tuple. (H, W, C). Defaults to (None, None, 3).
        weights: str. Local `.weights.h5` of the same architecture; empty = random.
    """
    import keras_hub

    if name not in BACKBONES:
        raise ConfigError(f"`classify.backbone` must be one of {', '.join(BACKBONES)}. "
                          f"Received: {name!r}")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_strides=[1, 2, 2, 2],
        image_shape=tuple(input_shape),
        name="encoder",
        **BACKBONES[name],
    )
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"{weights}: backbone weights file not found")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                backbone.load_weights(str(path))
        except Exception as e:  # Keras raises ValueError/KeyError/OSError by cause.
            raise ConfigError(
                f"{weights}: cannot load into a {name} backbone "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
    return backbone


@register("resnet_classifier", task="classify", encoder=True)
def build_resnet_classifier(input_shape=(None, None, 3), num_classes=7, backbone="resnet101",
                            embedding_dim=256, weights=""):
    """ResNet -> pooling -> embedding -> classifier, as a functional `keras.Model`.

    Args:
        input_shape: tuple. (H, W, 3). Defaults to (None, None, 3).
        num_classes: int. K >= 2. Defaults to 7 (ISIC 2018 Task 3).
        backbone: str. One of `BACKBONES`. Defaults to `"resnet101"` (the paper).
        embedding_dim: int. Size of the embedding. Defaults to 256 (the paper).
        weights: str. Optional local backbone weights file.

    Returns:
        `keras.Model` with outputs `{"embedding", "logits"}`.

    Example:

    ```python
    model = build_resnet_classifier((64, 64, 3), num_classes=2, backbone="resnet18")
    out = model(np.zeros((2, 64, 64, 3)))  # out["embedding"]: (2, 256), out["logits"]: (2, 2)
    ```
    """
    if num_classes < 2:
        raise ConfigError(f"A classifier needs at least 2 classes. Received: num_classes={num_classes}")
    if embedding_dim < 1:
        raise ConfigError(f"`embedding_dim` must be >= 1. Received: {embedding_dim}")
    inputs = keras.Input(input_shape, name="image")
    features = make_backbone(backbone, input_shape, weights)(inputs)
    pooled = layers.GlobalAveragePooling2D(name="pool")(features)
    embedding = layers.Dense(embedding_dim, name="embedding")(pooled)
    logits = layers.Dense(num_classes, name="logits")(embedding)
    return keras.Model(inputs, {"embedding": embedding, "logits": logits},
                       name=f"{backbone}_classifier")
