"""Fashion-MNIST with 4 labels per class, the rest unlabelled (the paper's Table 8 setting).

  python -m experiments.ssl --config=experiments/configs/ssl_fashion_mnist_4.py --workdir=DIR
"""

from experiments.configs import ssl_default


def get_config():
    c = ssl_default.get_config()
    c.dataset = "fashion_mnist"
    c.labelled = 4
    c.flip = True                        # clothing is left-right symmetric
    c.steps = 1000
    c.eval_every = 250
    c.seeds = (0, 1, 2)
    return c
