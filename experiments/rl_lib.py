"""The work of `experiments.rl`: `run(config, workdir)`.

A unit is one (environment, row): PPO (`dem_jax.tasks.rl.Trainer`) with every
seed of `config.seeds` vmapped into one program, trained in chunks of
`eval_every` environment steps (rounded to whole updates); after each chunk the
greedy policy of every seed is evaluated on `eval_episodes` episodes and the
stacked state is checkpointed, so a restarted run continues from the last
chunk and ends where the uninterrupted run ends. A row is "none" (no bonus) or
"<em|adadem>@<ent_coef>". Finished units are cached JSON; `results.md` tables
the finished units, `curves_<ent_coef>.png` plots them.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dem_jax import plots
from dem_jax.engine import checkpoint as ckpt_lib
from dem_jax.engine import metrics
from dem_jax.engine import reporting
from dem_jax.tasks import rl
from experiments import cli
from experiments import specs
from experiments.uda_lib import slug


def rows(config) -> list[str]:
    """The rows of a config: "none" once, then each bonus at each ent_coef."""
    out = []
    for bonus in config.bonuses:
        if bonus == "none":
            out.append("none")
        else:
            out += [f"{bonus}@{e:g}" for e in config.ent_coefs]
    return out


def parse_row(row: str) -> tuple[str, float]:
    bonus, _, coef = row.partition("@")
    return bonus, (float(coef) if coef else 0.0)


def ppo_config(config, i: int, bonus: str) -> rl.PPOConfig:
    """The PPOConfig of environment `i` of the config with `bonus`."""
    p = dict(config.ppo)
    return rl.PPOConfig(env=config.envs[i], total_steps=int(config.total_steps[i]),
                        num_steps=int(config.num_steps[i]), bonus=bonus, **p)


@functools.lru_cache(maxsize=8)
def trainer_for(cfg: rl.PPOConfig) -> rl.Trainer:
    """One Trainer (and its compiled programs) per PPOConfig: rows that differ only in
    ent_coef, and a run resumed in the same process, compile nothing again."""
    return rl.Trainer(cfg)


def validate(config, devices=None) -> None:
    del devices  # seeds are vmapped on one device
    cli.check_config(config, specs.RL)
    n = len(config.envs)
    for field in ("total_steps", "num_steps", "eval_every"):
        if len(config[field]) != n:
            raise ValueError(f"config.{field} has {len(config[field])} entries for the {n} "
                             f"environments of config.envs: give one per environment.")
    for bonus in config.bonuses:
        if bonus not in rl.BONUSES:
            raise ValueError(f"config.bonuses: unknown {bonus!r}; use some of {rl.BONUSES}.")
    for i, env in enumerate(config.envs):
        rl.env_id(env)
        ppo_config(config, i, "none")  # raises on a minibatch that does not divide the batch


def _chunks(config, i: int) -> tuple[int, int]:
    """(updates per chunk, chunks) of environment i: the budget rounded up to whole chunks."""
    c = ppo_config(config, i, "none")
    per = max(1, round(config.eval_every[i] / c.steps_per_update))
    return per, -(-c.num_updates // per)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(state):
    """The state with its PRNG keys as raw key data (what a checkpoint can hold)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def from_host(tree, like):
    """Inverse of `to_host`, given a state `like` that says where keys go."""
    return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(jnp.asarray(x)) if _is_key(ref)
                        else jnp.asarray(x), tree, like)


def run_unit(config, workdir: str, i: int, row: str, log=None) -> dict:
    env = config.envs[i]
    bonus, ent_coef = parse_row(row)
    cfg = ppo_config(config, i, bonus)
    trainer = trainer_for(cfg)
    seeds = list(config.seeds)
    state = trainer.init(seeds)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "units", slug(env), slug(row)),
                                 max_to_keep=1)
    per, chunks = _chunks(config, i)
    if ckpt.latest_step() is not None:
        host, meta = ckpt.restore(to_host(state))
        state = from_host(host, state)
    else:  # the untrained policy's return is the curve's first point
        meta = {"chunk": -1, "curve": [[0, np.asarray(trainer.evaluate(state)).mean(1).tolist()]],
                "metrics": [], "seconds": 0.0}
    for k in reporting.progress(range(meta["chunk"] + 1, chunks), total=chunks,
                                initial=meta["chunk"] + 1, desc=f"{env} {row}"):
        t0 = time.time()
        state, m = trainer.train(state, updates=per, ent_coef=ent_coef)
        returns = np.asarray(trainer.evaluate(state)).mean(1)  # blocks: the chunk is done
        steps = (k + 1) * per * cfg.steps_per_update
        means = {name: float(np.mean(v)) for name, v in m.items()}
        meta = {"chunk": k, "curve": meta["curve"] + [[steps, returns.tolist()]],
                "metrics": meta["metrics"] + [means],
                "seconds": meta["seconds"] + time.time() - t0}
        ckpt.save(k, to_host(state), meta)
        if log is not None:
            log.write(phase="rl", env=env, row=row, step=steps, eval_return=float(returns.mean()),
                      **means)
    ckpt.close()
    curve = meta["curve"]
    per_seed = np.array([r for _, r in curve[1:]])  # [evals, seeds], after training began
    return {"env": env, "row": row, "bonus": bonus, "ent_coef": ent_coef,
            "steps": curve[-1][0], "seeds": seeds, "curve": curve,
            "final": per_seed[-1].tolist(), "average": per_seed.mean(0).tolist(),
            "metrics": meta["metrics"], "seconds": meta["seconds"],
            "steps_per_second": curve[-1][0] * len(seeds) / max(meta["seconds"], 1e-9)}


