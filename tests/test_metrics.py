"""Logging: TensorBoard event files without TensorFlow, W&B only on request, step metrics
read from the device every N steps with the same per-epoch values."""

import builtins
import glob
import os
import struct

import jax
import jax.numpy as jnp
import pytest

from dem_jax.engine import metrics
from dem_jax.engine import reporting
from experiments.configs import noisy_default


def read_scalars(logdir):
    """{tag: [(step, value)]} from tensorboardX's event files (TFRecord framing)."""
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_records_become_tensorboard_scalars_once(tmp_path):
    assert metrics.scalars({"phase": "noisy", "setting": "symmetric:0.4", "row": "elr",
                            "seed": 1, "epoch": 3, "loss": 0.5, "test_accuracy": 0.75}) == (
        "noisy/symmetric:0.4/elr/seed1", 3, {"loss": 0.5, "test_accuracy": 0.75})
    log = metrics.open_log(str(tmp_path), noisy_default.get_config())
    log.write(phase="source", epoch=0, loss=0.5)
    log.write(phase="source", epoch=1, loss=0.25)
    log.close()
    resumed = metrics.open_log(str(tmp_path), noisy_default.get_config())
    resumed.write(phase="source", epoch=1, loss=0.25)  # a resumed run redoes epoch 1
    resumed.close()
    assert read_scalars(str(tmp_path / "tensorboard")) == {"source/loss": [(0, 0.5), (1, 0.25)]}


def test_wandb_is_imported_only_when_asked_for_and_its_absence_is_explained(tmp_path,
                                                                            monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    config = noisy_default.get_config()
    config.logging.tensorboard = False
    metrics.open_log(str(tmp_path), config)  # off by default: wandb is never imported
    config.logging.wandb = True
    with pytest.raises(reporting.ClearError, match="pip install wandb"):
        metrics.open_log(str(tmp_path), config)


def test_step_metrics_read_every_n_steps_give_the_per_step_means(monkeypatch):
    steps = [{"loss": jnp.float32(1.0 / (i + 3)), "accuracy": jnp.float32(i / 7)}
             for i in range(8)]
    expected = {"loss": 0.0, "accuracy": 0.0}  # what reading every step with float() gave
    for m in steps:
        for k in expected:
            expected[k] += float(m[k]) / len(steps)
    transfers = []
    real_get = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda x: transfers.append(len(x)) or real_get(x))
    for every, reads in ((1, [1] * 8), (3, [3, 3, 2]), (100, [8])):
        transfers.clear()
        acc = metrics.StepMetrics(("loss", "accuracy"), len(steps), every_steps=every)
        for m in steps:
            acc.add(m)
        assert acc.means() == expected, every
        assert transfers == reads, (every, transfers)
