"""ResNet U-Net ("U-Net34", Guth & deCampos 2018): a ResNet encoder, a U-Net decoder.

The encoder is keras-hub's `ResNetBackbone` (never downloaded: it is built
from its architecture and, if asked, reads weights from a local file). Its stem
(stride 2) and its four stage outputs (strides 4-32) feed a U-Net decoder by
concatenation, as in fast.ai's `DynamicUnet` that the paper used.

The model is a plain functional `keras.Model` whose first layer after the
input is the nested encoder model named `"encoder"`; staged training freezes
that one layer. A saved `.keras` file holds only standard Keras layers, so it
loads with no `custom_objects` and without keras-hub's classes.
"""

import json
import warnings
from pathlib import Path

import keras
from keras import layers

from lesionkeras.errors import ConfigError
from lesionkeras.models.blocks import apply_conv_block, apply_upsample, check_builder_args
from lesionkeras.models.registry import register

#: Encoder architectures (He et al. 2016), as keras-hub `ResNetBackbone` arguments.
ENCODERS = {
    "resnet18": dict(stackwise_num_blocks=[2, 2, 2, 2], block_type="basic_block"),
    "resnet34": dict(stackwise_num_blocks=[3, 4, 6, 3], block_type="basic_block"),
    "resnet50": dict(stackwise_num_blocks=[3, 4, 6, 3], block_type="bottleneck_block"),
}
UPSAMPLING = ("bilinear", "transpose")
#: Input sides must be multiples of this (the encoder halves the size 5 times).
SIZE_MULTIPLE = 32


def make_backbone(encoder="resnet34", input_shape=(None, None, 3), strides=(1, 2, 2, 2)):
    """Builds a randomly initialised keras-hub `ResNetBackbone` (no download).

    Args:
        encoder: str. One of `ENCODERS`. Defaults to `"resnet34"`.
        input_shape: tuple. (H, W, C). Defaults to (None, None, 3).
        strides: tuple of 4 ints. Stride of each stage. Defaults to (1, 2, 2, 2).

    Returns:
        A `keras_hub.models.ResNetBackbone`.
    """
    import keras_hub

    if encoder not in ENCODERS:
        raise ValueError(
            f"`encoder` must be one of {tuple(ENCODERS)}. Received: encoder={encoder!r}"
        )
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_strides=list(strides),
        image_shape=tuple(input_shape),
        **ENCODERS[encoder],
    )


def _weights_file(path):
    """Resolves `path` (a `.weights.h5` file or a keras-hub preset folder)."""
    path = Path(path)
    if path.is_dir():
        weights = path / "model.weights.h5"
        if not weights.exists():
            raise ConfigError(
                f"{path}: not a keras-hub preset folder (no model.weights.h5)"
            )
        return weights
    if not path.exists():
        raise ConfigError(f"{path}: encoder weights file not found")
    if not path.name.endswith(".weights.h5"):
        raise ConfigError(
            f"{path}: encoder weights must be a Keras `.weights.h5` file or a "
            "keras-hub preset folder"
        )
    return path


def load_hub_backbone(class_name, input_shape, encoder_weights, make_default, label,
                      overrides=None):
    """A keras-hub backbone with weights from a local `.weights.h5` file or preset folder.

    A preset folder's `config.json` decides the architecture (so e.g. a
    `resnet_vd_34` preset works for a ResNet encoder); a bare weights file must
    match the backbone `make_default()` builds. Shared by every encoder that
    reads `--encoder-weights`.

    Args:
        class_name: str. The `keras_hub.models` backbone class of a preset, e.g.
            `"ResNetBackbone"`.
        input_shape: tuple. (H, W, C).
        encoder_weights: str. Local path.
        make_default: callable. () -> the backbone to fill from a bare weights file.
        label: str. Encoder name for error messages.
        overrides: dict or None. Keys of a preset's config to replace (e.g. the
            stage strides of a dilated encoder). Defaults to None.

    Raises:
        ConfigError: the path is missing, not a weights file, or does not match.
    """
    weights = _weights_file(encoder_weights)
    config_json = weights.parent / "config.json"
    if Path(encoder_weights).is_dir() and config_json.exists():
        import keras_hub

        try:
            config = dict(json.loads(config_json.read_text())["config"])
            config["image_shape"] = tuple(input_shape)
            config.update(overrides or {})
            backbone = getattr(keras_hub.models, class_name).from_config(config)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{config_json}: not a {class_name} config ({e})") from None
    else:
        backbone = make_default()
    try:
        with warnings.catch_warnings():
            # Keras warns once per unmatched block before raising; the error says it all.
            warnings.simplefilter("ignore", UserWarning)
            backbone.load_weights(str(weights))
    except Exception as e:  # Keras raises ValueError/KeyError/OSError by cause.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{weights}: cannot load {label} encoder weights ({first})") from None
    return backbone


def load_backbone(encoder, input_shape, encoder_weights, strides=(1, 2, 2, 2)):
    """The ResNet encoder backbone, random or with local weights (`load_hub_backbone`).

    Args:
        encoder: str. One of `ENCODERS`.
        input_shape: tuple. (H, W, C).
        encoder_weights: str or None. Local path; None or "" keeps random weights.
        strides: tuple of 4 ints. Stage strides (the weights do not depend on them).
            Defaults to (1, 2, 2, 2).

    Returns:
        A `keras_hub.models.ResNetBackbone`.

    Raises:
        ConfigError: the path is missing, not a weights file, or does not match.
    """
    if not encoder_weights:
        return make_backbone(encoder, input_shape, strides)
    return load_hub_backbone(
        "ResNetBackbone", input_shape, encoder_weights,
        lambda: make_backbone(encoder, input_shape, strides), encoder,
        overrides={"stackwise_num_strides": list(strides)},
    )


