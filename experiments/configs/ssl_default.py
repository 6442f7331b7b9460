"""SSL on scikit-learn's digits with 4 labels per class: the embedded default (no download).

Every method of USB with and without AdaDEM, one seed, a few hundred steps on 8x8
digits (a few minutes on 2 CPU cores).
  python -m experiments.ssl --workdir=/tmp/dem_ssl
"""

import ml_collections

from dem_jax.engine import metrics

ROWS = ("supervised", "entmin", "entmin+adadem", "vat", "vat+adadem", "mixmatch",
        "mixmatch+adadem", "fixmatch", "fixmatch+adadem", "freematch", "freematch+adadem")


def usb_hyperparameters() -> ml_collections.ConfigDict:
    """USB's values, per method (classic_cv configs and algorithm defaults); all are used.

    Ent.Min is not in USB: CE + 0.3 x EM on the unlabelled batch (the paper).
    vat_eps is USB's for 32x32x3 CIFAR-normalised images, scaled to the same
    per-pixel RMS here (`tasks.ssl.vat_radius`). Not used: USB's EMA model for
    evaluation (ema_m 0.999; with a few hundred steps it would lag the model).
    """
    return ml_collections.ConfigDict(dict(
        supervised=dict(uratio=1),
        entmin=dict(uratio=1, lambda_u=0.3),
        vat=dict(uratio=1, lambda_u=0.3, lambda_ent=0.06, vat_eps=6.0, vat_xi=1e-6,
                 unsup_warmup=0.4),
        mixmatch=dict(uratio=1, lambda_u=75.0, T=0.5, mixup_alpha=0.5, unsup_warmup=0.4),
        fixmatch=dict(uratio=7, lambda_u=1.0, p_cutoff=0.95),
        freematch=dict(uratio=7, lambda_u=1.0, ema_p=0.999, ent_loss_ratio=0.001),
    ))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.dataset = "digits"                 # digits, mnist, fashion_mnist, tfds:<name>
    c.data_dir = ""                      # "" = the loaders' own search order
    c.labelled = 4                       # labelled examples per class (of class 0 if rho > 1)
    c.unlabelled = 0                     # unlabelled per class (class 0); 0 = the rest
    c.rho = 1.0                          # imbalance ratio (CIFAR-LT profile); 1 = balanced
    c.flip = False                       # horizontal flips in the views (not for digits)
    c.model = "cnn"
    c.model_kwargs = ml_collections.ConfigDict({"width": 16, "hidden": 64})
    c.backend = "pmap"                   # or "shard_map"

    # Every row trains a fresh model for `steps` steps of `batch_size` labelled and
    # uratio x batch_size unlabelled examples. The seed draws the labelled set, the
    # initialisation, the batch order and the augmentation.
    c.batch_size = 16                    # labelled per step (USB: 64); a multiple of the devices
    c.steps = 300
    c.eval_every = 100                   # test accuracy curve + checkpoint per chunk
    c.eval_batch_size = 256
    c.seeds = (0,)
    c.rows = ROWS                        # "<method>" or "<method>+adadem"
    c.lr = 0.03                          # USB: SGD, Nesterov momentum 0.9, wd 5e-4,
    c.momentum = 0.9                     # cosine lr cos(7 pi k / 16 K)
    c.weight_decay = 5e-4
    # AdaDEM replaces EM in Ent.Min (weight lambda_u) and VAT (weight lambda_ent); where
    # it is added (MixMatch, FixMatch, FreeMatch) its weight is adadem_weight (the
    # paper gives none: Ent.Min's 0.3).
    c.adadem_weight = 0.3
    c.mec_momentum = 0.1
    c.num_ops = 3                        # RandAugment operations of the strong view (USB: 3)
    c.cutout = 0.5                       # largest Cutout side / image side (USB: 0.5)
    c.usb = usb_hyperparameters()
    c.logging = metrics.default_config()
    return c
