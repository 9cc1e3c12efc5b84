"""Predictors: a model with its preprocessing, ensembles, test-time augmentation, MC dropout."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from lesionkeras.data import pipeline
from lesionkeras.data.color import apply_color_constancy
from lesionkeras.errors import DataError
from lesionkeras.losses.smile import multiclass_probabilities
from lesionkeras.models.deeplab import MCDropout


# How a model's logits become probabilities: independent sigmoid heads, or a
# softmax over background + K structures (`multiclass`, `multiclass_probabilities`).
# `loading` reads it from what a run recorded; exports record it in `lesionkeras.json`.
ACTIVATIONS = ("sigmoid", "softmax_structures")


def probabilities_from_logits(logits, activation="sigmoid", container=-1):
    """Probabilities `(..., K)` float32 from a model's logits, as the run was trained.

    The one mapping used by `Predictor` and baked into exported artefacts
    (`export.serving_functions`), so both give the same maps.

    Args:
        logits: tensor `(..., K)` (`(..., K + 1)` for `softmax_structures`,
            channel 0 the background).
        activation: str. One of `ACTIVATIONS`. Defaults to `"sigmoid"`.
        container: int. `softmax_structures` only: the container structure's
            channel (its probability is `1 - p(background)`), -1 for none.
            Defaults to -1.

    Returns:
        float32 tensor of probabilities in [0, 1].
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"`activation` must be one of {ACTIVATIONS}. Received: activation={activation!r}")
    logits = tf.cast(logits, tf.float32)
    if activation == "softmax_structures":
        return multiclass_probabilities(logits, None if container < 0 else int(container))
    return tf.sigmoid(logits)


@dataclasses.dataclass
class Predictor:
    """A model plus what it needs to turn raw images into probability maps."""

    model: keras.Model
    image_size: int
    mean: tuple
    std: tuple
    threshold: float
    source: str
    notes: list = dataclasses.field(default_factory=list)
    method: str = ""
    color_constancy: str = "none"
    # Exported artefacts: raw 0-255 batch at the model size -> probabilities
    # (their preprocessing is baked in); `model` is None then.
    forward: object = None
    # K-structure models (`smile`, `multiclass`): one name per output channel,
    # and for `multiclass` the container channel of its softmax (-1 = none).
    structures: tuple = ()
    container: int = -1
    # The logits -> probabilities mapping, one of `ACTIVATIONS`.
    activation: str = "sigmoid"

    def to_probabilities(self, logits):
        """The model's logits -> probabilities `(..., K)` (see `probabilities_from_logits`)."""
        return probabilities_from_logits(logits, self.activation, self.container)

    def probabilities(self, images):
        """Probability maps (H_i, W_i, K) float32 at each image's own size.

        Args:
            images: list of (H_i, W_i, 3) uint8 arrays or tensors.
        """
        size = (self.image_size, self.image_size)
        batch = tf.stack(
            [tf.image.resize(tf.cast(im, tf.float32), size, antialias=True) for im in images]
        )
        if self.forward is not None:
            probs = tf.convert_to_tensor(self.forward(tf.clip_by_value(batch, 0, 255)))
            return [
                tf.image.resize(p, tf.shape(im)[:2], method="bilinear").numpy()
                for p, im in zip(probs, images)
            ]
        # The same colour balance as training (`data.color_constancy`), on the resized image.
        batch = apply_color_constancy(tf.clip_by_value(batch, 0, 255), self.color_constancy)
        batch = pipeline.normalizer(self.mean, self.std)(batch)
        probs = self.to_probabilities(self.model(batch, training=False))
        return [
            tf.image.resize(p, tf.shape(im)[:2], method="bilinear").numpy()
            for p, im in zip(probs, images)
        ]


