"""`--method baseline`: plain supervised training of a registered model.

Standard Keras: the model is compiled with a loss and the per-image metrics;
nothing overrides `train_step`.
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
        for k in ("depth", "filters", "batch_norm", "dropout", "upsampling", "encoder_weights")
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
