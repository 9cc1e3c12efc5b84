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
