"""Runs one dem_jax experiment on a Cloud TPU slice, from creation to deletion.

    python -m launch.tpu --name=dem-tta --zone=us-central2-b --accelerator-type=v4-8 \\
        --experiment=tta --config=experiments/configs/cifar10_c.py --workdir=/tmp/dem_run

Steps: create the slice; copy the committed project (`git archive HEAD`) to every worker;
install it there (a Python 3.11 virtualenv made with uv, `pip install -c requirements.lock -e '.[experiments,tfds]'` and
`jax[tpu]` pinned to the project's jax); run the experiment on all workers at once (each
worker calls `jax.distributed.initialize()`, which needs no arguments on Cloud TPU);
copy the workdir of worker 0 back; delete the slice, also when a step failed, unless --keep.
`--dry-run` prints the commands and runs nothing. `plan(args)` builds them.
"""
import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile

JAX_VERSION = "0.10.2"  # The project's pin (pyproject.toml); libtpu comes with jax[tpu].
EXPERIMENTS = ("tta", "uda", "noisy_labels")
REMOTE_DIR = "dem_jax"  # Under the remote user's home directory.
REMOTE_VENV = "dem_jax_venv"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Generation:
    """How gcloud names one TPU generation and how its slices map onto hosts (TPU VMs)."""
    prefix: str  # Accelerator type is f"{prefix}-{count}".
    counts_cores: bool  # True: count is TensorCores (2 per chip); False: count is chips.
    runtime_version: str  # Default --version for JAX (Cloud TPU "TPU software versions").
    valid_counts: str  # In words, for error messages.


# v2/v3/v4/v5p: 4 chips (8 TensorCores) per host. v5e/v6e: one TensorCore per chip; slices of
# up to 8 chips are a single host, larger ones use hosts of 4 chips.
GENERATIONS = {
    "v2": Generation("v2", True, "tpu-ubuntu2204-base", "a multiple of 8"),
    "v3": Generation("v3", True, "tpu-ubuntu2204-base", "a multiple of 8"),
    "v4": Generation("v4", True, "tpu-ubuntu2204-base", "a multiple of 8"),
    "v5p": Generation("v5p", True, "v2-alpha-tpuv5", "a multiple of 8"),
    "v5e": Generation("v5litepod", False, "v2-alpha-tpuv5-lite", "1, 4, 8, 16, 32, 64, 128 or 256"),
    "v6e": Generation("v6e", False, "v2-alpha-tpuv6e", "1, 4, 8, 16, 32, 64, 128 or 256"),
}
_CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)
_EXAMPLES = "v4-8, v4-32, v5p-8, v5litepod-8, v5litepod-16, v6e-8, v6e-16"


