"""The experiments' flags and config checks: misspelt, mistyped and out-of-range values, a
missing config file and a bad work directory get clear errors before any work; --help."""

import os
import re
import subprocess
import sys

import pytest

from dem_jax.engine import reporting
from experiments import cli
from experiments import specs
from experiments.configs import default
from experiments.configs import noisy_default

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


@pytest.mark.parametrize("field,value,message", [
    ("lr_grid", (-0.1, 1.0), "config.lr_grid must hold numbers > 0 only, got -0.1 in (-0.1, 1.0)."),
    ("lr_grid", (), "config.lr_grid is empty: give at least one number."),
    ("seeds", (0.5,), "config.seeds must hold ints >= 0 only, got 0.5 in (0.5,)."),
    ("seeds", (-1,), "config.seeds must hold ints >= 0 only, got -1 in (-1,)."),
    ("rows", ("em", 3), "config.rows must hold strings only, got 3 in ('em', 3)."),
    ("severity", 6, "config.severity must be in [1, 5], got 6."),
    ("corruption_seed", -3, "config.corruption_seed must be >= 0, got -3."),
    ("source.learning_rate", float("nan"), "config.source.learning_rate must be > 0, got nan."),
    ("dem_star.fraction", 1.0, "config.dem_star.fraction must be in (0, 1), got 1.0."),
    ("learning_rates.em", 0.0, "config.learning_rates.em must be > 0, got 0.0."),
    ("mec_momentum", 0.0, "config.mec_momentum must be in (0, 1], got 0.0."),
])
def test_each_bad_value_is_named_by_the_spec(field, value, message):
    config = default.get_config()
    with config.unlocked():
        node = config
        *parents, leaf = field.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    assert cli.config_errors(config, specs.TTA) == [message]
    with pytest.raises(cli.ConfigError, match=re.escape(message)):
        cli.check_config(config, specs.TTA)


EXPERIMENTS = {"tta": ("default.py", specs.TTA), "uda": ("uda_default.py", specs.UDA),
               "noisy_labels": ("noisy_default.py", specs.NOISY),
               "ssl": ("ssl_default.py", specs.SSL), "rl": ("rl_default.py", specs.RL)}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_numeric_and_tuple_field_of_every_config_file_has_a_rule(name):
    default_file, spec = EXPERIMENTS[name]
    files = cli.config_files(os.path.join(ROOT, "experiments", "configs", default_file))
    assert len(files) >= 2, files  # the default and at least one named config
    for path in files:
        config = cli.load_config_file(path)
        for field, value in cli._flat(config).items():
            if isinstance(value, (int, float, tuple)) and not isinstance(value, bool):
                assert cli.spec_rule(spec, field) is not None, \
                    f"{os.path.basename(path)}: config.{field} has no rule in specs"
        assert cli.config_errors(config, spec) == [], path


def test_a_missing_config_file_lists_the_experiments_config_files():
    with pytest.raises(SystemExit) as e:
        cli.define_config(os.path.join(ROOT, "experiments", "configs", "uda_default.py"),
                          argv=["uda", "--config=experiments/configs/uda_mnsit_m.py"])
    assert str(e.value).startswith("error: --config=experiments/configs/uda_mnsit_m.py: no "
                                   "such file."), e.value
    assert "uda_mnist_m.py" in str(e.value) and "noisy" not in str(e.value), e.value


def test_a_config_argument_after_a_colon_is_passed_and_its_overrides_checked():
    # "glyphs_c.py:100" is the file with get_config("100"); overrides of it are checked too.
    path = os.path.join(ROOT, "experiments", "configs", "glyphs_c.py")
    assert cli.load_config_file(path + ":100").data.startswith("glyphs:cjk:100")
    assert cli.load_config_file(path).data.startswith("glyphs:cjk:10:")
    with pytest.raises(SystemExit, match=r"--config.setings: the config has no field "
                                         r"'setings'. Did you mean --config.settings\?"):
        cli.define_config(os.path.join(ROOT, "experiments", "configs", "default.py"),
                          argv=["tta", f"--config={path}:100", "--config.setings=('single',)"])


def test_run_prints_config_and_workdir_errors_as_one_paragraph(tmp_path):
    class Lib:
        validate = staticmethod(lambda config: cli.check_config(config, specs.NOISY))
        run = staticmethod(lambda config, workdir: reporting.claim_workdir(workdir, config))

    config = noisy_default.get_config()
    config.lam = -1.0
    with pytest.raises(SystemExit, match=r"^error: config.lam must be >= 0, got -1.0.$"):
        cli.run(Lib, config, str(tmp_path / "work"))
    config.lam = 0.3
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --workdir=.*afile is a file"):
        cli.run(Lib, config, str(tmp_path / "afile"))


@pytest.mark.parametrize("field,value", [("lr_grid", (-0.1, 1.0)), ("lr_grid", ()),
                                         ("seeds", (0.5,))])
def test_a_bad_value_stops_the_run_before_the_workdir_is_touched(tmp_path, field, value):
    from experiments import tta_lib
    config = default.get_config()
    setattr(config, field, value)
    with pytest.raises(cli.ConfigError, match=f"config.{field}"):
        tta_lib.run(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists(), "a bad config must not stamp the work directory"


def test_help_shows_every_flag_and_the_config_files():
    run = subprocess.run([sys.executable, "-m", "experiments.noisy_labels", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    text = " ".join((run.stdout + run.stderr).split())  # absl wraps the help text
    for flag in ("--config:", "--workdir:", "--coordinator_address:", "--num_processes:",
                 "--process_id:"):
        assert flag in text, f"{flag} missing from --help:\n{run.stdout[-3000:]}"
    assert "experiments/configs/noisy_default.py" in text
    assert "experiments/configs/noisy_fashion_mnist.py" in text
    assert "uda_default.py" not in text
