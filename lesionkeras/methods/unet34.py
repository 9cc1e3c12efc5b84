"""`--method unet34`: the staged fine-tuning of Guth & deCampos 2018, in one run.

Stage 1 trains the decoder of a ResNet U-Net on a frozen encoder; stage 2
trains everything except the batch-norm layers, which stay in inference mode
(section 3.3 of the paper, after fast.ai). Each stage gets its own epochs and
(peak) learning rate from the `[unet34]` table and a fresh optimizer whose
schedule (`unet34.schedule`, one-cycle by default; the paper's STLR is
`slanted_triangular`) spans that stage alone. Epochs are numbered on across the
stages, so history.csv and TensorBoard show one continuous run and the best
checkpoint by validation Dice is chosen over both stages.

The stages can also be given as `[[unet34.stages]]` tables (`trainable` = `decoder`,
`all_but_bn` or `all`; `epochs`; `lr`, a number or "find"), which replace
the two of the `[unet34]` table: they are config entries, not code paths.

Pyramid transfer (section 3.2, `unet34.pyramid = "128,256"`): the whole stage
sequence runs at each size in turn on the same fully convolutional model, so
the run is 128 px stage 1, 128 px stage 2, 256 px stage 1, 256 px stage 2; the
weights carry over from one to the next and only the training images change
size. Validation (hence the BestDice checkpoint) is at the last size,
`data.image_size`, throughout, so every epoch is scored alike. With
`unet34.lr_find`, each of these stages first runs the LR range test on its own
frozen or unfrozen model (weights restored afterwards) and trains at the
suggested rate; the rates and curves are kept in `RUN/lr_find/`, and a resumed
run reuses them.

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
import json
import math
from pathlib import Path

from lesionkeras import config
from lesionkeras import config as config_lib
from lesionkeras import files, losses, metrics
from lesionkeras.data import pipeline
from lesionkeras.errors import ConfigError
from lesionkeras.training import lr_find, method, segmentation
from lesionkeras.training.method import Stage
from lesionkeras.training.segmentation import SegmentationMethod
from lesionkeras.training.stages import freeze_encoder, unfreeze_all, unfreeze_except_batch_norm

#: `trainable` of a `[[unet34.stages]]` table: what the stage trains.
STAGE_TRAINABLE = ("decoder", "all_but_bn", "all")


def check_stages(value, where_all, origin):
    """`[[unet34.stages]]` tables -> tuple of `{"trainable", "epochs"[, "lr"]}` dicts."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(
            f"{origin}: `{where_all}` must be an array of tables ([[{where_all}]]). Received: {value!r}"
        )
    checked = []
    for i, table in enumerate(value, 1):
        where = f"{where_all}[{i}]"
        unknown = sorted(set(table) - {"trainable", "epochs", "lr"})
        if unknown:
            raise ConfigError(f"{origin}: unknown config key `{where}.{unknown[0]}`")
        for key in ("trainable", "epochs"):
            if key not in table:
                raise ConfigError(f"{origin}: `{where}` needs `{key}`")
        if table["trainable"] not in STAGE_TRAINABLE:
            raise ConfigError(
                f"{origin}: `{where}.trainable` must be one of {', '.join(STAGE_TRAINABLE)}. "
                f"Received: {table['trainable']!r}"
            )
        epochs = table["epochs"]
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(
                f"{origin}: `{where}.epochs` must be an integer >= 1. Received: {epochs!r}"
            )
        stage = {"trainable": table["trainable"], "epochs": epochs}
        if "lr" in table:
            lr = table["lr"]
            ok = lr == "find" or (
                isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0
            )
            if not ok:
                raise ConfigError(
                    f"{origin}: `{where}.lr` must be a number > 0 or \"find\". Received: {lr!r}"
                )
            stage["lr"] = lr if lr == "find" else float(lr)
        checked.append(stage)
    return tuple(checked)




