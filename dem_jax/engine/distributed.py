"""Several processes (hosts): start JAX's distributed runtime, give each process its rows.

One process runs per host; together they see every device (`jax.devices()`),
each feeds only its own (`jax.local_devices()`). The data-parallel steps of
dem_jax already reduce every statistic over all devices (`parallel.AXIS`), so
a multi-process run computes what one process with all the devices would,
provided every process passes the same global batches and takes its own rows
of each (`process_shard`). Then every process ends with the same metrics and
the same parameters; only process 0 writes logs and results
(`reporting.is_writer`), and orbax checkpoints are written once, coordinated
across processes, and read by all. The work directory must then be the same
directory for every process (a shared file system): a process that finds no
checkpoint where another finds one would wait forever in the next collective.

Start every process with the same command plus its own id, before any JAX work:

    python -m experiments.tta --workdir=/shared/run --coordinator_address=10.0.0.1:1234 \\
        --num_processes=2 --process_id=0      # on host 0 (it runs the coordinator)
    python -m experiments.tta --workdir=/shared/run --coordinator_address=10.0.0.1:1234 \\
        --num_processes=2 --process_id=1      # on host 1

or set `DEM_JAX_COORDINATOR`, `DEM_JAX_NUM_PROCESSES`, `DEM_JAX_PROCESS_ID`.
With nothing set, `initialize` lets JAX detect a cluster (Cloud TPU VMs,
Slurm, Open MPI: `jax.distributed.initialize()` with no arguments) and does
nothing on a plain single machine. On CPU, cross-process collectives use gloo
(JAX 0.10's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os

import jax
import numpy as np

ENV_COORDINATOR = "DEM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DEM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DEM_JAX_PROCESS_ID"

# What jax.distributed.initialize() raises when no argument is given and no
# cluster environment is detected, i.e. on a plain single machine.
_NO_CLUSTER = "coordinator_address should be defined"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer.") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Starts JAX's distributed runtime when the run spans several processes.

    Call it once per process, before any other JAX call (even `jax.devices()`).
    Arguments left as None are read from `DEM_JAX_COORDINATOR`,
    `DEM_JAX_NUM_PROCESSES` and `DEM_JAX_PROCESS_ID`.

    Args:
      coordinator_address: "host:port" of process 0, reachable from every process.
      num_processes: how many processes take part.
      process_id: this process, in `[0, num_processes)`.

    Returns:
      True if the distributed runtime is running (now or already), False on a
      single process where nothing was set and no cluster was detected.

    Raises:
      ValueError: for an incomplete or inconsistent setting (JAX's message).
      RuntimeError: when called after JAX has started (JAX's message).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if (coordinator_address, num_processes, process_id) == (None, None, None):
        try:  # Cloud TPU, Slurm, Open MPI: JAX finds the cluster itself.
            jax.distributed.initialize()
        except ValueError as e:
            if _NO_CLUSTER not in str(e):
                raise
            return False  # a single process: nothing to do
        return True
    if num_processes == 1 and coordinator_address is None:
        return False  # explicitly one process
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def define_flags() -> None:
    """Defines `--coordinator_address`, `--num_processes` and `--process_id` (absl).

    For an experiment's `main.py`; pass the parsed values to `initialize` before
    any JAX work. Left unset, `initialize` reads the DEM_JAX_* variables.
    """
    from absl import flags
    flags.DEFINE_string("coordinator_address", None,
                        f"Several processes: host:port of process 0 (default: ${ENV_COORDINATOR}).")
    flags.DEFINE_integer("num_processes", None,
                         f"Several processes: how many (default: ${ENV_NUM_PROCESSES}).")
    flags.DEFINE_integer("process_id", None,
                         f"Several processes: this one's id (default: ${ENV_PROCESS_ID}).")


def initialize_from_flags() -> bool:
    """`initialize` with the values of the flags of `define_flags` (after absl parsed them)."""
    from absl import flags
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


def process_shard(num_examples: int, devices=None) -> slice:
    """The rows of a global batch that this process feeds: `[p * B / P, (p + 1) * B / P)`.

    More generally, the rows are split evenly over `devices` (default: all
    devices) taken process by process, and this process takes the rows of its
    own devices; with the same number of devices per process that is the
    block above.

    Args:
      num_examples: the global batch size B.
      devices: the devices that run the step (default `jax.devices()`).

    Raises:
      ValueError: when the number of devices does not divide B.
    """
    devices = list(devices or jax.devices())
    n = len(devices)
    if num_examples % n:
        raise ValueError(f"The global batch of {num_examples} is not divisible by the {n} "
                         f"devices of the {jax.process_count()} processes.")
    per_device = num_examples // n
    me = jax.process_index()
    before = sum(d.process_index < me for d in devices)
    mine = sum(d.process_index == me for d in devices)
    return slice(before * per_device, (before + mine) * per_device)


def process_indices(num_examples: int, devices=None) -> np.ndarray:
    """`process_shard` as an index array `[B / P]`."""
    return np.arange(num_examples)[process_shard(num_examples, devices)]
