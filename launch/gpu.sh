#!/usr/bin/env bash
# Runs one dem_jax experiment on this machine's NVIDIA GPUs (a single host; the experiment's
# pmap / shard_map uses every local GPU, so nothing here splits the work).
#
#   launch/gpu.sh --experiment=tta --config=experiments/configs/cifar10_c.py --workdir=/tmp/dem_run \
#       [--venv=.venv] [--python=python3.11] [--extra-flags="--config.seeds=(0,1)"] [--dry-run]
#
# Makes the virtualenv if it is missing, installs jax[cuda12] pinned to the project's jax plus the
# project into it, then runs `python -m experiments.<experiment>`. A virtualenv that already has the
# CPU install works: jax[cuda12] adds the CUDA plugin. --dry-run prints the commands, runs nothing.
set -euo pipefail

JAX_VERSION=0.10.2  # The project's pin (pyproject.toml).

usage() {
  sed -n '5,6p' "$0" | sed 's/^# *//'
}

experiment="" config="" workdir="" venv=".venv" python="python3.11" extra="" dry_run=0
for arg in "$@"; do
  case "$arg" in
    --experiment=*) experiment="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --venv=*) venv="${arg#*=}" ;;
    --python=*) python="${arg#*=}" ;;
    --extra-flags=*) extra="${arg#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$experiment" || -z "$config" || -z "$workdir" ]]; then
  echo "error: --experiment, --config and --workdir are required" >&2; usage >&2; exit 2
fi
case "$experiment" in
  tta|uda|noisy_labels) ;;
  *) echo "error: --experiment must be tta, uda or noisy_labels, got '$experiment'" >&2; exit 2 ;;
esac
# Split on whitespace: a flag value with spaces in it is not supported.
read -ra extra_args <<< "$extra"

# A relative --workdir (and a given --venv) is the caller's; a relative --config is the caller's
# if it exists there, else the repository's (experiments/configs/...). The default venv is the
# repository's .venv.
absolute() { if [[ "$1" = /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
workdir="$(absolute "$workdir")"
if [[ "$venv" != ".venv" ]]; then venv="$(absolute "$venv")"; fi
if [[ -f "$config" ]]; then config="$(absolute "$config")"; fi
cd "$(dirname "$0")/.."

run() {
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
  if (( ! dry_run )); then "$@"; fi
}

if [[ ! -x "$venv/bin/python" ]]; then
  too_old='import sys; sys.exit(sys.version_info < (3, 11))'
  if (( ! dry_run )) && ! "$python" -c "$too_old" 2>/dev/null; then
    echo "error: '$python' is missing or older than Python 3.11; pass --python=/path/to/python3.11" \
      >&2
    exit 2
  fi
  run "$python" -m venv "$venv"
fi
run "$venv/bin/python" -m pip install --upgrade pip
run "$venv/bin/python" -m pip install -c requirements.lock -e '.[experiments,tfds]' "jax[cuda12]==$JAX_VERSION"
# One process drives every local GPU. Without this, jax.distributed inside a Slurm job step
# (srun) would make this a one-GPU process of a Slurm-sized job.
echo "export DEM_JAX_NUM_PROCESSES=1"
export DEM_JAX_NUM_PROCESSES=1
run "$venv/bin/python" -m "experiments.$experiment" "--config=$config" "--workdir=$workdir" \
  ${extra_args[@]+"${extra_args[@]}"}
