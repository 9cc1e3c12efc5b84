"""Every use of Keras or TensorFlow internals, in one place, each with the versions that need it.

Checked with TensorFlow 2.16-2.20 and Keras 3.5-3.12. When an upgrade breaks
one of these, this file is the only one to change.
"""

from __future__ import annotations

import tensorflow as tf

def set_restored_epoch(model, epoch):
    """Makes the next `fit` of `model` start at `epoch`, as a restored backup must.

    Keras 3.x reads the private `model._initial_epoch` in `fit` (what its own
    `BackupAndRestore` sets); there is no public way from a callback.
    """
    model._initial_epoch = epoch


def forget_restored_epoch(model):
    """Clears the epoch a backup restored into `model` (`set_restored_epoch`).

    Keras 3.x stores it in the private `model._initial_epoch` and never clears
    it, so after a resumed stage every later `fit` would restart at that epoch.
    """
    model._initial_epoch = None


def merge_call(fn, *args):
    """Runs `fn(strategy, *args)` in cross-replica context, from replica or cross-replica code.

    TensorFlow 2.x has no public form of this (`tf.__internal__...maybe_merge_call`,
    also what Keras' own optimiser uses to update mirrored variables).
    """
    return tf.__internal__.distribute.interim.maybe_merge_call(
        fn, tf.distribute.get_strategy(), *args)


class NoSymbolicBuildOnMultiWorker:
    """Mixin for a `keras.Model` that builds its networks and optimisers in `compile`.

    Keras 3.x's TensorFlow trainer (`_maybe_symbolic_build`, private) reduces the
    first (x, y) batch with `strategy.reduce` on the whole tuple, which
    MultiWorkerMirroredStrategy's collective ops reject ("Attempt to convert a
    value (PerReplica ...)"). A model with nothing left to build skips it there.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


def seed_states(model):
    """The state variables of every `keras.random.SeedGenerator` in `model` (e.g. dropout's).

    `model.save_weights` leaves them out (Keras 3.x saves a layer's trainable and
    non-trainable variables only); a resumed run restores them from its backup
    so that dropout continues the uninterrupted run's draws. Keras 3.x keeps a
    layer's generators in the private `_seed_generators`.
    """
    found, seen = [], set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()):
            if id(generator.state) not in seen:
                seen.add(id(generator.state))
                found.append(generator.state)
    return found
