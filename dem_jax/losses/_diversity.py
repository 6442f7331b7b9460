"""The marginal entropy: the diversity term of information maximisation (SHOT)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from dem_jax.losses import _common
from dem_jax.losses._common import AxisName, Mask


def marginal_entropy(logits: ArrayLike, *, axis: int = -1, where: Mask = None,
                     axis_name: AxisName | None = None) -> jax.Array:
  r"""Entropy of the mean prediction over all (unmasked) examples.

  .. math::
    \bar p = \frac{1}{N} \sum_n \mathrm{softmax}(z_n), \qquad
    H(\bar p) = -\sum_i \bar p_i \log \bar p_i.

  Information maximisation (SHOT-IM) *maximises* it to keep predictions
  diverse: minimise `entropy(z).mean() - marginal_entropy(z)`. Unlike the
  per-example losses this is one number for the whole (global) batch. Plain
  autodiff; forward and reverse mode both work.

  Data parallel: with `axis_name`, differentiate each device's loss and
  `lax.pmean` the gradients, as any data-parallel step does (under `jax.pmap`,
  or `jax.shard_map(..., check_vma=False)`): the transpose of the `psum` inside
  carries each device's share, and the mean gives the gradient of the global
  value (tests/test_losses_multidevice.py checks this).

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    axis: the class axis.
    where: optional bool mask over examples (masked ones are left out of the
      mean) or over classes (the logits' shape: False classes are `-inf`).
    axis_name: named axis over which the mean prediction is taken, so that N
      devices give the value of one device on the global batch.

  Returns:
    float32 scalar in `[0, log C]`; 0 if every example is masked.

  Example:
    >>> losses.marginal_entropy(jnp.array([[9.0, 0.0], [0.0, 9.0]]))  # ~ log 2
  """
  fn = "marginal_entropy"
  z, mask = _common.to_examples(logits, axis, where, fn)
  num_classes = z.shape[-1]
  probs = jax.nn.softmax(z, axis=-1).reshape(-1, num_classes)
  weights = (jnp.ones(probs.shape[:1], jnp.float32) if mask is None
             else mask.reshape(-1).astype(jnp.float32))
  total = jnp.sum(probs * weights[:, None], axis=0)
  count = jnp.sum(weights)
  if axis_name is not None:
    total, count = lax.psum((total, count), axis_name)
  mean = total / jnp.maximum(count, 1.0)
  safe = jnp.where(mean > 0, mean, 1.0)
  return -jnp.sum(jnp.where(mean > 0, mean * jnp.log(safe), 0.0))
