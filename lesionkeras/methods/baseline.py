"""`--method baseline`: plain supervised training of a registered model.

Standard Keras: the model is compiled with a loss and the per-image metrics;
nothing overrides `train_step`. With `meta.simulate_noise` it trains on
simulated noisy masks (the noisy-mask baseline, see `prepare_manifest`).
"""

from lesionkeras.data import noise
from lesionkeras.training import method
from lesionkeras.training.segmentation import SegmentationMethod, build_model, compile_plain


def build(cfg, steps_per_epoch=None):
    """Returns the compiled model for `cfg` (call inside the strategy scope).

    Args:
        cfg: `Config`.
        steps_per_epoch: int or None. Optimizer steps per epoch, for step schedules.
    """
    return compile_plain(build_model(cfg), cfg, steps_per_epoch)


def prepare_manifest(cfg, df):
    """The noisy-mask baseline: with `meta.simulate_noise`, train on the simulated masks.

    All training images but `meta.clean_count` get the simulated noisy mask
    (the same masks, cache and seed as `method = "meta"`), and every training
    image counts equally: the baseline that reweighting and fine-tuning are
    compared with. Without `meta.simulate_noise` the manifest is unchanged.
    """
    if not cfg.meta.simulate_noise:
        return df
    return noise.simulate_noise(df, cfg.meta.simulate_noise, cfg.meta.clean_count, cfg.seed)


@method.register
class Baseline(SegmentationMethod):
    """Plain supervised training (U-Net, Ronneberger et al. 2015, or any registered model)."""

    name = "baseline"
    freezes_encoder = True

    def prepare_manifest(self, df):
        return prepare_manifest(self.cfg, df)
