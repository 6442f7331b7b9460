"""UDA scikit-learn digits (8x8, upsampled) -> MNIST, 28x28 grayscale.

Needs MNIST (see uda_mnist_m.py). The source has only 1,347 training images.
  python -m experiments.uda --config=experiments/configs/uda_digits_mnist.py --workdir=/tmp/uda_digits_mnist
"""

from experiments.configs import uda_mnist_m


def get_config():
    c = uda_mnist_m.get_config()
    c.pairs = ("digits->mnist",)
    c.source.epochs = 15
    c.source.batch_size = 64
    return c
