"""Parameter masks and helpers shared by every model.

A mask is a pytree of Python bools with the structure of `params`; it plugs into
`optax.masked(tx, mask)` or `optax.multi_transform` to adapt only part of a model:
Tent adapts the normalisation affine parameters (`norm_param_mask`), SHOT adapts all
but the classifier (the negation of `head_param_mask`).
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A module counts as a normalisation layer when its name contains "norm" (flax's auto-names
# BatchNorm_0, GroupNorm_0, LayerNorm_0, or names like "stem_norm") or is a bn/gn/ln token
# ("bn", "bn1", "ln_f"), so "bnet" or "kiln" do not count.
_NORM_MODULE = re.compile(r"norm|(^|_)(bn|gn|ln)(\d*)(_|$)", re.IGNORECASE)
_AFFINE = ("scale", "bias")


def _keys(path) -> list[str]:
    return [str(getattr(entry, "key", entry)) for entry in path]


def norm_param_mask(params) -> Any:
    """True exactly for the scale and bias of BatchNorm, GroupNorm and LayerNorm layers.

    Args:
        params: a parameter pytree (the 'params' collection, not the whole variables dict).

    Returns:
        A pytree of bools with the structure of `params`.
    """
    def is_norm_affine(path, _):
        keys = _keys(path)
        return len(keys) >= 2 and keys[-1] in _AFFINE and bool(_NORM_MODULE.search(keys[-2]))
    return jax.tree_util.tree_map_with_path(is_norm_affine, params)


def head_param_mask(params) -> Any:
    """True for the parameters of the final classifier, the submodule named "head"."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "head" in _keys(path)[:-1], params)


def count_params(params) -> int:
    """Total number of scalar parameters in a pytree."""
    return sum(int(leaf.size) for leaf in jax.tree.leaves(params))


def init_variables(model: nn.Module, rng: jax.Array, input_shape) -> dict:
    """Initialises `model` on zeros of `input_shape` ([N, H, W, C]) in inference mode.

    Args:
        model: any module of this package (or one with the same call signature).
        rng: a JAX key. On CPU, `jax.random.key(seed, impl="rbg")` compiles the initializers
            about 5x faster than the default threefry key (this matters in tests).
        input_shape: shape of one input batch; N does not matter, H, W and C do.

    Returns:
        {'params': ..., 'batch_stats': ...}. 'batch_stats' is always present (empty for a model
        without BatchNorm), so training code can treat every model alike.
    """
    init = jax.jit(lambda rng, x: model.init(rng, x, train=False))
    variables = dict(init(rng, jnp.zeros(input_shape, jnp.float32)))
    variables.setdefault("batch_stats", {})
    return variables
