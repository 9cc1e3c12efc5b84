"""Multitask attribute network (Xue et al. 2018, ISIC 2018 report, section 2).

The Task 1 segmentor (the VGG19-SE U-Net of `vgg_se_unet`) with its last
1x1 convolution giving 5 attribute masks instead of 1, plus a fully
connected head on the pooled deepest (SE-weighted) VGG19 feature classifying
the presence of each attribute (multi-label). Both heads return logits; the
report's two parallel element-wise outputs are sigmoids here, as every
attribute is a separate yes/no question.
"""

import keras
from keras import layers

from lesionkeras.models.registry import register
from lesionkeras.models.vgg_se_unet import build_vgg_se_unet

#: ISIC 2018 Task 2 has 5 attributes (models do not import `lesionkeras.data`).
NUM_ATTRIBUTES = 5


@register("attribute_net", task="attributes", size_multiple=32, encoder=True)
def build_attribute_net(input_shape=(None, None, 3), num_attributes=NUM_ATTRIBUTES,
                        encoder_filters=64, filters=16, batch_norm=True, encoder_weights=None):
    """VGG19-SE U-Net -> `{"masks": (B, H, W, A) logits, "presence": (B, A) logits}`.

    Args:
        input_shape: tuple. (H, W, 3), sides multiples of 32. Defaults to (None, None, 3).
        num_attributes: int. A. Defaults to 5 (ISIC 2018 Task 2).
        encoder_filters: int. First VGG19 block's filters (64 = VGG19). Defaults to 64.
        filters: int. Decoder filters at full resolution. Defaults to 16.
        batch_norm: bool. Batch norm in the decoder. Defaults to True.
        encoder_weights: str. Local VGG19 weights (see `vgg_se_unet`); None = random.

    Returns:
        A functional `keras.Model`; `get_layer("encoder")` is the VGG19 encoder.

    Example:

    ```python
    model = build_attribute_net((64, 64, 3), encoder_filters=8, filters=8)
    out = model(np.zeros((2, 64, 64, 3)))  # masks (2, 64, 64, 5), presence (2, 5)
    ```
    """
    seg = build_vgg_se_unet(input_shape, out_channels=num_attributes,
                            encoder_weights=encoder_weights, encoder_filters=encoder_filters,
                            filters=filters, batch_norm=batch_norm, name="attribute_segmentor")
    deepest = seg.get_layer("se5_scale").output
    pooled = layers.GlobalAveragePooling2D(name="presence_pool")(deepest)
    presence = layers.Dense(num_attributes, dtype="float32", name="presence")(pooled)
    return keras.Model(seg.inputs[0], {"masks": seg.output, "presence": presence},
                       name="attribute_net")
