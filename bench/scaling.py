"""Data-parallel throughput on 1, 2, 4, 8 devices: the source train step and a Tent+AdaDEM step.

  python -m bench.scaling [--devices 1,2,4,8] [--steps 10] [--model cnn|resnet]
                          [--batch 64] [--repeats 3] [--backend pmap|shard_map]

The global batch is the same for every device count (strong scaling), so each
device gets `batch / devices` examples. For each device count:

* source: `train.make_train_step` under `parallel.data_parallel` (gradients
  and BatchNorm statistics averaged over the devices), `--steps` steps, the
  batch transferred from the host every step as in `train_source`;
* Tent+AdaDEM: `protocol.Runner`, a stream of `--steps` batches, one
  compiled step per batch, as in the experiments (the state is replicated and
  the metrics fetched once per stream).

Both are compiled and run once first; the time is the median of `--repeats`
timed runs. Images are random: cnn 28x28x1 (MNIST size), resnet (ResNet-20)
32x32x3 (CIFAR size).

On a machine without accelerators, 8 CPU devices are faked
(`--xla_force_host_platform_device_count=8`, set here before JAX starts). They
share the same CPU cores, so no real scaling is expected there: at most a gain
up to the number of cores (devices run in their own threads, and one device
does not keep every core busy), then the overhead of splitting a batch. Real
numbers need GPUs or TPUs (the same command runs on them unchanged).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before JAX starts; only the CPU backend reads it.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dem_jax import models  # noqa: E402
from dem_jax.tasks.tta import methods  # noqa: E402
from dem_jax.tasks.tta import protocol  # noqa: E402
from dem_jax.engine import parallel  # noqa: E402
from dem_jax.engine import train as train_lib  # noqa: E402

NUM_CLASSES = 10
MODELS = {"cnn": ((("hidden", 64), ("width", 16)), (28, 28, 1)),
          "resnet": ((("depth", 20), ("norm", "batch"), ("width", 16)), (32, 32, 3))}


def _median_time(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_source(model, shape, devices, *, batch: int, steps: int, repeats: int,
                 backend: str) -> float:
    """Seconds per source train step."""
    tx = train_lib.make_optimizer("sgd_momentum", 0.01, weight_decay=5e-4)
    variables = models.init_variables(model, jax.random.key(0), (1, *shape))
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), variables["params"],
                                 variables["batch_stats"], tx.init(variables["params"]))
    step = parallel.data_parallel(train_lib.make_train_step(model, tx), backend=backend,
                                  devices=devices, donate_argnums=(0,))
    rng = np.random.default_rng(0)
    images = rng.random((batch, *shape), np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    box = [parallel.replicate(state, parallel.num_local_devices(devices))]

    def run():
        rep = box[0]
        for _ in range(steps):
            rep, metrics = step(rep, *parallel.shard_batch((images, labels), devices))
        jax.block_until_ready((rep, metrics))
        box[0] = rep

    return _median_time(run, repeats) / steps


def bench_adapt(model, shape, devices, *, batch: int, steps: int, repeats: int,
                backend: str) -> float:
    """Seconds per Tent+AdaDEM adaptation step (one batch of a stream)."""
    variables = models.init_variables(model, jax.random.key(0), (1, *shape))
    cfg = methods.AdaptConfig(method="tent", loss="adadem")
    runner = protocol.Runner(model, cfg, NUM_CLASSES, backend=backend, devices=devices)
    rng = np.random.default_rng(1)
    images = rng.random((steps, batch, *shape), np.float32)
    labels = rng.integers(0, NUM_CLASSES, (steps, batch)).astype(np.int32)
    state = methods.init_state(variables, cfg, NUM_CLASSES, lr=0.01)
    # The Runner returns host arrays: the work is finished when it returns.
    return _median_time(lambda: runner(state, images, labels), repeats) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8", help="device counts, comma separated")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--model", default="cnn", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--backend", default="pmap", choices=parallel.BACKENDS)
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.devices.split(",")]
    available = jax.device_count()
    for c in counts:
        if c < 1 or c > available:
            parser.error(f"--devices: {c} is not in [1, {available}] (the devices JAX sees).")
        if args.batch % c:
            parser.error(f"--batch {args.batch} is not divisible by {c} devices.")
    if jax.process_count() > 1:
        parser.error("run the benchmark as one process")
    kwargs, shape = MODELS[args.model]
    model = train_lib.build_model(args.model, NUM_CLASSES, kwargs)
    dev = jax.devices()[0]
    print(f"# Data-parallel scaling: {args.model} {'x'.join(map(str, shape))}, global batch "
          f"{args.batch}, {args.steps} steps per run, median of {args.repeats}, {args.backend}")
    print(f"\njax {jax.__version__}, {dev.platform} ({dev.device_kind}), {available} devices, "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    if dev.platform == "cpu":
        print(f"\nThese are {available} fake CPU devices sharing the same {os.cpu_count()} "
              "cores: no real scaling is expected here (at most a gain up to the number of "
              "cores, then the cost of splitting a batch). Real numbers need GPUs or TPUs.")
    rows = []
    for c in counts:
        devices = jax.devices()[:c]
        kw = dict(batch=args.batch, steps=args.steps, repeats=args.repeats,
                  backend=args.backend)
        src = bench_source(model, shape, devices, **kw)
        ada = bench_adapt(model, shape, devices, **kw)
        rows.append((c, src, ada))
    base_src, base_ada = rows[0][1], rows[0][2]
    print(f"\n| devices | per device | source steps/s | source images/s | vs {counts[0]} "
          f"| Tent+AdaDEM steps/s | Tent+AdaDEM images/s | vs {counts[0]} |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, src, ada in rows:
        print(f"| {c} | {args.batch // c} | {1 / src:.1f} | {args.batch / src:.0f} | "
              f"{base_src / src:.2f}x | {1 / ada:.1f} | {args.batch / ada:.0f} | "
              f"{base_ada / ada:.2f}x |")


if __name__ == "__main__":
    main()
