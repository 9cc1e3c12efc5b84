import keras
import numpy as np
import pytest

from lesionkeras import losses
from lesionkeras.models.resnet_unet import build_resnet_unet, encoder_layer
from lesionkeras.models.unet import build_unet
from lesionkeras.training import stages


def _values(variables):
    return [keras.ops.convert_to_numpy(v).copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, keras.ops.convert_to_numpy(v)) for b, v in zip(before, variables)]


def _step(model):
    model.compile(keras.optimizers.SGD(0.1), loss=losses.get_loss("bce"), jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    y = (rng.random((2, 32, 32, 1)) > 0.5).astype("float32")
    model.train_on_batch(x, y)


@pytest.mark.slow
def test_stage1_freezes_encoder_stage2_keeps_batch_norm_frozen():
    keras.utils.set_random_seed(0)
    model = build_resnet_unet((32, 32, 3), encoder="resnet18", filters=4)
    enc = encoder_layer(model)
    bns = [l for l in stages._walk(model) if isinstance(l, keras.layers.BatchNormalization)]
    bn_vars = [v for l in bns for v in l.weights]  # gamma, beta, moving mean/var
    decoder_vars = [v for v in model.trainable_variables if not any(v is w for w in enc.weights)]

    stages.freeze_encoder(model)
    enc_before, dec_before = _values(enc.weights), _values(decoder_vars)
    _step(model)
    assert not any(_changed(enc_before, enc.weights))  # kernels and BN statistics
    assert any(_changed(dec_before, decoder_vars))

    stages.unfreeze_except_batch_norm(model)
    conv_kernels = [l.kernel for l in stages._walk(enc) if isinstance(l, keras.layers.Conv2D)]
    bn_before, conv_before = _values(bn_vars), _values(conv_kernels)
    _step(model)
    assert not any(_changed(bn_before, bn_vars))
    assert all(_changed(conv_before, conv_kernels))

    stages.unfreeze_all(model)
    assert len(model.trainable_variables) > len(decoder_vars) + len(conv_kernels)


def test_freeze_needs_an_encoder():
    with pytest.raises(ValueError, match="no `encoder`"):
        stages.freeze_encoder(build_unet((32, 32, 3), depth=2, filters=4))
