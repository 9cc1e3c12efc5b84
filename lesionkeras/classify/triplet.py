"""Online triplet mining with the hardest negative, and the triplet loss.

Xue et al. 2018 (ISIC 2018 report), section 3, eq. 3-4: an anchor and a
positive from the same minority class, a negative from the majority class,

    loss = mean over (a, p) of max(0, |f(a) - f(p)|^2 + alpha - |f(a) - f(n*)|^2)

where n* is the hardest negative of the anchor inside the batch (the one
closest to it). Every valid anchor-positive pair of the batch is used; the
paper sums over triplets, we average so the scale does not depend on the batch
size. Everything is batch-wide tensor algebra: a B x B distance matrix and masks,
no loop over samples, so it runs inside a compiled train step.
"""

import numpy as np
from keras import ops

NEGATIVES = ("majority", "other")


def pairwise_squared_distances(embeddings):
    """(B, B) squared Euclidean distances between the rows of `embeddings` (B, D)."""
    sq = ops.sum(ops.square(embeddings), axis=-1)
    dot = ops.matmul(embeddings, ops.transpose(embeddings))
    return ops.maximum(sq[:, None] - 2.0 * dot + sq[None, :], 0.0)


def triplet_masks(labels, majority=None, negatives="majority"):
    """Boolean masks of valid positives (B, B) and negatives (B, B) per anchor row.

    Args:
        labels: int tensor (B,). Class index of each sample.
        majority: int or int tensor. The majority class (negatives come from it, and it
            never anchors). Needed when `negatives="majority"`.
        negatives: str. `"majority"` (the paper) or `"other"` (any other class).
            Defaults to `"majority"`.

    Returns:
        (positive, negative) boolean tensors of shape (B, B).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"`negatives` must be one of {NEGATIVES}. Received: {negatives!r}")
    labels = ops.cast(labels, "int32")
    same = ops.equal(labels[:, None], labels[None, :])
    not_self = ops.logical_not(ops.cast(ops.eye(ops.shape(labels)[0]), "bool"))
    positive = ops.logical_and(same, not_self)
    if negatives == "majority":
        if majority is None:
            raise ValueError("`negatives=\"majority\"` needs the `majority` class.")
        is_major = ops.equal(labels, ops.cast(majority, "int32"))
        anchor = ops.logical_not(is_major)
        positive = ops.logical_and(positive, anchor[:, None])
        negative = ops.logical_and(anchor[:, None], is_major[None, :])
    else:
        negative = ops.logical_not(same)
    return positive, negative


def hardest_negatives(distances, negative):
    """Index of the closest valid negative of each anchor, and whether it has one.

    Args:
        distances: float tensor (B, B).
        negative: bool tensor (B, B). Valid negatives of each row.

    Returns:
        (index (B,) int32, has_negative (B,) bool).
    """
    big = ops.max(distances) + 1.0
    masked = ops.where(negative, distances, big)
    return ops.cast(ops.argmin(masked, axis=1), "int32"), ops.any(negative, axis=1)


def triplet_loss(embeddings, labels, *, margin=0.2, majority=None, negatives="majority",
                 normalize=True):
    """Triplet loss with online hardest-negative mining over one batch.

    Args:
        embeddings: float tensor (B, D).
        labels: int tensor (B,).
        margin: float. alpha of eq. 3. Defaults to 0.2.
        majority: int. Majority class index (for `negatives="majority"`).
        negatives: str. `"majority"` or `"other"`. Defaults to `"majority"`.
        normalize: bool. L2-normalise the embeddings first, so the margin has a fixed
            scale. Defaults to True.

    Returns:
        (loss, count): scalar mean hinge over the valid triplets (0 when there are none)
        and the number of valid triplets.

    Example:

    ```python
    loss, n = triplet_loss(emb, y, margin=0.2, majority=1)
    ```
    """
    embeddings = ops.cast(embeddings, "float32")
    if normalize:
        embeddings = embeddings / (ops.norm(embeddings, axis=-1, keepdims=True) + 1e-12)
    d = pairwise_squared_distances(embeddings)
    positive, negative = triplet_masks(labels, majority, negatives)
    index, has_negative = hardest_negatives(d, negative)
    d_neg = ops.take_along_axis(d, index[:, None], axis=1)  # (B, 1)
    valid = ops.logical_and(positive, has_negative[:, None])
    hinge = ops.maximum(d + margin - d_neg, 0.0)
    valid_f = ops.cast(valid, "float32")
    count = ops.sum(valid_f)
    loss = ops.sum(hinge * valid_f) / ops.maximum(count, 1.0)
    return loss, count


def nearest_class_mean_distances(queries, references, reference_labels, num_classes):
    """Mean Euclidean distance of each query to the reference embeddings of every class.

    The ISIC 2018 report's prediction rule: the class whose (up to 100) sampled
    training images are, on average, nearest in embedding space. Classes with no
    reference get +inf.

    Args:
        queries: float array (N, D). references: float array (M, D).
        reference_labels: int array (M,). num_classes: int.

    Returns:
        float tensor (N, num_classes).
    """
    queries = ops.cast(queries, "float32")
    references = ops.cast(references, "float32")
    sq_q = ops.sum(ops.square(queries), axis=-1)[:, None]
    sq_r = ops.sum(ops.square(references), axis=-1)[None, :]
    d = ops.sqrt(ops.maximum(sq_q - 2.0 * ops.matmul(queries, ops.transpose(references)) + sq_r, 0.0))
    onehot = ops.one_hot(ops.cast(reference_labels, "int32"), num_classes)  # (M, K)
    counts = ops.sum(onehot, axis=0)
    sums = ops.matmul(d, onehot)
    return ops.where(counts > 0, sums / ops.maximum(counts, 1.0), float("inf"))


# ---------------------------------------------------------------------- #
# Offline triplets, regenerated every N epochs (`classify.regenerate_every`)
# ---------------------------------------------------------------------- #


def _anchor_classes(labels, majority, negatives):
    """Classes whose samples anchor (all but the majority for `negatives="majority"`)."""
    if negatives not in NEGATIVES:
        raise ValueError(f"`negatives` must be one of {NEGATIVES}. Received: {negatives!r}")
    if negatives == "majority" and majority is None:
        raise ValueError("`negatives=\"majority\"` needs the `majority` class.")
    classes = np.unique(labels)
    return classes[classes != majority] if negatives == "majority" else classes


def triplet_capacity(labels, majority=None, *, negatives="majority", positives=4):
    """Number of triplets `regenerate_triplets` makes for these labels (table size)."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    total = 0
    for c in _anchor_classes(labels, majority, negatives):
        n = int(np.sum(labels == c))
        if n >= 2:
            total += n * min(positives, n - 1)
    return total


