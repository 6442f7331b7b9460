"""Tests of dem_jax.losses on one device: values, closed-form gradients, masks, errors."""

import contextlib
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from dem_jax import losses

# --------------------------------------------------------------------------
# Plain references, written with autodiff in mind (no custom_vjp).
# --------------------------------------------------------------------------


def ref_entropy(z):
  return -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), axis=-1)


def ref_cadf(z, tau=1.0):
  return -jnp.sum(jax.nn.softmax(z / tau) * z, axis=-1)


def ref_gmc(z, alpha=1.0):
  return alpha * jax.nn.logsumexp(z, axis=-1)


def ref_dem(z, tau=1.0, alpha=1.0):
  return ref_cadf(z, tau) + ref_gmc(z, alpha)


def ref_mec_update(mec, probs, pseudo, momentum, mask=None):
  """The MEC update with a Python loop over classes, as Algorithm 1 reads."""
  mec = np.array(mec, np.float64)
  probs = np.asarray(probs, np.float64)
  pseudo = np.asarray(pseudo)
  keep = np.ones(len(pseudo), bool) if mask is None else np.asarray(mask)
  for k in range(mec.shape[0]):
    sel = (pseudo == k) & keep
    if sel.any():
      mec[k] = (1 - momentum) * mec[k] + momentum * probs[sel].mean(axis=0)
  return mec


def ref_delta(z, norm="l1", delta_from="cadf"):
  p = jax.nn.softmax(z)
  ez = jnp.sum(p * z, axis=-1, keepdims=True)
  r = p * (z - ez + 1.0) if delta_from == "cadf" else p * (z - ez)
  if norm is None:
    return jnp.ones(z.shape[:-1])
  d = {"l1": jnp.sum(jnp.abs(r), -1), "l2": jnp.sqrt(jnp.sum(r * r, -1)),
       "linf": jnp.max(jnp.abs(r), -1)}[norm]
  return jnp.maximum(d, 1e-6)


def surrogate(z, mec, norm, calibrator, delta_from):
  """Algorithm 1's stop-gradient surrogate, summed: -sum((p - sg(m)) / sg(delta) z)."""
  p = jax.nn.softmax(z)
  if calibrator == "gmc":
    m = lax.stop_gradient(p)
  else:
    m = lax.stop_gradient(mec[jnp.argmax(z, -1)])
  delta = lax.stop_gradient(ref_delta(z, norm, delta_from))
  return -jnp.sum(jnp.sum((p - m) * z, axis=-1) / delta)


def logits(shape, seed=0, scale=3.0):
  return scale * jax.random.normal(jax.random.key(seed), shape)


MODES = {  # the paper's four AdaDEM modes
    "AdaDEM": dict(norm="l1", calibrator="mec", delta_from="cadf"),
    "AdaDEM-Norm": dict(norm="l1", calibrator="gmc", delta_from="cadf"),
    "AdaDEM-MEC": dict(norm=None, calibrator="mec", delta_from="cadf"),
    "AdaDEM-V": dict(norm="l1", calibrator="mec", delta_from="entropy"),
}

TAU_ALPHA = [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8), (2.0, 0.0), (0.3, 2.0)]

# --------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------


def test_entropy_is_cadf_plus_gmc():
  z = logits((6, 5))
  chex.assert_trees_all_close(
      losses.entropy(z), losses.cadf(z) + losses.gmc(z), atol=1e-5,
      custom_message="H = T + Q must hold: the decoupling is exact")
  chex.assert_trees_all_close(losses.entropy(z), ref_entropy(z), atol=1e-5)


def test_dem_at_one_one_is_entropy_in_value_and_gradient():
  z = logits((6, 5), seed=1)
  chex.assert_trees_all_close(losses.dem(z, 1.0, 1.0), losses.entropy(z), atol=1e-6,
                              custom_message="dem(z, tau=1, alpha=1) must be EM")
  g_dem = jax.grad(lambda z: losses.dem(z, 1.0, 1.0).sum())(z)
  g_em = jax.grad(lambda z: losses.entropy(z).sum())(z)
  chex.assert_trees_all_close(g_dem, g_em, atol=1e-6)


