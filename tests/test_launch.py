"""Tests for the launchers: the planned gcloud commands, accelerator types, and dry runs."""
import os
import shlex
import subprocess
import sys

import pytest

from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--name=dem-test", "--zone=us-central2-b", "--project=my-proj", "--experiment=tta",
        "--config=experiments/configs/cifar10_c.py", "--workdir=/tmp/dem_run"]


def _plan(*flags):
    return tpu.plan(tpu.parse_args(BASE + list(flags)))


def _find(commands, *words):
    """The one command that contains all `words` (as whole arguments)."""
    found = [c for c in commands if all(w in c for w in words)]
    assert len(found) == 1, f"expected one command with {words}, got {len(found)}:\n" + \
        "\n".join(shlex.join(c) for c in commands)
    return found[0]


@pytest.mark.parametrize("accelerator_type, version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_plan_creates_installs_runs_fetches_and_deletes(accelerator_type, version):
    commands = _plan(f"--accelerator-type={accelerator_type}")
    steps = ["package" if c[0] == "git" else c[4] for c in commands]
    assert steps == ["package", "create", "scp", "ssh", "ssh", "scp", "delete"], \
        "steps must run in the order package, create, copy, install, run, fetch, delete"
    package, create, copy, install, run, fetch, delete = commands
    where = {"--zone=us-central2-b", "--project=my-proj"}
    for command in commands[1:]:
        assert command[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        assert where <= set(command), f"zone and project missing from {shlex.join(command)}"

    assert create[4:6] == ["create", "dem-test"]
    assert {f"--accelerator-type={accelerator_type}", f"--version={version}"} <= set(create)
    assert "--spot" not in create

    tarball = next(a.split("=", 1)[1] for a in package if a.startswith("--output="))
    assert package[-1] == "HEAD" and "archive" in package
    assert {tarball, "dem-test:", "--worker=all"} <= set(copy)

    assert "--worker=all" in install
    assert "'.[experiments,tfds]'" in install[-1] and "-c requirements.lock" in install[-1] and "'jax[tpu]==0.10.2'" in install[-1]

    assert "--worker=all" in run and run[-1].startswith("--command=")
    remote = shlex.split(run[-1].split("=", 1)[1])
    assert remote[remote.index("-m"):] == [
        "-m", "experiments.tta", "--config=experiments/configs/cifar10_c.py",
        "--workdir=/tmp/dem_run"]

    assert {"--recurse", "dem-test:/tmp/dem_run", "./results", "--worker=0"} <= set(fetch)
    assert {"dem-test", "--quiet"} <= set(delete)


def test_keep_drops_the_delete_and_options_reach_the_commands():
    commands = _plan("--accelerator-type=v6e-8", "--keep", "--spot", "--runtime-version=my-image",
                     "--results-dir=out", "--extra-flags=--config.seed=3 --config.note='a b'",
                     "--workdir=runs/x")
    assert not any("delete" in c for c in commands)
    create = _find(commands, "create")
    assert "--spot" in create and "--version=my-image" in create
    run = next(c for c in commands if "experiments.tta" in c[-1])
    remote = shlex.split(run[-1].split("=", 1)[1])
    assert remote[-3:] == ["--workdir=runs/x", "--config.seed=3", "--config.note=a b"]
    # A relative workdir is relative to the project's checkout on the workers.
    fetch = _find(commands, "scp", "--recurse")
    assert "dem-test:dem_jax/runs/x" in fetch and "out" in fetch


@pytest.mark.parametrize("accelerator_type, hosts", [
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v5p-8", 1), ("v5p-16", 2), ("v3-32", 4),
    ("v5litepod-1", 1), ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4),
    ("v5litepod-256", 64), ("v6e-8", 1), ("v6e-16", 4), ("v6e-32", 8)])
def test_num_hosts(accelerator_type, hosts):
    assert tpu.num_hosts(accelerator_type) == hosts


@pytest.mark.parametrize("bad, message", [
    ("v4", "Expected <generation>-<count>"),
    ("v4-6", "must be a multiple of 8"),
    ("v5litepod-2", "must be 1, 4, 8"),
    ("v5e-16", "called v5litepod-N"),
    ("v7q-8", "Unknown TPU accelerator type"),
    ("tpu-v4-8", "Unknown TPU accelerator type"),
])
def test_bad_accelerator_types_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        tpu.parse_accelerator_type(bad)


def test_bad_accelerator_type_on_the_command_line_exits_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tpu.parse_args(BASE + ["--accelerator-type=v4-7"])
    assert exit_info.value.code == 2
    assert "v4-7" in capsys.readouterr().err


def _run_module(*args):
    # PATH without gcloud, so a command that slipped past --dry-run would fail loudly.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_dry_run_subprocess_prints_the_plan_and_runs_nothing(tmp_path):
    args = BASE + ["--accelerator-type=v5litepod-16", f"--results-dir={tmp_path / 'results'}",
                   "--dry-run"]
    result = _run_module("-m", "launch.tpu", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("# v5litepod-16: 4 hosts")
    assert [shlex.split(line) for line in lines[1:]] == tpu.plan(tpu.parse_args(args))
    assert not (tmp_path / "results").exists(), "--dry-run must not create anything"


def _fake_subprocess(monkeypatch, fails=lambda command: False, exists=False):
    """Records the commands main() runs instead of running them; those `fails` accepts fail.

    `exists`: whether the probe `tpu-vm describe` finds a slice of that name already.
    """
    ran = []

    def fake_run(command, check=False, **kwargs):
        if "describe" in command:
            return subprocess.CompletedProcess(command, 0 if exists else 1, stdout="", stderr="")
        ran.append(command)
        if fails(command):
            raise subprocess.CalledProcessError(1, command)
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(tpu.subprocess, "run", fake_run)
    return lambda: [c[4] if c[0] == "gcloud" else c[3] for c in ran]


def test_main_reports_a_failed_step_and_still_deletes_the_slice(monkeypatch, capsys, tmp_path):
    steps_run = _fake_subprocess(monkeypatch, lambda c: "create" in c)
    code = tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}"])
    assert code == 1
    assert steps_run() == ["status", "archive", "create", "delete"]
    err = capsys.readouterr().err
    assert "failed" in err and "deleting the slice dem-test" in err


def test_main_never_touches_a_slice_of_the_same_name_it_did_not_create(monkeypatch, capsys,
                                                                      tmp_path):
    steps_run = _fake_subprocess(monkeypatch, exists=True)
    code = tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}"])
    assert code == 1
    assert "create" not in steps_run() and "delete" not in steps_run(), steps_run()
    assert "already exists" in capsys.readouterr().err


