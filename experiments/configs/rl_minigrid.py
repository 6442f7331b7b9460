"""The paper's four MiniGrid environments at RL-Zoo's PPO budgets: 6 seeds, ent_coef 0.001 and 0.01.

  python -m experiments.rl --config=experiments/configs/rl_minigrid.py --workdir=runs/rl_minigrid

DoorKey-5x5, Empty-Random-5x5 and Unlock: 1e5 steps, rollouts of 128; FourRooms:
rollouts of 512 (RL-Zoo) and 1e6 steps, a fifth of RL-Zoo's 5e6 (`total_steps`
override to run it all: --config.total_steps="(100000,100000,100000,5000000)").
"""

from experiments.configs import rl_default


def get_config():
    c = rl_default.get_config()
    c.envs = ("DoorKey-5x5", "Empty-Random-5x5", "Unlock", "FourRooms")
    c.total_steps = (100_000, 100_000, 100_000, 1_000_000)
    c.num_steps = (128, 128, 128, 512)
    c.eval_every = (10_240, 10_240, 10_240, 65_536)
    c.seeds = (0, 1, 2, 3, 4, 5)
    c.ent_coefs = (0.001, 0.01)
    return c
