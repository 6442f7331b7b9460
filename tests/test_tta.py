"""Test-time adaptation engine: methods x losses, devices, resume, DEM*, filters, configs.

Everything runs on 8x8 digits with a tiny CNN so that compiles stay cheap.
"""

import dataclasses
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import data
from dem_jax import losses
from dem_jax.tasks.tta import methods
from dem_jax.tasks import objectives
from dem_jax.tasks.tta import protocol
from dem_jax.engine import parallel
from dem_jax.engine import partition
from dem_jax.engine import train as train_lib

TINY = (("hidden", 8), ("width", 4))
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture(scope="module")
def source(digits, tmp_path_factory):
    """A tiny source model trained for one epoch (about a second)."""
    train, test = digits
    cfg = train_lib.SourceConfig(model="cnn", model_kwargs=TINY, epochs=1, batch_size=64)
    variables = train_lib.train_source(train, test, cfg, str(tmp_path_factory.mktemp("src")))
    model = train_lib.build_model("cnn", NUM_CLASSES, TINY)
    return model, variables


def domain(test, name="gaussian_noise", n=96):
    ds = data.corrupt_dataset(test.subset(np.arange(n)), name, 5, seed=0)
    return protocol.Domain(name, ds.images, ds.labels)


def half_margin(model, variables, images):
    """An `e_margin` that lets about half of the first batch through the entropy filter.

    `images`: one batch. The entropy is the one the filters see (BatchNorm on
    the batch's statistics); at the default margin (0.4) this tiny source model
    would select no sample and ETA/EATA/SAR would never update.
    """
    def apply(x):  # one "device", so that BatchNorm's cross-device mean is bound
        return model.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    logits = jax.vmap(apply, axis_name=parallel.AXIS)(images[None])[0]
    return float(np.median(losses.entropy(logits))) / np.log(NUM_CLASSES)


def reference_entropies(model, state, trainable, x):
    """The entropy of each image with BatchNorm on the batch, written plainly (no dem_jax loss)."""
    params = partition.merge(trainable, state.frozen)
    logits = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                         train=True, mutable=["batch_stats"])[0]
    return -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)


def tree_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
               if jnp.issubdtype(x.dtype, jnp.floating))


# Every loss with Tent, every method with one loss (the loss plug-in is the same
# code for every method): the full product would compile 49 programs.
METHOD_LOSS = ([("tent", loss) for loss in objectives.LOSSES]
               + [("noadapt", "em"), ("bn", "em"), ("eta", "adadem"), ("eata", "dem"),
                  ("sar", "adadem_mec"), ("deyo", "adadem")])


@pytest.mark.parametrize("method,loss", METHOD_LOSS)
def test_every_method_and_every_loss_runs(source, digits, method, loss):
    model, variables = source
    images, labels = protocol.stream(domain(digits[1], n=64), 0, 0, 16)
    filters = method in methods.FILTER_METHODS
    margin = half_margin(model, variables, images[0]) if filters else 0.4
    cfg = methods.AdaptConfig(method=method, loss=loss, fisher_alpha=1.0, e_margin=margin,
                              deyo_margin=margin, plpd_threshold=-1.0, d_margin=2.0)
    fisher = (methods.compute_fisher(model, variables, digits[0].images[:64], batch_size=32)
              if method == "eata" else None)
    state = methods.init_state(variables, cfg, NUM_CLASSES, lr=0.05, tau=1.3, alpha=0.8,
                               fisher=fisher)
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(state, images, labels)
    acc = protocol.accuracy(metrics)
    assert 0.0 <= acc <= 1.0
    assert tree_finite(new), f"{method}+{loss}: state became non-finite"
    if filters:
        selected = float(np.sum(metrics["selected"]))
        assert 0 < selected < labels.size, (
            f"{method}+{loss}: the filter selected {selected:.0f} of {labels.size} samples; "
            "the test needs some but not all, or the filtered update goes untested")
    moved = any(bool(jnp.any(a != b)) for a, b in
                zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable)))
    assert moved == cfg.updates, (
        f"{method}+{loss}: parameters {'did not move' if cfg.updates else 'moved'}")
    if objectives.uses_mec(loss) and cfg.updates:
        assert bool(jnp.any(new.mec != state.mec)), f"{method}+{loss}: MEC never updated"