@dataclasses.dataclass(frozen=True)
class Unet34Config:
    stages: tuple = config.field(
        (),
        "unet34: training stages in order, as `[[unet34.stages]]` tables with `trainable` "
        "(`decoder`: encoder frozen; `all_but_bn`: batch norms frozen; `all`), `epochs` and "
        "`lr` (a number, or \"find\" for the LR range test on that stage's model; default "
        "train.lr); empty = the two stages of stage1_*/stage2_*.",
        check=lambda value, where, origin: check_stages(value, where, origin),
    )
    schedule: str = config.field(
        "one_cycle",
        "unet34: learning-rate schedule of each stage, restarted per stage (`train.epochs` "
        "and `train.schedule` are not used by this method).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay"),
    )
    stage1_epochs: int = config.field(10, "unet34: epochs of stage 1 (encoder frozen).", minimum=1)
    stage1_lr: float = config.field(
        0.0, "unet34: (peak) learning rate of stage 1 (0 = train.lr).", minimum=0.0
    )
    stage2_epochs: int = config.field(
        10, "unet34: epochs of stage 2 (all but the batch norms trainable).", minimum=1
    )
    stage2_lr: float = config.field(
        0.0, "unet34: (peak) learning rate of stage 2 (0 = the stage-1 rate / 10).", minimum=0.0
    )
    lr_find: bool = config.field(
        False,
        "unet34: before each stage, run the LR range test on that stage's model (frozen or "
        "unfrozen) and train with the suggested rate (stage1_lr/stage2_lr are then unused).",
    )
    lr_find_steps: int = config.field(
        100, "unet34: batches of each stage's LR range test (it stops early on divergence).",
        minimum=2,
    )
    pyramid: str = config.field(
        "",
        "unet34: pyramid transfer, comma-separated sizes (e.g. `128,256`): the stages run at "
        "each size in turn on the same model; the last size must equal data.image_size, at "
        "which validation runs throughout (empty = off).", flag=True)
    pyramid_epochs: str = config.field(
        "",
        "unet34: comma-separated epochs of every (size, stage) in run order, e.g. `10,10,5,5` "
        "for two sizes (0 skips that stage; empty = stage1_epochs/stage2_epochs at each size).", flag=True)

    @staticmethod
    def cli_overrides(overrides):
        """`--pyramid` without `--image-size`: validation and prediction run at its last size."""
        if overrides.get("unet34.pyramid") and "data.image_size" not in overrides:
            sizes = config.parse_int_list(overrides["unet34.pyramid"], "--pyramid")
            if sizes:
                overrides = {**overrides, "data.image_size": sizes[-1]}
        return overrides


def check_section(cfg, origin):
    """Rules of `[unet34]` that involve other keys: stages and pyramid need the method."""
    if cfg.unet34.stages and cfg.method != "unet34":
        raise ConfigError(
            f"{origin}: `[[unet34.stages]]` needs `method = \"unet34\"`. Received: {cfg.method!r}"
        )
    u = cfg.unet34
    try:
        sizes = config.parse_int_list(u.pyramid, "unet34.pyramid")
        epochs = config.parse_int_list(u.pyramid_epochs, "unet34.pyramid_epochs")
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    if u.pyramid_epochs and not sizes:
        raise ConfigError(f"{origin}: `unet34.pyramid_epochs` needs `unet34.pyramid`")
    if not sizes:
        return
    if cfg.method != "unet34":
        raise ConfigError(
            f"{origin}: `unet34.pyramid` needs `method = \"unet34\"`. Received: {cfg.method!r}"
        )
    bad = [s for s in sizes if s < 32 or s % 32]
    if bad:
        raise ConfigError(
            f"{origin}: `unet34.pyramid` sizes must be multiples of 32 (the ResNet encoder "
            f"halves the input five times). Received: {u.pyramid!r}"
        )
    if sizes[-1] != cfg.data.image_size:
        raise ConfigError(
            f"{origin}: the last `unet34.pyramid` size ({sizes[-1]}) must equal "
            f"`data.image_size` ({cfg.data.image_size}), the size of validation and prediction"
        )
    if cfg.data.crop_size:
        raise ConfigError(f"{origin}: `unet34.pyramid` cannot be combined with `data.crop_size`")
    per_size = len(cfg.unet34.stages) or 2
    if epochs and (len(epochs) != per_size * len(sizes) or min(epochs) < 0 or not sum(epochs)):
        raise ConfigError(
            f"{origin}: `unet34.pyramid_epochs` needs {per_size * len(sizes)} non-negative "
            f"entries (each of the {per_size} stages at each of the {len(sizes)} sizes), not "
            f"all 0. Received: {u.pyramid_epochs!r}"
        )


