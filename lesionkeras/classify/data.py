"""Classification data: label CSVs -> a manifest of (id, image, label) -> tf.data batches.

Label files understood (recognised by their header):
* ISIC 2018 Task 3 ground truth: `image` + one-hot columns MEL, NV, BCC, AKIEC,
  BKL, DF, VASC (the built-in synthetic dataset writes this one).
* HAM10000 metadata: `image_id` + `dx` (mel, nv, bcc, akiec, bkl, df, vasc).
* ISIC 2017 Part 3: `image_id` + `melanoma` [+ `seborrheic_keratosis`]; classes
  MEL / OTHER, or MEL / NV / BKL when the keratosis column is there.

The class list comes from the file, so two-class data trains a two-way
classifier. Images are found by id anywhere below the image folder (ground
truth and superpixel folders are skipped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from lesionkeras.data.classes import DIAGNOSES
from lesionkeras.errors import DataError
from lesionkeras.data import synthetic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SKIP_PARTS = ("groundtruth", "superpixel", "__macosx")
_SKIP_SUFFIXES = ("_segmentation", "_superpixels", "_mask")


def label_format(header):
    """`"onehot"`, `"ham10000"`, `"isic2017"` or None for a CSV header (list of names)."""
    header = [h.strip() for h in header]
    if "image" in header and all(d in header for d in DIAGNOSES):
        return "onehot"
    if "image_id" in header and "dx" in header:
        return "ham10000"
    if "image_id" in header and "melanoma" in header:
        return "isic2017"
    return None


def _header(path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [c.strip() for c in f.readline().strip().split(",")]
    except (OSError, UnicodeDecodeError):
        return []


def find_label_csv(folder):
    """The one label CSV below `folder`; DataError if there is none or several."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(".csv") and label_format(_header(Path(dirpath) / name)):
                found.append(Path(dirpath) / name)
    if not found:
        raise DataError(
            f"{folder}: no class label CSV found (expected an ISIC 2018 Task 3 one-hot CSV, "
            "HAM10000 metadata with `dx`, or ISIC 2017 `melanoma` classes)"
        )
    if len(found) > 1:
        raise DataError(
            f"{folder}: {len(found)} label CSVs found ({found[0].name}, {found[1].name}, ...); "
            "choose one with `classify.labels`"
        )
    return found[0]


def read_labels(path):
    """(ids, class names per row, class list) of a label CSV; DataError naming the row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label CSV not found")
    fmt = label_format(_header(path))
    if fmt is None:
        raise DataError(
            f"{path}: not a class label CSV (header needs `image` + {','.join(DIAGNOSES)}, "
            "or `image_id` + `dx`, or `image_id` + `melanoma`)"
        )
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read CSV: {str(e).splitlines()[0]}") from None
    raw.columns = [c.strip() for c in raw.columns]

    def number(column):
        values = pd.to_numeric(raw[column].str.strip(), errors="coerce")
        bad = np.flatnonzero(values.isna().to_numpy())
        if len(bad):
            raise DataError(
                f"{path}: row {bad[0] + 2}: `{column}` must be a number. "
                f"Received: {raw[column].iloc[bad[0]]!r}"
            )
        return values.to_numpy() >= 0.5

    if fmt == "onehot":
        ids = raw["image"].str.strip()
        classes = DIAGNOSES
        onehot = np.stack([number(c) for c in classes], axis=1)
        counts = onehot.sum(1)
        bad = np.flatnonzero(counts != 1)
        if len(bad):
            raise DataError(
                f"{path}: row {bad[0] + 2} ({ids.iloc[bad[0]]}): needs exactly one class "
                f"set to 1, found {int(counts[bad[0]])}"
            )
        names = [classes[i] for i in onehot.argmax(1)]
    elif fmt == "ham10000":
        ids = raw["image_id"].str.strip()
        names = raw["dx"].str.strip().str.upper().tolist()
        classes = DIAGNOSES
        for i, n in enumerate(names):
            if n not in classes:
                raise DataError(
                    f"{path}: row {i + 2} ({ids.iloc[i]}): unknown class {raw['dx'].iloc[i]!r} "
                    f"(expected one of {', '.join(c.lower() for c in classes)})"
                )
    else:
        ids = raw["image_id"].str.strip()
        mel = number("melanoma")
        if "seborrheic_keratosis" in raw:
            sk = number("seborrheic_keratosis")
            both = np.flatnonzero(mel & sk)
            if len(both):
                raise DataError(
                    f"{path}: row {both[0] + 2} ({ids.iloc[both[0]]}): both melanoma and "
                    "seborrheic_keratosis are 1"
                )
            classes = ("MEL", "NV", "BKL")
            names = ["MEL" if m else "BKL" if s else "NV" for m, s in zip(mel, sk)]
        else:
            classes = ("MEL", "OTHER")
            names = ["MEL" if m else "OTHER" for m in mel]
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{path}: image {dup.iloc[0]} is listed twice")
    return ids.tolist(), names, tuple(classes)


def index_images(folder):
    """{id: path} of the images below `folder` (ground truth and superpixels skipped)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d for d in dirnames
            if not d.startswith(".") and not any(s in d.lower() for s in _SKIP_PARTS)
        )
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and not stem.lower().endswith(_SKIP_SUFFIXES):
                found.setdefault(stem, os.path.join(dirpath, name))
    return found


