"""Segmentation losses for binary, multi-channel lesion masks.

All tensors are channels-last `(B, H, W, K)`: `B` images, `K` independent
binary structures (K=1 for lesion segmentation, K=5 for the ISIC 2018
attribute masks). Each channel is a separate sigmoid output, so every loss
here treats channels independently and averages them.

The pure functions return one value per image, shape `(B,)`. The `Loss`
classes return the same per-image values from `call`, so Keras applies
`sample_weight` (one weight per image) and the reduction as for any built-in
loss.

Everything is computed in float32: under mixed precision the model emits
float16/bfloat16 logits, and the sums over a whole image and the
`log1p(exp(.))` term are not accurate enough in half precision.

The package holds one module per family: `crossentropy` (the one BCE),
`overlap` (Dice, Jaccard), `combined` (`CombinedLoss`, `get_loss`), `smile`
(missing labels, multiclass baseline) and `multiscale` (SegAN); this module
re-exports their public names, and importing it registers every `Loss` class
for loading saved models.

Example:
    import numpy as np
    y_true = np.zeros((2, 4, 4, 1), "float32")
    logits = np.zeros((2, 4, 4, 1), "float32")
    binary_crossentropy_with_logits(y_true, logits)  # log(2) per image
    model.compile(optimizer="adam", loss=get_loss("bce+dice"))
"""

from lesionkeras.losses.combined import LOSS_NAMES, CombinedLoss, get_loss
from lesionkeras.losses.crossentropy import (
    BinaryCrossentropyWithLogits, binary_crossentropy_with_logits, pixel_binary_crossentropy,
    sigmoid_cross_entropy)
from lesionkeras.losses.multiscale import mask_image, multiscale_l1
from lesionkeras.losses.overlap import (
    SoftDiceLoss, SoftJaccardLoss, hard_mining_dice_loss, soft_dice_loss, soft_jaccard_loss)
from lesionkeras.losses.smile import (
    MulticlassLoss, SmileLoss, multiclass_labels, multiclass_probabilities, smile_loss)

__all__ = [
    "LOSS_NAMES", "BinaryCrossentropyWithLogits", "CombinedLoss", "MulticlassLoss", "SmileLoss",
    "SoftDiceLoss", "SoftJaccardLoss", "binary_crossentropy_with_logits", "get_loss",
    "hard_mining_dice_loss", "mask_image", "multiclass_labels", "multiclass_probabilities",
    "multiscale_l1", "pixel_binary_crossentropy", "sigmoid_cross_entropy", "smile_loss",
    "soft_dice_loss", "soft_jaccard_loss",
]
