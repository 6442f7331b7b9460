"""RL (PPO on xminigrid): GAE and the PPO loss against hand-written references, the bonus's
logit gradients as the module docstring states them, learning beats a random policy,
vmapped seeds = separate runs, and an interrupted experiment resumes to the same result."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import losses
from dem_jax.engine import reporting
from dem_jax.tasks import rl

RNG = np.random.default_rng(0)

# Tiny PPO: 8 environment copies x 32 steps per update, 2 epochs of 2 minibatches. The
# experiment test below builds this same config, so its Trainer (`rl_lib.trainer_for`)
# reuses the programs compiled here.
TINY = rl.PPOConfig(env="Empty-5x5", total_steps=1536, num_envs=8, num_steps=32,
                    minibatch_size=128, epochs=2, hidden=16, lr=1e-3, eval_episodes=16,
                    eval_greedy=False, bonus="adadem")


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_gae_matches_a_loop():
    t, n = 7, 3
    r, v = RNG.normal(size=(t, n)), RNG.normal(size=(t, n))
    d = (RNG.random((t, n)) < 0.3).astype(np.float64)
    last = RNG.normal(size=n)
    adv, ret = rl.gae(r, v, d, last, gamma=0.9, lam=0.8)
    ref = np.zeros((t, n))
    running = np.zeros(n)
    for i in reversed(range(t)):
        nv = last if i == t - 1 else v[i + 1]
        delta = r[i] + 0.9 * nv * (1 - d[i]) - v[i]
        running = delta + 0.9 * 0.8 * (1 - d[i]) * running
        ref[i] = running
    np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref + v, rtol=1e-5, atol=1e-6)


def _batch(n=6, a=4):
    z = RNG.normal(size=(n, a)).astype(np.float32) * 2
    return z, dict(actions=jnp.asarray(RNG.integers(0, a, n)),
                   log_probs=jnp.asarray(RNG.normal(size=n).astype(np.float32) - 1.5),
                   advantages=jnp.asarray(RNG.normal(size=n).astype(np.float32)),
                   returns=jnp.asarray(RNG.normal(size=n).astype(np.float32)))


@pytest.mark.parametrize("bonus", rl.BONUSES)
def test_ppo_loss_matches_a_hand_written_reference(bonus):
    z, batch = _batch()
    values = RNG.normal(size=6).astype(np.float32)
    mec = losses.mec_init(4)
    loss, (new_mec, stats) = rl.ppo_loss(jnp.asarray(z), jnp.asarray(values), batch, mec,
                                         clip=0.2, vf_coef=0.5, ent_coef=0.01, bonus=bonus)
    p = softmax(z.astype(np.float64))
    a = np.asarray(batch["advantages"], np.float64)
    a = (a - a.mean()) / (a.std() + 1e-8)
    ratio = np.exp(np.log(p[np.arange(6), np.asarray(batch["actions"])])
                   - np.asarray(batch["log_probs"]))
    pg = -np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a).mean()
    vf = ((np.asarray(batch["returns"]) - values) ** 2).mean()
    if bonus == "none":
        b, ref_mec = 0.0, np.asarray(mec)
    elif bonus == "em":
        b, ref_mec = -(p * np.log(p)).sum(-1).mean(), np.asarray(mec)
    else:  # Algorithm 1: MEC rows of the predicted classes first, then (T + m.z) / delta
        yhat = p.argmax(-1)
        ref_mec = np.asarray(mec, np.float64).copy()
        for k in set(yhat):
            ref_mec[k] = 0.9 * ref_mec[k] + 0.1 * p[yhat == k].mean(0)
        t = -(p * z).sum(-1)
        delta = np.abs(p * (z + t[:, None] + 1)).sum(-1)
        b = ((t + (ref_mec[yhat] * z).sum(-1)) / delta).mean()
    np.testing.assert_allclose(loss, pg + 0.5 * vf - 0.01 * b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_mec, ref_mec, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["policy_loss"], pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["value_loss"], vf, rtol=1e-5)


@pytest.mark.parametrize("bonus", ["em", "adadem"])
def test_bonus_gradient_on_the_logits_is_the_docstrings(bonus):
    """Maximised, EM gives c/N p (z - E_p z); AdaDEM c/(N delta) (p (z + T + 1) - m)."""
    z, batch = _batch()
    mec = jnp.asarray(softmax(RNG.normal(size=(4, 4))).astype(np.float32))

    def grad(b):
        f = lambda z: rl.ppo_loss(z, jnp.zeros(6), batch, mec, clip=0.2, vf_coef=0.5,
                                  ent_coef=0.01, bonus=b)[0]
        return np.asarray(jax.grad(f)(jnp.asarray(z)), np.float64)

    got = grad(bonus) - grad("none")  # the bonus's part of the loss gradient
    p = softmax(z.astype(np.float64))
    ez = (p * z).sum(-1, keepdims=True)
    if bonus == "em":
        ref = 0.01 / 6 * p * (z - ez)
    else:
        yhat = p.argmax(-1)
        m = np.asarray(mec, np.float64).copy()
        for k in set(yhat):
            m[k] = 0.9 * m[k] + 0.1 * p[yhat == k].mean(0)
        t = -ez
        cadf = p * (z + t + 1)
        delta = np.abs(cadf).sum(-1, keepdims=True)
        ref = 0.01 / (6 * delta) * (cadf - m[yhat])
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-7)


@pytest.fixture(scope="module")
def trainer():
    from experiments import rl_lib
    return rl_lib.trainer_for(TINY)


def test_vmapped_seeds_equal_separate_runs(trainer):
    both, m_both = trainer.train(trainer.init([0, 1]), updates=2)
    for i, seed in enumerate([0, 1]):
        one, m_one = trainer.train(trainer.init([seed]), updates=2)
        for got, want in zip(jax.tree.leaves(both.params), jax.tree.leaves(one.params)):
            np.testing.assert_allclose(got[i], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(both.mec[i], one.mec[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(m_both["train_return"][i], m_one["train_return"][0],
                                   rtol=1e-4, atol=1e-6)


def test_training_beats_a_random_policy(trainer):
    state = trainer.init([0, 1])
    before = float(trainer.evaluate(state).mean())
    for _ in range(30):  # the same compiled program as above: 60 updates, ~15k steps per seed
        state, _ = trainer.train(state, updates=2)
    after = np.asarray(trainer.evaluate(state)).mean(1)
    random = rl.random_policy_return(TINY.env)
    assert np.all(after > random + 0.15), (after, random, before)  # ~0.7-0.9 vs 0.25 here


def test_unknown_environment_and_bad_minibatch_are_clear():
    with pytest.raises(ValueError, match="Unknown environment 'Nowhere'.*DoorKey-5x5"):
        rl.env_id("Nowhere")
    assert rl.env_id("Empty-Random-5x5") == "MiniGrid-EmptyRandom-5x5"
    assert rl.env_id("DoorKey-6x6") == "MiniGrid-DoorKey-6x6"
    with pytest.raises(ValueError, match="not a multiple of minibatch_size"):
        dataclasses.replace(TINY, minibatch_size=100)
    with pytest.raises(ValueError, match="bonus='entropy'"):
        dataclasses.replace(TINY, bonus="entropy")


def _tiny_experiment():
    from experiments.configs import rl_default
    c = rl_default.get_config()
    c.envs, c.total_steps, c.num_steps, c.eval_every = ("Empty-5x5",), (1536,), (32,), (512,)
    c.seeds, c.bonuses, c.ent_coefs = (0, 1), ("adadem",), (0.01,)
    c.ppo.update(num_envs=8, minibatch_size=128, epochs=2, hidden=16, lr=1e-3,
                 eval_episodes=16, eval_greedy=False)
    return c


def test_the_experiment_runs_the_tests_config():
    from experiments import rl_lib
    assert rl_lib.ppo_config(_tiny_experiment(), 0, "adadem") == TINY


def test_config_errors_name_the_field():
    from experiments import rl_lib
    c = _tiny_experiment()
    c.num_steps = (32, 32)
    with pytest.raises(ValueError, match="config.num_steps has 2 entries for the 1"):
        rl_lib.validate(c)
    c = _tiny_experiment()
    c.bonuses = ("none", "entropy")
    with pytest.raises(ValueError, match="unknown 'entropy'"):
        rl_lib.validate(c)


def test_experiment_resumes_to_the_same_result(tmp_path, save_log):
    """Interrupted after its first checkpoint, the run redoes only what was not saved."""
    from experiments import rl_lib
    c = _tiny_experiment()
    rl_lib.run(c, str(tmp_path / "a"))
    full_saves = save_log.under(tmp_path / "a")
    assert len(full_saves) == 3, full_saves  # 1536 steps = 3 chunks of two updates
    save_log.start(interrupt_after=1)
    with pytest.raises(KeyboardInterrupt):
        rl_lib.run(c, str(tmp_path / "b"))
    save_log.start()
    rl_lib.run(c, str(tmp_path / "b"))
    assert save_log.under(tmp_path / "b") == full_saves[1:]
    a, b = (rl_lib.collect(c, str(tmp_path / d))["Empty-5x5"]["adadem@0.01"] for d in "ab")
    for key in ("curve", "final", "average", "metrics", "steps"):
        assert a[key] == b[key], key
    assert a["steps"] == 1536 and len(a["curve"]) == 4  # step 0 and three chunks
    for name in ("results.json", "results.md", "curves_0.01.png", "metrics.jsonl"):
        assert (tmp_path / "a" / name).exists(), name
    # Rows are independent units: another row may run into the same directory (rows
    # split over processes) and a report with both rows tables both; another
    # environment budget may not.
    c2 = _tiny_experiment()
    c2.ent_coefs = (0.001,)
    rl_lib.run(c2, str(tmp_path / "a"))
    both = _tiny_experiment()
    both.ent_coefs = (0.01, 0.001)
    rl_lib.report(both, str(tmp_path / "a"))
    assert set(rl_lib.collect(both, str(tmp_path / "a"))["Empty-5x5"]) == {
        "adadem@0.01", "adadem@0.001"}
    assert "adadem@0.001" in (tmp_path / "a" / "results.md").read_text()
    c3 = _tiny_experiment()
    c3.total_steps = (1024,)
    with pytest.raises(reporting.WorkdirError, match="total_steps"):
        rl_lib.run(c3, str(tmp_path / "a"))
