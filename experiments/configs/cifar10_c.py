"""CIFAR-10-C (tfds `cifar10_corrupted`, severity 5) with a ResNet; source on tfds `cifar10`.

For users with the internet and TensorFlow-free array_record copies of the data sets
(see README); the corruptions then come from tfds, not from dem_jax.data.corruptions:
  python -m experiments.tta --config=experiments/configs/cifar10_c.py --workdir=runs/cifar10_c
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.data = "tfds:cifar10"
    c.target = "tfds:cifar10_corrupted/{corruption}_{severity}"
    c.model = "resnet"
    c.model_kwargs = {"depth": 20, "width": 16, "norm": "batch"}
    c.source.epochs = 100
    c.source.batch_size = 128
    c.source.learning_rate = 0.1
    c.source.augment = "crop_flip"
    c.batch_size = 128
    c.fisher_size = 2000
    c.dem_star.tau_step = 0.1
    c.dem_star.alpha_step = 0.1
    return c