def load_classification(source, *, labels="", images="", limit=0, synthetic_count=240,
                        synthetic_size=64):
    """Manifest (`id`, `image`, `label` index, `diagnosis` name) and the class list.

    Args:
        source: str. Folder, label CSV, or `"synthetic"`.
        labels: str. Label CSV (empty: `source` if it is a CSV, else found below it).
        images: str. Image folder (empty: the folder of `source` / of the CSV).
        limit: int. Keep the first N labelled images (0 = all).
        synthetic_count, synthetic_size: int. The built-in dataset's size.

    Raises:
        DataError: no or bad label CSV, unknown class, or a labelled image is missing.
    """
    if source == "synthetic":
        root = synthetic.cached_dataset(synthetic_count, synthetic_size, 0)
    else:
        root = Path(source)
        if not root.exists():
            raise DataError(f"{source}: data not found")
    if labels:
        csv_path = Path(labels)
    elif root.is_file():
        csv_path = root
    else:
        csv_path = find_label_csv(root)
    image_root = Path(images) if images else (root.parent if root.is_file() else root)
    if not image_root.is_dir():
        raise DataError(f"{image_root}: image folder not found")
    ids, names, classes = read_labels(csv_path)
    paths = index_images(image_root)
    missing = [i for i in ids if i not in paths]
    if missing:
        raise DataError(
            f"{csv_path}: {len(missing)} labelled images not found below {image_root} "
            f"(first: {missing[0]})",
            problems=[(csv_path, f"{len(missing)} labelled images not found below "
                       f"{image_root} (first: {missing[0]})")],
        )
    df = pd.DataFrame({
        "id": ids, "image": [paths[i] for i in ids], "diagnosis": names,
        "label": [classes.index(n) for n in names],
    }).sort_values("id").reset_index(drop=True)
    if limit:
        df = df.iloc[:limit].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{csv_path}: no labelled images")
    return df, classes


def stratified_split(df, val_fraction, seed):
    """Adds `split`: a seeded `val_fraction` of every class (at least one if it has two)."""
    rng = np.random.default_rng(seed)
    split = np.array(["train"] * len(df), dtype=object)
    for label in sorted(df["label"].unique()):
        rows = np.flatnonzero(df["label"].to_numpy() == label)
        n_val = int(round(len(rows) * val_fraction))
        if val_fraction > 0 and n_val == 0 and len(rows) >= 2:
            n_val = 1
        split[rng.permutation(rows)[:n_val]] = "val"
    df = df.copy()
    df["split"] = split
    return df


