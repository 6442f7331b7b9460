"""Tests of dem_jax.data.noise: realised rates, transition matrices, determinism, errors."""

import numpy as np
import pytest

from dem_jax.data import noise
from dem_jax.data.noise import corrupt_labels

N, C = 5_000, 10


def clean_labels(n=N, num_classes=C, seed=0):
    return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


def within_sigmas(realised, p, n, k=4.0):
    return abs(realised - p) <= k * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.6, 0.8])
def test_symmetric_rate_and_transition(rate):
    y = clean_labels()
    out = corrupt_labels(y, C, kind="symmetric", rate=rate, seed=1)
    assert within_sigmas(out.realised_rate, rate, N), (out.realised_rate, rate)
    assert out.noisy.dtype == np.int32 and out.noisy.shape == (N,)
    assert out.is_noisy.dtype == bool
    np.testing.assert_array_equal(out.is_noisy, out.noisy != y)
    assert out.realised_rate == pytest.approx(out.is_noisy.mean())
    t = out.transition
    assert t.shape == (C, C)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-12)
    # Diagonal 1 - rate; every off-diagonal entry rate / (C - 1), none of them empty.
    per_class = np.bincount(y, minlength=C)
    for i in range(C):
        assert within_sigmas(1 - t[i, i], rate, per_class[i]), (i, t[i, i])
    off = t[~np.eye(C, dtype=bool)]
    assert off.min() > 0
    np.testing.assert_allclose(off.mean(), rate / (C - 1), rtol=0.05)


def test_symmetric_flip_never_keeps_the_class():
    y = clean_labels()
    out = corrupt_labels(y, C, kind="symmetric", rate=0.5, seed=2)
    assert (out.is_noisy == (out.noisy != y)).all()
    # Among the flipped labels each other class is equally likely (chi-square-ish bound).
    shift = (out.noisy[out.is_noisy] - y[out.is_noisy]) % C
    counts = np.bincount(shift, minlength=C)
    assert counts[0] == 0
    expected = out.is_noisy.sum() / (C - 1)
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_asymmetric_cyclic_rate_and_transition():
    y = clean_labels()
    out = corrupt_labels(y, C, kind="asymmetric", rate=0.4, seed=3)
    assert within_sigmas(out.realised_rate, 0.4, N), out.realised_rate
    np.testing.assert_array_equal(out.mapping, (np.arange(C) + 1) % C)
    t = out.transition
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-12)
    allowed = np.eye(C, dtype=bool) | (np.arange(C)[None, :] == out.mapping[:, None])
    assert np.all(t[~allowed] == 0), "asymmetric noise may only flip along the mapping"
    np.testing.assert_array_equal(out.noisy[out.is_noisy], out.mapping[y[out.is_noisy]])


@pytest.mark.parametrize("name", ["mnist", "cifar10", "fashion_mnist"])
def test_asymmetric_named_mappings(name):
    y = clean_labels()
    out = corrupt_labels(y, C, kind="asymmetric", rate=0.4, seed=4, mapping=name)
    mapping = np.asarray(noise.MAPPINGS[name])
    np.testing.assert_array_equal(out.mapping, mapping)
    flipping = mapping != np.arange(C)
    share = flipping[y].mean()  # only these classes flip
    assert within_sigmas(out.realised_rate, 0.4 * share, N)
    t = out.transition
    np.testing.assert_allclose(np.diag(t)[~flipping], 1.0)
    allowed = np.eye(C, dtype=bool) | (np.arange(C)[None, :] == mapping[:, None])
    assert np.all(t[~allowed] == 0)
    assert np.all(t[flipping, mapping[flipping]] > 0.3)


def test_fashion_mnist_mapping_is_a_set_of_swaps():
    m = np.asarray(noise.MAPPINGS["fashion_mnist"])
    np.testing.assert_array_equal(m[m], np.arange(C))  # an involution: pairs swap
    assert {(0, 6), (2, 4), (5, 7)} <= {tuple(sorted((i, int(m[i])))) for i in range(C)}


