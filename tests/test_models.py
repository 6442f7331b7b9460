"""Tests for dem_jax.models: shapes, masks, BatchNorm modes and across devices, dtypes, errors."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from dem_jax import models
from dem_jax.models import (MODELS, count_params, create_model, head_param_mask, init_variables,
                            norm_param_mask)

NUM_CLASSES = 5
# Tiny versions of every model, keyed by a readable id: (name, options, input shape, feature dim).
TINY = {
    "cnn-8x8": ("cnn", dict(width=4, hidden=8), (3, 8, 8, 1), 8),
    "cnn-28x28": ("cnn", dict(width=4, hidden=8), (3, 28, 28, 1), 8),
    "resnet-batch-32x32": ("resnet", dict(depth=8, width=4), (3, 32, 32, 3), 16),
    "resnet-group-32x32": ("resnet", dict(depth=8, width=4, norm="group", num_groups=2),
                           (3, 32, 32, 3), 16),
    "vit-8x8": ("vit", dict(patch_size=2, hidden_dim=8, depth=2, num_heads=2, mlp_dim=16),
                (3, 8, 8, 1), 8),
    "vit-28x28-mean": ("vit", dict(patch_size=7, hidden_dim=8, depth=2, num_heads=2, mlp_dim=16,
                                   pool="mean"), (3, 28, 28, 1), 8),
    "vit-32x32": ("vit", dict(patch_size=8, hidden_dim=8, depth=2, num_heads=2, mlp_dim=16),
                  (3, 32, 32, 3), 8),
}


def _key(seed=0):
    # rbg keys: XLA on CPU compiles threefry random bits (used by every initializer) ~5x slower.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def _variables(model_id):
    """Initial variables of a tiny model, shared by the tests (dtype does not change them)."""
    name, kwargs, shape, _ = TINY[model_id]
    return init_variables(create_model(name, num_classes=NUM_CLASSES, **kwargs), _key(), shape)


def _inputs(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _build(model_id, **overrides):
    name, kwargs, shape, feature_dim = TINY[model_id]
    model = create_model(name, num_classes=NUM_CLASSES, **{**kwargs, **overrides})
    return model, _variables(model_id), _inputs(shape), feature_dim


def _paths(tree, mask=None):
    """'a/b/c' strings of the leaves of `tree` (where `mask` is True, if given)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    keep = jax.tree.leaves(mask) if mask is not None else [True] * len(flat)
    return {"/".join(str(k.key) for k in path) for (path, _), m in zip(flat, keep) if m}


@pytest.mark.parametrize("model_id", list(TINY))
def test_output_shapes_and_dtypes(model_id):
    model, variables, x, feature_dim = _build(model_id)
    both = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, return_features=True)))
    logits, (logits_again, features) = both(variables, x)
    assert logits.shape == (x.shape[0], NUM_CLASSES), f"{model_id}: logits shape {logits.shape}"
    assert features.shape == (x.shape[0], feature_dim), \
        f"{model_id}: features shape {features.shape}"
    assert logits.dtype == jnp.float32 and features.dtype == jnp.float32
    chex.assert_trees_all_close(logits, logits_again, atol=1e-6)
    assert set(variables) == {"params", "batch_stats"}, "init_variables must give both collections"
    assert "head" in variables["params"], "the classifier must be the submodule named 'head'"


# Module names (one per normalisation layer) that norm_param_mask must select, per tiny model.
RESNET8_NORMS = ["stem_norm"] + [f"stage{s}_block1/norm{i}" for s in (1, 2, 3) for i in (1, 2)] \
    + ["stage2_block1/proj_norm", "stage3_block1/proj_norm"]
VIT2_NORMS = [f"block{b}/{n}" for b in (1, 2) for n in ("attn_norm", "mlp_norm")] + ["encoder_norm"]
EXPECTED_NORMS = {
    "cnn-8x8": [f"BatchNorm_{i}" for i in range(4)],
    "resnet-batch-32x32": RESNET8_NORMS,
    "resnet-group-32x32": RESNET8_NORMS,
    "vit-8x8": VIT2_NORMS,
}


