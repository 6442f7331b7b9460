"""Unsupervised domain adaptation: methods x losses, devices, resume, DEM*, configs.

Tiny CNN on digits -> digits_m (embedded data) so that compiles stay cheap.
"""

import chex
import jax
import numpy as np
import pytest

from dem_jax import losses
from dem_jax.tasks import objectives
from dem_jax.tasks.tta import protocol
from dem_jax.tasks import uda
from experiments import uda_lib
from experiments.configs import uda_default

TINY = {"hidden": 8, "width": 4}
ONE = jax.devices()[:1]


def tiny_config(**overrides):
    c = uda_default.get_config()
    c.model_kwargs = TINY
    c.source.epochs = 1
    c.batch_size = 16
    c.steps = 4
    c.eval_every = 2
    c.seeds = (0,)
    c.rows = ("source_only", "minent+adadem")
    c.dem_star.tau_step = 1.0
    c.dem_star.alpha_step = 1.0
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return uda_lib.PairExperiment(tiny_config(), str(tmp_path_factory.mktemp("uda")),
                                  "digits->digits_m", devices=ONE)


ALL_ROWS = (["source_only", "dann", "minent+dem_star"]
            + [f"{m}+{loss}" for m in ("minent", "dann", "shot_im") for loss in objectives.LOSSES])


@pytest.mark.parametrize("row", ALL_ROWS)
def test_every_method_with_every_loss_runs(exp, row):
    method, loss, _ = uda_lib.parse_row(row)
    state = exp.init_state(method, loss, 0, tau=1.3, alpha=0.8)
    new, metrics = exp.runner(method, loss).train(state, *exp.batches(0, 0, 2))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new.trainable))
    assert metrics["ce"].shape == (2,)
    moved = any(bool(np.any(a != b)) for a, b in zip(jax.tree.leaves(new.trainable),
                                                     jax.tree.leaves(state.trainable)))
    assert moved, f"{row}: parameters did not move"
    if method == "shot_im":  # the head is frozen, the rest trains
        assert "head" in new.frozen and "head" not in new.trainable["model"]
        assert float(metrics["div"][0]) > 0
    if loss is not None and objectives.uses_mec(loss):
        assert bool(np.any(new.mec != state.mec)), f"{row}: MEC never updated"
    acc = exp.runner(method, loss).accuracy(new, exp.scored, batch_size=64)
    assert 0.0 <= float(acc) <= 1.0


@pytest.mark.parametrize("row", ["minent+adadem", "shot_im+adadem", "dann+em"])
def test_eight_devices_equal_one_device_on_the_global_batch(exp, row):
    """After 3 steps: BatchNorm statistics, the MEC, the marginal entropy and DANN's BCE are global."""
    method, loss, _ = uda_lib.parse_row(row)
    state = exp.init_state(method, loss, 0)
    batches = exp.batches(0, 0, 3)  # three steps of 16 + 16 examples
    out = {}
    for name, devices, backend in (("1 device", ONE, "pmap"),
                                   ("8 devices pmap", jax.devices()[:8], "pmap"),
                                   ("8 devices shard_map", jax.devices()[:8], "shard_map")):
        runner = uda.Runner(exp.model, uda_lib.uda_config(exp.config, method, loss),
                            exp.num_classes, backend=backend, devices=devices)
        out[name] = runner.train(state, *batches)
    ref, ref_metrics = out["1 device"]
    for name in ("8 devices pmap", "8 devices shard_map"):
        new, metrics = out[name]
        chex.assert_trees_all_close(new.trainable, ref.trainable, atol=1e-5, rtol=1e-4,
                                    custom_message=f"{row}: {name} != 1 device")
        chex.assert_trees_all_close(new.batch_stats, ref.batch_stats, atol=1e-5, rtol=1e-4)
        chex.assert_trees_all_close(new.mec, ref.mec, atol=1e-6)
        for k in ref_metrics:
            np.testing.assert_allclose(metrics[k], ref_metrics[k], atol=1e-5, rtol=1e-4)


def test_gradient_reversal():
    g = jax.grad(lambda x: (uda.reverse_gradient(x, 0.5) * 3.0).sum())(np.ones(2, np.float32))
    np.testing.assert_allclose(g, [-1.5, -1.5])