@pytest.mark.parametrize("name,fn,ref", [
    ("entropy", lambda z, t, a: losses.entropy(z), lambda z, t, a: ref_entropy(z)),
    ("cadf", lambda z, t, a: losses.cadf(z, t), lambda z, t, a: ref_cadf(z, t)),
    ("gmc", lambda z, t, a: losses.gmc(z, a), lambda z, t, a: ref_gmc(z, a)),
    ("dem", losses.dem, ref_dem),
])
@pytest.mark.parametrize("tau,alpha", TAU_ALPHA)
def test_closed_form_gradient_equals_autodiff_of_reference(name, fn, ref, tau, alpha):
  z = logits((4, 6), seed=2)
  chex.assert_trees_all_close(fn(z, tau, alpha), ref(z, tau, alpha), atol=1e-5,
                              custom_message=f"{name} value differs from the plain formula")
  weights = jnp.arange(1.0, 5.0)  # a non-uniform cotangent
  g = jax.grad(lambda z: jnp.sum(weights * fn(z, tau, alpha)))(z)
  g_ref = jax.grad(lambda z: jnp.sum(weights * ref(z, tau, alpha)))(z)
  chex.assert_trees_all_close(
      g, g_ref, atol=1e-5,
      custom_message=f"{name} closed-form gradient differs from autodiff at tau={tau}, alpha={alpha}")


@pytest.mark.parametrize("tau,alpha", TAU_ALPHA)
def test_check_grads_reverse_mode(tau, alpha):
  z = logits((3, 4), seed=3, scale=1.0).astype(jnp.float64) if jax.config.jax_enable_x64 \
      else logits((3, 4), seed=3, scale=1.0)
  kw = dict(order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)
  check_grads(lambda z: losses.entropy(z), (z,), **kw)
  check_grads(lambda z: losses.cadf(z, tau), (z,), **kw)
  check_grads(lambda z: losses.gmc(z, alpha), (z,), **kw)
  check_grads(lambda z: losses.dem(z, tau, alpha), (z,), **kw)


def test_hyperparameter_gradients_are_true_ones():
  z = logits((4, 5), seed=4)
  g = jax.grad(lambda t, a: losses.dem(z, t, a).sum(), argnums=(0, 1))(1.3, 0.8)
  g_ref = jax.grad(lambda t, a: ref_dem(z, t, a).sum(), argnums=(0, 1))(1.3, 0.8)
  chex.assert_trees_all_close(g, g_ref, atol=1e-4,
                              custom_message="d dem / d(tau, alpha) must be exact")


@pytest.mark.parametrize("name", ["entropy", "cadf", "gmc", "dem", "adadem"])
@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_raises_clear_type_error(name, transform):
  fn = ALL[name]
  z = jnp.zeros((2, 3))
  with pytest.raises(TypeError, match="forward-mode|jvp"):
    if transform == "jvp":
      jax.jvp(fn, (z,), (jnp.ones_like(z),))
    else:
      jax.jacfwd(fn)(z)


@pytest.mark.parametrize("name,fn,ref", [
    ("entropy", lambda z: losses.entropy(z), ref_entropy),
    ("cadf", lambda z: losses.cadf(z, 1.3), lambda z: ref_cadf(z, 1.3)),
    ("gmc", lambda z: losses.gmc(z, 0.8), lambda z: ref_gmc(z, 0.8)),
    ("dem", lambda z: losses.dem(z, 1.3, 0.8), lambda z: ref_dem(z, 1.3, 0.8)),
])
def test_hessian_of_closed_form_losses_is_the_true_one(name, fn, ref):
  # jax.hessian is forward over reverse: it differentiates the closed-form
  # backward pass, which must then give the Hessian of the plain formula.
  z = logits((2, 4), seed=9, scale=1.0)
  h = jax.hessian(lambda z: jnp.sum(fn(z)))(z)
  h_ref = jax.hessian(lambda z: jnp.sum(ref(z)))(z)
  chex.assert_trees_all_close(h, h_ref, atol=1e-5,
                              custom_message=f"jax.hessian of {name} differs from autodiff's")