def parse_accelerator_type(accelerator_type: str) -> tuple[Generation, int]:
    """Splits e.g. "v5litepod-16" into its generation and count; ValueError if it is not valid."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type)
    by_prefix = {g.prefix: g for g in GENERATIONS.values()}
    if not match or match.group(1) not in by_prefix:
        hint = ""
        if match and match.group(1) == "v5e":
            hint = f" (v5e slices are called v5litepod-N, e.g. v5litepod-{match.group(2)})"
        raise ValueError(f"Unknown TPU accelerator type {accelerator_type!r}{hint}. Expected "
                         f"<generation>-<count>, e.g. {_EXAMPLES}.")
    generation, count = by_prefix[match.group(1)], int(match.group(2))
    valid = count > 0 and count % 8 == 0 if generation.counts_cores else count in _CHIP_COUNTS
    if not valid:
        unit = "TensorCores" if generation.counts_cores else "chips"
        raise ValueError(f"Invalid TPU accelerator type {accelerator_type!r}: for "
                         f"{generation.prefix} the number counts {unit} and must be "
                         f"{generation.valid_counts}.")
    return generation, count


def num_hosts(accelerator_type: str) -> int:
    """Number of TPU VM workers of a slice, e.g. v4-8 -> 1, v4-32 -> 4, v5litepod-16 -> 4."""
    generation, count = parse_accelerator_type(accelerator_type)
    if generation.counts_cores:
        return count // 8
    return 1 if count <= 8 else count // 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", required=True, help="name of the TPU VM to create")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    parser.add_argument("--accelerator-type", required=True, help=f"e.g. {_EXAMPLES}")
    parser.add_argument("--runtime-version", default=None,
                        help="TPU software version; default: the one Cloud TPU recommends for JAX "
                             "on that generation (tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite "
                             "for v5e, ...)")
    parser.add_argument("--project", default=None, help="GCP project; default: gcloud's")
    parser.add_argument("--experiment", required=True, choices=EXPERIMENTS)
    parser.add_argument("--config", required=True,
                        help="config file relative to the repository root")
    parser.add_argument("--workdir", required=True, help="workdir on the TPU workers")
    parser.add_argument("--extra-flags", default="",
                        help='more flags for the experiment, e.g. "--config.seeds=(0,1)"')
    parser.add_argument("--results-dir", default="./results",
                        help="local folder that receives worker 0's workdir")
    parser.add_argument("--python", default="3.11", help="Python version of the remote venv")
    parser.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) slice")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    try:
        parse_accelerator_type(args.accelerator_type)
    except ValueError as error:
        parser.error(str(error))
    return args


def _remote_path(path: str) -> str:
    """A path on the workers: relative paths are relative to the project's checkout there."""
    return path if os.path.isabs(path) else f"{REMOTE_DIR}/{path}"


def _steps(args: argparse.Namespace) -> dict[str, list[str]]:
    """Every step's command by name, in order; "delete" is there even with --keep."""
    generation, _ = parse_accelerator_type(args.accelerator_type)
    version = args.runtime_version or generation.runtime_version
    tarball = os.path.join(tempfile.gettempdir(), f"{args.name}-dem_jax.tar.gz")
    tpu_vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    install = " && ".join([
        f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
        f"tar -xzf ~/{os.path.basename(tarball)} -C ~/{REMOTE_DIR}",
        # The TPU images ship Python 3.10; the project needs 3.11, which uv downloads.
        "python3 -m pip install --user --quiet uv",
        f"~/.local/bin/uv venv --python {args.python} ~/{REMOTE_VENV}",
        f"cd ~/{REMOTE_DIR}",
        f"~/.local/bin/uv pip install --python ~/{REMOTE_VENV}/bin/python -c requirements.lock "
        f"-e '.[experiments,tfds]' 'jax[tpu]=={JAX_VERSION}'",
    ])
    experiment = [f"~/{REMOTE_VENV}/bin/python", "-m", f"experiments.{args.experiment}",
                  f"--config={args.config}", f"--workdir={args.workdir}",
                  *shlex.split(args.extra_flags)]
    # The first word stays unquoted so that the remote shell expands "~".
    run = f"cd ~/{REMOTE_DIR} && {experiment[0]} {shlex.join(experiment[1:])}"

    return {
        "package": ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}",
                    "HEAD"],
        "create": [*tpu_vm, "create", args.name, *where,
                   f"--accelerator-type={args.accelerator_type}", f"--version={version}",
                   *(["--spot"] if args.spot else [])],
        "copy": [*tpu_vm, "scp", tarball, f"{args.name}:", *where, "--worker=all"],
        "install": [*tpu_vm, "ssh", args.name, *where, "--worker=all", f"--command={install}"],
        "run": [*tpu_vm, "ssh", args.name, *where, "--worker=all", f"--command={run}"],
        "fetch": [*tpu_vm, "scp", "--recurse", f"{args.name}:{_remote_path(args.workdir)}",
                  args.results_dir, *where, "--worker=0"],
        "delete": [*tpu_vm, "delete", args.name, *where, "--quiet"],
        # Read-only probe before "create" (not part of the plan): exit 0 = a slice of
        # this name exists, and it is not ours to use or to delete.
        "exists": [*tpu_vm, "describe", args.name, *where, "--format=value(name)"],
    }


