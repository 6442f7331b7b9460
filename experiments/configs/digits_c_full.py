"""digits-C with every row of the paper's TTA tables: Tent, ETA, EATA and SAR, each with EM and AdaDEM.

The embedded default plus the sample-selecting methods (about 4 minutes on a
2-core CPU):
  python -m experiments.tta --config=experiments/configs/digits_c_full.py --workdir=runs/tta_full
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.rows = tuple(c.rows) + ("eta+em", "eta+adadem", "eata+em", "eata+adadem", "sar+em",
                              "sar+adadem")
    return c
