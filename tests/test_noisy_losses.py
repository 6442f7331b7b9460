"""Tests of the noisy-label losses (GCE, SCE, ELR): values, gradients, masks, state, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from dem_jax import losses

# --------------------------------------------------------------------------
# Plain references: NumPy in float64 for values, jnp for autodiff.
# --------------------------------------------------------------------------


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_p_label(z, y):
  return np.take_along_axis(np_softmax(z), np.asarray(y)[..., None], -1)[..., 0]


@jax.jit  # eager references would compile every primitive per shape
def ref_log_p_label(z, y):
  return jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1)[..., 0]


@jax.jit
def ref_gce(z, y, q=0.7):
  return (1.0 - jnp.exp(ref_log_p_label(z, y)) ** q) / q


@jax.jit
def ref_sce(z, y, alpha=0.1, beta=1.0, log_zero=-4.0):
  log_p_y = ref_log_p_label(z, y)
  return -alpha * log_p_y - beta * log_zero * (1.0 - jnp.exp(log_p_y))


def np_elr(z, y, targets, indices, lam=3.0, beta=0.7, mask=None):
  """ELR with a Python loop over the batch, as the authors' code reads."""
  targets = np.array(targets, np.float64)
  p = np.clip(np_softmax(z), 1e-4, 1 - 1e-4)
  keep = np.ones(len(y), bool) if mask is None else np.asarray(mask)
  for n, i in enumerate(indices):
    if keep[n]:
      targets[i] = beta * targets[i] + (1 - beta) * p[n] / p[n].sum()
  ce = -np.log(np_p_label(z, y))
  loss = ce + lam * np.log(1 - np.sum(targets[np.asarray(indices)] * p, -1))
  return np.where(keep, loss, 0.0), targets


@jax.jit
def ref_elr(z, y, targets, indices, lam=3.0, beta=0.7):
  """Autodiff reference: the ELR loss with the (already updated) table held fixed."""
  p = jnp.clip(jax.nn.softmax(z), 1e-4, 1 - 1e-4)
  p_norm = jax.lax.stop_gradient(p / p.sum(-1, keepdims=True))
  t = targets.at[indices].set(beta * targets[indices] + (1 - beta) * p_norm)
  return -ref_log_p_label(z, y) + lam * jnp.log(1 - jnp.sum(t[indices] * p, -1))


