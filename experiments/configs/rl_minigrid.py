"""The paper's four MiniGrid environments at RL-Zoo's PPO budgets: 6 seeds, ent_coef 0.001 and 0.01.

  python -m experiments.rl --config=experiments/configs/rl_minigrid.py --workdir=runs/rl_minigrid

DoorKey-5x5, Empty-Random-5x5 and Unlock: 1e5 steps, rollouts of 128; FourRooms:
rollouts of 512 and 5e6 steps (RL-Zoo's ppo.yml as we read it; not checkable offline
here). On a 2-core CPU the 1e5-step environments take ~1 min per row and FourRooms
~20 min per row alone; docs/rl.md ran the rows as three processes into one work
directory (`--config.bonuses` / `--config.ent_coefs` pick rows; `--report` tables
them all), 74 min in all.
"""

from experiments.configs import rl_default


def get_config():
    c = rl_default.get_config()
    c.envs = ("DoorKey-5x5", "Empty-Random-5x5", "Unlock", "FourRooms")
    c.total_steps = (100_000, 100_000, 100_000, 5_000_000)
    c.num_steps = (128, 128, 128, 512)
    c.eval_every = (10_240, 10_240, 10_240, 65_536)
    c.seeds = (0, 1, 2, 3, 4, 5)
    c.ent_coefs = (0.001, 0.01)
    return c
