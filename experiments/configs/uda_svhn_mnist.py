"""UDA SVHN -> MNIST (32x32 RGB) from TensorFlow Datasets: needs the internet (or a
prepared tfds data_dir) and `pip install tensorflow-datasets`; not runnable offline.
  python -m experiments.uda --config=experiments/configs/uda_svhn_mnist.py --workdir=/tmp/uda_svhn_mnist
"""

from experiments.configs import uda_mnist_m


def get_config():
    c = uda_mnist_m.get_config()
    c.pairs = ("tfds:svhn_cropped->tfds:mnist",)
    c.model_kwargs = {"width": 64, "hidden": 256}
    c.source.epochs = 10
    c.steps = 2000
    c.eval_every = 250
    c.seeds = (0, 1, 2)
    return c
