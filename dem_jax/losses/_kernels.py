"""Fused CPU kernels for the losses: build, load and call (XLA FFI).

On CPU, XLA writes every row reduction of a loss to memory and reads the
logits again for the next one, so the losses cost several times a softmax
cross-entropy. `_cpu/kernels.cc` computes the same closed forms in one pass
over each row while it is in cache (see that file). This module compiles it
with the system C++ compiler (`$CXX`, else g++ or c++), registers its
handlers with XLA, and wraps them for the losses:

* the kernels run only on CPU (`lax.platform_dependent`); on GPU/TPU the same
  program runs the pure-JAX closed forms of `_dem.py` / `_adadem.py`, which
  stay the reference (the tests compare both paths);
* the build is lazy: it happens when a program that uses the kernels is
  first lowered for CPU (`_ready_p`'s lowering), never in a process that
  only runs on GPU/TPU, and once per machine (`_kernel_cache`: a library
  keyed by the source, the compiler's version, what `-march=native`
  resolves to, the CPU and the FFI headers' contents; built under a file
  lock; its checksum checked before every load, so that a truncated or
  altered library is rebuilt, never loaded). What is loaded is the verified
  bytes, from a private in-memory file, so that a later change to the
  cached file cannot reach a running process;
* with no C++ compiler, or a failing one, the losses run the pure-JAX path
  with one warning, pointed at the caller's line; `DEM_JAX_CPU_KERNELS=0`
  selects the pure-JAX path silently;
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
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import mlir

from dem_jax.losses import _kernel_cache
from dem_jax.losses import _common

try:
  from jax.extend.core import Primitive
except ImportError:  # jax < 0.4.36
  from jax.core import Primitive  # type: ignore[no-redef,attr-defined]

DEM_MODES = {"entropy": 0, "cadf": 1, "gmc": 2, "dem": 3}
NORM_CODES = {None: 0, "l1": 1, "l2": 2, "linf": 3}
DEM_STATS = 4   # (max, lse_p, lse_q, mean) per example
ADA_RES = 3     # (1 / delta, scale, empty) per example
HANDLERS = ("DemFwd", "DemBwd", "DemFwdGrad", "ScaleRows", "AdaStats", "AdaStatsUpdate",
            "AdaFwd", "AdaNormFwd", "AdaNormFwdGrad", "AdaBwd")

_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "error": None, "path": None}


def _dlopen(data: bytes, path: pathlib.Path) -> ctypes.CDLL:
  """Loads the verified bytes from an in-memory file (Linux), else from `path`.

  Loading the bytes that were checked, not the file again, leaves no window
  in which a truncated or replaced file could be mapped (a library truncated
  under a running process kills it with SIGBUS).
  """
  try:
    fd = os.memfd_create("dem_jax_kernels", 0)
  except (AttributeError, OSError):
    return ctypes.CDLL(str(path))
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    # The fd stays open: dlopen knows a library by its name, and a later
    # load from a reused fd number would get this one back.
    return ctypes.CDLL(f"/proc/self/fd/{fd}")
  except OSError:  # e.g. memfds mounted noexec: the file itself was verified too
    os.close(fd)
    return ctypes.CDLL(str(path))


# --------------------------------------------------------------------------
# Loading, once per process, and the warning for the caller.
# --------------------------------------------------------------------------


def _candidate_dirs():
  """`(directory, temporary)` to build in, in order: the cache; this user's
  private directory; a fresh private directory for this process only."""
  yield _kernel_cache.cache_dir(), False
  try:
    yield _kernel_cache.private_dir(), False
  except OSError as e:
    _warn(f"dem_jax.losses: not using the fallback kernel cache: {e}.")
  yield pathlib.Path(tempfile.mkdtemp(prefix="dem_jax-")), True


def _register(data: bytes, path: pathlib.Path) -> ctypes.CDLL:
  lib = _dlopen(data, path)
  for name in HANDLERS:
    jax.ffi.register_ffi_target(f"dem_jax_{name}", jax.ffi.pycapsule(getattr(lib, name)),
                                platform="cpu")
  return lib


def build_and_load(compiler: str, load: Callable[[bytes, pathlib.Path], Any] | None = None):
  """`load(bytes, path)` of the verified library, built where it can be.

  Returns:
    `(load's result, path)`; path is None for a library built for this
    process only (in a temporary directory, removed once loaded).
  """
  load = load or _register
  include_dir = jax.ffi.include_dir()
  key = _kernel_cache.cache_key(compiler, include_dir)
  errors = []
  for directory, temporary in _candidate_dirs():
    try:
      try:
        data, path, rebuilt = _kernel_cache.build(compiler, directory, key, include_dir)
      except OSError as e:  # an unusable directory: try the next one
        errors.append(f"{directory}: {e}")
        continue
      if errors:
        _warn(f"dem_jax.losses: the kernel cache is unusable ({'; '.join(errors)}); "
              f"built in {'a temporary directory, for this process only' if temporary else directory}.")
      if rebuilt:
        _warn(f"dem_jax.losses: the cached kernel library {path} did not match its "
              "checksum (truncated or altered); it was rebuilt and the old one not loaded.")
      return load(data, path), None if temporary else path
    finally:
      if temporary:
        shutil.rmtree(directory, ignore_errors=True)
  raise OSError("no directory to build the kernels in: " + "; ".join(errors))


def _load():
  """Builds (once per machine) and registers the kernels; None if unavailable."""
  with _lock:
    if _state["loaded"] is not None or _state["error"] is not None:
      return _state["loaded"]
    if os.environ.get("DEM_JAX_CPU_KERNELS", "1") == "0":
      _state["error"] = "disabled by DEM_JAX_CPU_KERNELS=0"
      return None
    compiler = _kernel_cache.find_compiler()
    try:
      if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX unset, no g++ or c++ on the PATH)")
      _state["loaded"], _state["path"] = build_and_load(compiler)
    except Exception as e:  # pylint: disable=broad-except
      _state["error"] = f"{type(e).__name__}: {e}"
      _warn("dem_jax.losses: could not build the fused CPU kernels, so the losses "
            f"run the (slower) pure-JAX path on CPU. Reason: {_state['error']}. "
            "Install g++ (or set CXX), or set DEM_JAX_CPU_KERNELS=0 to silence this.")
    return _state["loaded"]


def _library_frames_prefixes() -> tuple[str, ...]:
  """Source trees whose frames are never "the caller": these losses, JAX and
  the standard library (its context managers sit between JAX's frames)."""
  dirs = [os.path.dirname(__file__), os.path.dirname(jax.__file__),
          sysconfig.get_paths()["stdlib"]]
  jaxlib_file = getattr(sys.modules.get("jaxlib"), "__file__", None)
  if jaxlib_file:
    dirs.append(os.path.dirname(jaxlib_file))
  return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _warn(message: str) -> None:
  """A RuntimeWarning attributed to the innermost frame outside the losses,
  JAX and the standard library: the user's call that traced or lowered the
  loss, wherever in JAX the build was triggered."""
  prefixes = _library_frames_prefixes()
  frame: types.FrameType | None = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None and os.path.realpath(frame.f_code.co_filename).startswith(prefixes):
    frame = frame.f_back
  if frame is None:
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return
  registry = frame.f_globals.setdefault("__warningregistry__", {})
  warnings.warn_explicit(message, RuntimeWarning, frame.f_code.co_filename, frame.f_lineno,
                         module=frame.f_globals.get("__name__"), registry=registry)


def available() -> bool:
  """Whether the fused CPU kernels are built and in use (builds them if needed)."""
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why `available()` is False (None when it is True)."""
  _load()
  return _state["error"]


def library_path() -> pathlib.Path | None:
  """The cached library in use (None if none, or built for this process only)."""
  _load()
  return _state["path"]


# The lazy build: a program that may use the kernels asks `_ready_p()` on
# CPU whether they are built (a boolean known when it is lowered, never
# earlier), and runs them or the pure-JAX path accordingly. Its CPU lowering
# builds the kernels; other platforms lower it to False, without a build.
# XLA folds the constant, so the compiled program holds one path only.
_ready_p = Primitive("dem_jax_cpu_kernels_ready")
_ready_p.def_impl(lambda: np.bool_(_load() is not None))
_ready_p.def_abstract_eval(lambda: jax.core.ShapedArray((), np.bool_))
mlir.register_lowering(_ready_p, lambda ctx: [mlir.ir_constant(np.bool_(_load() is not None))],
                       platform="cpu")
mlir.register_lowering(_ready_p, lambda ctx: [mlir.ir_constant(np.bool_(False))])


def _if_built(kernel_fn: Callable, jax_fn: Callable) -> Callable:
  def run(*args):
    ready = _ready_p.bind()
    if not isinstance(ready, jax.core.Tracer):  # eager, on CPU: known now
      return kernel_fn(*args) if ready else jax_fn(*args)
    return lax.cond(ready, kernel_fn, jax_fn, *args)
  return run


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
  """Whether the kernel path may apply to these float32 `[..., C]` logits.

  Builds nothing: where the kernels are not known yet to be (un)available,
  the program decides when it is lowered for CPU (`on_cpu`).
  """
  return (z.size > 0 and z.dtype == jnp.float32 and not getattr(_switch, "off", False)
          and os.environ.get("DEM_JAX_CPU_KERNELS", "1") != "0" and _state["error"] is None)


def on_cpu(args, kernel_fn, jax_fn):
  """`kernel_fn(*args)` where the program runs on CPU, `jax_fn(*args)` elsewhere.

  On CPU, `jax_fn` too if the kernels cannot be built (decided at lowering,
  where the build happens, unless an earlier lowering settled it).
  """
  cpu = kernel_fn if _state["loaded"] is not None else _if_built(kernel_fn, jax_fn)
  return lax.platform_dependent(*args, cpu=cpu, default=jax_fn)


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
