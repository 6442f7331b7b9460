"""Noisy-label training: every loss runs, 8 devices == 1 device, ELR's table by
example index, resume after an interruption, clear config errors.

Everything runs on 8x8 digits with a tiny CNN so that compiles stay cheap.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import data
from dem_jax import losses
from dem_jax import models
from dem_jax.data import noise as noise_lib
from dem_jax.tasks import noisy
from dem_jax.engine import parallel
from dem_jax.engine import reporting
from dem_jax.engine import train as train_lib
from experiments import noisy_labels_lib
from experiments.configs import noisy_default
from experiments.configs import noisy_fashion_mnist

TINY = (("hidden", 8), ("width", 4))
NUM_CLASSES = 10
BATCH = 16


@pytest.fixture(scope="module")
def setup():
    train = data.load("digits", "train")
    noise = noise_lib.corrupt_labels(train.labels, NUM_CLASSES, kind="symmetric", rate=0.4,
                                     seed=0)
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"),
                                      (1, *train.images.shape[1:]))
    tx = train_lib.make_optimizer("sgd_momentum", 0.1, weight_decay=5e-4)
    return train, noise, model, variables, tx


def make_step(setup, loss, devices, backend="pmap"):
    _, _, model, _, tx = setup
    return parallel.data_parallel(noisy.make_train_step(model, tx, noisy.NoisyLossConfig(loss)),
                                  devices=devices, backend=backend)


def batch_of(setup, idx):
    train, noise, *_ = setup
    idx = np.asarray(idx, np.int32)
    return train.images[idx], noise.noisy[idx], idx, train.labels[idx]


def first_state(setup, loss):
    train, _, _, variables, tx = setup
    return noisy.init_state(variables, tx, noisy.NoisyLossConfig(loss), len(train), NUM_CLASSES)


def tree_close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


@pytest.fixture(scope="module")
def one_device_elr_adadem(setup):
    return make_step(setup, "elr+adadem", jax.devices()[:1])


@pytest.mark.parametrize("loss", noisy.LOSSES)
def test_every_loss_runs_and_updates_its_state(setup, loss):
    step = make_step(setup, loss, jax.devices()[:1])
    state = first_state(setup, loss)
    rep = parallel.replicate(state, 1)
    for start in (0, BATCH):
        idx = np.arange(start, start + BATCH) + 100
        rep, metrics = step(rep, *parallel.shard(batch_of(setup, idx), 1))
    out = parallel.unreplicate(rep)
    assert np.isfinite(float(metrics["loss"][0]))
    assert int(out.step) == 2
    assert int(metrics["count"][0]) == BATCH
    assert int(metrics["clean_count"][0] + metrics["noisy_count"][0]) == BATCH
    base, reg = noisy.parse_loss(loss)
    assert ("elr_targets" in out.extra) == (base == "elr")
    assert ("mec" in out.extra) == (reg == "adadem")
    if base == "elr":
        touched = np.flatnonzero(np.asarray(out.extra["elr_targets"]).sum(-1))
        np.testing.assert_array_equal(touched, np.arange(100, 100 + 2 * BATCH))
    if reg == "adadem":
        assert not np.allclose(out.extra["mec"], losses.mec_init(NUM_CLASSES))


@pytest.mark.parametrize("backend", parallel.BACKENDS)
def test_eight_devices_equal_one_device(setup, one_device_elr_adadem, backend):
    """3 steps on the same global batches: params, BN stats, ELR table, MEC, metrics."""
    assert len(jax.devices()) == 8
    loss = "elr+adadem"
    state = first_state(setup, loss)
    order = np.random.default_rng(0).permutation(len(setup[0]))[:3 * 64]
    steps = [batch_of(setup, order[k * 64:(k + 1) * 64]) for k in range(3)]
    step8 = make_step(setup, loss, jax.devices(), backend)
    one, eight = parallel.replicate(state, 1), parallel.replicate(state, 8)
    for batch in steps:
        one, m1 = one_device_elr_adadem(one, *parallel.shard(batch, 1))
        eight, m8 = step8(eight, *parallel.shard(batch, 8))
        tree_close(parallel.unreplicate(m1), parallel.unreplicate(m8), rtol=2e-5, atol=2e-6,
                   err_msg=f"{backend}: metrics of 8 devices != 1 device")
    # Every device holds the same table and MEC after the all-gather / psum.
    for leaf in jax.tree.leaves(eight.extra):
        for d in range(1, 8):
            np.testing.assert_array_equal(leaf[0], leaf[d])
    tree_close(parallel.unreplicate(one), parallel.unreplicate(eight), rtol=2e-5, atol=2e-6,
               err_msg=f"{backend}: state after 3 steps on 8 devices != 1 device")
    rows = np.asarray(eight.extra["elr_targets"][0])
    assert np.all(rows[order].sum(-1) > 0) and np.count_nonzero(rows.sum(-1)) == 3 * 64


def test_elr_table_is_indexed_by_example_not_batch_position(setup, one_device_elr_adadem):
    """The same examples in another order write the same rows with the same values."""
    state = first_state(setup, "elr+adadem")
    idx = np.arange(200, 200 + BATCH)
    perm = np.random.default_rng(1).permutation(BATCH)
    tables = []
    for order in (idx, idx[perm]):
        out, _ = one_device_elr_adadem(parallel.replicate(state, 1),
                                       *parallel.shard(batch_of(setup, order), 1))
        tables.append(np.asarray(out.extra["elr_targets"][0]))
    np.testing.assert_allclose(tables[0], tables[1], rtol=1e-5, atol=1e-7)
    touched = np.flatnonzero(tables[0].sum(-1))
    np.testing.assert_array_equal(touched, idx)
    # Row i = (1 - beta) * the normalised clipped prediction of example i (table was 0).
    _, _, _, variables, _ = setup
    model = models.create_model("cnn", num_classes=NUM_CLASSES, **dict(TINY))  # no device axis
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    logits = forward(variables, setup[0].images[idx])
    p = jnp.clip(jax.nn.softmax(logits), 1e-4, 1 - 1e-4)
    p = p / p.sum(-1, keepdims=True)
    np.testing.assert_allclose(tables[0][idx], 0.3 * np.asarray(p), rtol=1e-4, atol=1e-6)


def tiny_config(**overrides):
    c = noisy_default.get_config()
    c.model_kwargs.width, c.model_kwargs.hidden = 4, 8
    c.train_subset = 160
    c.epochs = 3
    c.batch_size = 32
    c.eval_batch_size = 512
    c.seeds = (0,)
    c.noise = ("symmetric:0.4",)
    c.losses = ("elr+adadem",)
    c.plot_losses = ("elr+adadem",)
    c.checkpoint_every = 1
    for k, v in overrides.items():
        c[k] = v
    return c


def test_resume_after_interruption_gives_the_same_result(tmp_path, save_log):
    devices = jax.devices()[:1]
    reference = noisy_labels_lib.run(tiny_config(), str(tmp_path / "ref"), devices=devices)
    full_saves = save_log.under(tmp_path / "ref")
    save_log.start(interrupt_after=2)
    workdir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        noisy_labels_lib.run(tiny_config(), workdir, devices=devices)
    save_log.start()
    resumed = noisy_labels_lib.run(tiny_config(), workdir, devices=devices)
    assert save_log.under(workdir) == full_saves[2:], (
        "the resumed run must redo only what was not checkpointed")

    for k in ("best_per_seed", "final_per_seed", "final_noisy_fit_mean",
              "final_clean_accuracy_mean"):
        assert (resumed["rows"]["elr+adadem"]["symmetric:0.4"][k]
                == reference["rows"]["elr+adadem"]["symmetric:0.4"][k]), k
    ref_hist = reporting.read_json(os.path.join(
        tmp_path, "ref", "units", "symmetric_0.4", "elr+adadem", "seed0.json"))["history"]
    res_hist = reporting.read_json(os.path.join(
        workdir, "units", "symmetric_0.4", "elr+adadem", "seed0.json"))["history"]
    assert len(res_hist) == len(ref_hist) and res_hist == ref_hist, \
        "the resumed history must equal the uninterrupted one, epoch by epoch"
    noise = resumed["noise"]["symmetric:0.4"]
    assert 0.3 < noise["realised_rate"] < 0.5
    np.testing.assert_allclose(np.sum(noise["transition"], axis=1), 1.0, atol=1e-3)
    for name in ("results.json", "results.md", "memorisation.png", "metrics.jsonl"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert "realised noise rate" in open(os.path.join(workdir, "results.md")).read()


@pytest.mark.parametrize("overrides, match", [
    (dict(losses=("ce", "mae")), "Unknown noisy-label loss 'mae'"),
    (dict(losses=("ce+vat",), plot_losses=()), "Unknown noisy-label loss"),
    (dict(noise=("uniform:0.4",)), "Bad noise setting 'uniform:0.4'"),
    (dict(noise=("symmetric:1.2",)), "rate must be in"),
    (dict(noise=("symmetric",)), "Bad noise setting"),
    (dict(batch_size=12), "not divisible by the 8 devices"),
    (dict(lam=-1.0), "lam"),
    (dict(seeds=()), "seeds is empty"),
    (dict(asymmetric_mapping="mnsit"), "Unknown asymmetric_mapping 'mnsit'"),
    (dict(data="fashion_mnist", noise=("asymmetric:0.4",)), "flips of mnist, not of data='fashion"),
])
def test_bad_configs_give_clear_errors(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        noisy_labels_lib.run(tiny_config(**overrides), str(tmp_path))


def test_missing_data_gives_a_clear_error_and_does_not_lock_the_workdir(tmp_path):
    c = noisy_fashion_mnist.get_config()
    c.data_dir = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        noisy_labels_lib.run(c, str(tmp_path / "work"))
    # The corrected run may use the same directory: nothing was stamped.
    assert not os.path.exists(tmp_path / "work" / "config.json")
    reporting.claim_workdir(str(tmp_path / "work"), noisy_fashion_mnist.get_config())


def test_noisy_labels_keep_the_clean_labels(setup):
    train, noise, *_ = setup
    assert np.array_equal(train.labels, data.load("digits", "train").labels)
    np.testing.assert_array_equal(noise.is_noisy, noise.noisy != train.labels)
