r"""Unsupervised domain adaptation: source-only, MinEnt, DANN and SHOT-IM with EM, DEM* or AdaDEM.

  python -m experiments.uda --workdir=/tmp/dem_uda                     # digits -> digits_m, embedded
  python -m experiments.uda --config=experiments/configs/uda_mnist_m.py --workdir=DIR

Steps, per domain pair: train (or resume, or load) the source model; split the
target test set into DEM*'s labelled part and the scored rest; run every row for
every seed from the source model; search DEM*'s (tau, alpha); write
`results.json`, `results.md` and `curves_<pair>.png` to the work directory. Every
finished unit of work is saved and units in progress are checkpointed, so a
restarted run continues where it stopped.

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
cli.define_flags(os.path.join(_HERE, "configs", "uda_default.py"))  # --config, --workdir, hosts


def main(argv):
    cli.start(argv)  # arguments, --workdir, overrides, hosts, logs
    from experiments import uda_lib  # after flag parsing: JAX starts here
    cli.run(uda_lib, FLAGS.config, FLAGS.workdir)  # clear errors, no traceback


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