def regenerate_triplets(embeddings, labels, majority=None, *, negatives="majority", positives=4,
                        seed=0, normalize=True, block=1024):
    """Offline triplets of a whole training set with the hardest negative of each anchor.

    Xue et al. 2018 (ISIC 2018 report), section 3, "regenerated every N epochs":
    every sample of a minority class anchors `positives` triplets whose positives
    are distinct, seeded random samples of its class, and whose negative is the
    majority-class sample nearest the anchor in the embedding (the hardest). With
    `negatives="other"` every class anchors and the negative is the nearest
    sample of any other class. Distances are tensor algebra over blocks of
    `block` anchors against every candidate, so memory stays `block` x N.

    Args:
        embeddings: float array (N, D). The training set's embeddings.
        labels: int array (N,).
        majority: int. Majority class (for `negatives="majority"`).
        negatives: str. `"majority"` or `"other"`. Defaults to `"majority"`.
        positives: int >= 1. Positives per anchor (fewer in a class of fewer
            than `positives + 1` samples). Defaults to 4.
        seed: int or sequence of ints. Seeds the choice of positives. Defaults to 0.
        normalize: bool. L2-normalise the embeddings first. Defaults to True.
        block: int. Anchors per distance block. Defaults to 1024.

    Returns:
        (triplets, distances): int32 (T, 3) rows of (anchor, positive, negative)
        indices into `labels`, ordered by anchor, and float32 (T,) Euclidean
        anchor-negative distances. Classes of one sample anchor nothing.

    Example:

    ```python
    triplets, dist = regenerate_triplets(emb, y, majority=1, seed=[0, epoch])
    ```
    """
    if positives < 1:
        raise ValueError(f"`positives` must be >= 1. Received: positives={positives}")
    emb = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"`embeddings` must be (N, D) with one row per label. Received: "
                         f"embeddings {emb.shape}, labels {labels.shape}")
    if normalize:
        emb = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
    rng = np.random.default_rng(seed)
    anchors, pos = [], []
    for c in _anchor_classes(labels, majority, negatives):
        members = np.flatnonzero(labels == c)
        n = len(members)
        if n < 2:
            continue
        k = min(positives, n - 1)
        for start in range(0, n, block):
            rows = np.arange(start, min(start + block, n))
            # k distinct offsets in 1..n-1 from each anchor: never the anchor itself.
            keys = rng.random((len(rows), n - 1))
            offsets = np.argpartition(keys, k - 1, axis=1)[:, :k] + 1
            anchors.append(np.repeat(members[rows], k))
            pos.append(members[(rows[:, None] + offsets) % n].ravel())
    if not anchors:
        return np.zeros((0, 3), np.int32), np.zeros((0,), np.float32)
    anchors, pos = np.concatenate(anchors), np.concatenate(pos)
    unique = np.unique(anchors)
    hardest = np.empty(len(labels), np.int64)
    nearest = np.empty(len(labels), np.float32)
    if negatives == "majority":
        candidates = np.flatnonzero(labels == majority)
    else:
        candidates = np.arange(len(labels))
    if len(candidates) == 0:
        return np.zeros((0, 3), np.int32), np.zeros((0,), np.float32)
    cand = ops.convert_to_tensor(emb[candidates])
    sq_c = ops.sum(ops.square(cand), axis=-1)[None, :]
    for start in range(0, len(unique), block):
        rows = unique[start:start + block]
        a = ops.convert_to_tensor(emb[rows])
        d = ops.maximum(ops.sum(ops.square(a), axis=-1)[:, None]
                        - 2.0 * ops.matmul(a, ops.transpose(cand)) + sq_c, 0.0)
        if negatives == "other":
            same = ops.equal(ops.convert_to_tensor(labels[rows])[:, None],
                             ops.convert_to_tensor(labels[candidates])[None, :])
            d = ops.where(same, float("inf"), d)
        hardest[rows] = candidates[ops.convert_to_numpy(ops.argmin(d, axis=1))]
        nearest[rows] = np.sqrt(ops.convert_to_numpy(ops.min(d, axis=1)))
    triplets = np.stack([anchors, pos, hardest[anchors]], axis=1).astype(np.int32)
    return triplets, nearest[anchors]


