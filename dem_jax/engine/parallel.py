"""Data parallelism: one per-device step function, run under `jax.pmap` or `jax.shard_map`.

Step functions in dem_jax are written for ONE device and reduce every batch
statistic explicitly over the named axis `AXIS` (`lax.pmean`/`lax.psum`).
`data_parallel` runs such a function on all local devices. Every argument and
result carries a leading device axis, so callers do not care which backend
runs it:

* `"pmap"`: `jax.pmap(fn, axis_name=AXIS)` (what the user asked for; pmap is in
  maintenance mode since JAX 0.8 and now lowers to jit + shard_map);
* `"shard_map"`: `jax.jit(jax.shard_map(...))` on a 1-D `("batch",)` mesh with
  `check_vma=False`, which gives psum the same transpose as under pmap, so the
  same step gives the same gradients (tests check this).

Several processes (hosts, `engine.distributed`): `devices` default to all
devices of all processes and collectives reduce over all of them, but each
process passes and gets back arrays whose leading axis is its LOCAL device
count, and feeds only its rows of each global batch (`shard_batch`). On one
process nothing of this changes anything.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dem_jax.engine import distributed

AXIS = "batch"
BACKENDS = ("pmap", "shard_map")


def data_parallel(fn: Callable, *, backend: str = "pmap",
                  devices: Sequence[jax.Device] | None = None,
                  static_broadcasted_argnums: Sequence[int] = (),
                  donate_argnums: Sequence[int] = ()) -> Callable:
    """Runs a per-device function on every device (leading device axis everywhere).

    Args:
      fn: per-device function; collectives over `AXIS` inside.
      backend: "pmap" or "shard_map".
      devices: the devices to use (default: all devices; on one process, all
        local devices).
      static_broadcasted_argnums: arguments that are static (hashable, not
        mapped), passed unchanged to `fn`.
      donate_argnums: arguments whose buffers may be reused (e.g. the state).

    Returns:
      A function taking and returning arrays with a leading axis of size
      `num_local_devices(devices)` (`len(devices)` on one process).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    devices = participating(devices)
    static = tuple(static_broadcasted_argnums)
    if backend == "pmap":  # multi-process pmap: global devices, local leading axis
        mapped = jax.pmap(fn, axis_name=AXIS, devices=devices,
                          static_broadcasted_argnums=static_broadcasted_argnums,
                          donate_argnums=donate_argnums)
        me = jax.process_index()
        local = NamedSharding(Mesh(np.array([d for d in devices if d.process_index == me]),
                                   (AXIS,)), P(AXIS))

        def call_pmap(*args):
            # Inputs laid out as pmap lays out its outputs: else a first call on a
            # state replicated on one device traces and compiles a second program.
            return mapped(*[a if i in static else jax.device_put(a, local)
                            for i, a in enumerate(args)])

        call_pmap.pmapped = mapped
        return call_pmap
    mesh = Mesh(np.array(devices), (AXIS,))

    @functools.partial(jax.jit, static_argnums=static, donate_argnums=donate_argnums)
    def run(*args):
        statics = {i: args[i] for i in static}
        dynamic = [a for i, a in enumerate(args) if i not in statics]

        def per_device(*dyn):
            it = iter(jax.tree.map(lambda x: x[0], dyn))
            full = [statics[i] if i in statics else next(it) for i in range(len(args))]
            return jax.tree.map(lambda x: jnp.asarray(x)[None], fn(*full))

        return jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                             check_vma=False)(*dynamic)

    sharding = NamedSharding(mesh, P(AXIS))
    if jax.process_count() > 1:
        return _multi_process_call(run, static, devices, sharding)

    def call(*args):
        args = [a if i in static else jax.device_put(a, sharding) for i, a in enumerate(args)]
        return run(*args)

    call.run = run
    return call