def _unit_path(workdir, env, row):
    return os.path.join(workdir, "units", slug(env), f"{slug(row)}.json")


def collect(config, workdir) -> dict:
    """{env: {row: unit}} of the finished units of the config."""
    out = {}
    for env in config.envs:
        for row in rows(config):
            u = reporting.load_checked(_unit_path(workdir, env, row))
            if u is not None and u["seeds"] == list(config.seeds):
                out.setdefault(env, {})[row] = u
    return out


def _pm(x) -> str:
    x = np.asarray(x, float)
    return f"{x.mean():.3f} ± {x.std():.3f}"


def results_markdown(units: dict, config, random_returns: dict) -> str:
    out = ["# Reinforcement learning: PPO on MiniGrid (xminigrid)", "",
           f"{'Greedy' if config.ppo.eval_greedy else 'Sampled'} evaluation return over "
           f"{config.ppo.eval_episodes} episodes per seed, mean ± std "
           f"over {len(config.seeds)} seeds ({reporting.STD_KIND}): at the end of training "
           "(final) and averaged over the evaluations during training (average). The bonus is "
           "maximised with weight ent_coef (row `<bonus>@<ent_coef>`). Training return: mean "
           "return of the (sampled) episodes that ended in the last chunk, mean over seeds.", ""]
    for env in config.envs:
        i = list(config.envs).index(env)
        out += [f"## {env} ({int(config.total_steps[i]):,} steps per seed; random policy "
                f"{random_returns.get(env, float('nan')):.3f})", ""]
        table = []
        for row in rows(config):
            u = units.get(env, {}).get(row)
            if u is None:
                table.append([row, "not run", "", "", ""])
                continue
            train = [m["train_return"] for m in u["metrics"]]
            table.append([row, _pm(u["final"]), _pm(u["average"]), f"{train[-1]:.3f}",
                          f"{u['steps_per_second']:,.0f}"])
        out += [plots.markdown_table(
            ["row", "final", "average", "training return (last chunk)",
             "env steps/s (all seeds, with compile)"], table), ""]
    return "\n".join(out)


def plot_curves(path: str, units: dict, config, ent_coef: float) -> None:
    """Return against environment steps per environment: mean and a ±std band over seeds."""
    import matplotlib.pyplot as plt
    envs = [e for e in config.envs if units.get(e)]
    if not envs:
        return
    fig, axes = plt.subplots(1, len(envs), figsize=(4 * len(envs), 3.2), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for row, u in units[env].items():
            if u["bonus"] != "none" and u["ent_coef"] != ent_coef:
                continue
            steps = np.array([s for s, _ in u["curve"]])
            r = np.array([v for _, v in u["curve"]])
            mean, std = r.mean(1), r.std(1)
            ax.plot(steps, mean, label=row)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(env, fontsize=9)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("greedy return")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(config, workdir) -> str:
    units = collect(config, workdir)
    randoms = reporting.cached(os.path.join(workdir, "random_policy.json"), lambda: {
        env: rl.random_policy_return(env) for env in config.envs})
    reporting.write_json(os.path.join(workdir, "results.json"),
                         {"units": units, "random_policy": randoms})
    md = results_markdown(units, config, randoms)
    reporting.write_text(os.path.join(workdir, "results.md"), md)
    if reporting.is_writer():
        for e in config.ent_coefs:
            plot_curves(os.path.join(workdir, f"curves_{e:g}.png"), units, config, e)
        print(md)
    return md


def run(config, workdir: str, *, devices=None) -> Any:
    validate(config, devices)
    # Rows are independent units: a run of some bonuses / ent_coefs may share the
    # directory with a run of others (e.g. rows split over processes), and
    # `--report` with all of them tables every finished unit.
    confirm = reporting.claim_workdir(workdir, config,
                                      ignore=("logging", "bonuses", "ent_coefs"))
    log = metrics.open_log(workdir, config)
    confirm()
    work = [(i, row) for i in range(len(config.envs)) for row in rows(config)]
    for i, row in reporting.progress(work, desc="units"):
        reporting.cached(_unit_path(workdir, config.envs[i], row),
                         lambda: run_unit(config, workdir, i, row, log))
    return report(config, workdir)
