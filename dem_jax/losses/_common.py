"""Input checks and numerically safe building blocks shared by every loss.

Conventions (the same for every public loss in `dem_jax.losses`):

* logits come first, with the class axis `axis` (default -1) and any number of
  leading example axes; the loss is computed per example, so the output has
  shape `logits.shape` without the class axis;
* everything is computed in float32 whatever the input dtype;
* a class whose logit is `-inf` is a *masked class*: probability 0, gradient 0;
* `where` is a boolean mask, as in optax's softmax cross-entropy, of one of
  two shapes: over examples (the output's shape), where masked examples give
  loss 0 and gradient 0 and take no part in batch statistics; or over
  classes (the logits' shape), where a masked class is treated as a `-inf`
  logit, and an example with no class left is a masked example.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

# The types of the public API: arrays in (JAX, NumPy, or Python scalars for
# hyperparameters), a named axis of pmap / shard_map.
Mask = ArrayLike | None
AxisName = Hashable


def check_logits(logits, axis: int, fn: str) -> int:
  """Validates logits and returns the normalised (non-negative) class axis."""
  if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
    raise TypeError(
        f"{fn}: logits must be a JAX or NumPy array, got {type(logits).__name__}. "
        "Wrap Python lists with jnp.asarray(...).")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(
        f"{fn}: logits must be floating point (float32, bfloat16, float16, ...), "
        f"got dtype {logits.dtype}. Cast with logits.astype(jnp.float32).")
  ndim = len(logits.shape)
  if ndim < 1:
    raise ValueError(f"{fn}: logits must have a class axis, got a scalar.")
  if not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
    raise ValueError(
        f"{fn}: axis={axis!r} is out of range for logits of shape "
        f"{tuple(logits.shape)} (valid: {-ndim} .. {ndim - 1}).")
  axis = int(axis) % ndim
  if logits.shape[axis] < 2:
    raise ValueError(
        f"{fn}: need at least 2 classes on axis {axis}, got shape "
        f"{tuple(logits.shape)}. Is `axis` pointing at the class axis?")
  return axis


def check_where(where, out_shape: tuple[int, ...], fn: str,
                logits_shape: tuple[int, ...] | None = None):
  """Validates the mask; returns it as a bool array or None.

  Args:
    where: None, or a bool mask of shape `out_shape` (over examples) or, when
      `logits_shape` is given, of that shape (over classes).
    out_shape: the per-example shape (logits' shape without the class axis).
    fn: the public function's name, for errors.
    logits_shape: the logits' shape if a class mask is allowed.
  """
  if where is None:
    return None
  if not hasattr(where, "shape"):
    where = np.asarray(where)
  shape = tuple(where.shape)
  if shape != tuple(out_shape) and (logits_shape is None or shape != tuple(logits_shape)):
    allowed = f"the per-example shape {tuple(out_shape)} (logits shape without the class axis)"
    if logits_shape is not None:
      allowed += f" or the logits' shape {tuple(logits_shape)} (a class mask)"
    raise ValueError(f"{fn}: `where` must have {allowed}, got {shape}.")
  if where.dtype != jnp.bool_:
    raise TypeError(
        f"{fn}: `where` must be a boolean mask, got dtype {where.dtype}. "
        "Use e.g. `labels >= 0` to build one.")
  return jnp.asarray(where)


def concrete_value(x):
  """Returns `x` as a float if it is known at trace time, else None."""
  if isinstance(x, numbers.Real):
    return float(x)
  try:
    return float(np.asarray(x))
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          TypeError):
    return None


def check_scalar(x, name: str, fn: str) -> jax.Array:
  """A hyperparameter as a float32 scalar (a Python float or a traced scalar)."""
  if hasattr(x, "shape") and tuple(x.shape) != ():
    raise ValueError(
        f"{fn}: {name} must be a scalar, got shape {tuple(x.shape)}. To evaluate "
        f"a grid of {name} values, jax.vmap over them.")
  if isinstance(x, bool) or (hasattr(x, "dtype") and x.dtype == jnp.bool_):
    raise TypeError(f"{fn}: {name} must be a number, got a bool.")
  return jnp.asarray(x, jnp.float32)


def to_examples(logits, axis: int, where, fn: str):
  """Moves the class axis last, casts to float32 and applies the mask.

  `where` is over examples or over classes (see the module's docstring): a
  class mask sets masked classes to `-inf`, and its examples with no class
  left become masked examples.

  Returns:
    z: float32 [..., C] logits, masked examples replaced by zeros (so that
      arbitrary values there, even NaN, cannot leak into values or gradients);
    mask: bool [...] over examples, or None.
  """
  axis = check_logits(logits, axis, fn)
  out_shape = tuple(s for i, s in enumerate(logits.shape) if i != axis)
  mask = check_where(where, out_shape, fn, tuple(logits.shape))
  z = jnp.moveaxis(jnp.asarray(logits), axis, -1).astype(jnp.float32)
  if mask is not None and tuple(mask.shape) != out_shape:
    classes = jnp.moveaxis(mask, axis, -1)
    z = jnp.where(classes, z, -jnp.inf)
    mask = jnp.any(classes, axis=-1)
  if mask is not None:
    z = jnp.where(mask[..., None], z, 0.0)
  return z, mask


def apply_mask(values: jax.Array, mask) -> jax.Array:
  """Zeroes masked examples (their gradient through `jnp.where` is zero too)."""
  return values if mask is None else jnp.where(mask, values, 0.0)


# --------------------------------------------------------------------------
# The fast path of the losses with closed-form gradients (`entropy`, `cadf`,
# `gmc`, `dem`, `adadem`). XLA's CPU backend fuses a chain of elementwise ops
# and row reductions over [..., C] into one kernel (a YNNPACK fusion) only when
# it has no select or compare on [..., C]; each select materialises a full
# [..., C] temporary, and past 32 MiB of temporaries glibc hands every call
# fresh pages (thousands of page faults per call). So these helpers mask with
# `maximum` clamps and `sign` instead of `jnp.where`, and compute each `exp`
# over [..., C] once.
# --------------------------------------------------------------------------

# Masked (-inf) classes are clamped to the lowest float32 after centring:
# `exp` gives exactly 0 there and `0 * zc` is 0, not NaN, with no select.
LOWEST = float(np.finfo(np.float32).min)


def shift(z: jax.Array):
  """`zc = z - max(z)` per example, masked classes clamped to `LOWEST`.

  Args:
    z: float32 [..., C]; `-inf` marks a masked class.

  Returns:
    zc: [..., C], <= 0, exactly 0 at the maximum (first argmax included);
    zmax: [..., 1] the maximum (0 if every class is masked).
  """
  zmax = jnp.max(z, axis=-1, keepdims=True)
  # A select on the [..., 1] maximum, not on [..., C]: it keeps the maximum a
  # reduction of its own (fused with the subtraction, a YNNPACK kernel runs
  # the reduction and its broadcast consumer several times slower).
  zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
  return jnp.maximum(z - zmax, LOWEST), zmax


def exp_moments(zc: jax.Array, tau=1.0):
  """`e = exp(zc / tau)`, `1 / sum(e)` and `E_q[zc]` for `q = e / sum(e)`.

  `sum(e) >= 1` (the maximum contributes `exp(0) = 1`) unless every class is
  masked; `1 / max(sum(e), 1)` is then 1, so that example gets `q = 0`,
  `E_q[zc] = 0` and `log sum(e) = -log(inv) = 0`: finite values, 0 gradient.

  Returns:
    e: [..., C]; inv: [..., 1]; mean: [..., 1].
  """
  e = jnp.exp(zc / tau)
  inv = 1.0 / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1.0)
  mean = jnp.sum(e * zc, axis=-1, keepdims=True) * inv
  return e, inv, mean


def live(zc: jax.Array) -> jax.Array:
  """1.0 for live classes and 0.0 for masked ones, from `shift`'s `zc`.

  `zc - LOWEST` is exactly 0 for a masked class and positive otherwise; its
  sign is the mask without a compare.
  """
  return jnp.sign(zc - LOWEST)


def first_argmax(z: jax.Array) -> jax.Array:
  """The pseudo-label: int32 `argmax` of the logits `[..., C]` (first on ties).

  One (value, index) reduction, although XLA CPU runs it about 13x slower
  than a float min (8.8 against 0.7 ms at 4096 x 1000; CPUs normally run the
  kernels, whose label pass is cheap). The cheaper trick this replaced, the
  first index where `shift`'s zc is 0, needs zc to be exactly 0 at the
  maximum, and XLA does not promise that: it may recompute the producer of
  the logits in both the maximum and the subtraction, and differently (XLA
  CPU contracted `z / 3 - max` into one fused multiply-add and gave every
  example a wrong label).
  """
  return jnp.argmax(z, axis=-1).astype(jnp.int32)
