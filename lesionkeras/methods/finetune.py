"""`--method finetune`: pre-train on the noisy masks, then fine-tune on the clean ones.

The baseline of Mirikharaji, Yan, Hamarneh, "Learning to Segment Skin Lesions
from Noisy Annotations" (MICCAI DART 2019), Table 1 and Fig. 2. One command,
one run directory: stage 1 trains the plain segmentation model
(`method = "baseline"`'s model, loss and optimiser) for `train.epochs` epochs
on the noisy training images; stage 2 continues the same model and
optimiser for `meta.finetune_epochs` epochs on the clean training images at
`meta.finetune_lr` (default `train.lr / 10`). As in the meta-reweighting
methods, the noisy stage also trains on the clean images with their clean masks
unless `meta.clean_in_noisy = false` (`meta.split_streams`). The epochs are numbered
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

from lesionkeras.errors import ConfigError
from lesionkeras.methods import baseline
from lesionkeras.methods import reweight as meta
from lesionkeras.training import method
from lesionkeras.training.method import Stage



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


def stages(cfg, train_df, mean, std):
    """The two training stages: `[(dataset, epochs, learning_rate), ...]`.

    Args:
        cfg: `Config`.
        train_df: training rows of the manifest, `clean` marked.
        mean: per-channel mean. std: per-channel std.

    Returns:
        list of `Stage` (tf.data.Dataset, int, float or None): the noisy stage at the
        configured rate (None: leave it), then the clean stage at `finetune_lr(cfg)`.
    """
    noisy_df, clean_df = meta.split_streams(cfg, train_df)
    return [
        Stage(meta.plain_train_dataset(cfg, noisy_df, mean, std), cfg.train.epochs),
        Stage(meta.plain_train_dataset(cfg, clean_df, mean, std), cfg.meta.finetune_epochs,
              finetune_lr(cfg)),
    ]


@method.register
class Finetune(meta.Reweight):
    """Pre-training on the noisy masks, then fine-tuning on the clean ones (Mirikharaji 2019)."""

    name = "finetune"
    names = ()

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def stages(self, data):
        return stages(self.cfg, data.train_df, data.mean, data.std)

    def method_callbacks(self, data):
        return []
