"""Test-time adaptation on scikit-learn's 8x8 digits-C: the embedded default (no download).

Finishes in under 5 minutes on a 2-core CPU:
  python -m experiments.tta --workdir=runs/tta
"""

import ml_collections
import numpy as np

from dem_jax.data import CORRUPTIONS
from dem_jax.engine import metrics


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = "digits"
    c.data_dir = ""                       # "" = the loader's own search order
    c.model = "cnn"
    c.model_kwargs = ml_collections.ConfigDict({"width": 16, "hidden": 64})
    c.backend = "pmap"                    # or "shard_map"

    c.source = ml_collections.ConfigDict(dict(
        epochs=15, batch_size=64, optimizer="sgd_momentum", learning_rate=0.05,
        momentum=0.9, weight_decay=5e-4, augment="shift", seed=0))

    # Target domains: "" corrupts the test split with dem_jax.data.corruptions;
    # a pattern such as "tfds:cifar10_corrupted/{corruption}_{severity}" loads them.
    c.target = ""
    c.corruptions = CORRUPTIONS           # the paper's continual order
    c.severity = 5
    c.corruption_seed = 0
    c.max_test_examples = 0               # 0 = the whole test split; else a fixed subset
    c.batch_size = 30                     # 450 test digits = 15 batches per domain
    c.seeds = (0, 1, 2)                   # the seed changes the batch order
    c.settings = ("single", "continual")
    # Table rows: a baseline name, a loss name (Tent with that loss), "dem_star",
    # or "<method>+<loss>" for ETA / EATA / SAR.
    # The default keeps the paper's Tent rows so that it finishes in under 5
    # minutes on a 2-core CPU; `digits_c_full.py` adds the ETA/EATA/SAR rows.
    c.rows = ("noadapt", "bn", "em", "cadf", "dem_star", "adadem_norm", "adadem_mec",
              "adadem")

    c.optimizer = "sgd"                   # plain SGD: the paper's Tent-dagger
    c.momentum = 0.9
    c.mec_momentum = 0.1
    # Learning rates: every loss gets the best rate of the same sweep (single
    # domain, mean over corruptions, seed `lr_sweep_seed`): no loss is tuned
    # more than another. "fixed" uses `learning_rates` instead.
    c.lr_selection = "sweep"
    # 10^-2 .. 10^1 in half decades: wide enough on digits-C to show every loss's
    # peak and where EM, AdaDEM and AdaDEM-V collapse (paper Table 14).
    c.lr_grid = tuple(float(x) for x in np.round(10.0 ** np.arange(-2.0, 1.01, 0.5), 6))
    c.lr_sweep_losses = ("em", "cadf", "adadem_norm", "adadem_mec", "adadem", "adadem_v")
    c.lr_sweep_seed = 0
    c.learning_rates = ml_collections.ConfigDict({"em": 0.01})
    c.grid_chunk = 64                     # grid points per compiled program

    c.dem_star = ml_collections.ConfigDict(dict(
        fraction=0.2, tau_step=0.1, alpha_step=0.1, tau_max=2.0, alpha_max=2.0))

    c.e_margin = 0.4                      # ETA/EATA/SAR entropy filter: H < 0.4 ln C
    c.d_margin = 0.4                      # EATA redundancy filter (10 classes)
    c.fisher_size = 512                   # clean source images for EATA's Fisher
    c.fisher_alpha = 2000.0
    c.sar_rho = 0.05
    c.sar_reset = 0.2
    # Orbax checkpoint of the adapted state after every continual domain (a digits
    # unit takes about a second, so the default restarts an interrupted unit instead).
    c.checkpoint_continual = False
    # TensorBoard event files (on), Weights & Biases (off), how often step metrics
    # leave the device: see dem_jax.engine.metrics. Not part of the run's identity.
    c.logging = metrics.default_config()
    return c