def test_tent_trains_only_normalisation_affine_parameters(source):
    model, variables = source
    state = methods.init_state(variables, methods.AdaptConfig(), NUM_CLASSES, lr=0.1)
    names = {"/".join(k) for k in
             __import__("flax").traverse_util.flatten_dict(state.trainable)}
    assert names and all(n.split("/")[-1] in ("scale", "bias") and "BatchNorm" in n
                         for n in names), names


def test_filters_with_no_sample_passing_give_a_finite_zero_update(source, digits):
    model, variables = source
    for method in methods.FILTER_METHODS:
        cfg = methods.AdaptConfig(method=method, loss="adadem", e_margin=0.0, deyo_margin=0.0,
                                  optimizer="adam")
        state = methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1)
        runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
        images, labels = protocol.stream(domain(digits[1], n=32), 0, 0, 16)
        new, metrics = runner(state, images, labels)
        assert float(metrics["selected"].sum()) == 0.0
        assert tree_finite(new)
        chex.assert_trees_all_equal(new.trainable, state.trainable,
                                    custom_message=f"{method}: moved with no selected sample")
        chex.assert_trees_all_equal(new.mec, state.mec)


@pytest.mark.parametrize("method", ["eta", "eata"])
def test_eta_eata_step_equals_a_hand_written_reference(source, digits, method):
    """One SGD step: filter H < e_margin ln C, weights exp(-(H - margin)), Fisher term."""
    model, variables = source
    images, labels = protocol.stream(domain(digits[1], n=32), 0, 0, 32)
    margin = half_margin(model, variables, images[0])
    cfg = methods.AdaptConfig(method=method, loss="em", e_margin=margin, fisher_alpha=3.0)
    lr = 0.5
    probe = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr)
    fisher = jax.tree.map(lambda x: jnp.full_like(x, 0.02), probe.trainable)
    state = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr,
                               fisher=fisher if method == "eata" else None)
    # Move the parameters off the anchor, so that the Fisher term has a gradient.
    state = state.replace(trainable=jax.tree.map(lambda x: x + 0.05, state.trainable))
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(state, images, labels)

    threshold = margin * np.log(NUM_CLASSES)

    def objective(trainable, x):
        h = reference_entropies(model, state, trainable, x)
        keep = jax.lax.stop_gradient(h) < threshold
        weight = jnp.exp(-(jax.lax.stop_gradient(h) - threshold))
        obj = jnp.sum(jnp.where(keep, weight * h, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
        if method == "eata":
            obj += 3.0 * sum(jnp.sum(f * (t - a) ** 2) for f, t, a in zip(
                jax.tree.leaves(fisher), jax.tree.leaves(trainable),
                jax.tree.leaves(state.anchor)))
        return obj, jnp.sum(keep)

    grads, kept = jax.vmap(jax.grad(objective, has_aux=True), in_axes=(None, 0),
                           axis_name=parallel.AXIS)(state.trainable, images[:1])
    grads = jax.tree.map(lambda g: g[0], grads)
    assert 0 < int(kept[0]) < labels.size and float(metrics["selected"].sum()) == int(kept[0])
    expected = jax.tree.map(lambda t, g: t - lr * g, state.trainable, grads)
    chex.assert_trees_all_close(new.trainable, expected, atol=1e-5, rtol=1e-4,
                                custom_message=f"{method}: step differs from the reference")


def test_sar_step_equals_a_hand_written_reference(source, digits):
    """SAR: filtered gradient, ascent to theta + rho g/|g|, filtered gradient there."""
    model, variables = source
    images, labels = protocol.stream(domain(digits[1], n=32), 0, 0, 32)
    margin = half_margin(model, variables, images[0])
    cfg = methods.AdaptConfig(method="sar", loss="em", e_margin=margin, sar_rho=0.5)
    lr = 0.5
    state = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr)
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(state, images, labels)
    threshold = margin * np.log(NUM_CLASSES)

    def objective(trainable, x, keep_before):
        h = reference_entropies(model, state, trainable, x)
        keep = (jax.lax.stop_gradient(h) < threshold) & keep_before
        return jnp.sum(jnp.where(keep, h, 0.0)) / jnp.maximum(jnp.sum(keep), 1), keep

    def step(trainable, x):
        everyone = jnp.ones(x.shape[0], bool)
        g1, keep1 = jax.grad(objective, has_aux=True)(trainable, x, everyone)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g1)))
        perturbed = jax.tree.map(lambda t, g: t + 0.5 / norm * g, trainable, g1)
        g2, keep2 = jax.grad(objective, has_aux=True)(perturbed, x, keep1)
        return jax.tree.map(lambda t, g: t - lr * g, trainable, g2), keep1, keep2

    expected, keep1, keep2 = jax.vmap(step, in_axes=(None, 0), axis_name=parallel.AXIS)(
        state.trainable, images[:1])
    assert 0 < int(keep2.sum()) <= int(keep1.sum()) < labels.size
    assert float(metrics["selected"].sum()) == int(keep2.sum())
    chex.assert_trees_all_close(new.trainable, jax.tree.map(lambda x: x[0], expected),
                                atol=1e-5, rtol=1e-4,
                                custom_message="SAR step differs from the reference")