config.register_section("unet34", Unet34Config, check_section)


#: The default stages (no `[[unet34.stages]]`), in order; what each makes trainable.
STAGES = (1, 2)


def stage_specs(cfg) -> list[dict]:
    """The stages in order as `{"trainable", "epochs", "lr"}` dicts.

    `[[unet34.stages]]` tables if the config has them (a missing `lr` is `train.lr`),
    else stage 1 (`decoder`: encoder frozen) and stage 2 (`all_but_bn`) from
    the `[unet34]` table. With `unet34.lr_find` every stage's `lr` is "find".
    """
    if cfg.unet34.stages:
        specs = [{"lr": cfg.train.lr, **s} for s in cfg.unet34.stages]
    else:
        u = cfg.unet34
        first = u.stage1_lr or cfg.train.lr
        specs = [
            {"trainable": "decoder", "epochs": u.stage1_epochs, "lr": first},
            {"trainable": "all_but_bn", "epochs": u.stage2_epochs,
             "lr": u.stage2_lr or first / 10.0},
        ]
    if cfg.unet34.lr_find:
        specs = [{**s, "lr": "find"} for s in specs]
    return specs


def _spec(cfg, stage):
    specs = stage_specs(cfg)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= len(specs):
        raise ValueError(f"`stage` must be 1 to {len(specs)}. Received: stage={stage!r}")
    return specs[stage - 1]


def stage_lr(cfg, stage: int) -> float:
    """The configured (peak) learning rate of `stage` (1-based).

    Args:
        cfg: `Config`.
        stage: int. 1 (frozen encoder) or 2 (all but batch norm) by default,
            else the position in `[[unet34.stages]]`.

    Returns:
        Without `[[unet34.stages]]`: `unet34.stage1_lr` or `train.lr` for stage 1;
        `unet34.stage2_lr` or a tenth of the stage-1 rate for stage 2. A stage
        whose rate is found returns `train.lr` (used if the test gives none).
    """
    if cfg.unet34.lr_find:
        # The rate the stage would have without the test: the fallback.
        return stage_lr(cfg.override({"unet34.lr_find": False}), stage)
    lr = _spec(cfg, stage)["lr"]
    return cfg.train.lr if lr == "find" else lr


def stage_finds_lr(cfg, stage: int) -> bool:
    """Whether `stage` runs the LR range test (`lr = "find"` or `unet34.lr_find`)."""
    return _spec(cfg, stage)["lr"] == "find"


def stage_epochs(cfg, stage: int) -> int:
    """The configured epochs of `stage` (`unet34.stage{1,2}_epochs` by default)."""
    return _spec(cfg, stage)["epochs"]


def stage_train_config(cfg, stage: int, lr: float | None = None, epochs: int | None = None):
    """The `[train]` table as `stage` sees it: its schedule, rate and epochs.

    Args:
        cfg: `Config`. stage: int. 1-based position in `stage_specs(cfg)`.
        lr: float or None. A rate that replaces the configured one (e.g. found).
        epochs: int or None. The stage's epochs (the schedule's span) if not
            `stage{1,2}_epochs` (pyramid stages).
    """
    return dataclasses.replace(
        cfg.train, schedule=cfg.unet34.schedule, lr=lr or stage_lr(cfg, stage),
        epochs=epochs or stage_epochs(cfg, stage),
    )