def test_explicit_mapping_and_absent_class_row():
    y = np.array([0, 0, 1, 1, 2, 2] * 100, np.int32)  # class 3 absent
    out = corrupt_labels(y, 4, kind="asymmetric", rate=0.3, seed=5, mapping=[2, 1, 0, 3])
    assert not out.is_noisy[y == 1].any()
    np.testing.assert_array_equal(out.transition[3], [0, 0, 0, 1])
    np.testing.assert_allclose(out.transition.sum(1), 1.0)


def test_deterministic_from_seed():
    y = clean_labels()
    for kind in noise.KINDS:
        a = corrupt_labels(y, C, kind=kind, rate=0.4, seed=7)
        b = corrupt_labels(y, C, kind=kind, rate=0.4, seed=7)
        c = corrupt_labels(y, C, kind=kind, rate=0.4, seed=8)
        np.testing.assert_array_equal(a.noisy, b.noisy)
        np.testing.assert_array_equal(a.transition, b.transition)
        assert (a.noisy != c.noisy).any()


def test_rate_zero_is_identity():
    y = clean_labels()
    out = corrupt_labels(y, C, kind="symmetric", rate=0.0, seed=0)
    np.testing.assert_array_equal(out.noisy, y)
    np.testing.assert_array_equal(out.transition, np.eye(C))
    assert out.realised_rate == 0.0


def test_input_and_stored_clean_labels_are_untouched():
    y = clean_labels()
    y.flags.writeable = True
    copy = y.copy()
    stored = {"clean": y}  # clean labels kept elsewhere, e.g. in an ArrayDataset
    out = corrupt_labels(y, C, kind="symmetric", rate=0.6, seed=9)
    np.testing.assert_array_equal(y, copy)
    np.testing.assert_array_equal(stored["clean"], copy)
    assert not np.shares_memory(out.noisy, y)
    out.noisy[:] = 0  # writing the result leaves the clean labels alone
    np.testing.assert_array_equal(y, copy)
    # Read-only input works too (nothing is written to it).
    y.flags.writeable = False
    corrupt_labels(y, C, kind="asymmetric", rate=0.6, seed=9)


def test_result_is_frozen():
    out = corrupt_labels(clean_labels(100), C, kind="symmetric", rate=0.2, seed=0)
    with pytest.raises(AttributeError):
        out.rate = 0.5


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(kind="uniform", rate=0.2), ValueError, "Unknown noise kind"),
    (dict(kind="symmetric", rate=1.0), ValueError, r"\[0, 1\)"),
    (dict(kind="symmetric", rate=-0.1), ValueError, r"\[0, 1\)"),
    (dict(kind="symmetric", rate=40), ValueError, r"\[0, 1\)"),
    (dict(kind="symmetric", rate="0.4"), ValueError, r"\[0, 1\)"),
    (dict(kind="symmetric", rate=0.2, mapping="mnist"), ValueError, "asymmetric"),
    (dict(kind="asymmetric", rate=0.2, mapping="svhn"), ValueError, "Unknown mapping"),
    (dict(kind="asymmetric", rate=0.2, mapping=[1, 0]), ValueError, "10 integer class"),
    (dict(kind="asymmetric", rate=0.2, mapping=list(range(1, 11))), ValueError, r"\[0, 10\)"),
    (dict(kind="symmetric", rate=0.2, seed=1.5), TypeError, "seed"),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        corrupt_labels(clean_labels(50), C, **kwargs)


@pytest.mark.parametrize("labels,num_classes,error,match", [
    (np.array([0.0, 1.0]), C, TypeError, "integers"),
    (np.array([[0, 1]]), C, ValueError, "1-D"),
    (np.array([0, 10]), C, ValueError, r"\[0, 10\)"),
    (np.array([-1, 0]), C, ValueError, r"\[0, 10\)"),
    (np.array([0, 1]), 1, ValueError, "num_classes"),
    (np.array([0, 1]), 4, ValueError, "is for 10 classes"),
])
def test_bad_labels(labels, num_classes, error, match):
    mapping = "mnist" if match == "is for 10 classes" else None
    with pytest.raises(error, match=match):
        corrupt_labels(labels, num_classes, kind="asymmetric", rate=0.2, seed=0, mapping=mapping)