@pytest.mark.parametrize("method,loss", [("tent", "adadem"), ("eata", "adadem"),
                                         ("sar", "em"), ("deyo", "adadem"), ("bn", "em")])
def test_eight_devices_equal_one_device_on_the_global_batch(source, digits, method, loss):
    """BatchNorm statistics, the MEC and the filters are global across devices."""
    model, variables = source
    images, labels = protocol.stream(domain(digits[1], n=96), 0, 0, 32)
    margin = half_margin(model, variables, images[0])
    cfg = methods.AdaptConfig(method=method, loss=loss, fisher_alpha=1.0, e_margin=margin,
                              deyo_margin=margin, plpd_threshold=0.0, d_margin=2.0,
                              optimizer="sgd_momentum")
    fisher = jax.tree.map(lambda x: jnp.full_like(x, 0.01),
                          methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1).trainable)
    state = methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1, fisher=fisher)
    out = {}
    for name, devices, backend in (("1 device", jax.devices()[:1], "pmap"),
                                   ("8 devices pmap", jax.devices()[:8], "pmap"),
                                   ("8 devices shard_map", jax.devices()[:8], "shard_map")):
        runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=devices, backend=backend)
        out[name] = runner(state, images, labels)
    ref_state, ref_metrics = out["1 device"]
    if method in ("eata", "sar", "deyo"):
        selected = float(np.sum(ref_metrics["selected"]))
        assert 0 < selected < labels.size, (
            f"{method}: the filter selected {selected:.0f} of {labels.size} samples; the "
            "global filter is only tested when it selects some but not all")
    if method != "bn":
        assert any(bool(jnp.any(a != b)) for a, b in zip(
            jax.tree.leaves(ref_state.trainable), jax.tree.leaves(state.trainable))), \
            f"{method}+{loss}: no update, so the comparison below would be vacuous"
    for name in ("8 devices pmap", "8 devices shard_map"):
        new, metrics = out[name]
        chex.assert_trees_all_close(new.trainable, ref_state.trainable, atol=1e-5, rtol=1e-4,
                                    custom_message=f"{method}+{loss}: {name} != 1 device")
        chex.assert_trees_all_close(new.opt_state, ref_state.opt_state, atol=1e-5, rtol=1e-4,
                                    custom_message=f"optimizer state: {name} != 1 device")
        chex.assert_trees_all_close(new.mec, ref_state.mec, atol=1e-6,
                                    custom_message=f"MEC: {name} != 1 device")
        chex.assert_trees_all_close(new.ema_probs, ref_state.ema_probs, atol=1e-6)
        chex.assert_trees_all_close(
            (new.ema_loss, new.ema_loss_valid, new.ema_probs_valid),
            (ref_state.ema_loss, ref_state.ema_loss_valid, ref_state.ema_probs_valid),
            atol=1e-6, custom_message=f"EATA/SAR moving averages: {name} != 1 device")
        np.testing.assert_array_equal(metrics["correct"], ref_metrics["correct"])
        np.testing.assert_array_equal(metrics["preds"], ref_metrics["preds"])


