"""Fashion-MNIST with 25 labels per class, the rest unlabelled (the paper's Table 8 setting).

  python -m experiments.ssl --config=experiments/configs/ssl_fashion_mnist_25.py --workdir=DIR
"""

from experiments.configs import ssl_fashion_mnist_4


def get_config():
    c = ssl_fashion_mnist_4.get_config()  # the same setting but
    c.labelled = 25
    return c
