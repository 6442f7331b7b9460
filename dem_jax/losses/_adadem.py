"""AdaDEM: the normalised CADF reward plus the marginal entropy calibrator (MEC).

Algorithm 1 of the paper, per batch of logits `Z` (N x C), `p = softmax(Z)`,
`yhat = argmax p`:

1. MEC update, *before* the loss, without gradient: for every class k present
   in `yhat`, `M[k] <- (1 - pi) M[k] + pi * mean(p[yhat == k])` (pi = momentum);
   rows of absent classes stay unchanged. The mean runs over the *global* batch
   (all devices when `axis_name` is given).
2. `T = -sum_i p_i z_i`, `delta = || p * (z + T + 1) ||_1`, the L1 norm of the
   CADF reward (>= 1, since that reward sums to 1), held constant.
3. `dL/dz_i = (-p_i (z_i + T + 1) + m_i) / delta`, `m = M[yhat]` held constant.
   A value with exactly this gradient is `L = (T + m . z) / delta`.

Variants: AdaDEM-Norm (`calibrator="gmc"`: `m = sg(p)`, value `H / delta`),
AdaDEM-MEC (`norm=None`: `delta = 1`), AdaDEM-V (`delta_from="entropy"`:
`delta = || p * (z - E_p[z]) ||`), and L2 / Linf norms instead of L1.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike
from jax import lax

from dem_jax.losses import _common
from dem_jax.losses import _kernels
from dem_jax.losses._common import AxisName, Mask

NORMS = ("l1", "l2", "linf", None)
CALIBRATORS = ("mec", "gmc")
DELTA_FROM = ("cadf", "entropy")
Norm = Literal["l1", "l2", "linf"] | None
Calibrator = Literal["mec", "gmc"]
DeltaFrom = Literal["cadf", "entropy"]

# Floor on delta. The L1 CADF norm is >= 1 and never reaches it; the
# entropy-based delta of AdaDEM-V goes to 0 at uniform and one-hot predictions
# (that is why AdaDEM-V collapses) and the floor only keeps it finite.
DELTA_FLOOR = 1e-6


def mec_init(num_classes: int, dtype: DTypeLike = jnp.float32) -> jax.Array:
  """The initial MEC state: every row the uniform prediction.

  Args:
    num_classes: C >= 2.
    dtype: floating dtype of the state.

  Returns:
    `[C, C]` array filled with `1 / C`; row k is the running mean prediction
    of examples pseudo-labelled k.

  Example:
    >>> mec = losses.mec_init(10)   # (10, 10) of 0.1
  """
  if not isinstance(num_classes, int) or num_classes < 2:
    raise ValueError(f"mec_init: num_classes must be an int >= 2, got {num_classes!r}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"mec_init: dtype must be floating, got {dtype}.")
  return jnp.full((num_classes, num_classes), 1.0 / num_classes, dtype)


def _check_momentum(momentum, fn):
  momentum = _common.check_scalar(momentum, "momentum", fn)
  value = _common.concrete_value(momentum)
  if value is not None and not 0.0 < value <= 1.0:
    raise ValueError(
        f"{fn}: momentum must be in (0, 1], got {value}. The paper uses 0.1 "
        "(0.01 for continual test-time adaptation).")
  return momentum


def _check_mec(mec, num_classes, fn):
  if not hasattr(mec, "shape") or tuple(mec.shape) != (num_classes, num_classes):
    shape = tuple(mec.shape) if hasattr(mec, "shape") else type(mec).__name__
    raise ValueError(
        f"{fn}: the MEC state must have shape (C, C) = ({num_classes}, "
        f"{num_classes}) for logits with {num_classes} classes, got {shape}. "
        f"Create it with losses.mec_init({num_classes}).")
  if not jnp.issubdtype(mec.dtype, jnp.floating):
    raise TypeError(f"{fn}: the MEC state must be floating, got {mec.dtype}.")


def mec_update(mec: jax.Array, probs: ArrayLike, pseudo_labels: ArrayLike, *,
               momentum: ArrayLike = 0.1, where: Mask = None,
               axis_name: AxisName | None = None) -> jax.Array:
  r"""One MEC update: per pseudo-class running mean of the predictions.

  .. math::
    M_k \leftarrow (1 - \pi) M_k + \pi \cdot \mathrm{mean}\{p_n : \hat y_n = k\}
    \quad \text{for every } k \text{ present in the (global) batch.}

  Vectorised with a segment sum (O(N C) work, no one-hot product). Absent
  classes keep their row. No gradient flows into the state.

  Args:
    mec: `[C, C]` state.
    probs: `[N, C]` predictions.
    pseudo_labels: int `[N]` pseudo-labels in `[0, C)`.
    momentum: pi in (0, 1].
    where: optional bool `[N]`; False examples are ignored.
    axis_name: reduce the per-class sums and counts over this named axis, so
      that N devices give the result of one device on the global batch.

  Returns:
    The new `[C, C]` state, dtype of `mec`.

  Example:
    >>> z = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    >>> losses.mec_update(losses.mec_init(3), jax.nn.softmax(z), z.argmax(-1))
    Array([[0.37869862, 0.3106507 , 0.3106507 ],
           [0.30452785, 0.3909443 , 0.30452785],
           [0.33333334, 0.33333334, 0.33333334]], dtype=float32)
  """
  num_classes = mec.shape[0]
  probs = lax.stop_gradient(jnp.asarray(probs).astype(jnp.float32))
  weights = jnp.ones(probs.shape[:1], jnp.float32)
  if where is not None:
    weights = jnp.asarray(where).astype(jnp.float32)
  sums = jax.ops.segment_sum(probs * weights[:, None], pseudo_labels,
                             num_segments=num_classes)
  counts = jax.ops.segment_sum(weights, pseudo_labels, num_segments=num_classes)
  return _mec_from_sums(mec, sums, counts, momentum, axis_name)


def _mec_from_sums(mec, sums, counts, momentum, axis_name):
  """The MEC update from per-class sums `[C, C]` and counts `[C]`."""
  if axis_name is not None:
    sums, counts = lax.psum((sums, counts), axis_name)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  old = lax.stop_gradient(mec).astype(jnp.float32)
  new = jnp.where(counts[:, None] > 0, (1.0 - momentum) * old + momentum * means, old)
  return new.astype(mec.dtype)


def _norm(r, norm):
  if norm is None:
    return jnp.ones(r.shape[:-1] + (1,), r.dtype)
  if norm == "l1":
    return jnp.sum(jnp.abs(r), axis=-1, keepdims=True)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(r * r, axis=-1, keepdims=True))
  return jnp.max(jnp.abs(r), axis=-1, keepdims=True)


def softmax_stats(z):
  """The passes over `[..., C]` that every AdaDEM mode shares, done once.

  Returns `(zc, e, inv, mean)` from `_common.shift` and `_common.exp_moments`:
  `p = e * inv`, `E_p[zc] = mean`. `adadem` computes them (without gradient)
  for the MEC update and hands the same arrays to the loss.
  """
  zc, _ = _common.shift(z)
  return (zc,) + _common.exp_moments(zc)


def _mec_row(m, zc):
  """The MEC row renormalised over the live classes of its example.

  Masked classes are left out of the calibrator and the row is renormalised
  over the live ones, so that the gradient still sums to zero (shift
  invariance); a row with all of its mass on masked classes becomes uniform
  over the live ones. Arithmetic masks only (see `_common`).

  Returns:
    `(row, scale, empty)`: the `[..., C]` row (masked entries 0) and the
    `[..., 1]` factors that rebuild it elementwise (`_mec_row_from`), so the
    backward pass keeps those instead of another `[..., C]` array.
  """
  live = _common.live(zc)
  total = jnp.sum(m * live, axis=-1, keepdims=True)
  count = jnp.sum(live, axis=-1, keepdims=True)
  empty = 1.0 - jnp.sign(total)            # total >= 0: 1 when it is 0
  scale = 1.0 / (total + empty * count)
  return _mec_row_from(m, zc, scale, empty), scale, empty


def _mec_row_from(m, zc, scale, empty):
  return (m + empty) * _common.live(zc) * scale


def adadem_parts(stats, m, *, norm, calibrator, delta_from):
  """AdaDEM's value, `1 / delta` and calibrator gradient from `softmax_stats`.

  Args:
    stats: `(zc, e, inv, mean)` of the float32 `[..., C]` logits.
    m: `[..., C]` MEC row of each example (ignored for the GMC).

  Returns:
    value `[...]`, `inv_delta` `[..., 1]` and `row`: None for the GMC (whose
    calibrator gradient is `p`), else `(scale, empty)` of `_mec_row`.
  """
  zc, e, inv, mean = stats
  p = e * inv
  dev = zc - mean
  # The L1 norm of the CADF reward -dT/dz = p (dev + 1) (which sums to 1), or
  # of p dev for AdaDEM-V. Masked classes: p = 0 and dev is finite, so 0.
  delta = _norm(p * (dev + 1.0) if delta_from == "cadf" else p * dev, norm)
  inv_delta = 1.0 / jnp.maximum(delta, DELTA_FLOOR)
  if calibrator == "gmc":
    numerator = -jnp.log(inv) - mean          # T + logsumexp(z) = H
    row = None
  else:
    c, *row = _mec_row(m, zc)
    # m . z on the shifted logits: exact, since the row sums to 1.
    numerator = jnp.sum(c * zc, axis=-1, keepdims=True) - mean
  return (numerator * inv_delta)[..., 0], inv_delta, row


def _grad(stats, inv_delta, m, row):
  """dL/dz = (c - p (zc - E_p[zc] + 1)) / delta: calibrator minus CADF reward.

  `c` is the calibrator gradient: `p` for the GMC (`row` None), else the MEC
  row `m` renormalised with `row = (scale, empty)` from `adadem_parts`.
  """
  zc, e, inv, mean = stats
  p = e * inv
  c = p if row is None else _mec_row_from(m, zc, *row)
  return inv_delta * (c - p * (zc - mean + 1.0))


@jax.custom_jvp
def _first_order_only(dz, z):
  """`dz`, AdaDEM's gradient at `z`, in a form that refuses to be differentiated.

  AdaDEM's gradient holds delta and the MEC row constant (Algorithm 1), so it
  is not the gradient of any function of the logits and has no Hessian.
  Without this guard `jax.hessian` would silently give zeros: the softmax
  statistics reach the backward pass without gradient, so only `z` (unused in
  the value) carries the tangent that makes the rule below fire.
  """
  del z
  return dz


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
  del primals, tangents
  raise TypeError(
      "adadem: second derivatives (jax.hessian, jax.jacfwd or jvp of its "
      "gradient) are not defined: AdaDEM's gradient holds delta and the MEC "
      "row constant (Algorithm 1), so it is not the gradient of a function of "
      "the logits. For a second-order quantity, differentiate Algorithm 1's "
      "surrogate -sum((p - sg(m)) z) / sg(delta) with plain autodiff.")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _adadem(z, stats, m, norm, calibrator, delta_from):
  """AdaDEM's value from `softmax_stats(z)`; `z` is here to receive the gradient.

  The value needs only `stats` (computed once in `adadem`, without gradient);
  the backward pass gives `z` the whole closed-form gradient.
  """
  del z
  return adadem_parts(stats, m, norm=norm, calibrator=calibrator,
                      delta_from=delta_from)[0]


def _adadem_fwd(z, stats, m, norm, calibrator, delta_from):
  value, inv_delta, row = adadem_parts(stats, m, norm=norm, calibrator=calibrator,
                                       delta_from=delta_from)
  return value, (z, stats, inv_delta, m, row)


def _adadem_bwd(norm, calibrator, delta_from, res, g):
  del norm, calibrator, delta_from
  z, stats, inv_delta, m, row = res
  # delta and the MEC row are constants of the backward pass (Algorithm 1);
  # `stats` are functions of z without gradient of their own (all of z's
  # gradient is the closed form below).
  dz = _first_order_only(_grad(stats, g[..., None] * inv_delta, m, row), z)
  return dz, jax.tree.map(jnp.zeros_like, stats), jnp.zeros_like(m)


_adadem.defvjp(_adadem_fwd, _adadem_bwd)


def check_adadem_options(norm, calibrator, delta_from, fn="adadem"):
  if norm not in NORMS:
    raise ValueError(f"{fn}: norm must be one of {NORMS}, got {norm!r}.")
  if calibrator not in CALIBRATORS:
    raise ValueError(
        f"{fn}: calibrator must be one of {CALIBRATORS}, got {calibrator!r}.")
  if delta_from not in DELTA_FROM:
    raise ValueError(
        f"{fn}: delta_from must be one of {DELTA_FROM}, got {delta_from!r}.")


def adadem(logits: ArrayLike, mec: jax.Array | None, *, momentum: ArrayLike = 0.1,
           norm: Norm = "l1", calibrator: Calibrator = "mec",
           delta_from: DeltaFrom = "cadf", axis: int = -1, where: Mask = None,
           axis_name: AxisName | None = None) -> tuple[jax.Array, jax.Array | None]:
  r"""AdaDEM: the CADF reward normalised by its L1 norm, plus the MEC.

  .. math::
    L(z) = \frac{T(z) + m \cdot z}{\delta}, \quad
    T(z) = -\sum_i p_i z_i, \quad
    \delta = \sum_i |p_i (z_i + T + 1)|, \quad m = M_{\hat y},

    \partial L / \partial z_i = \frac{-p_i (z_i + T + 1) + m_i}{\delta}
    \quad (\delta, m \text{ held constant}).

  The MEC state is updated first (see `mec_update`), from the global batch
  when `axis_name` is given, and the loss uses the updated rows. The backward
  pass adds the normalised CADF reward and the calibrator gradient; delta and
  `m` get no gradient. Reverse mode only; second derivatives raise TypeError
  (the gradient holds delta and `m` constant, so it has no Hessian).

  Modes: AdaDEM (defaults); AdaDEM-Norm `calibrator="gmc"` (value `H / delta`,
  state returned unchanged; `mec` may be None, so that very many classes need
  no `(C, C)` array); AdaDEM-MEC `norm=None` (`delta = 1`); AdaDEM-V
  `delta_from="entropy"` (`delta = ||p (z - E_p z)||`, floored at 1e-6).

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`); pixel-wise
      `[B, H, W, C]` treats every pixel as an example (one MEC per model).
    mec: `[C, C]` MEC state from `mec_init` (or the previous call); None is
      allowed with `calibrator="gmc"` only.
    momentum: pi in (0, 1]; 0.1 in the paper, 0.01 for continual TTA.
    norm: "l1", "l2", "linf" or None.
    calibrator: "mec" or "gmc".
    delta_from: "cadf" or "entropy".
    axis: the class axis.
    where: optional bool mask over examples (`[...]`) or over classes (the
      logits' shape: False classes are treated as `-inf` logits); masked
      examples, and examples with no class left, give 0 loss and 0 gradient
      and are left out of the MEC update.
    axis_name: named axis (pmap / shard_map) over which the MEC update is
      reduced; None on one device.

  Returns:
    `(loss, new_mec)`: float32 `[...]` per-example loss and the `[C, C]` state
    (`mec` itself, possibly None, for the GMC).

  Example:
    >>> mec = losses.mec_init(10)
    >>> def objective(params, mec, x):
    ...   loss, mec = losses.adadem(model.apply(params, x), mec)
    ...   return loss.mean(), mec
    >>> grads, mec = jax.grad(objective, has_aux=True)(params, mec, x)
  """
  fn = "adadem"
  check_adadem_options(norm, calibrator, delta_from, fn)
  momentum_value = _common.concrete_value(momentum)  # before it is traced
  momentum = _check_momentum(momentum, fn)
  z, mask = _common.to_examples(logits, axis, where, fn)
  num_classes = z.shape[-1]
  if mec is None and calibrator == "mec":
    raise ValueError(
        f"{fn}: calibrator='mec' needs the MEC state, got mec=None. Create it "
        f"with losses.mec_init({num_classes}) and pass back the state each "
        "call returns; only calibrator='gmc' (AdaDEM-Norm) runs without one.")
  if mec is not None:
    _check_mec(mec, num_classes, fn)
  options = dict(momentum=momentum, norm=norm, calibrator=calibrator,
                 delta_from=delta_from, axis_name=axis_name)
  if _kernels.usable(z):
    value, new_mec = _kernels.on_cpu(
        (z, mec, mask),
        functools.partial(_adadem_kernel_path, momentum_value=momentum_value,
                          **options),
        functools.partial(_adadem_jax_path, **options))
  else:
    value, new_mec = _adadem_jax_path(z, mec, mask, **options)
  if calibrator == "gmc":
    # The state itself, not a copy out of the platform switch: a jitted
    # caller then returns its input without copying a (C, C) array.
    new_mec = mec
  return _common.apply_mask(value, mask), new_mec


def _adadem_jax_path(z, mec, mask, *, momentum, norm, calibrator, delta_from,
                     axis_name):
  """AdaDEM on float32 `[..., C]` logits in pure JAX: `(value, new_mec)`."""
  num_classes = z.shape[-1]
  stats = softmax_stats(lax.stop_gradient(z))
  if calibrator == "gmc":
    new_mec = mec
    m = jnp.zeros((), jnp.float32)  # unused by the GMC
  else:
    # The probabilities come from the same shifted exp as the loss.
    _, e, inv, _ = stats
    yhat = _common.first_argmax(z)  # integer: no gradient to stop
    flat_mask = None if mask is None else mask.reshape(-1)
    new_mec = mec_update(mec, (e * inv).reshape(-1, num_classes), yhat.reshape(-1),
                         momentum=momentum, where=flat_mask, axis_name=axis_name)
    m = new_mec.astype(jnp.float32)[yhat]
  value = _adadem(z, stats, m, norm, calibrator, delta_from)
  return value, new_mec


def _adadem_kernel_path(z, mec, mask, *, momentum, norm, calibrator, delta_from,
                        axis_name, momentum_value=None):
  """`_adadem_jax_path` with the fused CPU kernels (`_kernels`).

  One kernel pass gives the softmax statistics, delta, the pseudo-labels and
  (for the MEC) the per-class sums of the update. On one device with a known
  momentum the same kernel call also makes the update and the values;
  otherwise the update (with its `psum`) is `_mec_from_sums` and a value
  kernel follows. The value and backward kernels read each example's MEC row
  from the state by its pseudo-label instead of gathering a `[..., C]` copy.
  """
  if calibrator == "gmc":
    # AdaDEM-Norm: no MEC, so statistics and value come from one kernel.
    return _adadem_norm_kernel(z, norm, delta_from), mec
  weights = (jnp.ones(z.shape[:-1], jnp.float32) if mask is None
             else mask.astype(jnp.float32))
  if axis_name is None and momentum_value is not None:
    # One device, a known momentum: one kernel updates the state and gives
    # the value as well.
    value, new_mec = _adadem_fused(z, weights, lax.stop_gradient(mec).astype(jnp.float32),
                                   momentum_value, norm, delta_from)
    return value, new_mec.astype(mec.dtype)
  stats, yhat, sums, counts = _kernels.ada_stats(lax.stop_gradient(z), weights, norm=norm,
                                                 delta_from=delta_from)
  new_mec = _mec_from_sums(mec, sums, counts, momentum, axis_name)
  value = _adadem_kernel(z, stats, yhat, new_mec.astype(jnp.float32), calibrator)
  return value, new_mec


def _adadem_grad(residuals, g, calibrator):
  z, stats, yhat, table, res = residuals
  dz = _kernels.ada_backward(lax.stop_gradient(z), stats, yhat, table, res, g,
                             calibrator=calibrator)
  return _first_order_only(dz, z)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _adadem_fused(z, weights, mec, momentum, norm, delta_from):
  return _adadem_fused_fwd(z, weights, mec, momentum, norm, delta_from)[0]


def _adadem_fused_fwd(z, weights, mec, momentum, norm, delta_from):
  stats, yhat, new_mec, value, res = _kernels.ada_stats_update(
      lax.stop_gradient(z), weights, mec, momentum, norm=norm, delta_from=delta_from)
  return (value, new_mec), (z, stats, yhat, new_mec, res)


def _adadem_fused_bwd(momentum, norm, delta_from, residuals, cotangents):
  # The state is not differentiated (the update reads stop_gradient(p)).
  del momentum, norm, delta_from
  g, _ = cotangents
  z, _, _, new_mec, _ = residuals
  return (_adadem_grad(residuals, g, "mec"), jnp.zeros(z.shape[:-1], jnp.float32),
          jnp.zeros_like(new_mec))


_adadem_fused.defvjp(_adadem_fused_fwd, _adadem_fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _adadem_kernel(z, stats, yhat, table, calibrator):
  return _kernels.ada_forward(lax.stop_gradient(z), stats, yhat, table,
                              calibrator=calibrator)[0]


def _adadem_kernel_fwd(z, stats, yhat, table, calibrator):
  value, res = _kernels.ada_forward(lax.stop_gradient(z), stats, yhat, table,
                                    calibrator=calibrator)
  return value, (z, stats, yhat, table, res)


def _adadem_kernel_bwd(calibrator, residuals, g):
  _, stats, yhat, table, _ = residuals
  return (_adadem_grad(residuals, g, calibrator), jnp.zeros_like(stats),
          np.zeros(yhat.shape, jax.dtypes.float0), jnp.zeros_like(table))


_adadem_kernel.defvjp(_adadem_kernel_fwd, _adadem_kernel_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _adadem_norm_kernel(z, norm, delta_from):
  return _kernels.ada_norm_forward(lax.stop_gradient(z), norm=norm, delta_from=delta_from)[0]


def _adadem_norm_kernel_fwd(z, norm, delta_from):
  if _kernels.fuses_grad(z):  # many classes: the gradient in the same pass
    value, grad = _kernels.ada_norm_forward_grad(lax.stop_gradient(z), norm=norm,
                                                 delta_from=delta_from)
    return value, (z, grad)  # z: for the first-order guard only
  value, stats, res = _kernels.ada_norm_forward(lax.stop_gradient(z), norm=norm,
                                                delta_from=delta_from)
  # No pseudo-labels or MEC table: the GMC backward kernel reads neither.
  unused_yhat, unused_table = jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1), jnp.float32)
  return value, (z, stats, unused_yhat, unused_table, res)


def _adadem_norm_kernel_bwd(norm, delta_from, residuals, g):
  del norm, delta_from
  if _kernels.fuses_grad(residuals[0]):  # (z, gradient at cotangent 1)
    z, grad = residuals
    return (_first_order_only(_kernels.scale_rows(grad, g), z),)
  return (_adadem_grad(residuals, g, "gmc"),)


_adadem_norm_kernel.defvjp(_adadem_norm_kernel_fwd, _adadem_norm_kernel_bwd)
