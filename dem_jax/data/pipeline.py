"""Batches as index arrays: a fixed seed gives the same order on every run.

`batch_indices` decides what happens to a last partial batch explicitly (no example is
ever dropped silently); `padded_batches` keeps every example in full-size batches with a
mask, for evaluation under `jit` (one shape, no recompiles).

Example:
  >>> from dem_jax.data import load, padded_batches
  >>> ds = load("digits", "test")
  >>> batches = padded_batches(len(ds), 64)
  >>> len(batches), batches[-1][1].sum()                  # 450 = 7 * 64 + 2
  (8, np.int64(2))
  >>> images = ds.images[batches[0][0]]                   # [64, 8, 8, 1]
"""

from __future__ import annotations

import warnings

import numpy as np

REMAINDERS = ("error", "drop", "keep", "pad")


def _order(num_examples: int, seed: int | None) -> np.ndarray:
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    if seed is None:
        return np.arange(num_examples)
    return np.random.default_rng(seed).permutation(num_examples)


def batch_indices(
    num_examples: int, batch_size: int, *, seed: int | None, remainder: str = "error"
) -> list[np.ndarray]:
    """Splits `range(num_examples)` into batches of indices.

    Args:
      num_examples: size of the data set.
      batch_size: examples per batch (> 0).
      seed: None keeps the order 0..n-1; an int shuffles with
        `np.random.default_rng(seed).permutation(n)`.
      remainder: what to do when `batch_size` does not divide `num_examples`:
        "error" raises ValueError; "drop" drops the last partial batch with a warning;
        "keep" makes the last batch shorter; "pad" fills the last batch up with
        index 0 (use `padded_batches` to get the mask that marks the padding).

    Returns:
      A list of int32 index arrays: `[batch_size]` each, except the last one with "keep".
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
    if remainder == "pad":
        return [indices for indices, _ in padded_batches(num_examples, batch_size, seed=seed)]
    order = _order(num_examples, seed).astype(np.int32)
    leftover = num_examples % batch_size
    if leftover and remainder == "error":
        raise ValueError(
            f"batch_size={batch_size} does not divide num_examples={num_examples}: the last "
            f"batch would have {leftover} examples. Pass remainder='drop' (drops those "
            f"{leftover}, with a warning), 'keep' (a shorter last batch) or 'pad' "
            "(padded_batches: a full last batch plus a mask)."
        )
    if leftover and remainder == "drop":
        warnings.warn(
            f"batch_indices: dropping {leftover} of {num_examples} examples "
            f"(the last partial batch; batch_size={batch_size}).",
            stacklevel=2,
        )
        order = order[: num_examples - leftover]
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def padded_batches(
    num_examples: int, batch_size: int, *, seed: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Full-size batches covering every example once, with a mask for the padding.

    Returns:
      A list of `(indices, mask)`: int32 `[batch_size]` and bool `[batch_size]`. Padded
      slots (only in the last batch) hold index 0 and mask False; every real example
      appears exactly once with mask True.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    order = _order(num_examples, seed).astype(np.int32)
    num_batches = -(-num_examples // batch_size)
    indices = np.zeros(num_batches * batch_size, np.int32)
    indices[:num_examples] = order
    mask = np.arange(num_batches * batch_size) < num_examples
    return list(zip(indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)))
