"""Callbacks shared by the staged-training tests."""

import keras
import numpy as np


class WeightRecorder(keras.callbacks.Callback):
    """Weights at the start and the end of each fit: `fits[i] = [start, end]`.

    Args:
        layer: str or None. Record only this layer's weights (trainable and batch-norm
            statistics), e.g. `"encoder"`; None records the whole model.
    """

    def __init__(self, layer=None):
        super().__init__()
        self.layer = layer
        self.fits = []

    def _weights(self):
        source = self.model.get_layer(self.layer) if self.layer else self.model
        return [np.array(w) for w in source.weights]

    def on_train_begin(self, logs=None):
        self.fits.append([self._weights()])

    def on_train_end(self, logs=None):
        self.fits[-1].append(self._weights())
