"""Semi-supervised learning (SSL): supervised-only, Ent.Min, VAT, MixMatch, FixMatch, FreeMatch.

The methods as USB (Wang et al. 2022, the benchmark the paper's SSL tables use)
runs them, each also with AdaDEM (paper section 5): AdaDEM **replaces** EM in
Ent.Min and in VAT's entropy term, and is **added** (weight `adadem_weight`)
to MixMatch, FixMatch and FreeMatch, always on the weakly augmented unlabelled
examples only, with its MEC in the train state (updated from the global
unlabelled batch).

Unlabelled losses, as pure functions of logits (tests compare them with
hand-written references); every batch mean is over the GLOBAL batch
(`lax.psum` over `axis_name`), so 8 devices give the result of one:

* `entmin_loss`: mean entropy `H(p)` (or AdaDEM) of the unlabelled logits;
* `vat_direction` / `vat_loss`: KL(p || p(x + r_adv)) with r_adv found by one
  power iteration from a random direction (Miyato et al.), `eps` its L2 norm;
* `sharpen`, `mixup`, `mixmatch_loss`: MixMatch's temperature sharpening of the
  mean prediction over two weak views, mixup with lambda' = max(l, 1 - l), and
  the MSE between mixed predictions and mixed targets;
* `fixmatch_loss`: CE(strong, argmax weak) on examples whose weak confidence
  is >= `p_cutoff` (0.95), mean over all unlabelled examples;
* `freematch_update` / `freematch_mask` / `freematch_fairness`: FreeMatch's
  self-adaptive global threshold `time_p` (EMA of the mean confidence), the
  class-wise scale `p_model / max p_model`, and the self-adaptive fairness
  term `sum SumNorm(p_model / label_hist) log SumNorm(mean p_s / hist_s)` over the
  masked strong predictions (added with weight `ent_loss_ratio`).

`make_step` composes them into one per-device train step (collectives over
`parallel.AXIS`): augmentation on the device from per-example keys
(`data.augment`), one forward of the concatenated labelled and unlabelled
views (BatchNorm sees the mixture, synchronised over devices), the loss, SGD.

  >>> import jax.numpy as jnp
  >>> from dem_jax.tasks import ssl
  >>> loss, mask = ssl.fixmatch_loss(jnp.array([[5.0, 0.0]]), jnp.array([[1.0, 2.0]]), 0.95)
  >>> round(float(loss), 4), mask.tolist()
  (1.3133, [1.0])
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
from dem_jax.data import augment
from dem_jax.engine import distributed
from dem_jax.engine import parallel

METHODS = ("supervised", "entmin", "vat", "mixmatch", "fixmatch", "freematch")
REPLACES_EM = ("entmin", "vat")      # AdaDEM replaces their EM term
ADDS_ADADEM = ("mixmatch", "fixmatch", "freematch")
AXIS = parallel.AXIS

# USB's settings (classic_cv configs and algorithm defaults) that the methods use.
# Ent.Min is not in USB: the paper's CE + 0.3 x EM on the unlabelled batch.
USB = {
    "supervised": dict(uratio=1),
    "entmin": dict(uratio=1, lambda_u=0.3),
    "vat": dict(uratio=1, lambda_u=0.3, lambda_ent=0.06, vat_eps=6.0, vat_xi=1e-6,
                unsup_warmup=0.4),
    "mixmatch": dict(uratio=1, lambda_u=75.0, T=0.5, mixup_alpha=0.5, unsup_warmup=0.4),
    "fixmatch": dict(uratio=7, lambda_u=1.0, p_cutoff=0.95),
    "freematch": dict(uratio=7, lambda_u=1.0, ema_p=0.999, ent_loss_ratio=0.001),
}


@dataclasses.dataclass(frozen=True)
class SSLConfig:
    """A method and its hyperparameters (hashable: it selects code paths).

    Attributes:
      method: one of METHODS.
      adadem: AdaDEM in place of EM (entmin, vat) or added (mixmatch, fixmatch,
        freematch); not for "supervised".
      num_steps: training steps (the learning-rate schedule and warm-ups).
      uratio: unlabelled examples per labelled one in a batch.
      lambda_u: weight of the unlabelled loss.
      lambda_ent: VAT's entropy weight.
      vat_eps, vat_xi: VAT's perturbation norm, given for 32x32x3 images
        normalised by CIFAR's std (USB: 6.0) and scaled here to the same
        per-pixel RMS in [0, 1] units (`vat_radius`); the finite-difference
        step of the power iteration.
      T: MixMatch's sharpening temperature.
      mixup_alpha: MixMatch's Beta(alpha, alpha).
      unsup_warmup: fraction of `num_steps` over which lambda_u ramps up from 0.
      p_cutoff: FixMatch's confidence threshold.
      ema_p: FreeMatch's EMA rate of its thresholds.
      ent_loss_ratio: FreeMatch's fairness weight.
      adadem_weight: weight of AdaDEM where it is added.
      mec_momentum: pi of the MEC update.
      lr, momentum, weight_decay: SGD with Nesterov momentum, USB's cosine
        schedule `lr cos(7 pi k / (16 K))`.
      flip, pad, num_ops, cutout: augmentation (`data.augment`).
    """
    method: str = "fixmatch"
    adadem: bool = False
    num_steps: int = 1000
    uratio: int = 7
    lambda_u: float = 1.0
    lambda_ent: float = 0.06
    vat_eps: float = 6.0
    vat_xi: float = 1e-6
    T: float = 0.5
    mixup_alpha: float = 0.5
    unsup_warmup: float = 0.0
    p_cutoff: float = 0.95
    ema_p: float = 0.999
    ent_loss_ratio: float = 0.001
    adadem_weight: float = 0.3
    mec_momentum: float = 0.1
    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    flip: bool = False
    pad: int = 0
    num_ops: int = 3
    cutout: float = 0.5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Unknown SSL method {self.method!r}; choose one of {METHODS}.")
        if self.method == "supervised" and self.adadem:
            raise ValueError("supervised+adadem makes no sense: the supervised baseline sees "
                             "no unlabelled data, and AdaDEM is computed on unlabelled "
                             "examples only. Use a semi-supervised method with +adadem.")
        if self.uratio < 1 or self.num_steps < 1:
            raise ValueError("uratio and num_steps must be >= 1.")
        if not 0.0 < self.mec_momentum <= 1.0:
            raise ValueError(f"mec_momentum must be in (0, 1], got {self.mec_momentum}.")

    @classmethod
    def usb(cls, method: str, adadem: bool = False, **overrides) -> "SSLConfig":
        """The method with USB's hyperparameters (`USB`), then `overrides`."""
        return cls(method=method, adadem=adadem, **{**USB.get(method, {}), **overrides})


