"""Supervised source training and evaluation, data parallel, checkpointed, resumable.

The model that test-time adaptation starts from is trained here on the clean
source data. The per-device `train_step` averages gradients with `lax.pmean`;
BatchNorm statistics are averaged by the model itself (its `axis_name`).
Restarting an interrupted run with the same arguments continues from the last
epoch checkpoint and ends with the same parameters as an uninterrupted run:
the batch order and the augmentation of epoch e depend only on (seed, e).
With several processes (`engine.distributed`) every process draws the same
global batches and feeds only its rows of each (`parallel.shard_batch`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dem_jax import models
from dem_jax.data import pipeline
from dem_jax.data.sources import ArrayDataset
from dem_jax.engine import checkpoint as ckpt_lib
from dem_jax.engine import metrics as metrics_lib
from dem_jax.engine import parallel
from dem_jax.engine import reporting

AUGMENTATIONS = ("none", "shift", "crop_flip")
OPTIMIZERS = ("sgd", "sgd_momentum", "adam")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """How the source model is trained (the `source` block of an experiment config)."""
    model: str = "cnn"
    model_kwargs: tuple = ()          # ((name, value), ...) so the config stays hashable
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd_momentum"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "shift"
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"source.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"source.augment must be one of {AUGMENTATIONS}, got {self.augment!r}.")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("source.epochs and source.batch_size must be >= 1.")


def build_model(name: str, num_classes: int, model_kwargs=()):
    """The model with BatchNorm synchronised over the data-parallel axis."""
    return models.create_model(name, num_classes=num_classes, axis_name=parallel.AXIS,
                               **dict(model_kwargs))


def make_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """SGD, SGD with momentum or Adam, with optional (decoupled for Adam) weight decay."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")
    if name == "adam":
        return optax.adamw(learning_rate, weight_decay=weight_decay) if weight_decay \
            else optax.adam(learning_rate)
    tx = optax.sgd(learning_rate, momentum=momentum if name == "sgd_momentum" else None)
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx


