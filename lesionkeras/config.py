"""Run configuration: TOML (stdlib `tomllib`) -> frozen dataclasses.

A config has a few top-level keys and one table per concern (`data`,
`augment`, `model`, `train`). Every key has a default, a type and, where the
set of values is closed, a list of choices, so a typo or a bad value is caught
before anything runs and reported as one line naming the key. CLI flags are
applied on top of the file with `Config.override`.

Example:

```python
cfg = load_config("configs/baseline.toml", overrides={"train.epochs": 3})
cfg.train.epochs  # 3
```
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import tomli_w

from lesionkeras.errors import ConfigError


def _field(default, help, choices=None, minimum=None):
    return dataclasses.field(
        default=default,
        metadata={"help": help, "choices": choices, "minimum": minimum},
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = _field(
        "synthetic", "Data folder, manifest CSV, or `synthetic` (built-in dataset)."
    )
    image_size: int = _field(64, "Side of the square model input, in pixels.", minimum=16)
    crop_size: int = _field(
        0,
        "If > 0: resize to image_size, then train on random crops of this side "
        "(validation uses a centre crop).",
        minimum=0,
    )
    limit: int = _field(0, "Use only the first N images (0 = all).", minimum=0)
    val_fraction: float = _field(0.2, "Fraction of images held out for validation.")
    val_list: str = _field(
        "", "Text file of image ids (one per line) that form the validation split."
    )
    folds: int = _field(0, "Number of k-fold groups written to the manifest (0 = none).", minimum=0)
    fold: int = _field(-1, "Fold used as validation when folds > 0 (-1 = use val_fraction).")
    normalize: str = _field(
        "dataset",
        "Per-channel normalisation: `dataset` (mean/std of the training split) or `imagenet`.",
        choices=("dataset", "imagenet"),
    )
    mean: tuple = _field((), "Per-channel mean (0-255); filled in by `fit` and stored in the run config.")
    std: tuple = _field((), "Per-channel std (0-255); filled in by `fit` and stored in the run config.")
    cache: bool = _field(True, "Cache decoded, resized images in memory.")
    color_constancy: str = _field(
        "none",
        "Colour balance applied once to every decoded image: `none` or `shades_of_gray` "
        "(Finlayson & Trezzi 2004, p = 6).",
        choices=("none", "shades_of_gray"),
    )
    synthetic_count: int = _field(240, "Number of images of the built-in synthetic dataset.", minimum=8)
    synthetic_size: int = _field(
        0, "Side of the synthetic images on disk (0 = same as image_size).", minimum=0
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = _field(True, "Random horizontal and vertical flips.")
    rotate90: bool = _field(True, "Random rotations by multiples of 90 degrees.")
    dihedral: bool = _field(
        False,
        "One of the 8 dihedral transforms (4 rotations by 90 degrees, each with or without a "
        "flip), uniformly at random; when true it replaces `flip` and `rotate90`.",
    )
    rotation: float = _field(0.0, "Random rotation up to this many degrees (0 = off).", minimum=0.0)
    zoom: float = _field(0.0, "Random zoom in/out by up to this fraction (0 = off).", minimum=0.0)
    brightness: float = _field(0.0, "Colour jitter: brightness factor (0 = off).", minimum=0.0)
    contrast: float = _field(0.0, "Colour jitter: contrast factor (0 = off).", minimum=0.0)
    saturation: float = _field(0.0, "Colour jitter: saturation factor (0 = off).", minimum=0.0)
    hue: float = _field(0.0, "Colour jitter: hue factor (0 = off).", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = _field(
        "", "Registered model name (empty: the method's default, `segan` for "
        "`--method segan`, `unet` otherwise)."
    )
    depth: int = _field(4, "Number of down-sampling levels of the U-Net.", minimum=1)
    filters: int = _field(16, "Filters of the first level; doubled at each level.", minimum=1)
    batch_norm: bool = _field(True, "Batch normalisation after every convolution.")
    dropout: float = _field(0.0, "Dropout rate at the bottleneck (0 = off).", minimum=0.0)
    upsampling: str = _field(
        "bilinear",
        "Decoder up-sampling: `bilinear` resize + conv, or `transpose` convolution.",
        choices=("bilinear", "transpose"),
    )
    encoder_weights: str = _field(
        "",
        "ResNet U-Nets: local encoder weights (`.weights.h5` of a keras-hub ResNetBackbone, "
        "or a keras-hub preset folder); empty = random initialisation.",
    )
    encoder_filters: int = _field(
        64, "vgg19se: filters of the first VGG19 block (64 = VGG19; smaller for quick tests).",
        minimum=1,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = _field("adam", "Optimiser.", choices=("adam", "adamw", "sgd"))
    lr: float = _field(
        1e-3, "Learning rate (the peak rate of `one_cycle` and `slanted_triangular`).",
        minimum=0.0,
    )
    schedule: str = _field(
        "constant",
        "Learning-rate schedule: `constant`, `one_cycle` (Smith), `slanted_triangular` "
        "(Howard & Ruder), `linear_decay` (to final_lr), or `plateau` (divide on a plateau "
        "of val_dice).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau"),
    )
    pct_start: float = _field(0.3, "one_cycle: fraction of the steps spent rising.")
    div_factor: float = _field(25.0, "one_cycle: lr / starting rate.", minimum=1.0)
    final_div_factor: float = _field(
        1e4, "one_cycle: starting rate / final rate.", minimum=1.0
    )
    cut_frac: float = _field(0.1, "slanted_triangular: fraction of the steps spent rising.")
    stlr_ratio: float = _field(
        32.0, "slanted_triangular: lr / lowest rate.", minimum=1.0
    )
    final_lr: float = _field(0.0, "linear_decay: rate reached at the last step.", minimum=0.0)
    plateau_divide: float = _field(10.0, "plateau: divide the rate by this.", minimum=1.0)
    plateau_patience: int = _field(
        5, "plateau: epochs without a better val_dice before dividing.", minimum=1
    )
    weight_decay: float = _field(0.0, "Decoupled weight decay (adamw, sgd).", minimum=0.0)
    momentum: float = _field(0.9, "SGD momentum.", minimum=0.0)
    epochs: int = _field(20, "Training epochs.", minimum=1)
    batch_size: int = _field(8, "Global batch size (split across replicas).", minimum=1)
    loss: str = _field(
        "bce+dice", "Loss.", choices=("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")
    )
    threshold: float = _field(0.5, "Probability threshold of the binary masks.")
    strategy: str = _field(
        "auto", "Distribution strategy.", choices=("auto", "default", "mirrored", "multiworker")
    )
    mixed_precision: bool = _field(False, "Mixed precision (float16 on GPU, bfloat16 on CPU).")
    jit_compile: str = _field(
        "auto", "XLA compilation of the train step.", choices=("auto", "true", "false")
    )
    image_every: int = _field(
        5, "Write the TensorBoard image grid every N epochs (0 = never).", minimum=0
    )
    image_count: int = _field(4, "Validation images shown in the TensorBoard grid.", minimum=1)
    progress: bool = _field(True, "Show the Keras progress bar.")
    freeze_encoder_epochs: int = _field(
        0, "Train with the model's encoder frozen for the first N epochs, then train all "
        "(baseline, segan; models with an encoder, e.g. vgg19se; ISIC 2018 report: 50).",
        minimum=0,
    )


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    meta_grad: str = _field(
        "forward",
        "meta: how eq. 7 is differentiated: `forward` (closed form at W0 = 0, one "
        "forward-mode pass; the default, faster and lighter) or `nested` tapes (the reference).",
        choices=("nested", "forward"),
    )
    clean_batch_size: int = _field(10, "meta: clean images per step (paper: 10).", minimum=1)
    simulate_noise: str = _field(
        "",
        "meta: experiment mode, replace the masks of all training images but `clean_count` "
        "by this polygon noise (`7-vertex`, `3-vertex`, `4-axis`, `maximal`; empty = off).",
        choices=("", "7-vertex", "3-vertex", "4-axis", "maximal"),
    )
    clean_count: int = _field(
        16, "meta: clean training images kept by `simulate_noise`.", minimum=1
    )
    noisy_data: str = _field("", "meta: folder of images with noisy masks (real use).")
    clean_data: str = _field(
        "", "meta: folder of images with clean masks (real use; also gives the validation split)."
    )
    finetune_epochs: int = _field(
        10, "finetune: epochs on the clean images after `train.epochs` on the noisy ones.",
        minimum=1,
    )
    finetune_lr: float = _field(
        0.0, "finetune: learning rate of the clean stage (0 = train.lr / 10).", minimum=0.0
    )
    weight_image_every: int = _field(
        5, "meta: write the weight maps (and with simulated noise the Fig. 3 overlay) to "
        "TensorBoard every N epochs (0 = never).", minimum=0,
    )


@dataclasses.dataclass(frozen=True)
class SeganConfig:
    clip: float = _field(
        0.05, "segan: critic weights are clamped to [-clip, clip] after each critic step.",
        minimum=0.0,
    )
    critic_blocks: int = _field(5, "segan: global-convolution blocks of the critic.", minimum=1)
    critic_filters: int = _field(
        16, "segan: filters of the first critic block (doubled per block, at most 128).",
        minimum=1,
    )
    critic_kernel: int = _field(9, "segan: k of the critic's 1 x k + k x 1 convolutions.", minimum=1)
    k_decay: float = _field(
        0.9, "segan: adaptive logistic k is multiplied by this every `k_every` epochs.",
        minimum=0.0,
    )
    k_every: int = _field(25, "segan: epochs between two decays of k.", minimum=1)
    k_floor: float = _field(0.3, "segan: smallest k.", minimum=0.0)
    supervised_loss: str = _field(
        "",
        "segan: extra supervised term of the segmentor (empty = off, the paper).",
        choices=("", "bce", "dice", "jaccard", "bce+dice", "bce+jaccard"),
    )
    supervised_weight: float = _field(1.0, "segan: weight of the supervised term.", minimum=0.0)
    warmup_epochs: int = _field(
        0, "segan: first epochs trained on the supervised term alone (critic still trained).",
        minimum=0,
    )
    hard_mining_weight: float = _field(
        0.0, "segan: weight of the hard-mining term, the mean soft-Dice loss of the "
        "`hard_mining_count` worst images of the batch (ISIC 2018 report; 0 = off).",
        minimum=0.0,
    )
    hard_mining_count: int = _field(
        5, "segan: images per batch (per replica) in the hard-mining term.", minimum=1
    )
    threshold_search: bool = _field(
        True,
        "segan: after training, grid-search `train.threshold` (0.05-0.95) for the best mean "
        "validation Jaccard and store it in the run config.",
    )


@dataclasses.dataclass(frozen=True)
class SmileConfig:
    structures: str = _field(
        "lesion,globules,milia_like_cyst,negative_network,pigment_network,streaks",
        "smile/multiclass: comma-separated structures (K sigmoid heads); `lesion` is the "
        "`mask` column, any other name the `attr_<name>` column of the manifest.",
    )
    empty_means_missing: bool = _field(
        False,
        "smile/multiclass: an empty mask file means `not annotated` (default: annotated "
        "and absent; a missing file always means not annotated).",
    )
    simulate_missing: float = _field(
        0.0,
        "smile/multiclass: experiment mode, drop each structure's annotation from this "
        "fraction of the training images (independently per structure, seeded; 0 = off).",
        minimum=0.0,
    )
    container: str = _field(
        "lesion",
        "smile: the structure that encloses the others (dermoscopic attributes lie inside "
        "the lesion), so that known labels follow the nesting; empty = the paper's rule "
        "for mutually exclusive structures.",
    )
    relabel_rounds: int = _field(
        0,
        "smile: SMILEr rounds T after SMILE training (0 = off); round t adds the top "
        "t / T * gamma_max of the predicted-positive unknown pixels of each non-annotated "
        "structure as positive labels, then retrains (warm start).",
        minimum=0,
    )
    gamma_max: float = _field(
        1.0, "smile: SMILEr fraction of the candidate pixels added in the last round.",
        minimum=0.0,
    )
    relabel_epochs: int = _field(5, "smile: training epochs of each SMILEr round.", minimum=1)
    uncertainty: str = _field(
        "score",
        "smile: SMILEr pixel choice: `score` (highest probability first) or `mc-dropout` "
        "(lowest MC-dropout standard deviation first; needs a model with dropout > 0).",
        choices=("score", "mc-dropout"),
    )
    mc_samples: int = _field(10, "smile: MC-dropout samples of `uncertainty = mc-dropout`.", minimum=2)


@dataclasses.dataclass(frozen=True)
class Unet34Config:
    schedule: str = _field(
        "one_cycle",
        "unet34: learning-rate schedule of each stage, restarted per stage (`train.epochs` "
        "and `train.schedule` are not used by this method).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay"),
    )
    stage1_epochs: int = _field(10, "unet34: epochs of stage 1 (encoder frozen).", minimum=1)
    stage1_lr: float = _field(
        0.0, "unet34: (peak) learning rate of stage 1 (0 = train.lr).", minimum=0.0
    )
    stage2_epochs: int = _field(
        10, "unet34: epochs of stage 2 (all but the batch norms trainable).", minimum=1
    )
    stage2_lr: float = _field(
        0.0, "unet34: (peak) learning rate of stage 2 (0 = the stage-1 rate / 10).", minimum=0.0
    )
    lr_find: bool = _field(
        False,
        "unet34: before each stage, run the LR range test on that stage's model (frozen or "
        "unfrozen) and train with the suggested rate (stage1_lr/stage2_lr are then unused).",
    )
    lr_find_steps: int = _field(
        100, "unet34: batches of each stage's LR range test (it stops early on divergence).",
        minimum=2,
    )
    pyramid: str = _field(
        "",
        "unet34: pyramid transfer, comma-separated sizes (e.g. `128,256`): the stages run at "
        "each size in turn on the same model; the last size must equal data.image_size, at "
        "which validation runs throughout (empty = off).",
    )
    pyramid_epochs: str = _field(
        "",
        "unet34: comma-separated epochs of every (size, stage) in run order, e.g. `10,10,5,5` "
        "for two sizes (0 skips that stage; empty = stage1_epochs/stage2_epochs at each size).",
    )


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    min_component_fraction: float = _field(
        0.001,
        "postprocess morph: remove connected components smaller than this fraction of the "
        "image area (0 = keep all).",
        minimum=0.0,
    )
    fill_holes: bool = _field(True, "postprocess morph: fill holes enclosed by the mask.")
    keep_largest: bool = _field(
        True, "postprocess morph: keep only the largest connected component (one lesion)."
    )
    crf_iterations: int = _field(
        5, "postprocess crf: mean-field iterations of the dense CRF.", minimum=1
    )
    crf_gaussian_sxy: float = _field(
        3.0, "postprocess crf: spatial std (pixels) of the Gaussian smoothness kernel.",
        minimum=0.0,
    )
    crf_gaussian_compat: float = _field(
        3.0, "postprocess crf: weight of the Gaussian smoothness kernel.", minimum=0.0
    )
    crf_bilateral_sxy: float = _field(
        40.0, "postprocess crf: spatial std (pixels) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_srgb: float = _field(
        13.0, "postprocess crf: colour std (0-255) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_compat: float = _field(
        10.0, "postprocess crf: weight of the bilateral appearance kernel.", minimum=0.0
    )


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    labels: str = _field(
        "",
        "classify: label CSV (ISIC 2018 Task 3 one-hot, HAM10000 metadata with `dx`, or ISIC "
        "2017 `melanoma`[/`seborrheic_keratosis`] classes); empty = `data.source` if it is a "
        "CSV, else the one label CSV found below it. The class list comes from the file.",
    )
    images: str = _field(
        "", "classify: image folder searched by image id (empty = the data folder / the CSV's folder)."
    )
    backbone: str = _field(
        "resnet101", "classify: keras-hub ResNet backbone (built from its config, no download).",
        choices=("resnet18", "resnet34", "resnet50", "resnet101"),
    )
    backbone_weights: str = _field(
        "", "classify: local `.weights.h5` of the same backbone; empty = random initialisation."
    )
    embedding_dim: int = _field(256, "classify: size of the embedding after pooling.", minimum=1)
    resize_width: int = _field(360, "classify: images are first resized to this width.", minimum=16)
    resize_height: int = _field(270, "classify: ... and this height.", minimum=16)
    crop: int = _field(
        256, "classify: side of the random training crop (validation/prediction: centre crop).",
        minimum=16,
    )
    triplet_mode: str = _field(
        "alternate_batch",
        "classify/triplet: `alternate_batch` (of every `triplet_every` steps the last minimises "
        "the triplet loss, the others cross-entropy), `alternate_epoch` (the same by epochs), "
        "or `joint` (CE + triplet_weight x triplet every step).",
        choices=("alternate_batch", "alternate_epoch", "joint"),
    )
    triplet_every: int = _field(
        2, "classify/triplet: period of the alternation, in steps or epochs.", minimum=1
    )
    margin: float = _field(0.2, "classify/triplet: margin alpha of the triplet loss.", minimum=0.0)
    triplet_weight: float = _field(1.0, "classify/triplet: scale of the triplet loss.", minimum=0.0)
    negatives: str = _field(
        "majority",
        "classify/triplet: negatives from the `majority` class of the training split (anchors "
        "and positives from the other classes; the paper), or from any `other` class.",
        choices=("majority", "other"),
    )
    # --- issue 8 (offline triplets): one key ---
    regenerate_every: int = _field(
        0, "classify/triplet: if > 0, mine triplets offline every N epochs (each minority "
        "training image anchors positives of its class and its hardest majority negative, from "
        "embeddings of the whole training set) instead of online in each batch; 0 = online.",
        minimum=0,
    )
    # --- end issue 8 ---
    normalize_embedding: bool = _field(
        True, "classify: L2-normalise embeddings for the triplet loss and nearest-mean prediction."
    )
    predict_by: str = _field(
        "auto",
        "classify: `softmax`, `nearest_mean` (least mean Euclidean distance to the stored "
        "training embeddings of each class), or `auto` (nearest_mean for triplet, softmax "
        "for softmax).",
        choices=("auto", "softmax", "nearest_mean"),
    )
    references_per_class: int = _field(
        100, "classify: training images per class sampled for nearest_mean (stored in the run).",
        minimum=1,
    )
    lr_step_epochs: int = _field(
        100, "classify: multiply the learning rate by lr_step_factor every N epochs.", minimum=1
    )
    lr_step_factor: float = _field(0.1, "classify: see lr_step_epochs.", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class AttributesConfig:
    mask_weight: float = _field(
        1.0, "attributes: weight of the pixel cross-entropy of the 5 attribute masks.", minimum=0.0
    )
    presence_weight: float = _field(
        1.0, "attributes: weight of the multi-label soft-margin loss of attribute presence.",
        minimum=0.0,
    )
    init_from: str = _field(
        "", "attributes: a Task 1 run (or its model.keras) whose `encoder` initialises the "
        "VGG19 features; empty = random initialisation.",
    )
    lr_step_epochs: int = _field(
        100, "attributes: multiply the learning rate by lr_step_factor every N epochs.", minimum=1
    )
    lr_step_factor: float = _field(0.1, "attributes: see lr_step_epochs.", minimum=0.0)


SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "meta": MetaConfig,
    "segan": SeganConfig,
    "smile": SmileConfig,
    "unet34": Unet34Config,
    "postprocess": PostprocessConfig,
    "classify": ClassifyConfig,
    "attributes": AttributesConfig,
}
METHODS = (
    "baseline", "meta", "image-reweight", "finetune", "segan", "smile", "multiclass", "unet34",
    "triplet", "softmax", "multitask",
)
TASKS = ("segment", "attributes", "classify")
# The methods of each task (`--task` selects data, models, metrics and outputs).
TASK_METHODS = {
    "classify": ("triplet", "softmax"),
    "attributes": ("multitask",),
}
TASK_METHODS["segment"] = tuple(
    m for m in METHODS if not any(m in v for v in TASK_METHODS.values())
)
# The model a method trains when `model.name` is left empty: each paper's network
# (SMILE and its softmax baseline: a ResNet-DeepLabV3+).
DEFAULT_MODELS = {"segan": "segan", "unet34": "resnet34_unet", "smile": "resnet18_deeplab",
                  "multiclass": "resnet18_deeplab"}


@dataclasses.dataclass(frozen=True)
class Config:
    method: str = _field("baseline", "Training method.")
    task: str = _field(
        "segment",
        "ISIC task: `segment` (Task 1, lesion masks), `attributes` (Task 2, method "
        "multitask), or `classify` (Task 3, methods triplet and softmax).",
        choices=TASKS,
    )
    seed: int = _field(0, "Seed of every random choice (data split, weights, augmentation).")
    out: str = _field("", "Run directory (empty: runs/<method>-<timestamp>).")
    stages: tuple = _field(
        (),
        "unet34: training stages in order, as `[[stages]]` tables with `trainable` (`decoder`: "
        "encoder frozen; `all_but_bn`: batch norms frozen; `all`), `epochs` and `lr` (a "
        "number, or \"find\" for the LR range test on that stage's model; default train.lr); "
        "empty = the two stages of the [unet34] table.",
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    meta: MetaConfig = dataclasses.field(default_factory=MetaConfig)
    segan: SeganConfig = dataclasses.field(default_factory=SeganConfig)
    smile: SmileConfig = dataclasses.field(default_factory=SmileConfig)
    unet34: Unet34Config = dataclasses.field(default_factory=Unet34Config)
    postprocess: PostprocessConfig = dataclasses.field(default_factory=PostprocessConfig)
    classify: ClassifyConfig = dataclasses.field(default_factory=ClassifyConfig)
    attributes: AttributesConfig = dataclasses.field(default_factory=AttributesConfig)

    @property
    def model_name(self) -> str:
        """`model.name`, or the method's default model when it is empty."""
        return self.model.name or DEFAULT_MODELS.get(self.method, "unet")

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def override(self, overrides: dict, origin: str = "command line") -> "Config":
        """Returns a copy with `{"section.key": value}` (or `{"key": value}`) applied."""
        tree = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            *parents, key = dotted.split(".")
            node = tree
            for p in parents:
                node = node.setdefault(p, {})
            node[key] = value
        return from_dict(tree, origin=origin)

    def save(self, path) -> None:
        Path(path).write_text(tomli_w.dumps(self.to_dict()))


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_to_plain(v) for v in obj]
    return obj