@pytest.mark.parametrize("mode", list(MODES))
def test_adadem_second_derivatives_raise_instead_of_silent_zeros(mode):
  # AdaDEM's gradient holds delta and the MEC row constant: it is not the
  # gradient of a function, so its Hessian does not exist. Before the guard
  # jax.hessian returned zeros without a word.
  z, mec = logits((2, 4), seed=9), losses.mec_init(4)
  with pytest.raises(TypeError, match="second derivatives"):
    jax.hessian(lambda z: jnp.sum(losses.adadem(z, mec, **MODES[mode])[0]))(z)


def test_adadem_norm_runs_without_a_mec_state():
  z = logits((6, 5), seed=10)
  opts = MODES["AdaDEM-Norm"]
  loss, state = losses.adadem(z, None, **opts)
  assert state is None, "AdaDEM-Norm with mec=None must hand back None"
  chex.assert_trees_all_close(loss, losses.adadem(z, losses.mec_init(5), **opts)[0],
                              custom_message="AdaDEM-Norm must not depend on the MEC state")
  g = jax.grad(lambda z: jnp.sum(losses.adadem(z, None, **opts)[0]))(z)
  g_ref = jax.grad(surrogate)(z, None, opts["norm"], opts["calibrator"], opts["delta_from"])
  chex.assert_trees_all_close(g, g_ref, atol=1e-5)


def _distinct_adadem_options():
  """Every mode with every norm, each distinct option set once (`norm=None` makes
  AdaDEM, AdaDEM-MEC and AdaDEM-V the same loss: delta = 1)."""
  cases = {}
  for mode, opts in MODES.items():
    for norm in ("l1", "l2", "linf", None):
      o = dict(opts, norm=None if mode == "AdaDEM-MEC" else norm)
      key = (o["norm"], o["calibrator"], o["delta_from"] if o["norm"] else None)
      label = "AdaDEM-MEC" if key == (None, "mec", None) else mode
      cases.setdefault(key, (label, o["norm"]))
  return sorted(cases.values(), key=str)


@pytest.mark.parametrize("mode,norm", _distinct_adadem_options())
def test_adadem_gradient_equals_stop_gradient_surrogate(mode, norm):
  opts = dict(MODES[mode], norm=norm)
  z = logits((8, 5), seed=5)
  mec0 = losses.mec_init(5)
  loss, new_mec = losses.adadem(z, mec0, **opts)
  g = jax.grad(lambda z: losses.adadem(z, mec0, **opts)[0].sum())(z)
  g_ref = jax.grad(surrogate)(z, new_mec, opts["norm"], opts["calibrator"], opts["delta_from"])
  chex.assert_trees_all_close(
      g, g_ref, atol=1e-5, rtol=1e-4,  # AdaDEM-V's small delta gives gradients ~25
      custom_message=f"{mode} (norm={opts['norm']}) gradient differs from Algorithm 1's surrogate")
  # the value is (T + c) / delta with c = m.z (MEC) or logsumexp(z) (GMC)
  p = jax.nn.softmax(z)
  c = (jax.nn.logsumexp(z, -1) if opts["calibrator"] == "gmc"
       else jnp.sum(new_mec[jnp.argmax(z, -1)] * z, -1))
  expected = (-jnp.sum(p * z, -1) + c) / ref_delta(z, opts["norm"], opts["delta_from"])
  chex.assert_trees_all_close(loss, expected, atol=1e-4, rtol=1e-4)
  if opts["calibrator"] == "gmc":
    assert new_mec is mec0, "AdaDEM-Norm must pass the MEC state through unchanged"


