"""The TTA experiment end to end on a tiny configuration: outputs, resume, bad configs."""

import json
import os

import pytest

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
    chosen = saved["dem_star"]["chosen"]
    assert len(chosen) == 2 and all(h["alpha"] * h["tau"] <= 2.0 for h in chosen)
    assert set(saved["lr_sweep"]["accuracy"]) >= {"em", "adadem"}
    md = open(os.path.join(workdir, "results.md")).read()
    assert "| adadem |" in md and "mean ± std" in md
    means = {row: saved["single"][row]["mean"] for row in config.rows}
    assert len(set(means.values())) > 1, f"every row has the same accuracy: {means}"
    # A finished run restarted with the same command loads every unit: same results,
    # nothing trained or adapted again.
    save_log.start()
    again = tta_lib.run(config, workdir)
    assert again == results
    assert save_log.calls == [], f"a finished run saved again: {save_log.calls}"
    # ... and a different configuration in the same workdir is refused.
    other = tiny_config()
    other.seeds = (3,)
    with pytest.raises(ValueError, match="different configuration"):
        tta_lib.run(other, workdir)


@pytest.mark.parametrize("change,error,match", [
    (dict(rows=("noadapt", "tent3+em")), ValueError, "Unknown method"),
    (dict(rows=("em", "entropy2")), ValueError, "Unknown row"),
    (dict(rows=("eta+nope",)), ValueError, "Unknown loss"),
    (dict(batch_size=30), ValueError, "not divisible by the 8 devices"),
    (dict(corruptions=("fog", "rain")), ValueError, "Unknown corruption"),
    (dict(data="fashion_mnist", data_dir="/nonexistent"), FileNotFoundError, "apt-get"),
])
def test_bad_config_is_a_clear_error(tmp_path, change, error, match):
    config = tiny_config()
    for k, v in change.items():
        setattr(config, k, v)
    with pytest.raises(error, match=match):
        tta_lib.run(config, str(tmp_path / "bad"))
