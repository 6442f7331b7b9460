"""Split a parameter tree into the part an optimiser trains and the part it leaves alone.

Tent trains only the normalisation affine parameters, SHOT everything but the
classifier head. Training a sub-tree (rather than masking gradients of the
whole tree) means gradients of frozen weights are never computed and the
optimiser state holds only what it updates.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import traverse_util


def partition(params: Any, mask: Any) -> tuple[dict, dict]:
    """`(trainable, frozen)`: two nested dicts, the leaves where the bool mask is True / False.

    Raises:
      ValueError: if the mask selects nothing (an optimiser with nothing to train
        is almost always a configuration mistake).
    """
    flat = traverse_util.flatten_dict(params)
    flat_mask = traverse_util.flatten_dict(mask)
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    if not trainable:
        raise ValueError(
            "The parameter mask selects no parameter to train (e.g. Tent on a model "
            "without normalisation layers). Check the model and the method.")
    return (traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen))


def merge(trainable: dict, frozen: dict) -> dict:
    """Inverse of `partition`: the whole nested parameter dict."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                         **traverse_util.flatten_dict(trainable)})


def tree_where(pred, on_true: Any, on_false: Any) -> Any:
    """Elementwise select between two trees of the same structure (a traced bool)."""
    return jax.tree.map(lambda a, b: jax.numpy.where(pred, a, b), on_true, on_false)
