"""Whole PPO training, dem_jax (6 seeds vmapped) against Stable-Baselines3: env steps / s, ratio.

  python -m bench.rl [--envs DoorKey-5x5 Empty-Random-5x5] [--seeds 6] [--updates 12]
                     [--repeats 3] [--sb3-python /work/sb3venv/bin/python] [--sb3-steps 20000]

dem_jax side: `dem_jax.tasks.rl.Trainer` (xminigrid environments), `--seeds`
seeds stacked into one state; `train(state, updates=U)` is the whole PPO loop
(rollout of 8 envs x 128 steps, GAE, 10 epochs of 64-example minibatches, per
update) under `lax.scan` inside `jax.vmap` over seeds. The first call compiles
(reported apart: the first call's time less a steady chunk's; one more chunk
is a warm-up); each timed row is one call of
U updates of every seed, ended by `jax.block_until_ready`: seeds x U x 1024 env
steps. Rows: bonus none, em and adadem (the bonus's cost: adadem / none).

Stable-Baselines3 side (only with `--sb3-python`, the interpreter of a separate
venv that has `stable-baselines3`, `minigrid`, `gymnasium` and a CPU `torch`;
they are NOT dem_jax dependencies):

  python3 -m venv /work/sb3venv
  /work/sb3venv/bin/pip install torch stable-baselines3 minigrid gymnasium  # CPU torch wheel

This file is then run by that interpreter (`--sb3-worker`, no dem_jax or jax
import) to train `PPO("MlpPolicy")` on gymnasium's `MiniGrid-<env>-v0` with
RL-Zoo's MiniGrid settings: `FlatObsWrapper`, `VecNormalize`, 8 envs in a
`DummyVecEnv`, n_steps 128, batch 64, 10 epochs, lr 2.5e-4, gamma 0.99, gae
0.95, clip 0.2, ent_coef 0.001 (the paper's), device cpu, torch threads
`--sb3-threads` (1: torch's default of one thread per core ran 30x slower on
the loaded 2-core machine, 37 against 1100 steps/s), for `--sb3-steps`
steps of one seed; `model.learn` is timed (construction apart). SB3 trains one
seed per process, so 6 seeds run one after another take 6x as long: its
all-seeds rate equals its one-seed rate, and the ratio compares total env steps
of all seeds per second of wall time on the same CPU.

The dem_jax rows and the SB3 run are timed round-robin, `--repeats` times, so
that the load of a shared machine hits both alike; medians are reported, with
`uptime`'s load. Target: dem_jax (bonus none) >= 10x SB3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# gymnasium ids of the paper's environments (xminigrid names them in dem_jax.tasks.rl.PAPER_ENVS).
GYM_IDS = {
    "DoorKey-5x5": "MiniGrid-DoorKey-5x5-v0",
    "Empty-Random-5x5": "MiniGrid-Empty-Random-5x5-v0",
    "FourRooms": "MiniGrid-FourRooms-v0",
    "Unlock": "MiniGrid-Unlock-v0",
}
BONUSES = ("none", "em", "adadem")


# ----------------------------------------------------------------------------- SB3 (other venv)
def sb3_worker(env: str, steps: int, seed: int, threads: int) -> None:
    """Train SB3 PPO for `steps` steps of one seed and print one JSON line (run by the SB3 venv)."""
    t0 = time.perf_counter()
    import torch
    if threads:
        torch.set_num_threads(threads)
    import gymnasium
    import minigrid
    import stable_baselines3
    from minigrid.wrappers import FlatObsWrapper
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    vec = make_vec_env(GYM_IDS[env], n_envs=8, seed=seed, wrapper_class=FlatObsWrapper,
                       vec_env_cls=DummyVecEnv)
    vec = VecNormalize(vec)
    model = PPO("MlpPolicy", vec, n_steps=128, batch_size=64, n_epochs=10, learning_rate=2.5e-4,
                gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.001, device="cpu",
                seed=seed, verbose=0)
    t1 = time.perf_counter()
    model.learn(total_timesteps=steps)
    t2 = time.perf_counter()
    print(json.dumps(dict(
        steps=int(model.num_timesteps), learn_s=t2 - t1, setup_s=t1 - t0,
        torch_threads=torch.get_num_threads(),
        obs_size=int(vec.observation_space.shape[0]),
        versions={"stable-baselines3": stable_baselines3.__version__, "torch": torch.__version__,
                  "minigrid": getattr(minigrid, "__version__", "?"),
                  "gymnasium": gymnasium.__version__, "python": sys.version.split()[0]})))


def run_sb3(python: str, env: str, steps: int, seed: int, threads: int) -> dict:
    out = subprocess.run([python, os.path.abspath(__file__), "--sb3-worker", "--envs", env,
                          "--sb3-steps", str(steps), "--sb3-seed", str(seed),
                          "--sb3-threads", str(threads)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"SB3 worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- dem_jax
def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["DoorKey-5x5", "Empty-Random-5x5"])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--updates", type=int, default=12, help="PPO updates per timed chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bonuses", nargs="+", default=list(BONUSES), choices=BONUSES)
    parser.add_argument("--sb3-python", default="", help="interpreter of a venv with SB3 (see top)")
    parser.add_argument("--sb3-steps", type=int, default=20_000, help="SB3 steps per timed run")
    parser.add_argument("--sb3-threads", type=int, default=1,
                        help="torch threads of the SB3 run (0: torch's default)")
    parser.add_argument("--sb3-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sb3-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sb3_worker:
        sb3_worker(args.envs[0], args.sb3_steps, args.sb3_seed, args.sb3_threads)
        return

    import jax
    import xminigrid
    from dem_jax.tasks import rl

    print(f"load before: {load()}")
    seeds = list(range(args.seeds))
    results = {}
    versions = {}
    for env in args.envs:
        trainers, states, compile_s = {}, {}, {}
        for bonus in args.bonuses:
            cfg = rl.PPOConfig(env=env, bonus=bonus, total_steps=10 ** 9)
            trainer = rl.Trainer(cfg)
            state = trainer.init(seeds)
            t = time.perf_counter()
            state, _ = jax.block_until_ready(trainer.train(state, updates=args.updates))
            compile_s[bonus] = time.perf_counter() - t      # compile + one chunk
            state, _ = jax.block_until_ready(trainer.train(state, updates=args.updates))  # warm-up
            trainers[bonus], states[bonus] = trainer, state
        steps_chunk = args.seeds * args.updates * trainers[args.bonuses[0]].config.steps_per_update
        rates = {b: [] for b in args.bonuses}
        sb3_rates, sb3_info = [], None
        for r in range(args.repeats):
            for bonus in args.bonuses:
                t = time.perf_counter()
                states[bonus], _ = jax.block_until_ready(
                    trainers[bonus].train(states[bonus], updates=args.updates))
                rates[bonus].append(steps_chunk / (time.perf_counter() - t))
            if args.sb3_python:
                sb3_info = run_sb3(args.sb3_python, env, args.sb3_steps, seed=r,
                                   threads=args.sb3_threads)
                sb3_rates.append(sb3_info["steps"] / sb3_info["learn_s"])
            print(f"  {env} repeat {r}: " + ", ".join(
                f"{b} {rates[b][-1]:.0f}" for b in args.bonuses)
                + (f", sb3 {sb3_rates[-1]:.0f} steps/s" if sb3_rates else ""), flush=True)
        if sb3_info:
            versions["sb3"] = sb3_info["versions"]
            versions["sb3_torch_threads"] = sb3_info["torch_threads"]
        results[env] = dict(
            compile_s={b: compile_s[b] - steps_chunk / statistics.median(rates[b])
                       for b in args.bonuses}, steps_chunk=steps_chunk,
            rates={b: statistics.median(v) for b, v in rates.items()}, all_rates=rates,
            sb3=statistics.median(sb3_rates) if sb3_rates else None, sb3_all=sb3_rates)
    after = load()
    versions.update(jax=jax.__version__, xminigrid=xminigrid.__version__,
                    python=sys.version.split()[0])

    print(f"\ndevice: {jax.devices()[0].device_kind}; {os.cpu_count()} CPUs; load after: {after}")
    print(f"dem_jax: {args.seeds} seeds vmapped, chunks of {args.updates} updates x 1024 steps "
          f"per seed; median of {args.repeats}; SB3: {args.sb3_steps} steps of one seed per run")
    print(f"versions: {json.dumps(versions)}\n")
    print("| env | dem_jax none steps/s | em | adadem | adadem / none | SB3 steps/s | "
          f"dem_jax none / SB3 | compile s ({', '.join(args.bonuses)}) |")
    print("|---|---|---|---|---|---|---|---|")
    for env, r in results.items():
        rt = r["rates"]
        sb3 = f"{r['sb3']:.0f}" if r["sb3"] else "not run"
        ratio = f"{rt['none'] / r['sb3']:.1f}x" if r["sb3"] and "none" in rt else "-"
        cost = f"{rt['adadem'] / rt['none']:.3f}" if {"none", "adadem"} <= rt.keys() else "-"
        print(f"| {env} | " + " | ".join(f"{rt[b]:.0f}" if b in rt else "-" for b in BONUSES)
              + f" | {cost} | {sb3} | {ratio} | "
              + ", ".join(f"{r['compile_s'][b]:.1f}" for b in args.bonuses) + " |")
    if not args.sb3_python:
        print("\nSB3 not run: pass --sb3-python PATH (a venv with stable-baselines3, minigrid, "
              "gymnasium, torch; see this file's docstring).")
    else:
        worst = min(r["rates"].get("none", 0) / r["sb3"] for r in results.values())
        print("\ntarget >= 10x: " + ("met" if worst >= 10 else f"MISSED ({worst:.1f}x)"))


if __name__ == "__main__":
    main()
