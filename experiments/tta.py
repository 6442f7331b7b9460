r"""Test-time adaptation: the paper's protocol (dem-notes section 5) on offline data.

  python -m experiments.tta --workdir=/tmp/dem_tta                  # digits-C, embedded
  python -m experiments.tta --config=experiments/configs/fashion_mnist_c.py --workdir=DIR

Steps: train (or resume, or load) the source model on clean data; corrupt the
test split with the 15 corruptions; sweep the learning rate of every loss the
same way; run every table row in the single-domain and continual settings for
every seed; search DEM*'s (tau, alpha) per domain; write `results.json`,
`results.md` and PNG plots to the work directory. Every finished unit of work
is saved, so a restarted run continues where it stopped.

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
cli.define_flags(os.path.join(_HERE, "configs", "default.py"))  # --config, --workdir, hosts


def main(argv):
    cli.start(argv)  # arguments, --workdir, overrides, hosts, logs
    from experiments import tta_lib  # after flag parsing: JAX starts here
    cli.run(tta_lib, FLAGS.config, FLAGS.workdir)  # clear errors, no traceback


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
