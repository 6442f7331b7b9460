"""The test-time adaptation protocol: streams of corrupted batches, single-domain and
continual settings, DEM*'s oracle search and the learning-rate sweep.

* A *domain* is one corruption of the test set. Its *stream* for seed s is the
  domain's examples in the order `default_rng([s, domain index]).permutation`,
  cut into batches (the seed changes the batch order, nothing else).
* Single-domain: model, optimiser state and MEC reset before each domain.
  Continual: one pass over the domains in the paper's order, no reset.
* Every domain is split once into a labelled part (a fixed, seeded random
  `fraction` of it, whole batches) and an evaluation part (`labelled_split`).
  Every row is scored on the evaluation parts; the labelled parts serve only
  DEM*'s search of one (tau, alpha) per method and setting (`grid_search`,
  the paper's Table 11).
* Every batch of a stream runs one compiled step (dispatched asynchronously,
  the metrics fetched once per stream); a grid of hyperparameters (learning
  rates, DEM*'s (tau, alpha)) is a leading axis of the state, vmapped, so the
  whole grid is one program.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dem_jax import losses
from dem_jax.tasks.tta import methods
from dem_jax.engine import checkpoint as ckpt_lib
from dem_jax.engine import distributed
from dem_jax.engine import parallel
from dem_jax.engine import reporting

SETTINGS = ("single", "continual")


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    images: np.ndarray   # [N, H, W, C]
    labels: np.ndarray   # [N]


def stream(domain: Domain, index: int, seed: int,
           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Batches `[num_batches, batch_size, ...]` of a domain for one seed.

    A remainder that does not fill a batch is left out; results report how
    many examples were used.
    """
    if len(domain.labels) < batch_size:
        raise ValueError(
            f"Domain {domain.name!r} has {len(domain.labels)} examples, fewer than one "
            f"adaptation batch of {batch_size}: lower the batch size or use more examples.")
    order = np.random.default_rng([seed, index]).permutation(len(domain.labels))
    num_batches = len(order) // batch_size
    idx = order[:num_batches * batch_size].reshape(num_batches, batch_size)
    return domain.images[idx], domain.labels[idx]


def labelled_split(domain: Domain, index: int, fraction: float, batch_size: int,
                   *, split_seed: int = 12345) -> tuple[Domain, Domain]:
    """A domain's (labelled part, evaluation part): a seeded random `fraction` and the rest.

    The split is fixed (`default_rng([split_seed, index])`, not the run's
    seed): every row and seed is scored on the same evaluation part, and the
    labelled part is used by DEM*'s search only. The labelled part is rounded
    to whole batches (at least one).
    """
    n = len(domain.labels)
    k = min(n - batch_size, max(batch_size, int(round(fraction * n / batch_size)) * batch_size))
    if k <= 0 or n - k < batch_size:
        raise ValueError(f"Domain {domain.name} has {n} examples: too few for DEM*'s split "
                         f"into whole batches of {batch_size}. Lower the batch size.")
    order = np.random.default_rng([split_seed, index]).permutation(n)
    part = lambda idx: Domain(domain.name, domain.images[np.sort(idx)],
                              domain.labels[np.sort(idx)])
    return part(order[:k]), part(order[k:])