@flax.struct.dataclass
class FreeMatchState:
    p_model: jax.Array      # [C] EMA of the mean unlabelled prediction
    label_hist: jax.Array   # [C] EMA of the histogram of pseudo-labels
    time_p: jax.Array       # [] EMA of the mean confidence (the global threshold)


def freematch_init(num_classes: int) -> FreeMatchState:
    u = jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
    return FreeMatchState(p_model=u, label_hist=u, time_p=jnp.float32(1.0 / num_classes))


@flax.struct.dataclass
class SSLState:
    params: Any
    batch_stats: Any
    opt_state: Any
    mec: jax.Array                 # [C, C] AdaDEM's MEC
    freematch: FreeMatchState
    step: jax.Array
    seed: jax.Array                # augmentation and VAT/mixup noise: key(seed) folded with step


# ----------------------------------------------------------------------------- helpers


def _gsum(x, axis_name):
    return lax.psum(x, axis_name) if axis_name else x


def global_mean(values, *, where=None, axis_name=None):
    """Mean of `values` over the examples of all devices (`where` weights them, else 1)."""
    w = jnp.ones_like(values) if where is None else where.astype(values.dtype)
    total = _gsum(jnp.sum(values * w), axis_name)
    count = _gsum(jnp.sum(w), axis_name)
    return total / jnp.maximum(count, 1e-12)


def _n_global(n):
    """Examples of all devices along AXIS, when each has n (static)."""
    return n * lax.psum(1, AXIS)


def _count(n, axis_name):
    return _gsum(jnp.float32(n), axis_name)


# ----------------------------------------------------------------------------- losses


def entmin_loss(logits, *, axis_name=None):
    """Ent.Min: mean entropy of the predictions over the global batch.

    Example:
      >>> round(float(entmin_loss(jnp.zeros((2, 4)))), 4)   # log 4
      1.3863
    """
    return global_mean(losses.entropy(logits), axis_name=axis_name)


