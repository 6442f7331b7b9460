"""The work of `experiments.uda`: `run(config, workdir)`.

Protocol, per domain pair:

1. Train (or resume, or load) the source model on the labelled source train split
   (`engine.train.train_source`, one model per pair, seed `config.source.seed`).
2. Split the target test set once (fixed seed) into a labelled `dem_star.fraction`
   (DEM*'s search only) and the rest, on which EVERY row is scored.
3. Every row starts from the source model and trains `config.steps` steps of one
   source batch + one target batch (target train split, labels unused), with the
   same optimiser, learning rate and entropy weight for every loss (no loss is
   tuned more than another). The seed sets the batch order and the
   discriminator's initialisation; the source model is the same for every seed.
4. DEM*: (tau, alpha) of the row's method chosen on the labelled target part,
   over `protocol.dem_grid` (inside Prop. A.1), the whole grid trained as one
   vmapped program with seed `dem_star.search_seed`.

Every finished unit is cached as JSON; a unit in progress is checkpointed (orbax)
every `eval_every` steps, so a restarted run continues and ends with the same result.

Several processes (`engine.distributed`): every process runs this same code on the
same global batches and feeds its own rows of each (`uda.Runner`, `train_source`);
all get the same results, and only process 0 writes logs, results and plots.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from dem_jax import plots
from dem_jax.tasks import objectives
from dem_jax.tasks.tta import protocol
from dem_jax.tasks import uda
from dem_jax.data import domains
from dem_jax.data.sources import ArrayDataset
from dem_jax.engine import checkpoint as ckpt_lib
from dem_jax.engine import parallel
from dem_jax.engine import reporting
from dem_jax.engine import metrics
from dem_jax.engine import train as train_lib
from experiments import cli
from experiments import specs

NO_LOSS = ("source_only", "dann")


def parse_row(row: str) -> tuple[str, str | None, bool]:
    """A table row -> (method, loss or None, is DEM*).

    Rows: "source_only", "dann", or "<method>+<loss>" with method in
    ("minent", "dann", "shot_im") and loss one of `objectives.LOSSES` or
    "dem_star" (DEM with the searched tau, alpha).
    """
    if row in NO_LOSS:
        return row, None, False
    if "+" not in row:
        raise ValueError(
            f"Unknown row {row!r}. A row is 'source_only', 'dann' or '<method>+<loss>' with "
            f"method in {tuple(m for m in uda.METHODS if m != 'source_only')} and loss in "
            f"{objectives.LOSSES + ('dem_star',)}.")
    method, loss = row.split("+", 1)
    if method not in uda.METHODS or method == "source_only":
        raise ValueError(f"Unknown UDA method {method!r} in row {row!r}; choose one of "
                         f"{tuple(m for m in uda.METHODS if m != 'source_only')}.")
    if loss == "dem_star":
        return method, "dem", True
    return method, objectives.check_loss(loss), False


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def validate(config, devices=None) -> None:
    """Clear errors for a bad configuration, before any work starts."""
    cli.check_config(config, specs.UDA)
    if not config.pairs:
        raise ValueError("config.pairs is empty: give at least one domain pair.")
    for pair in config.pairs:
        domains.check_pair(pair)
    if not config.rows:
        raise ValueError("config.rows is empty.")
    for row in config.rows:
        method, loss, _ = parse_row(row)
        uda_config(config, method, loss)
    if not config.seeds:
        raise ValueError("config.seeds is empty: give at least one seed.")
    if config.steps < 1 or config.eval_every < 1:
        raise ValueError("config.steps and config.eval_every must be >= 1.")
    if config.steps % config.eval_every:
        raise ValueError(f"config.steps={config.steps} must be a multiple of "
                         f"config.eval_every={config.eval_every} (one checkpoint per chunk).")
    if not 0.0 < config.dem_star.fraction < 1.0:
        raise ValueError(f"dem_star.fraction must be in (0, 1), got {config.dem_star.fraction}.")
    for name, value in (("dem_star.grid_chunk", config.dem_star.grid_chunk),
                        ("eval_batch_size", config.eval_batch_size)):
        if value < 1:
            raise ValueError(f"config.{name} must be >= 1, got {value}.")
    if config.size < 0:
        raise ValueError(f"config.size must be >= 0 (0 = the data set's own), got {config.size}.")
    if config.lr <= 0:
        raise ValueError(f"config.lr must be > 0, got {config.lr}.")
    n = parallel.num_devices(devices)
    for name, b in (("batch_size", config.batch_size),
                    ("source.batch_size", config.source.batch_size)):
        if b < 1 or b % n:
            raise ValueError(
                f"config.{name}={b} is not divisible by the {n} devices. Use a multiple of "
                f"{n}: a training batch is never padded (padding would corrupt BatchNorm "
                "statistics, the MEC and the marginal entropy).")


def uda_config(config, method: str, loss: str | None) -> uda.UDAConfig:
    c = config
    return uda.UDAConfig(method=method, loss=loss, lam=c.lam, adv_weight=c.adv_weight,
                         disc_hidden=c.disc_hidden, optimizer=c.optimizer,
                         momentum=c.momentum, mec_momentum=c.mec_momentum)


def split_target(test: ArrayDataset, fraction: float, *, split_seed: int = 12345):
    """(labelled part for DEM*'s search, rest for scoring): fixed, seed-independent."""
    n = len(test)
    k = max(1, int(round(fraction * n)))
    order = np.random.default_rng([split_seed, n]).permutation(n)
    return test.subset(np.sort(order[:k])), test.subset(np.sort(order[k:]))


def batch_order(n: int, steps: int, batch_size: int, seed: int, stream: int) -> np.ndarray:
    """`[steps, batch_size]` indices: reshuffled passes over n examples, from (seed, stream).

    The passes are concatenated, so a batch that straddles two passes may hold
    an example twice (the default digits config: one such batch in 200 steps).
    Kept as is so that results stay comparable with the published tables.
    """
    rng = np.random.default_rng([seed, stream])
    passes = -(-steps * batch_size // n)
    return np.concatenate([rng.permutation(n) for _ in range(passes)])[
        :steps * batch_size].reshape(steps, batch_size)


class PairExperiment:
    """The source model, target splits and compiled runners of one domain pair."""

    def __init__(self, config, workdir: str, pair: str, *, devices=None, log=None):
        self.config = config
        self.pair = pair
        self.devices = devices
        self.dir = os.path.join(workdir, "pairs", slug(pair))
        self.log = log
        size = config.size or None
        self.source, self.target = domains.load_pair(
            pair, data_dir=config.data_dir or None, seed=config.pair_seed, size=size)
        self.num_classes = self.source.train.num_classes
        src = config.source
        self.source_cfg = train_lib.SourceConfig(
            model=config.model, model_kwargs=tuple(sorted(dict(config.model_kwargs).items())),
            epochs=src.epochs, batch_size=src.batch_size, optimizer=src.optimizer,
            learning_rate=src.learning_rate, momentum=src.momentum,
            weight_decay=src.weight_decay, augment=src.augment, seed=src.seed)
        self.variables = train_lib.train_source(
            self.source.train, self.source.test, self.source_cfg, self.dir,
            backend=config.backend, log=log, devices=devices)
        # Cached units hold for this source model only (retrained after a corrupt checkpoint).
        reporting.derived_from(os.path.join(self.dir, "units"),
                               source_model=reporting.fingerprint(self.variables))
        self.model = train_lib.build_model(config.model, self.num_classes,
                                           self.source_cfg.model_kwargs)
        self.labelled, self.scored = split_target(self.target.test, config.dem_star.fraction)
        self._runners: dict = {}

    def runner(self, method: str, loss: str | None, *, grid: bool = False) -> uda.Runner:
        key = (method, loss, grid)
        if key not in self._runners:
            self._runners[key] = uda.Runner(
                self.model, uda_config(self.config, method, loss), self.num_classes,
                backend=self.config.backend, grid=grid, devices=self.devices)
        return self._runners[key]

    def init_state(self, method, loss, seed, *, tau=1.0, alpha=1.0):
        return uda.init_state(self.variables, uda_config(self.config, method, loss),
                              self.num_classes, lr=self.config.lr, tau=tau, alpha=alpha,
                              seed=seed)

    def batches(self, seed: int, lo: int, hi: int):
        """Source images, labels and target images of steps [lo, hi) for `seed`."""
        c = self.config
        src = batch_order(len(self.source.train), c.steps, c.batch_size, seed, 1)[lo:hi]
        tgt = batch_order(len(self.target.train), c.steps, c.batch_size, seed, 2)[lo:hi]
        return (self.source.train.images[src], self.source.train.labels[src],
                self.target.train.images[tgt])

    def source_accuracy(self) -> dict:
        runner = self.runner("source_only", None)
        state = self.init_state("source_only", None, 0)
        bs = self.config.eval_batch_size
        return {"source_test": float(runner.accuracy(state, self.source.test, batch_size=bs)),
                "target_scored": float(runner.accuracy(state, self.scored, batch_size=bs))}


def run_unit(exp: PairExperiment, row: str, seed: int, hyper: dict | None) -> dict:
    """One (row, seed): train `steps` steps in chunks of `eval_every`, checkpointing each.

    Returns:
      {"accuracy": final accuracy on the scored target part, "curve": [[step, acc]],
       "metrics": [per chunk mean of the step metrics]}.
    """
    c = exp.config
    method, loss, _ = parse_row(row)
    tau, alpha = (hyper["tau"], hyper["alpha"]) if hyper else (c.dem_tau, c.dem_alpha)
    runner = exp.runner(method, loss)
    state = exp.init_state(method, loss, seed, tau=tau, alpha=alpha)
    ckpt = ckpt_lib.Checkpointer(os.path.join(exp.dir, "units", slug(row), f"seed{seed}"),
                                 max_to_keep=1)
    acc0 = float(runner.accuracy(state, exp.scored, batch_size=c.eval_batch_size))
    meta = {"chunk": -1, "curve": [[0, acc0]], "metrics": []}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
    chunks = c.steps // c.eval_every
    for i in reporting.progress(range(meta["chunk"] + 1, chunks), total=chunks,
                                initial=meta["chunk"] + 1, desc=f"{exp.pair} {row} seed {seed}"):
        lo, hi = i * c.eval_every, (i + 1) * c.eval_every
        state, metrics = runner.train(state, *exp.batches(seed, lo, hi))
        acc = float(runner.accuracy(state, exp.scored, batch_size=c.eval_batch_size))
        means = {k: float(np.mean(v)) for k, v in metrics.items()}
        meta = {"chunk": i, "curve": meta["curve"] + [[hi, acc]],
                "metrics": meta["metrics"] + [means]}
        ckpt.save(i, state, meta)
        if exp.log is not None:
            exp.log.write(phase="uda", pair=exp.pair, row=row, seed=seed, step=hi,
                          target_accuracy=acc, **means)
    ckpt.close()
    return {"accuracy": meta["curve"][-1][1], "curve": meta["curve"],
            "metrics": meta["metrics"], "tau": tau, "alpha": alpha}


def dem_star_search(exp: PairExperiment, method: str) -> dict:
    """DEM*'s (tau, alpha) for `method`: best accuracy on the labelled target part.

    The grid is a leading axis of the state, trained as one vmapped program per
    `grid_chunk` points (the last chunk padded by repeating a point, so it
    compiles once). Ties go to the point nearest EM's (1, 1).
    """
    c = exp.config
    d = c.dem_star
    grid = protocol.dem_grid(d.tau_step, d.alpha_step, d.tau_max, d.alpha_max,
                             prop_a1_only=True)
    runner = exp.runner(method, "dem", grid=True)
    chunk = min(d.grid_chunk, len(grid))
    accs = []
    for lo in reporting.progress(range(0, len(grid), chunk), desc=f"{exp.pair} DEM* {method}"):
        part = grid[lo:lo + chunk]
        vals = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), 0)])
        states = [exp.init_state(method, "dem", d.search_seed, tau=float(t), alpha=float(a))
                  for t, a in vals]
        state = protocol.stack_states(states)
        for i in range(c.steps // c.eval_every):
            lo_s, hi_s = i * c.eval_every, (i + 1) * c.eval_every
            state, _ = runner.train(state, *exp.batches(d.search_seed, lo_s, hi_s))
        accs.append(runner.accuracy(state, exp.labelled, batch_size=c.eval_batch_size)
                    [:len(part)])
    accs = np.concatenate(accs)
    best = np.flatnonzero(accs >= accs.max() - 1e-9)
    best = int(best[np.argmin(np.abs(grid[best] - 1.0).sum(-1))])
    return {"tau": float(grid[best, 0]), "alpha": float(grid[best, 1]),
            "search_accuracy": float(accs[best]), "grid": grid.tolist(),
            "grid_accuracy": accs.tolist(), "labelled_examples": len(exp.labelled)}


def run_pair(exp: PairExperiment) -> dict:
    c = exp.config
    units, searches = {}, {}
    work = [(row, seed) for row in c.rows for seed in c.seeds]
    for row, seed in reporting.progress(work, desc=f"{exp.pair} units"):
        method, _, star = parse_row(row)
        hyper = None
        if star:
            if method not in searches:
                searches[method] = reporting.cached(
                    os.path.join(exp.dir, "units", f"dem_star_{method}.json"),
                    lambda: dem_star_search(exp, method))
            hyper = searches[method]
        units.setdefault(row, {})[seed] = reporting.cached(
            os.path.join(exp.dir, "units", slug(row), f"seed{seed}.json"),
            lambda: run_unit(exp, row, seed, hyper))
    return {"units": units, "dem_star": searches, "baseline": exp.source_accuracy(),
            "target_scored_examples": len(exp.scored),
            "target_labelled_examples": len(exp.labelled)}


def summarise(pair_results: dict) -> dict:
    out = {}
    for pair, res in pair_results.items():
        rows = {}
        for row, seeds in res["units"].items():
            accs = np.array([seeds[s]["accuracy"] for s in seeds])
            curves = np.array([[a for _, a in seeds[s]["curve"]] for s in seeds])
            rows[row] = {"mean": float(accs.mean()), "std": float(accs.std()),
                         "per_seed": {str(s): float(seeds[s]["accuracy"]) for s in seeds},
                         "curve_steps": [st for st, _ in seeds[next(iter(seeds))]["curve"]],
                         "curve_mean": curves.mean(0).tolist()}
        out[pair] = {"rows": rows, "baseline": res["baseline"], "dem_star": res["dem_star"],
                     "target_scored_examples": res["target_scored_examples"],
                     "target_labelled_examples": res["target_labelled_examples"]}
    return out


def results_markdown(results: dict, config) -> str:
    pairs = list(config.pairs)
    out = ["# Unsupervised domain adaptation", "",
           f"Target accuracy (%) after {config.steps} steps (batch {config.batch_size} source + "
           f"{config.batch_size} target, {config.optimizer} lr {config.lr:g}, entropy weight "
           f"lam {config.lam:g}, DANN reversal weight {config.adv_weight:g}), mean ± std over "
           f"seeds {list(config.seeds)} ({reporting.STD_KIND}), on the target test examples "
           "that DEM*'s search did not see. Every row starts from the same source model.", ""]
    header = ["row"] + pairs
    table = [["source model (no adaptation)"] + [
        f"{100 * results[p]['baseline']['target_scored']:.1f}" for p in pairs]]
    for row in config.rows:
        table.append([row] + [f"{100 * results[p]['rows'][row]['mean']:.1f} ± "
                              f"{100 * results[p]['rows'][row]['std']:.1f}" for p in pairs])
    out += [plots.markdown_table(header, table), ""]
    out += ["Per seed:", "", plots.markdown_table(
        ["row", "pair"] + [f"seed {s}" for s in config.seeds],
        [[row, p] + [f"{100 * results[p]['rows'][row]['per_seed'][str(s)]:.1f}"
                     for s in config.seeds] for row in config.rows for p in pairs]), ""]
    out += ["Source model, source test accuracy: " + ", ".join(
        f"{p} {100 * results[p]['baseline']['source_test']:.1f}%" for p in pairs) + ".",
        f"Scored target examples: " + ", ".join(
            f"{p} {results[p]['target_scored_examples']}" for p in pairs) + ".", ""]
    stars = [(p, m, h) for p in pairs for m, h in results[p]["dem_star"].items()]
    if stars:
        d = config.dem_star
        out += ["## DEM* (tau*, alpha*)", "",
                f"Grid tau in (0, {d.tau_max:g}] step {d.tau_step:g}, alpha in [0, "
                f"{d.alpha_max:g}] step {d.alpha_step:g}, inside Prop. A.1 "
                f"({len(stars[0][2]['grid'])} points), searched on a fixed labelled "
                f"{100 * d.fraction:.0f}% of the target test set with seed {d.search_seed}; "
                "ties go to the point nearest (1, 1).", "",
                plots.markdown_table(["pair", "method", "tau*", "alpha*", "search acc %",
                                      "grid min-max %"],
                                     [[p, m, f"{h['tau']:g}", f"{h['alpha']:g}",
                                       f"{100 * h['search_accuracy']:.1f}",
                                       f"{100 * min(h['grid_accuracy']):.1f}-"
                                       f"{100 * max(h['grid_accuracy']):.1f}"]
                                      for p, m, h in stars]), ""]
    return "\n".join(out)


def plot_curves(path: str, pair: str, rows: dict) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, r in rows.items():
        style = "-o" if ("adadem" in row or row.endswith("+em")) else "--."
        ax.plot(r["curve_steps"], 100 * np.asarray(r["curve_mean"]), style, label=row,
                alpha=1.0 if style == "-o" else 0.7, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("target accuracy (%)")
    ax.set_title(f"{pair}: target accuracy during adaptation (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir: str, *, devices=None) -> dict:
    """Runs (or resumes) the whole experiment; returns the results dict."""
    validate(config, devices)
    confirm = reporting.claim_workdir(workdir, config)
    log = metrics.open_log(workdir, config)
    raw = {}
    for pair in config.pairs:
        exp = PairExperiment(config, workdir, pair, devices=devices, log=log)
        confirm()  # this pair's data and source model are ready: the workdir holds this run
        raw[pair] = run_pair(exp)
    results: dict[str, Any] = summarise(raw)
    reporting.write_json(os.path.join(workdir, "results.json"),
                         {"pairs": results, "units": {p: r["units"] for p, r in raw.items()}})
    md = results_markdown(results, config)
    reporting.write_text(os.path.join(workdir, "results.md"), md)
    if reporting.is_writer():
        for pair in config.pairs:
            plot_curves(os.path.join(workdir, f"curves_{slug(pair)}.png"), pair,
                        results[pair]["rows"])
        print(md)
    return results
