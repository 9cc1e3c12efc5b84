"""SMILE weight maps (the paper's rule and the nested lesion/attribute rule) and SMILEr relabelling."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from lesionkeras.errors import ConfigError


def smile_weights(masks, flags):
    """SMILE binary weight maps w_k, vectorised over the batch and structures.

    w_k = 1 on every pixel if structure k is annotated in the image; otherwise
    w_k = 1 only on the pixels annotated positive for another annotated
    structure (known negatives for k), 0 elsewhere (unknown, ignored).

    Args:
        masks: float `(..., H, W, K)` targets in {0, 1}.
        flags: float or bool `(..., K)`: 1 where the structure is annotated.

    Returns:
        float32 `(..., H, W, K)` weights in {0, 1}.
    """
    masks = tf.cast(masks, tf.float32)
    flags = tf.cast(flags, tf.float32)[..., None, None, :]
    known_pos = masks * flags
    # Annotated positives of the other structures: all of them minus our own.
    others = tf.reduce_sum(known_pos, axis=-1, keepdims=True) - known_pos
    return tf.maximum(flags, tf.cast(others > 0, tf.float32)) * tf.ones_like(masks)


def nested_targets_and_weights(masks, flags, container):
    """SMILE targets and weights when the other structures lie inside `container`.

    Args:
        masks: float `(..., H, W, K)` targets in {0, 1} (0 where not annotated).
        flags: float or bool `(..., K)`: 1 where the structure is annotated.
        container: int. Channel of the enclosing structure (the lesion).

    Returns:
        (targets, weights), float32 `(..., H, W, K)`: the container's target
        gains the pixels of annotated inner structures when it is itself not
        annotated; weights follow the rules in the module docstring.
    """
    masks = tf.cast(masks, tf.float32)
    flags = tf.cast(flags, tf.float32)[..., None, None, :]
    k = masks.shape[-1]
    is_container = tf.one_hot(container, k, dtype=tf.float32)  # (K,)
    inner = 1.0 - is_container
    flag_c = flags[..., container : container + 1]
    mask_c = masks[..., container : container + 1] * flag_c
    # Any annotated inner structure marks its pixels as container pixels.
    inner_pos = tf.reduce_max(masks * flags * inner, axis=-1, keepdims=True)
    container_target = tf.maximum(mask_c, inner_pos * (1.0 - flag_c))
    targets = masks * inner + container_target * is_container
    container_weight = tf.maximum(flag_c, inner_pos)
    # Outside an annotated container, every inner structure is known absent.
    inner_weight = tf.maximum(flags, flag_c * (1.0 - mask_c))
    weights = container_weight * is_container + inner_weight * inner
    return targets, weights * tf.ones_like(masks)


# --------------------------------------------------------------------------- #
# SMILEr relabelling
# --------------------------------------------------------------------------- #


def relabel(weights, flags, scores, gamma, *, threshold=0.5, std=None):
    """SMILEr: the new positive labels of one round (Petit, Thome et al. 2018, Alg. 1).

    For every image i and structure k that is *not annotated* in i, the
    candidates are the pixels predicted positive (`scores >= threshold`)
    whose label is still unknown (`weights == 0`); the top `gamma` fraction
    of them (rounded, per image and structure) become positive labels:
    highest score first, or, with `std` (MC-dropout), lowest predictive
    standard deviation first. Annotated structures and known labels never change.

    Args:
        weights: `(N, H, W, K)` SMILE weight maps before any relabelling (0 = unknown).
        flags: `(N, K)` annotated flags (1 = annotated).
        scores: `(N, H, W, K)` predicted probabilities (the MC mean with `std`).
        gamma: float in [0, 1]. Fraction of the candidates kept, gamma_t = t / T * gamma_max.
        threshold: float. Probability at which a pixel is predicted positive. Defaults to 0.5.
        std: `(N, H, W, K)` or None. MC-dropout standard deviations. Defaults to None.

    Returns:
        bool `(N, H, W, K)`: the pixels to add as positives.

    Example:
        added = relabel(w, flags, probs, gamma=1 / 3)
        targets, w = np.maximum(targets, added), np.maximum(w, added)
    """
    if not 0.0 <= float(gamma) <= 1.0:
        raise ConfigError(f"`gamma` must be in [0, 1]. Received: {gamma}")
    weights = np.asarray(weights)
    scores = np.asarray(scores, np.float32)
    n, h, w, k = scores.shape
    flags = np.asarray(flags).reshape(n, 1, 1, k)
    candidate = (flags <= 0) & (weights <= 0) & (scores >= threshold)
    # Order key per pixel: smaller = chosen first.
    key = np.asarray(std, np.float32) if std is not None else -scores
    key = np.where(candidate, key, np.inf).transpose(0, 3, 1, 2).reshape(n, k, h * w)
    rank = np.empty_like(key, dtype=np.int64)
    order = np.argsort(key, axis=-1, kind="stable")
    np.put_along_axis(rank, order, np.arange(h * w)[None, None, :], axis=-1)
    count = candidate.transpose(0, 3, 1, 2).reshape(n, k, h * w).sum(-1, keepdims=True)
    keep = rank < np.round(gamma * count)
    return keep.reshape(n, k, h, w).transpose(0, 2, 3, 1) & candidate
