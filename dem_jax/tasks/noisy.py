"""Training on noisy labels: a per-device step with the loss chosen by name.

A loss name is a base loss, optionally plus an entropy regulariser on the
training batch's own predictions:

    "ce" | "gce" | "sce" | "elr"  [ "+em" | "+adadem" ]

    L = mean_n [ base(z_n, y~_n) + lam * reg(z_n) ]

with `y~` the given (possibly wrong) labels. `base` is cross entropy, GCE
(q = 0.7), SCE (alpha = 0.1, beta = 1) or ELR (lambda = 3, beta = 0.7);
`reg` is the entropy H (EM) or AdaDEM.

State beyond the model (`NoisyState.extra`, passed in and returned):

* `"elr_targets"` `[N, C]`: ELR's running mean prediction of every training
  example, addressed by example index (the batch carries the indices). It is
  kept replicated: each device updates the rows of its own examples, the
  (index, new row) pairs are all-gathered over `parallel.AXIS` and scattered
  on every device, so all copies stay equal and 8 devices give the table of 1
  device on the same global batch. A global batch holds each index at most
  once, so no row is written twice.
* `"mec"` `[C, C]`: AdaDEM's MEC, updated from the global batch (psum inside
  `losses.adadem`).

Every collective runs over `parallel.AXIS`; run the step with
`parallel.data_parallel` (a leading device axis on every argument), also on
one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax

from dem_jax import losses
from dem_jax.engine import parallel

AXIS = parallel.AXIS
BASE_LOSSES = ("ce", "gce", "sce", "elr")
REGULARISERS = ("em", "adadem")
LOSSES = BASE_LOSSES + tuple(f"{b}+{r}" for b in BASE_LOSSES for r in REGULARISERS)


def parse_loss(name: str) -> tuple[str, str | None]:
    """`"gce+adadem"` -> `("gce", "adadem")`; `"ce"` -> `("ce", None)`."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(
            f"Unknown noisy-label loss {name!r}. A loss is a base loss {BASE_LOSSES}, "
            f"optionally followed by '+em' or '+adadem' (e.g. 'ce+adadem').")
    base, _, reg = name.partition("+")
    return base, reg or None


@dataclasses.dataclass(frozen=True)
class NoisyLossConfig:
    """The loss of one run and its hyperparameters (the papers' defaults)."""
    loss: str = "ce"
    lam: float = 0.3            # weight of the EM / AdaDEM term
    gce_q: float = 0.7
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    elr_lambda: float = 3.0
    elr_beta: float = 0.7
    mec_momentum: float = 0.1

    def __post_init__(self):
        parse_loss(self.loss)
        if not self.lam >= 0:
            raise ValueError(f"lam (the EM / AdaDEM weight) must be >= 0, got {self.lam}.")
        if not 0 < self.gce_q <= 1:
            raise ValueError(f"gce_q must be in (0, 1], got {self.gce_q}.")
        if not (self.sce_alpha >= 0 and self.sce_beta >= 0):
            raise ValueError("sce_alpha and sce_beta must be >= 0.")
        if not (self.elr_lambda >= 0 and 0 <= self.elr_beta < 1):
            raise ValueError("elr_lambda must be >= 0 and elr_beta in [0, 1).")
        if not 0 < self.mec_momentum <= 1:
            raise ValueError(f"mec_momentum must be in (0, 1], got {self.mec_momentum}.")

    @property
    def base(self) -> str:
        return parse_loss(self.loss)[0]

    @property
    def regulariser(self) -> str | None:
        return parse_loss(self.loss)[1]


@flax.struct.dataclass
class NoisyState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    extra: dict  # "elr_targets" and / or "mec" when the loss needs them


def init_extra(cfg: NoisyLossConfig, num_examples: int, num_classes: int) -> dict:
    extra = {}
    if cfg.base == "elr":
        extra["elr_targets"] = losses.elr_init(num_examples, num_classes)
    if cfg.regulariser == "adadem":
        extra["mec"] = losses.mec_init(num_classes)
    return extra


