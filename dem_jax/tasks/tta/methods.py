"""Test-time adaptation methods as per-device step functions.

Every method takes the optimised loss as a plug-in (`objectives.LOSSES`):

* `noadapt`: the source model with its running statistics;
* `bn`: batch statistics of each test batch, no parameter update;
* `tent`: batch statistics, only the normalisation affine parameters train,
  one step per batch (plain SGD by default: the paper's Tent-dagger);
* `eta` / `eata`: Tent plus the entropy filter `H < e_margin ln C`, the
  redundancy filter `|cos(p, ema_p)| < d_margin` against the moving average
  prediction, weights `1 / exp(H - E0)`; EATA adds the Fisher regulariser
  `fisher_alpha * sum F (theta - theta_0)^2` with F from clean source data;
* `sar`: the entropy filter, a sharpness-aware (SAM) step whose second pass
  is filtered again, and a model reset when the moving average of the
  (second pass) entropy falls below `sar_reset`.

Filters and weights use the true entropy whatever loss is optimised. Masks,
never boolean indexing. The online protocol: each batch is predicted by the
same forward pass that computes its update; accuracy counts those predictions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dem_jax import losses
from dem_jax import models
from dem_jax.tasks import objectives
from dem_jax.engine import parallel
from dem_jax.engine import partition
from dem_jax.engine import train as train_lib

METHODS = ("noadapt", "bn", "tent", "eta", "eata", "sar")
AXIS = parallel.AXIS


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """Static description of a method: it selects code paths, so it is hashable."""
    method: str = "tent"
    loss: str = "em"
    optimizer: str = "sgd"          # "sgd" (Tent-dagger), "sgd_momentum" or "adam"
    momentum: float = 0.9
    mec_momentum: float = 0.1
    e_margin: float = 0.4           # entropy filter: H < e_margin * ln C
    d_margin: float = 0.4           # EATA redundancy filter (0.4 for 10 classes, 0.05 ImageNet)
    ema_momentum: float = 0.9       # moving average prediction (EATA)
    fisher_alpha: float = 2000.0
    sar_rho: float = 0.05
    sar_reset: float = 0.2
    sar_ema: float = 0.9

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; choose one of {METHODS}.")
        objectives.check_loss(self.loss)
        if self.optimizer not in train_lib.OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of "
                             f"{train_lib.OPTIMIZERS}.")
        if not 0.0 < self.mec_momentum <= 1.0:
            raise ValueError(f"mec_momentum must be in (0, 1], got {self.mec_momentum}.")

    @property
    def updates(self) -> bool:
        return self.method not in ("noadapt", "bn")


@flax.struct.dataclass
class AdaptState:
    trainable: Any        # normalisation affine parameters (nested dict)
    frozen: Any           # everything else
    batch_stats: Any
    opt_state: Any
    mec: jax.Array        # [C, C]
    ema_probs: jax.Array  # [C] moving average prediction (EATA)
    ema_probs_valid: jax.Array
    ema_loss: jax.Array   # SAR's moving average entropy
    ema_loss_valid: jax.Array
    anchor: Any           # trainable parameters of the source model
    fisher: Any           # EATA's Fisher information (zeros otherwise)
    hyper: objectives.Hyper
    step: jax.Array


def adapt_optimizer(cfg: AdaptConfig) -> optax.GradientTransformation:
    """The optimiser at unit learning rate; the step scales by the traced `hyper.lr`."""
    return train_lib.make_optimizer(cfg.optimizer, 1.0, momentum=cfg.momentum)


def init_state(variables: dict, cfg: AdaptConfig, num_classes: int, *, lr: float,
               tau: float = 1.0, alpha: float = 1.0, fisher=None) -> AdaptState:
    """The adaptation state at the source model (also what a reset returns to)."""
    params = variables["params"]
    trainable, frozen = partition.partition(params, models.norm_param_mask(params))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return AdaptState(
        trainable=trainable, frozen=frozen, batch_stats=variables.get("batch_stats", {}),
        opt_state=adapt_optimizer(cfg).init(trainable),
        mec=losses.mec_init(num_classes),
        ema_probs=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
        ema_probs_valid=jnp.array(False), ema_loss=f32(0.0), ema_loss_valid=jnp.array(False),
        anchor=trainable,
        fisher=fisher if fisher is not None else jax.tree.map(jnp.zeros_like, trainable),
        hyper=objectives.Hyper(f32(lr), f32(tau), f32(alpha)),
        step=jnp.zeros((), jnp.int32))


def _global_mean(values, mask):
    """Mean of `values` over the masked examples of the global batch (0 if none)."""
    mask = mask.astype(jnp.float32)
    total = lax.psum(jnp.sum(values * mask.reshape(mask.shape + (1,) * (values.ndim - 1)),
                             axis=0), AXIS)
    count = lax.psum(jnp.sum(mask), AXIS)
    return total / jnp.maximum(count, 1.0), count


def make_adapt_step(model, cfg: AdaptConfig, num_classes: int) -> Callable:
    """The per-device step `(state, images, labels) -> (state, metrics)`.

    Collectives run over `parallel.AXIS`; run it with `parallel.data_parallel`
    (one device included). The state may carry a leading grid axis if the step
    is vmapped (learning rates, (tau, alpha)).
    """
    tx = adapt_optimizer(cfg)
    margin = cfg.e_margin * math.log(num_classes)

    def forward(state, trainable, images):
        params = partition.merge(trainable, state.frozen)
        variables = {"params": params, "batch_stats": state.batch_stats}
        if cfg.method == "noadapt":
            return model.apply(variables, images, train=False)
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits

    def select_and_weigh(state, entropy, probs):
        """Which examples take part, and their weights (true entropy only)."""
        ones = jnp.ones_like(entropy)
        if cfg.method in ("tent",):
            return ones > 0, ones
        select = entropy < margin
        if cfg.method == "sar":
            return select, ones
        # ETA / EATA: redundancy filter against the moving average prediction
        cos = jnp.sum(probs * state.ema_probs, -1) / (
            jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(state.ema_probs) + 1e-12)
        redundant = state.ema_probs_valid & (jnp.abs(cos) >= cfg.d_margin)
        return select & ~redundant, jnp.exp(-(entropy - margin))

    def objective(trainable, state, images, also_select=None):
        logits = forward(state, trainable, images)
        entropy = lax.stop_gradient(losses.entropy(logits))
        probs = lax.stop_gradient(jax.nn.softmax(logits))
        select, weights = select_and_weigh(state, entropy, probs)
        if also_select is not None:
            select = select & also_select
        loss, mec = objectives.per_example(
            cfg.loss, logits, state.mec, state.hyper, mec_momentum=cfg.mec_momentum,
            where=select, axis_name=AXIS)
        count = lax.psum(jnp.sum(select), AXIS)
        # Each device's share of the global weighted mean, scaled so that the
        # pmean of the per-device gradients is the gradient of the global mean.
        n_dev = lax.psum(1, AXIS)
        obj = n_dev * jnp.sum(weights * loss) / jnp.maximum(count, 1)
        if cfg.method == "eata":
            obj += cfg.fisher_alpha * sum(
                jnp.sum(f * (t - a) ** 2) for f, t, a in zip(
                    jax.tree.leaves(state.fisher), jax.tree.leaves(trainable),
                    jax.tree.leaves(state.anchor)))
        aux = dict(logits=logits, entropy=entropy, probs=probs, select=select, mec=mec,
                   count=count, loss=lax.psum(jnp.sum(weights * loss), AXIS)
                   / jnp.maximum(count, 1))
        return obj, aux

    def metrics_of(logits, labels, extra):
        preds = jnp.argmax(logits, -1)
        return dict(correct=lax.psum(jnp.sum(preds == labels), AXIS),
                    count=lax.psum(labels.shape[0], AXIS), preds=preds, **extra)

    def step(state: AdaptState, images, labels):
        if not cfg.updates:
            logits = forward(state, state.trainable, images)
            zero = jnp.zeros((), jnp.float32)
            return state, metrics_of(logits, labels, dict(loss=zero, selected=zero))

        grad_fn = jax.value_and_grad(objective, has_aux=True)
        (_, aux), grads = grad_fn(state.trainable, state, images)
        grads = lax.pmean(grads, AXIS)
        count = aux["count"]
        ema_loss, ema_loss_valid = state.ema_loss, state.ema_loss_valid
        if cfg.method == "sar":
            # Sharpness-aware step: ascend to theta + rho g/|g|, take the gradient
            # there on examples that pass the filter in both passes.
            scale = cfg.sar_rho / (optax.tree.norm(grads) + 1e-12)
            perturbed = jax.tree.map(lambda t, g: t + scale * g, state.trainable, grads)
            (_, aux2), grads = grad_fn(perturbed, state, images, also_select=aux["select"])
            grads = lax.pmean(grads, AXIS)
            count = aux2["count"]
            ent2, _ = _global_mean(aux2["entropy"], aux2["select"])
            new_ema = jnp.where(ema_loss_valid,
                                cfg.sar_ema * ema_loss + (1 - cfg.sar_ema) * ent2, ent2)
            ema_loss = jnp.where(count > 0, new_ema, ema_loss)
            ema_loss_valid = ema_loss_valid | (count > 0)

        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        updates = jax.tree.map(lambda u: state.hyper.lr * u, updates)
        trainable = optax.apply_updates(state.trainable, updates)
        # No example passed the filters: no update at all (momentum and Adam
        # would otherwise keep moving on a zero gradient).
        moved = count > 0
        trainable = partition.tree_where(moved, trainable, state.trainable)
        opt_state = partition.tree_where(moved, opt_state, state.opt_state)

        ema_probs, ema_probs_valid = state.ema_probs, state.ema_probs_valid
        if cfg.method in ("eta", "eata"):
            mean_probs, n_sel = _global_mean(aux["probs"], aux["select"])
            new = jnp.where(ema_probs_valid,
                            cfg.ema_momentum * ema_probs + (1 - cfg.ema_momentum) * mean_probs,
                            mean_probs)
            ema_probs = jnp.where(n_sel > 0, new, ema_probs)
            ema_probs_valid = ema_probs_valid | (n_sel > 0)

        mec = aux["mec"]
        if cfg.method == "sar":
            reset = ema_loss_valid & (ema_loss < cfg.sar_reset)
            trainable = partition.tree_where(reset, state.anchor, trainable)
            opt_state = partition.tree_where(reset, tx.init(state.anchor), opt_state)
            mec = jnp.where(reset, losses.mec_init(num_classes), mec)
            ema_loss_valid = ema_loss_valid & ~reset

        new_state = state.replace(
            trainable=trainable, opt_state=opt_state, mec=mec, ema_probs=ema_probs,
            ema_probs_valid=ema_probs_valid, ema_loss=ema_loss, ema_loss_valid=ema_loss_valid,
            step=state.step + 1)
        return new_state, metrics_of(aux["logits"], labels,
                                     dict(loss=aux["loss"], selected=count.astype(jnp.float32)))

    return step


def make_batch_fn(step: Callable, *, grid: bool = False) -> Callable:
    """The per-device function that adapts on one batch of a stream.

    With `grid=True` the state has a leading grid axis (learning rates or
    (tau, alpha) points) and the step is vmapped over it, sharing the images.
    A stream is a host loop over batches of this one compiled function
    (`protocol.Runner`), not a `lax.scan`: XLA's CPU backend ran the
    convolutions inside a scan about 4x slower than the same step called
    batch by batch, and on an accelerator the loop costs one asynchronous
    dispatch per batch.
    """
    return jax.vmap(step, in_axes=(0, None, None)) if grid else step


def compute_fisher(model, variables: dict, images: np.ndarray, *, batch_size: int,
                   backend: str = "pmap") -> Any:
    """EATA's diagonal Fisher of the normalisation parameters on clean data.

    For each batch, the gradient of the cross-entropy with the model's own
    predictions as labels (batch statistics in use, as during adaptation) is
    squared; the Fisher is the mean over batches.
    """
    devices = parallel.participating()
    params = variables["params"]
    trainable, frozen = partition.partition(params, models.norm_param_mask(params))

    def per_device(trainable, frozen, batch_stats, x):
        def ce(t):
            logits, _ = model.apply(
                {"params": partition.merge(t, frozen), "batch_stats": batch_stats}, x,
                train=True, mutable=["batch_stats"])
            labels = jnp.argmax(lax.stop_gradient(logits), -1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        g = lax.pmean(jax.grad(ce)(trainable), AXIS)
        return jax.tree.map(jnp.square, g)

    fn = parallel.data_parallel(per_device, backend=backend)
    rep = parallel.replicate((trainable, frozen, variables.get("batch_stats", {})),
                             parallel.num_local_devices(devices))
    num_batches = len(images) // batch_size
    if num_batches == 0:
        raise ValueError(f"EATA needs at least one batch ({batch_size}) of clean source "
                         f"images for the Fisher; got {len(images)}.")
    total = None
    for b in range(num_batches):
        # Each process feeds its rows of the batch (all of them on one process).
        sq = parallel.unreplicate(fn(*rep, parallel.shard_batch(
            images[b * batch_size:(b + 1) * batch_size], devices)))
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
    return jax.tree.map(lambda x: x / num_batches, total)
