"""digits-C with every row of the paper's TTA tables: Tent, ETA, EATA, SAR and DeYO with EM and AdaDEM.

The embedded default plus Tent (SGD with momentum) and the sample-selecting
methods, each with its own optimiser and learning-rate sweeps:
  python -m experiments.tta --config=experiments/configs/digits_c_full.py --workdir=runs/tta_full
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.rows = tuple(c.rows) + ("tent+em", "tent+adadem", "eta+em", "eta+adadem", "eata+em",
                              "eata+adadem", "sar+em", "sar+adadem", "deyo+em", "deyo+adadem")
    c.dem_star.tau_step = 0.1             # the paper's DEM* grid: 20 x 21 points
    c.dem_star.alpha_step = 0.1
    return c
