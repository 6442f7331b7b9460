r"""Reinforcement learning: PPO on MiniGrid with no bonus, EM and AdaDEM (the bonus maximised).

  python -m experiments.rl --workdir=/tmp/dem_rl                     # embedded default, ~3 min
  python -m experiments.rl --config=experiments/configs/rl_minigrid.py --workdir=DIR

Every (environment, row) trains all seeds as one vmapped program, checkpointed
after every evaluation, and is cached when finished, so a restarted run continues
where it stopped. `--report` only writes the tables and plots of what finished.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
cli.define_flags(os.path.join(_HERE, "configs", "rl_default.py"))  # --config, --workdir, hosts
flags.DEFINE_bool("report", False, "Only write results.md/.json and the plots of the units "
                  "that have finished in --workdir (no training).")


def main(argv):
    cli.start(argv)  # arguments, --workdir, overrides, hosts, logs
    from experiments import rl_lib  # after flag parsing: JAX starts here
    if FLAGS.report:
        rl_lib.report(FLAGS.config, FLAGS.workdir)
        return
    cli.run(rl_lib, FLAGS.config, FLAGS.workdir)  # clear errors, no traceback


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
