r"""Semi-supervised learning: supervised-only, Ent.Min, VAT, MixMatch, FixMatch, FreeMatch, each +AdaDEM.

  python -m experiments.ssl --workdir=/tmp/dem_ssl                      # digits, 4 labels/class
  python -m experiments.ssl --config=experiments/configs/ssl_fashion_mnist_lt100.py --workdir=DIR
  python -m experiments.ssl --config=... --workdir=DIR --config.rows=fixmatch,fixmatch+adadem

Every (row, seed) trains a fresh model, checkpointed every `eval_every` steps and
cached when finished, so a restarted run continues where it stopped; `rows` and
`seeds` are not part of a work directory's identity, so runs of a few rows add up
in one directory and `results.md` tables whatever has finished (the rest marked
"not run"). Several hosts: as `experiments.uda` (`--coordinator_address`, ...).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags

from experiments import cli

FLAGS = flags.FLAGS
_HERE = os.path.dirname(os.path.abspath(__file__))
cli.define_flags(os.path.join(_HERE, "configs", "ssl_default.py"))  # --config, --workdir, hosts
flags.DEFINE_bool("report", False, "Only write results.md/.json and the plots of the units "
                  "that have finished in --workdir (no training).")


def main(argv):
    cli.start(argv)  # arguments, --workdir, overrides, hosts, logs
    from experiments import ssl_lib  # after flag parsing: JAX starts here
    if FLAGS.report:
        ssl_lib.report(FLAGS.config, FLAGS.workdir)
        return
    cli.run(ssl_lib, FLAGS.config, FLAGS.workdir)  # clear errors, no traceback


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    sys.exit(app.run(main))