@pytest.mark.parametrize("model_id", list(EXPECTED_NORMS))
def test_norm_mask_marks_exactly_the_norm_affine_params(model_id):
    _, variables, _, _ = _build(model_id)
    params = variables["params"]
    mask = norm_param_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    expected = {f"{m}/{p}" for m in EXPECTED_NORMS[model_id] for p in ("scale", "bias")}
    selected = _paths(params, mask)
    assert sum(jax.tree.leaves(mask)) == 2 * len(EXPECTED_NORMS[model_id]), \
        f"{model_id}: expected a scale and a bias per norm layer ({EXPECTED_NORMS[model_id]})"
    assert selected == expected, (
        f"{model_id}: mask selected {sorted(selected - expected)} wrongly and missed "
        f"{sorted(expected - selected)}")
    # Conv and Dense biases are not normalisation parameters.
    assert any(p.endswith("/bias") for p in _paths(params) - selected)


def test_norm_mask_name_rules():
    leaf = np.zeros(3)
    params = {"bn1": {"scale": leaf, "bias": leaf}, "ln_f": {"scale": leaf, "bias": leaf},
              "GroupNorm_0": {"scale": leaf}, "bnet": {"bias": leaf}, "kiln": {"bias": leaf},
              "Dense_0": {"kernel": leaf, "bias": leaf}, "BatchNorm_0": {"mean": leaf},
              "head": {"kernel": leaf, "bias": leaf}}
    assert _paths(params, norm_param_mask(params)) == {
        "bn1/scale", "bn1/bias", "ln_f/scale", "ln_f/bias", "GroupNorm_0/scale"}
    assert _paths(params, head_param_mask(params)) == {"head/kernel", "head/bias"}
    assert count_params(params) == 3 * 12


def test_head_mask_and_count_on_a_model():
    _, variables, _, feature_dim = _build("cnn-8x8")
    params = variables["params"]
    assert _paths(params, head_param_mask(params)) == {"head/kernel", "head/bias"}
    assert count_params(params["head"]) == feature_dim * NUM_CLASSES + NUM_CLASSES
    assert count_params(params) == sum(np.size(a) for a in jax.tree.leaves(params))


@pytest.mark.parametrize("model_id", ["cnn-8x8", "resnet-batch-32x32"])
def test_batch_stats_update_only_in_train_mode(model_id):
    model, variables, x, _ = _build(model_id)
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    x = 3.0 * x + 1.0  # Far from the initial running statistics (mean 0, variance 1).

    _, updated = apply(variables, x, train=True, mutable=("batch_stats",))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables["batch_stats"],
                           updated["batch_stats"])
    assert all(jax.tree.leaves(changed)), "train=True must update every running mean and variance"

    _, unchanged = apply(variables, x, train=False, mutable=("batch_stats",))
    chex.assert_trees_all_equal(unchanged["batch_stats"], variables["batch_stats"])

    # In inference mode an example's logits do not depend on the rest of the batch.
    chex.assert_trees_all_close(apply(variables, x)[:1], apply(variables, x[:1]), atol=1e-5)


def test_group_norm_resnet_has_no_batch_stats():
    _, variables, _, _ = _build("resnet-group-32x32")
    assert variables["batch_stats"] == {}


def _shifted_batch(num_devices, per_device, shape):
    """Per-device data with different means, so local and global batch statistics differ."""
    x = np.random.default_rng(2).normal(size=(num_devices, per_device, *shape))
    return jnp.asarray(x + np.arange(num_devices).reshape(-1, 1, 1, 1, 1), jnp.float32)


@pytest.mark.parametrize("model_id", ["cnn-8x8", "resnet-batch-32x32"])
def test_batchnorm_under_pmap_matches_one_device_on_the_whole_batch(model_id):
    n = jax.device_count()
    assert n == 8, f"expected 8 fake CPU devices from the root conftest.py, got {n}"
    name, kwargs, shape, _ = TINY[model_id]
    single = create_model(name, num_classes=NUM_CLASSES, **kwargs)
    synced = create_model(name, num_classes=NUM_CLASSES, axis_name="batch", **kwargs)
    local = create_model(name, num_classes=NUM_CLASSES, **kwargs)  # No cross-device averaging.
    variables = _variables(model_id)
    x = _shifted_batch(n, 2, shape[1:])

    def train_step(model):
        return lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])

    logits_1, stats_1 = jax.jit(train_step(single))(variables, x.reshape(-1, *shape[1:]))
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), variables)
    logits_p, stats_p = jax.pmap(train_step(synced), axis_name="batch")(replicated, x)

    chex.assert_trees_all_close(logits_p.reshape(logits_1.shape), logits_1, atol=1e-5)
    for device in range(n):
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[device], stats_p), stats_1, atol=1e-5,
                                    custom_message=f"batch_stats on device {device}")

    # Control: without axis_name each device normalises with its own statistics.
    _, stats_local = jax.pmap(train_step(local), axis_name="batch")(replicated, x)
    with pytest.raises(AssertionError):
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], stats_local), stats_1, atol=1e-3)