def _check_value(cls, f: dataclasses.Field, value, where: str):
    expected = type(f.default) if f.default is not dataclasses.MISSING else None
    name = f"`{where}`"
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false. Received: {value!r}")
    elif expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer. Received: {value!r}")
    elif expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number. Received: {value!r}")
        value = float(value)
    elif expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string. Received: {value!r}")
    elif expected is tuple:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{name} must be a list of numbers. Received: {value!r}")
        value = tuple(float(v) for v in value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, choices))}. Received: {value!r}"
        )
    minimum = f.metadata.get("minimum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}. Received: {value!r}")
    return value


#: `trainable` of a `[[stages]]` table: what the stage trains.
STAGE_TRAINABLE = ("decoder", "all_but_bn", "all")


def _check_stages(value, origin):
    """`[[stages]]` tables -> tuple of `{"trainable", "epochs"[, "lr"]}` dicts."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(
            f"{origin}: `stages` must be an array of tables ([[stages]]). Received: {value!r}"
        )
    checked = []
    for i, table in enumerate(value, 1):
        where = f"stages[{i}]"
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


def _build(cls, values: dict, prefix: str, origin: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{origin}: unknown config key `{where}`")
        f = fields[key]
        if key == "stages" and not prefix:
            kwargs[key] = _check_stages(value, origin)
        elif key in SECTIONS and not prefix:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: `{where}` must be a table ([{key}])")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.", origin)
        else:
            try:
                kwargs[key] = _check_value(cls, f, value, where)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None
    return cls(**kwargs)


def from_dict(values: dict, origin: str = "config") -> Config:
    """Builds a validated `Config`; raises `ConfigError` naming the bad key."""
    cfg = _build(Config, values, "", origin)
    if cfg.method not in METHODS:
        raise ConfigError(
            f"{origin}: `method` must be one of {', '.join(METHODS)}. Received: {cfg.method!r}"
        )
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(
            f"{origin}: `data.val_fraction` must be in [0, 1). Received: {cfg.data.val_fraction}"
        )
    for key in ("pct_start", "cut_frac"):
        if not 0.0 < getattr(cfg.train, key) < 1.0:
            raise ConfigError(
                f"{origin}: `train.{key}` must be in (0, 1). Received: {getattr(cfg.train, key)}"
            )
    if not 0.0 < cfg.train.threshold < 1.0:
        raise ConfigError(
            f"{origin}: `train.threshold` must be in (0, 1). Received: {cfg.train.threshold}"
        )
    if cfg.data.crop_size and cfg.data.crop_size > cfg.data.image_size:
        raise ConfigError(
            f"{origin}: `data.crop_size` ({cfg.data.crop_size}) must not exceed "
            f"`data.image_size` ({cfg.data.image_size})"
        )
    if cfg.data.folds and cfg.data.fold >= cfg.data.folds:
        raise ConfigError(
            f"{origin}: `data.fold` must be < `data.folds` ({cfg.data.folds}). "
            f"Received: {cfg.data.fold}"
        )
    if cfg.smile.simulate_missing > 1.0:
        raise ConfigError(
            f"{origin}: `smile.simulate_missing` must be in [0, 1]. "
            f"Received: {cfg.smile.simulate_missing}"
        )
    if cfg.smile.gamma_max > 1.0:
        raise ConfigError(
            f"{origin}: `smile.gamma_max` must be in [0, 1]. Received: {cfg.smile.gamma_max}"
        )
    sg = cfg.segan
    for key, ok, rule in (
        ("clip", sg.clip > 0, "> 0"),
        ("k_decay", 0 < sg.k_decay <= 1, "in (0, 1]"),
        ("k_floor", 0 < sg.k_floor <= 1, "in (0, 1]"),
    ):
        if not ok:
            raise ConfigError(
                f"{origin}: `segan.{key}` must be {rule}. Received: {getattr(sg, key)}"
            )
    if sg.warmup_epochs and not sg.supervised_loss:
        raise ConfigError(
            f"{origin}: `segan.warmup_epochs` needs a `segan.supervised_loss` to train on"
        )
    if cfg.data.color_constancy != "none" and cfg.method in ("smile", "multiclass"):
        raise ConfigError(
            f"{origin}: `data.color_constancy` is not supported by `method = {cfg.method!r}` "
            "yet; use \"none\""
        )
    if cfg.method not in TASK_METHODS[cfg.task]:
        raise ConfigError(
            f"{origin}: `task = {cfg.task!r}` needs `method` to be one of "
            f"{', '.join(TASK_METHODS[cfg.task])}. Received: {cfg.method!r}"
        )
    if cfg.classify.crop > min(cfg.classify.resize_width, cfg.classify.resize_height):
        raise ConfigError(
            f"{origin}: `classify.crop` ({cfg.classify.crop}) must not exceed "
            f"`classify.resize_width`/`classify.resize_height` "
            f"({cfg.classify.resize_width}x{cfg.classify.resize_height})"
        )
    if cfg.stages and cfg.method != "unet34":
        raise ConfigError(
            f"{origin}: `[[stages]]` needs `method = \"unet34\"`. Received: {cfg.method!r}"
        )
    _check_pyramid(cfg, origin)
    if len(cfg.data.mean) not in (0, 3) or len(cfg.data.std) not in (0, 3):
        raise ConfigError(f"{origin}: `data.mean` and `data.std` need 3 values each")
    return cfg


def parse_int_list(text: str, key: str) -> list[int]:
    """`"128, 256"` -> `[128, 256]`; raises `ConfigError` naming `key` otherwise."""
    try:
        return [int(part) for part in text.split(",")] if text.strip() else []
    except ValueError:
        raise ConfigError(
            f"`{key}` must be comma-separated integers. Received: {text!r}"
        ) from None


def _check_pyramid(cfg, origin):
    u = cfg.unet34
    try:
        sizes = parse_int_list(u.pyramid, "unet34.pyramid")
        epochs = parse_int_list(u.pyramid_epochs, "unet34.pyramid_epochs")
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
    per_size = len(cfg.stages) or 2
    if epochs and (len(epochs) != per_size * len(sizes) or min(epochs) < 0 or not sum(epochs)):
        raise ConfigError(
            f"{origin}: `unet34.pyramid_epochs` needs {per_size * len(sizes)} non-negative "
            f"entries (each of the {per_size} stages at each of the {len(sizes)} sizes), not "
            f"all 0. Received: {u.pyramid_epochs!r}"
        )


def read_toml(path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_config(path=None, overrides: dict | None = None) -> Config:
    """Reads a TOML file (or the defaults) and applies `overrides`.

    Args:
        path: str or Path. TOML file; None uses the defaults.
        overrides: dict. `{"train.lr": 1e-4, "seed": 3}`; None values are skipped.
    """
    cfg = from_dict(read_toml(path), origin=str(path)) if path else Config()
    return cfg.override(overrides or {}) if overrides else cfg


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every key: used to document configs."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                rows.append((f"{f.name}.{g.name}", g.default, g.metadata["help"]))
        else:
            rows.append((f.name, f.default, f.metadata["help"]))
    return rows