def adadem_loss(logits, mec, *, mec_momentum=0.1, axis_name=None):
    """AdaDEM's mean over the global batch and the new MEC (`losses.adadem`).

    Example:
      >>> loss, mec = adadem_loss(jnp.zeros((2, 4)), losses.mec_init(4))
    """
    per_example, new_mec = losses.adadem(logits, mec, momentum=mec_momentum,
                                         axis_name=axis_name)
    return global_mean(per_example, axis_name=axis_name), new_mec


def kl_from_logits(target_logits, logits):
    """Per-example KL(softmax(target) || softmax(logits)), `[N]` (the target held fixed)."""
    q = jax.nn.softmax(lax.stop_gradient(target_logits))
    return jnp.sum(q * (jax.nn.log_softmax(lax.stop_gradient(target_logits))
                        - jax.nn.log_softmax(logits)), -1)


def l2_normalize(d):
    """Each example of `d` [N, ...] scaled to unit L2 norm (USB adds 1e-16)."""
    norm = jnp.sqrt(jnp.sum(d ** 2, axis=tuple(range(1, d.ndim)), keepdims=True))
    return d / (norm + 1e-16)


def vat_direction(predict: Callable, x, logits, noise, *, xi, axis_name=None):
    """The adversarial direction of VAT: one power iteration from `noise`.

    `r = xi * normalize(noise)`; the gradient in r of the global sum of
    KL(p(x) || p(x + r)) (p(x) from `logits`, fixed), normalised per example.
    `predict(x)` returns the logits of a batch. Any device-independent scale of
    the gradient cancels in the normalisation.

    Returns:
      `[N, ...]` unit-norm directions.
    """
    def distance(r):
        return _gsum(jnp.sum(kl_from_logits(logits, predict(x + r))), axis_name)

    r = xi * l2_normalize(noise)
    return l2_normalize(jax.grad(distance)(r))


def vat_loss(predict: Callable, x, logits, noise, *, eps, xi, axis_name=None):
    """VAT: mean over the global batch of KL(p(x) || p(x + eps * d_adv)).

    Example:
      >>> f = lambda x: x.reshape(x.shape[0], -1)[:, :3] * 4.0
      >>> x = jnp.ones((2, 3))
      >>> loss = vat_loss(f, x, f(x), jnp.ones((2, 3)), eps=0.5, xi=1e-6)
    """
    d = lax.stop_gradient(vat_direction(predict, x, logits, noise, xi=xi, axis_name=axis_name))
    return global_mean(kl_from_logits(logits, predict(x + eps * d)), axis_name=axis_name)


def sharpen(probs, T):
    """MixMatch's sharpening: `p^(1/T)` renormalised, `[N, C]`.

    Example:
      >>> sharpen(jnp.array([[0.6, 0.4]]), 0.5).round(4).tolist()
      [[0.6923, 0.3077]]
    """
    p = probs ** (1.0 / T)
    return p / jnp.sum(p, -1, keepdims=True)


def mixup(x, y, lam, perm):
    """`lam x + (1 - lam) x[perm]` for inputs and targets alike (MixMatch's lam' >= 0.5 given)."""
    mix = lambda a: lam * a + (1.0 - lam) * a[perm]  # noqa: E731
    return mix(x), mix(y)


def mixup_lambda(key, alpha):
    """MixMatch's lambda' = max(l, 1 - l), l ~ Beta(alpha, alpha)."""
    lam = jax.random.beta(key, alpha, alpha)
    return jnp.maximum(lam, 1.0 - lam)


def mixmatch_loss(logits_u, targets_u, *, axis_name=None):
    """MixMatch's unlabelled loss: mean over examples and classes of (softmax - target)^2.

    Example:
      >>> float(mixmatch_loss(jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])))
      0.25
    """
    per_example = jnp.mean((jax.nn.softmax(logits_u) - targets_u) ** 2, -1)
    return global_mean(per_example, axis_name=axis_name)