# Inputs drawn with NumPy: jax.random would compile a sampler per shape.
def logits(shape, seed=0, scale=3.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def labels(shape, num_classes, seed=0):
  return jnp.asarray(np.random.default_rng(seed + 100).integers(0, num_classes, shape), jnp.int32)


NUM_EXAMPLES = 20


def warm_table(num_classes=5, seed=7):
  """A table with rows that are already running means (non-zero), as after epochs."""
  t = np.random.default_rng(seed).dirichlet(np.ones(num_classes), NUM_EXAMPLES)
  return jnp.asarray(0.6 * t, jnp.float32)


# Every loss as `fn(z, y, **kw) -> per-example loss` (ELR on a warm table, batch
# position n is example 3n + 1 of the training set).
ALL = {
    "gce": lambda z, y, **k: losses.generalized_cross_entropy(z, y, q=0.7, **k),
    "sce": lambda z, y, **k: losses.symmetric_cross_entropy(z, y, alpha=0.1, beta=1.0, **k),
    "elr": lambda z, y, **k: losses.elr(
        z, y, warm_table(z.shape[k.get("axis", -1)]),
        (3 * jnp.arange(y.size) + 1).reshape(y.shape) % NUM_EXAMPLES, **k)[0],
}
REFS = {
    "gce": lambda z, y: ref_gce(z, y, 0.7),
    "sce": lambda z, y: ref_sce(z, y, 0.1, 1.0),
    "elr": lambda z, y: ref_elr(z, y, warm_table(z.shape[-1]), 3 * jnp.arange(len(y)) + 1),
}

# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


def test_gce_values_against_numpy():
  z, y = logits((6, 5)), labels((6,), 5)
  p_y = np_p_label(z, y)
  for q in (0.1, 0.5, 0.7, 1.0):
    chex.assert_trees_all_close(losses.generalized_cross_entropy(z, y, q=q),
                                (1 - p_y ** q) / q, atol=1e-5, rtol=1e-5)


def test_gce_limits_ce_at_small_q_and_mae_at_one():
  z, y = logits((8, 4), seed=1), labels((8,), 4, seed=1)
  ce = -np.log(np_p_label(z, y))
  chex.assert_trees_all_close(losses.generalized_cross_entropy(z, y, q=1e-4), ce,
                              rtol=2e-3, atol=1e-5,
                              custom_message="GCE must tend to CE as q -> 0")
  chex.assert_trees_all_close(losses.generalized_cross_entropy(z, y, q=1.0),
                              1 - np_p_label(z, y), atol=1e-6,
                              custom_message="GCE at q = 1 must be 1 - p_y")


def test_sce_values_against_numpy():
  z, y = logits((6, 5), seed=2), labels((6,), 5, seed=2)
  p_y = np_p_label(z, y)
  for alpha, beta, a in [(0.1, 1.0, -4.0), (0.01, 1.0, -4.0), (1.0, 0.5, np.log(1e-4)),
                         (0.0, 1.0, -4.0), (1.0, 0.0, -4.0)]:
    expected = alpha * -np.log(p_y) + beta * -a * (1 - p_y)
    got = losses.symmetric_cross_entropy(z, y, alpha=alpha, beta=beta, log_zero=a)
    chex.assert_trees_all_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sce_rce_is_minus_sum_p_log_onehot():
  """RCE written as the paper does: -sum_k p_k log q_k, with log 0 := A."""
  z, y = logits((5, 4), seed=3), labels((5,), 4, seed=3)
  p = np_softmax(z)
  log_q = np.where(np.eye(4)[np.asarray(y)] == 1, 0.0, -4.0)
  rce = -np.sum(p * log_q, -1)
  chex.assert_trees_all_close(losses.symmetric_cross_entropy(z, y, alpha=0.0, beta=1.0),
                              rce, atol=1e-5)


def test_elr_values_and_table_against_numpy_loop():
  num_classes = 5
  z, y = logits((6, num_classes), seed=4), labels((6,), num_classes, seed=4)
  indices = jnp.array([4, 0, 17, 9, 2, 11])
  table = warm_table(num_classes)
  loss, new = losses.elr(z, y, table, indices, lam=3.0, beta=0.7)
  loss_np, new_np = np_elr(z, y, table, indices, 3.0, 0.7)
  chex.assert_trees_all_close(loss, loss_np, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(new, new_np, atol=1e-6)
  untouched = np.setdiff1d(np.arange(NUM_EXAMPLES), np.asarray(indices))
  chex.assert_trees_all_equal(new[untouched], table[untouched])


def test_elr_first_step_from_zero_table():
  z = jnp.array([[2.0, 0.0, 0.0]])
  loss, new = losses.elr(z, jnp.array([0]), losses.elr_init(3, 3), jnp.array([2]),
                         lam=3.0, beta=0.7)
  p = np.clip(np_softmax(z)[0], 1e-4, 1 - 1e-4)
  t = 0.3 * p / p.sum()
  chex.assert_trees_all_close(new[2], t, atol=1e-6)
  chex.assert_trees_all_equal(new[:2], jnp.zeros((2, 3)))
  chex.assert_trees_all_close(loss[0], -np.log(np_softmax(z)[0, 0]) + 3 * np.log(1 - t @ p),
                              atol=1e-5)


def test_elr_table_is_indexed_by_example_not_batch_position():
  num_classes = 4
  z, y = logits((6, num_classes), seed=5), labels((6,), num_classes, seed=5)
  indices = jnp.array([10, 3, 7, 0, 19, 12])
  table = warm_table(num_classes)
  loss, new = losses.elr(z, y, table, indices)
  perm = jnp.array([3, 5, 0, 2, 4, 1])
  loss_p, new_p = losses.elr(z[perm], y[perm], table, indices[perm])
  chex.assert_trees_all_close(new_p, new, atol=1e-7,
                              custom_message="another batch order must give the same table")
  chex.assert_trees_all_close(loss_p, loss[perm], atol=1e-6)
  # The same examples in two batches of three give the table of one batch of six.
  _, half = losses.elr(z[:3], y[:3], table, indices[:3])
  _, both = losses.elr(z[3:], y[3:], half, indices[3:])
  chex.assert_trees_all_close(both, new, atol=1e-7)


def test_elr_masked_examples_leave_their_rows_and_others_unchanged():
  num_classes = 4
  z, y = logits((5, num_classes), seed=6), labels((5,), num_classes, seed=6)
  table = warm_table(num_classes)
  # Slot 3 is padding with index 0 (as `padded_batches` writes it), the index of
  # the real example in slot 0; slot 4 is padding with a -1 index and label.
  indices = jnp.array([0, 5, 8, 0, -1])
  y = y.at[4].set(-1)
  mask = jnp.array([True, True, True, False, False])
  z_garbage = z.at[3].set(jnp.nan).at[4].set(jnp.inf)
  loss, new = losses.elr(z_garbage, y, table, indices, where=mask)
  loss_sub, new_sub = losses.elr(z[:3], y[:3], table, indices[:3])
  chex.assert_trees_all_close(new, new_sub, atol=0.0,
                              custom_message="masked slots must not write the table")
  chex.assert_trees_all_close(loss[:3], loss_sub, atol=1e-6)
  chex.assert_trees_all_equal(loss[3:], jnp.zeros(2))
  _, nothing = losses.elr(z, y.at[4].set(0), table, indices.at[4].set(1),
                          where=jnp.zeros(5, bool))
  chex.assert_trees_all_equal(nothing, table)


def test_elr_table_dtype_and_no_gradient_into_table():
  z, y = logits((3, 4), seed=8), labels((3,), 4, seed=8)
  table = warm_table(4).astype(jnp.bfloat16)
  _, new = losses.elr(z, y, table, jnp.array([1, 2, 3]))
  assert new.dtype == jnp.bfloat16
  g = jax.grad(lambda t: losses.elr(z, y, t, jnp.array([1, 2, 3]))[0].sum())(warm_table(4))
  chex.assert_trees_all_equal(g, jnp.zeros_like(g))


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_gradient_equals_autodiff_of_plain_reference(name):
  z, y = logits((5, 6), seed=9), labels((5,), 6, seed=9)
  chex.assert_trees_all_close(ALL[name](z, y), REFS[name](z, y), atol=1e-5, rtol=1e-5)
  weights = jnp.arange(1.0, 6.0)  # a non-uniform cotangent
  g = jax.grad(lambda z: jnp.sum(weights * ALL[name](z, y)))(z)
  g_ref = jax.grad(lambda z: jnp.sum(weights * REFS[name](z, y)))(z)
  assert bool(jnp.all(jnp.isfinite(g)))
  chex.assert_trees_all_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_gce_gradient_closed_form():
  z, y = logits((4, 5), seed=10), labels((4,), 5, seed=10)
  q = 0.7
  g = jax.grad(lambda z: losses.generalized_cross_entropy(z, y, q=q).sum())(z)
  p = np_softmax(z)
  onehot = np.eye(5)[np.asarray(y)]
  expected = -(np_p_label(z, y) ** q)[:, None] * (onehot - p)
  chex.assert_trees_all_close(g, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["gce", "sce"])  # ELR's stop-gradient is not a derivative
def test_check_grads_both_modes(name):
  z, y = logits((3, 4), seed=11, scale=1.0), labels((3,), 4, seed=11)
  check_grads(lambda z: ALL[name](z, y), (z,), order=1, modes=["fwd", "rev"],
              atol=2e-2, rtol=2e-2, eps=1e-2)


def test_hyperparameter_gradient_and_vmap_over_q():
  z, y = logits((4, 5), seed=12), labels((4,), 5, seed=12)
  g = jax.grad(lambda q: losses.generalized_cross_entropy(z, y, q=q).sum())(0.5)
  g_ref = jax.grad(lambda q: ref_gce(z, y, q).sum())(0.5)
  chex.assert_trees_all_close(g, g_ref, atol=1e-4)
  qs = jnp.array([0.1, 0.5, 1.0])
  grid = jax.vmap(lambda q: losses.generalized_cross_entropy(z, y, q=q))(qs)
  chex.assert_trees_all_close(grid, jnp.stack([ref_gce(z, y, q) for q in qs]), atol=1e-5)


@pytest.mark.parametrize("name", ["gce", "sce"])
def test_huge_and_masked_class_logits_stay_finite(name):
  z = jnp.array([[1e4, 0.0, -1e4, 5.0], [3.0, -jnp.inf, 1.0, -jnp.inf]])
  y = jnp.array([1, 2])
  v = ALL[name](z, y)
  g = jax.grad(lambda z: ALL[name](z, y).sum())(z)
  assert bool(jnp.all(jnp.isfinite(v))) and bool(jnp.all(jnp.isfinite(g))), (v, g)
  assert float(jnp.abs(g[1, 1]) + jnp.abs(g[1, 3])) == 0.0
  chex.assert_trees_all_close(ALL[name](z[1:, jnp.array([0, 2])], jnp.array([1]))[0], v[1],
                              atol=1e-6, custom_message="-inf classes must act as absent")


# --------------------------------------------------------------------------
# Masks, dtypes, shapes, transformations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL))
def test_masked_result_equals_subset_and_all_masked_is_zero(name):
  z, y = logits((6, 5), seed=13), labels((6,), 5, seed=13)
  mask = np.array([True, False, True, True, False, True])
  z_garbage = z.at[1].set(jnp.nan).at[4].set(jnp.inf)
  y_garbage = y.at[1].set(-1).at[4].set(99)  # padding labels are never looked at
  if name == "elr":  # the subset must keep each example's own index
    idx = (3 * jnp.arange(6) + 1) % NUM_EXAMPLES
    fn = lambda z, y, where=None: losses.elr(z, y, warm_table(5), idx, where=where)[0]
    sub = losses.elr(z[mask], y[mask], warm_table(5), idx[mask])[0]
  else:
    fn = ALL[name]
    sub = fn(z[mask], y[mask])
  v = fn(z_garbage, y_garbage, where=jnp.asarray(mask))
  chex.assert_trees_all_close(v[mask], sub, atol=1e-6,
                              custom_message=f"{name}: masked result != result on the subset")
  chex.assert_trees_all_equal(v[~mask], jnp.zeros(2))
  g = jax.grad(lambda z: fn(z, y_garbage, where=jnp.asarray(mask)).sum())(z_garbage)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[~mask]).sum()) == 0.0
  none = jnp.zeros(6, bool)
  chex.assert_trees_all_equal(fn(z, y, where=none), jnp.zeros(6))
  chex.assert_trees_all_equal(jax.grad(lambda z: fn(z, y, where=none).sum())(z),
                              jnp.zeros_like(z))