def test_run_resumes_to_the_same_result(tmp_path, save_log):
    config = tiny_config(rows=("shot_im+adadem",), steps=6)
    full = uda_lib.run(config, str(tmp_path / "a"), devices=ONE)
    full_saves = save_log.under(tmp_path / "a")
    save_log.start(interrupt_after=3)  # source model, then two chunks of the first unit
    with pytest.raises(KeyboardInterrupt):
        uda_lib.run(config, str(tmp_path / "b"), devices=ONE)
    save_log.start()
    resumed = uda_lib.run(config, str(tmp_path / "b"), devices=ONE)
    assert save_log.under(tmp_path / "b") == full_saves[3:], (
        "the resumed run must redo only what was not checkpointed")
    assert resumed == full, "a resumed run must end with the same results"
    pair = full["digits->digits_m"]
    assert len(pair["rows"]["shot_im+adadem"]["curve_mean"]) == 4  # step 0 + 3 chunks
    for name in ("results.json", "results.md", "curves_digits-_digits_m.png", "metrics.jsonl"):
        assert (tmp_path / "a" / name).exists(), name


@pytest.mark.parametrize("overrides,match", [
    (dict(rows=("tent+em",)), "Unknown UDA method"),
    (dict(rows=("minent+entropy2",)), "Unknown loss"),
    (dict(rows=("minent",)), "Unknown row"),
    (dict(pairs=("digits->usps",)), "Unknown domain pair"),
    (dict(batch_size=12), "not divisible by the 8 devices"),
    (dict(steps=5), "multiple of config.eval_every"),
    (dict(optimizer="rmsprop"), "Unknown optimizer"),
    (dict(seeds=()), "seeds is empty"),
    (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
    (dict(size=-1), "size must be >= 0"),
    (dict(lr=0.0), "lr must be > 0"),
])
def test_bad_config_is_a_clear_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        uda_lib.validate(tiny_config(**overrides))  # all 8 devices


def test_uda_config_errors():
    with pytest.raises(ValueError, match="needs an entropy term"):
        uda.UDAConfig(method="minent", loss=None)
    with pytest.raises(ValueError, match="Unknown UDA method"):
        uda.UDAConfig(method="cdan")


def test_missing_data_is_a_clear_error(tmp_path):
    config = tiny_config(pairs=("fashion_mnist->fashion_mnist_m",),
                         data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fashion"):
        uda_lib.run(config, str(tmp_path / "w"), devices=ONE)


def test_vmapped_dem_star_grid_equals_one_point_at_a_time(exp):
    """The grid as one vmapped program == a plain (non-grid) program per point."""
    points = [(1.0, 0.0), (1.0, 1.0), (2.0, 1.0)]
    batches = exp.batches(0, 0, 2)
    grid_runner = exp.runner("minent", "dem", grid=True)
    stacked = protocol.stack_states([exp.init_state("minent", "dem", 0, tau=t, alpha=a)
                                     for t, a in points])
    stacked, _ = grid_runner.train(stacked, *batches)
    plain_runner = exp.runner("minent", "dem")
    trained = []
    for i, (t, a) in enumerate(points):
        state, _ = plain_runner.train(exp.init_state("minent", "dem", 0, tau=t, alpha=a),
                                      *batches)
        trained.append(state.trainable)
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], stacked.trainable), state.trainable,
            atol=1e-5, rtol=1e-4,
            custom_message=f"grid point {i} (tau={t}, alpha={a}) != the same point alone")
    for i in (1, 2):
        assert any(bool(np.any(np.abs(x - y) > 1e-4)) for x, y in zip(
            jax.tree.leaves(trained[0]), jax.tree.leaves(trained[i]))), (
            f"points 0 and {i} trained to the same parameters: (tau, alpha) had no effect")
    # The search itself: every point inside Prop. A.1, one accuracy per point.
    exp.config.dem_star.grid_chunk = 5
    found = uda_lib.dem_star_search(exp, "minent")
    assert len(found["grid_accuracy"]) == len(found["grid"]) == 5
    assert all(losses.dem_valid(t, a) for t, a in found["grid"])
    assert losses.dem_valid(found["tau"], found["alpha"])
