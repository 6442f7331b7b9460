"""Unsupervised domain adaptation (UDA) methods as per-device step functions.

Every method takes the entropy term as a plug-in (`objectives.LOSSES`, or none),
following the paper's protocol: AdaDEM *replaces* EM where a method has EM
(MinEnt, SHOT-IM) and is *added* where it has none (DANN).

* `source_only`: cross-entropy (CE) on the labelled source batch;
* `minent`: CE on source + `lam` x entropy term on the unlabelled target batch;
* `dann`: CE + a domain discriminator (`Discriminator`, a small MLP on the
  penultimate features) trained to tell source from target, with a gradient
  reversal layer so that the features learn to fool it (Ganin et al. 2016; the
  adversarial alignment that AdvEnt uses) + optionally `lam` x entropy term;
* `shot_im`: source-free; starts from the source model, freezes the classifier
  "head" and adapts the feature extractor on target with
  `entropy term - marginal entropy` (information maximisation, SHOT; the
  marginal entropy is over the global target batch).

Source and target go through the model in ONE forward pass (their concatenation),
so BatchNorm normalises with the statistics of the mixed batch (synchronised over
devices by the model's `axis_name`) and its running statistics, used at
evaluation, are those of the mixture. SHOT-IM sees only target batches, so its
statistics become the target's.

Each device's objective is its share of a global mean, `n_dev * sum(l) /
global_count`; gradients are `lax.pmean`'d, which makes them the gradient of the
global mean (the marginal entropy's `psum` transposes to the same scaling). The
MEC of AdaDEM is state, updated from the global target batch. Hyperparameters
(learning rate, DEM's tau and alpha) are traced (`objectives.Hyper`), so a grid
of them is a leading axis of the state, vmapped (DEM*'s search).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dem_jax import losses
from dem_jax import models
from dem_jax.tasks import objectives
from dem_jax.engine import distributed
from dem_jax.engine import parallel
from dem_jax.engine import partition
from dem_jax.engine import train as train_lib

METHODS = ("source_only", "minent", "dann", "shot_im")
AXIS = parallel.AXIS


@dataclasses.dataclass(frozen=True)
class UDAConfig:
    """Static description of a method (hashable: it selects code paths).

    Attributes:
      method: one of METHODS.
      loss: the entropy term, one of `objectives.LOSSES`, or None (source_only,
        plain dann).
      lam: weight of the entropy term (minent, dann). SHOT-IM uses weight 1 on
        both IM terms, as SHOT does.
      adv_weight: DANN's gradient reversal coefficient (the features get
        `-adv_weight` x the discriminator's gradient).
      disc_hidden: width of the discriminator's hidden layer.
      optimizer: "sgd", "sgd_momentum" or "adam", at unit learning rate (the
        step multiplies by the traced `hyper.lr`).
      momentum: SGD momentum.
      mec_momentum: pi of the MEC update.
    """
    method: str = "minent"
    loss: str | None = "em"
    lam: float = 0.3
    adv_weight: float = 0.1
    disc_hidden: int = 64
    optimizer: str = "sgd_momentum"
    momentum: float = 0.9
    mec_momentum: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown UDA method {self.method!r}; choose one of {METHODS}.")
        if self.loss is not None:
            objectives.check_loss(self.loss)
        if self.method in ("minent", "shot_im") and self.loss is None:
            raise ValueError(f"UDA method {self.method!r} needs an entropy term: set loss to "
                             f"one of {objectives.LOSSES}.")
        if self.method == "source_only" and self.loss is not None:
            raise ValueError("source_only has no entropy term; set loss=None.")
        if self.optimizer not in train_lib.OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of "
                             f"{train_lib.OPTIMIZERS}.")
        if not 0.0 < self.mec_momentum <= 1.0:
            raise ValueError(f"mec_momentum must be in (0, 1], got {self.mec_momentum}.")
        if self.lam < 0 or self.adv_weight < 0:
            raise ValueError("lam and adv_weight must be >= 0.")

    @property
    def uses_source(self) -> bool:
        return self.method != "shot_im"

    @property
    def uses_target(self) -> bool:
        return self.method != "source_only"


class Discriminator(nn.Module):
    """Domain discriminator: Dense-relu-Dense-relu-Dense(1), the logit of "target"."""
    hidden: int = 64

    @nn.compact
    def __call__(self, features):
        x = nn.relu(nn.Dense(self.hidden)(features))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


@jax.custom_vjp
def reverse_gradient(x, scale):
    """Identity forward; the backward pass multiplies the cotangent by `-scale`."""
    return x


def _reverse_fwd(x, scale):
    return x, scale


def _reverse_bwd(scale, g):
    return -scale * g, jnp.zeros_like(scale)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


@flax.struct.dataclass
class UDAState:
    trainable: Any        # {"model": trained model params, "disc": discriminator params}
    frozen: Any           # model params left alone (SHOT-IM's head), else {}
    batch_stats: Any
    opt_state: Any
    mec: jax.Array        # [C, C]
    hyper: objectives.Hyper
    step: jax.Array


def uda_optimizer(cfg: UDAConfig) -> optax.GradientTransformation:
    return train_lib.make_optimizer(cfg.optimizer, 1.0, momentum=cfg.momentum)


def init_state(variables: dict, cfg: UDAConfig, num_classes: int, *, lr: float,
               tau: float = 1.0, alpha: float = 1.0, seed: int = 0) -> UDAState:
    """The state at the source model; `seed` initialises the discriminator."""
    params = variables["params"]
    if cfg.method == "shot_im":
        head = models.head_param_mask(params)
        trainable, frozen = partition.partition(params, jax.tree.map(lambda h: not h, head))
    else:
        trainable, frozen = params, {}
    disc = {}
    if cfg.method == "dann":
        feat_dim = _feature_dim(params)
        disc = Discriminator(cfg.disc_hidden).init(jax.random.key(seed),
                                                   jnp.zeros((1, feat_dim)))["params"]
    trainable = {"model": trainable, "disc": disc}
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return UDAState(trainable=trainable, frozen=frozen,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=uda_optimizer(cfg).init(trainable),
                    mec=losses.mec_init(num_classes),
                    hyper=objectives.Hyper(f32(lr), f32(tau), f32(alpha)),
                    step=jnp.zeros((), jnp.int32))


def _feature_dim(params) -> int:
    """Input width of the classifier "head" (the penultimate feature dimension)."""
    return int(params["head"]["kernel"].shape[0])


def variables_of(state: UDAState) -> dict:
    """The model's variables (params merged back, batch statistics)."""
    return {"params": partition.merge(state.trainable["model"], state.frozen),
            "batch_stats": state.batch_stats}


