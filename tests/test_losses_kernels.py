"""The fused CPU kernels against the pure-JAX closed forms they replace.

On CPU every other loss test runs the kernels (`dem_jax/losses/_cpu`); the
pure-JAX path is what GPUs and TPUs run. Here both paths must agree in value,
gradient and new MEC state, in both kernel layouts (one example per vector,
C > 32; 16 examples per vector, few classes), with masks, masked (-inf)
classes, huge logits and low-precision inputs.
"""

import contextlib
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import losses
from dem_jax.losses import _kernels

RTOL = 2e-5


def both_paths(fn, *args):
  """`jit(fn)(*args)` with the kernels and with the pure-JAX path."""
  with_kernels = jax.jit(lambda *a: fn(*a))(*args)
  with _kernels.disabled():
    pure = jax.jit(lambda *a: fn(*a))(*args)
  return with_kernels, pure


def assert_paths_agree(fn, *args, what=""):
  got, want = both_paths(fn, *args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.max(jnp.abs(w.astype(jnp.float32)))) or 1.0
    err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) / scale
    assert bool(jnp.isfinite(g).all()), f"{what}: the kernel path gave non-finite values"
    assert err < RTOL, (
        f"{what}: the fused CPU kernel and the pure-JAX closed form differ by "
        f"{err:.2e} (relative to the largest entry), more than {RTOL}.")


def test_kernels_are_built_where_ci_runs():
  if os.environ.get("DEM_JAX_CPU_KERNELS") == "0":
    pytest.skip("kernels switched off with DEM_JAX_CPU_KERNELS=0")
  assert _kernels.available(), (
      "the fused CPU kernels did not build, so the other loss tests checked only "
      f"the pure-JAX path: {_kernels.unavailable_reason()}")


def test_switching_off_really_takes_the_pure_jax_path():
  # Settled first: before any CPU lowering, a program holds both paths and
  # lets its CPU lowering (which builds the kernels) choose.
  available = _kernels.available()
  z = jnp.ones((4, 5))
  text = jax.jit(losses.entropy).lower(z).as_text()
  with _kernels.disabled():
    pure = jax.jit(lambda z: losses.entropy(z)).lower(z).as_text()
  assert ("dem_jax_DemFwd" in text) == available
  assert "dem_jax_DemFwd" not in pure


def logits(shape, seed=0, scale=3.0, masked_class=True):
  z = scale * jax.random.normal(jax.random.key(seed), shape)
  if masked_class:
    z = z.at[..., 1].set(-jnp.inf)   # a masked class in every example
  return z


# C = 40: one example per vector; C = 7 and (2, 9, 19): 16 examples per vector
# (21 examples: a last group of 5 lanes).
SHAPES = [(33, 40), (21, 7), (2, 9, 19)]
DEM_LOSSES = {
    "entropy": lambda z, w: losses.entropy(z, where=w),
    "cadf": lambda z, w: losses.cadf(z, 0.6, where=w),
    "gmc": lambda z, w: losses.gmc(z, 0.7, where=w),
    "dem": lambda z, w: losses.dem(z, 1.3, 0.8, where=w),
}


def example_mask(shape):
  return (jnp.arange(int(np.prod(shape[:-1]))) % 4 != 1).reshape(shape[:-1])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(DEM_LOSSES))
@pytest.mark.parametrize("masked", [False, True])
def test_dem_family_kernel_equals_closed_form(shape, name, masked):
  z = logits(shape)
  w = example_mask(shape) if masked else None
  loss = DEM_LOSSES[name]
  assert_paths_agree(
      jax.value_and_grad(lambda z: jnp.sum(loss(z, w) * jnp.linspace(0.5, 1.5, loss(z, w).size)
                                            .reshape(loss(z, w).shape))),
      z, what=f"{name} {shape} where={masked}")
  assert_paths_agree(lambda z: loss(z, w), z, what=f"{name} {shape} value")


ADADEM_MODES = {
    "AdaDEM": {}, "AdaDEM-Norm": dict(calibrator="gmc"), "AdaDEM-MEC": dict(norm=None),
    "AdaDEM-V": dict(delta_from="entropy"), "l2": dict(norm="l2"), "linf": dict(norm="linf"),
}


