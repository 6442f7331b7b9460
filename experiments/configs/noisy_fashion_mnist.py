"""Noisy-label training on Fashion-MNIST (idx files, e.g. Debian's dataset-fashion-mnist).

  python -m experiments.noisy_labels --config=experiments/configs/noisy_fashion_mnist.py \
      --workdir=/tmp/dem_noisy_fmnist

Every noise setting (symmetric 20/40/60/80%, asymmetric 40% with the look-alike
garment pairs) x 12 losses x 3 seeds = 180 runs, sized for a CPU: a fixed
stratified subset of 2,000 training and 2,000 test images, a small CNN (width 8),
20 epochs (620 steps of 64), about 30 s per run on one core of this project's
CPU. The whole training set is one override away (hours on a CPU, minutes on an
accelerator):
  --config.train_subset=0 --config.test_subset=0 --config.model_kwargs.width=32 \
  --config.model_kwargs.hidden=128
"""

from experiments.configs import noisy_default


def get_config():
    c = noisy_default.get_config()
    c.data = "fashion_mnist"
    c.train_subset = 2000
    c.test_subset = 2000
    c.noise = noisy_default.ALL_NOISE
    c.asymmetric_mapping = "fashion_mnist"
    c.model_kwargs.width = 8
    c.model_kwargs.hidden = 32
    c.epochs = 20
    c.augment = "none"
    c.checkpoint_every = 5
    return c
