"""Fused CPU kernels for the losses: build, load and call (XLA FFI).

On CPU, XLA writes every row reduction of a loss to memory and reads the
logits again for the next one, so the losses cost several times a softmax
cross-entropy. `_cpu/kernels.cc` computes the same closed forms in one pass
over each row while it is in cache (see that file). This module compiles it
with the system C++ compiler on first use (a few seconds, cached under
`$DEM_JAX_CACHE_DIR`, default `~/.cache/dem_jax`), registers its handlers with
XLA, and wraps them for the losses:

* the kernels run only on CPU (`lax.platform_dependent`); on GPU/TPU the same
  program runs the pure-JAX closed forms of `_dem.py` / `_adadem.py`, which
  stay the reference (the tests compare both paths);
* with no C++ compiler (or `DEM_JAX_CPU_KERNELS=0`) everything runs the
  pure-JAX path, with one warning when a build fails;
* each kernel call is a `jax.custom_jvp` whose tangent is that of the pure-JAX
  formula, so `jax.hessian` (forward over reverse) still differentiates the
  closed-form backward pass;
* for many classes (C > 32) a value-and-gradient of EM/CADF/GMC/DEM and of
  AdaDEM-Norm makes the gradient (at cotangent 1) in the forward pass,
  keeping each exponential from the row sums to the gradient, and the
  backward pass scales each row by its cotangent: half the exponentials of a
  separate backward pass, for a residual of the logits' size (the logits
  themselves before).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dem_jax.losses import _common

SOURCE = pathlib.Path(__file__).parent / "_cpu" / "kernels.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC", "-w")
DEM_MODES = {"entropy": 0, "cadf": 1, "gmc": 2, "dem": 3}
NORM_CODES = {None: 0, "l1": 1, "l2": 2, "linf": 3}
DEM_STATS = 4   # (max, lse_p, lse_q, mean) per example
ADA_RES = 3     # (1 / delta, scale, empty) per example
HANDLERS = ("DemFwd", "DemBwd", "DemFwdGrad", "ScaleRows", "AdaStats", "AdaStatsUpdate",
            "AdaFwd", "AdaNormFwd", "AdaNormFwdGrad", "AdaBwd")

_lock = threading.Lock()
_state = {"loaded": None, "error": None}


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("DEM_JAX_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "dem_jax")
  return pathlib.Path(root)


def _library_path(compiler: str) -> pathlib.Path:
  """The cached library for this source, compiler, flags, jaxlib and machine."""
  key = hashlib.sha256()
  key.update(SOURCE.read_bytes())
  key.update(" ".join((compiler,) + FLAGS).encode())
  key.update(jax.ffi.include_dir().encode())
  key.update(jax.__version__.encode())
  try:  # -march=native: a cache shared by machines of other CPUs must not mix.
    key.update(pathlib.Path("/proc/cpuinfo").read_text().split("flags", 2)[1]
               .split("\n")[0].encode())
  except (OSError, IndexError):
    key.update(os.uname().machine.encode())
  return _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: pathlib.Path) -> None:
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compile to a private file and rename, so that processes building at the
  # same time never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _load():
  """Builds (once per machine) and registers the kernels; None if unavailable."""
  with _lock:
    if _state["loaded"] is not None or _state["error"] is not None:
      return _state["loaded"]
    if os.environ.get("DEM_JAX_CPU_KERNELS", "1") == "0":
      _state["error"] = "disabled by DEM_JAX_CPU_KERNELS=0"
      return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
      _state["error"] = "no C++ compiler (g++) found"
      return None
    try:
      path = _library_path(compiler)
      if not path.exists():
        try:
          _build(compiler, path)
        except OSError:  # an unwritable cache directory: build in /tmp
          path = pathlib.Path(tempfile.gettempdir()) / "dem_jax" / path.name
          if not path.exists():
            _build(compiler, path)
      lib = ctypes.cdll.LoadLibrary(str(path))
      for name in HANDLERS:
        jax.ffi.register_ffi_target(f"dem_jax_{name}",
                                    jax.ffi.pycapsule(getattr(lib, name)),
                                    platform="cpu")
    except Exception as e:  # pylint: disable=broad-except
      _state["error"] = f"{type(e).__name__}: {e}"
      warnings.warn(
          "dem_jax.losses: could not build the fused CPU kernels, so the losses "
          f"run the (slower) pure-JAX path on CPU. Reason: {_state['error']}. "
          "Set DEM_JAX_CPU_KERNELS=0 to silence this.", RuntimeWarning, stacklevel=3)
      return None
    _state["loaded"] = lib
    return lib


def available() -> bool:
  """Whether the fused CPU kernels are built and in use (builds them if needed)."""
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  _load()
  return _state["error"]


_switch = threading.local()


@contextlib.contextmanager
def disabled():
  """Within this block, losses traced here use the pure-JAX path on CPU too.

  For tests and for timing the two paths against each other; a function
  already jitted keeps the path it was traced with.
  """
  before = getattr(_switch, "off", False)
  _switch.off = True
  try:
    yield
  finally:
    _switch.off = before


def usable(z) -> bool:
  """Whether the kernel path applies to these float32 `[..., C]` logits."""
  return (z.size > 0 and z.dtype == jnp.float32 and not getattr(_switch, "off", False)
          and available())


def on_cpu(args, kernel_fn, jax_fn):
  """`kernel_fn(*args)` where the program runs on CPU, `jax_fn(*args)` elsewhere."""
  return lax.platform_dependent(*args, cpu=kernel_fn, default=jax_fn)


def _call(name, out, *args, vmap_method="broadcast_all", aliases=None, **attrs):
  return jax.ffi.ffi_call(f"dem_jax_{name}", out, vmap_method=vmap_method,
                          input_output_aliases=aliases)(*args, **attrs)


def _f32(shape):
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


# --------------------------------------------------------------------------
# EM / CADF / GMC / DEM
# --------------------------------------------------------------------------


def _dem_attrs(mode, tau, alpha):
  return dict(mode=np.int64(DEM_MODES[mode]), tau=np.float32(tau), alpha=np.float32(alpha))


def jax_dem_stats(z, mode, tau, alpha):
  """Pure-JAX `(value, stats)` of the DEM forward kernel (its tangent rule).

  The value and moments are `_dem`'s own closed forms; only the packing into
  the kernel's `(max, lse_p, lse_q, mean)` is done here.
  """
  from dem_jax.losses import _dem  # pylint: disable=import-outside-toplevel (_dem imports us)
  value, (_, zmax, p_parts, q_parts, _, _) = _dem._decoupled_forward(z, tau, alpha, mode)
  zero = jnp.zeros(z.shape[:-1], jnp.float32)
  lse_p = -jnp.log(p_parts[1][..., 0]) if p_parts is not None else zero
  lse_q = -jnp.log(q_parts[1][..., 0]) if q_parts is not None else zero
  if q_parts is not None:
    mean = q_parts[2][..., 0]
  else:
    mean = p_parts[2][..., 0] if mode == "entropy" else zero
  return value, jnp.stack([zmax, lse_p, lse_q, mean], axis=-1)


def jax_dem_grad(z, stats, g, mode, tau, alpha):
  """Pure-JAX gradient of the DEM backward kernel, from its stats."""
  m, lse_p, lse_q, mean = (stats[..., k:k + 1] for k in range(DEM_STATS))
  zc = jnp.maximum(z - m, _common.LOWEST)
  g = g[..., None]
  if mode == "entropy":
    return g * jnp.exp(zc - lse_p) * (mean - zc)
  dz = 0.0
  if mode in ("gmc", "dem"):
    dz = g * alpha * jnp.exp(zc - lse_p)
  if mode in ("cadf", "dem"):
    dz = dz - (g / tau) * jnp.exp(zc / tau - lse_q) * (zc - mean + tau)
  return dz


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def dem_forward(z, mode, tau, alpha):
  n = z.shape[:-1]
  return _call("DemFwd", (_f32(n), _f32(n + (DEM_STATS,))), z,
               **_dem_attrs(mode, tau, alpha))


@dem_forward.defjvp
def _dem_forward_jvp(mode, tau, alpha, primals, tangents):
  return jax.jvp(lambda z: jax_dem_stats(z, mode, tau, alpha), primals, tangents)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def dem_backward(z, stats, g, mode, tau, alpha):
  return _call("DemBwd", _f32(z.shape), z, stats, g, **_dem_attrs(mode, tau, alpha))


@dem_backward.defjvp
def _dem_backward_jvp(mode, tau, alpha, primals, tangents):
  return jax.jvp(lambda *a: jax_dem_grad(*a, mode, tau, alpha), primals, tangents)


# Value and gradient in one pass for rows of more than MAX_LANE_CLASSES
# classes (`DemForwardGrad` in kernels.cc): each exponential once, the
# backward pass a scale of each row by its cotangent.
MAX_LANE_CLASSES = 32  # kMaxLaneClasses in kernels.cc: 16 examples per vector up to it


def fuses_grad(z) -> bool:
  """Whether `[..., C]` logits take the value-and-gradient kernels (C > 32).

  Also true of the gradient such a kernel kept (the logits' shape), which is
  how the backward rules tell their residuals apart.
  """
  return z.shape[-1] > MAX_LANE_CLASSES


def jax_dem_value_grad(z, mode, tau, alpha):
  """Pure-JAX `(value, gradient at g = 1)` of `dem_forward_grad`."""
  value, stats = jax_dem_stats(z, mode, tau, alpha)
  return value, jax_dem_grad(z, stats, jnp.ones_like(value), mode, tau, alpha)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def dem_forward_grad(z, mode, tau, alpha):
  return _call("DemFwdGrad", (_f32(z.shape[:-1]), _f32(z.shape)), z,
               **_dem_attrs(mode, tau, alpha))


@dem_forward_grad.defjvp
def _dem_forward_grad_jvp(mode, tau, alpha, primals, tangents):
  return jax.jvp(lambda z: jax_dem_value_grad(z, mode, tau, alpha), primals, tangents)


@jax.custom_jvp
def scale_rows(grad, g):
  """`g[..., None] * grad`, in grad's buffer where it is not used elsewhere."""
  return _call("ScaleRows", _f32(grad.shape), grad, g, aliases={0: 0})


@scale_rows.defjvp
def _scale_rows_jvp(primals, tangents):
  return jax.jvp(lambda a, g: g[..., None] * a, primals, tangents)


# --------------------------------------------------------------------------
# AdaDEM. Its kernels take the logits without gradient: AdaDEM's gradient is
# first order only (delta and the MEC row held constant), and its backward
# pass is guarded in `_adadem`, so no tangent rule is needed here.
# --------------------------------------------------------------------------


def _ada_attrs(norm, delta_from):
  return dict(norm=np.int64(NORM_CODES[norm]),
              delta_from_entropy=np.int64(delta_from == "entropy"))


def ada_stats(z, weights, *, norm, delta_from):
  """AdaDEM's softmax statistics and MEC segment sums of float32 `[..., C]` logits.

  Returns `(stats, yhat, sums, counts)`: stats `[..., 4]` (max, lse, delta,
  E_p[zc]); yhat int32 `[...]`, the first argmax; sums `[C, C]` and counts
  `[C]`, the per-class sums of `weights * p` and of `weights` (the segment
  sums of `mec_update`).
  """
  n, c = z.shape[:-1], z.shape[-1]
  outs = (_f32(n + (DEM_STATS,)), jax.ShapeDtypeStruct(n, jnp.int32), _f32((c, c)),
          _f32((c,)))
  return _call("AdaStats", outs, z, weights, vmap_method="sequential",
               **_ada_attrs(norm, delta_from))


def ada_stats_update(z, weights, mec, momentum, *, norm, delta_from):
  """`ada_stats` with the MEC update and AdaDEM's value done in the same kernel.

  Given the float32 state `mec` and a float `momentum`, returns `(stats, yhat,
  new_mec, value, res)`, the last two as `ada_forward` gives them with the new
  state.
  """
  n, c = z.shape[:-1], z.shape[-1]
  outs = (_f32(n + (DEM_STATS,)), jax.ShapeDtypeStruct(n, jnp.int32), _f32((c, c)),
          _f32(n), _f32(n + (ADA_RES,)))
  # The new state takes the old one's buffer: where the caller donates the
  # state (a training step), it is updated in place, rows of absent classes
  # untouched; otherwise XLA copies it first.
  return _call("AdaStatsUpdate", outs, z, weights, mec, vmap_method="sequential",
               aliases={2: 2}, momentum=np.float32(momentum), **_ada_attrs(norm, delta_from))


def ada_forward(z, stats, yhat, mec, *, calibrator):
  """AdaDEM's `(value, res)` from `ada_stats`'s statistics and the (new) state."""
  n = z.shape[:-1]
  return _call("AdaFwd", (_f32(n), _f32(n + (ADA_RES,))), z, stats, yhat, mec,
               gmc=np.int64(calibrator == "gmc"), vmap_method="sequential")


def ada_norm_forward(z, *, norm, delta_from):
  """AdaDEM-Norm's `(value, stats, res)` in one pass (no MEC to wait for)."""
  n = z.shape[:-1]
  return _call("AdaNormFwd", (_f32(n), _f32(n + (DEM_STATS,)), _f32(n + (ADA_RES,))), z,
               vmap_method="sequential", **_ada_attrs(norm, delta_from))


def ada_norm_forward_grad(z, *, norm, delta_from):
  """AdaDEM-Norm's `(value, grad)` for `[..., C]` logits with C > 32.

  `grad` is the gradient at cotangent 1 (`scale_rows` gives the backward pass).
  """
  return _call("AdaNormFwdGrad", (_f32(z.shape[:-1]), _f32(z.shape)), z,
               vmap_method="sequential", **_ada_attrs(norm, delta_from))


def ada_backward(z, stats, yhat, mec, res, g, *, calibrator):
  return _call("AdaBwd", _f32(z.shape), z, stats, yhat, mec, res, g,
               gmc=np.int64(calibrator == "gmc"), vmap_method="sequential")