def fixmatch_loss(logits_w, logits_s, p_cutoff, *, axis_name=None):
    """FixMatch: CE(strong, argmax weak) where max softmax(weak) >= p_cutoff, mean over all.

    Returns:
      (scalar loss, float `[N]` mask).

    Example:
      >>> loss, mask = fixmatch_loss(jnp.array([[0.0, 0.1]]), jnp.array([[1.0, 2.0]]), 0.95)
      >>> float(loss), mask.tolist()
      (0.0, [0.0])
    """
    probs = jax.nn.softmax(lax.stop_gradient(logits_w))
    mask = (jnp.max(probs, -1) >= p_cutoff).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_s, jnp.argmax(probs, -1))
    return global_mean(ce * mask, axis_name=axis_name), mask


def freematch_update(state: FreeMatchState, probs, ema_p, *, axis_name=None) -> FreeMatchState:
    """FreeMatch's EMAs from the weak unlabelled predictions `probs` [N, C] (no gradient)."""
    probs = lax.stop_gradient(probs)
    n = _count(probs.shape[0], axis_name)
    mean_conf = _gsum(jnp.sum(jnp.max(probs, -1)), axis_name) / n
    mean_probs = _gsum(jnp.sum(probs, 0), axis_name) / n
    hist = _gsum(jnp.sum(jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1]), 0),
                 axis_name) / n
    return FreeMatchState(
        p_model=ema_p * state.p_model + (1 - ema_p) * mean_probs,
        label_hist=ema_p * state.label_hist + (1 - ema_p) * hist,
        time_p=ema_p * state.time_p + (1 - ema_p) * mean_conf)


def freematch_mask(state: FreeMatchState, probs):
    """Self-adaptive thresholds: max p >= time_p * (p_model / max p_model)[argmax p], float `[N]`."""
    probs = lax.stop_gradient(probs)
    scale = state.p_model / jnp.max(state.p_model)
    threshold = state.time_p * scale[jnp.argmax(probs, -1)]
    return (jnp.max(probs, -1) >= threshold).astype(jnp.float32)


def freematch_fairness(logits_s, mask, state: FreeMatchState, *, axis_name=None):
    """FreeMatch's self-adaptive fairness term over the masked strong predictions.

    `sum_c SumNorm(p_model / label_hist)_c log SumNorm(mean p_s / hist_s)_c`
    (the negative cross-entropy; minimised), mean p_s and hist_s over the
    examples with mask 1 of the global batch; 0 when none is masked in.
    """
    probs = jax.nn.softmax(logits_s)
    c = probs.shape[-1]
    count = _gsum(jnp.sum(mask), axis_name)
    safe = jnp.maximum(count, 1.0)
    hist_s = _gsum(jnp.sum(mask[:, None] * jax.nn.one_hot(jnp.argmax(probs, -1), c), 0),
                   axis_name) / safe
    mean_s = _gsum(jnp.sum(mask[:, None] * probs, 0), axis_name) / safe
    inv = lambda h: jnp.where(h > 0, 1.0 / jnp.where(h > 0, h, 1.0), 0.0)  # noqa: E731
    model = lax.stop_gradient(state.p_model * inv(state.label_hist))
    model = model / jnp.sum(model)
    mod_s = mean_s * lax.stop_gradient(inv(hist_s))
    mod_s = mod_s / jnp.maximum(jnp.sum(mod_s), 1e-12)
    value = jnp.sum(model * jnp.log(mod_s + 1e-12))
    return jnp.where(count > 0, value, 0.0)


# ----------------------------------------------------------------------------- the step


def vat_radius(cfg: SSLConfig, image_shape) -> float:
    """USB's `vat_eps` (32x32x3, CIFAR-normalised) as the L2 norm of the same per-pixel RMS here."""
    return cfg.vat_eps * 0.25 / math.sqrt(32 * 32 * 3) * math.sqrt(float(np.prod(image_shape)))


def make_optimizer(cfg: SSLConfig) -> optax.GradientTransformation:
    """SGD, Nesterov momentum, weight decay, USB's cosine `lr cos(7 pi k / (16 K))`."""
    schedule = lambda k: cfg.lr * jnp.cos(7 * jnp.pi * k / (16 * cfg.num_steps))  # noqa: E731
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay),
                       optax.sgd(schedule, momentum=cfg.momentum, nesterov=True))


def init_state(model, cfg: SSLConfig, num_classes: int, image_shape, seed: int) -> SSLState:
    """A fresh model (initialised from `seed`) and the method's state."""
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
    params = variables["params"]
    return SSLState(params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=make_optimizer(cfg).init(params),
                    mec=losses.mec_init(num_classes), freematch=freematch_init(num_classes),
                    step=jnp.zeros((), jnp.int32), seed=jnp.asarray(seed, jnp.int32))


