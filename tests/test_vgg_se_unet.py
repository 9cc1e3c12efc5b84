"""VGG19-SE U-Net (Xue et al., ISIC 2018 report) and freezing its encoder for N epochs."""

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from click.testing import CliRunner

from lesionkeras import config as config_lib
from lesionkeras.cli import main
from lesionkeras.errors import ConfigError
from lesionkeras.models import registry
from lesionkeras.models.critic import build_critic
from lesionkeras.models.segan import AdaptiveLogistic
from lesionkeras.models.vgg_se_unet import (
    apply_se_block, build_vgg_se_unet, make_backbone, vgg19_filters,
)
from lesionkeras.methods.segan import SegANTrainer
from lesionkeras.training.stages import FreezeEncoder


def _vgg_encoder_params(w):
    """Conv parameters of VGG19 with first-block width w, counted by hand."""
    total, cin = 0, 3
    for repeats, cout in zip((2, 2, 4, 4, 4), vgg19_filters(w)):
        for _ in range(repeats):
            total += 9 * cin * cout + cout
            cin = cout
    return total


def test_full_vgg19_encoder_has_the_published_parameter_count():
    # keras.applications.VGG19(include_top=False) has 20,024,384 parameters.
    assert _vgg_encoder_params(64) == 20_024_384
    assert make_backbone().count_params() == 20_024_384