def test_rewards_are_minus_gradients():
  z = logits((3, 4), seed=6)
  mec = losses.mec_init(4).at[0].set(jnp.array([0.7, 0.1, 0.1, 0.1]))
  r = losses.rewards(z, tau=1.3, alpha=0.8, mec=mec)
  grad = lambda f: -jax.grad(lambda z: f(z).sum())(z)
  chex.assert_trees_all_close(r["em"], grad(ref_entropy), atol=1e-5)
  chex.assert_trees_all_close(r["cadf"], grad(ref_cadf), atol=1e-5)
  chex.assert_trees_all_close(r["gmc"], grad(ref_gmc), atol=1e-5)
  chex.assert_trees_all_close(r["dem"], grad(lambda z: ref_dem(z, 1.3, 0.8)), atol=1e-5)
  chex.assert_trees_all_close(
      r["adadem"], -jax.grad(surrogate)(z, mec, "l1", "mec", "cadf"), atol=1e-5)
  chex.assert_trees_all_close(r["delta"], ref_delta(z), atol=1e-5)
  chex.assert_shape(r["delta"], (3,))


def test_reward_collapse_and_adadem_fix():
  """As p becomes one-hot EM's reward vanishes, CADF's tends to 1, AdaDEM's does not vanish."""
  z = jnp.array([[12.0, 0.0, 0.0, 0.0]])
  r = losses.rewards(z)
  assert abs(float(r["em"][0, 0])) < 1e-3, "EM reward must collapse on confident examples"
  assert float(r["cadf"][0, 0]) > 0.99, "CADF reward must tend to 1 on the top class"
  assert float(r["adadem"][0, 0]) > 0.5, "AdaDEM keeps rewarding confident examples"


# --------------------------------------------------------------------------
# MEC
# --------------------------------------------------------------------------


def test_mec_update_matches_loop_reference_and_keeps_absent_rows():
  z = logits((12, 6), seed=7)
  z = z.at[:, 5].set(-10.0)  # class 5 is never predicted
  mask = jnp.arange(12) % 3 != 0
  mec0 = losses.mec_init(6).at[5].set(jnp.linspace(0.0, 1.0, 6) / 3.0)
  _, new = losses.adadem(z, mec0, momentum=0.3, where=mask)
  expected = ref_mec_update(mec0, jax.nn.softmax(z), jnp.argmax(z, -1), 0.3, mask)
  chex.assert_trees_all_close(new, expected, atol=1e-6,
                              custom_message="MEC differs from the loop-over-classes reference")
  chex.assert_trees_all_equal(new[5], mec0[5], custom_message="absent class row must stay")
  # masked examples take no part: same as the update on the subset
  _, sub = losses.adadem(z[np.asarray(mask)], mec0, momentum=0.3)
  chex.assert_trees_all_close(new, sub, atol=1e-6)


def test_delta_at_least_one():
  z = jnp.concatenate([logits((64, 7), seed=8, scale=s) for s in (0.01, 1.0, 30.0)])
  delta = losses.rewards(z)["delta"]
  assert float(delta.min()) >= 1.0 - 1e-5, f"L1 delta must be >= 1, got {float(delta.min())}"


def test_shift_invariance_of_every_gradient():
  z = logits((5, 4), seed=9)
  shift = jnp.arange(5.0)[:, None] * 7.0
  fns = {
      "entropy": lambda z: losses.entropy(z), "cadf": lambda z: losses.cadf(z, 0.7),
      "dem": lambda z: losses.dem(z, 1.3, 0.8),
      **{m: (lambda o: lambda z: losses.adadem(z, losses.mec_init(4), **o)[0])(o)
         for m, o in MODES.items()},
  }
  for name, f in fns.items():
    g = jax.grad(lambda z: f(z).sum())(z)
    g_shift = jax.grad(lambda z: f(z).sum())(z + shift)
    chex.assert_trees_all_close(g, g_shift, atol=1e-4,
                                custom_message=f"{name} gradient must not change when logits shift")
    if name not in ("cadf", "dem"):  # their gradients sum to -1 and alpha - 1
      chex.assert_trees_all_close(g.sum(-1), jnp.zeros(5), atol=1e-5,
                                  custom_message=f"{name} gradient must sum to 0 over classes")


def test_entropy_bounds():
  for s in (0.0, 1.0, 100.0):
    h = losses.entropy(logits((32, 9), scale=s) if s else jnp.zeros((32, 9)))
    assert float(h.min()) >= -1e-6 and float(h.max()) <= np.log(9) + 1e-5, (s, h)


