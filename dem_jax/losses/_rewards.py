"""Per-class rewards (-dL/dz) of every loss, for diagnostics and plots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from dem_jax.losses import _adadem
from dem_jax.losses import _common
from dem_jax.losses import _dem


def rewards(logits: ArrayLike, *, tau: float = 1.0, alpha: float = 1.0,
            mec: jax.Array | None = None, axis: int = -1) -> dict[str, jax.Array]:
  r"""The reward `-dL/dz` that each loss puts on each logit.

  Computed by the losses' own backward passes (their closed forms):

    cadf:   p_i (z_i - E_p[z] + 1)                       (CADF at tau = 1)
    gmc:    -p_i
    em:     p_i (z_i - E_p[z])                            (= cadf + gmc)
    dem:    (q_i / tau)(z_i - E_q[z] + tau) - alpha p_i   (q = softmax(z / tau))
    adadem: (p_i (z_i - E_p[z] + 1) - m_i) / delta        (m = mec[argmax z])

  As the prediction becomes one-hot the EM reward collapses to 0 while the
  CADF reward on the top class tends to 1; AdaDEM's stays bounded away from 0.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    tau, alpha: DEM's hyperparameters.
    mec: `[C, C]` MEC state; None uses `mec_init(C)` (not updated here).
    axis: the class axis.

  Returns:
    dict with float32 `cadf`, `gmc`, `em`, `dem`, `adadem` of the shape of
    `logits`, and `delta` (AdaDEM's L1 norm) of the per-example shape.

  Example:
    >>> r = losses.rewards(jnp.array([[4.0, 0.0, 0.0]]))
    >>> r["em"][0, 0], r["adadem"][0, 0]
  """
  fn = "rewards"
  z, _ = _common.to_examples(logits, axis, None, fn)
  num_classes = z.shape[-1]
  tau = _dem._check_tau(tau, fn)[0]
  alpha = _dem._check_alpha(alpha, fn)[0]
  if mec is None:
    mec = _adadem.mec_init(num_classes)
  _adadem._check_mec(mec, num_classes, fn)
  def minus_grad(loss):
    # Every loss is per example, so the gradient of the sum is each
    # example's own gradient.
    return -jax.grad(lambda z: jnp.sum(loss(z)))(z)

  stats = _adadem.softmax_stats(z)
  m = mec.astype(jnp.float32)[_common.first_argmax(z)]
  _, inv_delta, row = _adadem.adadem_parts(stats, m, norm="l1", calibrator="mec",
                                           delta_from="cadf")
  out = {
      "cadf": minus_grad(lambda z: _dem.cadf(z, 1.0)),
      "gmc": minus_grad(lambda z: _dem.gmc(z, 1.0)),
      "em": minus_grad(_dem.entropy),
      "dem": minus_grad(lambda z: _dem.dem(z, tau, alpha)),
      "adadem": -_adadem._grad(stats, inv_delta, m, row),
  }
  delta = 1.0 / inv_delta[..., 0]
  axis = _common.check_logits(logits, axis, fn)
  out = {k: jnp.moveaxis(v, -1, axis) for k, v in out.items()}
  out["delta"] = delta
  return out