def plan(cfg) -> list[tuple[int, int, int]]:
    """Every training stage in run order as `(image size, stage, epochs)`.

    Without a pyramid: the stages (`stage_specs`) in order at `data.image_size`.
    With `unet34.pyramid`, all stages at each size in turn, their epochs from
    `unet34.pyramid_epochs` (stages given 0 epochs are left out) or else the
    stages' own epochs at every size.
    """
    sizes = config_lib.parse_int_list(cfg.unet34.pyramid, "unet34.pyramid")
    sizes = sizes or [cfg.data.image_size]
    order = range(1, len(stage_specs(cfg)) + 1)
    epochs = config_lib.parse_int_list(cfg.unet34.pyramid_epochs, "unet34.pyramid_epochs")
    epochs = epochs or [stage_epochs(cfg, s) for _ in sizes for s in order]
    steps = [(size, s) for size in sizes for s in order]
    return [(size, s, e) for (size, s), e in zip(steps, epochs) if e > 0]


def _apply_stage(model, cfg, stage):
    trainable = _spec(cfg, stage)["trainable"]
    try:
        if trainable == "decoder":
            freeze_encoder(model)
        elif trainable == "all_but_bn":
            unfreeze_except_batch_norm(model)
        else:
            unfreeze_all(model)
    except ValueError as e:
        raise ConfigError(f"`method = \"unet34\"`: {e}") from None


def compile_stage(model, cfg, stage: int, steps_per_epoch: int, lr: float | None = None,
                  epochs: int | None = None):
    """Sets what `model` trains in `stage` and compiles it with a fresh optimizer.

    Args:
        model: a ResNet U-Net (its nested layer `"encoder"` is frozen in stage 1).
        cfg: `Config`.
        stage: int. 1-based position in `stage_specs(cfg)` (by default 1: frozen
            encoder, 2: all but batch norm).
        steps_per_epoch: int. Optimizer steps per epoch (the schedule spans the stage).
        lr: float or None. Peak rate replacing the configured one (e.g. found).
        epochs: int or None. Epochs of the stage, if not `stage{1,2}_epochs`.

    Raises:
        ConfigError: the model has no `encoder` layer.
    """
    _apply_stage(model, cfg, stage)
    # A new optimizer: its step counter (the schedule's clock) starts at 0 and its
    # slots match the variables this stage trains.
    train_cfg = stage_train_config(cfg, stage, lr, epochs)
    _compile_with(model, cfg, segmentation.make_optimizer(train_cfg, steps_per_epoch))
    return model


def _compile_with(model, cfg, optimizer):
    model.compile(
        optimizer=optimizer,
        loss=losses.get_loss(cfg.train.loss),
        metrics=metrics.default_metrics(threshold=cfg.train.threshold, from_logits=True),
        jit_compile=segmentation.jit_option(cfg.train),
    )