def augment(images: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    """Host-side augmentation, so it does not depend on the number of devices.

    "shift": random translation by up to H/8 pixels (zero fill), for digits;
    "crop_flip": CIFAR's 4-pixel padded random crop and horizontal flip.
    """
    if kind == "none":
        return images
    n, h, w, _ = images.shape
    pad = max(1, h // 8) if kind == "shift" else 4
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = rng.integers(0, 2 * pad + 1, n)
    dx = rng.integers(0, 2 * pad + 1, n)
    rows = dy[:, None] + np.arange(h)[None]
    cols = dx[:, None] + np.arange(w)[None]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if kind == "crop_flip":
        flip = rng.random(n) < 0.5
        out[flip] = out[flip, :, ::-1]
    return out


def make_train_step(model, tx) -> Callable:
    """Per-device supervised step: cross-entropy, gradients averaged over devices."""

    def train_step(state: TrainState, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images,
                train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        grads = lax.pmean(grads, parallel.AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": lax.pmean(loss, parallel.AXIS),
                   "accuracy": lax.pmean(jnp.mean(logits.argmax(-1) == labels), parallel.AXIS)}
        return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return train_step


def make_eval_step(model) -> Callable:
    """Per-device evaluation with running statistics; padded examples masked out."""

    def eval_step(variables, images, labels, mask):
        logits = model.apply(variables, images, train=False)
        correct = jnp.sum((logits.argmax(-1) == labels) & mask)
        return lax.psum(correct, parallel.AXIS), lax.psum(jnp.sum(mask), parallel.AXIS)

    return eval_step


def evaluate(model: flax.linen.Module, variables: Any, dataset: ArrayDataset, *,
             batch_size: int, backend: str = "pmap",
             devices: Sequence[jax.Device] | None = None) -> float:
    """Top-1 accuracy of `variables` on every example of `dataset` (padded, masked).

    `devices`: those to run on (default: all, of every process). With several
    processes each feeds its rows of every batch; the counts are psum'd.
    """
    devices = parallel.participating(devices)
    n_dev = parallel.num_devices(devices)
    batch_size = -(-batch_size // n_dev) * n_dev
    step = parallel.data_parallel(make_eval_step(model), backend=backend, devices=devices)
    rep = parallel.replicate(variables, parallel.num_local_devices(devices))
    correct = total = 0
    for idx, mask in pipeline.padded_batches(len(dataset), batch_size):
        c, t = step(rep, *parallel.shard_batch((dataset.images[idx], dataset.labels[idx], mask),
                                               devices))
        c, t = parallel.unreplicate((c, t))  # psum'd: equal on every device
        correct += int(c)
        total += int(t)
    assert total == len(dataset), (total, len(dataset))
    return correct / total


def train_source(train_ds: ArrayDataset, test_ds: ArrayDataset, cfg: SourceConfig,
                 workdir: str, *, backend: str = "pmap",
                 log: reporting.MetricsLog | None = None,
                 devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Trains (or resumes, or loads) the source model; returns its variables.

    Checkpoints go to `<workdir>/source` after every epoch. A finished run is
    loaded, not retrained. The step metrics are read from the device every
    `log.every_steps` steps and logged as per-epoch means. `devices`: those to
    train on (default: all, of every process); with several processes every
    process draws the same global batches and feeds only its rows of each, and
    all end with the same variables.

    Returns:
      {"params": ..., "batch_stats": ...} as host arrays.
    """
    devices = parallel.participating(devices)
    n_dev = parallel.num_devices(devices)
    if cfg.batch_size % n_dev:
        raise ValueError(f"source.batch_size={cfg.batch_size} is not divisible by the "
                         f"{n_dev} devices; use a multiple of {n_dev}.")
    model = build_model(cfg.model, train_ds.num_classes, cfg.model_kwargs)
    steps_per_epoch = len(train_ds) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"source.batch_size={cfg.batch_size} exceeds the {len(train_ds)} "
                         "training examples.")
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.epochs * steps_per_epoch)
    tx = make_optimizer(cfg.optimizer, schedule, momentum=cfg.momentum,
                        weight_decay=cfg.weight_decay)
    variables = models.init_variables(model, jax.random.key(cfg.seed),
                                      (1, *train_ds.images.shape[1:]))
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"],
                       variables["batch_stats"], tx.init(variables["params"]))

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "source"))
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start = meta["epoch"] + 1
        if meta.get("config") != repr(cfg):
            raise ValueError(
                f"{ckpt.directory} holds a source model trained with a different "
                f"configuration:\n  {meta.get('config')}\nnow:\n  {repr(cfg)}\n"
                "Use another --workdir or delete that directory.")
    dropped = len(train_ds) - steps_per_epoch * cfg.batch_size
    if dropped and start < cfg.epochs and reporting.is_writer():
        print(f"[source] {dropped} of {len(train_ds)} training examples are left out of each "
              "epoch (the last partial batch; a different set each epoch, by the reshuffle).")
    every_steps = log.every_steps if log is not None else 100
    step_fn = parallel.data_parallel(make_train_step(model, tx), backend=backend,
                                     devices=devices, donate_argnums=(0,))
    rep = parallel.replicate(state, parallel.num_local_devices(devices))
    for epoch in reporting.progress(range(start, cfg.epochs), desc="source training",
                                    total=cfg.epochs, initial=start):
        rng = np.random.default_rng([cfg.seed, epoch])
        with warnings.catch_warnings():  # the drop is reported once above
            warnings.simplefilter("ignore")
            batches = pipeline.batch_indices(len(train_ds), cfg.batch_size,
                                             seed=int(rng.integers(2**31)), remainder="drop")
        # Step metrics stay on the device, read every `every_steps` steps.
        epoch_metrics = metrics_lib.StepMetrics(("loss", "accuracy"), len(batches),
                                                every_steps=every_steps)
        for idx in batches:
            images = augment(train_ds.images[idx], rng, cfg.augment)
            rep, metrics = step_fn(rep, *parallel.shard_batch((images, train_ds.labels[idx]),
                                                              devices))
            epoch_metrics.add(parallel.unreplicate(metrics))  # pmean'd: equal on every device
        sums = epoch_metrics.means()
        state = parallel.unreplicate(rep)
        ckpt.save(epoch, state, {"epoch": epoch, "config": repr(cfg)})
        if log is not None:
            log.write(phase="source", epoch=epoch, **sums)
    ckpt.close()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    variables = jax.tree.map(np.asarray, variables)
    if log is not None and test_ds is not None:
        acc = evaluate(model, variables, test_ds, batch_size=cfg.batch_size, backend=backend,
                       devices=devices)
        log.write(phase="source", test_accuracy=acc)
    return variables
