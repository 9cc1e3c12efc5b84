"""`--method finetune`: pre-train on the noisy masks, then fine-tune on the clean ones.

The baseline of Mirikharaji, Yan, Hamarneh, "Learning to Segment Skin Lesions
from Noisy Annotations" (MICCAI DART 2019), Table 1 and Fig. 2. One command,
one run directory: stage 1 trains the plain segmentation model
(`method = "baseline"`'s model, loss and optimiser) for `train.epochs` epochs
on the noisy training images; stage 2 continues the same model and
optimiser for `meta.finetune_epochs` epochs on the clean training images at
`meta.finetune_lr` (default `train.lr / 10`). The epochs are numbered
continuously (history.csv, TensorBoard), and the best checkpoint is chosen
over both stages by validation Dice.

The clean and noisy data come from the same options as `method = "meta"`:
`meta.simulate_noise` + `meta.clean_count`, or `meta.noisy_data` + `meta.clean_data`.

Example:

```
lesionkeras fit --method finetune --simulate-noise 3-vertex --clean-count 16 \\
    --epochs 20 --finetune-epochs 10
```
"""

from __future__ import annotations

from lesionkeras.data import pipeline
from lesionkeras.errors import ConfigError, DataError
from lesionkeras.trainers import baseline, meta

# Same data sources and noisy/clean marking as the meta-reweighting methods.
load_manifest = meta.load_manifest
prepare_manifest = meta.prepare_manifest


def finetune_lr(cfg) -> float:
    """The learning rate of stage 2: `meta.finetune_lr`, or `train.lr / 10` when 0."""
    return cfg.meta.finetune_lr or cfg.train.lr / 10.0


def build(cfg, steps_per_epoch=None):
    """The compiled baseline model (call inside the strategy scope).

    Raises:
        ConfigError: a step schedule, whose rate cannot be lowered between stages.
    """
    if cfg.train.schedule not in ("constant", "plateau"):
        raise ConfigError(
            "`method = \"finetune\"` needs `train.schedule` = constant or plateau (the rate "
            f"is set anew for the fine-tuning stage). Received: {cfg.train.schedule!r}"
        )
    return baseline.build(cfg, steps_per_epoch)


def _split(cfg, train_df):
    is_clean = train_df["clean"].astype(bool)
    noisy_df = train_df[~is_clean].reset_index(drop=True)
    clean_df = train_df[is_clean].reset_index(drop=True)
    if noisy_df.empty or clean_df.empty:
        raise DataError(
            f"{cfg.data.source}: finetune needs both noisy and clean training images "
            f"(found {len(noisy_df)} noisy, {len(clean_df)} clean)"
        )
    return noisy_df, clean_df


def stages(cfg, train_df, mean, std):
    """The two training stages: `[(dataset, epochs, learning_rate), ...]`.

    Args:
        cfg: `Config`.
        train_df: training rows of the manifest, `clean` marked.
        mean: per-channel mean. std: per-channel std.

    Returns:
        list of (tf.data.Dataset, int, float or None): the noisy stage at the
        configured rate (None: leave it), then the clean stage at `finetune_lr(cfg)`.
    """
    d = cfg.data
    out = []
    for df, epochs, lr in zip(
        _split(cfg, train_df), (cfg.train.epochs, cfg.meta.finetune_epochs), (None, finetune_lr(cfg))
    ):
        ds = pipeline.make_dataset(
            pipeline.decoded_dataset(
                df, d.image_size, cache=d.cache, color_constancy=d.color_constancy
            ),
            batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
            augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
        )
        out.append((ds, epochs, lr))
    return out