def make_encoder(backbone):
    """Wraps a ResNet backbone as a model returning its pyramid features.

    Args:
        backbone: `keras_hub.models.ResNetBackbone`.

    Returns:
        A functional `keras.Model` named `"encoder"` whose output is the dict
        `{"P1": stem, "P2": ..., "P5": ...}` (Pk has stride 2**k).
    """
    stem_name = f"conv{len(backbone.input_conv_filters)}_relu"
    try:
        stem = backbone.get_layer(stem_name).output
    except ValueError:
        raise ConfigError(
            f"encoder has no stem activation `{stem_name}` (pre-activation ResNets are "
            "not supported)"
        ) from None
    features = {"P1": stem, **{k: backbone.pyramid_outputs[k] for k in ("P2", "P3", "P4", "P5")}}
    return keras.Model(backbone.inputs, features, name="encoder")


def build_resnet_unet(
    input_shape=(None, None, 3),
    out_channels=1,
    encoder="resnet34",
    encoder_weights=None,
    filters=16,
    batch_norm=True,
    dropout=0.0,
    upsampling="bilinear",
    name=None,
):
    """Builds a ResNet-encoder U-Net that returns logits.

    Decoder level k (stride 2**k, k = 4..0) has `filters * 2**k` filters, so the
    default `filters=16` gives the common (256, 128, 64, 32, 16) decoder. Each
    level up-samples, concatenates the encoder feature of the same stride
    (the stem for stride 2, nothing at full size) and applies two 3x3 convs.

    Reference: Guth & deCampos, "Skin lesion segmentation using U-Net and good
    training strategies", 2018 (ResNet34 encoder); He et al. 2016 (ResNet).

    Args:
        input_shape: tuple. (H, W, C); H and W multiples of 32, or None.
            Defaults to (None, None, 3).
        out_channels: int. Number of output logit channels. Defaults to 1.
        encoder: str. `"resnet18"`, `"resnet34"` or `"resnet50"`. Defaults to `"resnet34"`.
        encoder_weights: str. Local `.weights.h5` file of a keras-hub
            `ResNetBackbone`, or a keras-hub preset folder; None or "" for random
            weights. Nothing is ever downloaded. Defaults to None.
        filters: int. Decoder filters at full resolution, doubled per level.
            Defaults to 16.
        batch_norm: bool. Batch norm after each decoder conv. Defaults to True.
        dropout: float. Dropout on the deepest encoder feature. Defaults to 0.
        upsampling: str. `"bilinear"` or `"transpose"`. Defaults to `"bilinear"`.
        name: str. Model name. Defaults to `f"{encoder}_unet"`.

    Returns:
        A functional `keras.Model` mapping (B, H, W, C) images to (B, H, W,
        out_channels) float32 logits; `model.get_layer("encoder")` is the encoder.

    Example:

    >>> model = build_resnet_unet((64, 64, 3), encoder="resnet18", filters=8)
    >>> model.output_shape
    (None, 64, 64, 1)
    """
    if encoder not in ENCODERS:
        raise ValueError(
            f"`encoder` must be one of {tuple(ENCODERS)}. Received: encoder={encoder!r}"
        )
    if upsampling not in UPSAMPLING:
        raise ValueError(
            f"`upsampling` must be one of {UPSAMPLING}. Received: upsampling={upsampling!r}"
        )
    check_builder_args(input_shape, SIZE_MULTIPLE, dropout, filters=filters, out_channels=out_channels)
    name = name or f"{encoder}_unet"

    backbone = load_backbone(encoder, input_shape, encoder_weights)
    enc = make_encoder(backbone)
    inputs = keras.Input(shape=input_shape, name="image")
    features = enc(inputs)
    x = features["P5"]
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in (4, 3, 2, 1, 0):
        f = filters * 2**level
        x = apply_upsample(x, f, mode=upsampling, name=f"up{level}")
        if level:
            x = layers.Concatenate(name=f"up{level}_concat")([x, features[f"P{level}"]])
        x = apply_conv_block(x, f, batch_norm=batch_norm, name=f"up{level}")
    # Logits stay float32 under mixed precision so losses are computed stably.
    outputs = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _variant(encoder):
    def build(
        input_shape=(None, None, 3),
        out_channels=1,
        encoder_weights=None,
        filters=16,
        batch_norm=True,
        dropout=0.0,
        upsampling="bilinear",
        name=None,
    ):
        return build_resnet_unet(
            input_shape=input_shape, out_channels=out_channels, encoder=encoder,
            encoder_weights=encoder_weights, filters=filters, batch_norm=batch_norm,
            dropout=dropout, upsampling=upsampling, name=name,
        )

    build.__name__ = f"build_{encoder}_unet"
    build.__doc__ = f"`build_resnet_unet(encoder={encoder!r}, ...)`; see `build_resnet_unet`."
    return build


build_resnet18_unet = register("resnet18_unet", size_multiple=32, encoder=True)(_variant("resnet18"))
build_resnet34_unet = register("resnet34_unet", size_multiple=32, encoder=True)(_variant("resnet34"))
build_resnet50_unet = register("resnet50_unet", size_multiple=32, encoder=True)(_variant("resnet50"))


def encoder_layer(model):
    """The nested encoder of a ResNet U-Net, or None for other models."""
    try:
        return model.get_layer("encoder")
    except ValueError:
        return None