def init_state(variables: dict, tx: optax.GradientTransformation, cfg: NoisyLossConfig,
               num_examples: int, num_classes: int) -> NoisyState:
    """The state before the first step (host arrays, no device axis)."""
    return NoisyState(jnp.zeros((), jnp.int32), variables["params"],
                      variables.get("batch_stats", {}), tx.init(variables["params"]),
                      init_extra(cfg, num_examples, num_classes))


def per_example_loss(cfg: NoisyLossConfig, logits, labels, indices, extra: dict):
    """The per-example loss of `cfg.loss` on this device's examples, and the new state.

    Per device; needs the `parallel.AXIS` axis (AdaDEM reduces its MEC update over
    it). The ELR table returned here has only this device's rows updated; see
    `sync_elr_targets`.
    """
    base, reg = cfg.base, cfg.regulariser
    new = dict(extra)
    if base == "ce":
        value = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    elif base == "gce":
        value = losses.generalized_cross_entropy(logits, labels, q=cfg.gce_q)
    elif base == "sce":
        value = losses.symmetric_cross_entropy(logits, labels, alpha=cfg.sce_alpha,
                                               beta=cfg.sce_beta)
    else:
        value, new["elr_targets"] = losses.elr(logits, labels, extra["elr_targets"], indices,
                                               lam=cfg.elr_lambda, beta=cfg.elr_beta)
    if reg == "em":
        value = value + cfg.lam * losses.entropy(logits)
    elif reg == "adadem":
        term, new["mec"] = losses.adadem(logits, extra["mec"], momentum=cfg.mec_momentum,
                                         axis_name=AXIS)
        value = value + cfg.lam * term
    return value, new


def sync_elr_targets(old_table, local_table, indices):
    """Every device's new rows, written into every device's copy of the table.

    `local_table` is `old_table` with the rows of this device's `indices`
    updated. The (index, row) pairs of all devices are gathered and scattered,
    so the replicated tables stay identical.
    """
    rows = local_table[indices]
    all_indices = lax.all_gather(indices, AXIS).reshape(-1)
    all_rows = lax.all_gather(rows, AXIS).reshape(-1, rows.shape[-1])
    return old_table.at[all_indices].set(all_rows)


def make_train_step(model, tx: optax.GradientTransformation, cfg: NoisyLossConfig) -> Callable:
    """Per-device step `(state, images, labels, indices, clean_labels) -> (state, metrics)`.

    `labels` are the given (noisy) labels the loss sees; `clean_labels` are used
    for the metrics only (how well the model fits the clean and the mislabelled
    examples). Every device holds the same number of examples, so the pmean of the
    per-device mean-loss gradients is the gradient of the global mean.

    Metrics (global sums over the batch): `count`, `correct` (w.r.t. the given
    labels), `clean_count` / `clean_correct` (correctly labelled examples),
    `noisy_count` / `noisy_fit` (mislabelled examples predicted as their wrong
    label: memorisation) / `noisy_recovered` (predicted as their true class),
    and `loss` (the global mean).
    """

    def step(state: NoisyState, images, labels, indices, clean_labels):
        def objective(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images,
                train=True, mutable=["batch_stats"])
            value, extra = per_example_loss(cfg, logits, labels, indices, state.extra)
            return value.mean(), (logits, updates["batch_stats"], extra)

        (loss, (logits, batch_stats, extra)), grads = jax.value_and_grad(
            objective, has_aux=True)(state.params)
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if "elr_targets" in extra:
            extra["elr_targets"] = sync_elr_targets(state.extra["elr_targets"],
                                                    extra["elr_targets"], indices)
        preds = logits.argmax(-1)
        noisy = labels != clean_labels
        fit = preds == labels
        total = lambda x: lax.psum(jnp.sum(x), AXIS)
        metrics = dict(loss=lax.pmean(loss, AXIS), count=lax.psum(labels.shape[0], AXIS),
                       correct=total(fit), clean_count=total(~noisy),
                       clean_correct=total(fit & ~noisy), noisy_count=total(noisy),
                       noisy_fit=total(fit & noisy),
                       noisy_recovered=total((preds == clean_labels) & noisy))
        return NoisyState(state.step + 1, params, batch_stats, opt_state, extra), metrics

    return step
