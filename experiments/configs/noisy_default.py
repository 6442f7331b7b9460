"""Noisy-label training on scikit-learn's 8x8 digits: the embedded default (no download).

  python -m experiments.noisy_labels --workdir=/tmp/dem_noisy

Grid: 1 noise setting (symmetric 40%) x 12 losses x 3 seeds = 36 runs of 30
epochs, so that it finishes in under 5 minutes on an idle 2-core CPU (each loss
compiles once, about 7 s of CPU; an epoch of 21 steps takes about 0.1 s). The full
set of noise settings (symmetric 20/40/60/80%, asymmetric 40%; about 4 minutes
more per setting) is one override away:
  --config.noise='("symmetric:0.2","symmetric:0.4","symmetric:0.6","symmetric:0.8","asymmetric:0.4")'
and is the default of `noisy_fashion_mnist.py`.

No augmentation and 30 epochs: with random shifts the small CNN hardly fits the
wrong labels within 40 epochs (10% of them), without them it memorises almost all
of them by epoch 30 after peaking on the test set around epoch 3, the regime
that noisy-label methods are about.

lam = 0.3 for both EM and AdaDEM: the paper's SSL baseline Ent.Min is CE + 0.3 EM,
the usual weight of entropy-regularised training (Grandvalet & Bengio use
0.1-1); the same weight for EM and AdaDEM, so neither is tuned more than the
other. AdaDEM's gradient is never larger than EM's reward-normalised one
(delta >= 1), so 0.3 is not an aggressive weight for it.
"""

import ml_collections

from dem_jax.engine import metrics

# Every setting the experiment supports: symmetric 20/40/60/80%, asymmetric 40%.
ALL_NOISE = ("symmetric:0.2", "symmetric:0.4", "symmetric:0.6", "symmetric:0.8",
             "asymmetric:0.4")
ALL_LOSSES = ("ce", "ce+em", "ce+adadem", "gce", "gce+em", "gce+adadem",
              "sce", "sce+em", "sce+adadem", "elr", "elr+em", "elr+adadem")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = "digits"
    c.data_dir = ""                       # "" = the loader's own search order
    c.train_subset = 0                    # 0 = every training example (else stratified)
    c.test_subset = 0                     # 0 = every test example (else stratified)
    c.model = "cnn"
    c.model_kwargs = ml_collections.ConfigDict({"width": 16, "hidden": 64})
    c.backend = "pmap"                    # or "shard_map"

    # Noise settings "<kind>:<rate>", kind symmetric | asymmetric, rate in [0, 1)
    # = the flip probability (see dem_jax.data.noise). One fixed draw per setting
    # (noise_seed), the same for every loss and seed.
    c.noise = ("symmetric:0.4",)
    c.noise_seed = 0
    # Asymmetric flips: MNIST's semantic pairs 2->7, 3->8, 5<->6, 7->1 (only 5 of 10
    # classes flip, so the realised rate is about half the flip probability).
    c.asymmetric_mapping = "mnist"

    c.losses = ALL_LOSSES
    c.lam = 0.3                           # EM / AdaDEM weight (see the docstring)
    c.gce_q = 0.7
    c.sce_alpha = 0.1
    c.sce_beta = 1.0
    c.elr_lambda = 3.0
    c.elr_beta = 0.7
    c.mec_momentum = 0.1

    c.seeds = (0, 1, 2)                   # model init, batch order, augmentation
    c.epochs = 30
    c.batch_size = 64
    c.optimizer = "sgd_momentum"
    c.learning_rate = 0.05                # cosine decay to 0 over the run
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.augment = "none"                    # see the docstring
    c.eval_batch_size = 512
    c.checkpoint_every = 10               # epochs (and always after the last one)

    c.plot_losses = ("ce", "ce+adadem")   # the memorisation plot's lines
    # TensorBoard event files (on), Weights & Biases (off), how often step metrics
    # leave the device: see dem_jax.engine.metrics. Not part of the run's identity.
    c.logging = metrics.default_config()
    return c
