"""TensorBoard weight maps of meta-reweighting: the Fig. 3 overlay, the weight split, the `WeightMaps` callback."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from lesionkeras.data import pipeline


def weight_overlay(weights, noisy_masks, true_masks, low=0.1):
    """The paper's Fig. 3 colouring of one batch's weights.

    Mislabelled pixels (noisy mask != true mask) are blue, low-weight pixels
    green, so cyan means "mislabelled and ignored". A weight is low below
    `low` times the uniform weight 1 / (pixels in the batch).

    Args:
        weights: float array (B, H, W, 1). Eq. 8 weights of the batch.
        noisy_masks: array (B, H, W, 1). The masks trained on.
        true_masks: array (B, H, W, 1). The clean masks.
        low: float. Fraction of the uniform weight below which a weight is low.
            Defaults to 0.1.

    Returns:
        uint8 array (B, H, W, 3).
    """
    weights = np.asarray(weights, np.float32)
    wrong = (np.asarray(noisy_masks) > 0.5) != (np.asarray(true_masks) > 0.5)
    small = weights < low / weights.size
    rgb = np.zeros(weights.shape[:3] + (3,), np.uint8)
    rgb[..., 1] = 255 * small[..., 0]
    rgb[..., 2] = 255 * wrong[..., 0]
    return rgb


def weight_split(weights, noisy_masks, true_masks):
    """Mean weight on mislabelled and on correctly labelled pixels, times the pixel count.

    Scaled so that 1 is the uniform weight: below 1, the method trusts those
    pixels less than average. NaN where a group is empty.

    Returns:
        (float, float): (mislabelled, correct).
    """
    weights = np.asarray(weights, np.float64)
    wrong = (np.asarray(noisy_masks) > 0.5) != (np.asarray(true_masks) > 0.5)
    scaled = weights * weights.size
    mean = lambda sel: float(scaled[sel].mean()) if sel.any() else float("nan")  # noqa: E731
    return mean(wrong), mean(~wrong)


class WeightMaps(keras.callbacks.Callback):
    """Writes the meta-learned weights of a fixed batch to TensorBoard.

    Every `every` epochs (and after the first) the weights of eq. 8 are
    computed, changing nothing, for a fixed noisy batch against a fixed clean
    batch, and written to `logdir/weights`: `weights/maps` (each image's
    weights scaled to its maximum), and, when the true masks of the noisy
    images are known (simulated noise), `weights/fig3_overlay` (see
    `weight_overlay`) and the scalars `weights/mislabelled_mean` and
    `weights/correct_mean` (see `weight_split`).

    Args:
        logdir: str. TensorBoard directory of the run.
        noisy: (images, masks) float32 arrays of the fixed noisy batch, normalised.
        clean: (images, masks) float32 arrays of the fixed clean batch, normalised.
        true_masks: float32 array or None. Clean masks of the noisy batch.
        every: int. Epochs between writes. Defaults to 5.
    """

    def __init__(self, logdir, noisy, clean, true_masks=None, every=5):
        super().__init__()
        self.logdir = str(logdir) + "/weights"
        self.noisy, self.clean, self.true_masks = noisy, clean, true_masks
        self.every = every
        self.history = []  # (epoch, mislabelled mean, correct mean)
        self._writer = None
        self._fn = None

    def weights(self):
        """The eq. 8 weights of the fixed batch under the current model."""
        if self._fn is None:
            self._fn = tf.function(self.model.meta_weights)
        out = self._fn(*self.noisy, *self.clean)
        return out["weights"].numpy()

    def on_epoch_end(self, epoch, logs=None):
        if not self.every or (epoch % self.every and epoch != 0):
            return
        w = self.weights()
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.logdir)
        peak = w.max(axis=(1, 2, 3), keepdims=True)
        maps = np.divide(w, peak, out=np.zeros_like(w), where=peak > 0)
        if maps.shape[1] == 1:  # one weight per image: a flat tile per image
            maps = np.broadcast_to(maps, (len(w),) + self.noisy[1].shape[1:])
        with self._writer.as_default():
            tf.summary.image("weights/maps", maps, step=epoch, max_outputs=len(w))
            if self.true_masks is not None and w.shape[1] > 1:
                overlay = weight_overlay(w, self.noisy[1], self.true_masks)
                tf.summary.image("weights/fig3_overlay", overlay, step=epoch, max_outputs=len(w))
                wrong, right = weight_split(w, self.noisy[1], self.true_masks)
                tf.summary.scalar("weights/mislabelled_mean", wrong, step=epoch)
                tf.summary.scalar("weights/correct_mean", right, step=epoch)
                self.history.append((epoch, wrong, right))
        self._writer.flush()


def _fixed_batch(df, count, cfg, mean, std, column="mask"):
    rows = df.iloc[:count].reset_index(drop=True)
    rows = rows.assign(mask=rows[column])
    pairs = list(pipeline.decoded_dataset(
        rows, cfg.data.image_size, cache=False, color_constancy=cfg.data.color_constancy
    ))
    images = np.stack([p[0].numpy() for p in pairs]).astype(np.float32)
    masks = np.stack([p[1].numpy() for p in pairs]).astype(np.float32)
    if cfg.data.crop_size:
        c, off = cfg.data.crop_size, (images.shape[1] - cfg.data.crop_size) // 2
        images, masks = images[:, off:off + c, off:off + c], masks[:, off:off + c, off:off + c]
    return pipeline.normalizer(mean, std)(images).numpy(), masks


def callbacks(cfg, train_df=None, mean=None, std=None):
    """The `WeightMaps` callback of the run (none if `meta.weight_image_every` is 0)."""
    if not cfg.meta.weight_image_every or train_df is None:
        return []
    is_clean = train_df["clean"].astype(bool)
    noisy_df, clean_df = train_df[~is_clean], train_df[is_clean]
    if noisy_df.empty or clean_df.empty:
        return []  # train_dataset reports it
    count = min(cfg.train.image_count, len(noisy_df))
    noisy = _fixed_batch(noisy_df, count, cfg, mean, std)
    clean = _fixed_batch(clean_df, min(cfg.meta.clean_batch_size, len(clean_df)), cfg, mean, std)
    true_masks = None
    if "true_mask" in noisy_df:
        true_masks = _fixed_batch(noisy_df, count, cfg, mean, std, column="true_mask")[1]
    logdir = (cfg.out or ".") + "/tensorboard"
    return [WeightMaps(logdir, noisy, clean, true_masks, every=cfg.meta.weight_image_every)]