# --------------------------------------------------------------------------
# Numerics, shapes, masks, transformations
# --------------------------------------------------------------------------

ALL = {
    "entropy": lambda z, **k: losses.entropy(z, **k),
    "cadf": lambda z, **k: losses.cadf(z, 0.5, **k),
    "gmc": lambda z, **k: losses.gmc(z, 0.8, **k),
    "dem": lambda z, **k: losses.dem(z, 1.3, 0.8, **k),
    "adadem": lambda z, **k: losses.adadem(z, losses.mec_init(z.shape[k.get("axis", -1)]), **k)[0],
}


@pytest.mark.parametrize("name", list(ALL))
def test_huge_and_masked_class_logits_stay_finite(name):
  z = jnp.array([[1e4, 0.0, -1e4, 5.0], [3.0, -jnp.inf, 1.0, -jnp.inf], [-1e4, 1e4, 1e4, 0.0]])
  v = ALL[name](z)
  g = jax.grad(lambda z: ALL[name](z).sum())(z)
  assert bool(jnp.all(jnp.isfinite(v))), f"{name} value not finite: {v}"
  assert bool(jnp.all(jnp.isfinite(g))), f"{name} gradient not finite: {g}"
  assert float(jnp.abs(g[1, 1]) + jnp.abs(g[1, 3])) == 0.0, f"{name}: masked class got gradient"
  if name != "adadem":  # AdaDEM's MEC rows start at 1/C, so C itself matters
    chex.assert_trees_all_close(ALL[name](z[1:2, jnp.array([0, 2])])[0], v[1], atol=1e-5,
                                custom_message=f"{name}: -inf classes must act as absent")


def test_pseudo_label_is_first_argmax_with_ties_masks_and_huge_logits():
  # AdaDEM's pseudo-label must agree with jnp.argmax, ties going to the first
  # index, for the logits and for shift's zc alike.
  from dem_jax.losses import _common
  z = jnp.array([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0], [-jnp.inf, 2.0, -jnp.inf],
                 [-jnp.inf] * 3, [1e4, -1e4, 1e4 - 1e-3], [-5.0, -5.0, -4.9]])
  z = jnp.concatenate([z, jax.random.normal(jax.random.key(0), (50, 3)) * 4])
  for got in (_common.first_argmax(z), _common.first_argmax(_common.shift(z)[0])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(z, axis=-1)),
                                  err_msg="first_argmax must equal jnp.argmax (first index on ties)")


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pure-jax"])
def test_pseudo_label_is_argmax_of_logits_made_in_the_same_jit(kernels):
  """AdaDEM's pseudo-label is jnp.argmax of the logits (the first on ties),
  also when the logits are computed inside the jitted function, as a model's
  are. XLA may then compute them in more than one fusion, and differently:
  it once turned `z / 3 - max` into a fused multiply-add, and a label trick
  that needed `z - max` to be exactly 0 at the maximum gave every example of
  the pure-JAX path a wrong label. With momentum 1 each new MEC row is the
  mean prediction of the examples labelled with its class."""
  from dem_jax.losses import _kernels
  z = jnp.array([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0], [-jnp.inf, 2.0, -jnp.inf],
                 [1e4, -1e4, 1e4 - 1e-3], [-5.0, -5.0, -4.9]])
  z = jnp.pad(z, ((0, 0), (0, 30)), constant_values=-jnp.inf)   # C = 33
  z = jnp.concatenate([z, 4.0 * jax.random.normal(jax.random.key(0), (40, 33))])
  mec = losses.mec_init(33)
  with contextlib.nullcontext() if kernels else _kernels.disabled():
    new_mec = jax.jit(lambda z: losses.adadem(z / 3.0, mec, momentum=1.0)[1])(z)
  logits = np.asarray(z / 3.0)
  want = ref_mec_update(mec, jax.nn.softmax(logits), np.argmax(logits, -1), 1.0)
  np.testing.assert_allclose(
      np.asarray(new_mec), want, atol=5e-5,   # a wrong label moves a row by > 1e-2
      err_msg="the MEC rows updated are not those of the examples' argmax classes")


