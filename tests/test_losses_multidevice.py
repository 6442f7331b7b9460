"""8 fake CPU devices: batch statistics of the losses equal one device on the global batch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dem_jax import losses

NUM_DEVICES = 8
PER_DEVICE = 3
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def batch():
  if jax.device_count() < NUM_DEVICES:
    pytest.fail(f"needs {NUM_DEVICES} devices; the root conftest.py sets XLA_FLAGS "
                "--xla_force_host_platform_device_count=8 before JAX starts")
  z = 3.0 * jax.random.normal(jax.random.key(0), (NUM_DEVICES * PER_DEVICE, NUM_CLASSES))
  mask = jnp.arange(NUM_DEVICES * PER_DEVICE) % 4 != 1
  mec = losses.mec_init(NUM_CLASSES).at[2].set(jnp.array([0.1, 0.1, 0.6, 0.1, 0.1]))
  return z, mask, mec


W = 0.5 * jax.random.normal(jax.random.key(1), (NUM_CLASSES, NUM_CLASSES))


def per_device(z, mask, mec, axis_name):
  """What one device computes in a data-parallel step.

  AdaDEM's loss, new MEC and logit gradient; the marginal entropy of a tiny
  linear model's outputs `z @ w` and its gradient in `w`, averaged over devices
  with `pmean` as every data-parallel step does.
  """
  def objective(z):
    loss, new_mec = losses.adadem(z, mec, where=mask, axis_name=axis_name)
    return loss.sum(), (loss, new_mec)
  grad, (loss, new_mec) = jax.grad(objective, has_aux=True)(z)
  im = lambda w: losses.marginal_entropy(z @ w, where=mask, axis_name=axis_name)
  ment, w_grad = jax.value_and_grad(im)(W)
  if axis_name is not None:
    w_grad = jax.lax.pmean(w_grad, axis_name)
  return loss, new_mec, grad, ment, w_grad


def single_device(z, mask, mec):
  return per_device(z, mask, mec, None)


def check(expected, loss, new_mec, grad, ment, ment_grad, how):
  e_loss, e_mec, e_grad, e_ment, e_ment_grad = expected
  msg = f"{how} on 8 devices must equal one device on the concatenated batch"
  chex.assert_trees_all_close(loss, e_loss, atol=1e-5, custom_message=f"loss: {msg}")
  chex.assert_trees_all_close(new_mec, e_mec, atol=1e-6, custom_message=f"MEC: {msg}")
  chex.assert_trees_all_close(grad, e_grad, atol=1e-5, custom_message=f"gradient: {msg}")
  chex.assert_trees_all_close(ment, e_ment, atol=1e-6,
                              custom_message=f"marginal entropy: {msg}")
  chex.assert_trees_all_close(ment_grad, e_ment_grad, atol=1e-6,
                              custom_message=f"marginal entropy gradient: {msg}")


def test_pmap_equals_single_device(batch):
  z, mask, mec = batch
  expected = single_device(z, mask, mec)
  shard = lambda x: x.reshape(NUM_DEVICES, PER_DEVICE, *x.shape[1:])
  out = jax.pmap(lambda z, m: per_device(z, m, mec, "batch"), axis_name="batch")(
      shard(z), shard(mask))
  loss, new_mec, grad, ment, ment_grad = out
  check(expected, loss.reshape(-1), new_mec[3], grad.reshape(-1, NUM_CLASSES),
        ment[5], ment_grad[6], "jax.pmap")
  chex.assert_trees_all_close(new_mec[0], new_mec[7], custom_message="devices disagree on the MEC")


def test_shard_map_equals_single_device(batch):
  z, mask, mec = batch
  expected = single_device(z, mask, mec)
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("batch",))
  # check_vma=False gives shard_map pmap's semantics for the transpose of psum,
  # so one per-device step function serves both (dem_jax.engine does the same).
  fn = jax.shard_map(lambda z, m: per_device(z, m, mec, "batch"), mesh=mesh,
                     in_specs=(P("batch"), P("batch")),
                     out_specs=(P("batch"), P(), P("batch"), P(), P()), check_vma=False)
  check(expected, *jax.jit(fn)(z, mask), "jax.shard_map")
