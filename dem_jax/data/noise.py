"""Synthetic label noise: symmetric and asymmetric (class-pair) flips.

`corrupt_labels(labels, num_classes, kind=..., rate=..., seed=...)` returns a new
array of noisy labels and never touches the input, so the clean labels stay
available for evaluation and for measuring how many noisy labels a model memorises.

Conventions (`rate` is always a probability of a *wrong* label):

| kind | each label of clean class i | fraction wrong in expectation |
|---|---|---|
| `"symmetric"` | with probability `rate`, replaced by a class drawn uniformly from the C - 1 *other* classes | `rate` |
| `"asymmetric"` | with probability `rate`, replaced by `mapping[i]` (classes with `mapping[i] == i` never flip) | `rate` x (fraction of examples in flipping classes) |

Some papers draw the symmetric replacement from all C classes, so that only
`rate (C - 1) / C` of the labels end up wrong; here `rate` is the wrong fraction itself.

Asymmetric mappings (`mapping=`): a sequence of C class indices, or the name of one of
`MAPPINGS`. The default, `None`, is the cyclic `i -> (i + 1) % C`, which flips every
class and so makes `rate` the wrong fraction. The named ones are the semantic pairs
used in the literature:

| name | flips (the other classes keep their label) |
|---|---|
| `"cyclic"` | i -> (i + 1) % C (the default) |
| `"mnist"` | 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1 (Patrini et al. 2017; used by GCE and SCE) |
| `"cifar10"` | truck -> automobile, bird -> airplane, deer -> horse, cat <-> dog (same source) |
| `"fashion_mnist"` | T-shirt <-> Shirt, Pullover <-> Coat, Sandal <-> Sneaker (look-alike garments; our choice, documented here) |

Example:
  >>> import dataclasses
  >>> from dem_jax import data
  >>> train = data.load("fashion_mnist", "train")
  >>> noisy = corrupt_labels(train.labels, 10, kind="symmetric", rate=0.4, seed=0)
  >>> round(noisy.realised_rate, 3)
  0.397
  >>> noisy_train = dataclasses.replace(train, labels=noisy.noisy)
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

KINDS = ("symmetric", "asymmetric")

# Class indices: MNIST digits; CIFAR-10 (0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer,
# 5 dog, 6 frog, 7 horse, 8 ship, 9 truck); Fashion-MNIST (0 T-shirt/top, 1 Trouser,
# 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot).
MAPPINGS = {
    "mnist": (0, 1, 7, 8, 4, 6, 5, 1, 8, 9),
    "cifar10": (0, 1, 0, 5, 7, 3, 6, 7, 8, 1),
    "fashion_mnist": (6, 1, 4, 3, 2, 7, 0, 5, 8, 9),
}


@dataclasses.dataclass(frozen=True)
class NoisyLabels:
    """Labels after synthetic corruption.

    Attributes:
      noisy: int32 `[N]`, a new array (the input labels are never modified).
      is_noisy: bool `[N]`, `noisy != clean`.
      realised_rate: the fraction of wrong labels actually drawn.
      transition: float64 `[C, C]`, the empirical `P(noisy = j | clean = i)`: row i
        counts the examples of clean class i; a class with no example gets the
        identity row (nothing was flipped). Every row sums to 1.
      kind: `"symmetric"` or `"asymmetric"`.
      rate: the requested flip probability.
      mapping: int `[C]`, the class mapping of `"asymmetric"` noise; None for symmetric.
    """

    noisy: np.ndarray
    is_noisy: np.ndarray
    realised_rate: float
    transition: np.ndarray
    kind: str
    rate: float
    mapping: np.ndarray | None = None


def _check_labels(labels, num_classes: int) -> np.ndarray:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) \
            or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array [N], got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers (class indices), got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )
    return labels


def _resolve_mapping(mapping, num_classes: int) -> np.ndarray:
    if mapping is None or (isinstance(mapping, str) and mapping == "cyclic"):
        return (np.arange(num_classes) + 1) % num_classes
    if isinstance(mapping, str):
        if mapping not in MAPPINGS:
            raise ValueError(
                f"Unknown mapping {mapping!r}; valid names: 'cyclic', {', '.join(map(repr, MAPPINGS))}, "
                "or a sequence of num_classes class indices."
            )
        named = mapping
        mapping = MAPPINGS[mapping]
        if len(mapping) != num_classes:
            raise ValueError(f"mapping {named!r} is for {len(mapping)} classes, got num_classes={num_classes}")
    mapping = np.asarray(mapping)
    if mapping.shape != (num_classes,) or not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(
            f"mapping must be {num_classes} integer class indices (mapping[i] is the class "
            f"that class i flips to), got {mapping.dtype} of shape {mapping.shape}"
        )
    if mapping.min() < 0 or mapping.max() >= num_classes:
        raise ValueError(f"mapping values must be in [0, {num_classes}), got {mapping.tolist()}")
    return mapping.astype(np.int64)


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """The empirical `P(noisy = j | clean = i)`, `[C, C]`, rows summing to 1.

    A class with no example gets the identity row.
    """
    counts = np.bincount(
        np.asarray(clean, np.int64) * num_classes + np.asarray(noisy, np.int64),
        minlength=num_classes * num_classes,
    ).reshape(num_classes, num_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), np.eye(num_classes))


def corrupt_labels(
    labels: np.ndarray,
    num_classes: int,
    *,
    kind: str,
    rate: float,
    seed: int,
    mapping=None,
) -> NoisyLabels:
    """Flips labels at random: symmetric (to any other class) or asymmetric (class pairs).

    Every example draws independently: with probability `rate` its label is replaced,
    by a uniformly random *other* class (`"symmetric"`) or by `mapping[label]`
    (`"asymmetric"`; classes mapped to themselves never change). See the module doc for
    the conventions and the named mappings.

    Args:
      labels: int `[N]` clean labels in `[0, num_classes)`; read, never modified.
      num_classes: C >= 2.
      kind: `"symmetric"` or `"asymmetric"`.
      rate: flip probability in `[0, 1)`.
      seed: the result depends only on (labels, num_classes, kind, rate, seed, mapping).
      mapping: asymmetric only: None (cyclic `i -> (i + 1) % C`), a name in `MAPPINGS`
        (or `"cyclic"`), or a sequence of C class indices.

    Returns:
      A `NoisyLabels` with the new int32 labels, which of them are wrong, the realised
      rate and the empirical transition matrix.

    Raises:
      ValueError: unknown kind or mapping, rate outside [0, 1), labels out of range, or
        a mapping passed with symmetric noise.
      TypeError: non-integer labels.

    Example:
      >>> out = corrupt_labels(np.array([0, 1, 2, 3] * 250), 4, kind="asymmetric",
      ...                      rate=0.2, seed=0)
      >>> out.transition.round(2)[0]      # class 0 flips to class 1 (cyclic)
      array([0.82, 0.18, 0.  , 0.  ])
    """
    clean = _check_labels(labels, num_classes)
    if kind not in KINDS:
        raise ValueError(f"Unknown noise kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if kind == "symmetric" and mapping is not None:
        raise ValueError("mapping= only applies to kind='asymmetric'")

    rng = np.random.default_rng(seed)
    flip = rng.random(clean.shape[0]) < rate
    if kind == "symmetric":
        # An offset in 1..C-1 added modulo C is uniform over the other classes.
        offset = rng.integers(1, num_classes, size=clean.shape[0])
        noisy = np.where(flip, (clean + offset) % num_classes, clean)
        used_mapping = None
    else:
        used_mapping = _resolve_mapping(mapping, num_classes)
        noisy = np.where(flip, used_mapping[clean], clean)
    noisy = noisy.astype(np.int32)
    is_noisy = noisy != clean
    return NoisyLabels(
        noisy=noisy,
        is_noisy=is_noisy,
        realised_rate=float(is_noisy.mean()) if is_noisy.size else 0.0,
        transition=transition_matrix(clean, noisy, num_classes),
        kind=kind,
        rate=float(rate),
        mapping=used_mapping,
    )
