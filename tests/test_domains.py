"""Tests of dem_jax.data.domains on tiny fake data: blending, resizing, pairs, the picture."""

import os

import numpy as np
import pytest

from dem_jax.data import domains, sources
from dem_jax.data.sources import ArrayDataset


def strokes(n=6, size=12, seed=0):
    """Grayscale 'digits': a white bar on black, at random places."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 1), np.float32)
    for k in range(n):
        r, c = rng.integers(1, size - 4, 2)
        images[k, r : r + 4, c : c + 2] = 1.0
    return images


def fake(name, n, size, channels, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, channels)).astype(np.float32)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    return ArrayDataset(images, labels, num_classes, name)


# name -> (image size, channels) of the fakes; train and test differ in size.
FAKES = {
    "mnist": (28, 1),
    "fashion_mnist": (28, 1),
    "digits": (8, 1),
    "tfds:svhn_cropped": (32, 3),
    "tfds:mnist": (28, 1),
}


@pytest.fixture
def fake_sources(monkeypatch):
    calls = []

    def load(name, split="train", *, data_dir=None):
        calls.append((name, split, data_dir))
        size, channels = FAKES[name]
        return fake(name, 12 if split == "train" else 7, size, channels, seed=len(calls))

    monkeypatch.setattr(sources, "load", load)
    return calls


# ----------------------------------------------------------------------------- blending


def test_blend_shape_range_dtype():
    out = domains.blend_with_photos(strokes(), seed=0)
    assert out.shape == (6, 12, 12, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # size= resizes first (12 again, so that the tests build photo banks for 12 and 28 only).
    assert domains.blend_with_photos(strokes(size=8), seed=0, size=12).shape == (6, 12, 12, 3)


def test_blend_is_deterministic_per_seed_and_differs_across_seeds():
    images = strokes()
    a = domains.blend_with_photos(images, seed=3)
    np.testing.assert_array_equal(a, domains.blend_with_photos(images, seed=3))
    b = domains.blend_with_photos(images, seed=4)
    assert np.abs(a - b).mean() > 0.05


def test_blend_differs_from_source_and_is_abs_difference():
    images = strokes()
    out = domains.blend_with_photos(images, seed=0)
    assert np.abs(out - images).mean() > 0.15, "the blended domain must look different"
    # |photo - digit|: where the digit is 0 the crop shows through, where it is 1 the
    # crop is inverted, so (background + stroke) sums to 1 for the same crop pixel.
    flipped = domains.blend_with_photos(1.0 - images, seed=0)
    np.testing.assert_allclose(out + flipped, 1.0, atol=1e-6)


def test_blend_gives_each_image_its_own_crop():
    out = domains.blend_with_photos(np.zeros((8, 12, 12, 1), np.float32), seed=0)
    means = out.reshape(8, -1).mean(1)
    assert len(np.unique(means.round(5))) == 8


def test_blend_does_not_modify_input():
    images = strokes(size=8)
    copy = images.copy()
    domains.blend_with_photos(images, seed=0, size=12)
    np.testing.assert_array_equal(images, copy)


@pytest.mark.parametrize("images,error,match", [
    (np.zeros((2, 12, 12, 3), np.float32), ValueError, "grayscale"),
    (np.zeros((12, 12, 1), np.float32), ValueError, r"\[N, H, W, C\]"),
    (np.zeros((2, 12, 12, 1), np.uint8), TypeError, "floating"),
    (np.full((2, 12, 12, 1), 255.0, np.float32), ValueError, r"\[0, 1\]"),
])
def test_blend_bad_input(images, error, match):
    with pytest.raises(error, match=match):
        domains.blend_with_photos(images, seed=0)


def test_photos_load_offline():
    bank, shapes = domains._photo_bank(12, 12)
    assert len(bank) == len(domains.PHOTOS) * len(domains.PHOTO_SCALES)
    assert shapes.min() >= 12 * min(domains.PHOTO_SCALES)
    assert 0.0 <= bank.min() and bank.max() <= 1.0


# ----------------------------------------------------------------------------- resize / rgb


def test_resize_shapes_dtype_and_range():
    x = np.random.default_rng(0).random((3, 8, 8, 1)).astype(np.float64)
    for size in (28, 8, 5, 1):
        out = domains.resize(x, size)
        assert out.shape == (3, size, size, 1) and out.dtype == np.float32
        assert out.min() >= x.min() and out.max() <= x.max()
    rgb = domains.resize(np.ones((2, 28, 28, 3), np.float32), 32)
    np.testing.assert_allclose(rgb, 1.0)


def test_resize_matches_jax_linear_antialiased():
    import jax

    x = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
    for size in (28, 5):
        expected = jax.image.resize(x, (2, size, size, 3), "linear", antialias=True)
        np.testing.assert_allclose(domains.resize(x, size), np.asarray(expected), atol=1e-5)


def test_resize_shrink_averages_instead_of_aliasing():
    checker = (np.indices((28, 28)).sum(0) % 2).astype(np.float32)[None, :, :, None]
    np.testing.assert_allclose(domains.resize(checker, 7), 0.5, atol=0.05)


def test_to_rgb():
    x = strokes(2)
    rgb = domains.to_rgb(x)
    assert rgb.shape == (2, 12, 12, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb[..., 2], x[..., 0])
    np.testing.assert_array_equal(domains.to_rgb(rgb), rgb)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        domains.to_rgb(np.zeros((1, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="size"):
        domains.resize(x, 0)


# ----------------------------------------------------------------------------- pairs


@pytest.mark.parametrize("pair,size,channels", [
    ("mnist->mnist_m", 28, 3),
    ("fashion_mnist->fashion_mnist_m", 28, 3),
    ("digits->mnist", 28, 1),
    ("mnist->digits", 28, 1),
    ("digits->digits_m", 16, 3),
    ("tfds:svhn_cropped->tfds:mnist", 32, 3),
])
def test_load_pair_shapes_match(fake_sources, pair, size, channels):
    source, target = domains.load_pair(pair, data_dir="/fake")
    assert (source.name, target.name) == tuple(pair.split("->"))
    for domain in (source, target):
        for ds, n in ((domain.train, 12), (domain.test, 7)):
            assert ds.images.shape == (n, size, size, channels), (domain.name, ds.images.shape)
            assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
            assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
            assert ds.num_classes == 10 and ds.name == domain.name
    assert {call[2] for call in fake_sources} == {"/fake"}
    assert len(fake_sources) == len(set(fake_sources)), "each (data set, split) loads once"
    assert {call[1] for call in fake_sources} == {"train", "test"}


def test_load_pair_common_size(fake_sources):
    source, target = domains.load_pair("digits->mnist", size=16)
    assert source.train.images.shape[1:] == target.test.images.shape[1:] == (16, 16, 1)


def test_blended_target_is_its_source_split_blended(fake_sources, monkeypatch):
    grey = {split: strokes(5, 28, seed=i) for i, split in enumerate(sources.SPLITS)}
    monkeypatch.setattr(sources, "load", lambda name, split="train", *, data_dir=None:
                        ArrayDataset(grey[split], np.arange(5, dtype=np.int32), 10, name))
    source, target = domains.load_pair("mnist->mnist_m", seed=1)
    np.testing.assert_array_equal(source.train.images[..., 0], grey["train"][..., 0])
    np.testing.assert_array_equal(target.train.labels, source.train.labels)
    assert np.abs(target.test.images - source.test.images).mean() > 0.15
    again = domains.load_pair("mnist->mnist_m", seed=1)[1]
    np.testing.assert_array_equal(again.train.images, target.train.images)
    other = domains.load_pair("mnist->mnist_m", seed=2)[1]
    assert np.abs(other.train.images - target.train.images).mean() > 0.05
    # Train and test draw different crops: the same digits blend differently.
    monkeypatch.setattr(sources, "load", lambda name, split="train", *, data_dir=None:
                        ArrayDataset(grey["train"], np.arange(5, dtype=np.int32), 10, name))
    same_digits = domains.load_pair("mnist->mnist_m", seed=1)[1]
    assert np.abs(same_digits.train.images - same_digits.test.images).mean() > 0.05


def test_load_pair_errors(fake_sources):
    with pytest.raises(ValueError, match="Unknown domain pair.*mnist->mnist_m"):
        domains.load_pair("mnist->usps")
    with pytest.raises(ValueError, match="size"):
        domains.load_pair("mnist->digits", size=0)


def test_load_pair_mismatched_classes(monkeypatch):
    monkeypatch.setattr(sources, "load", lambda name, split="train", *, data_dir=None:
                        fake(name, 4, 28, 1, num_classes=10 if name == "mnist" else 5))
    with pytest.raises(ValueError, match="do not match"):
        domains.load_pair("mnist->digits")


def test_plot_pairs_skips_missing_data(monkeypatch, tmp_path, capsys):
    def load(name, split="train", *, data_dir=None):
        if name == "fashion_mnist":
            raise FileNotFoundError("No fashion_mnist train data found.")
        return fake(name, 12, FAKES[name][0], 1)

    monkeypatch.setattr(sources, "load", load)
    out = tmp_path / "domains.png"
    skipped = domains.plot_pairs(str(out), per_domain=4)
    assert skipped == ["fashion_mnist->fashion_mnist_m"]
    assert "skipping fashion_mnist->fashion_mnist_m" in capsys.readouterr().out
    assert os.path.getsize(out) > 1000


def test_real_digits_with_fake_mnist(monkeypatch):
    real_load = sources.load  # scikit-learn's digits ship with the wheel

    def load(name, split="train", *, data_dir=None):
        if name == "mnist":
            return fake(name, 9, 28, 1)
        return real_load(name, split, data_dir=data_dir)

    monkeypatch.setattr(sources, "load", load)
    source, target = domains.load_pair("digits->mnist")
    assert source.train.images.shape == (1347, 28, 28, 1)
    assert source.test.images.shape == (450, 28, 28, 1)
    assert target.train.images.shape == (9, 28, 28, 1)
    # Upsampling keeps the digits' intensity range and their mean brightness.
    original = real_load("digits", "test")
    assert abs(source.test.images.mean() - original.images.mean()) < 0.02