def adadem_objective(mode, w, momentum=0.1):
  def objective(z, mec):
    value, new_mec = losses.adadem(z, mec, where=w, momentum=momentum, **ADADEM_MODES[mode])
    weights = jnp.linspace(0.5, 1.5, value.size).reshape(value.shape)
    return jnp.sum(value * weights), new_mec
  return jax.value_and_grad(objective, has_aux=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", list(ADADEM_MODES))
@pytest.mark.parametrize("masked", [False, True])
def test_adadem_kernel_equals_closed_form(shape, mode, masked):
  z = logits(shape, seed=1)
  c = shape[-1]
  mec = losses.mec_init(c) + 0.02 * jax.random.uniform(jax.random.key(2), (c, c))
  w = example_mask(shape) if masked else None
  # AdaDEM-V's delta goes to 0 for confident examples, where both paths'
  # float32 rounding is amplified; keep the logits moderate for it.
  if mode == "AdaDEM-V":
    z = z / 3.0
  assert_paths_agree(adadem_objective(mode, w), z, mec, what=f"{mode} {shape} where={masked}")


def every_loss(z, mec, where):
  """Value and gradient of every DEM-family loss and AdaDEM mode (and its new
  MEC state), each example weighted differently."""
  weights = jnp.linspace(0.5, 1.5, z.shape[0])
  out = {}
  for name, loss in DEM_LOSSES.items():
    out[name] = jax.value_and_grad(lambda z: jnp.sum(loss(z, where) * weights))(z)
  for mode in ADADEM_MODES:
    out[mode] = adadem_objective(mode, where)(z / 3.0 if mode == "AdaDEM-V" else z, mec)
  return out


@pytest.mark.parametrize("c", [33, 48, 161])
def test_one_example_layout_for_every_last_vector(c):
  """C > 32 runs 16 classes per vector: a last vector of 1 class (33), none
  (48, a multiple of 16) and 1 of 11 vectors (161) must give every loss's
  value, gradient and new MEC state as the closed forms do (C = 40 above has
  a last vector of 8)."""
  shape = (19, c)
  z = logits(shape, seed=c)
  z = z.at[..., c - 1].set(-jnp.inf)   # the last class masked too
  w = example_mask(shape)
  mec = losses.mec_init(c) + 0.02 * jax.random.uniform(jax.random.key(4), (c, c))
  assert_paths_agree(lambda z, mec: every_loss(z, mec, w), z, mec, what=f"every loss, C = {c}")


def test_a_gradient_of_8_mib_and_more_streamed_around_the_caches_is_the_same():
  """AdaDEM's backward kernel writes a gradient of >= 8 MiB with non-temporal
  stores (rows 32-byte aligned, the rest as usual): every row, the first,
  the last and the partial last vector of each, must hold the closed form."""
  z, c = logits((2112, 1000), seed=8), 1000   # 8.4 MB of float32
  mec = losses.mec_init(c) + 0.02 * jax.random.uniform(jax.random.key(9), (c, c))
  assert_paths_agree(adadem_objective("AdaDEM", None), z, mec, what="AdaDEM, 2112 x 1000")


def test_adadem_kernel_with_a_traced_momentum_takes_the_sums_path():
  """A traced momentum cannot go into the kernel's update; the JAX update runs."""
  z, mec = logits((20, 40), seed=3), losses.mec_init(40)
  got = jax.jit(lambda z, mec, m: losses.adadem(z, mec, momentum=m))(z, mec, 0.3)
  with _kernels.disabled():
    want = jax.jit(lambda z, mec: losses.adadem(z, mec, momentum=0.3))(z, mec)
  chex.assert_trees_all_close(got, want, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("shape", [(6, 40), (40, 5)])
def test_kernels_stay_finite_and_agree_for_huge_logits(shape):
  z = logits(shape, seed=4, scale=1e4)
  assert_paths_agree(jax.value_and_grad(lambda z: jnp.sum(losses.dem(z, 1.3, 0.8))), z,
                     what="dem, logits ~1e4")
  assert_paths_agree(adadem_objective("AdaDEM", None), z, losses.mec_init(shape[-1]),
                     what="adadem, logits ~1e4")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_kernels_take_low_precision_logits(dtype):
  z = logits((9, 40), seed=5, masked_class=False).astype(dtype)
  got, want = both_paths(jax.grad(lambda z: jnp.sum(losses.entropy(z))), z)
  assert got.dtype == dtype
  chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32),
                              atol=1e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


@pytest.mark.parametrize("name", ["entropy", "dem"])
@pytest.mark.parametrize("shape", [(2, 5), (2, 40)])
def test_hessian_through_the_kernels_is_the_closed_form_one(name, shape):
  """Few classes: forward and backward kernels; many: the gradient is made in
  the forward kernel and the backward pass scales it."""
  z = logits(shape, seed=6)
  z = z.at[..., 1].set(0.5)  # finite: the Hessian of -inf classes is not compared
  loss = DEM_LOSSES[name]
  assert_paths_agree(jax.hessian(lambda z: jnp.sum(loss(z, None))), z,
                     what=f"hessian of {name} {shape}")


@pytest.mark.parametrize("name", ["dem", "AdaDEM-Norm"])
def test_a_vjp_called_twice_gives_the_same_gradient(name):
  """For C > 32 the backward pass scales the forward's gradient in its buffer;
  that must never consume the residual that a second call needs."""
  z = logits((5, 50), seed=10)
  loss = {"dem": lambda z: losses.dem(z, 1.3, 0.8),
          "AdaDEM-Norm": lambda z: losses.adadem(z, None, calibrator="gmc")[0]}[name]
  for f in (loss, jax.jit(loss)):
    _, vjp = jax.vjp(f, z)
    first, double, again = (vjp(k * jnp.ones(5))[0] for k in (1.0, 2.0, 1.0))
    np.testing.assert_array_equal(
        first, again, err_msg=f"{name}: a second call of the same vjp gave another gradient")
    np.testing.assert_allclose(double, 2 * first, rtol=1e-6,
                               err_msg=f"{name}: the gradient is not linear in the cotangent")


def test_vmap_over_a_batch_of_problems_uses_rows_of_the_kernel():
  z = logits((3, 8, 40), seed=7)
  assert_paths_agree(jax.vmap(jax.grad(lambda z: jnp.mean(losses.dem(z, 1.3, 0.8)))), z,
                     what="vmap of dem's gradient")
  mecs = jnp.stack([losses.mec_init(40)] * 3)
  assert_paths_agree(jax.vmap(adadem_objective("AdaDEM", None)), z, mecs,
                     what="vmap of adadem over independent states")


# Big enough for several blocks of rows on a multi-core machine (each with its
# own class sums, added afterwards): few classes (16 examples per vector) and
# many (one example per vector).
BLOCKED_SHAPES = [(4000, 10), (1200, 40)]


@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
def test_mec_update_is_the_same_to_the_last_bit_on_every_run(shape):
  """Threads finish their blocks in any order; the sums must not depend on it."""
  z = logits(shape, seed=8, masked_class=False)
  c = shape[-1]
  step = jax.jit(lambda z, mec: losses.adadem(z, mec)[1])
  first = np.asarray(step(z, losses.mec_init(c)))
  for _ in range(10):
    again = np.asarray(step(z, losses.mec_init(c)))
    assert np.array_equal(first, again), (
        f"adadem's new MEC state ({shape}) changed between two identical calls: "
        "the per-block sums of the CPU kernel were added in a run-dependent order")


@pytest.mark.parametrize("c", [40, 1000])
def test_pseudo_label_is_the_first_of_tied_maxima_wherever_they_lie(c):
  """The kernel's pseudo-label is jnp.argmax's: the first index at the maximum.

  Each row puts its maximum, once or tied, at a different place: the first
  class, the last ones (the row's partial last vector when C is not a
  multiple of 16), twice in one vector, across a vector boundary; one row is
  all -inf but one class, one row is constant. A wrong label moves the MEC
  sums to another class row, which the new state shows.
  """
  rows = []
  for where in ([0], [c - 1], [c - 2, c - 1], [5, 9], [31, 32], [17, c - 3], [c // 2, 3]):
    row = np.zeros(c, np.float32)
    row[where] = 5.0
    rows.append(row)
  only = np.full(c, -np.inf, np.float32)
  only[c - 5] = 1.0
  rows += [only, np.ones(c, np.float32)]
  z = jnp.asarray(np.stack(rows))
  mec = losses.mec_init(c)
  (_, new_kernel), _ = jax.jit(adadem_objective("AdaDEM", None))(z, mec)
  with _kernels.disabled():
    (_, new_pure), _ = jax.jit(adadem_objective("AdaDEM", None))(z, mec)
  changed_kernel = np.flatnonzero(np.any(np.asarray(new_kernel) != np.asarray(mec), axis=1))
  changed_pure = np.flatnonzero(np.any(np.asarray(new_pure) != np.asarray(mec), axis=1))
  want = sorted({0, c - 1, c - 2, 5, 31, 17, 3, c - 5})
  assert list(changed_pure) == want, (
      f"the pure-JAX path updated rows {[int(k) for k in changed_pure]}, not {want}")
  assert list(changed_kernel) == want, (
      f"C = {c}: the kernel updated MEC rows {[int(k) for k in changed_kernel]}, but the first "
      f"index at each row's maximum (jnp.argmax) gives rows {want}")


@pytest.mark.parametrize("shape", BLOCKED_SHAPES)
@pytest.mark.parametrize("collapsed", [False, True])
def test_adadem_kernel_agrees_when_blocks_share_classes(shape, collapsed):
  """Blocks of rows sum the MEC separately; a class met by several is merged.

  `collapsed`: every example has the same pseudo-label (a collapsing model),
  so one class row gets the sums of every block, and the rest none.
  """
  z = logits(shape, seed=9, masked_class=False)
  if collapsed:
    z = z.at[..., 3].add(100.0)
  c = shape[-1]
  mec = losses.mec_init(c) + 0.02 * jax.random.uniform(jax.random.key(2), (c, c))
  w = example_mask(shape)
  for mode in ("AdaDEM", "AdaDEM-MEC"):
    assert_paths_agree(adadem_objective(mode, w), z, mec,
                       what=f"{mode} {shape} collapsed={collapsed}")
  # The sums path (a traced momentum: the update is done in JAX from the sums).
  got = jax.jit(lambda z, mec, m: losses.adadem(z, mec, momentum=m, where=w))(z, mec, 0.3)
  with _kernels.disabled():
    want = jax.jit(lambda z, mec: losses.adadem(z, mec, momentum=0.3, where=w))(z, mec)
  chex.assert_trees_all_close(got, want, rtol=RTOL, atol=1e-7)


def test_without_a_working_compiler_the_losses_warn_once_and_still_work(tmp_path):
  """A machine where the build fails gets the pure-JAX path and one warning."""
  import subprocess
  import sys
  import textwrap
  script = textwrap.dedent("""
      import warnings
      import jax.numpy as jnp
      from dem_jax import losses
      from dem_jax.losses import _kernels
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = losses.entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
        b = losses.dem(jnp.array([[3.0, 1.0, 0.0]]), 1.3, 0.8)
      built = [w for w in caught if "could not build the fused CPU kernels" in str(w.message)]
      print(len(built), _kernels.available(), float(a[0]), float(b[0]))
  """)
  env = dict(os.environ, CXX="false", DEM_JAX_CACHE_DIR=str(tmp_path))
  env.pop("DEM_JAX_CPU_KERNELS", None)
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  assert out[:2] == ["1", "False"], f"expected one build warning and no kernels, got {out}"
  np.testing.assert_allclose([float(out[2]), float(out[3])], [np.log(2.0), 0.08974469],
                             rtol=1e-6)


def class_mask(shape, seed=11):
  """A mask over classes with about a third of them False, and one example
  with no class left (the last)."""
  keep = jax.random.uniform(jax.random.key(seed), shape) > 0.35
  keep = keep.at[..., 0].set(True)
  return keep.at[-1].set(False)


@pytest.mark.parametrize("shape,kernels", [((33, 40), True), ((21, 7), True),
                                          ((21, 7), False)])
def test_a_class_mask_is_the_same_as_minus_inf_logits(shape, kernels):
  """optax's logits-shaped `where`: masked classes as -inf logits, an example
  with no class left as a masked example; values, gradients and MEC states
  of every loss and AdaDEM mode, with the kernels (C = 40 and 7: both
  layouts) and on the pure-JAX path."""
  z = logits(shape, seed=12, masked_class=False)
  keep = class_mask(shape)
  live = jnp.any(keep, axis=-1)
  z_inf = jnp.where(keep, z, -jnp.inf)
  c = shape[-1]
  mec = losses.mec_init(c) + 0.02 * jax.random.uniform(jax.random.key(13), (c, c))
  with contextlib.nullcontext() if kernels else _kernels.disabled():
    got = jax.jit(lambda z: every_loss(z, mec, keep))(z)
    want = jax.jit(lambda z: every_loss(z, mec, live))(z_inf)
  for name in got:
    for g, w in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
      np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=name)
      assert bool(jnp.all(jnp.isfinite(g))), name
    grad = got[name][1]
    assert not bool(jnp.any(jnp.where(keep, 0.0, grad))), f"{name}: masked classes got a gradient"