def test_main_without_gcloud_is_a_clear_error(monkeypatch, capsys, tmp_path):
    def no_gcloud(command, **kwargs):
        if command[0] == "gcloud":
            raise FileNotFoundError(2, "No such file or directory", "gcloud")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(tpu.subprocess, "run", no_gcloud)
    assert tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}"]) == 1
    assert "`gcloud` was not found" in capsys.readouterr().err


def test_main_refuses_a_misspelt_config_field_before_creating_anything(monkeypatch, capsys,
                                                                     tmp_path):
    steps_run = _fake_subprocess(monkeypatch)
    code = tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}",
                            "--extra-flags=--config.sedes=(0,1)"])
    assert code == 2 and steps_run() == []
    assert "Did you mean --config.seeds?" in capsys.readouterr().err


def test_main_fetches_results_after_a_failed_run(monkeypatch, tmp_path):
    steps_run = _fake_subprocess(monkeypatch, lambda c: "experiments.tta" in c[-1])
    assert tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}"]) == 1
    assert steps_run() == ["status", "archive", "create", "scp", "ssh", "ssh", "scp", "delete"]


def test_main_with_keep_leaves_the_slice_and_says_how_to_delete_it(monkeypatch, capsys, tmp_path):
    steps_run = _fake_subprocess(monkeypatch)
    code = tpu.main(BASE + ["--accelerator-type=v4-8", f"--results-dir={tmp_path}", "--keep"])
    assert code == 0
    assert steps_run() == ["status", "archive", "create", "scp", "ssh", "ssh", "scp"]
    assert "gcloud compute tpus tpu-vm delete dem-test" in capsys.readouterr().err


def test_gpu_script_dry_run():
    result = subprocess.run(
        ["bash", "launch/gpu.sh", "--dry-run", "--experiment=noisy_labels",
         "--config=experiments/configs/c.py", "--workdir=/tmp/w", "--extra-flags=--config.seed=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    assert any("jax[cuda12]==0.10.2" in line and ".[experiments,tfds]" in line for line in lines)
    assert lines[-1][1:] == ["-m", "experiments.noisy_labels", "--config=experiments/configs/c.py",
                             "--workdir=/tmp/w", "--config.seed=2"]
    bad = subprocess.run(["bash", "launch/gpu.sh", "--dry-run", "--experiment=tta"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "required" in bad.stderr


def test_launchers_pin_the_projects_jax():
    with open(os.path.join(ROOT, "requirements.lock")) as f:
        pins = f.read().split()
    assert f"jax=={tpu.JAX_VERSION}" in pins, "launch/tpu.py pins another jax than requirements.lock"
    with open(os.path.join(ROOT, "launch", "gpu.sh")) as f:
        assert f"JAX_VERSION={tpu.JAX_VERSION}" in f.read(), "launch/gpu.sh pins another jax"
