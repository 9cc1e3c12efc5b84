"""`--strategy multiworker`: two worker processes on localhost train SegAN in lockstep."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = r'''
import json, sys, time
start = time.time()
import numpy as np
import keras
import tensorflow as tf
from lesionkeras.training.distribute import resolve_strategy
from lesionkeras.models.critic import build_critic
from lesionkeras.models.segan import build_segan
from lesionkeras.methods.segan import SegANTrainer

out = sys.argv[1]
imported = time.time() - start
strategy = resolve_strategy("multiworker")
t_strategy = time.time() - start
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 32, 32, 3)).astype("float32")
yy, xx = np.mgrid[:32, :32]
y = np.stack([(yy - 16) ** 2 + (xx - 12 - i) ** 2 < 64 for i in range(8)])[..., None]
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
ds = tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch(4).repeat()
ds = ds.with_options(options)
with strategy.scope():
    model = SegANTrainer(
        build_segan((32, 32, 3), depth=2, filters=4),
        build_critic((32, 32, 3), blocks=3, filters=4, max_filters=16),
        clip=0.05, supervised_loss="bce+dice",
    )
    model.compile(seg_optimizer=keras.optimizers.Adam(1e-2),
                  critic_optimizer=keras.optimizers.Adam(1e-2))
t_built = time.time() - start
before = [v.numpy() for v in model.network.trainable_weights]
hist = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
after = [v.numpy() for v in model.network.trainable_weights]
np.savez(out + ".npz", *after)
moved = max(float(np.abs(a - b).max()) for a, b in zip(before, after))
critic_max = max(float(np.abs(v.numpy()).max()) for v in model.critic.trainable_weights)
json.dump({"replicas": strategy.num_replicas_in_sync, "moved": moved, "critic_max": critic_max,
           "loss": hist.history["loss"][-1], "seconds": [round(t, 1) for t in (imported, t_strategy, t_built, time.time() - start)], "critic_loss": hist.history["critic_loss"][-1]},
          open(out + ".json", "w"))
'''


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_finish_with_identical_segmentor_weights(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [f"localhost:{p}" for p in _free_ports(2)]
    procs = []
    for index in range(2):
        env = dict(os.environ)
        env.update(
            TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                  "task": {"type": "worker", "index": index}}),
            TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
        )
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"w{index}")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    logs = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    print("worker seconds (import, strategy, built, total):", [log["seconds"] for log in logs])
    for log in logs:
        assert log["replicas"] == 2
        assert log["moved"] > 1e-4  # the segmentor trained
        assert log["critic_max"] <= np.float32(0.05)  # clamped on both workers
        assert np.isfinite(log["loss"]) and np.isfinite(log["critic_loss"])
    # Losses are all-reduced: both workers report the same numbers.
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-5)
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(w0.files) == len(w1.files) > 10
    for key in w0.files:
        np.testing.assert_allclose(w0[key], w1[key], atol=1e-6, err_msg=key)