def make_step(model, cfg: UDAConfig, num_classes: int) -> Callable:
    """The per-device step `(state, src_images, src_labels, tgt_images) -> (state, metrics)`.

    Collectives over `parallel.AXIS`; run with `parallel.data_parallel`. The state
    may carry a leading grid axis if the step is vmapped (`make_grid_step`).
    Metrics: global means of "ce", "ent" (the entropy term), "div" (marginal
    entropy), "disc" (discriminator BCE), "disc_acc".
    """
    tx = uda_optimizer(cfg)
    disc_net = Discriminator(cfg.disc_hidden)

    def objective(trainable, state, src_x, src_y, tgt_x):
        n_dev = lax.psum(1, AXIS)
        parts = [x for x, used in ((src_x, cfg.uses_source), (tgt_x, cfg.uses_target)) if used]
        x = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        params = partition.merge(trainable["model"], state.frozen)
        (logits, features), updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            return_features=True, mutable=["batch_stats"])
        n_src = src_x.shape[0] if cfg.uses_source else 0
        zero = jnp.zeros((), jnp.float32)
        obj, mec = zero, state.mec
        metrics = dict(ce=zero, ent=zero, div=zero, disc=zero, disc_acc=zero)

        def global_mean(values):  # this device's share of the global mean (see module doc)
            count = lax.psum(values.shape[0], AXIS)
            return n_dev * jnp.sum(values) / count, lax.psum(jnp.sum(values), AXIS) / count

        if cfg.uses_source:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits[:n_src], src_y)
            share, metrics["ce"] = global_mean(ce)
            obj += share
        tgt_logits = logits[n_src:]
        if cfg.loss is not None:
            ent, mec = objectives.per_example(cfg.loss, tgt_logits, state.mec, state.hyper,
                                              mec_momentum=cfg.mec_momentum, axis_name=AXIS)
            share, metrics["ent"] = global_mean(ent)
            obj += (1.0 if cfg.method == "shot_im" else cfg.lam) * share
        if cfg.method == "shot_im":
            div = losses.marginal_entropy(tgt_logits, axis_name=AXIS)
            obj -= div
            metrics["div"] = div
        if cfg.method == "dann":
            reversed_features = reverse_gradient(features, jnp.float32(cfg.adv_weight))
            d_logits = disc_net.apply({"params": trainable["disc"]}, reversed_features)
            domain = (jnp.arange(x.shape[0]) >= n_src).astype(jnp.float32)
            bce = optax.sigmoid_binary_cross_entropy(d_logits, domain)
            share, metrics["disc"] = global_mean(bce)
            obj += share
            _, metrics["disc_acc"] = global_mean(((d_logits > 0) == (domain > 0)).astype(
                jnp.float32))
        return obj, (updates["batch_stats"], mec, metrics)

    def step(state: UDAState, src_x, src_y, tgt_x):
        grads, (batch_stats, mec, metrics) = jax.grad(objective, has_aux=True)(
            state.trainable, state, src_x, src_y, tgt_x)
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        updates = jax.tree.map(lambda u: state.hyper.lr * u, updates)
        trainable = optax.apply_updates(state.trainable, updates)
        new = state.replace(trainable=trainable, batch_stats=batch_stats, opt_state=opt_state,
                            mec=mec, step=state.step + 1)
        return new, metrics

    return step