def offline_triplet_loss(anchor, positive, negative, *, margin=0.2, weights=None, normalize=True):
    """Mean hinge `max(0, |a - p|^2 + margin - |a - n|^2)` over given triplets.

    Args:
        anchor, positive, negative: float tensors (T, D). Embeddings of the triplets.
        margin: float. alpha. Defaults to 0.2.
        weights: optional float tensor (T,). 0 drops a triplet. Defaults to all ones.
        normalize: bool. L2-normalise the embeddings first. Defaults to True.

    Returns:
        (loss, count): the weighted mean hinge (0 without triplets) and the sum of weights.
    """
    def prep(e):
        e = ops.cast(e, "float32")
        return e / (ops.norm(e, axis=-1, keepdims=True) + 1e-12) if normalize else e

    anchor, positive, negative = prep(anchor), prep(positive), prep(negative)
    d_pos = ops.sum(ops.square(anchor - positive), axis=-1)
    d_neg = ops.sum(ops.square(anchor - negative), axis=-1)
    hinge = ops.maximum(d_pos + margin - d_neg, 0.0)
    w = ops.ones_like(hinge) if weights is None else ops.cast(weights, "float32")
    count = ops.sum(w)
    return ops.sum(hinge * w) / ops.maximum(count, 1.0), count