@pytest.mark.parametrize("name", list(ALL))
def test_bfloat16_inputs(name):
  dtype = jnp.bfloat16
  z, y = logits((4, 5), seed=14), labels((4,), 5, seed=14)
  v = ALL[name](z.astype(dtype), y)
  g = jax.grad(lambda z: ALL[name](z, y).sum())(z.astype(dtype))
  assert v.dtype == jnp.float32, f"{name} must compute in float32, got {v.dtype}"
  assert g.dtype == dtype, f"{name} gradient must come back in the input dtype {dtype}"
  v32 = ALL[name](z.astype(dtype).astype(jnp.float32), y)
  chex.assert_trees_all_close(v, v32, atol=1e-6)
  g32 = jax.grad(lambda z: ALL[name](z, y).sum())(z.astype(dtype).astype(jnp.float32))
  chex.assert_trees_all_close(g.astype(jnp.float32), g32, atol=2e-2, rtol=2e-2)


def test_any_integer_label_dtype():
  z = logits((6, 5), seed=15)
  y = np.array([0, 3, 1, 4, 2, 0])
  expected = ref_gce(z, jnp.asarray(y, jnp.int32))
  for dtype in (np.uint8, np.int64):  # NumPy labels of any integer width
    chex.assert_trees_all_close(losses.generalized_cross_entropy(z, y.astype(dtype)),
                                expected, atol=1e-6)