def plan(args: argparse.Namespace) -> list[list[str]]:
    """The commands that run the experiment described by `args`, in order (nothing is run)."""
    return [command for name, command in _steps(args).items()
            if name != "exists" and not (name == "delete" and args.keep)]


def _run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)  # Output goes straight to this terminal, live.


def unknown_config_fields(args: argparse.Namespace) -> list[str]:
    """Messages for `--config.*` fields in --extra-flags that the config does not have.

    Checked here so that a typo stops before a slice is created and paid for;
    skipped (empty) where the experiments' dependencies are not installed.
    """
    config_file = os.path.join(REPO_ROOT, args.config)
    try:
        from experiments import cli
    except ImportError:
        return []
    paths = cli.override_paths(shlex.split(args.extra_flags))
    if not paths or not os.path.isfile(config_file):
        return []
    return cli.unknown_overrides(cli.load_config_file(config_file), paths)


def main(argv=None) -> int:
    args = parse_args(argv)
    messages = unknown_config_fields(args)
    if messages:
        print("error: " + "\n       ".join(messages), file=sys.stderr)
        return 2
    hosts = num_hosts(args.accelerator_type)
    # A comment line, so that the --dry-run output is itself a valid shell script.
    print(f"# {args.accelerator_type}: {hosts} host{'s' if hosts > 1 else ''} (TPU VM workers); "
          f"the experiment runs on all of them at once."
          + (f" {args.workdir} must be one directory that every host sees (launch/README.md)."
             if hosts > 1 else ""), flush=True)
    if args.dry_run:
        for command in plan(args):
            print(shlex.join(command))
        return 0

    if subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                      capture_output=True, text=True).stdout.strip():
        print("warning: uncommitted changes are not shipped (the workers get `git archive HEAD`).",
              file=sys.stderr)
    os.makedirs(args.results_dir, exist_ok=True)
    steps = _steps(args)
    create_attempted = succeeded = False
    try:
        probe = subprocess.run(steps["exists"], capture_output=True, text=True)
    except FileNotFoundError:
        print("error: `gcloud` was not found: install the Google Cloud CLI and log in "
              "(`gcloud auth login`), or use --dry-run to see the commands.", file=sys.stderr)
        return 1
    if probe.returncode == 0:
        print(f"error: a TPU named {args.name} already exists in {args.zone}; this launcher "
              "neither reuses nor deletes a slice it did not create. Choose another --name, or "
              f"delete it first:\n  {shlex.join(steps['delete'])}", file=sys.stderr)
        return 1
    try:
        _run(steps["package"])
        create_attempted = True  # A failed or interrupted create can still leave a slice behind.
        for name in ("create", "copy", "install"):
            _run(steps[name])
        try:
            _run(steps["run"])
        finally:
            try:  # Also after a failed run: worker 0's partial logs help debugging.
                _run(steps["fetch"])
            except subprocess.CalledProcessError:
                print("warning: could not copy the workdir back from worker 0.", file=sys.stderr)
        succeeded = True
    except subprocess.CalledProcessError as error:
        print(f"error: this step failed (exit code {error.returncode}): {shlex.join(error.cmd)}",
              file=sys.stderr)
    finally:
        if create_attempted:
            _clean_up(args, steps["delete"], succeeded)
    return 0 if succeeded else 1


def _clean_up(args: argparse.Namespace, delete: list[str], succeeded: bool) -> None:
    if args.keep:
        print(f"--keep: the slice {args.name} is left running (and billed). Delete it with:\n"
              f"  {shlex.join(delete)}", file=sys.stderr)
        return
    if not succeeded:
        print(f"The run did not finish; deleting the slice {args.name} anyway "
              f"(use --keep to keep it for debugging).", file=sys.stderr)
    try:
        _run(delete)
    except subprocess.CalledProcessError:
        print(f"error: could not delete the slice {args.name}; delete it by hand:\n"
              f"  {shlex.join(delete)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
