"""8 fake CPU devices compute what 1 device computes on the same global batches.

Source training (`train.make_train_step` under `parallel.data_parallel`) after
k steps: parameters, BatchNorm statistics, optimiser state and metrics of 8
devices equal those of 1 device within atol 1e-5 / rtol 1e-4 (float32 sums in
another order), under pmap and under shard_map; `train_source`/`evaluate` end
to end. The steps compile once (trace counters), also for the TTA `Runner`.
Tent+AdaDEM 8-vs-1 and shard_map-vs-pmap live in tests/test_tta.py.
"""

import chex
import jax
import numpy as np
import optax
import pytest

from dem_jax import data
from dem_jax.tasks.tta import methods
from dem_jax.tasks.tta import protocol
from dem_jax.engine import parallel
from dem_jax.engine import train as train_lib

TINY = (("hidden", 8), ("width", 4))
NUM_CLASSES = 10
STEPS = 3
BATCH = 64
ATOL, RTOL = 1e-5, 1e-4
SETUPS = (("1 device pmap", 1, "pmap"), ("8 devices pmap", 8, "pmap"),
          ("8 devices shard_map", 8, "shard_map"))


@pytest.fixture(scope="module")
def digits():
    if jax.device_count() < 8:
        pytest.fail("needs 8 devices; the root conftest.py sets XLA_FLAGS "
                    "--xla_force_host_platform_device_count=8 before JAX starts")
    return data.load("digits", "train"), data.load("digits", "test")


def initial_state(train):
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    tx = train_lib.make_optimizer("sgd_momentum", optax.cosine_decay_schedule(0.05, 10),
                                  weight_decay=5e-4)
    variables = train_lib.models.init_variables(model, jax.random.key(0),
                                                (1, *train.images.shape[1:]))
    state = train_lib.TrainState(jax.numpy.zeros((), jax.numpy.int32), variables["params"],
                                 variables["batch_stats"], tx.init(variables["params"]))
    return model, tx, state


def run_steps(model, tx, state, train, devices, backend, *, on_trace=None):
    """`STEPS` source steps on fixed global batches; returns (state, [metrics per step])."""
    per_device = train_lib.make_train_step(model, tx)
    if on_trace is not None:
        def per_device(*args, _step=per_device):
            on_trace()
            return _step(*args)
    step = parallel.data_parallel(per_device, backend=backend, devices=devices,
                                  donate_argnums=(0,))
    rep = parallel.replicate(state, parallel.num_local_devices(devices))
    history = []
    for i in range(STEPS):
        idx = np.arange(i * BATCH, (i + 1) * BATCH)
        images = train_lib.augment(train.images[idx], np.random.default_rng(i), "shift")
        rep, metrics = step(rep, *parallel.shard_batch((images, train.labels[idx]), devices))
        history.append({k: np.asarray(v[0]) for k, v in metrics.items()})
    return jax.tree.map(np.asarray, parallel.unreplicate(rep)), history


def test_source_steps_on_8_devices_equal_1_device_under_pmap_and_shard_map(digits):
    train, _ = digits
    model, tx, state = initial_state(train)
    out = {name: run_steps(model, tx, state, train, jax.devices()[:n], backend)
           for name, n, backend in SETUPS}
    ref_state, ref_metrics = out["1 device pmap"]
    assert int(ref_state.step) == STEPS
    for name in ("8 devices pmap", "8 devices shard_map"):
        new, metrics = out[name]
        for field in ("params", "batch_stats", "opt_state"):
            chex.assert_trees_all_close(getattr(new, field), getattr(ref_state, field),
                                        atol=ATOL, rtol=RTOL,
                                        custom_message=f"{field}: {name} != 1 device")
        chex.assert_trees_all_close(metrics, ref_metrics, atol=ATOL, rtol=RTOL,
                                    custom_message=f"metrics: {name} != 1 device")
    chex.assert_trees_all_close(out["8 devices shard_map"], out["8 devices pmap"], atol=ATOL,
                                rtol=RTOL, custom_message="shard_map != pmap on 8 devices")