class Runner:
    """Runs adaptation streams for one (method, loss) on all devices (of every process).

    With several processes every process passes the same global stream, feeds
    its own columns of each batch (`distributed.process_shard`) and gets the
    same state and metrics back (`preds` are gathered from all processes).
    """

    def __init__(self, model, cfg: methods.AdaptConfig, num_classes: int, *,
                 backend: str = "pmap", grid: bool = False, devices=None):
        self.devices = parallel.participating(devices)
        self.n_dev = parallel.num_devices(self.devices)
        self.cfg = cfg
        self.grid = grid
        step = methods.make_adapt_step(model, cfg, num_classes)
        self._step = parallel.data_parallel(methods.make_batch_fn(step, grid=grid),
                                            backend=backend, devices=self.devices,
                                            donate_argnums=(0,))

    def __call__(self, state, images: np.ndarray, labels: np.ndarray):
        """Adapts along `[num_batches, batch, ...]`; returns (state, per-batch metrics).

        The state is un-replicated (host side). Metrics: `correct`/`count` per
        batch (`[num_batches]`, or `[grid, num_batches]`), `preds` per example.
        """
        n = self.n_dev
        if images.shape[1] % n:
            raise ValueError(
                f"The adaptation batch size {images.shape[1]} is not divisible by the {n} "
                f"devices. Test-time adaptation does not pad (padding would corrupt "
                f"batch statistics): use a batch size that is a multiple of {n}.")
        # This process's columns of every batch (all of them on one process).
        cols = distributed.process_shard(images.shape[1], self.devices)
        images, labels = images[:, cols], labels[:, cols]
        n_local = parallel.num_local_devices(self.devices)
        per = lambda x: np.moveaxis(x.reshape(x.shape[0], n_local, -1, *x.shape[2:]), 1, 0)
        images, labels = per(images), per(labels)  # [local dev, nb, b / dev, ...]
        rep = parallel.replicate(state, n_local)
        out = []
        for t in range(images.shape[1]):  # dispatched asynchronously, fetched once below
            rep, metrics = self._step(rep, images[:, t], labels[:, t])
            out.append(metrics)
        state = parallel.unreplicate(rep)
        out = jax.device_get(out)  # this process's device buffers: no program, no collective
        metrics = {k: np.stack([m[k] for m in out], axis=1) for k in out[0]}
        # [dev, nb, (grid,) ...] -> [(grid,) nb, ...]
        out = {k: np.asarray(v) for k, v in parallel.unreplicate(
            {k: v for k, v in metrics.items() if k != "preds"}).items()}
        preds = np.moveaxis(np.asarray(metrics["preds"]), 0, -2)  # [nb, (grid,) dev, b/dev]
        preds = preds.reshape(*preds.shape[:-2], -1)
        if jax.process_count() > 1:  # [process, nb, (grid,) B/P]: the columns in order
            gathered = np.asarray(multihost_utils.process_allgather(preds))
            preds = np.concatenate(list(gathered), axis=-1)
        out["preds"] = preds
        if self.grid:
            out = {k: np.swapaxes(v, 0, 1) for k, v in out.items()}
        return state, out


def accuracy(metrics) -> np.ndarray:
    """Online accuracy over a stream (per grid point if there is a grid axis)."""
    return metrics["correct"].sum(-1) / metrics["count"].sum(-1)


def stack_states(states: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *x: jnp.stack(x), *states)


