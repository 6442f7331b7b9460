r"""Training with noisy labels: CE / GCE / SCE / ELR, each alone and + EM / + AdaDEM.

  python -m experiments.noisy_labels --workdir=/tmp/dem_noisy             # digits, embedded
  python -m experiments.noisy_labels --config=experiments/configs/noisy_fashion_mnist.py \
      --workdir=DIR

Steps: corrupt the training labels (symmetric / asymmetric, from a fixed seed;
the clean labels are kept for the metrics); train every loss on every noise
setting for every seed, evaluating on the clean test split after each epoch;
write `results.json` (best and final test accuracy, mean and std over seeds,
the realised noise rate and transition matrix), `results.md` and the
memorisation plot `memorisation.png` to the work directory. Every run is
checkpointed and every finished run saved, so a restarted command continues.

Several hosts: run the same command on each with `--coordinator_address=HOST:PORT`
(process 0's), `--num_processes` and its own `--process_id` (or the environment
variables DEM_JAX_COORDINATOR, DEM_JAX_NUM_PROCESSES, DEM_JAX_PROCESS_ID), and a
--workdir that all of them share; on Cloud TPU nothing is needed (JAX detects the
slice). See `dem_jax.engine.distributed`.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
cli.define_flags(os.path.join(_HERE, "configs", "noisy_default.py"))  # --config, --workdir, hosts


def main(argv):
    cli.start(argv)  # arguments, --workdir, overrides, hosts, logs
    from experiments import noisy_labels_lib  # after flag parsing: JAX starts here
    cli.run(noisy_labels_lib, FLAGS.config, FLAGS.workdir)  # clear errors, no traceback


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