def make_step(model, cfg: SSLConfig, num_classes: int) -> Callable:
    """The per-device step `(state, x_lb, y_lb, x_ulb) -> (state, metrics)`.

    `x_lb` [B, H, W, C] and `x_ulb` [uratio B, H, W, C] are this device's raw
    images in [0, 1]; views are made here, each from the key of its global
    example index, so the step does not depend on the device count. Metrics
    (global means): "loss", "sup", "unsup", "adadem" (or the replaced EM),
    "mask" (fraction of unlabelled examples used), "lambda_u".
    """
    tx = make_optimizer(cfg)
    aug = dict(flip=cfg.flip, pad=cfg.pad or None)
    strong_aug = dict(aug, num_ops=cfg.num_ops, cutout=cfg.cutout)

    def views(key, x, start, kind):
        keys = augment.example_keys(key, start, x.shape[0])
        return (augment.weak if kind == "weak" else augment.strong)(
            keys, x, **(aug if kind == "weak" else strong_aug))

    def objective(params, state: SSLState, x_lb, y_lb, x_ulb):
        me = lax.axis_index(AXIS)
        n_lb, n_ulb = x_lb.shape[0], x_ulb.shape[0]
        key = jax.random.fold_in(jax.random.key(state.seed), state.step)
        k_lb, k_w, k_s, k_w2, k_noise, k_mix = jax.random.split(key, 6)
        variables = {"params": params, "batch_stats": state.batch_stats}

        def forward(x, keep_stats=True):
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, (updates["batch_stats"] if keep_stats else state.batch_stats)

        warm = 1.0
        if cfg.unsup_warmup > 0:
            warm = jnp.clip(state.step / (cfg.unsup_warmup * cfg.num_steps), 0.0, 1.0)
        lambda_u = cfg.lambda_u * warm
        zero = jnp.zeros((), jnp.float32)
        m = dict(sup=zero, unsup=zero, adadem=zero, mask=zero, lambda_u=jnp.float32(lambda_u))
        mec, fm = state.mec, state.freematch
        xw_lb = views(k_lb, x_lb, me * n_lb, "weak")
        onehot_lb = jax.nn.one_hot(y_lb, num_classes)

        if cfg.method == "supervised":
            logits, stats = forward(xw_lb)
            m["sup"] = global_mean(optax.softmax_cross_entropy(logits, onehot_lb),
                                   axis_name=AXIS)
            obj = m["sup"]
        elif cfg.method in ("entmin", "fixmatch", "freematch"):
            xw = views(k_w, x_ulb, me * n_ulb, "weak")
            parts = [xw_lb, xw]
            if cfg.method != "entmin":
                parts.append(views(k_s, x_ulb, me * n_ulb, "strong"))
            logits, stats = forward(jnp.concatenate(parts))
            logits_lb, logits_w = logits[:n_lb], logits[n_lb:n_lb + n_ulb]
            m["sup"] = global_mean(optax.softmax_cross_entropy(logits_lb, onehot_lb),
                                   axis_name=AXIS)
            obj = m["sup"]
            if cfg.method == "entmin":
                if cfg.adadem:
                    m["adadem"], mec = adadem_loss(logits_w, mec, mec_momentum=cfg.mec_momentum,
                                                   axis_name=AXIS)
                else:
                    m["adadem"] = entmin_loss(logits_w, axis_name=AXIS)
                m["unsup"] = m["adadem"]
                obj = obj + lambda_u * m["unsup"]
            else:
                logits_s = logits[n_lb + n_ulb:]
                if cfg.method == "fixmatch":
                    m["unsup"], mask = fixmatch_loss(logits_w, logits_s, cfg.p_cutoff,
                                                     axis_name=AXIS)
                else:
                    probs = jax.nn.softmax(lax.stop_gradient(logits_w))
                    fm = freematch_update(fm, probs, cfg.ema_p, axis_name=AXIS)
                    mask = freematch_mask(fm, probs)
                    ce = optax.softmax_cross_entropy_with_integer_labels(
                        logits_s, jnp.argmax(probs, -1))
                    m["unsup"] = global_mean(ce * mask, axis_name=AXIS)
                    obj = obj + cfg.ent_loss_ratio * freematch_fairness(
                        logits_s, mask, fm, axis_name=AXIS)
                m["mask"] = global_mean(mask, axis_name=AXIS)
                obj = obj + lambda_u * m["unsup"]
                if cfg.adadem:
                    m["adadem"], mec = adadem_loss(logits_w, mec, mec_momentum=cfg.mec_momentum,
                                                   axis_name=AXIS)
                    obj = obj + cfg.adadem_weight * m["adadem"]
        elif cfg.method == "vat":
            logits_lb, stats = forward(xw_lb)
            m["sup"] = global_mean(optax.softmax_cross_entropy(logits_lb, onehot_lb),
                                   axis_name=AXIS)
            xw = views(k_w, x_ulb, me * n_ulb, "weak")
            # USB freezes the running statistics for the unlabelled passes.
            logits_w, _ = forward(xw, keep_stats=False)
            predict = lambda x: forward(x, keep_stats=False)[0]  # noqa: E731
            noise = jax.vmap(lambda k: jax.random.normal(k, xw.shape[1:]))(
                augment.example_keys(k_noise, me * n_ulb, n_ulb))
            m["unsup"] = vat_loss(predict, xw, logits_w, noise, xi=cfg.vat_xi,
                                  eps=vat_radius(cfg, xw.shape[1:]), axis_name=AXIS)
            if cfg.adadem:
                m["adadem"], mec = adadem_loss(logits_w, mec, mec_momentum=cfg.mec_momentum,
                                               axis_name=AXIS)
            else:
                m["adadem"] = entmin_loss(logits_w, axis_name=AXIS)
            obj = m["sup"] + lambda_u * m["unsup"] + cfg.lambda_ent * m["adadem"]
        else:  # mixmatch
            xw1 = views(k_w, x_ulb, me * n_ulb, "weak")
            xw2 = views(k_w2, x_ulb, me * n_ulb, "weak")
            # The guessing pass: no running-statistics update (USB freezes them);
            # its gradient only reaches the loss through AdaDEM on the first view.
            guess_logits, _ = forward(jnp.concatenate([xw1, xw2]), keep_stats=False)
            g1, g2 = guess_logits[:n_ulb], guess_logits[n_ulb:]
            avg = (jax.nn.softmax(lax.stop_gradient(g1)) + jax.nn.softmax(
                lax.stop_gradient(g2))) / 2
            q = sharpen(avg, cfg.T)
            # Mixup over the GLOBAL batch (gathered: all labelled, all first views, all
            # second views), the same lambda and permutation on every device.
            k_lam, k_perm = jax.random.split(k_mix)
            gather = lambda a: lax.all_gather(a, AXIS, tiled=True)  # noqa: E731
            gx = jnp.concatenate([gather(xw_lb), gather(xw1), gather(xw2)])
            gy = jnp.concatenate([gather(onehot_lb), gather(q), gather(q)])
            n_glb, n_gulb = gx.shape[0] - 2 * _n_global(n_ulb), _n_global(n_ulb)
            lam = mixup_lambda(k_lam, cfg.mixup_alpha)
            perm = jax.random.permutation(k_perm, gx.shape[0])
            mx, my = mixup(gx, gy, lam, perm)
            local = jnp.arange(n_ulb)
            rows = jnp.concatenate([me * n_lb + jnp.arange(n_lb), n_glb + me * n_ulb + local,
                                    n_glb + n_gulb + me * n_ulb + local])
            logits, stats = forward(mx[rows])
            my = lax.stop_gradient(my[rows])
            m["sup"] = global_mean(optax.softmax_cross_entropy(logits[:n_lb], my[:n_lb]),
                                   axis_name=AXIS)
            m["unsup"] = mixmatch_loss(logits[n_lb:], my[n_lb:], axis_name=AXIS)
            obj = m["sup"] + lambda_u * m["unsup"]
            if cfg.adadem:
                m["adadem"], mec = adadem_loss(g1, mec, mec_momentum=cfg.mec_momentum,
                                               axis_name=AXIS)
                obj = obj + cfg.adadem_weight * m["adadem"]
        m["loss"] = obj
        return obj, (stats, mec, fm, m)

    def step(state: SSLState, x_lb, y_lb, x_ulb):
        grads, (stats, mec, fm, metrics) = jax.grad(objective, has_aux=True)(
            state.params, state, x_lb, y_lb, x_ulb)
        grads = lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(params=params, batch_stats=stats, opt_state=opt_state, mec=mec,
                            freematch=fm, step=state.step + 1)
        return new, metrics

    return step


