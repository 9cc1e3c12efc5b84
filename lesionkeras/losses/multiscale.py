"""SegAN's losses (Xue, Xu, Huang, ISBI 2018): the masked critic input and the multi-scale L1 loss."""

from keras import ops

from lesionkeras.shapes import as_float32


def mask_image(images, masks):
    """`x o y` of SegAN: every image channel multiplied by every mask channel.

    Args:
        images: `(B, H, W, C)` images.
        masks: `(B, H, W, K)` label maps (probabilities or 0/1 truth).

    Returns:
        float32 tensor `(B, H, W, K * C)`: the image masked by mask 0, then by
        mask 1, ... (just `images * masks` when K = 1).

    Raises:
        ValueError: If the batch or spatial shapes differ.
    """
    x = as_float32(images)
    m = as_float32(masks)
    if len(x.shape) != 4 or len(m.shape) != 4 or any(
        a is not None and b is not None and a != b for a, b in zip(x.shape[:3], m.shape[:3])
    ):
        raise ValueError(
            "mask_image: expected images (B, H, W, C) and masks (B, H, W, K) of the same "
            f"B, H, W; got images.shape={tuple(x.shape)} and masks.shape={tuple(m.shape)}."
        )
    if m.shape[-1] == 1:
        return x * m
    return ops.concatenate([x * m[..., k : k + 1] for k in range(m.shape[-1])], axis=-1)


def multiscale_l1(features_a, features_b):
    """Multi-scale L1 loss of SegAN (eq. 1-2), per image.

    `(1 / L) * sum_i mean |f_C^i(x o S(x)) - f_C^i(x o y)|`: for each of the L
    critic feature maps, the mean absolute difference over H, W and channels,
    then the mean over the L maps. Averaging each map (rather than summing)
    keeps the layers of different sizes on an equal footing.

    Args:
        features_a: sequence of L tensors `(B, H_i, W_i, C_i)`: critic
            features of the image masked by the prediction.
        features_b: sequence of L tensors of the same shapes: critic features
            of the image masked by the truth.

    Returns:
        float32 tensor of shape `(B,)`.

    Raises:
        ValueError: If the two sequences differ in length, are empty, or a
            pair of maps differs in shape.

    Example:
        a = [np.ones((1, 2, 2, 1), "float32"), np.zeros((1, 1, 1, 2), "float32")]
        b = [np.zeros((1, 2, 2, 1), "float32"), np.full((1, 1, 1, 2), 3.0, "float32")]
        multiscale_l1(a, b)  # [(1 + 3) / 2] = [2.0]
    """
    features_a, features_b = list(features_a), list(features_b)
    if not features_a or len(features_a) != len(features_b):
        raise ValueError(
            "multiscale_l1: expected two equally long, non-empty lists of feature maps; "
            f"got {len(features_a)} and {len(features_b)}."
        )
    per_layer = []
    for i, (a, b) in enumerate(zip(features_a, features_b)):
        a, b = as_float32(a), as_float32(b)
        if tuple(a.shape) != tuple(b.shape) and any(
            p is not None and q is not None and p != q for p, q in zip(a.shape, b.shape)
        ) or len(a.shape) != len(b.shape):
            raise ValueError(
                f"multiscale_l1: feature map {i} shapes differ: "
                f"{tuple(a.shape)} and {tuple(b.shape)}."
            )
        per_layer.append(ops.mean(ops.abs(a - b), axis=tuple(range(1, len(a.shape)))))
    return ops.mean(ops.stack(per_layer, axis=0), axis=0)