@pytest.mark.parametrize("name", list(ALL))
def test_pixelwise_shapes_and_other_axis(name):
  z, y = logits((2, 3, 4, 5), seed=16), labels((2, 3, 4), 5, seed=16)
  v = ALL[name](z, y)
  chex.assert_shape(v, (2, 3, 4))
  v1 = ALL[name](jnp.moveaxis(z, -1, 1), y, axis=1)
  chex.assert_trees_all_close(v1, v, atol=1e-6,
                              custom_message=f"{name}: axis=1 must equal moveaxis then default")
  g = jax.grad(lambda z: ALL[name](z, y, axis=1).sum())(jnp.moveaxis(z, -1, 1))
  chex.assert_shape(g, (2, 5, 3, 4))


@pytest.mark.parametrize("name", list(ALL))
def test_jit_equals_eager(name):
  z, y = logits((6, 5), seed=17), labels((6,), 5, seed=17)
  mask = jnp.array([True, True, False, True, True, True])
  chex.assert_trees_all_close(jax.jit(ALL[name])(z, y), ALL[name](z, y), atol=1e-6)
  chex.assert_trees_all_close(jax.jit(lambda z, y, m: ALL[name](z, y, where=m))(z, y, mask),
                              ALL[name](z, y, where=mask), atol=1e-6)


