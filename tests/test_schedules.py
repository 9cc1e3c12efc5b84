import keras
import numpy as np
import pandas as pd
import pytest

from lesionkeras import config as config_lib
from lesionkeras import schedules
from lesionkeras.training.callbacks import LearningRateLogger
from lesionkeras.errors import ConfigError
from lesionkeras.schedules import LinearDecay, OneCycle, SlantedTriangular

ONE_CYCLE = OneCycle(1.0, total_steps=100, pct_start=0.2, div_factor=25, final_div_factor=1e4)
ONE_CYCLE_LINEAR = OneCycle(1.0, total_steps=100, pct_start=0.2, anneal="linear")
STLR = SlantedTriangular(0.01, total_steps=1000, cut_frac=0.1, ratio=32)
LINEAR = LinearDecay(1.0, total_steps=10, final_lr=0.2)


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        (ONE_CYCLE, 0, 0.04),  # max / div_factor
        (ONE_CYCLE, 10, 0.52),  # half-way up a half cosine
        (ONE_CYCLE, 20, 1.0),  # peak at pct_start
        (ONE_CYCLE, 60, 0.500002),  # half-way down to 0.04 / 1e4
        (ONE_CYCLE, 100, 4e-6),
        (ONE_CYCLE, 150, 4e-6),  # stays at the end
        (ONE_CYCLE_LINEAR, 10, 0.52),
        (ONE_CYCLE_LINEAR, 40, 0.75000075),
        # Howard & Ruder eq. 3 with T=1000, cut=100, ratio=32.
        (STLR, 0, 0.01 / 32),
        (STLR, 50, 0.00515625),
        (STLR, 100, 0.01),
        (STLR, 550, 0.00515625),
        (STLR, 1000, 0.01 / 32),
        (STLR, 2000, 0.01 / 32),
        (LINEAR, 0, 1.0),
        (LINEAR, 5, 0.6),
        (LINEAR, 10, 0.2),
        (LINEAR, 20, 0.2),
    ],
)
def test_golden_values(schedule, step, expected):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("schedule", [ONE_CYCLE, STLR, LINEAR])
def test_serialisation_round_trip(schedule):
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert type(again) is type(schedule) and again.get_config() == schedule.get_config()
    assert float(again(37)) == pytest.approx(float(schedule(37)))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: OneCycle(1.0, 0), "total_steps"),
        (lambda: OneCycle(1.0, 10, pct_start=1.0), "pct_start"),
        (lambda: OneCycle(1.0, 10, anneal="exp"), "anneal"),
        (lambda: SlantedTriangular(1.0, 10, cut_frac=0.0), "cut_frac"),
        (lambda: SlantedTriangular(1.0, 10, ratio=0.5), "ratio"),
        (lambda: LinearDecay(1.0, 10, final_lr=-1), "final_lr"),
        (lambda: schedules.PlateauDivide(divide=1.0), "divide"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_selects_schedule_and_validates(tmp_path):
    cfg = config_lib.load_config(
        None, {"train.schedule": "slanted_triangular", "train.epochs": 4, "train.lr": 0.01}
    )
    s = schedules.make_schedule(cfg.train, steps_per_epoch=250)
    assert isinstance(s, SlantedTriangular) and s.total_steps == 1000
    assert float(s(100)) == pytest.approx(0.01)
    cfg = cfg.override({"train.schedule": "plateau"})
    assert schedules.make_schedule(cfg.train, None) == 0.01
    assert isinstance(schedules.schedule_callbacks(cfg.train)[0], schedules.PlateauDivide)
    f = tmp_path / "c.toml"
    f.write_text("[train]\npct_start = 1.5\n")
    with pytest.raises(ConfigError, match="`train.pct_start"):
        config_lib.load_config(f)
    f.write_text("[train]\nschedule = 'cosine'\n")
    with pytest.raises(ConfigError, match="`train.schedule"):
        config_lib.load_config(f)


def test_logged_learning_rate_is_the_scheduled_one(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(LinearDecay(1.0, total_steps=4)), "mse")
    x, y = np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32")
    model.fit(x, y, batch_size=2, epochs=2, verbose=0,
              callbacks=[LearningRateLogger(), keras.callbacks.CSVLogger(str(tmp_path / "h.csv"))])
    # Logged after 2 and 4 steps: the rate of the next step.
    np.testing.assert_allclose(model.history.history["learning_rate"], [0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "h.csv")["learning_rate"], [0.5, 0.0], atol=1e-7)


def test_saved_model_keeps_its_schedule(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.Adam(ONE_CYCLE), "mse")
    model.fit(np.zeros((2, 2)), np.zeros((2, 1)), verbose=0)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(again.optimizer._learning_rate, OneCycle)
    assert float(again.optimizer.learning_rate) == pytest.approx(float(ONE_CYCLE(1)))


@pytest.mark.slow
def test_fit_with_one_cycle_logs_the_cycle(tmp_path):
    from lesionkeras.training import run as run_lib

    cfg = config_lib.load_config(None, {
        "data.image_size": 32, "model.filters": 4, "model.depth": 2, "train.batch_size": 4,
        "train.progress": False, "data.limit": 10, "train.epochs": 2, "train.lr": 0.01,
        "train.schedule": "one_cycle", "train.image_every": 0, "out": str(tmp_path / "run"),
    })
    run_lib.fit(cfg, verbose=0)
    lr = pd.read_csv(tmp_path / "run" / "history.csv")["learning_rate"].to_numpy()
    # 8 training images / batch 4 = 2 steps per epoch, 4 in all: peak then the floor.
    expected = OneCycle(0.01, total_steps=4, pct_start=0.3)
    np.testing.assert_allclose(lr, [float(expected(2)), float(expected(4))], rtol=1e-5)

    # A fresh process (nothing imported but the inference loading module) loads the
    # run: its checkpoint's optimizer names a lesionkeras schedule.
    import subprocess
    import sys

    code = ("import sys; from lesionkeras.inference.loading import load_predictor; "
            "p = load_predictor(sys.argv[1]); print(p.model.count_params())")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.split()[-1]) > 0
