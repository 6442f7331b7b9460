"""Losses robust to noisy labels: GCE, SCE and ELR (the supervised baselines).

For one example with logits `z` (C classes), label `y`, `p = softmax(z)`:

    CE          = -log p_y
    GCE_q       = (1 - p_y^q) / q                        (-> CE as q -> 0)
    RCE         = -sum_k p_k log onehot(y)_k = -A (1 - p_y),   log 0 := A < 0
    SCE         = alpha CE + beta RCE
    ELR         = CE + lam log(1 - <t_i, p~>),  p~ = clip(p, 1e-4, 1 - 1e-4),
                  t_i a running mean of the normalised p~ of example i over epochs

They follow the conventions of `dem_jax.losses` (`_common`): logits first, the
class axis `axis`, per-example float32 values, an optional `where` mask over
examples, and labels of the per-example shape. Plain autodiff, forward and
reverse mode.

Labels are checked eagerly when their values are known (outside `jit`);
under `jit` an unmasked label outside `[0, C)`, or an ELR index outside its
table, gives a NaN loss rather than a silently wrong number. Masked examples
may hold any label (e.g. -1 padding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from dem_jax.losses import _common
from dem_jax.losses._common import Mask

# ELR clips the prediction into [eps, 1 - eps] before using it (Liu et al.'s code).
ELR_CLIP = 1e-4


def _concrete_array(x):
  """`x` as a NumPy array if its values are known at trace time, else None."""
  if x is None:
    return None
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_int_array(x, shape, what, fn):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(
        f"{fn}: {what} must be a JAX or NumPy integer array, got "
        f"{type(x).__name__}. Wrap Python lists with jnp.asarray(...).")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"{fn}: {what} must be integers (class indices), got dtype {x.dtype}. "
        "One-hot or soft labels are not accepted; pass labels.argmax(-1).")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(
        f"{fn}: {what} must have the per-example shape {tuple(shape)} (logits "
        f"shape without the class axis), got {tuple(x.shape)}.")


def _check_range(x, mask, high, what, fn):
  """Raises if a known, unmasked entry of `x` is outside `[0, high)`."""
  values = _concrete_array(x)
  if values is None:
    return
  keep = np.ones(values.shape, bool) if mask is None else _concrete_array(mask)
  if keep is None:
    return
  bad = keep & ((values < 0) | (values >= high))
  if bad.any():
    raise ValueError(
        f"{fn}: {what} must be in [0, {high}) for unmasked examples, got "
        f"{values[bad][:5].tolist()} (mask examples out with `where=`).")


def _check_inputs(logits, labels, axis, where, fn):
  """Every check of logits, labels and mask; returns the normalised axis and the mask.

  Runs eagerly, before the jitted math, so that bad input raises at the call.
  """
  axis = _common.check_logits(logits, axis, fn)
  out_shape = tuple(s for i, s in enumerate(logits.shape) if i != axis)
  mask = _common.check_where(where, out_shape, fn)
  _check_int_array(labels, out_shape, "labels", fn)
  _check_range(labels, mask, logits.shape[axis], "labels", fn)
  return axis, mask


def _examples(logits, labels, axis, where, fn):
  """Float32 `[..., C]` logits, safe int32 labels `[...]` (0 where masked), the mask."""
  z, mask = _common.to_examples(logits, axis, where, fn)
  labels = jnp.asarray(labels).astype(jnp.int32)
  if mask is not None:
    labels = jnp.where(mask, labels, 0)
  return z, labels, mask


def _log_probs(z):
  """`log softmax(z)` and `softmax(z)`; `-inf` classes give `-inf` and 0."""
  zc, _ = _common.shift(z)
  e, inv, _ = _common.exp_moments(zc)
  return jnp.where(zc > _common.LOWEST, zc + jnp.log(inv), -jnp.inf), e * inv


def _log_p_label(log_p, labels):
  """`log p_y`, NaN where the label is outside `[0, C)` (only possible under jit)."""
  num_classes = log_p.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  picked = jnp.take_along_axis(log_p, jnp.clip(labels, 0, num_classes - 1)[..., None],
                               axis=-1)[..., 0]
  return jnp.where(valid, picked, jnp.nan)


def _check_range_scalar(x, name, fn, low, high, low_open, high_open, hint):
  x = _common.check_scalar(x, name, fn)
  value = _common.concrete_value(x)
  if value is not None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
      interval = (("(" if low_open else "[") + f"{low:g}, {high:g}"
                  + (")" if high_open else "]"))
      raise ValueError(f"{fn}: {name} must be in {interval}, got {value}. {hint}")
  return x


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def generalized_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, q: float = 0.7,
                              axis: int = -1, where: Mask = None) -> jax.Array:
  r"""Generalized cross entropy (GCE), the negative Box-Cox transform of p_y.

  .. math::
    L_q(z, y) = \frac{1 - p_y^q}{q}, \quad p = \mathrm{softmax}(z),
    \qquad \partial L_q / \partial z_i = -p_y^q (\mathbb{1}[i = y] - p_i).

  It is the cross entropy `-log p_y` in the limit q -> 0 and the mean absolute
  error `1 - p_y` (up to a factor 2) at q = 1. Compared with CE the gradient of
  each example is weighted by `p_y^q`, so examples the model disagrees with
  (often the mislabelled ones) pull less. Computed as `-expm1(q log p_y) / q`,
  accurate for small q.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`); any floating
      dtype (computed in float32).
    labels: int `[...]` (the per-example shape), in `[0, num_classes)`.
    q: in (0, 1]; 0.7 in the paper. A Python float or a traced scalar.
    axis: the class axis.
    where: optional bool `[...]`; False examples give 0 loss and 0 gradient.

  Returns:
    float32 `[...]`: the GCE of each example, in `[0, 1/q]`.

  Example:
    >>> losses.generalized_cross_entropy(jnp.array([[2.0, 0.0, 0.0]]),
    ...                                  jnp.array([0]), q=0.7)
    Array([0.22053826], dtype=float32)

  Here `p_0 = 0.7870` and `(1 - 0.7870^0.7) / 0.7 = 0.2205`.

  References:
    Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural
    Networks with Noisy Labels", NeurIPS 2018.
  """
  fn = "generalized_cross_entropy"
  q = _check_range_scalar(q, "q", fn, 0.0, 1.0, True, False,
                          "q -> 0 is cross entropy, q = 1 is MAE; the paper uses 0.7.")
  axis, where = _check_inputs(logits, labels, axis, where, fn)
  return _gce(logits, labels, where, q, axis=axis)


# The math is jitted (one compiled program per shape instead of one per
# primitive when called eagerly); under an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("axis",))
def _gce(logits, labels, where, q, *, axis):
  z, labels, mask = _examples(logits, labels, axis, where, "generalized_cross_entropy")
  log_p, _ = _log_probs(z)
  value = -jnp.expm1(q * _log_p_label(log_p, labels)) / q
  return _common.apply_mask(value, mask)


def symmetric_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, alpha: float = 0.1,
                            beta: float = 1.0, log_zero: float = -4.0, axis: int = -1,
                            where: Mask = None) -> jax.Array:
  r"""Symmetric cross entropy (SCE): CE plus the reverse cross entropy.

  .. math::
    L(z, y) = \alpha \, (-\log p_y) + \beta \, \mathrm{RCE}, \qquad
    \mathrm{RCE} = -\sum_k p_k \log e_{y,k} = -A (1 - p_y),

  with `e_y` the one-hot label and `log 0 := A = log_zero` (the label's own
  entry has `log 1 = 0`). RCE is the mean absolute error scaled by `-A / 2`:
  bounded, hence robust; CE keeps the fit on hard classes. `1 - p_y` is
  computed as `-expm1(log p_y)`, accurate near `p_y = 1`.

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    labels: int `[...]` (the per-example shape), in `[0, num_classes)`.
    alpha: weight of CE, >= 0 (0.1 for CIFAR-10, 0.01 for MNIST in the paper).
    beta: weight of RCE, >= 0 (1.0 in the paper).
    log_zero: A < 0, the value given to `log 0` (the paper's -4; the authors'
      code clamps the one-hot label at 1e-4, which is A = log 1e-4 = -9.21).
    axis: the class axis.
    where: optional bool `[...]`; False examples give 0 loss and 0 gradient.

  Returns:
    float32 `[...]`: the SCE of each example.

  Example:
    >>> losses.symmetric_cross_entropy(jnp.array([[2.0, 0.0, 0.0]]), jnp.array([0]))
    Array([0.8760105], dtype=float32)

  That is `0.1 * 0.2395 + 4 * (1 - 0.7870)` (CE = -log 0.7870 = 0.2395).

  References:
    Wang, Ma, Chen, Luo, Yi & Bailey, "Symmetric Cross Entropy for Robust
    Learning with Noisy Labels", ICCV 2019.
  """
  fn = "symmetric_cross_entropy"
  inf = float("inf")
  alpha = _check_range_scalar(alpha, "alpha", fn, 0.0, inf, False, True,
                              "alpha weighs the cross entropy.")
  beta = _check_range_scalar(beta, "beta", fn, 0.0, inf, False, True,
                             "beta weighs the reverse cross entropy.")
  log_zero = _check_range_scalar(log_zero, "log_zero", fn, -inf, 0.0, True, True,
                                 "It stands for log 0; the paper uses -4.")
  axis, where = _check_inputs(logits, labels, axis, where, fn)
  return _sce(logits, labels, where, alpha, beta, log_zero, axis=axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _sce(logits, labels, where, alpha, beta, log_zero, *, axis):
  z, labels, mask = _examples(logits, labels, axis, where, "symmetric_cross_entropy")
  log_p, _ = _log_probs(z)
  log_p_y = _log_p_label(log_p, labels)
  rce = log_zero * jnp.expm1(log_p_y)  # -A (1 - p_y)
  return _common.apply_mask(-alpha * log_p_y + beta * rce, mask)


def elr_init(num_examples: int, num_classes: int) -> jax.Array:
  """The initial ELR target table: one all-zero row per training example.

  Args:
    num_examples: N >= 1, the size of the training set (rows are addressed by
      example index, not batch position).
    num_classes: C >= 2.

  Returns:
    float32 `[N, C]` zeros.

  Example:
    >>> targets = losses.elr_init(50_000, 10)
  """
  if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) \
      or num_examples < 1:
    raise ValueError(f"elr_init: num_examples must be an int >= 1, got {num_examples!r}.")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ValueError(f"elr_init: num_classes must be an int >= 2, got {num_classes!r}.")
  return jnp.zeros((int(num_examples), int(num_classes)), jnp.float32)


def _check_targets(targets, num_classes, fn):
  if not hasattr(targets, "shape") or len(targets.shape) != 2 \
      or targets.shape[1] != num_classes:
    shape = tuple(targets.shape) if hasattr(targets, "shape") else type(targets).__name__
    raise ValueError(
        f"{fn}: the target table must have shape (N, C) = (num_examples, "
        f"{num_classes}) for logits with {num_classes} classes, got {shape}. "
        f"Create it with losses.elr_init(num_examples, {num_classes}).")
  if not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(f"{fn}: the target table must be floating, got {targets.dtype}.")


def elr(logits: ArrayLike, labels: ArrayLike, targets: jax.Array, indices: ArrayLike, *,
        lam: float = 3.0, beta: float = 0.7, axis: int = -1,
        where: Mask = None) -> tuple[jax.Array, jax.Array]:
  r"""Early-learning regularisation (ELR): CE plus a pull towards early predictions.

  .. math::
    \tilde p = \mathrm{clip}(\mathrm{softmax}(z), \epsilon, 1 - \epsilon), \quad
    t_i \leftarrow \beta \, t_i + (1 - \beta) \, \mathrm{sg}\Big(\frac{\tilde p}
    {\sum_k \tilde p_k}\Big),

    L(z, y) = -\log p_y + \lambda \log\Big(1 - \sum_k t_{i,k} \tilde p_k\Big),

  with `i = indices[n]` the example's index in the training set, `eps = 1e-4`
  and `sg` the stop-gradient. The targets `t` are a running mean of the
  model's own predictions over epochs; while the model still fits the clean
  labels ("early learning") they are mostly correct, and the regulariser
  keeps later predictions close to them instead of memorising noisy labels.
  The table is updated first and the loss uses the updated rows, as in the
  authors' code. It gets no gradient.

  Rows are addressed by example index, not batch position, so the same
  example updates the same row whatever batch it comes in. Masked examples
  leave the table unchanged, even when their index (e.g. the 0 of a padded
  slot) equals that of an unmasked example. Unmasked indices should be
  distinct within a batch (with duplicates one of the updates wins).

  Args:
    logits: float `[..., num_classes]` (class axis at `axis`).
    labels: int `[...]` (the per-example shape), in `[0, num_classes)`.
    targets: `[N, C]` table from `elr_init` (or the previous call).
    indices: int `[...]` (the per-example shape): each example's row, in
      `[0, N)`.
    lam: lambda >= 0, the regulariser's weight (3 for CIFAR-10 in the paper).
    beta: momentum of the targets, in [0, 1) (0.7 for CIFAR-10).
    axis: the class axis.
    where: optional bool `[...]`; False examples give 0 loss and 0 gradient
      and do not update the table.

  Returns:
    `(loss, new_targets)`: float32 `[...]` per-example loss and the `[N, C]`
    table in the dtype of `targets`.

  Example:
    >>> targets = losses.elr_init(len(train), 10)
    >>> def objective(params, targets, x, y, idx):
    ...   loss, targets = losses.elr(model.apply(params, x), y, targets, idx)
    ...   return loss.mean(), targets
    >>> grads, targets = jax.grad(objective, has_aux=True)(params, targets, x, y, idx)

  References:
    Liu, Niles-Weed, Razavian & Fernandez-Granda, "Early-Learning
    Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020.
  """
  fn = "elr"
  lam = _check_range_scalar(lam, "lam", fn, 0.0, float("inf"), False, True,
                            "lam weighs the ELR term; the paper uses 3 on CIFAR-10.")
  beta = _check_range_scalar(beta, "beta", fn, 0.0, 1.0, False, True,
                             "beta is the targets' momentum; the paper uses 0.7.")
  axis, where = _check_inputs(logits, labels, axis, where, fn)
  num_classes = np.shape(logits)[axis]
  _check_targets(targets, num_classes, fn)
  _check_int_array(indices, np.shape(labels), "indices", fn)
  _check_range(indices, where, targets.shape[0], "indices", fn)
  return _elr(logits, labels, targets, indices, where, lam, beta, axis=axis)


@functools.partial(jax.jit, static_argnames=("axis",))
def _elr(logits, labels, targets, indices, where, lam, beta, *, axis):
  z, labels, mask = _examples(logits, labels, axis, where, "elr")
  num_classes = z.shape[-1]
  num_examples = targets.shape[0]
  log_p, p = _log_probs(z)
  ce = -_log_p_label(log_p, labels)
  p = jnp.clip(p, ELR_CLIP, 1.0 - ELR_CLIP).reshape(-1, num_classes)
  p_norm = lax.stop_gradient(p / jnp.sum(p, axis=-1, keepdims=True))

  flat_mask = None if mask is None else mask.reshape(-1)
  rows = indices.astype(jnp.int32).reshape(-1)
  # An index outside the table (only possible under jit) must not read a
  # clamped row or wrap around: it writes nothing and its loss is NaN, like an
  # out-of-range label.
  valid = (rows >= 0) & (rows < num_examples)
  keep = valid if flat_mask is None else valid & flat_mask
  rows = jnp.where(keep, rows, 0)
  table = lax.stop_gradient(targets).astype(jnp.float32)
  updated = beta * table[rows] + (1.0 - beta) * p_norm
  # A masked or invalid example writes out of bounds, where mode="drop"
  # discards it, so that it cannot overwrite the row of a real example.
  table = table.at[jnp.where(keep, rows, num_examples)].set(updated, mode="drop")

  agreement = jnp.sum(table[rows] * p, axis=-1).reshape(ce.shape)
  value = ce + lam * jnp.log1p(-agreement)
  value = jnp.where(valid.reshape(ce.shape), value, jnp.nan)
  return _common.apply_mask(value, mask), table.astype(targets.dtype)