def run_domains(runner: Runner, make_state: Callable[[], Any], domains: Sequence[Domain], *,
                setting: str, seed: int, batch_size: int, ckpt_dir: str | None = None,
                hyper_per_domain: Sequence[dict] | None = None, desc: str = "") -> dict:
    """One unit of the protocol: a (method, loss, seed) over every domain.

    Args:
      runner: the compiled stream runner.
      make_state: returns a fresh state at the source model.
      domains: in the order they arrive (continual) or are reset for (single).
      setting: "single" (reset per domain) or "continual" (no reset).
      ckpt_dir: where progress is checkpointed after every domain (orbax): a
        restarted unit continues after the last finished domain.
      hyper_per_domain: optional {"tau": .., "alpha": ..} per domain (DEM*).

    Returns:
      {"accuracy": {domain: acc}, "num_examples": {domain: n}, "pred_counts": [C],
       "filters": {domain: {"kept_entropy": fraction, "selected": fraction,
                            "resets": n}}}.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}.")
    state = make_state()
    result = {"accuracy": {}, "num_examples": {}, "pred_counts": None, "filters": {}}
    # Single-domain units restart from the source model at every domain, so
    # their progress is just the finished domains' results (a small JSON);
    # continual units also need the adapted state (an orbax checkpoint).
    progress_json = os.path.join(ckpt_dir, "progress.json") if ckpt_dir else None
    ckpt = (ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=1)
            if ckpt_dir and setting == "continual" else None)
    first = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        state, result = ckpt.restore(state)
        first = ckpt.latest_step() + 1
    elif ckpt is None and progress_json and (saved := reporting.load_checked(progress_json)):
        result, first = saved, len(saved["accuracy"])
    for i in reporting.progress(range(first, len(domains)), desc=desc, total=len(domains),
                                initial=first):
        domain = domains[i]
        if setting == "single":
            state = make_state()
        if hyper_per_domain is not None:
            h = hyper_per_domain[i]
            state = state.replace(hyper=state.hyper._replace(
                tau=jnp.float32(h["tau"]), alpha=jnp.float32(h["alpha"])))
        images, labels = stream(domain, i, seed, batch_size)
        state, metrics = runner(state, images, labels)
        result["accuracy"][domain.name] = float(accuracy(metrics))
        n = int(metrics["count"].sum())
        result["num_examples"][domain.name] = n
        result["filters"][domain.name] = {
            "kept_entropy": float(metrics["kept_entropy"].sum()) / n,
            "selected": float(metrics["selected"].sum()) / n,
            "resets": int(metrics["resets"].sum())}
        counts = np.bincount(metrics["preds"].reshape(-1),
                             minlength=state.mec.shape[0]).tolist()
        prev = result["pred_counts"]
        result["pred_counts"] = counts if prev is None else [a + b for a, b in zip(prev, counts)]
        if ckpt is not None:
            ckpt.save(i, state, result)
        elif progress_json:
            reporting.save_checked(progress_json, result)
    if ckpt is not None:
        ckpt.close()
    return result


def dem_grid(tau_step: float = 0.1, alpha_step: float = 0.1, tau_max: float = 2.0,
             alpha_max: float = 2.0, *, prop_a1_only: bool = False) -> np.ndarray:
    """DEM*'s grid: tau in {step, .., tau_max}, alpha in {0, .., alpha_max}.

    The whole square, as the paper searches it (its Tent-ViT optimum (1.3, 1.8)
    lies outside Prop. A.1's region); `prop_a1_only` keeps the region only.

    Returns:
      float32 `[G, 2]` (tau, alpha) pairs.

    Example:
      >>> dem_grid().shape     # 20 x 21
      (420, 2)
    """
    taus = np.round(np.arange(1, int(round(tau_max / tau_step)) + 1) * tau_step, 6)
    alphas = np.round(np.arange(0, int(round(alpha_max / alpha_step)) + 1) * alpha_step, 6)
    pairs = np.array([(t, a) for t in taus for a in alphas], np.float32)
    if not prop_a1_only:
        return pairs
    keep = losses.dem_valid(pairs[:, 0].astype(np.float64), pairs[:, 1].astype(np.float64))
    return pairs[keep]


DIAGNOSTICS = ("delta", "max_prob", "logit_grad_l1", "param_grad_norm", "mec_diag")


def _with_hyper(state, field: str, v):
    h = state.hyper
    h = h._replace(lr=jnp.float32(v)) if field == "lr" else h._replace(
        tau=jnp.float32(v[0]), alpha=jnp.float32(v[1]))
    return state.replace(hyper=h)


def grid_search(runner: Runner, make_state: Callable[[], Any], domains: Sequence[Domain], *,
                field: str, values: np.ndarray, setting: str, seed: int, batch_size: int,
                chunk: int, desc: str = "") -> dict:
    """Online accuracy of every grid point over `domains`, `chunk` points per program.

    `field` is "lr" (values [G]) or "tau_alpha" (values [G, 2]). Single-domain:
    every point restarts from `make_state()` at each domain; continual: one
    pass over the domains in order, never told where a domain changes. Every
    chunk has the same size (the last is padded by repeating a point) so the
    program compiles once.

    Returns:
      {"accuracy": [G, D] per domain, and, for every diagnostic the runner's
       step reports (`DIAGNOSTICS`), its mean over the batches `[G]`}.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}.")
    assert runner.grid, "grid_search needs a Runner built with grid=True"
    values = np.asarray(values, np.float32)
    chunk = min(chunk, len(values))
    acc, diag = [], {}
    for lo in reporting.progress(range(0, len(values), chunk), desc=desc):
        part = values[lo:lo + chunk]
        pad = chunk - len(part)
        vals = np.concatenate([part, np.repeat(part[-1:], pad, 0)]) if pad else part
        base = make_state()
        state = None
        accs, sums = [], {}
        for i, domain in enumerate(domains):
            if state is None or setting == "single":
                state = stack_states([_with_hyper(base, field, v) for v in vals])
            images, labels = stream(domain, i, seed, batch_size)
            state, metrics = runner(state, images, labels)
            accs.append(accuracy(metrics)[:len(part)])
            for k in DIAGNOSTICS:
                if k in metrics:
                    sums.setdefault(k, []).append(metrics[k][:len(part)])
        acc.append(np.stack(accs, -1))
        for k, v in sums.items():
            diag.setdefault(k, []).append(np.concatenate(v, -1).mean(-1))
    return {"accuracy": np.concatenate(acc), **{k: np.concatenate(v) for k, v in diag.items()}}


