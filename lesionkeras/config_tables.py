"""The shared config tables (`data`, `augment`, `model`, `train`, `postprocess`) and `SHARED_SECTIONS`."""

from __future__ import annotations

import dataclasses

from lesionkeras.config_fields import field


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = field(
        "synthetic", "Data folder, manifest CSV, or `synthetic` (built-in dataset)."
    )
    image_size: int = field(64, "Side of the square model input, in pixels.", minimum=16)
    crop_size: int = field(
        0,
        "If > 0: resize to image_size, then train on random crops of this side "
        "(validation uses a centre crop).",
        minimum=0,
    )
    limit: int = field(0, "Use only the first N images (0 = all).", minimum=0)
    val_fraction: float = field(0.2, "Fraction of images held out for validation.")
    val_list: str = field(
        "", "Text file of image ids (one per line) that form the validation split."
    )
    folds: int = field(0, "Number of k-fold groups written to the manifest (0 = none).", minimum=0)
    fold: int = field(-1, "Fold used as validation when folds > 0 (-1 = use val_fraction).")
    normalize: str = field(
        "dataset",
        "Per-channel normalisation: `dataset` (mean/std of the training split) or `imagenet`.",
        choices=("dataset", "imagenet"),
    )
    mean: tuple = field((), "Per-channel mean (0-255); filled in by `fit` and stored in the run config.")
    std: tuple = field((), "Per-channel std (0-255); filled in by `fit` and stored in the run config.")
    cache: bool = field(True, "Cache decoded, resized images in memory.")
    color_constancy: str = field(
        "none",
        "Colour balance applied once to every decoded image: `none` or `shades_of_gray` "
        "(Finlayson & Trezzi 2004, p = 6).",
        choices=("none", "shades_of_gray"),
    )
    synthetic_count: int = field(240, "Number of images of the built-in synthetic dataset.", minimum=8)
    synthetic_size: int = field(
        0, "Side of the synthetic images on disk (0 = same as image_size).", minimum=0
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    flip: bool = field(True, "Random horizontal and vertical flips.")
    rotate90: bool = field(True, "Random rotations by multiples of 90 degrees.")
    dihedral: bool = field(
        False,
        "One of the 8 dihedral transforms (4 rotations by 90 degrees, each with or without a "
        "flip), uniformly at random; when true it replaces `flip` and `rotate90`.",
    )
    rotation: float = field(0.0, "Random rotation up to this many degrees (0 = off).", minimum=0.0)
    zoom: float = field(0.0, "Random zoom in/out by up to this fraction (0 = off).", minimum=0.0)
    brightness: float = field(0.0, "Colour jitter: brightness factor (0 = off).", minimum=0.0)
    contrast: float = field(0.0, "Colour jitter: contrast factor (0 = off).", minimum=0.0)
    saturation: float = field(0.0, "Colour jitter: saturation factor (0 = off).", minimum=0.0)
    hue: float = field(0.0, "Colour jitter: hue factor (0 = off).", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        "", "Registered model name (empty: the method's own default model)."
    )
    depth: int = field(4, "Number of down-sampling levels of the U-Net.", minimum=1)
    filters: int = field(16, "Filters of the first level; doubled at each level.", minimum=1)
    output_stride: int = field(
        16, "DeepLab models: the encoder's output stride, 16 (last ResNet stage dilated, the "
        "DeepLabV3+ default) or 8 (last two dilated; ASPP rates doubled) or 32.",
        choices=(8, 16, 32),
    )
    batch_norm: bool = field(True, "Batch normalisation after every convolution.")
    dropout: float = field(0.0, "Dropout rate at the bottleneck (0 = off).", minimum=0.0)
    upsampling: str = field(
        "bilinear",
        "Decoder up-sampling: `bilinear` resize + conv, or `transpose` convolution.",
        choices=("bilinear", "transpose"),
    )
    encoder_weights: str = field(
        "",
        "ResNet U-Nets: local encoder weights (`.weights.h5` of a keras-hub ResNetBackbone, "
        "or a keras-hub preset folder); empty = random initialisation.",
    )
    encoder_filters: int = field(
        64, "vgg19se: filters of the first VGG19 block (64 = VGG19; smaller for quick tests).",
        minimum=1,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = field("adam", "Optimiser.", choices=("adam", "adamw", "sgd"))
    lr: float = field(
        1e-3, "Learning rate (the peak rate of `one_cycle` and `slanted_triangular`).",
        minimum=0.0,
    )
    schedule: str = field(
        "constant",
        "Learning-rate schedule: `constant`, `one_cycle` (Smith), `slanted_triangular` "
        "(Howard & Ruder), `linear_decay` (to final_lr), or `plateau` (divide on a plateau "
        "of val_dice).",
        choices=("constant", "one_cycle", "slanted_triangular", "linear_decay", "plateau"),
    )
    pct_start: float = field(0.3, "one_cycle: fraction of the steps spent rising.")
    div_factor: float = field(25.0, "one_cycle: lr / starting rate.", minimum=1.0)
    final_div_factor: float = field(
        1e4, "one_cycle: starting rate / final rate.", minimum=1.0
    )
    cut_frac: float = field(0.1, "slanted_triangular: fraction of the steps spent rising.")
    stlr_ratio: float = field(
        32.0, "slanted_triangular: lr / lowest rate.", minimum=1.0
    )
    final_lr: float = field(0.0, "linear_decay: rate reached at the last step.", minimum=0.0)
    plateau_divide: float = field(10.0, "plateau: divide the rate by this.", minimum=1.0)
    plateau_patience: int = field(
        5, "plateau: epochs without a better val_dice before dividing.", minimum=1
    )
    weight_decay: float = field(0.0, "Decoupled weight decay (adamw, sgd).", minimum=0.0)
    momentum: float = field(0.9, "SGD momentum.", minimum=0.0)
    epochs: int = field(20, "Training epochs.", minimum=1)
    batch_size: int = field(8, "Global batch size (split across replicas).", minimum=1)
    loss: str = field(
        "bce+dice", "Loss.", choices=("bce", "dice", "jaccard", "bce+dice", "bce+jaccard")
    )
    threshold: float = field(0.5, "Probability threshold of the binary masks.")
    strategy: str = field(
        "auto", "Distribution strategy.", choices=("auto", "default", "mirrored", "multiworker")
    )
    mixed_precision: bool = field(False, "Mixed precision (float16 on GPU, bfloat16 on CPU).")
    jit_compile: str = field(
        "auto", "XLA compilation of the train step.", choices=("auto", "true", "false")
    )
    image_every: int = field(
        5, "Write the TensorBoard image grid every N epochs (0 = never).", minimum=0
    )
    image_count: int = field(4, "Validation images shown in the TensorBoard grid.", minimum=1)
    progress: bool = field(True, "Show the Keras progress bar.")
    progress_metrics: str = field(
        "compact", "What the progress bar shows: `compact` (the loss, the Dice and the "
        "method's monitored value, with their validation values) or `all` (every logged "
        "value; all of them are in history.csv and TensorBoard either way).",
        choices=("compact", "all"))
    freeze_encoder_epochs: int = field(
        0, "Train with the model's encoder frozen for the first N epochs, then train all "
        "(baseline, segan; models with an encoder, e.g. vgg19se; ISIC 2018 report: 50).",
        minimum=0,
    )


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    min_component_fraction: float = field(
        0.001,
        "postprocess morph: remove connected components smaller than this fraction of the "
        "image area (0 = keep all).",
        minimum=0.0,
    )
    fill_holes: bool = field(True, "postprocess morph: fill holes enclosed by the mask.")
    keep_largest: bool = field(
        True, "postprocess morph: keep only the largest connected component (one lesion)."
    )
    crf_iterations: int = field(
        5, "postprocess crf: mean-field iterations of the dense CRF.", minimum=1
    )
    crf_gaussian_sxy: float = field(
        3.0, "postprocess crf: spatial std (pixels) of the Gaussian smoothness kernel.",
        minimum=0.0,
    )
    crf_gaussian_compat: float = field(
        3.0, "postprocess crf: weight of the Gaussian smoothness kernel.", minimum=0.0
    )
    crf_bilateral_sxy: float = field(
        40.0, "postprocess crf: spatial std (pixels) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_srgb: float = field(
        13.0, "postprocess crf: colour std (0-255) of the bilateral appearance kernel.",
        minimum=0.0,
    )
    crf_bilateral_compat: float = field(
        10.0, "postprocess crf: weight of the bilateral appearance kernel.", minimum=0.0
    )


SHARED_SECTIONS = {
    "data": DataConfig,
    "augment": AugmentConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "postprocess": PostprocessConfig,
}
