"""Fashion-MNIST-LT, rho = 100: USB's CIFAR-10-LT protocol (the paper's Table 15).

1,500 labelled and 3,000 unlabelled examples in class 0, decaying exponentially
to 1/100 of that in class 9; the test set stays balanced (1,000 per class).
  python -m experiments.ssl --config=experiments/configs/ssl_fashion_mnist_lt100.py --workdir=DIR
"""

from experiments.configs import ssl_default


def get_config():
    c = ssl_default.get_config()
    c.dataset = "fashion_mnist"
    c.labelled = 1500
    c.unlabelled = 3000
    c.rho = 100.0
    c.flip = True
    c.steps = 1000
    c.eval_every = 250
    c.seeds = (0, 1, 2)
    return c