def list_images(path):
    """Manifest (`id`, `image`) of one image file or the images below a folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return pd.DataFrame({"id": [path.stem], "image": [str(path)]})
    if not path.is_dir():
        raise DataError(f"{path}: input not found")
    found = index_images(path)
    if not found:
        raise DataError(f"{path}: no images found")
    ids = sorted(found)
    return pd.DataFrame({"id": ids, "image": [found[i] for i in ids]})


def _decoder(resize):
    """`path -> float32 (height, width, 3)` image, resized and normalised (ImageNet stats)."""
    import tensorflow as tf

    width, height = resize
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, tf.float32), (height, width), antialias=True)
        return (image - mean) / std

    return decode


def make_dataset(paths, labels, *, resize, crop, batch_size, training, flip=True, seed=0,
                 cache=True):
    """Decoded, resized, normalised (ImageNet statistics) batches of `(image, label)`.

    Training: random `crop` x `crop` crops and random flips, shuffled, seeded.
    Evaluation: the centre crop. `resize` is (width, height), as the paper gives 360x270.
    `labels` may be None (prediction): then the dataset yields images only.
    """
    import tensorflow as tf

    from lesionkeras.data import epochs

    width, height = resize
    decode = _decoder(resize)
    items = list(paths) if labels is None else (list(paths), np.asarray(labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if labels is None:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(lambda p, y: (decode(p), y), num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    if training:
        n = len(paths)

        def augment(image, y, key):
            image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=key)
            if flip:
                image = tf.image.stateless_random_flip_left_right(
                    image, seed=epochs.key_from(key, 1))
                image = tf.image.stateless_random_flip_up_down(image, seed=epochs.key_from(key, 2))
            return image, y

        def one_epoch(k):  # order, crops and flips keyed by the epoch (exact resume)
            epoch_ds = epochs.shuffled(ds, n, k).enumerate().map(
                lambda j, item: augment(*item, epochs.key_from(k, j)),
                num_parallel_calls=tf.data.AUTOTUNE)
            # Full batches only: the triplet miner and batch norm want a real batch.
            return epoch_ds.batch(batch_size, drop_remainder=n >= batch_size)

        ds = epochs.per_epoch(one_epoch, seed=seed,
                              cardinality=n // batch_size if n >= batch_size else 1)
    else:
        top, left = (height - crop) // 2, (width - crop) // 2

        def centre(image):
            return image[top:top + crop, left:left + crop, :]

        if labels is None:
            ds = ds.map(centre)
        else:
            ds = ds.map(lambda image, y: (centre(image), y))
        ds = ds.batch(batch_size)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_triplet_dataset(paths, table, count, *, resize, crop, triplets_per_batch, flip=True,
                         seed=0):
    """Endless batches of offline triplets drawn, seeded, from a triplet table.

    Each element is `(images, valid)`: images (T, 3, crop, crop, 3) holding the
    anchor, positive and negative of T triplets (random crops and flips, as in
    training), and valid (T,) float32, 0 while the table is empty. The table is
    read when a batch is made, so a callback that rewrites it (regeneration)
    changes the triplets of the batches that follow. The triplet axis comes
    first so that a distribution strategy splits whole triplets across replicas.

    Args:
        paths: sequence of str. Training images, indexed by the table.
        table: int32 `tf.Variable` (capacity, 3). Rows of (anchor, positive, negative) indices.
        count: int32 `tf.Variable` scalar. Rows of `table` in use.
        resize: (width, height). crop: int. triplets_per_batch: int. T.
        flip: bool. Random flips. Defaults to True.
        seed: int. Seeds the choice of rows, the crops and the flips. Defaults to 0.
    """
    import tensorflow as tf

    from lesionkeras.data import epochs

    decode = _decoder(resize)
    paths = tf.constant([str(p) for p in paths])

    def one(image, key):
        image = tf.image.stateless_random_crop(image, (crop, crop, 3), seed=key)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, seed=key + 1)
            image = tf.image.stateless_random_flip_up_down(image, seed=key + 2)
        return image

    def triplet(r):
        n = tf.maximum(tf.cast(count, tf.int64), 1)
        row = tf.gather(table, r % n)
        images = tf.stack([
            one(decode(tf.gather(paths, row[j])), tf.stack([r, tf.constant(3 * j, tf.int64)]))
            for j in range(3)
        ])
        return images, tf.cast(count > 0, tf.float32)

    def one_epoch(k):  # the epoch's draws keyed by it (exact resume)
        def draw(r):
            key = epochs.key_from(k, r)
            # Non-negative: `r % n` indexes the table.
            return triplet(tf.bitwise.bitwise_and(key[0], tf.constant(2**62 - 1, tf.int64)))

        return tf.data.Dataset.counter().map(draw, num_parallel_calls=tf.data.AUTOTUNE)

    ds = epochs.per_epoch(one_epoch, seed=seed, cardinality=tf.data.INFINITE_CARDINALITY)
    return ds.batch(triplets_per_batch, drop_remainder=True)
