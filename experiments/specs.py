"""The type and range of every numeric field, and the element type of every tuple, per experiment.

Each experiment's `validate` starts with `cli.check_config(config, specs.<NAME>)`,
so that a bad value stops the run before any work and before the work directory
is claimed. Rules are written `"[[nonempty ]tuple of ](int|float|str)[ cond]"`,
cond one of `> x`, `>= x`, `< x`, `<= x`, `in [a, b]` (round brackets: open
ends); "float" accepts ints, "int" no float; `*` stands for one path component.
What a rule cannot say (names of rows, losses, corruptions; divisibility by the
device count) stays in the experiment's `validate`. `tests/test_cli.py` checks
that every numeric and tuple field of every config file has a rule.

A new experiment adds its dict here, e.g. `SSL = {**COMMON, **SOURCE, ...}`.
"""

SEEDS = "nonempty tuple of int >= 0"      # NumPy and JAX seeds are non-negative ints
MOMENTUM = "float in [0, 1)"               # SGD momentum
MEC_MOMENTUM = "float in (0, 1]"           # AdaDEM's MEC update rate

# Every experiment: its model and how it logs (`dem_jax.engine.metrics`).
COMMON = {
    "model_kwargs.width": "int >= 1",
    "model_kwargs.hidden": "int >= 1",
    "model_kwargs.depth": "int >= 1",
    "model_kwargs.norm": "str",
    "seeds": SEEDS,
    "logging.every_steps": "int >= 1",
}

# The `source` block: the supervised source model (`engine.train.SourceConfig`).
SOURCE = {
    "source.epochs": "int >= 1",
    "source.batch_size": "int >= 1",
    "source.learning_rate": "float > 0",
    "source.momentum": MOMENTUM,
    "source.weight_decay": "float >= 0",
    "source.seed": "int >= 0",
}

# DEM*'s (tau, alpha) grid search.
DEM_STAR = {
    "dem_star.fraction": "float in (0, 1)",
    "dem_star.tau_step": "float > 0",
    "dem_star.alpha_step": "float > 0",
    "dem_star.tau_max": "float > 0",
    "dem_star.alpha_max": "float >= 0",
}

TTA = {
    **COMMON, **SOURCE, **DEM_STAR,
    "corruptions": "nonempty tuple of str",
    "severity": "int in [1, 5]",
    "corruption_seed": "int >= 0",
    "max_test_examples": "int >= 0",
    "batch_size": "int >= 1",
    "settings": "nonempty tuple of str",
    "rows": "nonempty tuple of str",
    "momentum": MOMENTUM,
    "mec_momentum": MEC_MOMENTUM,
    "lr_grid": "nonempty tuple of float > 0",
    "lr_sweep_losses": "tuple of str",
    "lr_sweep_seed": "int >= 0",
    "learning_rates.*": "float > 0",
    "grid_chunk": "int >= 1",
    "e_margin": "float > 0",
    "d_margin": "float > 0",
    "fisher_size": "int >= 1",
    "fisher_alpha": "float >= 0",
    "sar_rho": "float > 0",
    "sar_reset": "float >= 0",
    "deyo_margin": "float > 0",
    "plpd_threshold": "float in [-1, 1]",
    "patch_len": "int >= 1",
}

UDA = {
    **COMMON, **SOURCE, **DEM_STAR,
    "pairs": "nonempty tuple of str",
    "size": "int >= 0",
    "pair_seed": "int >= 0",
    "batch_size": "int >= 1",
    "steps": "int >= 1",
    "eval_every": "int >= 1",
    "eval_batch_size": "int >= 1",
    "rows": "nonempty tuple of str",
    "momentum": MOMENTUM,
    "lr": "float > 0",
    "lam": "float >= 0",
    "adv_weight": "float >= 0",
    "disc_hidden": "int >= 1",
    "mec_momentum": MEC_MOMENTUM,
    "dem_tau": "float > 0",
    "dem_alpha": "float >= 0",
    "dem_star.search_seed": "int >= 0",
    "dem_star.grid_chunk": "int >= 1",
}

NOISY = {
    **COMMON,
    "train_subset": "int >= 0",
    "test_subset": "int >= 0",
    "noise": "nonempty tuple of str",
    "noise_seed": "int >= 0",
    "losses": "nonempty tuple of str",
    "lam": "float >= 0",
    "gce_q": "float in (0, 1]",
    "sce_alpha": "float >= 0",
    "sce_beta": "float >= 0",
    "elr_lambda": "float >= 0",
    "elr_beta": "float in [0, 1)",
    "mec_momentum": MEC_MOMENTUM,
    "epochs": "int >= 1",
    "batch_size": "int >= 1",
    "learning_rate": "float > 0",
    "momentum": MOMENTUM,
    "weight_decay": "float >= 0",
    "eval_batch_size": "int >= 1",
    "checkpoint_every": "int >= 1",
    "plot_losses": "tuple of str",
}

SSL = {
    **COMMON,
    "dataset": "str",
    "labelled": "int >= 1",
    "unlabelled": "int >= 0",
    "rho": "float >= 1",
    "batch_size": "int >= 1",
    "steps": "int >= 1",
    "eval_every": "int >= 1",
    "eval_batch_size": "int >= 1",
    "rows": "nonempty tuple of str",
    "lr": "float > 0",
    "momentum": MOMENTUM,
    "weight_decay": "float >= 0",
    "adadem_weight": "float >= 0",
    "mec_momentum": MEC_MOMENTUM,
    "num_ops": "int >= 0",
    "cutout": "float in [0, 1]",
    "usb.*.uratio": "int >= 1",
    "usb.*.lambda_u": "float >= 0",
    "usb.*.lambda_ent": "float >= 0",
    "usb.*.vat_eps": "float > 0",
    "usb.*.vat_xi": "float > 0",
    "usb.*.unsup_warmup": "float in [0, 1]",
    "usb.*.T": "float > 0",
    "usb.*.mixup_alpha": "float > 0",
    "usb.*.p_cutoff": "float in [0, 1]",
    "usb.*.ema_p": "float in [0, 1)",
    "usb.*.ent_loss_ratio": "float >= 0",
}

RL = {
    **COMMON,
    "envs": "nonempty tuple of str",
    "total_steps": "nonempty tuple of int >= 1",
    "num_steps": "nonempty tuple of int >= 1",
    "eval_every": "nonempty tuple of int >= 1",
    "bonuses": "nonempty tuple of str",
    "ent_coefs": "nonempty tuple of float >= 0",
    "ppo.num_envs": "int >= 1",
    "ppo.minibatch_size": "int >= 1",
    "ppo.epochs": "int >= 1",
    "ppo.gamma": "float in [0, 1]",
    "ppo.gae_lambda": "float in [0, 1]",
    "ppo.clip": "float > 0",
    "ppo.lr": "float > 0",
    "ppo.vf_coef": "float >= 0",
    "ppo.max_grad_norm": "float > 0",
    "ppo.mec_momentum": MEC_MOMENTUM,
    "ppo.hidden": "int >= 1",
    "ppo.eval_episodes": "int >= 1",
}
