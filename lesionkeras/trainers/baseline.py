"""`--method baseline`: plain supervised training of a registered model.

Standard Keras: the model is compiled with a loss and the per-image metrics;
nothing overrides `train_step`. With `meta.simulate_noise` it trains on
simulated noisy masks (the noisy-mask baseline, see `prepare_manifest`).
"""

import keras

from lesionkeras import losses, metrics, schedules
from lesionkeras.models import registry


def make_optimizer(train_cfg, steps_per_epoch=None):
    """Adam, AdamW or SGD with momentum, as the `[train]` table says.

    Args:
        train_cfg: `TrainConfig`.
        steps_per_epoch: int or None. Needed by the step schedules
            (`one_cycle`, `slanted_triangular`, `linear_decay`).
    """
    lr = schedules.make_schedule(train_cfg, steps_per_epoch)
    if train_cfg.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if train_cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train_cfg.weight_decay)
    return keras.optimizers.SGD(
        lr,
        momentum=train_cfg.momentum,
        weight_decay=train_cfg.weight_decay or None,
    )


def model_options(model_cfg, name=None):
    """The `[model]` options that the builder `name` (default: `model_cfg.name`) accepts."""
    opts = {
        k: getattr(model_cfg, k)
        for k in (
            "depth", "filters", "batch_norm", "dropout", "upsampling", "encoder_weights",
            "encoder_filters",
        )
    }
    return registry.accepted_options(name or model_cfg.name or "unet", opts)


def build_model(cfg):
    return registry.build(
        cfg.model_name,
        input_shape=(None, None, 3),
        out_channels=1,
        **model_options(cfg.model, cfg.model_name),
    )


def jit_option(train_cfg):
    return {"auto": "auto", "true": True, "false": False}[train_cfg.jit_compile]


def build(cfg, steps_per_epoch=None):
    """Returns the compiled model for `cfg` (call inside the strategy scope).

    Args:
        cfg: `Config`.
        steps_per_epoch: int or None. Optimizer steps per epoch, for step schedules.
    """
    model = build_model(cfg)
    model.compile(
        optimizer=make_optimizer(cfg.train, steps_per_epoch),
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics.default_metrics(threshold=cfg.train.threshold, from_logits=True),
        jit_compile=jit_option(cfg.train),
    )
    return model


def prepare_manifest(cfg, df):
    """The noisy-mask baseline: with `meta.simulate_noise`, train on the simulated masks.

    All training images but `meta.clean_count` get the simulated noisy mask
    (the same masks, cache and seed as `method = "meta"`), and every training
    image counts equally: the baseline that reweighting and fine-tuning are
    compared with. Without `meta.simulate_noise` the manifest is unchanged.
    """
    if not cfg.meta.simulate_noise:
        return df
    from lesionkeras.trainers import meta  # meta builds on this module

    return meta.simulate_noise(df, cfg.meta.simulate_noise, cfg.meta.clean_count, cfg.seed)
