"""Error of the meta-weights (eq. 7-8) against finite differences, per registered model.

For each case of `tests/test_meta_reference.py` (every registered segmentation model
at a tiny size, batch norm on and off) this prints the relative error of the
normalised weights W of eq. 8, `max |W - W_ref| / max W_ref`, and the share of
clearly signed pixels (|U_ref| > 1e-3 max) whose sign of U the package gets wrong,
for `nested` and `forward`, in float32 (what training runs). The reference is the
test's: central finite differences of a float64 copy of the network along the clean
gradient. `--before` measures the mechanism this package had before issue 13 on
the same networks and weights: Keras' bilinear `UpSampling2D` / `tf.image.resize`
in place of `BilinearUpSampling2D` / `ResizeLike`, and the fused batch-norm kernel
in the meta step:

    python benchmarks/meta_reference.py [--before] [--models unet,segan]

Not a speed benchmark: it prints errors, and the goal is the test's 1e-4.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import _common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@contextlib.contextmanager
def old_layers():
    """Builders and the meta trainer as they were: Keras resizing, fused batch norm."""
    import keras
    import tensorflow as tf

    from lesionkeras.models import blocks, deeplab, segan
    from lesionkeras.methods import reweight_step as meta

    class OldResizeLike(keras.layers.Layer):
        def call(self, inputs):
            x, ref = inputs
            return tf.image.resize(x, tf.shape(ref)[1:3], method="bilinear")

    def old_up(size, name, **kwargs):
        return keras.layers.UpSampling2D(size, interpolation="bilinear", name=name, **kwargs)

    saved = [(m, n, getattr(m, n)) for m, n in [
        (blocks, "BilinearUpSampling2D"), (deeplab, "BilinearUpSampling2D"),
        (segan, "BilinearUpSampling2D"), (deeplab, "ResizeLike"),
        (meta, "make_second_order_exact")]]
    blocks.BilinearUpSampling2D = deeplab.BilinearUpSampling2D = old_up
    segan.BilinearUpSampling2D = old_up
    deeplab.ResizeLike = OldResizeLike
    meta.make_second_order_exact = lambda model: 0
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def main():
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="Comma-separated model names (default: all).")
    p.add_argument("--before", action="store_true",
                   help="Keras bilinear resizing and fused batch norm (the old mechanism).")
    args = p.parse_args()
    _common.setup(args.cache)
    import keras
    import numpy as np
    import tensorflow as tf

    import test_meta_reference as ref_lib
    from lesionkeras.models import registry
    from lesionkeras.methods.reweight import MetaReweighter

    wanted = set(filter(None, args.models.split(",")))
    rows = []
    for name, opts in ref_lib.CASES:
        if wanted and name not in wanted:
            continue
        keras.utils.set_random_seed(args.seed)
        size = ref_lib._size(name)
        net = registry.build(name, input_shape=(size, size, 3), out_channels=1, **opts)
        ref_lib._randomise_biases(net)
        data = ref_lib._data(size)
        u_ref = ref_lib.reference_scores(ref_lib._float64_copy(net), *data, ref_lib.ALPHA,
                                         ref_lib.ALPHA)
        if args.before:
            # Same function and weights, the old layers (same names, no weights).
            with old_layers():
                old = registry.build(name, input_shape=(size, size, 3), out_channels=1, **opts)
            old.set_weights(net.get_weights())
            net = old
        w_ref = np.maximum(u_ref, 0) / np.maximum(u_ref, 0).sum()
        clear = np.abs(u_ref) > 1e-3 * np.abs(u_ref).max()
        row = [name + "".join(f" {k}={v}" for k, v in sorted(opts.items()))]
        for mode in ("nested", "forward"):
            with old_layers() if args.before else contextlib.nullcontext():
                model = MetaReweighter(net, meta_grad=mode)
            model.compile(optimizer=keras.optimizers.SGD(ref_lib.ALPHA), jit_compile=False)
            out = tf.function(model.meta_weights)(*data)
            w = out["weights"].numpy()
            row.append(np.abs(w - w_ref).max() / w_ref.max())
            if "scores" in out:
                u = out["scores"].numpy()
                row.append(float((np.sign(u[clear]) != np.sign(u_ref[clear])).mean()))
            else:  # before the scores were returned: signs of the rectified weights
                row.append(float(((w > 0)[clear] != (u_ref > 0)[clear]).mean()))
        rows.append(row)
        print(row, flush=True)
    text = "\n".join([
        "# Meta-weights vs finite differences (float32 package, float64 reference)"
        + (" - before issue 13" if args.before else ""),
        "",
        _common.table(["model", "nested: W error", "nested: wrong signs",
                       "forward: W error", "forward: wrong signs"], rows),
    ])
    _common.emit("meta_reference", text, write=not args.no_write)


if __name__ == "__main__":
    main()
