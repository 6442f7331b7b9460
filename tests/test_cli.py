"""The experiments' `--config` flag: misspelt and mistyped overrides get clear errors."""

import os
import subprocess
import sys

from experiments import cli
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_override_names_suggest_the_close_field():
    messages = cli.unknown_overrides(default.get_config(),
                                     ["seeds", "lr_gird", "source.epoch", "zzz"])
    assert len(messages) == 3, f"three of the four names are unknown: {messages}"
    assert "Did you mean --config.lr_grid?" in messages[0], messages[0]
    assert "--config.source.epochs" in messages[1], messages[1]
    assert "'zzz'" in messages[2] and "Did you mean" not in messages[2], messages[2]


def test_tuple_overrides_must_keep_the_element_type():
    config = default.get_config()
    assert cli.tuple_type_errors(config, default.get_config()) == []
    config.seeds = ("abc",)          # what ml_collections makes of --config.seeds=abc
    config.lr_grid = (0.01, 1)       # ints among floats are fine
    messages = cli.tuple_type_errors(config, default.get_config())
    assert len(messages) == 1 and messages[0].startswith("--config.seeds: expected a tuple of numbers"), \
        messages
    config.seeds = (0, 1)
    config.rows = ("em", 3)
    messages = cli.tuple_type_errors(config, default.get_config())
    assert len(messages) == 1 and "--config.rows" in messages[0] and "str" in messages[0], messages


def run_entry_point(module, flag, tmp_path):
    """Runs `python -m experiments.<module> --workdir=... <flag>`; (result, workdir)."""
    workdir = str(tmp_path / "run")
    run = subprocess.run([sys.executable, "-m", f"experiments.{module}", f"--workdir={workdir}", flag],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, f"{flag} must stop the run"
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert not os.path.exists(workdir), "nothing may be written before the config is valid"
    return run


def test_entry_point_stops_before_any_work_on_a_misspelt_field(tmp_path):
    run = run_entry_point("tta", "--config.sead=1", tmp_path)
    assert "--config.sead: the config has no field 'sead'. Did you mean --config.seeds?" \
        in run.stderr, run.stderr[-2000:]


def test_entry_point_stops_on_a_tuple_of_the_wrong_type(tmp_path):
    run = run_entry_point("uda", "--config.seeds=abc", tmp_path)
    assert run.stderr.strip().endswith(
        "error: --config.seeds: expected a tuple of numbers like (0, 1, 2), got ('abc',)."), \
        run.stderr[-2000:]