def test_adaptation_batch_not_divisible_by_devices_is_a_clear_error(source, digits):
    model, variables = source
    cfg = methods.AdaptConfig()
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:8])
    images, labels = protocol.stream(domain(digits[1], n=60), 0, 0, 30)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        runner(methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1), images, labels)


def test_domain_smaller_than_one_batch_is_a_clear_error(digits):
    with pytest.raises(ValueError, match="fewer than one adaptation batch of 30"):
        protocol.stream(domain(digits[1], n=20), 0, 0, 30)


def test_dem_grid_is_the_whole_square_or_prop_a1s_region():
    grid = protocol.dem_grid(0.1, 0.1)
    assert len(grid) == 20 * 21 and [1.3, 1.8] in np.round(grid.astype(float), 4).tolist()
    region = protocol.dem_grid(0.1, 0.1, prop_a1_only=True)
    assert np.all(losses.dem_valid(region[:, 0], region[:, 1])), "point outside Prop. A.1"
    assert len(region) == int(np.sum(losses.dem_valid(grid[:, 0], grid[:, 1])))


def test_continual_grid_search_equals_a_loop_of_units(source, digits):
    """DEM*'s vmapped continual search over several domains == one unit per grid point."""
    model, variables = source
    cfg = methods.AdaptConfig(loss="dem")
    grid = np.array([[0.5, 1.0], [1.3, 0.8], [2.0, 0.0]], np.float32)
    doms = [domain(digits[1], c, n=32) for c in ("gaussian_noise", "fog")]
    make = lambda: methods.init_state(variables, cfg, NUM_CLASSES, lr=0.5)
    vmapped = protocol.Runner(model, cfg, NUM_CLASSES, grid=True, devices=jax.devices()[:1])
    out = protocol.grid_search(vmapped, make, doms, field="tau_alpha", values=grid,
                               setting="continual", seed=0, batch_size=16,
                               chunk=2)  # 2 chunks, the last padded
    single = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    looped = [list(protocol.run_domains(single, make, doms, setting="continual", seed=0,
                                        batch_size=16, hyper_per_domain=[
                                            {"tau": t, "alpha": a}] * 2)["accuracy"].values())
              for t, a in grid]
    np.testing.assert_allclose(out["accuracy"], looped, atol=1e-6,
                               err_msg="vmapped continual search differs from a loop")
    chosen = protocol.dem_star_search(vmapped, make, doms, grid, setting="continual",
                                      batch_size=16, chunk=2)
    means = np.mean(looped, -1)
    tied = [i for i in range(len(grid)) if means[i] >= means.max() - 1e-9]
    best = min(tied, key=lambda i: float(np.abs(grid[i] - 1.0).sum()))  # ties: nearest EM
    assert {(h["tau"], h["alpha"]) for h in chosen} == {tuple(map(float, grid[best]))}, \
        "DEM* must choose one pair for every domain, the best mean over domains"