def test_batchnorm_under_shard_map_matches_one_device():
    n = jax.device_count()
    name, kwargs, shape, _ = TINY["cnn-8x8"]
    single = create_model(name, num_classes=NUM_CLASSES, **kwargs)
    synced = create_model(name, num_classes=NUM_CLASSES, axis_name="batch", **kwargs)
    variables = _variables("cnn-8x8")
    x = _shifted_batch(n, 2, shape[1:]).reshape(-1, *shape[1:])

    mesh = Mesh(jax.devices(), ("batch",))
    step = jax.shard_map(lambda v, x: synced.apply(v, x, train=True, mutable=["batch_stats"]),
                         mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
    logits_s, stats_s = jax.jit(step)(variables, x)
    logits_1, stats_1 = single.apply(variables, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(logits_s, logits_1, atol=1e-5)
    chex.assert_trees_all_close(stats_s, stats_1, atol=1e-5)


@pytest.mark.parametrize("model_id", ["cnn-8x8", "resnet-group-32x32", "vit-8x8"])
def test_bfloat16_computes_in_bf16_and_returns_float32(model_id):
    model, variables, x, _ = _build(model_id, dtype=jnp.bfloat16)
    reference, _, _, _ = _build(model_id)
    apply = jax.jit(model.apply, static_argnames="return_features")
    logits, features = apply(variables, x, return_features=True)
    assert logits.dtype == jnp.float32, f"logits are {logits.dtype}, expected float32"
    assert features.dtype == jnp.float32, f"features are {features.dtype}, expected float32"
    # A bf16 model has the float32 variables of a float32 one (only the computation is bf16).
    bf16_variables = jax.eval_shape(lambda: init_variables(model, _key(), x.shape))
    chex.assert_trees_all_equal_shapes_and_dtypes(bf16_variables, variables)
    assert "bf16" in str(jax.make_jaxpr(model.apply)(variables, x)), "the body must run in bf16"
    ref_logits = jax.jit(reference.apply)(variables, x)
    # bf16 rounding moves these logits by <= 0.6% of their largest magnitude
    # (measured: cnn 0.5%, resnet 0.3%, vit 0.6%); a scaled or broken bf16 path
    # moves them by far more than the 2% allowed.
    scale = float(jnp.max(jnp.abs(ref_logits)))
    chex.assert_trees_all_close(logits, ref_logits, atol=0.02 * scale, rtol=0.0,
                                custom_message=f"{model_id}: bf16 logits far from float32")


def test_bad_names_and_options_raise_clear_errors():
    with pytest.raises(ValueError, match="cnn.*resnet.*vit"):
        create_model("resnet50", num_classes=10)
    with pytest.raises(ValueError, match="batch.*group"):
        create_model("resnet", num_classes=10, norm="layer")
    with pytest.raises(ValueError, match="6n \\+ 2"):
        create_model("resnet", num_classes=10, depth=10)
    with pytest.raises(ValueError, match="num_groups"):
        create_model("resnet", num_classes=10, width=12, norm="group", num_groups=8)
    with pytest.raises(ValueError, match="cls.*mean"):
        create_model("vit", num_classes=10, pool="max")
    with pytest.raises(TypeError, match="widht.*options are"):
        create_model("cnn", num_classes=10, widht=8)
    vit = create_model("vit", num_classes=10, patch_size=3, hidden_dim=8, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="patch_size=3 must divide the image size 8x8"):
        init_variables(vit, _key(), (1, 8, 8, 1))


def test_public_names():
    assert MODELS == ("cnn", "resnet", "vit")
    for name in models.__all__:
        assert hasattr(models, name), name
