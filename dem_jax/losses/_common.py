"""Input checks and numerically safe building blocks shared by every loss.

Conventions (the same for every public loss in `dem_jax.losses`):

* logits come first, with the class axis `axis` (default -1) and any number of
  leading example axes; the loss is computed per example, so the output has
  shape `logits.shape` without the class axis;
* everything is computed in float32 whatever the input dtype;
* a class whose logit is `-inf` is a *masked class*: probability 0, gradient 0;
* `where` is a boolean mask over examples (shape of the output); masked
  examples give loss 0 and gradient 0 and take no part in batch statistics.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


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


def check_where(where, out_shape: tuple[int, ...], fn: str):
  """Validates the per-example mask; returns it as a bool array or None."""
  if where is None:
    return None
  if not hasattr(where, "shape"):
    where = np.asarray(where)
  if tuple(where.shape) != tuple(out_shape):
    raise ValueError(
        f"{fn}: `where` must have the per-example shape {tuple(out_shape)} "
        f"(logits shape without the class axis), got {tuple(where.shape)}.")
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
  """Moves the class axis last, casts to float32 and neutralises masked examples.

  Returns:
    z: float32 [..., C] logits, masked examples replaced by zeros (so that
      arbitrary values there, even NaN, cannot leak into values or gradients);
    mask: bool [...] or None.
  """
  axis = check_logits(logits, axis, fn)
  out_shape = tuple(s for i, s in enumerate(logits.shape) if i != axis)
  mask = check_where(where, out_shape, fn)
  z = jnp.moveaxis(jnp.asarray(logits), axis, -1).astype(jnp.float32)
  if mask is not None:
    z = jnp.where(mask[..., None], z, 0.0)
  return z, mask


def apply_mask(values: jax.Array, mask) -> jax.Array:
  """Zeroes masked examples (their gradient through `jnp.where` is zero too)."""
  return values if mask is None else jnp.where(mask, values, 0.0)


def centre(z: jax.Array):
  """Logits centred on their per-example maximum, with masked classes at 0.

  Args:
    z: float32 [..., C]; `-inf` marks a masked class.

  Returns:
    zc: [..., C] `z - max(z)` for live classes and 0 for masked ones, so that
      `p * zc` is 0 (not NaN) where `p` is 0;
    live: bool [..., C], False for masked classes;
    zmax: [...] the maximum (0 if every class is masked).
  """
  live = z > -jnp.inf
  zmax = jnp.max(jnp.where(live, z, -jnp.inf), axis=-1)
  zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
  zc = jnp.where(live, z - zmax[..., None], 0.0)
  return zc, live, zmax


def softmax(zc: jax.Array, live: jax.Array, tau=1.0):
  """`softmax(z / tau)` and `logsumexp(zc / tau)` of centred logits."""
  s = jnp.where(live, zc / tau, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  return jnp.where(live, jnp.exp(s - lse[..., None]), 0.0), lse