def test_continual_unit_resumes_to_the_same_result(source, digits, tmp_path, save_log):
    model, variables = source
    cfg = methods.AdaptConfig(loss="adadem")
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    make = lambda: methods.init_state(variables, cfg, NUM_CLASSES, lr=0.1)
    doms = [domain(digits[1], c, n=48) for c in ("gaussian_noise", "fog", "contrast")]
    kw = dict(setting="continual", seed=1, batch_size=16)
    full = protocol.run_domains(runner, make, doms, ckpt_dir=str(tmp_path / "a"), **kw)
    full_saves = save_log.under(tmp_path / "a")
    assert len(full_saves) == 3, f"one checkpoint per domain expected, got {full_saves}"

    save_log.start(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        protocol.run_domains(runner, make, doms, ckpt_dir=str(tmp_path / "b"), **kw)
    save_log.start()
    resumed = protocol.run_domains(runner, make, doms, ckpt_dir=str(tmp_path / "b"), **kw)
    assert resumed == full, "a resumed continual run must end with the same result"
    assert save_log.under(tmp_path / "b") == full_saves[2:], (
        "the resumed run must adapt only the domain that was not checkpointed")


def test_source_training_resumes_to_the_same_parameters(digits, tmp_path, save_log):
    train, _ = digits
    small = train.subset(np.arange(256))
    cfg = train_lib.SourceConfig(model="cnn", model_kwargs=TINY, epochs=3, batch_size=64)
    full = train_lib.train_source(small, None, cfg, str(tmp_path / "a"))
    full_saves = save_log.under(tmp_path / "a")
    save_log.start(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        train_lib.train_source(small, None, cfg, str(tmp_path / "b"))
    save_log.start()
    resumed = train_lib.train_source(small, None, cfg, str(tmp_path / "b"))
    chex.assert_trees_all_equal(resumed, full,
                                custom_message="resumed source training must be bit-identical")
    assert save_log.under(tmp_path / "b") == full_saves[2:], (
        f"the resumed run must train only the epochs after the checkpoint: saved "
        f"{save_log.under(tmp_path / 'b')}, expected {full_saves[2:]}")
    other = dataclasses.replace(cfg, learning_rate=0.1)
    with pytest.raises(ValueError, match="different configuration"):
        train_lib.train_source(small, None, other, str(tmp_path / "b"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="tent3"), "Unknown method"),
    (dict(loss="entropy2"), "Unknown loss"),
    (dict(optimizer="rmsprop"), "Unknown optimizer"),
    (dict(mec_momentum=0.0), "mec_momentum"),
])
def test_bad_adaptation_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        methods.AdaptConfig(**kwargs)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", "test", data_dir=str(tmp_path))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, state, trainable, x):
    """Logits with BatchNorm on the batch, for one device (x: `[1, B, ...]`)."""
    def f(t, xb):
        params = partition.merge(t, state.frozen)
        return model.apply({"params": params, "batch_stats": state.batch_stats}, xb,
                           train=True, mutable=["batch_stats"])[0]
    return jax.vmap(f, in_axes=(None, 0), axis_name=parallel.AXIS)(trainable, x)[0]


def _entropy(logits):
    return -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)


@functools.partial(jax.jit, static_argnums=0)
def _grad_of_mean(model, state, trainable, x, keep, weights=None):
    """Gradient of the (weighted) mean entropy over `keep`, written plainly."""
    def obj(t):
        h = _entropy(_apply(model, state, t, x))
        w = jnp.ones_like(h) if weights is None else weights
        return jnp.sum(jnp.where(keep, w * h, 0.0)) / jnp.maximum(jnp.sum(keep), 1)
    return jax.grad(obj)(trainable)


def _cut_in_half(values):
    """A threshold midway between the two middle values (no ties with rounding)."""
    v = np.sort(values)
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def _sgd(trainable, grads, lr):
    return jax.tree.map(lambda t, g: t - lr * g, trainable, grads)