@dataclasses.dataclass
class EnsemblePredictor:
    """Several predictors (e.g. the folds of `fit --folds K`) whose probabilities are averaged.

    Each member keeps its own preprocessing (a fold's normalisation statistics
    come from its own training split). This is the paper's Ensemble (Guth &
    deCampos 2018, section 3.5).

    Args:
        members: list of `Predictor`.
        names: list of str. One name per member (e.g. `fold0`).
        threshold: float. Threshold of the averaged probabilities.
        source: str. Where the members were loaded from.
        notes: list of str. The members' loading notes. Defaults to [].
        method: str. The first member's `method`. Defaults to "".
        model: None. There is no single Keras model (export needs one).
        structures: tuple of str. The members' structure names, one per
            output channel, for K-structure members. Defaults to ().
    """

    members: list
    names: list
    threshold: float
    source: str
    notes: list = dataclasses.field(default_factory=list)
    method: str = ""
    model: object = None
    structures: tuple = ()

    def member_probabilities(self, images):
        """Per member, the list of its probability maps (as `Predictor.probabilities`)."""
        return [m.probabilities(images) for m in self.members]

    def probabilities(self, images):
        """The members' probability maps averaged, image by image."""
        return _average(self.member_probabilities(images), self.names)


def _average(by_member, names=None):
    out = []
    for maps in zip(*by_member):
        channels = [m.shape[-1] for m in maps]
        if len(set(channels)) > 1:
            who = ", ".join(f"{n}: {c}" for n, c in zip(names or range(len(maps)), channels))
            raise DataError(
                f"ensemble members are not the same task (output channels differ: {who})"
            )
        out.append(np.mean(maps, axis=0))
    return out


# Test-time augmentation views: (apply to an image, undo on its map). Each
# view is a flip or rotation of the dihedral group of the square, so undoing
# it puts every pixel of the map back where it came from.
TTA_VIEWS = {
    "identity": (lambda a: a, lambda a: a),
    "flip_lr": (lambda a: a[:, ::-1], lambda a: a[:, ::-1]),
    "flip_ud": (lambda a: a[::-1], lambda a: a[::-1]),
    "rot90": (lambda a: np.rot90(a, 1), lambda a: np.rot90(a, -1)),
    "rot180": (lambda a: np.rot90(a, 2), lambda a: np.rot90(a, -2)),
    "rot270": (lambda a: np.rot90(a, 3), lambda a: np.rot90(a, -3)),
    "transpose": (lambda a: a.swapaxes(0, 1), lambda a: a.swapaxes(0, 1)),
    "anti_transpose": (lambda a: np.rot90(a, 2).swapaxes(0, 1),
                       lambda a: np.rot90(a.swapaxes(0, 1), -2)),
}
TTA_MODES = {"none": ("identity",), "flips": tuple(TTA_VIEWS)}


@dataclasses.dataclass
class TTAPredictor:
    """Test-time augmentation: averages a predictor's maps over flipped and rotated views.

    Each view of the image is predicted and the inverse transform is applied
    to its probability map before averaging, so the maps line up pixel for
    pixel. A flip- and rotation-equivariant model gives its plain prediction.

    Args:
        base: a predictor (`Predictor`, `EnsemblePredictor`, ...).
        mode: str. `flips`: the 8 flips/rotations of the square (identity,
            left-right, up-down, 90/180/270 degrees, both transposes); `none`.
    """

    base: object
    mode: str = "flips"

    def __post_init__(self):
        if self.mode not in TTA_MODES:
            raise DataError(f"unknown --tta {self.mode!r} (expected {', '.join(TTA_MODES)})")
        for name in ("threshold", "source", "notes", "method", "image_size", "structures"):
            if hasattr(self.base, name):
                setattr(self, name, getattr(self.base, name))
        self.model = None

    def probabilities(self, images):
        images = [np.asarray(im) for im in images]
        total = None
        for view in TTA_MODES[self.mode]:
            apply, undo = TTA_VIEWS[view]
            maps = self.base.probabilities([np.ascontiguousarray(apply(im)) for im in images])
            maps = [undo(m) for m in maps]
            total = maps if total is None else [t + m for t, m in zip(total, maps)]
        return [np.ascontiguousarray(t / len(TTA_MODES[self.mode]), np.float32) for t in total]


def with_tta(predictor, mode):
    """`predictor` with test-time augmentation `mode`; an ensemble's members each get it."""
    if mode == "none":
        return predictor
    if isinstance(predictor, EnsemblePredictor):
        return dataclasses.replace(predictor, members=[TTAPredictor(m, mode) for m in predictor.members])
    return TTAPredictor(predictor, mode)


# Monte-Carlo dropout (Gal & Ghahramani 2016): the `MCDropout` layers of
# `models.deeplab` switched on at inference, the model run several times.


