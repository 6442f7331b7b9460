"""UDA Fashion-MNIST -> Fashion-MNIST-M (blended with scikit-image photo crops, 28x28 RGB).

Needs the Debian package `dataset-fashion-mnist` (or DEM_JAX_FASHION_MNIST_DIR):
  python -m experiments.uda --config=experiments/configs/uda_fashion_m.py --workdir=/tmp/uda_fashion_m
"""

from experiments.configs import uda_mnist_m


def get_config():
    c = uda_mnist_m.get_config()
    c.pairs = ("fashion_mnist->fashion_mnist_m",)
    return c
