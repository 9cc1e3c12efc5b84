"""Layer groups for staged training (Guth & deCampos 2018, after fast.ai).

Stage 1 trains the decoder on a frozen encoder; stage 2 trains everything
except the batch-norm layers, which stay in inference mode (a frozen Keras 3
`BatchNormalization` uses and keeps its moving statistics), so small batches
do not spoil the encoder's statistics. Changing what is trainable takes effect
at the next `compile`.

Example:

```python
freeze_encoder(model); model.compile(...); model.fit(...)       # stage 1
unfreeze_except_batch_norm(model); model.compile(...); model.fit(...)  # stage 2
```
"""

import keras

from lesionkeras.errors import ConfigError
from lesionkeras.models import registry
from lesionkeras.models.resnet_unet import encoder_layer


def _walk(layer):
    yield layer
    for sub in getattr(layer, "layers", []):
        yield from _walk(sub)


def freeze_encoder(model):
    """Makes the nested `"encoder"` of `model` untrainable (incl. its batch norms).

    Raises:
        ValueError: `model` has no layer named `"encoder"`.
    """
    enc = encoder_layer(model)
    if enc is None:
        raise ValueError(
            f"Model `{model.name}` has no `encoder` layer to freeze; staged training "
            "needs a ResNet U-Net (e.g. model.name = 'resnet34_unet')."
        )
    unfreeze_all(model)
    enc.trainable = False


def unfreeze_except_batch_norm(model):
    """Makes every layer trainable except batch norms, which stay in inference mode."""
    # Parents come before their sub-layers in `_walk`, so a parent's setting
    # (which Keras passes down) never overrides a batch norm's.
    for layer in _walk(model):
        layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)


def unfreeze_all(model):
    """Makes every layer trainable again."""
    # A nested model's own flag is not reset by its parent's, so set every layer.
    for layer in _walk(model):
        layer.trainable = True


def check_freeze_encoder(cfg, method, supported):
    """Raises ConfigError when `train.freeze_encoder_epochs` cannot be honoured.

    Checked before anything is written: the method must be one that retraces
    its step (`supported`) and the model one with a nested encoder.
    """
    if not cfg.train.freeze_encoder_epochs:
        return
    if not supported:
        raise ConfigError(
            f"`train.freeze_encoder_epochs` is not supported by `method = {method!r}`"
        )
    try:
        has_encoder = registry.capabilities(cfg.model_name).encoder
    except KeyError as e:
        raise ConfigError(str(e).strip("'\"")) from None
    if not has_encoder:
        raise ConfigError(
            f"`train.freeze_encoder_epochs` needs a model with an encoder (e.g. vgg19se, "
            f"resnet34_unet); `{cfg.model_name}` has none"
        )


class FreezeEncoder(keras.callbacks.Callback):
    """Freezes the model's nested `"encoder"` for the first `epochs` epochs, then trains all.

    The ISIC 2018 report fixes the pre-trained VGG19 for 50 epochs, then
    fine-tunes the whole segmentor. The state is a function of the epoch
    number alone, so a run resumed from its backup freezes or not as
    the uninterrupted run would. The optimiser is built over every variable
    before the first epoch (the model is fully trainable when `fit` starts),
    so unfreezing needs no new optimiser; the train step is retraced whenever
    the set of trainable variables changes. For a `SegANTrainer` the
    segmentor's encoder is frozen; the critic always trains.

    Args:
        epochs: int >= 0. Epochs with the encoder frozen.

    Example:

    ```python
    model.fit(ds, epochs=100, callbacks=[FreezeEncoder(50)])
    ```
    """

    def __init__(self, epochs):
        super().__init__()
        if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
            raise ValueError(f"`epochs` must be an integer >= 0. Received: epochs={epochs!r}")
        self.epochs = int(epochs)

    def _encoder(self):
        target = getattr(self.model, "network", self.model)
        enc = encoder_layer(target)
        if enc is None:
            raise ValueError(f"Model `{target.name}` has no `encoder` layer to freeze.")
        return enc

    def on_train_begin(self, logs=None):
        # Keras builds the optimiser at the first trace when no strategy is set;
        # build it now, over every variable, so unfreezing later finds its slots.
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            with self.model.distribute_strategy.scope():
                opt.build(self.model.trainable_variables)

    def on_epoch_begin(self, epoch, logs=None):
        enc = self._encoder()
        trainable = epoch >= self.epochs
        if enc.trainable != trainable:
            enc.trainable = trainable
            self.model.make_train_function(force=True)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["encoder_frozen"] = float(not self._encoder().trainable)

    def on_train_end(self, logs=None):
        # Leave the model as `fit` found it: fully trainable, with a step that trains all.
        enc = self._encoder()
        if not enc.trainable:
            enc.trainable = True
            self.model.make_train_function(force=True)
