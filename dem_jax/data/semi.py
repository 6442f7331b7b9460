"""Labelled / unlabelled splits for semi-supervised learning, balanced or long-tailed.

A budget of labelled examples per class is drawn with a seed from the training
split; the unlabelled set is the rest (or a budget of it). Long-tailed splits
follow the CIFAR-LT profile that USB's imbalanced benchmark (and the paper's
Table 15) uses: class k of C gets `floor(n_max * rho ** (-k / (C - 1)))`
examples, so class 0 has `n_max` and class C-1 has `n_max / rho`, for the
labelled and the unlabelled part alike; the test set stays balanced.

  >>> import numpy as np
  >>> from dem_jax.data import semi
  >>> semi.long_tail_counts(1500, 10, 100).tolist()
  [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]
  >>> labels = np.repeat(np.arange(10), 100)
  >>> lb, ulb = semi.split(labels, 10, labelled=4, seed=0)
  >>> len(lb), len(ulb)
  (40, 960)
"""

from __future__ import annotations

import numpy as np


def long_tail_counts(n_max: int, num_classes: int, rho: float) -> np.ndarray:
    """Per-class sizes `floor(n_max * rho ** (-k / (C - 1)))`, at least 1 (rho = 1: balanced).

    Raises:
      ValueError: for rho < 1 or n_max < 1.
    """
    if rho < 1:
        raise ValueError(f"The imbalance ratio rho must be >= 1, got {rho}.")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}.")
    k = np.arange(num_classes)
    exponent = k / max(num_classes - 1, 1)
    return np.maximum(1, np.floor(n_max * float(rho) ** (-exponent) + 1e-9)).astype(np.int64)


def split(labels: np.ndarray, num_classes: int, *, labelled: int, unlabelled: int = 0,
          rho: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the labelled and the unlabelled examples of a training split.

    Args:
      labels: int `[N]` class labels of the training split.
      num_classes: C.
      labelled: labelled examples of class 0 (of every class when rho = 1).
      unlabelled: unlabelled examples of class 0 (scaled by the same profile);
        0 = every remaining example of each class, which is balanced only
        if rho = 1 (for rho > 1 give a budget).
      rho: imbalance ratio, largest class / smallest (1 = balanced).
      seed: which examples are drawn (per class, a permutation of its members).

    Returns:
      (labelled indices, unlabelled indices), each sorted, disjoint.

    Raises:
      ValueError: a class has fewer training examples than its budget, or
        rho > 1 without an unlabelled budget.
    """
    labels = np.asarray(labels)
    if rho > 1 and not unlabelled:
        raise ValueError("A long-tailed split (rho > 1) needs an unlabelled budget per class "
                         "(the rest of a balanced training split would not be long-tailed).")
    n_lb = long_tail_counts(labelled, num_classes, rho)
    n_ulb = long_tail_counts(unlabelled, num_classes, rho) if unlabelled else None
    rng = np.random.default_rng([seed, num_classes, labelled, unlabelled])
    lb, ulb = [], []
    for k in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == k))
        need = n_lb[k] + (n_ulb[k] if n_ulb is not None else 0)
        if len(members) < need or len(members) <= n_lb[k]:
            raise ValueError(f"Class {k} has {len(members)} training examples; the split needs "
                             f"{n_lb[k]} labelled" + (f" + {n_ulb[k]} unlabelled" if n_ulb
                                                      is not None else " and some unlabelled")
                             + ". Lower the budgets.")
        lb.append(members[:n_lb[k]])
        ulb.append(members[n_lb[k]:need] if n_ulb is not None else members[n_lb[k]:])
    return np.sort(np.concatenate(lb)), np.sort(np.concatenate(ulb))
