"""`--method unet34`: the staged fine-tuning of Guth & deCampos 2018, in one run.

Stage 1 trains the decoder of a ResNet U-Net on a frozen encoder; stage 2
trains everything except the batch-norm layers, which stay in inference mode
(section 3.3 of the paper, after fast.ai). Each stage gets its own epochs and
(peak) learning rate from the `[unet34]` table and a fresh optimizer whose
schedule (`unet34.schedule`, one-cycle by default; the paper's STLR is
`slanted_triangular`) spans that stage alone. Epochs are numbered on across the
stages, so history.csv and TensorBoard show one continuous run and the best
checkpoint by validation Dice is chosen over both stages.

Reference: F. Guth, T. E. de Campos, "Skin lesion segmentation using U-Net
and good training strategies", 2018 (arXiv:1811.11314).

Example:

```
lesionkeras fit --method unet34 --config configs/unet34_isic2018.toml --data ISIC2018/
```
"""

from __future__ import annotations

import dataclasses
import functools

from lesionkeras import losses, metrics
from lesionkeras.data import pipeline
from lesionkeras.errors import ConfigError
from lesionkeras.trainers import baseline
from lesionkeras.trainers.stages import freeze_encoder, unfreeze_except_batch_norm

#: The stages in order; what each makes trainable.
STAGES = (1, 2)


def stage_lr(cfg, stage: int) -> float:
    """The (peak) learning rate of `stage` (1 or 2).

    Args:
        cfg: `Config`.
        stage: int. 1 (frozen encoder) or 2 (all but batch norm).

    Returns:
        `unet34.stage1_lr` or `train.lr` for stage 1; `unet34.stage2_lr` or a
        tenth of the stage-1 rate for stage 2.
    """
    u = cfg.unet34
    first = u.stage1_lr or cfg.train.lr
    if stage == 1:
        return first
    if stage == 2:
        return u.stage2_lr or first / 10.0
    raise ValueError(f"`stage` must be 1 or 2. Received: stage={stage!r}")


def stage_epochs(cfg, stage: int) -> int:
    """`unet34.stage1_epochs` or `unet34.stage2_epochs`."""
    if stage not in STAGES:
        raise ValueError(f"`stage` must be 1 or 2. Received: stage={stage!r}")
    return getattr(cfg.unet34, f"stage{stage}_epochs")


def stage_train_config(cfg, stage: int):
    """The `[train]` table as `stage` sees it: its schedule, rate and epochs."""
    return dataclasses.replace(
        cfg.train, schedule=cfg.unet34.schedule, lr=stage_lr(cfg, stage),
        epochs=stage_epochs(cfg, stage),
    )


def compile_stage(model, cfg, stage: int, steps_per_epoch: int):
    """Sets what `model` trains in `stage` and compiles it with a fresh optimizer.

    Args:
        model: a ResNet U-Net (its nested layer `"encoder"` is frozen in stage 1).
        cfg: `Config`.
        stage: int. 1 (frozen encoder) or 2 (all but batch norm).
        steps_per_epoch: int. Optimizer steps per epoch (the schedule spans the stage).

    Raises:
        ConfigError: the model has no `encoder` layer.
    """
    try:
        if stage == 1:
            freeze_encoder(model)
        else:
            unfreeze_except_batch_norm(model)
    except ValueError as e:
        raise ConfigError(f"`method = \"unet34\"`: {e}") from None
    # A new optimizer: its step counter (the schedule's clock) starts at 0 and its
    # slots match the variables this stage trains.
    model.compile(
        optimizer=baseline.make_optimizer(stage_train_config(cfg, stage), steps_per_epoch),
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics.default_metrics(threshold=cfg.train.threshold, from_logits=True),
        jit_compile=baseline.jit_option(cfg.train),
    )
    return model


def build(cfg, steps_per_epoch=None):
    """The ResNet U-Net, compiled for stage 1 (call inside the strategy scope).

    Args:
        cfg: `Config`.
        steps_per_epoch: int or None. Optimizer steps per epoch.
    """
    model = baseline.build_model(cfg)
    return compile_stage(model, cfg, 1, steps_per_epoch or 1)


def stages(cfg, train_df, mean, std):
    """The two stages: `[(dataset, epochs, None, setup), ...]`.

    Args:
        cfg: `Config`.
        train_df: training rows of the manifest.
        mean: per-channel mean. std: per-channel std.

    Returns:
        list of (tf.data.Dataset, int, None, callable): the same training
        stream for both stages; `setup(model)` freezes or unfreezes and
        recompiles the model before its stage (the rate comes with the schedule).
    """
    d = cfg.data
    ds = pipeline.make_dataset(
        pipeline.decoded_dataset(
            train_df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
        ),
        batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
        augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
    )
    steps = max(int(ds.cardinality()), 1)
    return [
        (ds, stage_epochs(cfg, s), None,
         functools.partial(_setup, cfg=cfg, stage=s, steps_per_epoch=steps))
        for s in STAGES
    ]


def _setup(model, *, cfg, stage, steps_per_epoch):
    compile_stage(model, cfg, stage, steps_per_epoch)
