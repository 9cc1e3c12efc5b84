"""Test set-up: two logical CPUs (for MirroredStrategy), a private cache, clean Keras state."""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Must run before TensorFlow creates its devices: the distributed tests need
# two replicas on this CPU-only machine.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
# Under pytest-xdist each worker already keeps a core busy; TensorFlow's default
# of one intra-op thread per core would oversubscribe the machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def pytest_configure(config):
    # pytest collects garbage after every test; with TensorFlow loaded each pass
    # walks about a million long-lived objects (~0.15 s a test). Freezing the
    # objects that exist after imports moves them out of those passes.
    gc.freeze()
    config.addinivalue_line("markers", "slow: heavier test (still runs in CI)")


def pytest_collection_modifyitems(config, items):
    # Heavy tests first (a stable sort keeps the file order within each group). Under
    # `-n 2 --dist worksteal` (pytest.ini) each worker runs its queue from the front and
    # an idle one takes the back half of the other's: the long tests start early on
    # both workers and quick ones even out the end, instead of one long test running
    # alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # The synthetic dataset is cached once per test session, never in $HOME.
    os.environ["LESIONKERAS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(autouse=True)
def _clear_keras():
    # Every traced tf.function leaves graphs that TensorFlow keeps alive (~50k
    # objects per training test, none of them garbage), so the heap grows all
    # session and clear_session()'s full gc.collect() walked all of it: 6-8 s a
    # test late in a run. Instead collect only what the previous test created
    # (its fixtures are released by now) and freeze the survivors so later
    # collections, automatic ones included, skip them.
    gc.collect()
    gc.freeze()
    yield
    keras.backend.clear_session(free_memory=False)
    keras.mixed_precision.set_global_policy("float32")