def test_adadem_mec_row_is_renormalised_over_live_classes():
  # With class 1 masked in one example, its MEC row is renormalised over the
  # live classes: the gradient equals the surrogate's with that row.
  mec = jnp.array([[0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
  z = jnp.array([[2.0, -jnp.inf, 0.5], [0.1, 1.5, -0.3]])
  g = jax.grad(lambda z: losses.adadem(z, mec, momentum=1e-6)[0].sum())(z)
  new_mec = losses.adadem(z, mec, momentum=1e-6)[1]
  for i, live in ((0, np.array([1.0, 0.0, 1.0])), (1, np.ones(3))):
    zi = np.where(live > 0, np.asarray(z[i]), -np.inf)
    p = np.exp(zi - zi.max()) / np.exp(zi - zi.max()).sum()
    zc = np.where(live > 0, zi - zi.max(), 0.0)
    reward = p * (zc - (p * zc).sum() + 1.0)
    m = np.asarray(new_mec[int(np.argmax(zi))]) * live
    m = m / m.sum()
    want = (m - reward) / np.abs(reward).sum()
    np.testing.assert_allclose(np.asarray(g[i]), want, atol=1e-6,
                               err_msg=f"example {i}: AdaDEM gradient with a masked class")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", list(ALL))
def test_low_precision_inputs(name, dtype):
  z = logits((4, 5), seed=10)
  v = ALL[name](z.astype(dtype))
  g = jax.grad(lambda z: ALL[name](z).sum())(z.astype(dtype))
  assert v.dtype == jnp.float32, f"{name} must compute in float32, got {v.dtype}"
  assert g.dtype == dtype, f"{name} gradient must come back in the input dtype {dtype}"
  v32 = ALL[name](z.astype(dtype).astype(jnp.float32))
  chex.assert_trees_all_close(v, v32, atol=1e-6, rtol=1e-6,
                              custom_message=f"{name} on {dtype} logits must equal float32 math "
                                             "on the same (rounded) logits")
  g32 = jax.grad(lambda z: ALL[name](z).sum())(z.astype(dtype).astype(jnp.float32))
  chex.assert_trees_all_close(g.astype(jnp.float32), g32, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", list(ALL))
def test_masked_result_equals_subset_and_all_masked_is_zero(name):
  z = logits((6, 5), seed=11)
  mask = jnp.array([True, False, True, True, False, True])
  z_garbage = z.at[1].set(jnp.nan)  # masked examples may hold anything
  v = ALL[name](z_garbage, where=mask)
  sub = ALL[name](z[np.asarray(mask)])
  chex.assert_trees_all_close(v[np.asarray(mask)], sub, atol=1e-6,
                              custom_message=f"{name}: masked result != result on the subset")
  assert float(jnp.abs(v[~np.asarray(mask)]).sum()) == 0.0
  g = jax.grad(lambda z: ALL[name](z, where=mask).sum())(z_garbage)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g[1]).sum()) == 0.0
  none = jnp.zeros(6, bool)
  v0 = ALL[name](z, where=none)
  g0 = jax.grad(lambda z: ALL[name](z, where=none).sum())(z)
  chex.assert_trees_all_equal(v0, jnp.zeros(6), custom_message="all-masked must give zeros")
  chex.assert_trees_all_equal(g0, jnp.zeros_like(z))


@pytest.mark.parametrize("name", list(ALL))
def test_pixelwise_shapes_and_other_axis(name):
  z = logits((2, 3, 4, 5), seed=12)
  v = ALL[name](z)
  chex.assert_shape(v, (2, 3, 4))
  v1 = ALL[name](jnp.moveaxis(z, -1, 1), axis=1)
  chex.assert_trees_all_close(v1, v, atol=1e-6,
                              custom_message=f"{name}: axis=1 must equal moveaxis then default")
  g = jax.grad(lambda z: ALL[name](z, axis=1).sum())(jnp.moveaxis(z, -1, 1))
  chex.assert_shape(g, (2, 5, 3, 4))


def test_adadem_pixelwise_every_pixel_is_an_example():
  z = logits((2, 3, 3, 4), seed=13)
  loss, mec = losses.adadem(z, losses.mec_init(4))
  loss_flat, mec_flat = losses.adadem(z.reshape(-1, 4), losses.mec_init(4))
  chex.assert_trees_all_close(loss.reshape(-1), loss_flat, atol=1e-6)
  chex.assert_trees_all_close(mec, mec_flat, atol=1e-6)


@pytest.mark.parametrize("name", list(ALL))
def test_jit_equals_eager_and_vmap_over_examples(name):
  z = logits((6, 5), seed=14)
  eager = ALL[name](z)
  chex.assert_trees_all_close(jax.jit(ALL[name])(z), eager, atol=1e-6)
  if name != "adadem":  # adadem couples examples through the MEC update
    chex.assert_trees_all_close(jax.vmap(lambda x: ALL[name](x[None])[0])(z), eager, atol=1e-6)


def test_vmap_over_grid_of_tau_alpha():
  z = logits((4, 5), seed=15)
  taus = jnp.array([0.5, 1.0, 1.3, 2.0])
  alphas = jnp.array([1.0, 1.0, 0.8, 0.0])
  batched = jax.vmap(lambda t, a: jnp.mean(losses.dem(z, t, a)))(taus, alphas)
  looped = jnp.stack([jnp.mean(ref_dem(z, t, a)) for t, a in zip(taus, alphas)])
  chex.assert_trees_all_close(batched, looped, atol=1e-5)
  g = jax.vmap(jax.grad(lambda z, t, a: losses.dem(z, t, a).sum()), (None, 0, 0))(z, taus, alphas)
  g_ref = jnp.stack([jax.grad(lambda z: ref_dem(z, t, a).sum())(z) for t, a in zip(taus, alphas)])
  chex.assert_trees_all_close(g, g_ref, atol=1e-5)


def test_no_recompilation_when_only_values_change():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(z, tau, alpha, mec, momentum):
    return (jax.grad(lambda z: losses.dem(z, tau, alpha).sum())(z),
            losses.adadem(z, mec, momentum=momentum))
  for i in range(3):
    step(logits((4, 5), seed=i), 1.0 + 0.1 * i, 0.5 + 0.1 * i,
         losses.mec_init(5) * (1 + i), 0.1 / (i + 1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # (2.0, 1.5) is outside on purpose
def test_prop_a1_second_derivative_at_uniform_logits():
  """d2L/dz_i2 at uniform logits is -(C-1)/(C^2 tau)(2 - alpha tau) (Prop. A.1)."""
  num_classes = 5
  z0 = jnp.zeros(num_classes)
  for tau, alpha in [(1.0, 1.0), (0.5, 1.0), (1.3, 0.8), (2.0, 1.5), (0.8, 0.0)]:
    grad = jax.grad(lambda z: losses.dem(z[None], tau, alpha)[0])
    h = 1e-2
    e0 = jnp.zeros(num_classes).at[0].set(h)
    d2 = (grad(z0 + e0)[0] - grad(z0 - e0)[0]) / (2 * h)  # central difference
    expected = -(num_classes - 1) / (num_classes ** 2 * tau) * (2 - alpha * tau)
    assert abs(float(d2) - expected) < 1e-3, (
        f"d2L/dz0^2 at uniform logits: got {float(d2)}, Prop. A.1 says {expected} "
        f"(tau={tau}, alpha={alpha})")
    assert (expected < 0) == losses.dem_valid(tau, alpha)


def test_dem_valid_region_and_warning():
  assert losses.dem_valid(1.0, 1.0) and losses.dem_valid(2.0, 1.0) and losses.dem_valid(5.0, 0.0)
  assert not losses.dem_valid(2.1, 1.0) and not losses.dem_valid(0.0, 1.0)
  grid = losses.dem_valid(np.array([1.0, 1.5]), np.array([1.0, 1.5]))
  chex.assert_trees_all_equal(grid, np.array([True, False]))
  with pytest.warns(UserWarning, match="Prop. A.1"):
    losses.dem(jnp.zeros((1, 3)), 1.5, 1.5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    losses.dem(jnp.zeros((1, 3)), 1.3, 0.8)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("call,error,match", [
    (lambda: losses.entropy(jnp.zeros((2, 3), jnp.int32)), TypeError, "floating"),
    (lambda: losses.entropy(jnp.zeros((2, 1))), ValueError, "at least 2 classes"),
    (lambda: losses.dem(jnp.zeros((2, 3)), axis=2), ValueError, "out of range"),
    (lambda: losses.cadf(jnp.zeros((2, 3)), where=jnp.ones(3, bool)), ValueError, "shape"),
    (lambda: losses.entropy(jnp.zeros((2, 3)), where=jnp.ones((3, 2), bool)), ValueError,
     r"per-example shape \(2,\) .* or the logits' shape \(2, 3\)"),
    (lambda: losses.generalized_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int),
                                              where=jnp.ones((2, 3), bool)),
     ValueError, r"per-example shape \(2,\)"),
    (lambda: losses.gmc(jnp.zeros((2, 3)), where=jnp.ones(2)), TypeError, "boolean"),
    (lambda: losses.cadf(jnp.zeros((2, 3)), tau=0.0), ValueError, "tau must be > 0"),
    (lambda: losses.dem(jnp.zeros((2, 3)), tau=-1.0), ValueError, "tau must be > 0"),
    (lambda: losses.gmc(jnp.zeros((2, 3)), alpha=-0.1), ValueError, "alpha must be >= 0"),
    (lambda: losses.dem(jnp.zeros((2, 3)), alpha=-0.1), ValueError, "alpha must be >= 0"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(3), momentum=0.0),
     ValueError, "momentum"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(3), momentum=1.5),
     ValueError, "momentum"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(4)), ValueError, r"\(C, C\)"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), jnp.zeros((3,))), ValueError, r"\(C, C\)"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), None), ValueError, "mec_init\\(3\\)"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(3), norm="l3"), ValueError, "norm"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(3), calibrator="x"),
     ValueError, "calibrator"),
    (lambda: losses.adadem(jnp.zeros((2, 3)), losses.mec_init(3), delta_from="x"),
     ValueError, "delta_from"),
    (lambda: losses.marginal_entropy(jnp.zeros((2, 3)), axis=-3), ValueError, "out of range"),
    (lambda: losses.mec_init(1), ValueError, ">= 2"),
    (lambda: losses.entropy([[1.0, 2.0]]), TypeError, "array"),
])
def test_bad_input_raises_documented_error(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_bad_input_raises_before_tracing_under_jit():
  with pytest.raises(ValueError, match="at least 2 classes"):
    jax.jit(losses.entropy)(jnp.zeros((2, 1)))


def test_marginal_entropy_value_and_mask():
  z = jnp.array([[9.0, 0.0], [0.0, 9.0], [9.0, 0.0]])
  p = jax.nn.softmax(z).mean(0)
  chex.assert_trees_all_close(losses.marginal_entropy(z), -jnp.sum(p * jnp.log(p)), atol=1e-6)
  mask = jnp.array([True, True, False])
  chex.assert_trees_all_close(losses.marginal_entropy(z, where=mask),
                              losses.marginal_entropy(z[:2]), atol=1e-6)
  assert float(losses.marginal_entropy(z, where=jnp.zeros(3, bool))) == 0.0


def test_a_class_mask_follows_the_class_axis():
  """A logits-shaped `where` moves with `axis`, as the logits do."""
  z = jax.random.normal(jax.random.key(0), (6, 5))
  keep = (jnp.arange(30).reshape(6, 5) % 3 != 1).at[:, 0].set(True)
  for loss in (losses.entropy, losses.marginal_entropy):
    three = jax.jit(lambda z: (loss(z.T, axis=0, where=keep.T), loss(z, where=keep),
                               loss(jnp.where(keep, z, -jnp.inf))))(z)
    np.testing.assert_allclose(three[0], three[1], rtol=1e-6)
    np.testing.assert_allclose(three[1], three[2], rtol=1e-6)