@pytest.mark.parametrize("size, out_channels", [(32, 1), (64, 2)])
def test_shapes_and_parameter_count(size, out_channels):
    model = registry.build(
        "vgg19se", input_shape=(None, None, 3), out_channels=out_channels,
        encoder_filters=8, filters=4,
    )
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype("float32")
    out = model(x)
    assert out.shape == (2, size, size, out_channels) and out.dtype == "float32"
    feats = model.get_layer("encoder")(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "P0": (2, size, size, 8), "P1": (2, size // 2, size // 2, 16),
        "P2": (2, size // 4, size // 4, 32), "P3": (2, size // 8, size // 8, 64),
        "P4": (2, size // 16, size // 16, 64), "P5": (2, size // 32, size // 32, 64),
    }
    assert model.get_layer("encoder").count_params() == _vgg_encoder_params(8) == 313_672
    # One SE block per encoder feature: c -> max(c // 16, 1) -> c, with biases.
    se = sum(2 * c * max(c // 16, 1) + max(c // 16, 1) + c for c in (8, 16, 32, 64, 64, 64))
    se_layers = [l for l in model.layers if l.name.startswith("se")]
    assert sum(l.count_params() for l in se_layers) == se == 1_976
    assert isinstance(model.layers[-1], AdaptiveLogistic)
    decoder = model.count_params() - 313_672 - se
    assert 200_000 < decoder < 300_000


def test_se_block_scales_channels_by_their_gate():
    inputs = keras.Input((4, 4, 32))
    model = keras.Model(inputs, apply_se_block(inputs, 16, name="se"))
    assert model.count_params() == 32 * 2 + 2 + 2 * 32 + 32
    x = np.random.default_rng(1).normal(size=(1, 4, 4, 32)).astype("float32")
    gate = np.asarray(model(x)) / x  # the same factor for every pixel of a channel
    np.testing.assert_allclose(gate, np.broadcast_to(gate[:, :1, :1], gate.shape), rtol=1e-4)
    assert ((gate > 0) & (gate < 1)).all()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="multiples of 32"):
        build_vgg_se_unet((48, 48, 3), encoder_filters=8, filters=4)
    with pytest.raises(ValueError, match="encoder_filters=0"):
        build_vgg_se_unet((32, 32, 3), encoder_filters=0)


def test_encoder_weights_from_a_local_file(tmp_path):
    keras.utils.set_random_seed(1)
    source = make_backbone((32, 32, 3), encoder_filters=8)
    path = tmp_path / "vgg.weights.h5"
    source.save_weights(path)
    model = build_vgg_se_unet((32, 32, 3), encoder_weights=str(path), encoder_filters=8, filters=4)
    enc = model.get_layer("encoder")
    for a, b in zip(source.weights, enc.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(ConfigError, match="not found"):
        build_vgg_se_unet((32, 32, 3), encoder_weights=str(tmp_path / "no.weights.h5"))
    with pytest.raises(ConfigError, match=r"vgg\.weights\.h5: cannot load VGG19 encoder"):
        build_vgg_se_unet((32, 32, 3), encoder_weights=str(path), encoder_filters=16)


# ---------------------------------------------------------------------- freezing


def _data(n=4, size=32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, size, size, 3)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    y = np.stack([(yy - size / 2) ** 2 + (xx - size / 2 - 2 * i) ** 2 < (size / 4) ** 2
                  for i in range(n)])[..., None].astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(2)


class _Snapshots(keras.callbacks.Callback):
    """Encoder, decoder (and critic) weights at the start and after every epoch."""

    def __init__(self, segmentor, critic=None):
        super().__init__()
        self.segmentor, self.critic, self.snaps = segmentor, critic, []

    def _take(self):
        enc = self.segmentor.get_layer("encoder")
        snap = {
            "encoder": [w.numpy().copy() for w in enc.weights],
            "decoder": [self.segmentor.get_layer("up0_conv1").kernel.numpy().copy()],
        }
        if self.critic is not None:
            snap["critic"] = [w.numpy().copy() for w in self.critic.trainable_weights]
        self.snaps.append(snap)

    def on_train_begin(self, logs=None):
        self._take()

    def on_epoch_end(self, epoch, logs=None):
        self._take()


def _moved(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(a, b))


def test_freeze_then_unfreeze_changes_which_weights_move():
    keras.utils.set_random_seed(0)
    model = build_vgg_se_unet((32, 32, 3), encoder_filters=8, filters=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    snaps = _Snapshots(model)
    hist = model.fit(_data(), epochs=3, verbose=0, callbacks=[FreezeEncoder(2), snaps])
    s = snaps.snaps
    assert not _moved(s[0]["encoder"], s[1]["encoder"])  # epoch 0: frozen
    assert not _moved(s[1]["encoder"], s[2]["encoder"])  # epoch 1: frozen
    assert _moved(s[2]["encoder"], s[3]["encoder"])  # epoch 2: trains
    assert all(_moved(s[i]["decoder"], s[i + 1]["decoder"]) for i in range(3))
    assert hist.history["encoder_frozen"] == [1.0, 1.0, 0.0]
    assert model.get_layer("encoder").trainable  # left trainable after fit


def test_freeze_encoder_of_the_segan_segmentor():
    keras.utils.set_random_seed(0)
    seg = registry.build("vgg19se", input_shape=(32, 32, 3), encoder_filters=8, filters=4)
    critic = build_critic((32, 32, 3), filters=4, max_filters=16)
    model = SegANTrainer(seg, critic, supervised_loss="bce+dice")
    model.compile(seg_optimizer=keras.optimizers.Adam(1e-3),
                  critic_optimizer=keras.optimizers.Adam(1e-3))
    snaps = _Snapshots(seg, critic)
    model.fit(_data(), epochs=2, verbose=0, callbacks=[FreezeEncoder(1), snaps])
    s = snaps.snaps
    assert not _moved(s[0]["encoder"], s[1]["encoder"])
    assert _moved(s[1]["encoder"], s[2]["encoder"])
    for key in ("decoder", "critic"):
        assert _moved(s[0][key], s[1][key]) and _moved(s[1][key], s[2][key]), key


def test_freeze_encoder_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="epochs=-1"):
        FreezeEncoder(-1)
    for args, message in (
        (["--method", "segan"], "`segan` has none"),
        (["--method", "meta", "--model", "vgg19se"], "not supported by `method = 'meta'`"),
        (["--model", "nope"], "`--model nope` is not a segmentation model"),
    ):
        out = tmp_path / "r"
        res = CliRunner().invoke(
            main, ["fit", *args, "--freeze-encoder-epochs", "2", "--out", str(out)]
        )
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_cli_segan_vgg19se_freeze_survives_resume(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "[model]\nencoder_filters = 8\n[train]\nimage_every = 0\n[segan]\nthreshold_search = false\n"
    )
    run = tmp_path / "run"
    tiny = ["--method", "segan", "--model", "vgg19se", "--batch-size", "2", "--image-size",
            "32", "--filters", "4", "--limit", "6", "--no-progress"]

    def encoder():
        m = keras.saving.load_model(run / "last.keras")
        return [w.numpy() for w in m.get_layer("encoder").weights]

    res = CliRunner().invoke(main, ["fit", *tiny, "--config", str(cfg), "--epochs", "1",
                                    "--freeze-encoder-epochs", "2", "--out", str(run)])
    assert res.exit_code == 0, res.output
    first = encoder()
    assert config_lib.load_config(run / "config.toml").train.freeze_encoder_epochs == 2
    # Resumed for epoch 2 (index 1): still frozen. Then epoch 3: the encoder trains.
    res = CliRunner().invoke(main, ["fit", "--resume", str(run), "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert not _moved(first, encoder())
    res = CliRunner().invoke(main, ["fit", "--resume", str(run), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    assert _moved(first, encoder())
    hist = pd.read_csv(run / "history.csv")
    assert hist["encoder_frozen"].tolist() == [1.0, 1.0, 0.0]
    assert np.isfinite(hist["critic_loss"]).all() and "logistic_k" in hist