def test_elr_jit_state_and_no_recompilation():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(z, y, table, idx, lam, beta):
    loss, table = losses.elr(z, y, table, idx, lam=lam, beta=beta)
    return loss, table
  table = losses.elr_init(NUM_EXAMPLES, 5)
  eager = table
  for i in range(3):
    z, y = logits((4, 5), seed=i), labels((4,), 5, seed=i)
    idx = jnp.arange(4) + 4 * i
    loss, table = step(z, y, table, idx, 3.0 - i, 0.7 + 0.1 * i)
    loss_e, eager = losses.elr(z, y, eager, idx, lam=3.0 - i, beta=0.7 + 0.1 * i)
    chex.assert_trees_all_close(loss, loss_e, atol=1e-6)
  chex.assert_trees_all_close(table, eager, atol=1e-7)


def test_out_of_range_label_under_jit_is_nan_not_silent():
  z = logits((2, 3))
  v = jax.jit(losses.generalized_cross_entropy)(z, jnp.array([0, 3]))
  assert bool(jnp.isfinite(v[0])) and bool(jnp.isnan(v[1]))


def test_elr_out_of_range_index_under_jit_is_nan_and_writes_nothing():
  z, y = logits((3, 3)), jnp.array([0, 1, 2])
  table = jnp.full((4, 3), 0.25)
  for bad in (7, -1):  # past the end (was: read clamped to row 3), negative (was: wrapped)
    idx = jnp.array([0, bad, 2])
    v, new = jax.jit(losses.elr)(z, y, table, idx)
    assert bool(jnp.isnan(v[1])) and bool(jnp.all(jnp.isfinite(v[jnp.array([0, 2])]))), \
        f"index {bad}: loss {v}"
    np.testing.assert_array_equal(new[jnp.array([1, 3])], table[jnp.array([1, 3])],
                                  err_msg=f"index {bad} wrote into the table")
    v_ok, _ = losses.elr(z[jnp.array([0, 2])], y[jnp.array([0, 2])], table, idx[jnp.array([0, 2])])
    chex.assert_trees_all_close(v[jnp.array([0, 2])], v_ok, atol=1e-6)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

