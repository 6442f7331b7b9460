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
  (second pass) entropy falls below `sar_reset * ln C`;
* `deyo`: the entropy filter `H < deyo_margin ln C`, the pseudo-label
  probability difference (PLPD) filter `p_yhat(x) - p_yhat(x') > plpd_threshold`
  with `x'` the image with its `patch_len x patch_len` patches shuffled, and
  weights `exp(-(H - e_margin ln C)) + exp(PLPD)` (Lee et al., ICLR 2024).

Thresholds on the entropy are fractions of its maximum ln C, so that the
methods' ImageNet values (1,000 classes) carry over to C classes. Each
method's own optimiser is `METHOD_OPTIMIZER` (the paper's: plain SGD for
Tent-dagger, SGD with momentum 0.9 for Tent, ETA, EATA, DeYO; SAM over SGD
with momentum for SAR).

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

METHODS = ("noadapt", "bn", "tent", "eta", "eata", "sar", "deyo")
FILTER_METHODS = ("eta", "eata", "sar", "deyo")
# Method -> its optimiser in the paper (dem-notes section 5); "tent_dagger" is
# the paper's own Tent rows (method "tent" with plain SGD).
METHOD_OPTIMIZER = {"noadapt": "sgd", "bn": "sgd", "tent_dagger": "sgd",
                    "tent": "sgd_momentum", "eta": "sgd_momentum", "eata": "sgd_momentum",
                    "sar": "sgd_momentum", "deyo": "sgd_momentum"}
# SAR resets when the moving-average entropy falls below 0.2 with 1,000 classes
# (its paper): the same fraction of the maximum entropy ln C here.
SAR_RESET = 0.2 / math.log(1000)
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
    d_margin: float = 0.05          # EATA redundancy filter |cos| < d_margin (EATA's value)
    ema_momentum: float = 0.9       # moving average prediction (EATA)
    fisher_alpha: float = 2000.0
    sar_rho: float = 0.05
    sar_reset: float = SAR_RESET    # reset when ema entropy < sar_reset * ln C
    sar_ema: float = 0.9
    deyo_margin: float = 0.5        # DeYO's entropy filter: H < deyo_margin * ln C
    plpd_threshold: float = 0.2     # DeYO's PLPD filter
    patch_len: int = 4              # DeYO shuffles a patch_len x patch_len grid of patches
    deyo_seed: int = 0              # DeYO's patch permutations: fold_in(key(deyo_seed), step)
    diagnostics: bool = False       # per-batch delta, confidence and gradient norms

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
    mec_anchor: jax.Array  # the initial MEC (what a SAR reset returns to)
    fisher: Any           # EATA's Fisher information (zeros otherwise)
    hyper: objectives.Hyper
    step: jax.Array


def adapt_optimizer(cfg: AdaptConfig) -> optax.GradientTransformation:
    """The optimiser at unit learning rate; the step scales by the traced `hyper.lr`."""
    return train_lib.make_optimizer(cfg.optimizer, 1.0, momentum=cfg.momentum)