@pytest.fixture(scope="module")
def four_batches(digits):
    return protocol.stream(domain(digits[1], n=96), 0, 0, 32)


def test_eata_redundancy_filter_and_moving_average_over_batches(source, four_batches):
    """EATA over 3 batches (the redundancy filter acts from the 2nd) vs a plain reference."""
    model, variables = source
    images, labels = four_batches
    margin = half_margin(model, variables, images[0])
    thr, lr = margin * np.log(NUM_CLASSES), 0.5

    def reference(d_margin, batches=len(images)):
        cfg = methods.AdaptConfig(method="eata", loss="em", optimizer="sgd", e_margin=margin)
        state = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr)
        t, ema, selected, cos_seen = state.trainable, None, [], []
        for b in range(batches):
            x = images[b][None]
            logits = _apply(model, state, t, x)
            h, p = _entropy(logits), jax.nn.softmax(logits)
            keep = h < thr
            if ema is not None:
                cos = p @ ema / (jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(ema))
                cos_seen.append(np.asarray(cos[keep]))
                keep = keep & (jnp.abs(cos) < d_margin)
            if int(keep.sum()):
                g = _grad_of_mean(model, state, t, x, keep, jnp.exp(-(h - thr)))
                t = _sgd(t, g, lr)
                mean = jnp.sum(jnp.where(keep[:, None], p, 0), 0) / keep.sum()
                ema = mean if ema is None else 0.9 * ema + 0.1 * mean
            selected.append(int(keep.sum()))
        return t, ema, selected, cos_seen

    _, _, _, cos_seen = reference(2.0, 2)  # the filter off: where it would cut
    d_margin = _cut_in_half(cos_seen[0])  # about half of batch 2 is redundant
    expected, ema, selected, _ = reference(d_margin)
    cfg = methods.AdaptConfig(method="eata", loss="em", optimizer="sgd", e_margin=margin,
                              d_margin=d_margin)
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(methods.init_state(variables, cfg, NUM_CLASSES, lr=lr), images,
                          labels)
    assert 0 < selected[1] < metrics["kept_entropy"][1], "batch 2's redundancy filter idle"
    np.testing.assert_array_equal(metrics["selected"], selected)
    chex.assert_trees_all_close(new.trainable, expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(new.ema_probs, ema, atol=1e-6)


def test_sar_moving_average_and_reset_over_batches(source, four_batches):
    """SAR over 3 batches with a threshold that resets after the 1st: vs a plain reference."""
    model, variables = source
    images, labels = four_batches
    margin = half_margin(model, variables, images[0])
    thr, lr, rho, log_c = margin * np.log(NUM_CLASSES), 0.5, 0.5, np.log(NUM_CLASSES)

    def reference(sar_reset):
        cfg = methods.AdaptConfig(method="sar", loss="em", optimizer="sgd", e_margin=margin)
        state = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr)
        t, ema, emas, resets = state.trainable, None, [], []
        for b in range(len(images)):
            x = images[b][None]
            keep1 = _entropy(_apply(model, state, t, x)) < thr
            g1 = _grad_of_mean(model, state, t, x, keep1)
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g1)))
            perturbed = jax.tree.map(lambda a, g: a + rho / norm * g, t, g1)
            h2 = _entropy(_apply(model, state, perturbed, x))
            keep2 = keep1 & (h2 < thr)
            if int(keep2.sum()):
                t = _sgd(t, _grad_of_mean(model, state, perturbed, x, keep2), lr)
                ent2 = float(jnp.sum(jnp.where(keep2, h2, 0)) / keep2.sum())
                ema = ent2 if ema is None else 0.9 * ema + 0.1 * ent2
            emas.append(ema)
            resets.append(int(ema is not None and ema < sar_reset * log_c))
            if resets[-1]:
                t, ema = state.anchor, None
        return t, emas, resets

    _, emas, _ = reference(0.0)
    assert min(emas[1:]) < emas[0], f"SAR's entropy average never fell: {emas}"
    sar_reset = (emas[0] + min(emas[1:])) / 2 / log_c
    expected, _, resets = reference(sar_reset)
    assert resets[0] == 0 and sum(resets) >= 1, resets
    cfg = methods.AdaptConfig(method="sar", loss="em", optimizer="sgd", e_margin=margin,
                              sar_rho=rho, sar_reset=sar_reset)
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(methods.init_state(variables, cfg, NUM_CLASSES, lr=lr), images,
                          labels)
    np.testing.assert_array_equal(metrics["resets"], resets)
    chex.assert_trees_all_close(new.trainable, expected, atol=1e-5, rtol=1e-4)


