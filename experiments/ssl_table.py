"""Semi-supervised results across configs, laid out like the paper's Tables 8 and 15.

  python -m experiments.ssl_table runs/ssl_fmnist4 runs/ssl_fmnist25 runs/ssl_lt10 runs/ssl_lt100

Reads the finished units of each `experiments.ssl` work directory (every row and seed
found there, so runs made one row or seed at a time add up) and prints markdown: per
method, top-1 (then macro F1) mean ± std over seeds without and with AdaDEM, AdaDEM's
gain paired by seed with the number of seeds where it is ahead, and the paper's
numbers (USB, ViT backbones; `../shared/dem-notes.md` section 5) beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import types

from dem_jax import plots
from dem_jax.engine import reporting
from dem_jax.tasks import ssl
from experiments import ssl_lib
from experiments.uda_lib import slug

# Top-1 %, (without, with AdaDEM): the paper's means over its label budgets.
PAPER = {
    "CIFAR-10 (mean of 4/25/400 labels)": {
        "entmin": (96.4, 97.2), "vat": (97.4, 98.5), "fixmatch": (98.4, 98.7)},
    "CIFAR-100 (mean of 2/4/25 labels)": {
        "entmin": (72.6, 75.8), "vat": (77.5, 78.8), "fixmatch": (79.3, 79.5),
        "freematch": (82.6, 83.1)},
}
PAPER_LT = ("The paper's class-imbalance numbers (Table 15, top-1, EM -> AdaDEM): CIFAR-10-LT "
            "rho = 100 / 500 / 1000: 85.4 -> 91.4, 83.9 -> 90.7, 82.1 -> 88.6; CIFAR-100-LT "
            "rho = 10 / 100 / 500: 60.0 -> 66.2, 58.6 -> 64.4, 57.6 -> 64.1.")
ROWS = [r for m in ssl.METHODS for r in ((m,) if m == "supervised" else (m, f"{m}+adadem"))]
NAMES = {"supervised": "Supervised", "entmin": "Ent.Min", "vat": "VAT", "mixmatch": "MixMatch",
         "fixmatch": "FixMatch", "freematch": "FreeMatch"}


def read_run(workdir: str) -> dict:
    """{"title", "units": {row: {seed: unit}}} of one work directory."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a work directory of "
                                "experiments.ssl.")
    with open(path) as f:
        config = json.load(f)
    seeds = set()
    for row in ROWS:
        folder = os.path.join(workdir, "units", slug(row))
        names = os.listdir(folder) if os.path.isdir(folder) else []
        seeds |= {int(m.group(1)) for m in map(re.compile(r"seed(\d+)\.json$").match, names) if m}
    units = ssl_lib.collect(types.SimpleNamespace(rows=ROWS, seeds=sorted(seeds)), workdir)
    title = (f"{config['dataset']}-LT rho = {config['rho']:g}" if config["rho"] > 1 else
             f"{config['dataset']}, {config['labelled']} labels")
    return {"title": title, "units": units}


def _cell(seeds: dict, key: str) -> str:
    if not seeds:
        return "-"
    return reporting.mean_std([u[key] for u in seeds.values()]) + (
        "" if len(seeds) == 3 else f" ({len(seeds)} seeds)")


def markdown(runs: list[dict]) -> str:
    out = []
    for key, label in (("accuracy", "Top-1"), ("macro_f1", "Macro F1")):
        paper = list(PAPER) if key == "accuracy" else []
        gains = [ssl_lib.adadem_gains(r["units"]) for r in runs]
        table = []
        for method in ssl.METHODS:
            variants = [(method, NAMES[method])] + ([] if method == "supervised" else
                                                    [(f"{method}+adadem", "+ AdaDEM")])
            for i, (row, name) in enumerate(variants):
                if not any(r["units"].get(row) for r in runs):
                    continue
                table.append([name] + [_cell(r["units"].get(row, {}), key) for r in runs]
                             + [f"{PAPER[p][method][i]:.1f}" if method in PAPER[p] else ""
                                for p in paper])
            if any(method in g for g in gains):
                table.append(["gain (seeds ahead)"]
                             + [ssl_lib.format_gain(g[method][key]) if method in g else "-"
                                for g in gains] + [
                                 f"{PAPER[p][method][1] - PAPER[p][method][0]:+.1f}"
                                 if method in PAPER[p] else "" for p in paper])
        out += [f"### {label} % (mean ± std over seeds, 3 unless said; gain: AdaDEM minus without, "
                "paired by seed)", "",
                plots.markdown_table(["method"] + [r["title"] for r in runs]
                                     + [f"paper: {p}" for p in paper], table), ""]
    return "\n".join(out + [PAPER_LT, ""])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdirs", nargs="+")
    args = p.parse_args(argv)
    print(markdown([read_run(w) for w in args.workdirs]))


if __name__ == "__main__":
    main()
