"""Fashion-MNIST-C: the 15 corruptions at severity 5 on the 10,000 Fashion-MNIST test images.

Needs the Debian package `dataset-fashion-mnist` (or DEM_JAX_FASHION_MNIST_DIR):
  python -m experiments.tta --config=experiments/configs/fashion_mnist_c.py --workdir=runs/fmnist_c

Sized for a 2-core CPU: a fixed 2,000-image subset of the test split per
corruption, a small CNN, the paper's Tent-dagger rows without the
sample-selecting methods, a 7-point learning-rate grid from 1e-4 to 1 (every
loss collapses above 1 here) and a DEM* grid of step 0.2 (110 points over the
whole square instead of 420 at step 0.1). On a GPU or TPU set
`max_test_examples = 0` for all 10,000 (100 batches per domain: the long
streams of control (c) in docs/results.md).
"""

import numpy as np

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.data = "fashion_mnist"
    c.model_kwargs = {"width": 8, "hidden": 32}
    c.max_test_examples = 2000
    c.source.epochs = 6
    c.source.batch_size = 128
    c.source.learning_rate = 0.05
    c.batch_size = 100                    # 20 batches per domain
    c.rows = ("noadapt", "bn", "em", "cadf", "dem_star", "adadem_norm", "adadem_mec", "adadem")
    c.lr_grid = (1e-4, 1e-3) + tuple(
        float(x) for x in np.round(10.0 ** np.arange(-2.0, 0.01, 0.5), 6))
    c.dem_star.tau_step = 0.2
    c.dem_star.alpha_step = 0.2
    c.grid_chunk = 48
    c.checkpoint_continual = True
    return c