def test_deyo_filters_and_weights_over_batches(source, four_batches):
    """DeYO over 3 batches: entropy filter, PLPD filter on patch-shuffled views, weights."""
    model, variables = source
    images, labels = four_batches
    margin = half_margin(model, variables, images[0])
    lr, log_c, e0 = 0.5, np.log(NUM_CLASSES), 0.4 * np.log(NUM_CLASSES)

    def reference(plpd_threshold, batches=len(images)):
        cfg = methods.AdaptConfig(method="deyo", loss="em", optimizer="sgd")
        state = methods.init_state(variables, cfg, NUM_CLASSES, lr=lr)
        t, kept, selected, plpds = state.trainable, [], [], []
        for b in range(batches):
            x = images[b][None]
            logits = _apply(model, state, t, x)
            h, p = _entropy(logits), jax.nn.softmax(logits)
            view = methods.patch_shuffle(images[b], jax.random.fold_in(jax.random.key(0), b), 4)
            p_view = jax.nn.softmax(_apply(model, state, t, view[None]))
            yhat = jnp.argmax(p, -1)
            rows = jnp.arange(len(yhat))
            plpd = p[rows, yhat] - p_view[rows, yhat]
            keep1 = h < margin * log_c
            plpds.append(np.asarray(plpd[keep1]))
            keep = keep1 & (plpd > plpd_threshold)
            weights = jnp.exp(-(h - e0)) + jnp.exp(plpd)
            if int(keep.sum()):
                t = _sgd(t, _grad_of_mean(model, state, t, x, keep, weights), lr)
            kept.append(int(keep1.sum()))
            selected.append(int(keep.sum()))
        return t, kept, selected, plpds

    _, _, _, plpds = reference(-1.0, 1)
    threshold = _cut_in_half(plpds[0])
    expected, kept, selected, _ = reference(threshold)
    assert 0 < selected[0] < kept[0] < labels.shape[1], (selected, kept)
    cfg = methods.AdaptConfig(method="deyo", loss="em", optimizer="sgd", deyo_margin=margin,
                              plpd_threshold=threshold)
    runner = protocol.Runner(model, cfg, NUM_CLASSES, devices=jax.devices()[:1])
    new, metrics = runner(methods.init_state(variables, cfg, NUM_CLASSES, lr=lr), images,
                          labels)
    np.testing.assert_array_equal(metrics["kept_entropy"], kept)
    np.testing.assert_array_equal(metrics["selected"], selected)
    chex.assert_trees_all_close(new.trainable, expected, atol=1e-5, rtol=1e-4)


def test_patch_shuffle_permutes_whole_patches():
    x = jnp.arange(2 * 9 * 8 * 1, dtype=jnp.float32).reshape(2, 9, 8, 1)
    y = methods.patch_shuffle(x, jax.random.key(3), 4)
    np.testing.assert_array_equal(y[:, 8:], x[:, 8:])  # the row past the 4 x 2 grid stays
    patches = lambda a: sorted(map(tuple, np.asarray(a[:, :8]).reshape(2, 4, 2, 4, 2)
                                   .transpose(0, 1, 3, 2, 4).reshape(2, 16, 4)[0]))
    assert patches(y) == patches(x) and not np.array_equal(y, x)