Z, Y = jnp.zeros((2, 3)), jnp.array([0, 1])
T, I = losses.elr_init(4, 3), jnp.array([0, 1])


@pytest.mark.parametrize("call,error,match", [
    (lambda: losses.generalized_cross_entropy(Z, Y.astype(jnp.float32)), TypeError, "integers"),
    (lambda: losses.generalized_cross_entropy(Z, jnp.eye(3)[Y]), TypeError, "integers"),
    (lambda: losses.generalized_cross_entropy(Z, [0, 1]), TypeError, "array"),
    (lambda: losses.generalized_cross_entropy(Z, jnp.array([0, 1, 2])), ValueError, r"\(2,\)"),
    (lambda: losses.symmetric_cross_entropy(Z, Y[:, None]), ValueError, "per-example shape"),
    (lambda: losses.generalized_cross_entropy(Z, jnp.array([0, 3])), ValueError, r"\[0, 3\)"),
    (lambda: losses.symmetric_cross_entropy(Z, jnp.array([-1, 0])), ValueError, r"\[0, 3\)"),
    (lambda: losses.generalized_cross_entropy(Z, Y, q=0.0), ValueError, r"q must be in \(0, 1\]"),
    (lambda: losses.generalized_cross_entropy(Z, Y, q=1.5), ValueError, r"q must be in \(0, 1\]"),
    (lambda: losses.generalized_cross_entropy(Z, Y, q=jnp.ones(2)), ValueError, "scalar"),
    (lambda: losses.symmetric_cross_entropy(Z, Y, alpha=-0.1), ValueError, "alpha"),
    (lambda: losses.symmetric_cross_entropy(Z, Y, beta=-1.0), ValueError, "beta"),
    (lambda: losses.symmetric_cross_entropy(Z, Y, log_zero=0.0), ValueError, "log_zero"),
    (lambda: losses.symmetric_cross_entropy(Z.astype(jnp.int32), Y), TypeError, "floating"),
    (lambda: losses.generalized_cross_entropy(Z, Y, where=jnp.ones(3, bool)), ValueError, "shape"),
    (lambda: losses.elr(Z, Y, T, I, lam=-1.0), ValueError, "lam"),
    (lambda: losses.elr(Z, Y, T, I, beta=1.0), ValueError, r"beta must be in \[0, 1\)"),
    (lambda: losses.elr(Z, Y, losses.elr_init(4, 5), I), ValueError, r"\(N, C\)"),
    (lambda: losses.elr(Z, Y, jnp.zeros(4), I), ValueError, r"\(N, C\)"),
    (lambda: losses.elr(Z, Y, T.astype(jnp.int32), I), TypeError, "floating"),
    (lambda: losses.elr(Z, Y, T, I.astype(jnp.float32)), TypeError, "indices"),
    (lambda: losses.elr(Z, Y, T, jnp.array([0, 1, 2])), ValueError, "indices"),
    (lambda: losses.elr(Z, Y, T, jnp.array([0, 4])), ValueError, r"indices must be in \[0, 4\)"),
    (lambda: losses.elr_init(0, 3), ValueError, ">= 1"),
    (lambda: losses.elr_init(4, 1), ValueError, ">= 2"),
    (lambda: losses.elr_init(4.0, 3), ValueError, "int"),
])
def test_bad_input_raises_documented_error(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_bad_input_raises_before_tracing_under_jit():
  with pytest.raises(TypeError, match="integers"):
    jax.jit(losses.generalized_cross_entropy)(Z, Y.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"\(N, C\)"):
    jax.jit(losses.elr)(Z, Y, losses.elr_init(4, 5), I)