def make_grid_step(step: Callable) -> Callable:
    """`step` vmapped over a leading grid axis of the state, sharing the batches.

    The whole grid (DEM*'s (tau, alpha) points) is then one compiled program.
    Steps are dispatched one by one from the host rather than scanned: on XLA's
    CPU backend a convolution inside `lax.scan` ran about 40x slower here
    (0.9 s against 20 ms per step of the default config).
    """
    return jax.vmap(step, in_axes=(0, None, None, None))


def make_eval_fn(model, *, grid: bool = False) -> Callable:
    """Per-device `(state, images, labels, mask) -> (correct, count)`, global sums.

    Running statistics (inference mode). With `grid=True`, per grid point.
    """
    def evaluate(state, images, labels, mask):
        logits = model.apply(variables_of(state), images, train=False)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
        return lax.psum(correct, AXIS), lax.psum(jnp.sum(mask), AXIS)

    return jax.vmap(evaluate, in_axes=(0, None, None, None)) if grid else evaluate


class Runner:
    """Compiled UDA training chunks and evaluation for one `UDAConfig` on a set of devices.

    `devices` default to all devices of every process. With several processes
    (`engine.distributed`) every process passes the same global batches, feeds
    its own rows of each (`distributed.process_shard`) and gets the same state
    and metrics back (every metric is a global mean or sum).
    """

    def __init__(self, model, cfg: UDAConfig, num_classes: int, *, backend: str = "pmap",
                 grid: bool = False, devices=None):
        self.devices = parallel.participating(devices)
        self.n_dev = parallel.num_devices(self.devices)
        self.n_local = parallel.num_local_devices(self.devices)
        self.cfg = cfg
        self.grid = grid
        step = make_step(model, cfg, num_classes)
        self._step = parallel.data_parallel(make_grid_step(step) if grid else step,
                                            backend=backend, devices=self.devices,
                                            donate_argnums=(0,))
        self._eval = parallel.data_parallel(make_eval_fn(model, grid=grid), backend=backend,
                                            devices=self.devices)

    def _per_device(self, x, what):
        """`[steps, B, ...]` -> this process's rows, `[steps, local dev, B / dev, ...]`."""
        n = self.n_dev
        if x.shape[1] % n:
            raise ValueError(
                f"The {what} batch size {x.shape[1]} is not divisible by the {n} devices; "
                f"use a multiple of {n} (UDA never pads a training batch: padding would "
                "corrupt BatchNorm statistics, the MEC and the marginal entropy).")
        x = np.asarray(x)[:, distributed.process_shard(x.shape[1], self.devices)]
        return x.reshape(x.shape[0], self.n_local, -1, *x.shape[2:])

    def train(self, state, src_x, src_y, tgt_x):
        """Runs `[steps, B, ...]` batches; returns (host state, metrics `[steps, (grid)]`)."""
        src_x, src_y, tgt_x = (self._per_device(a, w) for a, w in
                               ((src_x, "source"), (src_y, "source"), (tgt_x, "target")))
        rep = parallel.replicate(state, self.n_local)
        out = []
        for t in range(src_x.shape[0]):
            rep, metrics = self._step(rep, src_x[t], src_y[t], tgt_x[t])
            out.append(parallel.unreplicate(metrics))  # global means: equal on every device
        metrics = {k: np.stack([np.asarray(m[k]) for m in out]) for k in out[0]}
        return jax.tree.map(np.asarray, parallel.unreplicate(rep)), metrics

    def accuracy(self, state, dataset, *, batch_size: int) -> np.ndarray:
        """Accuracy on every example of `dataset` (padded, masked); `[grid]` with a grid."""
        from dem_jax.data import pipeline
        n = self.n_dev
        batch_size = -(-batch_size // n) * n
        rep = parallel.replicate(state, self.n_local)
        correct = total = 0
        for idx, mask in pipeline.padded_batches(len(dataset), batch_size):
            c, t = parallel.unreplicate(self._eval(rep, *parallel.shard_batch(
                (dataset.images[idx], dataset.labels[idx], mask), self.devices)))
            correct = correct + np.asarray(c)  # psum'd: equal on every device
            total = total + np.asarray(t)
        return correct / total
