"""The TTA experiment end to end on a tiny configuration: outputs, resume, bad configs."""

import json
import os

import numpy as np
import pytest

from dem_jax import data as data_lib
from experiments import tta_lib
from experiments.configs import default


def tiny_config():
    c = default.get_config()
    c.model_kwargs = {"width": 4, "hidden": 8}
    c.source.epochs = 1
    c.corruptions = ("gaussian_noise", "contrast")
    c.batch_size = 40                    # a multiple of the 8 test devices
    c.seeds = (0, 1)
    c.rows = ("noadapt", "em", "dem_star", "adadem")
    c.lr_grid = (0.1, 1.0)
    c.lr_sweep_losses = ("em", "adadem")
    c.dem_star.tau_step = 1.0
    c.dem_star.alpha_step = 1.0
    c.fisher_size = 80
    return c


def test_experiment_writes_results_and_resumes(tmp_path, save_log):
    workdir = str(tmp_path / "run")
    config = tiny_config()
    results = tta_lib.run(config, workdir)
    for name in ("results.json", "results.md", "lr_sensitivity.png", "rewards.png",
                 "continual_histogram.png", "metrics.jsonl", "config.json"):
        assert os.path.exists(os.path.join(workdir, name)), f"{name} was not written"
    saved = json.load(open(os.path.join(workdir, "results.json")))
    for setting in ("single", "continual"):
        for row in config.rows:
            r = saved[setting][row]
            assert set(r["per_corruption"]) == set(config.corruptions)
            assert 0.0 <= r["mean"] <= 1.0 and r["std"] >= 0.0
            assert len(r["per_seed_mean"]) == 2
    for setting in ("single", "continual"):
        chosen = saved["dem_star"]["chosen"][setting]["tent_dagger"]
        assert len(chosen) == 2 and len({(h["tau"], h["alpha"]) for h in chosen}) == 1
        # Every row scored on the same evaluation images: the split's rest.
        counts = {row: saved[setting][row]["num_examples"] for row in config.rows}
        first = counts[config.rows[0]]
        assert all(v == first for v in counts.values()), counts
        for c, n in first.items():  # whole batches of the evaluation part
            assert 0 <= saved["split"]["evaluation"][c] - n < config.batch_size
    assert set(saved["lr_sweep"]["accuracy"]["single"]["tent_dagger"]) >= {"em", "adadem"}
    assert set(saved["learning_rates"]["continual"]["tent_dagger"]) == {"em", "adadem"}
    diag = saved["diagnostics"]["adadem"]["0.1"]
    assert diag["delta"] >= 1.0 and 0 < diag["max_prob"] <= 1 and diag["param_grad_norm"] > 0
    md = open(os.path.join(workdir, "results.md")).read()
    assert "| Tent† + adadem |" in md and "mean ± std" in md
    means = {row: saved["single"][row]["mean"] for row in config.rows}
    assert len(set(means.values())) > 1, f"every row has the same accuracy: {means}"
    # A finished run restarted with the same command loads every unit: same results,
    # nothing trained or adapted again.
    save_log.start()
    again = tta_lib.run(config, workdir)
    assert again == results
    assert save_log.calls == [], f"a finished run saved again: {save_log.calls}"
    # A run of some of the rows, seeds and settings shares the directory: every unit
    # comes from the cache, results equal to the full run's.
    part = tiny_config()
    part.rows, part.seeds, part.settings = ("noadapt", "adadem"), (1,), ("single",)
    part.lr_sweep_losses = ()
    subset = tta_lib.run(part, workdir)
    assert save_log.calls == [], f"a subset of a finished run saved again: {save_log.calls}"
    for row in part.rows:
        assert subset["single"][row]["per_seed_mean"] == [results["single"][row]["per_seed_mean"][1]]
    assert "continual" not in subset
    # ... and a different configuration in the same workdir is refused.
    other = tiny_config()
    other.lr_grid = (0.1,)
    with pytest.raises(ValueError, match="different configuration"):
        tta_lib.run(other, workdir)


def test_fixed_learning_rates_sweep_nothing_for_the_rows(tmp_path):
    config = tiny_config()
    config.rows, config.seeds, config.settings = ("noadapt", "em"), (0,), ("single",)
    config.lr_selection, config.learning_rates = "fixed", {"em": 0.3}
    config.lr_sweep_losses = ()
    workdir = str(tmp_path / "fixed")
    results = tta_lib.run(config, workdir)
    assert results["learning_rates"] == {"single": {"tent_dagger": {"em": 0.3}}}
    assert results["lr_sweep"] is None and results["diagnostics"] == {}
    assert not os.path.exists(os.path.join(workdir, "lr_sweep")), "a sweep ran for a fixed rate"
    assert "fixed: config.learning_rates" in open(os.path.join(workdir, "results.md")).read()
    config.rows = ("em", "adadem")
    with pytest.raises(ValueError, match="no rate for 'adadem'"):  # before any work starts
        tta_lib.run(config, str(tmp_path / "missing"))
    assert not os.path.exists(tmp_path / "missing"), "the work directory was made before the error"


@pytest.mark.parametrize("change,error,match", [
    (dict(rows=("noadapt", "tent3+em")), ValueError, "Unknown method"),
    (dict(rows=("em", "entropy2")), ValueError, "Unknown row"),
    (dict(rows=("eta+nope",)), ValueError, "Unknown loss"),
    (dict(batch_size=30), ValueError, "not divisible by the 8 devices"),
    (dict(corruptions=("fog", "rain")), ValueError, "Unknown corruption"),
    (dict(data="fashion_mnist", data_dir="/nonexistent"), FileNotFoundError, "apt-get"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(max_test_examples=60), ValueError, "less than two adaptation batches"),
    (dict(lr_sweep_seed=1), ValueError, "one of the reported seeds"),
    (dict(rows=("deyo+dem_star", "nope+em")), ValueError, "Unknown method"),
])
def test_bad_config_is_a_clear_error(tmp_path, change, error, match):
    config = tiny_config()
    for k, v in change.items():
        setattr(config, k, v)
    with pytest.raises(error, match=match):
        tta_lib.run(config, str(tmp_path / "bad"))


def test_dem_star_fraction_outside_zero_one_is_a_clear_error(tmp_path):
    config = tiny_config()
    config.dem_star.fraction = 1.7
    with pytest.raises(ValueError, match="fraction must be in"):
        tta_lib.run(config, str(tmp_path / "bad"))


def test_loaded_target_domains_take_the_same_test_subset(monkeypatch):
    """`config.target` + `max_test_examples`: each loaded domain is cut to the subset."""
    full = data_lib.load("digits", "test")
    real_load = data_lib.load
    loaded = []

    def load(name, split="train", **kw):
        if name.startswith("fake-c:"):
            loaded.append(name)
            return full  # stands in for a corrupted copy of the whole test split
        return real_load(name, split, **kw)

    monkeypatch.setattr(tta_lib.data_lib, "load", load)
    config = tiny_config()
    config.target = "fake-c:{corruption}-{severity}"
    subset = np.sort(np.random.default_rng(0).permutation(len(full))[:100])
    domains = tta_lib.load_domains(config, full.subset(subset), subset)
    assert loaded == [f"fake-c:{c}-5" for c in config.corruptions]
    for d in domains:
        np.testing.assert_array_equal(d.labels, full.labels[subset],
                                      err_msg=f"{d.name}: not the images of the subset")
    with pytest.raises(ValueError, match="max_test_examples"):
        tta_lib.load_domains(config, full, np.array([len(full)]))
