"""Data: image sources as numpy arrays, batching by index, ImageNet-C-style corruptions.

  >>> from dem_jax import data
  >>> test = data.load("digits", "test")                      # 450 8x8 digits, no download
  >>> shifted = data.corrupt_dataset(test, "gaussian_noise", 5, seed=0)
  >>> shifted.name
  'digits-gaussian_noise-5'
  >>> len(data.batch_indices(len(test), 50, seed=0))          # 9 shuffled batches of 50
  9
"""

from dem_jax import _extras

_extras.require("experiments", __name__)

from dem_jax.data.pipeline import batch_indices, padded_batches
from dem_jax.data.sources import SOURCES, ArrayDataset, load, read_idx, stratified_split

_FROM_CORRUPTIONS = ("CORRUPTIONS", "SEVERITIES", "corrupt", "corrupt_dataset")

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "SOURCES",
    "ArrayDataset",
    "batch_indices",
    "corrupt",
    "corrupt_dataset",
    "load",
    "padded_batches",
    "read_idx",
    "stratified_split",
]


def __getattr__(name):
    # The corruptions module is imported on first use, so that
    # `python -m dem_jax.data.corruptions` does not find it imported already (runpy warns).
    if name in _FROM_CORRUPTIONS:
        from dem_jax.data import corruptions

        return getattr(corruptions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