def grid_accuracy(runner: Runner, base_state, images, labels, *, field: str,
                  values: np.ndarray, chunk: int) -> np.ndarray:
    """Online accuracy of one stream `[num_batches, batch, ...]` for every grid point `[G]`."""
    out = []
    values = np.asarray(values, np.float32)
    chunk = min(chunk, len(values))
    for lo in range(0, len(values), chunk):
        part = values[lo:lo + chunk]
        pad = chunk - len(part)
        vals = np.concatenate([part, np.repeat(part[-1:], pad, 0)]) if pad else part
        _, metrics = runner(stack_states([_with_hyper(base_state, field, v) for v in vals]),
                            images, labels)
        out.append(accuracy(metrics)[:len(part)])
    return np.concatenate(out)


def choose_dem_star(grid: np.ndarray, accuracy: np.ndarray) -> int:
    """The index of the best (tau, alpha) by `accuracy` `[G]`; ties go to the point
    nearest EM's (1, 1), so that a flat search falls back to EM, not a corner."""
    best = np.flatnonzero(accuracy >= accuracy.max() - 1e-9)
    return int(best[np.argmin(np.abs(grid[best] - 1.0).sum(-1))])


def dem_star_search(runner: Runner, make_state, labelled: Sequence[Domain], grid: np.ndarray,
                    *, setting: str, batch_size: int, chunk: int, per_domain: bool = False,
                    seed: int = 0, desc: str = "") -> list[dict]:
    """DEM*: the (tau, alpha) with the best mean online accuracy over the labelled parts.

    One pair for all domains (the paper's Table 11), by the mean over domains
    of the `setting`'s stream over the labelled parts (continual: in order,
    never reset). `per_domain` (a departure from the paper) chooses each
    domain's own pair on its labelled part, single-domain.

    Returns:
      One {"tau", "alpha", "search_accuracy", "labelled_examples"} per domain
      (the same pair for every domain unless `per_domain`).
    """
    n_lab = [int(len(d.labels)) // batch_size * batch_size for d in labelled]
    if per_domain:
        chosen = []
        for i, d in enumerate(labelled):
            # Each domain keeps its own index, so its stream order is the one the
            # single-domain search of all domains would draw.
            images, labels = stream(d, i, seed, batch_size)
            accs = grid_accuracy(runner, make_state(), images, labels, field="tau_alpha",
                                 values=grid, chunk=chunk)
            b = choose_dem_star(grid, accs)
            chosen.append({"tau": float(grid[b, 0]), "alpha": float(grid[b, 1]),
                           "search_accuracy": float(accs[b]), "labelled_examples": n_lab[i]})
        return chosen
    out = grid_search(runner, make_state, labelled, field="tau_alpha", values=grid,
                      setting=setting, seed=seed, batch_size=batch_size, chunk=chunk, desc=desc)
    mean = out["accuracy"].mean(-1)
    b = choose_dem_star(grid, mean)
    return [{"tau": float(grid[b, 0]), "alpha": float(grid[b, 1]),
             "search_accuracy": float(mean[b]), "labelled_examples": n}
            for n in n_lab]


def check_stream_sizes(domains: Sequence[Domain], batch_size: int) -> dict:
    """Warns (once) how many examples per domain do not fill a last batch."""
    left = {d.name: len(d.labels) % batch_size for d in domains}
    if any(left.values()):
        n = max(left.values())
        warnings.warn(f"Adaptation batch size {batch_size} leaves up to {n} examples per "
                      "domain out of each stream (a different set per seed); results "
                      "report the number of examples used.", stacklevel=2)
    return left
