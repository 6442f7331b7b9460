r"""Reinforcement learning: PPO on MiniGrid (xminigrid), the entropy bonus computed by EM or AdaDEM.

The paper's RL experiment (section 5 of its appendix): RL Baselines3 Zoo's PPO
on MiniGrid, where the entropy bonus keeps its sign (it is **maximised**) and
only its computation is swapped for AdaDEM. Here the whole training run is
pure JAX: environments from `xminigrid`, rollouts and updates under
`lax.scan`, and `jax.vmap` over seeds, so that 6 seeds are one compiled
program (`Trainer`).

PPO as Stable-Baselines3 runs it (`PPOConfig` holds RL-Zoo's MiniGrid values):
an actor and a critic, each an MLP of two tanh layers of 64 (orthogonal
initialisation, gains sqrt 2, 0.01 for the policy head, 1 for the value head),
on the 7x7 egocentric view's (tile, colour) integers scaled to [0, 1]; `num_envs`
environments stepped `num_steps` times per update; GAE(gamma, lambda)
(`gae`); `epochs` passes over the rollout in shuffled minibatches, advantages
normalised per minibatch; Adam (eps 1e-5), gradients clipped to a global norm
0.5. The per-minibatch loss (`ppo_loss`) is

.. math::
  L = -\mathrm{mean}\,\min(r A, \mathrm{clip}(r, 1 \pm \epsilon) A)
      + c_v\, \mathrm{mean}\,(R - V)^2 - c_e\, B, \qquad r = \pi / \pi_{old},

with the bonus `B` one of (`bonus`, on the policy logits z of the minibatch,
p = softmax z, per-example values averaged):

* ``"none"``: B = 0;
* ``"em"``: B = H(z) = -sum_i p_i log p_i. The loss's gradient on logit i
  is ``c_e / N * p_i (z_i - E_p z)``: descent lowers the logits above the
  p-weighted mean and raises those below, pushing the policy to uniform;
* ``"adadem"``: B = the AdaDEM value ``(T + m.z) / delta``
  (`dem_jax.losses.adadem`), whose gradient with delta and m held constant is
  ``(-p_i (z_i + T + 1) + m_i) / delta``. Maximised, the loss's gradient on
  logit i is ``c_e / (N delta) * (p_i (z_i + T + 1) - m_i)``: descent lowers
  each action's logit by its normalised CADF reward (the dominant action
  most: the anti-collapse half of EM, scaled to an L1 norm of 1 per state by
  delta) and raises every logit by ``m_i / delta``, where m is the MEC row
  of the greedy action (the running mean of the policy's probabilities over
  the states where that action is greedy). The MEC plays the part of the
  GMC in maximised EM (there the gradient is ``-p_i``: raise the probable
  actions), with a running class-conditional mean in place of the current p.

  The MEC is `[A, A]` over actions, one per seed, in the training state; it
  is updated from each minibatch before its loss (Algorithm 1), with
  momentum `mec_momentum`.

Departures from Stable-Baselines3, named: no `VecNormalize` (RL-Zoo's
`normalize: true`; here the observation is scaled by fixed constants and the
rewards are in [0, 1]); an episode cut by the time limit is treated as ended (SB3
bootstraps it with the value of the last observation); the observation is
xminigrid's (tile, colour) view without the mission text of `FlatObsWrapper`.
Evaluation (`evaluate`): `eval_episodes` fresh episodes, greedy actions
(RL-Zoo evaluates deterministically; `eval_greedy=False` samples), the return
of each first episode.

  >>> from dem_jax.tasks import rl
  >>> cfg = rl.PPOConfig(env="MiniGrid-Empty-5x5", bonus="adadem", total_steps=4096)
  >>> trainer = rl.Trainer(cfg)
  >>> state = trainer.init(seeds=[0, 1])              # one state per seed, stacked
  >>> state, metrics = trainer.train(state, updates=2)  # 2 updates of every seed
  >>> returns = trainer.evaluate(state)               # [seeds, eval_episodes]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from dem_jax import _extras
from dem_jax import losses

_extras.require("rl", __name__)

import xminigrid  # noqa: E402  (after the check, which names the extra)
from xminigrid.core.constants import NUM_COLORS, NUM_TILES  # noqa: E402
from xminigrid.wrappers import GymAutoResetWrapper  # noqa: E402

BONUSES = ("none", "em", "adadem")

# The paper's MiniGrid names -> xminigrid's (gymnasium's `MiniGrid-<name>-v0`).
PAPER_ENVS = {
    "DoorKey-5x5": "MiniGrid-DoorKey-5x5",
    "Empty-Random-5x5": "MiniGrid-EmptyRandom-5x5",
    "FourRooms": "MiniGrid-FourRooms",
    "Unlock": "MiniGrid-Unlock",
}


def env_id(name: str) -> str:
    """xminigrid's id of `name`: a paper name (`PAPER_ENVS`) or a MiniGrid id (prefix optional).

    Raises:
      ValueError: unknown, or an XLand ruleset (those download their rules at run time).
    """
    name = PAPER_ENVS.get(name, name)
    known = [e for e in xminigrid.registered_environments() if e.startswith("MiniGrid-")]
    if f"MiniGrid-{name}" in known:
        name = f"MiniGrid-{name}"
    if name not in known:
        raise ValueError(
            f"Unknown environment {name!r}. Use a paper name ({', '.join(PAPER_ENVS)}) or one of "
            f"xminigrid's MiniGrid ports: {', '.join(known)}. (XLand rulesets are left out: "
            "they download their benchmark at run time.)")
    return name


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """One PPO run; defaults: RL-Zoo's MiniGrid hyperparameters (DoorKey-5x5), the paper's ent_coef.

    `total_steps` is rounded up to whole updates of `num_envs * num_steps`
    environment steps. `ent_coef` is not compiled into the program (it is an
    argument of `Trainer.train`), so the paper's 0.001 and 0.01 share one.
    """
    env: str = "DoorKey-5x5"
    total_steps: int = 100_000
    num_envs: int = 8
    num_steps: int = 128
    minibatch_size: int = 64
    epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    lr: float = 2.5e-4
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    ent_coef: float = 0.001
    bonus: str = "none"
    mec_momentum: float = 0.1
    hidden: int = 64
    eval_episodes: int = 10
    eval_greedy: bool = True       # argmax actions (RL-Zoo's deterministic evaluation)

    def __post_init__(self):
        if self.bonus not in BONUSES:
            raise ValueError(f"bonus={self.bonus!r}: use one of {BONUSES}.")
        batch = self.num_envs * self.num_steps
        if batch % self.minibatch_size:
            raise ValueError(
                f"num_envs * num_steps = {batch} is not a multiple of minibatch_size="
                f"{self.minibatch_size}: PPO's epochs would drop examples. Change one of them.")

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_update)


# ----------------------------------------------------------------------------- the math
def gae(rewards, values, dones, last_value, *, gamma: float, lam: float):
    r"""Generalised advantage estimation over a rollout, by a reverse `lax.scan`.

    .. math::
      \delta_t = r_t + \gamma V_{t+1} (1 - d_t) - V_t, \qquad
      A_t = \delta_t + \gamma \lambda (1 - d_t) A_{t+1},

    where `d_t` = 1 if the episode ended with step t (then `V_{t+1}`, the next
    episode's first value, is not used) and `V_T` = `last_value`.

    Args:
      rewards, values, dones: float `[T, ...]` (any trailing batch shape).
      last_value: float `[...]`, the value of the observation after the rollout.
      gamma, lam: discount and GAE lambda.

    Returns:
      `(advantages, returns)`, float32 `[T, ...]`; returns = advantages + values.

    Example:
      >>> adv, ret = gae(jnp.ones((3, 2)), jnp.zeros((3, 2)), jnp.zeros((3, 2)),
      ...                jnp.zeros(2), gamma=0.99, lam=0.95)
    """
    rewards, values, dones = (jnp.asarray(x, jnp.float32) for x in (rewards, values, dones))
    next_values = jnp.concatenate([values[1:], jnp.asarray(last_value, jnp.float32)[None]])

    def back(carry, x):
        r, v, nv, d = x
        delta = r + gamma * nv * (1.0 - d) - v
        adv = delta + gamma * lam * (1.0 - d) * carry
        return adv, adv

    _, adv = lax.scan(back, jnp.zeros_like(values[0]), (rewards, values, next_values, dones),
                      reverse=True)
    return adv, adv + values


def bonus_value(logits, mec, *, bonus: str, mec_momentum: float = 0.1):
    """The entropy bonus B (to be maximised) of logits `[N, A]`: `(B scalar, new_mec, delta_mean)`.

    "none" gives 0, "em" the mean entropy, "adadem" the mean AdaDEM value (see the
    module docstring for the gradients); the MEC `[A, A]` is returned updated
    for "adadem" and unchanged otherwise.

    Example:
      >>> b, mec, _ = bonus_value(jnp.zeros((4, 3)), losses.mec_init(3), bonus="em")
    """
    if bonus == "none":
        return jnp.zeros((), jnp.float32), mec, jnp.ones((), jnp.float32)
    if bonus == "em":
        return losses.entropy(logits).mean(), mec, jnp.ones((), jnp.float32)
    value, new_mec = losses.adadem(logits, mec, momentum=mec_momentum)
    z = lax.stop_gradient(logits).astype(jnp.float32)
    p = jax.nn.softmax(z)
    t = -jnp.sum(p * z, -1, keepdims=True)
    delta = jnp.sum(jnp.abs(p * (z + t + 1.0)), -1)  # AdaDEM's L1 norm, for the record
    return value.mean(), new_mec, delta.mean()


def ppo_loss(logits, values, batch, mec, *, clip: float, vf_coef: float, ent_coef,
             bonus: str, mec_momentum: float = 0.1):
    """The PPO loss of one minibatch (see the module docstring): `(loss, (new_mec, stats))`.

    Args:
      logits: float `[N, A]` policy logits of the minibatch's observations.
      values: float `[N]` critic values.
      batch: dict with `actions` int `[N]`, `log_probs` (old) `[N]`, `advantages`
        `[N]` (normalised here, per minibatch, as SB3 does) and `returns` `[N]`.
      mec: `[A, A]` MEC state (used by ``bonus="adadem"``).
      clip, vf_coef, ent_coef, bonus, mec_momentum: as in `PPOConfig`.

    Example:
      >>> batch = dict(actions=jnp.array([0, 1]), log_probs=jnp.log(jnp.full(2, 1 / 3)),
      ...              advantages=jnp.array([1.0, -1.0]), returns=jnp.array([1.0, 0.0]))
      >>> loss, (mec, stats) = ppo_loss(jnp.zeros((2, 3)), jnp.zeros(2), batch,
      ...     losses.mec_init(3), clip=0.2, vf_coef=0.5, ent_coef=0.01, bonus="em")
    """
    logits = logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(logits)
    new_log_probs = jnp.take_along_axis(log_p, batch["actions"][:, None], axis=1)[:, 0]
    adv = batch["advantages"]
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    ratio = jnp.exp(new_log_probs - batch["log_probs"])
    pg = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip, 1 + clip) * adv).mean()
    vf = jnp.mean((batch["returns"] - values) ** 2)
    b, new_mec, delta = bonus_value(logits, mec, bonus=bonus, mec_momentum=mec_momentum)
    loss = pg + vf_coef * vf - ent_coef * b
    entropy = lax.stop_gradient(losses.entropy(logits).mean())
    log_ratio = lax.stop_gradient(new_log_probs - batch["log_probs"])
    stats = dict(policy_loss=pg, value_loss=vf, bonus=lax.stop_gradient(b), entropy=entropy,
                 approx_kl=jnp.mean(jnp.exp(log_ratio) - 1 - log_ratio),
                 clip_fraction=jnp.mean((jnp.abs(ratio - 1) > clip).astype(jnp.float32)),
                 delta=delta)
    return loss, (new_mec, stats)


# ----------------------------------------------------------------------------- the model
class ActorCritic(nn.Module):
    """SB3's `MlpPolicy`: separate actor and critic MLPs (2 x `hidden`, tanh) on the flat input.

    `__call__(obs uint8 [N, 7, 7, 2]) -> (logits [N, A], value [N])`. The input is
    the view's (tile, colour) integers scaled to [0, 1] and flattened (98 numbers),
    as `FlatObsWrapper` flattens the integer view (without the mission text) and
    RL-Zoo's `VecNormalize` rescales it. A one-hot view (1225 numbers) made the
    first layer 12x larger and the run ~5x slower on CPU for no gain we measured.
    """
    num_actions: int
    hidden: int = 64

    @nn.compact
    def __call__(self, obs):
        x = obs.astype(jnp.float32) / jnp.array([NUM_TILES - 1, NUM_COLORS - 1], jnp.float32)
        x = x.reshape(x.shape[0], -1)
        ortho = nn.initializers.orthogonal

        def mlp(h, name):
            for i in range(2):
                h = nn.tanh(nn.Dense(self.hidden, kernel_init=ortho(math.sqrt(2)),
                                     name=f"{name}_{i}")(h))
            return h

        logits = nn.Dense(self.num_actions, kernel_init=ortho(0.01), name="pi_head")(mlp(x, "pi"))
        value = nn.Dense(1, kernel_init=ortho(1.0), name="vf_head")(mlp(x, "vf"))[:, 0]
        return logits, value


# ----------------------------------------------------------------------------- training
class RunState(NamedTuple):
    """Everything one seed's run carries between updates (a pytree; stacked over seeds)."""
    params: Any
    opt_state: Any
    mec: jax.Array
    timestep: Any            # xminigrid TimeStep of the `num_envs` environments
    episode_return: jax.Array  # [num_envs] running return of the current episodes
    key: jax.Array
    update: jax.Array        # updates done


class Trainer:
    """PPO for one `PPOConfig`, vmapped over seeds: `init`, `train` (jitted chunks), `evaluate`.

    `train(state, updates=k)` runs k updates of every seed as one compiled
    program (`lax.scan` over updates inside `jax.vmap` over seeds); the same
    program serves every chunk of k, so a run checkpointed between chunks and
    resumed gives the uninterrupted result.
    """

    def __init__(self, config: PPOConfig):
        self.config = c = config
        self.env_name = env_id(c.env)
        env, self.env_params = xminigrid.make(self.env_name)
        self.env = GymAutoResetWrapper(env)
        self.eval_env = env
        self.num_actions = env.num_actions(self.env_params)
        self.model = ActorCritic(self.num_actions, c.hidden)
        self.tx = optax.chain(optax.clip_by_global_norm(c.max_grad_norm),
                              optax.adam(c.lr, eps=1e-5))
        self._train = jax.jit(jax.vmap(self._train_one, in_axes=(0, None, None)),
                              static_argnums=1, donate_argnums=0)
        self._evaluate = jax.jit(jax.vmap(self._evaluate_one))

    # -- state
    def init_one(self, seed) -> RunState:
        """The initial state of one seed (int or traced)."""
        key = jax.random.key(seed)
        key, k_init, k_env = jax.random.split(key, 3)
        obs_shape = self.env.observation_shape(self.env_params)
        params = self.model.init(k_init, jnp.zeros((1,) + tuple(obs_shape), jnp.uint8))
        reset = jax.vmap(self.env.reset, in_axes=(None, 0))
        timestep = reset(self.env_params, jax.random.split(k_env, self.config.num_envs))
        return RunState(params, self.tx.init(params), losses.mec_init(self.num_actions),
                        timestep, jnp.zeros(self.config.num_envs), key, jnp.zeros((), jnp.int32))

    def init(self, seeds) -> RunState:
        """States of several seeds, stacked on a leading axis.

        Each seed is initialised by its own call, not under `jax.vmap`: a vmapped
        init of this model (six orthogonal initialisers, batched QR) stalled
        XLA's CPU runtime at 0% CPU here (jax 0.10.2), while the same init per
        seed never did.
        """
        init = jax.jit(self.init_one)
        states = [init(jnp.int32(s)) for s in seeds]
        return jax.tree.map(lambda *x: jnp.stack(x), *states)

    # -- one seed
    def _rollout(self, state: RunState):
        c = self.config
        step_envs = jax.vmap(self.env.step, in_axes=(None, 0, 0))

        def one(carry, _):
            timestep, ep_ret, key = carry
            key, k_act = jax.random.split(key)
            logits, value = self.model.apply(state.params, timestep.observation)
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
            nxt = step_envs(self.env_params, timestep, action)
            done = nxt.last().astype(jnp.float32)
            ep_ret = ep_ret + nxt.reward
            record = dict(obs=timestep.observation, actions=action, log_probs=log_prob,
                          values=value, rewards=nxt.reward, dones=done,
                          finished_return=ep_ret * done)
            return (nxt, ep_ret * (1.0 - done), key), record

        (timestep, ep_ret, key), traj = lax.scan(
            one, (state.timestep, state.episode_return, state.key), None, length=c.num_steps)
        _, last_value = self.model.apply(state.params, timestep.observation)
        return state._replace(timestep=timestep, episode_return=ep_ret, key=key), traj, last_value

    def _update(self, state: RunState, ent_coef):
        c = self.config
        state, traj, last_value = self._rollout(state)
        adv, ret = gae(traj["rewards"], traj["values"], traj["dones"], last_value,
                       gamma=c.gamma, lam=c.gae_lambda)
        flat = lambda x: x.reshape((-1,) + x.shape[2:])
        data = dict(obs=flat(traj["obs"]), actions=flat(traj["actions"]),
                    log_probs=flat(traj["log_probs"]), advantages=flat(adv), returns=flat(ret))
        n_mb = c.steps_per_update // c.minibatch_size

        def minibatch(carry, idx):
            params, opt_state, mec = carry
            batch = jax.tree.map(lambda x: x[idx], data)

            def objective(params, mec):
                logits, values = self.model.apply(params, batch["obs"])
                return ppo_loss(logits, values, batch, mec, clip=c.clip, vf_coef=c.vf_coef,
                                ent_coef=ent_coef, bonus=c.bonus, mec_momentum=c.mec_momentum)

            (loss, (mec, stats)), grads = jax.value_and_grad(objective, has_aux=True)(params, mec)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, mec), dict(stats, loss=loss)

        def epoch(carry, key):
            perm = jax.random.permutation(key, c.steps_per_update).reshape(n_mb, c.minibatch_size)
            return lax.scan(minibatch, carry, perm)

        key, k_epochs = jax.random.split(state.key)
        (params, opt_state, mec), stats = lax.scan(
            epoch, (state.params, state.opt_state, state.mec), jax.random.split(k_epochs, c.epochs))
        episodes = traj["dones"].sum()
        metrics = {k: v.mean() for k, v in stats.items()}
        metrics.update(episodes=episodes, train_return=traj["finished_return"].sum()
                       / jnp.maximum(episodes, 1.0), mec_diagonal=jnp.diagonal(mec).mean())
        state = state._replace(params=params, opt_state=opt_state, mec=mec, key=key,
                               update=state.update + 1)
        return state, metrics

    def _train_one(self, state: RunState, updates: int, ent_coef):
        return lax.scan(lambda s, _: self._update(s, ent_coef), state, None, length=updates)

    def train(self, state: RunState, *, updates: int, ent_coef: float | None = None):
        """`updates` updates of all seeds: `(state, metrics)`, metrics `{name: [seeds, updates]}`.

        `state` is donated (do not reuse it). `ent_coef` defaults to the config's.
        """
        ent = self.config.ent_coef if ent_coef is None else ent_coef
        return self._train(state, int(updates), jnp.float32(ent))

    def _evaluate_one(self, state: RunState):
        c = self.config

        def policy(obs, key):
            logits, _ = self.model.apply(state.params, obs)
            return (jnp.argmax(logits, -1) if c.eval_greedy
                    else jax.random.categorical(key, logits))

        return first_episode_returns(
            self.eval_env, self.env_params, policy,
            jax.random.split(jax.random.fold_in(state.key, 7), c.eval_episodes),
            jax.random.split(jax.random.fold_in(state.key, 8), int(self.env_params.max_steps)))

    def evaluate(self, state: RunState) -> jax.Array:
        """Returns of `eval_episodes` evaluation episodes per seed: `[seeds, eval_episodes]`."""
        return self._evaluate(state)


