"""Randomness of the training streams as a function of (seed, epoch): exact resume.

Keras makes a new iterator of the training dataset at the start of every epoch.
Stateful random ops (a `shuffle` that reshuffles on each iteration, a
`SeedGenerator` that advances with each call) restart from their initial state
in a new process, so a run resumed at epoch k would see epoch 0's shuffle and
augmentation again. Here every random draw of a training stream is stateless,
keyed by the run's seed, the epoch (read from `clock()` when the epoch's
iterator starts; the run loop sets it before each epoch) and the position of
the element or batch within the epoch. An epoch then sees the same data
whether the run went through the epochs before it or resumed after them.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_CLOCK = []


def clock() -> tf.Variable:
    """The process's epoch counter (int64), read by training streams when an epoch starts.

    Created on first use, on the host, outside any distribution strategy (so
    that importing the package starts no TensorFlow runtime).
    """
    if not _CLOCK:
        with tf.init_scope(), tf.device("/CPU:0"):
            _CLOCK.append(tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch_clock"))
    return _CLOCK[0]


def set_epoch(epoch: int):
    """Sets the clock: the next iterator of a training stream draws epoch `epoch`'s randomness."""
    clock().assign(int(epoch))


def key(seed, *parts):
    """A stateless seed (int64 pair) derived from `seed` and the integers `parts`.

    Each part is mixed in with one stateless draw, so keys of different parts
    (epoch 1, element 2 vs epoch 2, element 1) are unrelated.
    """
    return key_from(tf.constant([int(seed) & 0x7FFFFFFF, 0x5EED], tf.int64), *parts)


def per_epoch(body, *, seed: int, cardinality=None):
    """A dataset whose every iterator yields `body(key)` for the epoch on the clock.

    Args:
        body: callable(key int64 (2,)) -> `tf.data.Dataset`. One epoch's stream,
            all its randomness drawn from `key` (statelessly).
        seed: int. The stream's seed.
        cardinality: int or None. Elements per epoch, when known (Keras uses it
            for the progress bar and for schedules that count steps).
    """
    ds = tf.data.Dataset.from_tensors(0).map(lambda _: key(seed, clock().read_value()))
    ds = ds.flat_map(body)
    if cardinality is not None:
        ds = ds.apply(tf.data.experimental.assert_cardinality(cardinality))
    return ds


def shuffled(ds, n: int, k, buffer: int | None = None):
    """`ds` shuffled once with the order given by key `k` (no state kept between iterators)."""
    if not tf.executing_eagerly():
        # Inside a dataset function: `shuffle` pairs its seed with the graph's; with
        # a tensor seed and a graph seed of 0 (`keras.utils.set_random_seed(0)`),
        # TensorFlow's check for the seed pair (0, 0) would need the tensor's
        # value in Python. A fixed seed for this function's graph avoids it; the
        # order still comes from `k` alone.
        tf.compat.v1.set_random_seed(1)
    seed = tf.math.floormod(k[0], 2**31 - 1)
    return ds.shuffle(buffer or max(n, 1), seed=seed, reshuffle_each_iteration=False)


class KeyedSeed(keras.random.SeedGenerator):
    """A seed source for Keras random ops that yields `key(k, 0)`, `key(k, 1)`, ... statelessly.

    Keras 3 preprocessing layers take their randomness from a `SeedGenerator`,
    whose state is a variable advanced by each draw: shared mutable state, and
    restarted in a resumed process. Their `get_random_transformation(data,
    seed=...)` accepts an int or a `SeedGenerator`; this subclass returns seeds
    derived from a tensor key instead of a variable (Keras 3.5-3.15 call only
    `next()` on it), so a transformation is a pure function of its key.
    """

    def __init__(self, k):  # no variable: nothing of the base class is used
        self._key = k
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return key_from(self._key, self._draws)

    def get_config(self):
        raise TypeError("KeyedSeed is not serialisable")


def key_from(k, *parts):
    """Like `key`, from a key tensor `k` instead of an int seed."""
    k = tf.cast(k, tf.int64)
    for part in parts:
        part = tf.cast(part, tf.int64)
        k = tf.random.stateless_uniform([2], seed=k + tf.stack([part, part]), minval=None,
                                        maxval=None, dtype=tf.int64)
    return k