def find_stage_lr(model, cfg, stage: int, dataset, key: str, log=print) -> float:
    """The LR range test on `model` as `stage` trains it; its weights are restored.

    The curve goes to `RUN/lr_find/<key>.csv` and `.png` and the rate to
    `RUN/lr_find/rates.json`, where a resumed run finds it again (the test is
    not repeated, so the resumed stage keeps its schedule).

    Args:
        model: the ResNet U-Net. cfg: `Config` (`cfg.out` is the run directory).
        stage: int. 1-based stage. dataset: the stage's training batches.
        key: str. Name of the stage, e.g. `"128px-stage1"`.
        log: callable. Where the fallback note goes.

    Returns:
        float. The suggested rate. If the test is inconclusive (`LRFindResult.
        conclusive` is False) or gave none: the rate this stage found at the
        previous pyramid size, else the configured one.
    """
    out = Path(cfg.out) / "lr_find" if cfg.out else None
    rates_path = out / "rates.json" if out else None
    rates = json.loads(rates_path.read_text()) if rates_path and rates_path.exists() else {}
    if key in rates:
        return float(rates[key])
    _apply_stage(model, cfg, stage)
    # The test drives the rate of a constant-rate optimizer itself.
    _compile_with(model, cfg, segmentation.make_optimizer(
        dataclasses.replace(cfg.train, schedule="constant", lr=1e-7), 1))
    result = lr_find.lr_range_test(model, dataset, steps=cfg.unet34.lr_find_steps)
    rate = result.suggestion
    if not (result.conclusive and math.isfinite(rate)):
        # A flat, noisy curve (e.g. right after a pyramid transfer): keep the rate
        # this stage had at the previous size, else the configured one.
        earlier = [v for k, v in rates.items() if k.endswith(f"-stage{stage}")]
        rate = float(earlier[-1]) if earlier else stage_lr(cfg, stage)
        log(f"{key}: the LR range test shows no clear fall of the loss (flat within its "
            f"noise); using {rate:.3g} ({'the previous size' if earlier else 'configured'})")
    if out:
        out.mkdir(parents=True, exist_ok=True)
        result.write_csv(out / f"{key}.csv")
        lr_find.plot(result, out / f"{key}.png")
        rates[key] = rate
        files.write_text(rates_path, json.dumps(rates, indent=2) + "\n")
    return rate


def build(cfg, steps_per_epoch=None):
    """The ResNet U-Net, compiled for stage 1 (call inside the strategy scope).

    Args:
        cfg: `Config`.
        steps_per_epoch: int or None. Optimizer steps per epoch.
    """
    model = segmentation.build_model(cfg)
    return compile_stage(model, cfg, 1, steps_per_epoch or 1)


def stages(cfg, train_df, mean, std):
    """The training stages of `plan(cfg)`: `[Stage(dataset, epochs, None, setup), ...]`.

    Args:
        cfg: `Config`.
        train_df: training rows of the manifest.
        mean: per-channel mean. std: per-channel std.

    Returns:
        list of `Stage` (tf.data.Dataset, int, None, callable): the training stream at
        the stage's size; `setup(model)` freezes or unfreezes, finds the rate
        if asked, and recompiles the model before its stage (the rate comes
        with the schedule).
    """
    d = cfg.data
    streams = {}
    out = []
    pyramid = bool(cfg.unet34.pyramid)
    for size, stage, epochs in plan(cfg):
        if size not in streams:
            streams[size] = pipeline.make_dataset(
                pipeline.decoded_dataset(
                    train_df, size, cache=d.cache, color_constancy=d.color_constancy
                ),
                batch_size=cfg.train.batch_size, mean=mean, std=std, training=True,
                augment=cfg.augment, crop_size=d.crop_size, seed=cfg.seed,
            )
        ds = streams[size]
        key = f"{size}px-stage{stage}" if pyramid else f"stage{stage}"
        setup = functools.partial(
            _setup, cfg=cfg, stage=stage, steps_per_epoch=max(int(ds.cardinality()), 1),
            dataset=ds, key=key, epochs=epochs,
        )
        out.append(Stage(ds, epochs, None, setup))
    return out


def _setup(model, *, cfg, stage, steps_per_epoch, dataset, key, epochs):
    lr = find_stage_lr(model, cfg, stage, dataset, key) if stage_finds_lr(cfg, stage) else None
    compile_stage(model, cfg, stage, steps_per_epoch, lr=lr, epochs=epochs)


@method.register
class Unet34(SegmentationMethod):
    """ResNet34 U-Net with the fast.ai recipe (Guth & deCampos 2018): stages, LR finder, pyramid."""

    name = "unet34"
    default_model = "resnet34_unet"

    def build(self, data, steps_per_epoch):
        return build(self.cfg, steps_per_epoch)

    def stages(self, data):
        return stages(self.cfg, data.train_df, data.mean, data.std)
