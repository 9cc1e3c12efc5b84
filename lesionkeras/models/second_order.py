"""Finds the ops of a model whose second derivative TensorFlow gets wrong or drops.

Meta-reweighting (Mirikharaji et al. 2019, eq. 7; Ren et al. 2018) differentiates
the training gradient once more. TensorFlow registers some gradient kernels as not
differentiable (`ResizeBilinearGrad`, the gradient of bilinear resizing, is the one
that silently zeroed part of eq. 7 in every bilinear decoder), and the fused
batch-norm gradient's own derivative cannot be checked in float64 (the kernel
has none), so it is not trusted; reverse and forward mode then
return zeros or wrong values instead of failing. `second_order_blockers` traces the
model's first-order gradient graph (symbolically, nothing runs) and names every op
of that graph that cannot be differentiated again exactly.
"""

import re

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops

# Gradient kernels whose registered derivative is not trusted.
INEXACT = {
    "FusedBatchNormGrad": "the fused batch-norm kernel's has no float64 reference",
    "FusedBatchNormGradV2": "the fused batch-norm kernel's has no float64 reference",
    "FusedBatchNormGradV3": "the fused batch-norm kernel's has no float64 reference",
}
# Registered as not differentiable but correctly so: their outputs do not depend
# differentiably on their float inputs.
_CONSTANT_IN_INPUTS = {
    "StopGradient", "PreventGradient", "ZerosLike", "OnesLike", "Shape", "ShapeN", "Size",
    "Rank", "BroadcastGradientArgs", "Floor", "Ceil", "Round", "Sign", "Greater",
    "GreaterEqual", "Less", "LessEqual", "Equal", "NotEqual", "ArgMax", "ArgMin",
    "RandomUniform", "RandomStandardNormal", "StatelessRandomUniformV2",
    "StatelessRandomNormalV2", "StatelessRandomGetKeyCounter", "OneHot", "Range",
}


def _float(tensors):
    return any(t.dtype.is_floating for t in tensors)


def _no_second_derivative(op):
    if op.type in _CONSTANT_IN_INPUTS or not (_float(op.inputs) and _float(op.outputs)):
        return None
    if op.type in INEXACT:
        return INEXACT[op.type]
    try:
        grad = tf_ops.gradient_registry.lookup(op.type)
    except LookupError:
        return "TensorFlow has no gradient for it"
    if grad is None:
        return "TensorFlow registers it as not differentiable"
    return None


def _layer_names(model):
    names = set()
    for layer in model.layers:
        names.add(layer.name)
        if hasattr(layer, "layers"):
            names |= _layer_names(layer)
    return names


def _layer_of(op_name, names):
    # "gradient_tape/unet_1/up0_resize_1/resize/ResizeBilinearGrad" -> "up0_resize"
    # (tracing appends `_<n>` to the name scopes).
    inner = [q for p in op_name.split("/") for q in (p, re.sub(r"_\d+$", "", p)) if q in names]
    return inner[-1] if inner else op_name


def second_order_blockers(model, size=64):
    """The ops that block exact second derivatives of `model`'s training loss.

    Args:
        model: a built `keras.Model` taking images (B, H, W, C).
        size: int. Side of the traced input where the model leaves it open (a
            multiple of the model's down-sampling). Defaults to 64.

    Returns:
        list of (layer name, op type, reason), empty when every op of the
        first-order gradient graph can be differentiated again exactly.
    """
    trainable, fixed = model.trainable_variables, model.non_trainable_variables

    # Weights enter as arguments (`stateless_call`): the trace reads and assigns no
    # variable, so it also works inside a distribution strategy's scope.
    @tf.function
    def gradient(x, theta, state):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            out, _ = model.stateless_call(theta, state, x, training=True)
            loss = tf.add_n([tf.reduce_sum(tf.cast(o, tf.float32)) for o in tf.nest.flatten(out)])
        return tape.gradient(loss, theta)

    spec = model.inputs[0]
    shape = [None] + [size if d is None else d for d in spec.shape[1:3]] + [spec.shape[3]]
    specs = lambda vs: [tf.TensorSpec(v.shape, v.dtype) for v in vs]  # noqa: E731
    graph = gradient.get_concrete_function(
        tf.TensorSpec(shape, spec.dtype), specs(trainable), specs(fixed)
    ).graph
    found, seen, names = [], set(), _layer_names(model)
    for op in graph.get_operations():
        reason = _no_second_derivative(op)
        key = (_layer_of(op.name, names), op.type)
        if reason and key not in seen:
            seen.add(key)
            found.append((*key, reason))
    return found
