"""The work of `experiments.ssl`: `run(config, workdir)`.

Per (row, seed): draw the labelled / unlabelled split of the training set with the
seed (`data.semi`, balanced or long-tailed), initialise a model from the seed,
train `steps` steps in chunks of `eval_every` (checkpointed), evaluate top-1 and
per-class F1 on the (balanced) test set. Finished units are cached JSON; the
tables cover the finished units of `config.rows` x `config.seeds`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dem_jax import data
from dem_jax import plots
from dem_jax.data import semi
from dem_jax.engine import checkpoint as ckpt_lib
from dem_jax.engine import metrics
from dem_jax.engine import parallel
from dem_jax.engine import reporting
from dem_jax.engine import train as train_lib
from dem_jax.tasks import ssl
from experiments import cli
from experiments import specs
from experiments.uda_lib import batch_order, slug


def parse_row(row: str) -> tuple[str, bool]:
    """"<method>" or "<method>+adadem" -> (method, adadem)."""
    method, _, extra = row.partition("+")
    if method not in ssl.METHODS or extra not in ("", "adadem"):
        raise ValueError(f"Unknown row {row!r}: a row is '<method>' or '<method>+adadem' with "
                         f"method in {ssl.METHODS}.")
    if method == "supervised" and extra:
        raise ValueError("supervised+adadem makes no sense: the supervised baseline sees no "
                         "unlabelled data, and AdaDEM is computed on unlabelled examples only.")
    return method, bool(extra)


def ssl_config(config, row: str, image_shape) -> ssl.SSLConfig:
    method, adadem = parse_row(row)
    c = config
    return ssl.SSLConfig(method=method, adadem=adadem, num_steps=c.steps,
                         **dict(c.usb[method]), adadem_weight=c.adadem_weight,
                         mec_momentum=c.mec_momentum, lr=c.lr, momentum=c.momentum,
                         weight_decay=c.weight_decay, flip=c.flip, num_ops=c.num_ops,
                         cutout=c.cutout)


def validate(config, devices=None) -> None:
    cli.check_config(config, specs.SSL)
    for row in config.rows:
        parse_row(row)
    if config.steps % config.eval_every:
        raise ValueError(f"config.steps={config.steps} must be a multiple of "
                         f"config.eval_every={config.eval_every} (one checkpoint per chunk).")
    n = parallel.num_devices(devices)
    if config.batch_size % n:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the {n} "
                         f"devices. Use a multiple of {n}: a training batch is never padded.")


class Experiment:
    def __init__(self, config, workdir, *, devices=None, log=None):
        self.config, self.workdir, self.devices, self.log = config, workdir, devices, log
        d = config.data_dir or None
        self.train = data.load(config.dataset, "train", data_dir=d)
        self.test = data.load(config.dataset, "test", data_dir=d)
        self.num_classes = self.train.num_classes
        self.model = train_lib.build_model(config.model, self.num_classes,
                                           tuple(sorted(dict(config.model_kwargs).items())))
        self._runners: dict = {}

    def runner(self, row):
        if row not in self._runners:
            self._runners[row] = ssl.Runner(
                self.model, ssl_config(self.config, row, self.train.images.shape[1:]),
                self.num_classes, backend=self.config.backend, devices=self.devices)
        return self._runners[row]

    def split(self, seed):
        c = self.config
        return semi.split(self.train.labels, self.num_classes, labelled=c.labelled,
                          unlabelled=c.unlabelled, rho=c.rho, seed=seed)


def run_unit(exp: Experiment, row: str, seed: int) -> dict:
    c = exp.config
    cfg = ssl_config(c, row, exp.train.images.shape[1:])
    runner = exp.runner(row)
    lb, ulb = exp.split(seed)
    state = ssl.init_state(exp.model, cfg, exp.num_classes, exp.train.images.shape[1:], seed)
    ckpt = ckpt_lib.Checkpointer(os.path.join(exp.workdir, "units", slug(row), f"seed{seed}"),
                                 max_to_keep=1)
    meta = {"chunk": -1, "curve": [], "metrics": []}
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
    chunks = c.steps // c.eval_every
    bu = c.batch_size * cfg.uratio
    for i in reporting.progress(range(meta["chunk"] + 1, chunks), total=chunks,
                                initial=meta["chunk"] + 1, desc=f"{row} seed {seed}"):
        lo, hi = i * c.eval_every, (i + 1) * c.eval_every
        li = lb[batch_order(len(lb), c.steps, c.batch_size, seed, 1)[lo:hi]]
        ui = ulb[batch_order(len(ulb), c.steps, bu, seed, 2)[lo:hi]]
        state, m = runner.train(state, exp.train.images[li], exp.train.labels[li],
                                exp.train.images[ui])
        sc = ssl.scores(runner.confusion(state, exp.test, batch_size=c.eval_batch_size))
        means = {k: float(np.mean(v)) for k, v in m.items()}
        meta = {"chunk": i, "curve": meta["curve"] + [[hi, sc["accuracy"]]],
                "metrics": meta["metrics"] + [means], "f1": sc["f1"],
                "macro_f1": sc["macro_f1"]}
        ckpt.save(i, state, meta)
        if exp.log is not None:
            exp.log.write(phase="ssl", row=row, seed=seed, step=hi, accuracy=sc["accuracy"],
                          macro_f1=sc["macro_f1"], **means)
    ckpt.close()
    return {"accuracy": meta["curve"][-1][1], "curve": meta["curve"], "f1": meta["f1"],
            "macro_f1": meta["macro_f1"], "metrics": meta["metrics"],
            "labelled": int(len(lb)), "unlabelled": int(len(ulb))}


def collect(config, workdir) -> dict:
    """The finished units of config.rows x config.seeds found in `workdir`."""
    units = {}
    for row in config.rows:
        for seed in config.seeds:
            u = reporting.load_checked(os.path.join(workdir, "units", slug(row),
                                                    f"seed{seed}.json"))
            if u is not None:
                units.setdefault(row, {})[str(seed)] = u
    return units


def adadem_gains(units: dict) -> dict:
    """`<method>+adadem` minus `<method>`, paired by seed, over the seeds where both finished.

    Returns {method: {"seeds": [...], "accuracy": [...], "macro_f1": [...]}} (fractions).
    """
    out = {}
    for row in units:
        method, adadem = parse_row(row)
        seeds = sorted(set(units[row]) & set(units.get(method, {})), key=int) if adadem else []
        if seeds:
            out[method] = {"seeds": seeds, **{
                k: [units[row][s][k] - units[method][s][k] for s in seeds]
                for k in ("accuracy", "macro_f1")}}
    return out


def format_gain(diffs) -> str:
    """"+1.0 ± 1.3 (2/3)": mean ± std in points, and in how many seeds AdaDEM is ahead."""
    d = 100 * np.asarray(diffs)
    return f"{d.mean():+.1f} ± {d.std():.1f} ({int((d > 0).sum())}/{d.size})"


def results_markdown(units: dict, config) -> str:
    setting = (f"{config.dataset}, {config.labelled} labelled" +
               (f" / {config.unlabelled} unlabelled" if config.unlabelled else "") +
               f" per class{' (class 0), rho = %g' % config.rho if config.rho > 1 else ''}")
    out = ["# Semi-supervised learning", "",
           f"{setting}; {config.steps} steps of {config.batch_size} labelled + uratio x "
           f"{config.batch_size} unlabelled examples; test top-1 and macro F1 (%), mean ± std "
           f"over the seeds that finished ({reporting.STD_KIND}).", ""]
    table = []
    for row in config.rows:
        seeds = units.get(row, {})
        if not seeds:
            table.append([row, "not run", "", "0"])
            continue
        table.append([row, *(reporting.mean_std([u[k] for u in seeds.values()])
                             for k in ("accuracy", "macro_f1")),
                      f"{len(seeds)} ({', '.join(seeds)})"])
    out += [plots.markdown_table(["row", "top-1", "macro F1", "seeds"], table), ""]
    gains = adadem_gains(units)
    if gains:
        out += ["AdaDEM's gain, points, paired by seed: mean ± std (seeds where it is ahead / "
                "seeds):", "",
                plots.markdown_table(["method", "top-1", "macro F1"], [
                    [m, format_gain(g["accuracy"]), format_gain(g["macro_f1"])]
                    for m, g in gains.items()]), ""]
    rows = [r for r in config.rows if units.get(r)]
    if rows:
        c = len(next(iter(units[rows[0]].values()))["f1"])
        out += ["Per-class F1 (%), mean over seeds (class 0 is the largest when rho > 1):", "",
                plots.markdown_table(["row"] + [str(k) for k in range(c)], [
                    [r] + [f"{100 * np.mean([u['f1'][k] for u in units[r].values()]):.1f}"
                           for k in range(c)] for r in rows]), ""]
    return "\n".join(out)


def plot_f1(path, units, config):
    import matplotlib.pyplot as plt
    rows = [r for r in config.rows if units.get(r)]
    if not rows:
        return
    c = len(next(iter(units[rows[0]].values()))["f1"])
    fig, ax = plt.subplots(figsize=(9.5, 4))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        f1 = np.mean([u["f1"] for u in units[r].values()], 0)
        method, adadem = parse_row(r)  # a method's two rows: one hue, AdaDEM the darker
        colour = plt.cm.tab20(2 * ssl.METHODS.index(method) + (0 if adadem else 1))
        ax.bar(np.arange(c) + i * width, 100 * f1, width, label=r, color=colour)
    ax.set_xlabel("class")
    ax.set_ylabel("test F1 (%)")
    ax.set_xticks(np.arange(c) + 0.4 - width / 2, [str(k) for k in range(c)])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(config, workdir) -> str:
    """Tables and plots of whatever has finished (no training)."""
    units = collect(config, workdir)
    reporting.write_json(os.path.join(workdir, "results.json"), {"units": units})
    md = results_markdown(units, config)
    reporting.write_text(os.path.join(workdir, "results.md"), md)
    if reporting.is_writer():
        plot_f1(os.path.join(workdir, "per_class_f1.png"), units, config)
        print(md)
    return md


def run(config, workdir: str, *, devices=None) -> Any:
    validate(config, devices)
    confirm = reporting.claim_workdir(workdir, config, ignore=("logging", "rows", "seeds"))
    log = metrics.open_log(workdir, config)
    exp = Experiment(config, workdir, devices=devices, log=log)
    confirm()
    work = [(row, seed) for row in config.rows for seed in config.seeds]
    for row, seed in reporting.progress(work, desc="units"):
        reporting.cached(os.path.join(workdir, "units", slug(row), f"seed{seed}.json"),
                         lambda: run_unit(exp, row, seed))
    return report(config, workdir)
