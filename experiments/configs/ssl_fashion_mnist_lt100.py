"""Fashion-MNIST-LT, rho = 100: USB's CIFAR-10-LT protocol (the paper's Table 15).

1,500 labelled and 3,000 unlabelled examples in class 0, decaying exponentially
to 1/100 of that in class 9; the test set stays balanced (1,000 per class).
  python -m experiments.ssl --config=experiments/configs/ssl_fashion_mnist_lt100.py --workdir=DIR
"""

from experiments.configs import ssl_fashion_mnist_lt10


def get_config():
    c = ssl_fashion_mnist_lt10.get_config()  # the same setting but
    c.rho = 100.0
    return c