def make_eval_fn(model, num_classes: int) -> Callable:
    """Per-device `(state, images, labels, mask) -> confusion [C true, C predicted]`, psum'd."""
    def evaluate(state, images, labels, mask):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             images, train=False)
        pred = jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        true = jax.nn.one_hot(labels, num_classes) * mask[:, None]
        return lax.psum(true.T @ pred, AXIS)

    return evaluate


def scores(confusion) -> dict:
    """Top-1 accuracy, per-class F1 (`[C]`) and macro F1 from a confusion matrix.

    Example:
      >>> scores(np.array([[2, 0], [1, 1]]))["accuracy"]
      0.75
    """
    cm = np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    precision = tp / np.maximum(cm.sum(0), 1e-12)
    recall = tp / np.maximum(cm.sum(1), 1e-12)
    f1 = np.where(precision + recall > 0, 2 * precision * recall /
                  np.maximum(precision + recall, 1e-12), 0.0)
    return {"accuracy": float(tp.sum() / max(cm.sum(), 1)), "f1": f1.tolist(),
            "macro_f1": float(f1.mean())}


class Runner:
    """Compiled SSL training steps and evaluation for one `SSLConfig` on a set of devices.

    With several processes every process passes the same global batches and
    feeds its own rows of each (`distributed.process_shard`).
    """

    def __init__(self, model, cfg: SSLConfig, num_classes: int, *, backend: str = "pmap",
                 devices=None):
        self.devices = parallel.participating(devices)
        self.n_dev = parallel.num_devices(self.devices)
        self.n_local = parallel.num_local_devices(self.devices)
        self.cfg = cfg
        self.num_classes = num_classes
        self._step = parallel.data_parallel(make_step(model, cfg, num_classes), backend=backend,
                                            devices=self.devices, donate_argnums=(0,))
        self._eval = parallel.data_parallel(make_eval_fn(model, num_classes), backend=backend,
                                            devices=self.devices)

    def _per_device(self, x, what):
        """`[steps, B, ...]` -> this process's rows, `[steps, local dev, B / dev, ...]`."""
        if x.shape[1] % self.n_dev:
            raise ValueError(
                f"The {what} batch size {x.shape[1]} is not divisible by the {self.n_dev} "
                f"devices; use a multiple of {self.n_dev} (a training batch is never padded: "
                "padding would corrupt BatchNorm statistics, the MEC and the thresholds).")
        x = np.asarray(x)[:, distributed.process_shard(x.shape[1], self.devices)]
        return x.reshape(x.shape[0], self.n_local, -1, *x.shape[2:])

    def train(self, state, x_lb, y_lb, x_ulb):
        """Runs `[steps, B, ...]` batches; returns (host state, metrics `{name: [steps]}`)."""
        x_lb, y_lb = self._per_device(x_lb, "labelled"), self._per_device(y_lb, "labelled")
        x_ulb = self._per_device(x_ulb, "unlabelled")
        rep = parallel.replicate(state, self.n_local)
        out = []
        for t in range(x_lb.shape[0]):
            rep, metrics = self._step(rep, x_lb[t], y_lb[t], x_ulb[t])
            out.append(metrics)
        out = [parallel.unreplicate(m) for m in out]  # global means: equal on every device
        metrics = {k: np.stack([np.asarray(m[k]) for m in out]) for k in out[0]}
        return jax.tree.map(np.asarray, parallel.unreplicate(rep)), metrics

    def confusion(self, state, dataset, *, batch_size: int) -> np.ndarray:
        """Confusion matrix `[C, C]` (rows: true class) on every example of `dataset`."""
        from dem_jax.data import pipeline
        batch_size = -(-batch_size // self.n_dev) * self.n_dev
        rep = parallel.replicate(state, self.n_local)
        total = np.zeros((self.num_classes, self.num_classes), np.int64)
        for idx, mask in pipeline.padded_batches(len(dataset), batch_size):
            cm = parallel.unreplicate(self._eval(rep, *parallel.shard_batch(
                (dataset.images[idx], dataset.labels[idx], mask.astype(np.float32)),
                self.devices)))
            total += np.rint(np.asarray(cm)).astype(np.int64)
        return total
