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
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "batch"
BACKENDS = ("pmap", "shard_map")


def data_parallel(fn: Callable, *, backend: str = "pmap", devices=None,
                  static_broadcasted_argnums=(), donate_argnums=()) -> Callable:
    """Runs a per-device function on every device (leading device axis everywhere).

    Args:
      fn: per-device function; collectives over `AXIS` inside.
      backend: "pmap" or "shard_map".
      devices: the devices to use (default: all local devices).
      static_broadcasted_argnums: arguments that are static (hashable, not
        mapped), passed unchanged to `fn`.
      donate_argnums: arguments whose buffers may be reused (e.g. the state).

    Returns:
      A function taking and returning arrays with a leading axis of size
      `len(devices)`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    devices = list(devices or jax.local_devices())
    if backend == "pmap":
        return jax.pmap(fn, axis_name=AXIS, devices=devices,
                        static_broadcasted_argnums=static_broadcasted_argnums,
                        donate_argnums=donate_argnums)
    mesh = Mesh(np.array(devices), (AXIS,))
    static = tuple(static_broadcasted_argnums)

    @functools.partial(jax.jit, static_argnums=static, donate_argnums=donate_argnums)
    def run(*args):
        statics = {i: args[i] for i in static}
        dynamic = [a for i, a in enumerate(args) if i not in statics]

        def per_device(*dyn):
            it = iter(jax.tree.map(lambda x: x[0], dyn))
            full = [statics[i] if i in statics else next(it) for i in range(len(args))]
            return jax.tree.map(lambda x: x[None], fn(*full))

        return jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                             check_vma=False)(*dynamic)

    def call(*args):
        sharding = NamedSharding(mesh, P(AXIS))
        args = [a if i in static else jax.device_put(a, sharding) for i, a in enumerate(args)]
        return run(*args)

    call.run = run
    return call


def num_devices(devices=None) -> int:
    return len(devices or jax.local_devices())


def replicate(tree: Any, n: int) -> Any:
    """Stacks `n` copies of every leaf on a new leading device axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(jnp.asarray(x), (n, *np.shape(x))), tree)


def unreplicate(tree: Any) -> Any:
    """The copy on the first device (all copies are equal after a synced step)."""
    return jax.tree.map(lambda x: x[0], tree)


def shard(batch: Any, n: int, *, what: str = "batch") -> Any:
    """Splits the leading (global batch) axis into `[n, batch / n, ...]`.

    Raises:
      ValueError: when `n` does not divide the batch. Padding is not done here
        on purpose: padded examples would corrupt batch statistics (BatchNorm,
        MEC, filters). Evaluation pads itself, with a mask.
    """
    def split(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[0] % n:
            raise ValueError(
                f"The {what} size {x.shape[0]} is not divisible by the {n} devices. "
                f"Choose a batch size that is a multiple of {n} (e.g. "
                f"{max(n, x.shape[0] // n * n)}), or run on fewer devices "
                "(XLA_FLAGS=--xla_force_host_platform_device_count=K on CPU).")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, batch)


def unshard(tree: Any) -> Any:
    """Inverse of `shard`: merges the device axis into the batch axis."""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)
