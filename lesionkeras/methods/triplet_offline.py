"""Offline triplets (`classify.regenerate_every`): the shared `TripletTable` and the `RegenerateTriplets` callback."""

import os
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from lesionkeras.classify.triplet import regenerate_triplets


class TripletTable:
    """Offline triplets shared by the data pipeline and `RegenerateTriplets`.

    Plain `tf.Variable`s (create it outside a strategy scope): `triplets` (capacity, 3)
    int32 rows of (anchor, positive, negative) training indices and `count`, the rows in use.

    Args:
        capacity: int. Most rows (`classify.triplet.triplet_capacity`); at least 1.
    """

    def __init__(self, capacity):
        self.capacity = max(int(capacity), 1)
        self.triplets = tf.Variable(tf.zeros((self.capacity, 3), tf.int32), trainable=False,
                                    name="triplet_table")
        self.count = tf.Variable(0, dtype=tf.int32, trainable=False, name="triplet_count")

    def set(self, triplets):
        triplets = np.asarray(triplets, np.int32).reshape(-1, 3)
        if len(triplets) > self.capacity:
            raise ValueError(f"{len(triplets)} triplets do not fit a table of {self.capacity}")
        padded = np.zeros((self.capacity, 3), np.int32)
        padded[: len(triplets)] = triplets
        self.triplets.assign(padded)
        self.count.assign(len(triplets))

    def numpy(self):
        return self.triplets.numpy()[: int(self.count.numpy())]


class RegenerateTriplets(keras.callbacks.Callback):
    """Every `every` epochs, re-mines the offline triplets of the training set.

    At the start of epochs 0, N, 2N, ... it embeds the training images (batches
    of `images`, the training set in the order of `labels`, without augmentation)
    with the current network, builds the triplets with
    `classify.triplet.regenerate_triplets` (seeded by `seed` and the epoch) and
    writes them to `table`. The triplets and their epoch are saved to `state`, so
    a resumed run draws from the same set until its next regeneration. Each
    epoch's logs get `regenerated_triplets` (the count) and
    `anchor_negative_distance` (mean Euclidean anchor-negative distance), so
    history.csv and TensorBoard show them; `log` gets one line per regeneration.

    Args:
        every: int >= 1. N.
        images: dataset of image batches. labels: int array (N,).
        table: `TripletTable`.
        majority: int. negatives: str. positives: int. normalize: bool. See
            `regenerate_triplets`.
        seed: int. state: path of the `.npz` state (None: not saved).
        log: callable. Defaults to `print`.
    """

    def __init__(self, every, images, labels, table, *, majority, negatives="majority",
                 positives=4, normalize=True, seed=0, state=None, log=print):
        super().__init__()
        if every < 1:
            raise ValueError(f"`every` must be >= 1. Received: every={every}")
        self.every, self.images = int(every), images
        self.labels = np.asarray(labels).astype(np.int64)
        self.table, self.majority, self.negatives = table, majority, negatives
        self.positives, self.normalize, self.seed = positives, normalize, int(seed)
        self.state = Path(state) if state else None
        self.log = log
        self.generated_at = None
        self.distance = float("nan")

    def on_train_begin(self, logs=None):
        if self.state is not None and self.state.exists():
            saved = np.load(self.state)
            self.table.set(saved["triplets"])
            self.generated_at = int(saved["epoch"])
            self.distance = float(saved["distance"])

    def on_epoch_begin(self, epoch, logs=None):
        if epoch % self.every and self.generated_at is not None:
            return
        if self.generated_at == epoch:
            return  # restored from the state written at this epoch's start
        embeddings = np.concatenate([
            keras.ops.convert_to_numpy(self.model.network(x, training=False)["embedding"])
            for x in self.images
        ])
        triplets, distances = regenerate_triplets(
            embeddings, self.labels, self.majority, negatives=self.negatives,
            positives=self.positives, seed=[self.seed, epoch], normalize=self.normalize,
        )
        self.table.set(triplets)
        self.generated_at = epoch
        self.distance = float(distances.mean()) if len(distances) else float("nan")
        if self.state is not None:
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_name(self.state.stem + ".tmp.npz")
            np.savez(tmp, triplets=triplets, epoch=epoch, distance=self.distance)
            os.replace(tmp, self.state)
        self.log(f"epoch {epoch + 1}: regenerated {len(triplets)} triplets of "
                 f"{len(self.labels)} training images (mean anchor-negative distance "
                 f"{self.distance:.4f})")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["regenerated_triplets"] = float(self.table.count.numpy())
            logs["anchor_negative_distance"] = self.distance
