"""PPO on MiniGrid with no bonus, EM and AdaDEM: the embedded default (no download, ~3 min).

Empty-Random-5x5 (30,000 steps: it is learnt in 10,000) and DoorKey-5x5 (RL-Zoo's
1e5 steps: greedy returns stay 0 until ~50,000) at RL-Zoo's PPO settings, 3 seeds
vmapped, the paper's ent_coef 0.001.
  python -m experiments.rl --workdir=/tmp/dem_rl
The paper's four environments at RL-Zoo's budgets, 6 seeds, ent_coef 0.001 and 0.01:
  python -m experiments.rl --config=experiments/configs/rl_minigrid.py --workdir=DIR
"""

import ml_collections

from dem_jax.engine import metrics


def ppo() -> ml_collections.ConfigDict:
    """RL Baselines3 Zoo's PPO hyperparameters for MiniGrid (hyperparams/ppo.yml).

    ent_coef is not here: RL-Zoo's own MiniGrid value is 0.0, which would make any
    bonus vanish; the rows run the paper's 0.001 (and 0.01), see `ent_coefs`.
    """
    return ml_collections.ConfigDict(dict(
        num_envs=8, minibatch_size=64, epochs=10, gamma=0.99, gae_lambda=0.95, clip=0.2,
        lr=2.5e-4, vf_coef=0.5, max_grad_norm=0.5, mec_momentum=0.1, hidden=64,
        eval_episodes=10, eval_greedy=True))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # One entry per environment in each of these four tuples.
    c.envs = ("Empty-Random-5x5", "DoorKey-5x5")   # paper names or xminigrid MiniGrid ids
    c.total_steps = (30_000, 100_000)              # per seed (RL-Zoo: 1e5 for both)
    c.num_steps = (128, 128)                       # rollout length per environment copy
    c.eval_every = (10_240, 10_240)                # env steps between evaluations/checkpoints
    c.seeds = (0, 1, 2)                            # vmapped: one program for all seeds
    c.bonuses = ("none", "em", "adadem")           # "none" runs once; the others per ent_coef
    c.ent_coefs = (0.001,)                         # the paper's weight of the (maximised) bonus
    c.ppo = ppo()
    c.logging = metrics.default_config()
    return c
