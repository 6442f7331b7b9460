"""Noisy-label training on Fashion-MNIST (idx files, e.g. Debian's dataset-fashion-mnist).

  python -m experiments.noisy_labels --config=experiments/configs/noisy_fashion_mnist.py \
      --workdir=/tmp/dem_noisy_fmnist

Every noise setting (symmetric 20/40/60/80%, asymmetric 40% with the look-alike
garment pairs) x 12 losses x 3 seeds on the full 60,000 training images: hours on
a CPU. The run reported by the project shrinks it on the command line (about
10 minutes on a loaded 2-core CPU):
  --config.train_subset=4000 --config.test_subset=2000 --config.noise='("symmetric:0.4",)' \
  --config.losses='("ce","ce+em","ce+adadem")' --config.epochs=15 \
  --config.model_kwargs.width=8 --config.model_kwargs.hidden=32
"""

from experiments.configs import noisy_default


def get_config():
    c = noisy_default.get_config()
    c.data = "fashion_mnist"
    c.noise = noisy_default.ALL_NOISE
    c.asymmetric_mapping = "fashion_mnist"
    c.model_kwargs.width = 32
    c.model_kwargs.hidden = 128
    c.epochs = 20
    c.batch_size = 128
    c.augment = "none"
    c.checkpoint_every = 1
    return c
