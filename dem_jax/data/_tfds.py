"""TensorFlow Datasets through tfds' random-access data source (no TensorFlow needed).

`load("tfds:<name>", split, data_dir=...)` lands here. The data set is read with
`builder.as_data_source` (what `tfds.data_source` calls) from an `array_record`-prepared
copy; when none is prepared it is downloaded and prepared in `array_record` format first
(needs the internet; without it tfds retries for a few minutes before the error).

What needs TensorFlow (`pip install tensorflow-cpu`, about 1.4 GB): *preparing* data
sets whose builders encode images from arrays (cifar10, cifar10_corrupted,
imagenet2012_corrupted, ...), and reading copies prepared in the `tfrecord` format.
Reading an `array_record` copy needs only `pip install "dem_jax[tfds]"`, encoded images
included (tfds decodes them with PIL or OpenCV). So a copy prepared on a machine with
TensorFlow (`tfds build cifar10 --file_format=array_record`) reads anywhere.

Splits: our `"train"` / `"test"` are tfds' `"train"` / `"test"`; where a data set has no
`"test"` but a `"validation"` split (imagenet2012_corrupted), `"test"` reads `"validation"`.
`cifar10_corrupted` and `imagenet2012_corrupted` have no `"train"` split. Any other tfds
split string (`"test[:1000]"`, `"validation"`) is passed through.

Examples come in the order of the prepared files (tfds fixes it when preparing).
Images `uint8 [H, W, C]` become float32 / 255; labels become int32. The whole split is
held in memory as float32: imagenet2012_corrupted's 50,000 224x224 images would take
30 GB, so take a slice (`"test[:5000]"`).
"""

from __future__ import annotations

import numpy as np

from dem_jax.data.sources import ArrayDataset

_PIP_TFDS = 'pip install "dem_jax[tfds]"  (tensorflow-datasets, array_record, importlib_resources)'
_NEEDS_TF = (
    "{name!r} needs TensorFlow, which is not installed: {error}.\n"
    "TensorFlow encodes images while a data set is prepared, and reads tfrecord files. "
    "Either `pip install tensorflow-cpu`, or prepare the data set on a machine with "
    "TensorFlow (`tfds build {name} --file_format=array_record --data_dir=DIR`) and pass "
    "data_dir=DIR here: reading array_record files needs no TensorFlow."
)
_READ_CHUNK = 1024


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"'tfds:' data sources need tensorflow-datasets: {_PIP_TFDS}. ({e})") from e
    return tfds


def _is_missing_tensorflow(error: BaseException) -> bool:
    if not isinstance(error, ImportError):
        return False
    return getattr(error, "name", None) == "tensorflow" or "no module named 'tensorflow'" in str(error).lower()


def load_tfds(name: str, split: str, *, data_dir: str | None = None) -> ArrayDataset:
    """Loads a whole tfds split as an `ArrayDataset` named `"tfds:<name>"` (see the module doc)."""
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"tfds has no data set {name!r} (see tfds.list_builders()).\n{e}") from e
    if not builder.is_prepared():
        _prepare(builder, name)
    tfds_split = _tfds_split(split, list(builder.info.splits.keys()), name)
    try:
        source = builder.as_data_source(split=tfds_split)
    except NotImplementedError as e:  # a tfrecord copy: no random access
        raise ValueError(
            f"{name!r} in {builder.data_dir} is prepared as {builder.info.file_format}, which "
            f"tfds.data_source cannot read. Prepare it with file_format=array_record "
            f"(`tfds build {name} --file_format=array_record --data_dir=DIR`) into another "
            f"data_dir and pass that.\n{e}"
        ) from e
    images, labels = _read_all(source, name)
    label_feature = builder.info.features["label"]
    num_classes = getattr(label_feature, "num_classes", None)
    if num_classes is None:  # a plain Tensor label: the largest label seen decides
        num_classes = int(labels.max()) + 1 if labels.size else 0
    return ArrayDataset(images, labels, int(num_classes), f"tfds:{name}")


def _prepare(builder, name: str) -> None:
    try:
        builder.download_and_prepare()
    except ImportError as e:
        if _is_missing_tensorflow(e):
            raise ImportError(_NEEDS_TF.format(name=name, error=e)) from e
        raise
    except OSError as e:
        raise FileNotFoundError(
            f"tfds data set {name!r} is not prepared in {builder.data_dir} and downloading it "
            f"failed ({type(e).__name__}: {e}). On a machine with the internet run "
            f"`tfds build {name} --file_format=array_record --data_dir=DIR` (or call "
            f"load('tfds:{name}', data_dir=DIR) there) and copy DIR here, then pass data_dir=DIR."
        ) from e


def _tfds_split(split: str, available: list[str], name: str) -> str:
    base = split.split("[")[0]
    if base in available:
        return split
    if base == "test" and "validation" in available:
        return "validation" + split[len(base):]
    raise ValueError(f"tfds data set {name!r} has no split {base!r}; it has {sorted(available)}.")


def _read_all(source, name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    try:
        for start in range(0, len(source), _READ_CHUNK):
            records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, len(source)))))
            images.extend(np.asarray(r["image"]) for r in records)
            labels.extend(int(r["label"]) for r in records)
    except ImportError as e:
        if _is_missing_tensorflow(e):
            raise ImportError(_NEEDS_TF.format(name=name, error=e)) from e
        raise
    except KeyError as e:
        raise ValueError(f"tfds data set {name!r} needs 'image' and 'label' features; missing {e}.") from e
    if not images:
        raise ValueError(f"tfds data set {name!r}: the split is empty.")
    images = np.stack(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating) and images.min() >= 0 and images.max() <= 1:
        images = images.astype(np.float32)
    else:
        raise ValueError(
            f"tfds data set {name!r}: images must be uint8 or floats in [0, 1], got {images.dtype} "
            f"in [{images.min()}, {images.max()}]."
        )
    return images, np.asarray(labels, np.int32)