def mc_dropout_layers(model):
    """Every `MCDropout` layer of `model` (nested models included)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, MCDropout):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(mc_dropout_layers(layer))
    return found


def _dropout_draws(layers, samples, draw):
    """`samples` results of `draw()` with the `MCDropout` `layers` on; off again afterwards."""
    for layer in layers:
        layer.enabled.assign(1.0)
    try:
        return [draw() for _ in range(samples)]
    finally:
        for layer in layers:
            layer.enabled.assign(0.0)


def mc_dropout_predictor(predictor):
    """A copy of `predictor` whose dropout can stay on at inference, and its switches.

    Models with `MCDropout` layers (the DeepLab of `models/deeplab.py`) are
    used as they are; plain `keras.layers.Dropout` layers (e.g. the U-Net's
    bottleneck dropout) are swapped for `MCDropout` in a clone that shares
    every other layer and weight. Batch norm stays in inference mode.

    Returns:
        (Predictor, list of `MCDropout` layers).

    Raises:
        DataError: no Keras model (an exported artefact or an ensemble), or no dropout.
    """
    model = getattr(predictor, "model", None)
    if model is None:
        raise DataError(
            f"{predictor.source}: --mc-samples needs a Keras model (a run directory or a "
            ".keras file), not an exported artefact or an ensemble"
        )
    found = mc_dropout_layers(model)
    if not found:
        if not any(isinstance(layer, keras.layers.Dropout) and layer.rate > 0
                   for layer in model.layers):
            raise DataError(
                f"{predictor.source}: the model has no dropout layer, so --mc-samples would "
                "give zero uncertainty (train with model.dropout > 0)"
            )

        def swap(layer):
            if isinstance(layer, keras.layers.Dropout) and layer.rate > 0:
                return MCDropout(layer.rate, seed=layer.seed, name=f"{layer.name}_mc")
            return layer  # the same layer object: weights are shared, not copied

        model = keras.models.clone_model(model, clone_function=swap)
        found = mc_dropout_layers(model)
    return dataclasses.replace(predictor, model=model), found


def mc_probabilities(predictor, images, samples, layers=None):
    """Mean and standard deviation of `samples` Monte-Carlo dropout maps per image.

    Args:
        predictor: `Predictor` from `mc_dropout_predictor` (or any predictor
            with `layers` given as the `MCDropout` layers to switch on).
        images: list of (H_i, W_i, 3) uint8 images.
        samples: int >= 2. Dropout draws per image.
        layers: list of `MCDropout` layers or None (found in `predictor.model`).

    Returns:
        (means, stds): two lists of float32 (H_i, W_i, K) maps.
    """
    if samples < 2:
        raise ValueError(f"`samples` must be >= 2. Received: samples={samples}")
    layers = mc_dropout_layers(predictor.model) if layers is None else layers
    draws = _dropout_draws(layers, samples, lambda: predictor.probabilities(images))
    stacks = [np.stack(per_image) for per_image in zip(*draws)]
    return ([s.mean(axis=0).astype(np.float32) for s in stacks],
            [s.std(axis=0).astype(np.float32) for s in stacks])


def mc_dropout_predict(model, images, samples=10, batch_size=8):
    """Mean and standard deviation of a model's sigmoid outputs over `samples` dropout draws.

    The array form of `mc_probabilities`, for callers that hold normalised
    model inputs rather than images (SMILEr's relabelling rounds).

    Args:
        model: a model with `MCDropout` layers (without, every draw is the same).
        images: float32 (B, H, W, C) normalised inputs.
        samples: int >= 1. Monte-Carlo samples. Defaults to 10.
        batch_size: int. Batch size of each prediction. Defaults to 8.

    Returns:
        (mean, std), float32 numpy arrays of the model's output shape. The std
        is 0 when the model has no active dropout.
    """
    if samples < 1:
        raise ValueError(f"`samples` must be >= 1. Received: samples={samples}")

    def draw():
        logits = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), np.float32)
        return 1.0 / (1.0 + np.exp(-logits))

    stack = np.stack(_dropout_draws(mc_dropout_layers(model), samples, draw))
    return stack.mean(axis=0), stack.std(axis=0)
