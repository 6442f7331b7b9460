"""The `folder:` data source: layout, class order, resizing, and each error naming its path."""

import os

import numpy as np
import pytest
from PIL import Image

from dem_jax.data import folder, sources


def _write(path, size=(10, 12), mode="L", value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


@pytest.fixture
def tree(tmp_path):
    """train: b (2 images), a (1), c (1); test: one each; grayscale PNG and JPEG."""
    root = tmp_path / "imgs"
    for split, counts in (("train", {"b": 2, "a": 1, "c": 1}), ("test", {"a": 1, "b": 1, "c": 1})):
        for cls, n in counts.items():
            for i in range(n):
                ext = ".jpg" if (cls, i) == ("c", 0) else ".png"
                _write(str(root / split / cls / f"{i}{ext}"), value=40 * (ord(cls) - 96))
    return root


def test_layout_and_sorted_class_order(tree):
    ds = sources.load(f"folder:{tree}", "train")
    assert ds.num_classes == 3
    assert ds.images.shape == (4, 32, 32, 1) and ds.images.dtype == np.float32
    assert ds.labels.tolist() == [0, 1, 1, 2]  # a, b, b, c: sorted folder names
    np.testing.assert_allclose(ds.images[0].mean(), 40 / 255, atol=1e-6)
    assert sources.load(f"folder:{tree}@8", "test").images.shape == (3, 8, 8, 1)


def test_rgb_when_any_image_is_colour(tree):
    _write(str(tree / "train" / "a" / "rgb.png"), mode="RGB")
    ds = folder.load_folder(f"folder:{tree}", "train")
    assert ds.images.shape[-1] == 3
    # Grayscale images become three equal channels.
    np.testing.assert_allclose(ds.images[0, ..., 0], ds.images[0, ..., 2])


def test_missing_split(tree):
    import shutil

    shutil.rmtree(tree / "test")
    with pytest.raises(FileNotFoundError, match=f"{tree / 'test'}: missing split"):
        folder.load_folder(f"folder:{tree}", "test")


def test_empty_class_folder(tree):
    os.makedirs(tree / "train" / "d")
    os.makedirs(tree / "test" / "d")
    with pytest.raises(ValueError, match=f"{tree / 'train' / 'd'}: empty class folder"):
        folder.load_folder(f"folder:{tree}", "train")


def test_unreadable_image(tree):
    bad = tree / "train" / "a" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{bad}: unreadable image"):
        folder.load_folder(f"folder:{tree}", "train")


def test_not_an_image_file(tree):
    (tree / "train" / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not a PNG or JPEG"):
        folder.load_folder(f"folder:{tree}", "train")


def test_classes_differ_between_splits(tree):
    os.rename(tree / "test" / "c", tree / "test" / "z")
    with pytest.raises(ValueError, match=r"differ between train and test: only in .*train: \['c'\]"
                                         r"; only in .*test: \['z'\]"):
        folder.load_folder(f"folder:{tree}", "train")


def test_missing_root_and_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        folder.load_folder(f"folder:{tmp_path / 'nope'}", "train")
    with pytest.raises(ValueError, match="no folder given"):
        folder.parse("folder:")
    assert folder.parse("folder:/a@b") == ("/a@b", folder.DEFAULT_SIZE)