def test_train_source_and_evaluate_on_8_devices_equal_1_device(digits, tmp_path):
    train, test = digits
    small = train.subset(np.arange(256))
    cfg = train_lib.SourceConfig(model="cnn", model_kwargs=TINY, epochs=2, batch_size=64)
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    one = train_lib.train_source(small, None, cfg, str(tmp_path / "one"),
                                 devices=jax.devices()[:1])
    eight = train_lib.train_source(small, None, cfg, str(tmp_path / "eight"))
    chex.assert_trees_all_close(eight, one, atol=ATOL, rtol=RTOL,
                                custom_message="train_source: 8 devices != 1 device")
    acc_one = train_lib.evaluate(model, one, test, batch_size=64, devices=jax.devices()[:1])
    acc_eight = train_lib.evaluate(model, one, test, batch_size=64, backend="shard_map")
    assert acc_one == acc_eight, (acc_one, acc_eight)


def test_global_batch_not_divisible_by_devices_is_a_clear_error(digits, tmp_path):
    train, _ = digits
    cfg = train_lib.SourceConfig(model="cnn", model_kwargs=TINY, epochs=1, batch_size=60)
    with pytest.raises(ValueError, match="batch_size=60 is not divisible by the 8 devices"):
        train_lib.train_source(train.subset(np.arange(256)), None, cfg, str(tmp_path))
    with pytest.raises(ValueError, match="batch size 60 is not divisible by the 8 devices"):
        parallel.shard_batch((train.images[:60], train.labels[:60]), jax.devices()[:8])
    # One device takes any batch.
    x, y = parallel.shard_batch((train.images[:60], train.labels[:60]), jax.devices()[:1])
    assert x.shape == (1, 60, 8, 8, 1) and y.shape == (1, 60)


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_source_step_and_evaluation_compile_once(digits, backend, monkeypatch):
    train, test = digits
    model, tx, state = initial_state(train)
    traces = []
    run_steps(model, tx, state, train, jax.devices()[:8], backend,
              on_trace=lambda: traces.append("train"))
    assert traces == ["train"], f"{backend}: the source step traced {len(traces)} times"

    real = train_lib.make_eval_step

    def counting_eval_step(m):
        step = real(m)

        def counted(*args):
            traces.append("eval")
            return step(*args)
        return counted

    monkeypatch.setattr(train_lib, "make_eval_step", counting_eval_step)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_lib.evaluate(model, variables, test, batch_size=64, backend=backend)  # 8 batches
    assert traces == ["train", "eval"], f"{backend}: evaluation traced {traces.count('eval')}"


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_tta_runner_compiles_once_per_stream_shape(digits, backend, monkeypatch):
    train, test = digits
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    variables = train_lib.models.init_variables(model, jax.random.key(0),
                                                (1, *train.images.shape[1:]))
    traces = []
    real = methods.make_batch_fn

    def counting_batch_fn(step, *, grid=False):
        run = real(step, grid=grid)

        def counted(*args):
            traces.append(1)
            return run(*args)
        return counted

    monkeypatch.setattr(methods, "make_batch_fn", counting_batch_fn)
    cfg = methods.AdaptConfig(method="tent", loss="adadem")
    runner = protocol.Runner(model, cfg, NUM_CLASSES, backend=backend)
    make = lambda: methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1)
    domains = []
    for name in ("gaussian_noise", "fog", "contrast"):
        ds = data.corrupt_dataset(test.subset(np.arange(64)), name, 5, seed=0)
        domains.append(protocol.Domain(name, ds.images, ds.labels))
    protocol.run_domains(runner, make, domains, setting="continual", seed=0, batch_size=16)
    protocol.run_domains(runner, make, domains, setting="single", seed=1, batch_size=16)
    assert len(traces) == 1, f"{backend}: the adaptation step traced {len(traces)} times " \
                             "for 6 streams of one batch shape"
