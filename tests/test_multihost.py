"""Two processes x 4 CPU devices compute what one process with 8 devices computes.

The test starts two Python processes on this machine, each with 4 fake CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=4`,
`JAX_PLATFORMS=cpu`) and the DEM_JAX_* variables pointing at a coordinator on
127.0.0.1 (a free port), so `engine.distributed.initialize` starts JAX's
distributed runtime. Each process runs `workload` on the same global data,
feeding only its rows of every batch:

* source training (`train.train_source`, pmap, 4 steps of 64 on 256 digits;
  orbax checkpoints in ONE shared directory, then loaded again by both);
* evaluation (`train.evaluate`) of the trained model;
* a Tent+AdaDEM stream (3 batches of 32) under pmap and under shard_map
  (global arrays over all 8 devices built from process-local shards);
* a continual `protocol.run_domains` unit over two domains with orbax
  checkpoints of the adapted state after each domain;
* UDA: a MinEnt+AdaDEM `uda.Runner` (pmap), 2 steps of 16 source + 16
  target examples, then its target accuracy (padded, masked evaluation);
* noisy labels: `noisy_labels_lib.train_run` of ELR, 2 epochs of 2 steps of
  32 on 69 digits (each epoch evaluated; ELR's per-example table synchronised
  by the step's all-gather over every device of both processes), then its
  orbax checkpoint restored by both.

The pytest process (8 devices, one process) runs the same `workload`; every
number must match within atol 1e-5 / rtol 1e-4 (parameters, MEC, metrics) and
exactly for accuracies and predictions, and the two processes must agree
bit for bit with each other.

What runs across processes on CPU with jax/jaxlib 0.10.2: everything above.
Cross-process collectives on CPU use gloo, which is JAX 0.10's default
`jax_cpu_collectives_implementation` (nothing to configure): psum/pmean under
multi-process `jax.pmap` (global devices, process-local leading axis), under
`jax.jit(jax.shard_map(...))` on a mesh over `jax.devices()` with inputs from
`jax.make_array_from_process_local_data` / `make_array_from_single_device_arrays`,
`multihost_utils.process_allgather` (used for the per-example predictions), and
orbax-checkpoint 0.12.8 save (written once, by process 0) and restore (by
both). gloo prints "[Gloo] Rank r is connected to k peer ranks" lines to
stderr; they are harmless.

What did not work: taking a result with `x[0]` from a step's output (an array
over the process's 4 devices). That is a jitted program of its own with an
all-reduce over those 4 devices (`replica_groups={{0,1,2,3}}`), and on CPU
the two processes then hung, without an error, in 2 of 5 runs of this test
and within 1 to 20 iterations of a Runner loop: gdb showed process 0 in
`gloo::allgather` (process_allgather) and process 1 with three replicas of the
stream in `gloo::allreduce` and the fourth in `xla::Semaphore::Acquire`.
`parallel.unreplicate` therefore reads the first device's buffer on several
processes (no program, no collective); with it, 90 Runner iterations and 9
runs of this test (3 with two CPU hogs beside them) passed. Blocking after
every step (`jax.block_until_ready`) did not help.

Timing: about 35 s on an idle 2-core machine for the source training and TTA
parts (each process compiles the steps for its 4 devices, then the pytest
process runs the same workload on 8), about 65 s with two busy processes
beside it, up to about 3 min on a machine with a load of 10-15. The UDA and
noisy-label parts add about 7 s of CPU per process, almost all of it XLA
compiling their steps and evaluations (about 21 s of CPU in all): on a 2-core
machine with a load of 4-5 the file took 91 s against 68 s without them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (("hidden", 8), ("width", 4))
NUM_CLASSES = 10
ATOL, RTOL = 1e-5, 1e-4
TIMEOUT_S = 300  # about 35 s on an idle 2-core machine; generous for a loaded one


def workload(workdir: str) -> dict:
    """The computation both set-ups run; returns flat {name: numpy array}."""
    import jax

    from dem_jax import data
    from dem_jax.tasks.tta import methods
    from dem_jax.tasks.tta import protocol
    from dem_jax.engine import train as train_lib

    train, test = data.load("digits", "train"), data.load("digits", "test")
    cfg = train_lib.SourceConfig(model="cnn", model_kwargs=TINY, epochs=1, batch_size=64,
                                 augment="shift")
    small = train.subset(np.arange(256))
    variables = train_lib.train_source(small, None, cfg, os.path.join(workdir, "src"))
    reloaded = train_lib.train_source(small, None, cfg, os.path.join(workdir, "src"))
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    out = {"source_accuracy": np.float64(train_lib.evaluate(model, variables, test,
                                                            batch_size=64))}
    flat = lambda prefix, tree: {f"{prefix}/{jax.tree_util.keystr(k)}": np.asarray(v)
                                 for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    out.update(flat("source", variables))
    out.update(flat("reloaded", reloaded))

    def dom(name):
        ds = data.corrupt_dataset(test.subset(np.arange(96)), name, 5, seed=0)
        return protocol.Domain(name, ds.images, ds.labels)

    acfg = methods.AdaptConfig(method="tent", loss="adadem")
    make = lambda: methods.init_state(variables, acfg, NUM_CLASSES, lr=0.1)
    images, labels = protocol.stream(dom("gaussian_noise"), 0, 0, 32)
    for backend in ("pmap", "shard_map"):
        runner = protocol.Runner(model, acfg, NUM_CLASSES, backend=backend)
        state, metrics = runner(make(), images, labels)
        out.update(flat(f"tent_{backend}/trainable", state.trainable))
        out[f"tent_{backend}/mec"] = np.asarray(state.mec)
        out.update({f"tent_{backend}/{k}": np.asarray(v) for k, v in metrics.items()})
    result = protocol.run_domains(runner, make, [dom("gaussian_noise"), dom("fog")],
                                  setting="continual", seed=1, batch_size=32,
                                  ckpt_dir=os.path.join(workdir, "unit"))
    out["continual/accuracy"] = np.array(list(result["accuracy"].values()))
    out["continual/pred_counts"] = np.array(result["pred_counts"])
    target = data.corrupt_dataset(test.subset(np.arange(96)), "fog", 5, seed=0)
    out.update(uda_workload(model, variables, small, target, flat))
    out.update(noisy_workload(os.path.join(workdir, "noisy"), variables, flat))
    return out


def uda_workload(model, variables, source, target, flat) -> dict:
    """MinEnt+AdaDEM: 2 steps of 16 source + 16 target examples, then target accuracy."""
    from dem_jax.tasks import uda

    cfg = uda.UDAConfig(method="minent", loss="adadem")
    runner = uda.Runner(model, cfg, NUM_CLASSES)
    order = lambda n, stream: np.random.default_rng([0, stream]).permutation(n)[:32].reshape(2, 16)
    src, tgt = order(len(source), 1), order(len(target), 2)
    state, metrics = runner.train(uda.init_state(variables, cfg, NUM_CLASSES, lr=0.05),
                                  source.images[src], source.labels[src], target.images[tgt])
    out = flat("uda/trainable", state.trainable)
    out.update(flat("uda/batch_stats", state.batch_stats))
    out["uda/mec"] = state.mec
    out.update({f"uda/{k}": v for k, v in metrics.items()})
    out["uda/accuracy"] = np.asarray(runner.accuracy(state, target, batch_size=64))  # padded
    return out


def noisy_workload(workdir: str, variables, flat) -> dict:
    """ELR on 69 noisy digits: 2 epochs of 2 steps of 32, each evaluated; then the checkpoint.

    Training starts from `variables` (the source model): a fresh initialisation
    would compile the threefry initialisers once more, a few CPU seconds per process.
    """
    from dem_jax.engine import checkpoint
    from dem_jax.tasks import noisy
    from experiments import noisy_labels_lib
    from experiments.configs import noisy_default

    c = noisy_default.get_config()
    c.model_kwargs.width, c.model_kwargs.hidden = dict(TINY)["width"], dict(TINY)["hidden"]
    c.train_subset, c.test_subset = 66, 64  # 69 examples (stratified): 2 batches of 32
    c.epochs, c.batch_size, c.eval_batch_size = 2, 32, 64
    c.seeds, c.noise, c.losses, c.plot_losses = (0,), ("symmetric:0.4",), ("elr",), ()

    class FromSource(noisy_labels_lib.Experiment):
        def initial_variables(self, seed):
            return variables

    exp = FromSource(c, workdir)
    unit = noisy_labels_lib.train_run(exp, "symmetric:0.4", "elr", 0)
    template = noisy.init_state(exp.initial_variables(0), exp.tx,
                                noisy_labels_lib.loss_config(c, "elr"), len(exp.train),
                                exp.num_classes)
    ckpt = checkpoint.Checkpointer(exp.path("symmetric:0.4", "elr", "seed0"))
    state, _ = ckpt.restore(template)  # written once, read by every process
    ckpt.close()
    out = flat("noisy/state", state)  # ELR's table, parameters, optimiser state
    out.update({f"noisy/{k}": np.array([h[k] for h in unit["history"]])
                for k in unit["history"][0] if k != "epoch"})
    return out



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(workdir: str, out_path: str) -> None:
    import faulthandler
    faulthandler.dump_traceback_later(0.8 * TIMEOUT_S)  # where it waits, should it hang
    from dem_jax.engine import distributed

    assert distributed.initialize(), "DEM_JAX_* variables were not picked up"
    import jax
    assert jax.process_count() == 2 and jax.device_count() == 8, (
        jax.process_count(), jax.device_count())
    assert jax.local_device_count() == 4
    from dem_jax.engine import parallel
    me = jax.process_index()
    assert distributed.process_shard(64) == slice(32 * me, 32 * (me + 1))
    try:
        parallel.participating(jax.local_devices())
    except ValueError as e:
        assert "have none of the 4 devices" in str(e), e
    else:
        raise AssertionError("a step on one process's devices only must be refused")
    np.savez(out_path, **workload(workdir))


def test_two_processes_equal_one_process_on_the_same_global_batches(tmp_path):
    import chex
    import jax

    assert jax.device_count() == 8, "the root conftest.py asks for 8 CPU devices"
    port = _free_port()
    shared = tmp_path / "shared"       # one work directory for both processes
    procs, logs = [], []
    start = time.time()
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   JAX_PLATFORMS="cpu", DEM_JAX_COORDINATOR=f"127.0.0.1:{port}",
                   DEM_JAX_NUM_PROCESSES="2", DEM_JAX_PROCESS_ID=str(pid),
                   # `experiments` runs from the checkout, not site-packages; a script's
                   # sys.path starts at its own folder (tests/), so name the root.
                   PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        log = open(tmp_path / f"process{pid}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, __file__, str(shared), str(tmp_path / f"process{pid}.npz")],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    try:
        codes = [p.wait(timeout=max(1.0, TIMEOUT_S - (time.time() - start))) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.time() - start
    texts = []
    for pid, log in enumerate(logs):
        log.seek(0)
        texts.append(f"--- process {pid} ---\n" + log.read()[-8000:])
        log.close()
    assert codes == [0, 0], (f"two-process run failed (exit codes {codes}, "
                             f"{elapsed:.0f} s):\n" + "\n".join(texts))
    print(f"two processes x 4 devices: {elapsed:.1f} s")

    got = [dict(np.load(tmp_path / f"process{pid}.npz")) for pid in range(2)]
    expected = workload(str(tmp_path / "single"))
    assert set(got[0]) == set(expected), set(got[0]) ^ set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[1][name], got[0][name],
                                      err_msg=f"{name}: process 1 != process 0")
        if name.endswith(("preds", "correct", "count", "accuracy", "pred_counts")):
            np.testing.assert_array_equal(got[0][name], expected[name],
                                          err_msg=f"{name}: 2 processes != 1 process")
        else:
            chex.assert_trees_all_close(got[0][name], expected[name], atol=ATOL, rtol=RTOL,
                                        custom_message=f"{name}: 2 processes != 1 process")
    chex.assert_trees_all_equal({k: v for k, v in got[0].items() if k.startswith("source/")},
                                {k.replace("reloaded/", "source/"): v for k, v in
                                 got[0].items() if k.startswith("reloaded/")},
                                custom_message="the checkpoint restored on both processes")


def test_process_shard_on_one_process_is_the_whole_batch():
    import jax

    from dem_jax.engine import distributed
    assert distributed.process_shard(64) == slice(0, 64)
    np.testing.assert_array_equal(distributed.process_indices(8, jax.devices()[:2]),
                                  np.arange(8))
    with pytest.raises(ValueError, match="global batch of 60 is not divisible by the 8"):
        distributed.process_shard(60)


def test_initialize_does_nothing_on_a_single_process_with_nothing_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEM_JAX_", "JAX_COORD"))}
    code = ("from dem_jax.engine import distributed; import jax; "
            "print(distributed.initialize(), jax.process_count())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "1"], out.stdout


def test_initialize_reports_a_bad_environment_variable(monkeypatch):
    from dem_jax.engine import distributed
    monkeypatch.setenv("DEM_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="DEM_JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.initialize()


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
