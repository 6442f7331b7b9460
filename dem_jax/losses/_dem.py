"""Classical entropy minimisation and its decoupling: EM, CADF, GMC and DEM.

For one example with logits `z` (C classes), `p = softmax(z)`:

    H(z)       = -sum_i p_i log p_i          = T(z) + Q(z)
    T_tau(z)   = -sum_i softmax(z / tau)_i z_i          (CADF)
    Q_alpha(z) = alpha * logsumexp(z)                   (GMC)
    DEM        = T_tau + Q_alpha                        (tau = alpha = 1 is EM)

The gradients are written out (`jax.custom_vjp`) from their closed forms, with
`q = softmax(z / tau)`:

    dT_tau/dz_i   = -(q_i / tau) (z_i - E_q[z] + tau)
    dQ_alpha/dz_i = alpha p_i

The backward pass computes the CADF reward `-dT/dz` and the calibrator
gradient separately and adds them (for the entropy, in closed form). Reverse
mode only: `jax.grad`, `jax.vjp`, `jax.jacrev` work; `jax.jvp` and `jax.jacfwd`
raise TypeError. `jax.hessian` (forward over reverse) differentiates the
closed-form backward pass and gives the true Hessian.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from dem_jax.losses import _common
from dem_jax.losses import _kernels
from dem_jax.losses._common import Mask

# --------------------------------------------------------------------------
# Closed forms on float32 [..., C] logits. Every value is computed from logits
# centred on their maximum, so that logits of magnitude 1e4 lose no precision
# and masked (-inf) classes contribute exactly 0.
# --------------------------------------------------------------------------


def _decoupled_forward(z, tau, alpha, mode):
  """The value and the backward residuals.

  One pass computes `e = exp(zc)` (for `p`, the GMC and EM) and/or
  `f = exp(zc / tau)` (for `q`, the CADF); they are kept as residuals so that
  the backward pass is elementwise with no `exp` (on CPU `exp` costs more than
  storing and re-reading the array). `lse = logsumexp(zc) = -log(inv_p)`.
  """
  zc, zmax = _common.shift(z)
  zmax = zmax[..., 0]
  p_parts = q_parts = None
  if mode in ("entropy", "gmc", "dem"):
    p_parts = _common.exp_moments(zc)
  if mode in ("cadf", "dem"):
    q_parts = _common.exp_moments(zc, tau)
  if mode == "entropy":
    # q = p: one exp; H = logsumexp(zc) - E_p[zc], exact even for huge logits.
    _, inv_p, mean_p = p_parts
    value = -jnp.log(inv_p[..., 0]) - mean_p[..., 0]
  elif mode == "gmc":
    value = alpha * (-jnp.log(p_parts[1][..., 0]) + zmax)
  elif mode == "cadf":
    value = -q_parts[2][..., 0] - zmax  # T_tau(z) = -E_q[zc] - max z
  else:
    # dem: the max terms of T_tau and Q_alpha are combined before adding, so
    # that tau = alpha = 1 gives the entropy to the last bit rather than a
    # difference of two numbers of the size of the logits.
    value = (-q_parts[2][..., 0] - alpha * jnp.log(p_parts[1][..., 0])
             + (alpha - 1.0) * zmax)
  return value, (zc, zmax, p_parts, q_parts, tau, alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _decoupled(z, tau, alpha, mode):
  return _decoupled_forward(z, tau, alpha, mode)[0]


def _decoupled_fwd(z, tau, alpha, mode):
  return _decoupled_forward(z, tau, alpha, mode)


def _decoupled_bwd(mode, res, g):
  zc, zmax, p_parts, q_parts, tau, alpha = res
  g = g[..., None]
  dz = 0.0
  gtau = galpha = jnp.zeros((), jnp.float32)
  if mode == "entropy":
    # dH/dz_i = -p_i (zc_i - E_p[zc]): the CADF reward -p(dev + 1) plus the
    # GMC gradient p. Masked classes: e = 0 and zc is finite, so exactly 0.
    e, inv_p, mean_p = p_parts
    return (g * inv_p) * e * (mean_p - zc), gtau, galpha
  if p_parts is not None:
    # dQ_alpha/dz_i = alpha p_i.
    e, inv_p, _ = p_parts
    dz = (g * alpha * inv_p) * e
    # dQ_alpha/dalpha = logsumexp(z).
    galpha = jnp.sum(g[..., 0] * (zmax - jnp.log(inv_p[..., 0])))
  if q_parts is not None:
    # dT_tau/dz_i = -(q_i / tau) (zc_i - E_q[zc] + tau).
    f, inv_q, mean_q = q_parts
    dev = zc - mean_q
    dz = dz - (g * inv_q / tau) * f * (dev + tau)
    # dT_tau/dtau = Var_q[z] / tau^2. Computed only when tau is differentiated
    # (XLA drops it otherwise), so that a traced (vmapped, differentiated) tau
    # gets its true gradient rather than a silent zero.
    var = jnp.sum(f * dev * dev, axis=-1) * inv_q[..., 0]
    gtau = jnp.sum(g[..., 0] * var) / (tau * tau)
  return dz, gtau, galpha


_decoupled.defvjp(_decoupled_fwd, _decoupled_bwd)


# The same closed forms as one fused CPU kernel per pass (`_kernels`), used
# on CPU when tau and alpha are known at trace time (a traced tau or alpha,
# e.g. a vmapped DEM* grid or a gradient in tau, runs `_decoupled`).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _decoupled_kernel(z, mode, tau, alpha):
  return _kernels.dem_forward(z, mode, tau, alpha)[0]


def _decoupled_kernel_fwd(z, mode, tau, alpha):
  if _kernels.fuses_grad(z):  # the gradient in the same pass, scaled by g later
    value, grad = _kernels.dem_forward_grad(z, mode, tau, alpha)
    return value, (grad,)
  value, stats = _kernels.dem_forward(z, mode, tau, alpha)
  return value, (z, stats)


def _decoupled_kernel_bwd(mode, tau, alpha, res, g):
  if _kernels.fuses_grad(res[0]):  # (gradient at cotangent 1,)
    return (_kernels.scale_rows(res[0], g),)
  z, stats = res
  return (_kernels.dem_backward(z, stats, g, mode, tau, alpha),)


_decoupled_kernel.defvjp(_decoupled_kernel_fwd, _decoupled_kernel_bwd)


def _run(logits, tau, alpha, mode, axis, where, fn):
  """tau, alpha: `(float32 scalar, float or None)` from `_check_tau`/`_check_alpha`."""
  z, mask = _common.to_examples(logits, axis, where, fn)
  (tau, t), (alpha, a) = tau, alpha
  if t is not None and a is not None and _kernels.usable(z):
    value = _kernels.on_cpu(
        (z,), lambda z: _decoupled_kernel(z, mode, t, a),
        lambda z: _decoupled(z, tau, alpha, mode))
  else:
    value = _decoupled(z, tau, alpha, mode)
  return _common.apply_mask(value, mask)


def _check_tau(tau, fn):
  """tau as a float32 scalar, and as a float when known at trace time (else None)."""
  value = _common.concrete_value(tau)  # before jnp.asarray, which traces under jit
  tau = _common.check_scalar(tau, "tau", fn)
  if value is not None and not value > 0:
    raise ValueError(f"{fn}: tau must be > 0 (a temperature), got {value}.")
  return tau, value


def _check_alpha(alpha, fn):
  value = _common.concrete_value(alpha)
  alpha = _common.check_scalar(alpha, "alpha", fn)
  if value is not None and not value >= 0:
    raise ValueError(
        f"{fn}: alpha must be >= 0 (the weight of GMC), got {value}.")
  return alpha, value


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def entropy(logits: ArrayLike, *, axis: int = -1, where: Mask = None) -> jax.Array:
  r"""Shannon entropy of the softmax prediction: classical EM, per example.

  .. math::
    H(z) = -\sum_i p_i \log p_i, \quad p = \mathrm{softmax}(z),
    \qquad \partial H / \partial z_i = -p_i (z_i - E_p[z]).

  The gradient is the CADF gradient `-p_i (z_i - E_p[z] + 1)` plus the GMC
  gradient `p_i`, added in closed form (`-p_i (z_i - E_p[z])`, which spares a
  cancellation); `dem(z, 1, 1)` computes the same two terms apart. Reverse
  mode only (`jax.grad`, `jax.vjp`; `jax.hessian` works, forward over reverse).

  Args:
    logits: float array `[..., num_classes, ...]`, class axis at `axis`; any
      floating dtype (computed in float32, gradient returned in the input
      dtype). `-inf` marks a masked class (probability 0, gradient 0).
    axis: the class axis.
    where: optional bool mask, as in optax: `[...]` (the output's shape),
      where False examples give 0 loss and 0 gradient; or the logits' shape,
      where False classes are treated as `-inf` logits (an example with no
      class left gives 0 loss and 0 gradient).

  Returns:
    float32 `[...]`: the entropy of each example, in `[0, log C]`.

  Example:
    >>> from dem_jax import losses
    >>> losses.entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
    Array([6.9314718e-01, 4.9939845e-04], dtype=float32)
  """
  one = (1.0, 1.0)
  return _run(logits, one, one, "entropy", axis, where, "entropy")


def cadf(logits: ArrayLike, tau: ArrayLike = 1.0, *, axis: int = -1,
         where: Mask = None) -> jax.Array:
  r"""CADF, the cluster aggregation driving factor, with temperature tau.

  .. math::
    T_\tau(z) = -\sum_i q_i z_i, \quad q = \mathrm{softmax}(z / \tau),
    \qquad \partial T_\tau / \partial z_i = -\frac{q_i}{\tau}(z_i - E_q[z] + \tau).

  Its reward `-dT/dz` favours the dominant class and tends to 1 on it as the
  prediction becomes one-hot. Reverse mode only.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    tau: temperature > 0, a Python float or a traced scalar.
    axis: the class axis.
    where: optional bool mask over examples or over classes (see `entropy`).

  Returns:
    float32 `[...]`: `T_tau` per example.

  Example:
    >>> losses.cadf(jnp.array([[2.0, 0.0, -1.0]]), tau=0.5)
    Array([-1.9568301], dtype=float32)
  """
  return _run(logits, _check_tau(tau, "cadf"), (0.0, 0.0), "cadf", axis, where, "cadf")


def gmc(logits: ArrayLike, alpha: ArrayLike = 1.0, *, axis: int = -1,
        where: Mask = None) -> jax.Array:
  r"""GMC, the gradient mitigation calibrator, with weight alpha.

  .. math::
    Q_\alpha(z) = \alpha \log \sum_i e^{z_i},
    \qquad \partial Q_\alpha / \partial z_i = \alpha p_i.

  Its reward `-alpha p` penalises confident classes. Reverse mode only.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    alpha: weight >= 0, a Python float or a traced scalar.
    axis: the class axis.
    where: optional bool mask over examples or over classes (see `entropy`).

  Returns:
    float32 `[...]`: `Q_alpha` per example.

  Example:
    >>> losses.gmc(jnp.zeros((1, 4)), alpha=0.5)  # 0.5 * log 4
    Array([0.6931472], dtype=float32)
  """
  return _run(logits, (1.0, 1.0), _check_alpha(alpha, "gmc"), "gmc", axis, where, "gmc")


def dem_valid(tau: ArrayLike, alpha: ArrayLike) -> bool | np.ndarray:
  """Whether (tau, alpha) lies in the region of Prop. A.1.

  The region is `0 < tau <= 2 / alpha` for `alpha > 0`, and `tau > 0` for
  `alpha = 0` (CADF alone). Outside it the DEM loss is no longer locally
  concave at the uniform prediction: `d2L/dz_i2 = -(C-1)/(C^2 tau) (2 - alpha tau)`
  changes sign, and minimising it would push predictions *towards* uniform.

  Args:
    tau: temperature(s); a float or a NumPy array (broadcast with alpha).
    alpha: GMC weight(s).

  Returns:
    A bool, or a bool array of the broadcast shape.

  Example:
    >>> dem_valid(1.3, 0.8), dem_valid(1.5, 1.5)
    (True, False)
  """
  tau = np.asarray(tau, np.float64)
  alpha = np.asarray(alpha, np.float64)
  # The 1e-9 slack keeps grid points such as (2.0, 1.0) that sit on the
  # boundary tau * alpha = 2 inside despite float rounding of 0.1 steps.
  ok = (tau > 0) & (alpha >= 0) & (alpha * tau <= 2.0 + 1e-9)
  return bool(ok) if ok.ndim == 0 else ok


def dem(logits: ArrayLike, tau: ArrayLike = 1.0, alpha: ArrayLike = 1.0, *, axis: int = -1,
        where: Mask = None) -> jax.Array:
  r"""Decoupled entropy minimisation: CADF at temperature tau plus alpha x GMC.

  .. math::
    L_{DEM}(z) = T_\tau(z) + Q_\alpha(z)
               = -\sum_i \mathrm{softmax}(z/\tau)_i z_i + \alpha \log\sum_i e^{z_i},

    \partial L / \partial z_i = -\frac{q_i}{\tau}(z_i - E_q[z] + \tau) + \alpha p_i.

  `dem(z, 1, 1)` equals `entropy(z)` in value and gradient. The backward pass
  computes the CADF and GMC gradients separately and adds them; tau and alpha
  get their true gradients too (`dL/dtau = Var_q[z] / tau^2`,
  `dL/dalpha = logsumexp(z)`). Reverse mode only. A (tau, alpha) outside
  Prop. A.1's region (see `dem_valid`) gives a warning when both are known at
  trace time.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    tau: temperature > 0: Python float or traced scalar (vmap a grid of them).
    alpha: GMC weight >= 0: Python float or traced scalar.
    axis: the class axis.
    where: optional bool mask over examples or over classes (see `entropy`).

  Returns:
    float32 `[...]`: the DEM loss per example.

  Example:
    >>> z = jnp.array([[3.0, 1.0, 0.0]])
    >>> losses.dem(z, tau=1.3, alpha=0.8)
    Array([0.08974469], dtype=float32)
    >>> grad = jax.grad(lambda z: jnp.mean(losses.dem(z, 1.3, 0.8)))(z)
  """
  checked_tau = _check_tau(tau, "dem")
  checked_alpha = _check_alpha(alpha, "dem")
  t, a = checked_tau[1], checked_alpha[1]
  if t is not None and a is not None and not dem_valid(t, a):
    warnings.warn(
        f"dem: (tau={t:g}, alpha={a:g}) is outside Prop. A.1's region "
        f"0 < tau <= 2/alpha (here 2/alpha = {2 / a:g}); the loss is not "
        "concave at the uniform prediction and may drive predictions towards "
        "uniform. See dem_jax.losses.dem_valid.", stacklevel=2)
  return _run(logits, checked_tau, checked_alpha, "dem", axis, where, "dem")