def init_state(variables: dict, cfg: AdaptConfig, num_classes: int, *, lr: float,
               tau: float = 1.0, alpha: float = 1.0, fisher=None, mec=None) -> AdaptState:
    """The adaptation state at the source model (also what a reset returns to).

    `mec`: the initial `[C, C]` MEC (default `1/C` everywhere, the paper's;
    `source_mec` gives the warm start).
    """
    params = variables["params"]
    trainable, frozen = partition.partition(params, models.norm_param_mask(params))
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    mec0 = losses.mec_init(num_classes) if mec is None else f32(mec)
    return AdaptState(
        trainable=trainable, frozen=frozen, batch_stats=variables.get("batch_stats", {}),
        opt_state=adapt_optimizer(cfg).init(trainable),
        mec=mec0,
        ema_probs=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
        ema_probs_valid=jnp.array(False), ema_loss=f32(0.0), ema_loss_valid=jnp.array(False),
        anchor=trainable, mec_anchor=mec0,
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


def patch_shuffle(images, key, patch_len: int):
    """DeYO's view: each image's `patch_len x patch_len` grid of patches permuted.

    Args:
      images: `[N, H, W, C]`; H and W are cropped to multiples of `patch_len`
        (the rest of the image is kept in place; DeYO resizes instead).
      key: PRNG key; one permutation per image.

    Returns:
      `[N, H, W, C]` shuffled images.

    Example:
      >>> x = jnp.arange(16.).reshape(1, 4, 4, 1)
      >>> patch_shuffle(x, jax.random.key(0), 2).shape
      (1, 4, 4, 1)
    """
    images = jnp.asarray(images)
    n, h, w, c = images.shape
    ph, pw = h // patch_len, w // patch_len
    core = images[:, :ph * patch_len, :pw * patch_len]
    patches = core.reshape(n, patch_len, ph, patch_len, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, patch_len * patch_len, ph, pw, c)
    perm = jnp.argsort(jax.random.uniform(key, (n, patch_len * patch_len)), axis=-1)
    patches = jnp.take_along_axis(patches, perm[:, :, None, None, None], axis=1)
    core = patches.reshape(n, patch_len, patch_len, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
    core = core.reshape(n, patch_len * ph, patch_len * pw, c)
    return images.at[:, :ph * patch_len, :pw * patch_len].set(core)


def cadf_delta(logits):
    """AdaDEM's delta `||p (z + T + 1)||_1` per example `[N]` (>= 1)."""
    p = jax.nn.softmax(logits)
    return jnp.sum(jnp.abs(p * (logits - jnp.sum(p * logits, -1, keepdims=True) + 1.0)), -1)


def make_adapt_step(model, cfg: AdaptConfig, num_classes: int) -> Callable:
    """The per-device step `(state, images, labels) -> (state, metrics)`.

    Collectives run over `parallel.AXIS`; run it with `parallel.data_parallel`
    (one device included). The state may carry a leading grid axis if the step
    is vmapped (learning rates, (tau, alpha)).

    Metrics per batch (global): `correct`, `count`, `preds`, `loss`, `selected`
    (examples in the update), `kept_entropy` (examples past the entropy
    filter), `resets` (SAR) and, with `cfg.diagnostics`, means over the batch
    of `delta`, `max_prob`, `logit_grad_l1` (L1 norm of each selected
    example's weighted loss gradient w.r.t. its logits), the global
    `param_grad_norm` and the mean MEC diagonal `mec_diag` after the step.
    """
    tx = adapt_optimizer(cfg)
    log_c = math.log(num_classes)
    margin = cfg.e_margin * log_c

    def forward(state, trainable, images):
        params = partition.merge(trainable, state.frozen)
        variables = {"params": params, "batch_stats": state.batch_stats}
        if cfg.method == "noadapt":
            return model.apply(variables, images, train=False)
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits

    def shuffled_view(state, trainable, images):
        """DeYO's patch-shuffled images, one permutation per example of the global batch."""
        key = jax.random.fold_in(jax.random.key(cfg.deyo_seed), state.step)
        n = images.shape[0]
        # Every device draws the global batch's permutations and takes its rows,
        # so that N devices shuffle exactly like one.
        n_glob = n * lax.psum(1, AXIS)
        full = jnp.zeros((n_glob,) + images.shape[1:], images.dtype)
        full = lax.dynamic_update_slice_in_dim(full, images, lax.axis_index(AXIS) * n, 0)
        shuffled = patch_shuffle(full, key, cfg.patch_len)
        return lax.dynamic_slice_in_dim(shuffled, lax.axis_index(AXIS) * n, n, 0)

    def select_and_weigh(state, trainable, images, entropy, probs):
        """(entropy-filter mask, final mask, weights), from the true entropy only."""
        ones = jnp.ones_like(entropy)
        if cfg.method == "tent":
            return ones > 0, ones > 0, ones
        if cfg.method == "deyo":
            first = entropy < cfg.deyo_margin * log_c
            # No gradient through the shuffled view (DeYO runs it under no_grad);
            # BatchNorm uses the statistics of the whole shuffled batch.
            view = lax.stop_gradient(forward(state, trainable,
                                             shuffled_view(state, trainable, images)))
            yhat = jnp.argmax(probs, -1)
            p_view = jnp.take_along_axis(jax.nn.softmax(view), yhat[:, None], -1)[:, 0]
            plpd = jnp.take_along_axis(probs, yhat[:, None], -1)[:, 0] - p_view
            weights = jnp.exp(-(entropy - margin)) + jnp.exp(plpd)
            return first, first & (plpd > cfg.plpd_threshold), weights
        select = entropy < margin
        if cfg.method == "sar":
            return select, select, ones
        # ETA / EATA: redundancy filter against the moving average prediction
        cos = jnp.sum(probs * state.ema_probs, -1) / (
            jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(state.ema_probs) + 1e-12)
        redundant = state.ema_probs_valid & (jnp.abs(cos) >= cfg.d_margin)
        return select, select & ~redundant, jnp.exp(-(entropy - margin))

    def objective(trainable, state, images, also_select=None):
        logits = forward(state, trainable, images)
        entropy = lax.stop_gradient(losses.entropy(logits))
        probs = lax.stop_gradient(jax.nn.softmax(logits))
        first, select, weights = select_and_weigh(state, trainable, images, entropy, probs)
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
                   count=count, weights=weights,
                   kept_entropy=lax.psum(jnp.sum(first), AXIS).astype(jnp.float32),
                   loss=lax.psum(jnp.sum(weights * loss), AXIS) / jnp.maximum(count, 1))
        return obj, aux

    def diagnostics(state, aux, grads, mec):
        """Means over the global batch of the quantities that set the step size."""
        logits = lax.stop_gradient(aux["logits"])
        delta, _ = _global_mean(cadf_delta(logits), jnp.ones(logits.shape[:1], bool))
        max_prob, _ = _global_mean(jnp.max(aux["probs"], -1), jnp.ones(logits.shape[:1], bool))

        def weighted_loss(z):  # per-example weighted loss; the MEC row held as in the step
            loss, _ = objectives.per_example(cfg.loss, z, state.mec, state.hyper,
                                             mec_momentum=cfg.mec_momentum,
                                             where=aux["select"], axis_name=AXIS)
            return jnp.sum(aux["weights"] * loss)
        dz = jax.grad(weighted_loss)(logits)
        l1, _ = _global_mean(jnp.sum(jnp.abs(dz), -1), aux["select"])
        return dict(delta=delta, max_prob=max_prob, logit_grad_l1=l1,
                    param_grad_norm=optax.tree.norm(grads),
                    mec_diag=jnp.mean(jnp.diagonal(mec)))

    def metrics_of(logits, labels, extra):
        preds = jnp.argmax(logits, -1)
        return dict(correct=lax.psum(jnp.sum(preds == labels), AXIS),
                    count=lax.psum(labels.shape[0], AXIS), preds=preds, **extra)

    def step(state: AdaptState, images, labels):
        zero = jnp.zeros((), jnp.float32)
        if not cfg.updates:
            logits = forward(state, state.trainable, images)
            extra = dict(loss=zero, selected=zero, kept_entropy=zero, resets=zero)
            if cfg.diagnostics:
                extra.update(delta=zero, max_prob=zero, logit_grad_l1=zero,
                             param_grad_norm=zero, mec_diag=zero)
            return state, metrics_of(logits, labels, extra)

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
        resets = zero
        if cfg.method == "sar":
            reset = ema_loss_valid & (ema_loss < cfg.sar_reset * log_c)
            trainable = partition.tree_where(reset, state.anchor, trainable)
            opt_state = partition.tree_where(reset, tx.init(state.anchor), opt_state)
            mec = jnp.where(reset, state.mec_anchor, mec)
            ema_loss_valid = ema_loss_valid & ~reset
            resets = reset.astype(jnp.float32)

        new_state = state.replace(
            trainable=trainable, opt_state=opt_state, mec=mec, ema_probs=ema_probs,
            ema_probs_valid=ema_probs_valid, ema_loss=ema_loss, ema_loss_valid=ema_loss_valid,
            step=state.step + 1)
        extra = dict(loss=aux["loss"], selected=count.astype(jnp.float32),
                     kept_entropy=aux["kept_entropy"], resets=resets)
        if cfg.diagnostics:
            extra.update(diagnostics(state, aux, grads, mec))
        return new_state, metrics_of(aux["logits"], labels, extra)

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


def source_mec(model, variables: dict, images: np.ndarray, num_classes: int, *,
               batch_size: int = 256) -> jax.Array:
    """A MEC warm start: row k = the source model's mean prediction on clean
    images it predicts as k (running statistics); rows of classes it never
    predicts stay `1/C`. An option beyond the paper (which starts at `1/C`).

    Returns:
      float32 `[C, C]`.

    Example:
      >>> mec = source_mec(model, variables, train.images[:512], 10)
    """
    apply = jax.jit(lambda x: jax.nn.softmax(model.apply(variables, x, train=False)))
    probs = np.concatenate([np.asarray(apply(images[i:i + batch_size]))
                            for i in range(0, len(images), batch_size)])
    yhat = probs.argmax(-1)
    mec = np.full((num_classes, num_classes), 1.0 / num_classes, np.float32)
    for k in range(num_classes):
        if np.any(yhat == k):
            mec[k] = probs[yhat == k].mean(0)
    return jnp.asarray(mec)
