"""Glyphs-C report: TTA accuracy per row against the number of classes, from finished or partial runs.

  python -m experiments.glyphs_c_report runs/glyphs_c10 runs/glyphs_c100 runs/glyphs_c1000 \
      [--out docs/glyphs_c.png]

Reads each work directory of `experiments.tta` with `glyphs_c.py` (its `config.json`
and its cached units), so it reports a run that is still going or was stopped: a unit
that has not finished is shown as "-", and the seed count says how many finished.
Prints markdown: the mean online accuracy of each row at each C (mean over domains,
then mean ± std over the finished seeds), AdaDEM - EM and DEM* - EM paired by seed,
the rates the sweeps chose and the step-size diagnostics (delta, max probability,
gradient norms) at each C; `--out` plots the differences against C.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from dem_jax import plots
from dem_jax.engine import reporting
from dem_jax.tasks.tta import protocol


def read_run(workdir: str) -> dict:
    """One glyphs_c work directory, whatever has finished of it.

    Returns {"C", "config",
             "units": {setting: {row: {seed: mean accuracy over domains}}},
             "lrs": {setting: {loss: best rate of Tent-dagger's sweep}},
             "sweep_best": {setting: {loss: mean accuracy over domains at that rate}},
             "diagnostics": {loss: {"lr", DIAGNOSTICS...}} at each loss's single-domain rate}.
    The layout read is `experiments.tta_lib`'s: `units/<setting>/<row>/seed<k>.json` and
    `units/lr_sweep/<setting>/tent_dagger/<loss>.json` (accuracy `[G, D]`, diagnostics `[G]`).
    """
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    num_classes = int(config["data"].split(":")[2])
    units = {}
    for setting in config["settings"]:
        for row in config["rows"]:
            for seed in config["seeds"]:
                path = os.path.join(workdir, "units", setting, row, f"seed{seed}.json")
                result = reporting.load_checked(path) if os.path.exists(path) else None
                if result is not None:
                    acc = [result["accuracy"][c] for c in config["corruptions"]]
                    units.setdefault(setting, {}).setdefault(row, {})[seed] = float(np.mean(acc))
    lrs, sweep_best, diagnostics = {}, {}, {}
    grid = [float(x) for x in config["lr_grid"]]
    for setting in config["settings"]:
        folder = os.path.join(workdir, "units", "lr_sweep", setting, "tent_dagger")
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for name in (n for n in names if n.endswith(".json")):
            sweep = reporting.load_checked(os.path.join(folder, name))
            if sweep is None:
                continue
            loss = name[:-len(".json")]
            accuracy = np.mean(sweep["accuracy"], axis=-1)
            best = int(np.argmax(accuracy))
            lrs.setdefault(setting, {})[loss] = grid[best]
            sweep_best.setdefault(setting, {})[loss] = float(accuracy[best])
            if setting == "single":
                diagnostics[loss] = {"lr": grid[best], **{
                    k: float(sweep[k][best]) for k in protocol.DIAGNOSTICS if k in sweep}}
    return {"C": num_classes, "config": config, "units": units, "lrs": lrs,
            "sweep_best": sweep_best, "diagnostics": diagnostics}


def _fmt(values) -> str:
    if not values:
        return "-"
    return f"{reporting.mean_std(values)} ({len(values)})"


def differences(run: dict, setting: str, row: str, base: str = "em") -> list[float]:
    """row - base, paired by seed, over the seeds where both finished."""
    units = run["units"].get(setting, {})
    a, b = units.get(row, {}), units.get(base, {})
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def markdown(runs: list[dict]) -> str:
    runs = sorted(runs, key=lambda r: r["C"])
    out = []
    for setting in ("single", "continual"):
        rows = []
        for row in runs[0]["config"]["rows"]:
            rows.append([row] + [_fmt(list(r["units"].get(setting, {}).get(row, {}).values()))
                                 for r in runs])
        out += [f"### {'Single-domain' if setting == 'single' else 'Continual'}: online "
                "accuracy % (mean ± std over seeds (finished seeds))", "",
                plots.markdown_table(["row"] + [f"C = {r['C']}" for r in runs], rows), ""]
    diff_rows = []
    for setting in ("single", "continual"):
        for row in ("adadem", "dem_star"):
            diff_rows.append([f"{setting}: {row} - em"]
                             + [_fmt(differences(r, setting, row)) for r in runs])
    out += ["### Gain over EM, points (paired by seed)", "",
            plots.markdown_table(["difference"] + [f"C = {r['C']}" for r in runs], diff_rows), ""]
    out += ["Learning rates chosen by Tent-dagger's sweeps (seed not reported): " + "; ".join(
        f"C = {r['C']} {setting}: " + ", ".join(f"{k} {v:g}" for k, v in sorted(lrs.items()))
        for r in runs for setting, lrs in sorted(r["lrs"].items(), reverse=True)), ""]
    columns = [(r, s) for r in runs for s in ("single", "continual") if s in r["sweep_best"]]
    losses = sorted({loss for r, s in columns for loss in r["sweep_best"][s]})
    if columns:
        seeds = sorted({str(r["config"].get("lr_sweep_seed", "?")) for r, _ in columns})
        out += [f"### Tent-dagger's sweeps: accuracy % at each loss's best rate (seed "
                f"{', '.join(seeds)}, not a reported seed; mean over domains)", "",
                "Finished before any table row (the sweeps run first), so a partial run "
                "already compares the losses here, each at its own best rate.", "",
                plots.markdown_table(
                    ["loss"] + [f"C = {r['C']} {s}" for r, s in columns],
                    [[loss] + [f"{100 * r['sweep_best'][s][loss]:.1f}"
                               if loss in r["sweep_best"][s] else "-" for r, s in columns]
                     for loss in losses]), ""]
    drows = [[str(r["C"]), loss, f"{d['lr']:g}"] + [
        f"{d[k]:.4g}" if k in d else "-" for k in protocol.DIAGNOSTICS]
        for r in runs for loss, d in sorted(r["diagnostics"].items())]
    if drows:
        out += ["### Step-size diagnostics (Tent-dagger, single-domain sweep, at each loss's "
                "chosen rate; means over the stream)", "",
                "delta: ||p(z+T+1)||_1 (AdaDEM's normaliser); max_prob: mean top probability; "
                "logit_grad_l1: mean L1 norm of an example's loss gradient w.r.t. its logits; "
                "param_grad_norm: norm of the parameter gradient; mec_diag: mean MEC diagonal "
                "(1/C at the start).", "",
                plots.markdown_table(["C", "loss", "lr", *protocol.DIAGNOSTICS], drows), ""]
    return "\n".join(out)


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(runs, key=lambda r: r["C"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, setting in zip(axes, ("single", "continual")):
        for row, colour in (("adadem", "C0"), ("dem_star", "C1")):
            pts = [(r["C"], 100 * np.asarray(differences(r, setting, row))) for r in runs]
            pts = [(c, d) for c, d in pts if d.size]
            if not pts:
                continue
            cs = [c for c, _ in pts]
            ax.errorbar(cs, [d.mean() for _, d in pts], yerr=[d.std() for _, d in pts],
                        marker="o", color=colour, capsize=3, label=f"{row} - em")
            for c, d in pts:
                ax.scatter([c] * d.size, d, color=colour, s=8, alpha=0.5)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("number of classes C")
        ax.set_title(setting)
    axes[0].set_ylabel("accuracy gain over EM (points)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    fig.suptitle("Glyphs-C: gain over EM against C (dots: seeds; bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    runs = [read_run(w) for w in args.workdirs]
    print(markdown(runs))
    if args.out:
        plot(runs, args.out)


if __name__ == "__main__":
    main()
