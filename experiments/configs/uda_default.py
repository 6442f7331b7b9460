"""UDA on digits -> digits_m: the embedded default (no download, a few minutes on 2 CPU cores).

Source: scikit-learn's 8x8 digits, upsampled to 16x16 RGB; target: the same digits
blended with photo crops from scikit-image (MNIST-M style, `data.domains`).
  python -m experiments.uda --workdir=/tmp/dem_uda
"""

import ml_collections

from dem_jax.engine import metrics


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pairs = ("digits->digits_m",)      # any of dem_jax.data.domains.DOMAIN_PAIRS
    c.data_dir = ""                      # "" = the loaders' own search order
    c.size = 0                           # 0 = the pair's default image size
    c.pair_seed = 0                      # photo crops of blended targets
    c.model = "cnn"
    c.model_kwargs = ml_collections.ConfigDict({"width": 16, "hidden": 64})
    c.backend = "pmap"                   # or "shard_map"

    c.source = ml_collections.ConfigDict(dict(
        epochs=15, batch_size=64, optimizer="sgd_momentum", learning_rate=0.05,
        momentum=0.9, weight_decay=5e-4, augment="shift", seed=0))

    # Adaptation: every row starts from the source model and trains `steps` steps of
    # one source + one target batch, all rows with the same optimiser and rates.
    c.batch_size = 32                    # per domain per step; a multiple of the devices
    c.steps = 200                        # 1,347 target train images: ~5 passes
    c.eval_every = 50                    # target accuracy curve + checkpoint per chunk
    c.eval_batch_size = 256
    c.seeds = (0, 1, 2)                  # batch order and discriminator init
    # Rows: "source_only", "dann", or "<method>+<loss>" with method minent / dann /
    # shot_im and loss em, cadf, dem, adadem, adadem_norm, adadem_mec, adadem_v or
    # dem_star. AdaDEM replaces EM in MinEnt and SHOT-IM and is added to DANN.
    c.rows = ("source_only", "minent+em", "minent+dem_star", "minent+adadem", "dann",
              "dann+em", "dann+adadem", "shot_im+em", "shot_im+adadem")
    c.optimizer = "sgd_momentum"
    c.momentum = 0.9
    c.lr = 0.01                          # a fifth of the source training rate (fine-tuning)
    # Entropy weight: 0.3, the Ent.Min weight of the USB benchmark that the paper's SSL
    # experiments use; with CE on source alongside, larger weights let EM collapse
    # classes early. SHOT-IM has no CE and weighs its two IM terms 1 (as SHOT does).
    c.lam = 0.3
    c.adv_weight = 0.1                   # DANN gradient reversal coefficient
    c.disc_hidden = 64
    c.mec_momentum = 0.1
    c.dem_tau = 1.0                      # for "<method>+dem" rows (fixed tau, alpha)
    c.dem_alpha = 1.0

    # DEM*: coarse grid (step 0.5: 16 points inside Prop. A.1) instead of the paper's
    # 0.1 (350 points) so that the search costs about two rows' time on a CPU.
    # grid_chunk = grid points per vmapped program. On an accelerator use the whole
    # grid (one program); on XLA's CPU backend vmapping the convolutions over grid
    # points (grouped convolutions) made a 16-point step far slower than 16 single
    # steps (the search had not finished after 9 minutes), so the CPU default runs
    # the same compiled program one point at a time.
    c.dem_star = ml_collections.ConfigDict(dict(
        fraction=0.2, tau_step=0.5, alpha_step=0.5, tau_max=2.0, alpha_max=2.0,
        search_seed=0, grid_chunk=1))
    # TensorBoard event files (on), Weights & Biases (off), how often step metrics
    # leave the device: see dem_jax.engine.metrics. Not part of the run's identity.
    c.logging = metrics.default_config()
    return c
