"""The work of `experiments.noisy_labels`: `run(config, workdir)`.

One *run* = (noise setting, loss, seed): a model trained from scratch on the
noisy training labels, evaluated on the clean test split after every epoch.
It is checkpointed (orbax, every `checkpoint_every` epochs, with its metric
history in the checkpoint's metadata) and, once finished, saved as
`units/<setting>/<loss>/seed<k>.json`, so a restarted command skips finished
runs and resumes an interrupted one from its last checkpoint. The batch order
and augmentation of epoch e depend only on (seed, e), so a resumed run ends
exactly where an uninterrupted one would.

Several processes (`engine.distributed`): every process draws the same global
batches and feeds its own rows of each (`parallel.shard_batch`); metrics are
global sums, ELR's table is synchronised inside the step (an all-gather over
every device of every process), so all processes end with the same state and
results, and only process 0 writes logs, results and plots.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from dem_jax import data as data_lib  # noqa: E402
from dem_jax import models  # noqa: E402
from dem_jax import plots  # noqa: E402
from dem_jax.data import noise as noise_lib  # noqa: E402
from dem_jax.data import pipeline  # noqa: E402
from dem_jax.engine import checkpoint as ckpt_lib  # noqa: E402
from dem_jax.tasks import noisy as noisy_engine  # noqa: E402
from dem_jax.engine import parallel  # noqa: E402
from dem_jax.engine import reporting  # noqa: E402
from dem_jax.engine import metrics  # noqa: E402
from dem_jax.engine import train as train_lib  # noqa: E402
from experiments import cli  # noqa: E402
from experiments import specs  # noqa: E402

_COMPILED: dict = {}  # see Experiment.__init__

COUNTS = ("count", "correct", "clean_count", "clean_correct", "noisy_count", "noisy_fit",
          "noisy_recovered")


def parse_noise(setting: str) -> tuple[str, float]:
    """`"symmetric:0.4"` -> `("symmetric", 0.4)`, with a clear error for anything else."""
    kind, sep, rate = str(setting).partition(":")
    try:
        value = float(rate)
    except ValueError:
        value = None
    if not sep or kind not in noise_lib.KINDS or value is None:
        raise ValueError(
            f"Bad noise setting {setting!r}: write '<kind>:<rate>' with kind in "
            f"{noise_lib.KINDS} and rate the flip probability, e.g. 'symmetric:0.4'.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Bad noise setting {setting!r}: the rate must be in [0, 1), "
                         f"got {value}.")
    return kind, value


def loss_config(config, loss: str) -> noisy_engine.NoisyLossConfig:
    return noisy_engine.NoisyLossConfig(
        loss=loss, lam=config.lam, gce_q=config.gce_q, sce_alpha=config.sce_alpha,
        sce_beta=config.sce_beta, elr_lambda=config.elr_lambda, elr_beta=config.elr_beta,
        mec_momentum=config.mec_momentum)


# The named class flips (dem_jax.data.noise.MAPPINGS) that belong to each data set.
MAPPING_OF_DATA = {"digits": "mnist", "mnist": "mnist", "fashion_mnist": "fashion_mnist",
                   "tfds:cifar10": "cifar10"}


def validate(config, devices=None) -> None:
    """Clear errors for a bad configuration, before any work starts."""
    cli.check_config(config, specs.NOISY)
    if not config.losses:
        raise ValueError("config.losses is empty: give at least one loss, e.g. ('ce',).")
    for loss in config.losses:
        loss_config(config, loss)  # unknown names and bad hyperparameters raise here
    if not config.noise:
        raise ValueError("config.noise is empty: give at least one setting, e.g. "
                         "('symmetric:0.4',).")
    for s in config.noise:
        parse_noise(s)
    mapping = config.asymmetric_mapping
    if isinstance(mapping, str) and mapping != "cyclic" and mapping not in noise_lib.MAPPINGS:
        raise ValueError(f"Unknown asymmetric_mapping {mapping!r}; valid names: 'cyclic', "
                         f"{', '.join(map(repr, noise_lib.MAPPINGS))}, or class indices.")
    asymmetric = any(s.startswith("asymmetric") for s in config.noise)
    meant_for = {name: data for data, name in MAPPING_OF_DATA.items()}
    if (asymmetric and isinstance(mapping, str) and config.data in MAPPING_OF_DATA
            and MAPPING_OF_DATA[config.data] != mapping and mapping in meant_for):
        raise ValueError(
            f"asymmetric_mapping {mapping!r} holds the class flips of {meant_for[mapping]}, "
            f"not of data={config.data!r}: set --config.asymmetric_mapping="
            f"{MAPPING_OF_DATA[config.data]} (or 'cyclic', or class indices).")
    if len(set(config.noise)) != len(config.noise) or len(set(config.losses)) != len(
            config.losses):
        raise ValueError("config.noise and config.losses must not repeat an entry.")
    if not config.seeds:
        raise ValueError("config.seeds is empty: give at least one seed.")
    for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every"):
        if int(config[name]) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {config[name]}.")
    for name in ("train_subset", "test_subset"):
        if config[name] < 0:
            raise ValueError(f"config.{name} must be >= 0 (0 = all), got {config[name]}.")
    if config.optimizer not in train_lib.OPTIMIZERS:
        raise ValueError(f"config.optimizer must be one of {train_lib.OPTIMIZERS}, got "
                         f"{config.optimizer!r}.")
    if config.augment not in train_lib.AUGMENTATIONS:
        raise ValueError(f"config.augment must be one of {train_lib.AUGMENTATIONS}, got "
                         f"{config.augment!r}.")
    if config.backend not in parallel.BACKENDS:
        raise ValueError(f"config.backend must be one of {parallel.BACKENDS}, got "
                         f"{config.backend!r}.")
    missing = [x for x in config.plot_losses if x not in config.losses]
    if missing:
        raise ValueError(f"config.plot_losses {missing} are not in config.losses.")
    n = parallel.num_devices(devices)
    if config.batch_size % n:
        raise ValueError(
            f"config.batch_size={config.batch_size} is not divisible by the {n} devices. "
            f"Use a multiple of {n}: training never pads a batch (padding would corrupt "
            "the BatchNorm and MEC statistics).")


class Experiment:
    """The data, the noisy labels and the compiled step functions of one command."""

    def __init__(self, config, workdir: str, *, devices=None):
        self.config = config
        self.workdir = workdir
        self.devices = parallel.participating(devices)  # default: all, of every process
        self.n_dev = parallel.num_devices(self.devices)
        self.n_local = parallel.num_local_devices(self.devices)
        self.log = metrics.open_log(workdir, config)
        data_dir = config.data_dir or None
        self.train = data_lib.load(config.data, "train", data_dir=data_dir)
        self.test = data_lib.load(config.data, "test", data_dir=data_dir)
        if config.train_subset and config.train_subset < len(self.train):
            keep, _ = data_lib.stratified_split(
                self.train.labels, 1.0 - config.train_subset / len(self.train), seed=0)
            self.train = self.train.subset(np.sort(keep))
        if config.test_subset and config.test_subset < len(self.test):
            keep, _ = data_lib.stratified_split(
                self.test.labels, 1.0 - config.test_subset / len(self.test), seed=0)
            self.test = self.test.subset(np.sort(keep))
        self.num_classes = self.train.num_classes
        if config.batch_size > len(self.train):
            raise ValueError(f"config.batch_size={config.batch_size} exceeds the "
                             f"{len(self.train)} training examples.")
        self.noise = {}
        for s in config.noise:
            kind, rate = parse_noise(s)
            self.noise[s] = noise_lib.corrupt_labels(
                self.train.labels, self.num_classes, kind=kind, rate=rate,
                seed=config.noise_seed,
                mapping=config.asymmetric_mapping if kind == "asymmetric" else None)
        model_kwargs = tuple(sorted(dict(config.model_kwargs).items()))
        self.model = train_lib.build_model(config.model, self.num_classes, model_kwargs)
        self.steps_per_epoch = len(self.train) // config.batch_size
        # Compiled functions are shared by every Experiment of this process with the
        # same model, optimiser, schedule and devices (a rerun or resume in the same
        # Python session does not compile again).
        self._key = (config.model, model_kwargs, self.num_classes,
                     self.train.images.shape[1:], config.optimizer, config.learning_rate,
                     config.momentum, config.weight_decay, config.epochs,
                     self.steps_per_epoch, config.backend, tuple(self.devices))
        if self._key not in _COMPILED:
            schedule = optax.cosine_decay_schedule(config.learning_rate,
                                                   config.epochs * self.steps_per_epoch)
            _COMPILED[self._key] = {
                "tx": train_lib.make_optimizer(config.optimizer, schedule,
                                               momentum=config.momentum,
                                               weight_decay=config.weight_decay),
                "eval": parallel.data_parallel(train_lib.make_eval_step(self.model),
                                               backend=config.backend, devices=self.devices)}
        self._compiled = _COMPILED[self._key]
        self.tx = self._compiled["tx"]
        self._eval = self._compiled["eval"]

    def step(self, loss: str):
        """The compiled step of `loss` (one compile per loss, shared by settings and seeds)."""
        cfg = loss_config(self.config, loss)
        if cfg not in self._compiled:
            fn = noisy_engine.make_train_step(self.model, self.tx, cfg)
            self._compiled[cfg] = parallel.data_parallel(
                fn, backend=self.config.backend, devices=self.devices, donate_argnums=(0,))
        return self._compiled[cfg]

    def initial_variables(self, seed: int) -> dict:
        key = ("init", seed)
        if key not in self._compiled:
            self._compiled[key] = models.init_variables(
                self.model, jax.random.key(seed), (1, *self.train.images.shape[1:]))
        return self._compiled[key]

    def evaluate(self, rep_variables) -> float:
        """Clean test accuracy of replicated variables (padded batches, masked)."""
        b = -(-self.config.eval_batch_size // self.n_dev) * self.n_dev
        correct = total = 0
        for idx, mask in pipeline.padded_batches(len(self.test), b):
            c, t = parallel.unreplicate(self._eval(rep_variables, *parallel.shard_batch(
                (self.test.images[idx], self.test.labels[idx], mask), self.devices)))
            correct += int(c)  # psum'd: equal on every device
            total += int(t)
        return correct / total

    def path(self, setting: str, *parts: str) -> str:
        return os.path.join(self.workdir, "units", setting.replace(":", "_"), *parts)


def train_run(exp: Experiment, setting: str, loss: str, seed: int) -> dict:
    """Trains one (setting, loss, seed) run, resuming from its checkpoint if any."""
    c = exp.config
    labels = exp.noise[setting].noisy
    clean = exp.train.labels
    num_examples = len(exp.train)
    state = noisy_engine.init_state(exp.initial_variables(seed), exp.tx,
                                    loss_config(c, loss), num_examples, exp.num_classes)
    ckpt = ckpt_lib.Checkpointer(exp.path(setting, loss, f"seed{seed}"), max_to_keep=1)
    start, history, seconds = 0, [], 0.0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        start, history, seconds = meta["epoch"] + 1, meta["history"], meta["seconds"]
    rep = jax.device_put(parallel.replicate(state, exp.n_local))
    step_fn = exp.step(loss)
    t0 = time.time()
    for epoch in reporting.progress(range(start, c.epochs), desc=f"{setting} {loss} seed {seed}",
                                    total=c.epochs, initial=start):
        rng = np.random.default_rng([seed, epoch])
        with warnings.catch_warnings():  # a dropped remainder differs every epoch
            warnings.simplefilter("ignore")
            batches = pipeline.batch_indices(num_examples, c.batch_size,
                                             seed=int(rng.integers(2**31)), remainder="drop")
        outs = []
        for idx in batches:
            images = train_lib.augment(exp.train.images[idx], rng, c.augment)
            rep, metrics = step_fn(rep, *parallel.shard_batch(
                (images, labels[idx], idx.astype(np.int32), clean[idx]), exp.devices))
            outs.append(parallel.unreplicate(metrics))  # global sums: equal on every device
        outs = jax.device_get(outs)
        sums = {k: float(sum(o[k] for o in outs)) for k in COUNTS}
        record = dict(
            epoch=epoch, loss=float(np.mean([o["loss"] for o in outs])),
            train_accuracy=sums["correct"] / sums["count"],
            clean_accuracy=sums["clean_correct"] / max(sums["clean_count"], 1.0),
            noisy_fit=sums["noisy_fit"] / max(sums["noisy_count"], 1.0),
            noisy_recovered=sums["noisy_recovered"] / max(sums["noisy_count"], 1.0),
            test_accuracy=exp.evaluate({"params": rep.params, "batch_stats": rep.batch_stats}))
        history.append(record)
        exp.log.write(phase="noisy", setting=setting, row=loss, seed=seed, **record)
        if (epoch + 1) % c.checkpoint_every == 0 or epoch + 1 == c.epochs:
            ckpt.save(epoch, parallel.unreplicate(rep), {
                "epoch": epoch, "history": history, "seconds": seconds + time.time() - t0})
    ckpt.close()
    tests = [h["test_accuracy"] for h in history]
    return {"history": history, "best_test": max(tests), "final_test": tests[-1],
            "seconds": seconds + time.time() - t0}


def run_units(exp: Experiment) -> dict:
    """{setting: {loss: {seed: unit}}} for every run of the grid."""
    c = exp.config
    units = [(s, loss, seed) for s in c.noise for loss in c.losses for seed in c.seeds]
    out: dict = {}
    for setting, loss, seed in reporting.progress(units, desc="noisy-label runs"):
        unit = reporting.cached(exp.path(setting, loss, f"seed{seed}.json"),
                      lambda: train_run(exp, setting, loss, seed))
        out.setdefault(setting, {}).setdefault(loss, {})[seed] = unit
    return out


def summarise(units: dict, exp: Experiment) -> dict:
    """results.json: the noise actually drawn, and per row (loss) and setting the
    best / final test accuracy as mean and std over seeds."""
    c = exp.config
    noise = {}
    for s, n in exp.noise.items():
        noise[s] = {"kind": n.kind, "rate": n.rate, "realised_rate": n.realised_rate,
                    "num_noisy": int(n.is_noisy.sum()), "num_examples": len(n.noisy),
                    "transition": n.transition.round(4).tolist(),
                    "mapping": None if n.mapping is None else n.mapping.tolist()}
    rows = {}
    for loss in c.losses:
        rows[loss] = {}
        for s in c.noise:
            seeds = units[s][loss]
            best = np.array([seeds[k]["best_test"] for k in seeds])
            final = np.array([seeds[k]["final_test"] for k in seeds])
            last = [seeds[k]["history"][-1] for k in seeds]
            rows[loss][s] = {
                "best_mean": float(best.mean()), "best_std": float(best.std()),
                "final_mean": float(final.mean()), "final_std": float(final.std()),
                "best_per_seed": best.tolist(), "final_per_seed": final.tolist(),
                "final_noisy_fit_mean": float(np.mean([h["noisy_fit"] for h in last])),
                "final_clean_accuracy_mean": float(np.mean([h["clean_accuracy"] for h in last])),
                "seconds_per_run": float(np.mean([seeds[k]["seconds"] for k in seeds])),
            }
    return {"data": c.data, "num_train": len(exp.train), "num_test": len(exp.test),
            "seeds": list(c.seeds), "epochs": c.epochs, "lam": c.lam, "noise": noise,
            "rows": rows}


def _pct(mean, std):
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def results_markdown(results: dict, config) -> str:
    settings = list(config.noise)
    rows = results["rows"]
    out = [f"# Training with noisy labels on {config.data}", "",
           f"{results['num_train']} training examples (labels corrupted as below), "
           f"{results['num_test']} clean test examples; {config.model} "
           f"{dict(config.model_kwargs)}, {config.epochs} epochs, batch {config.batch_size}, "
           f"{config.optimizer} lr {config.learning_rate:g} (cosine), EM / AdaDEM weight "
           f"lam = {config.lam:g}. Test accuracy (%), mean ± std over seeds "
           f"({reporting.STD_KIND}) "
           f"{list(config.seeds)}.", "", "## Label noise (one fixed draw per setting, "
           f"seed {config.noise_seed})", ""]
    out += [plots.markdown_table(
        ["setting", "flip probability", "realised noise rate", "mislabelled"],
        [[s, f"{n['rate']:.2f}", f"{n['realised_rate']:.3f}",
          f"{n['num_noisy']} / {n['num_examples']}"]
         for s, n in results["noise"].items()]), ""]
    for key, title in (("final", "Final test accuracy (last epoch)"),
                       ("best", "Best test accuracy (max over epochs; an oracle)")):
        out += [f"## {title}", "", plots.markdown_table(
            ["loss"] + settings,
            [[loss] + [_pct(rows[loss][s][f"{key}_mean"], rows[loss][s][f"{key}_std"])
                       for s in settings] for loss in config.losses]), ""]
    deltas = []
    for loss in config.losses:
        base, reg = noisy_engine.parse_loss(loss)
        if reg and base in rows:
            deltas.append([loss] + [
                f"{100 * (rows[loss][s]['final_mean'] - rows[base][s]['final_mean']):+.1f}"
                for s in settings])
    if deltas:
        out += ["## Final accuracy minus that of the base loss alone (points)", "",
                plots.markdown_table(["loss"] + settings, deltas), ""]
    out += ["## Memorisation at the last epoch", "",
            "Training accuracy w.r.t. the given labels on the mislabelled examples (%, mean "
            "over seeds): high = the wrong labels were memorised.", "",
            plots.markdown_table(["loss"] + settings, [
                [loss] + [f"{100 * rows[loss][s]['final_noisy_fit_mean']:.1f}"
                          for s in settings] for loss in config.losses]), ""]
    return "\n".join(out)


def plot_memorisation(path: str, units: dict, config) -> None:
    """Training accuracy on the correctly and the wrongly labelled examples over epochs.

    Both w.r.t. the given labels, mean over seeds; one panel per noise setting.
    """
    settings = list(config.noise)
    fig, axes = plt.subplots(1, len(settings), figsize=(max(6.0, 4.5 * len(settings)), 3.8),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, s in zip(axes[0], settings):
        for i, loss in enumerate(config.plot_losses):
            hist = [units[s][loss][k]["history"] for k in units[s][loss]]
            epochs = np.arange(1, len(hist[0]) + 1)
            for key, style, what in (("clean_accuracy", "-", "correct labels"),
                                     ("noisy_fit", "--", "wrong labels (memorised)")):
                curve = 100 * np.mean([[h[key] for h in run] for run in hist], axis=0)
                ax.plot(epochs, curve, style, color=colours[i % len(colours)],
                        label=f"{loss}: {what}")
        ax.set_title(s)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("train accuracy w.r.t. given labels (%)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{config.data}: fitting correct vs wrong labels (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config, workdir: str, *, devices=None) -> dict:
    """Runs (or resumes) the whole experiment; returns the results dict."""
    validate(config, devices)
    confirm = reporting.claim_workdir(workdir, config)
    t0 = time.time()
    exp = Experiment(config, workdir, devices=devices)
    confirm()  # data found, labels corrupted, model built: this directory now holds this run
    units = run_units(exp)
    results: dict[str, Any] = summarise(units, exp)
    results["seconds"] = time.time() - t0
    reporting.write_json(os.path.join(workdir, "results.json"), results)
    md = results_markdown(results, config)
    reporting.write_text(os.path.join(workdir, "results.md"), md)
    if reporting.is_writer():
        plot_memorisation(os.path.join(workdir, "memorisation.png"), units, config)
        print(md)
    return results