def first_episode_returns(env, env_params, policy, reset_keys, step_keys):
    """The return of the first episode of `len(reset_keys)` environments under `policy`.

    Steps `len(step_keys)` times (the episode limit) without auto-reset; rewards after an
    episode's end are masked out. `policy(obs [E, ...], key) -> actions [E]`.
    """
    timestep = jax.vmap(env.reset, in_axes=(None, 0))(env_params, reset_keys)
    step_envs = jax.vmap(env.step, in_axes=(None, 0, 0))

    def one(carry, key):
        timestep, total, running = carry
        nxt = step_envs(env_params, timestep, policy(timestep.observation, key))
        total = total + running * nxt.reward
        return (nxt, total, running * (1.0 - nxt.last().astype(jnp.float32))), None

    n = len(reset_keys)
    (_, total, _), _ = lax.scan(one, (timestep, jnp.zeros(n), jnp.ones(n)), step_keys)
    return total


def random_policy_return(env: str, *, episodes: int = 64, seed: int = 0) -> float:
    """Mean return of the uniformly random policy on `env` (first episode of each of `episodes`)."""
    base, params = xminigrid.make(env_id(env))
    n_actions = base.num_actions(params)
    policy = lambda obs, key: jax.random.randint(key, (obs.shape[0],), 0, n_actions)  # noqa: E731
    run = jax.jit(lambda: first_episode_returns(
        base, params, policy, jax.random.split(jax.random.key(seed), episodes),
        jax.random.split(jax.random.key(seed + 1), int(params.max_steps))).mean())
    return float(run())