def _multi_process_call(run: Callable, static: tuple, devices: list, sharding) -> Callable:
    """`run` (jit of shard_map over all devices) with process-local inputs and outputs.

    Like multi-process pmap: each process passes arrays with its local device
    axis, made into global arrays over all devices (no copy when they are
    this function's own outputs), and gets back its local part of the results.
    """
    local = [d for d in devices if d.process_index == jax.process_index()]
    local_sharding = NamedSharding(Mesh(np.array(local), (AXIS,)), P(AXIS))

    def to_global(x):
        if isinstance(x, jax.Array) and x.is_fully_addressable and x.ndim and \
                x.sharding.is_equivalent_to(local_sharding, x.ndim):
            by_device = {s.device: s.data for s in x.addressable_shards}
            return jax.make_array_from_single_device_arrays(
                (len(devices), *x.shape[1:]), sharding, [by_device[d] for d in local])
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    def to_local(x):
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            (len(local), *x.shape[1:]), local_sharding, [by_device[d] for d in local])

    def call(*args):
        args = [a if i in static else jax.tree.map(to_global, a) for i, a in enumerate(args)]
        return jax.tree.map(to_local, run(*args))

    call.run = run
    return call


def participating(devices=None) -> list:
    """The devices of a data-parallel step: `devices` or all devices, process by process.

    Raises:
      ValueError: with several processes, if a process has none of `devices`
        (every process must take part in every step).
    """
    devices = list(devices or jax.devices())
    if jax.process_count() > 1:
        # A stable sort: process p's devices are the block of positions that
        # process_shard gives it; within a process the order is kept.
        devices.sort(key=lambda d: d.process_index)
        missing = set(range(jax.process_count())) - {d.process_index for d in devices}
        if missing:
            raise ValueError(f"Processes {sorted(missing)} have none of the {len(devices)} "
                             "devices given: with several processes every process must "
                             "run each step on at least one of its devices.")
    return devices


def num_devices(devices=None) -> int:
    """Devices taking part in a step, over all processes (what a global batch is split over)."""
    return len(devices or jax.devices())


def num_local_devices(devices=None) -> int:
    """This process's devices among them (the leading axis of its arrays)."""
    me = jax.process_index()
    return sum(d.process_index == me for d in (devices or jax.devices()))


def replicate(tree: Any, n: int) -> Any:
    """Stacks `n` copies of every leaf on a new leading device axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *np.shape(x))), tree)


def unreplicate(tree: Any) -> Any:
    """The copy on the first device (all copies are equal after a synced step).

    Use it (not `x[0]`) on the outputs of `data_parallel`: `x[0]` on an array
    spread over several devices is a program of its own with an all-reduce over
    them. On CPU such programs hung the two-process test in turn with the
    steps' gloo collectives; with one process and 8 fake devices on a loaded
    2-core machine the suite aborted twice in a row (test_glyphs, test_tta)
    with Python inside such an `x[0]`, the steps dispatched before it still
    running. Reading one device's buffer needs no program and no collective.
    """
    def first(x):
        if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
            return x[0]
        shard = min(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return shard.data[0]  # one device's buffer: no collective
    return jax.tree.map(first, tree)


def shard(batch: Any, n: int, *, what: str = "batch") -> Any:
    """Splits the leading (global batch) axis into `[n, batch / n, ...]`.

    Raises:
      ValueError: when `n` does not divide the batch. Padding is not done here
        on purpose: padded examples would corrupt batch statistics (BatchNorm,
        MEC, filters). Evaluation pads itself, with a mask.
    """
    def split(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        _check_divisible(x.shape[0], n, what)
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def _check_divisible(size: int, n: int, what: str) -> None:
    if size % n:
        raise ValueError(
            f"The {what} size {size} is not divisible by the {n} devices. "
            f"Choose a batch size that is a multiple of {n} (e.g. "
            f"{max(n, size // n * n)}), or run on fewer devices "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=K on CPU).")


def shard_batch(batch: Any, devices=None, *, what: str = "batch") -> Any:
    """A global batch -> this process's rows, split as `[local devices, batch / devices, ...]`.

    Every process passes the same global batch; with one process this is
    `shard(batch, len(devices))`.

    Raises:
      ValueError: when the number of devices (of all processes) does not
        divide the global batch.
    """
    devices = participating(devices)
    n = len(devices)
    for x in jax.tree.leaves(batch):
        _check_divisible(np.shape(x)[0], n, what)
    rows = distributed.process_shard(np.shape(jax.tree.leaves(batch)[0])[0], devices)
    return shard(jax.tree.map(lambda x: x[rows], batch), num_local_devices(devices), what=what)


def unshard(tree: Any) -> Any:
    """Inverse of `shard`: merges the device axis into the batch axis."""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)
