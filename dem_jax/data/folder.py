"""Users' own images: `load("folder:PATH", split)` reads the image-folder layout.

Layout (the one torchvision's `ImageFolder` and Keras' `image_dataset_from_directory`
read):

    PATH/train/<class name>/<image>.png|.jpg|.jpeg
    PATH/test/<class name>/<image>.png|.jpg|.jpeg

Classes are the sub-folder names in sorted order (label 0 = the first name), the
same in both splits. Images are read with Pillow, converted to grayscale when every
image of the data set is grayscale (mode "L", "1", "I", "I;16") and to RGB otherwise,
and resized to `size x size` (bilinear, antialiased). Files whose names start with a
dot are ignored; any other file that is not a PNG or JPEG is an error, so that a
typo never silently drops a class.

The size: `"folder:PATH"` resizes to 32x32 (`DEFAULT_SIZE`); `"folder:PATH@28"`
resizes to 28x28.

Example:
  >>> ds = load_folder("/data/my_images", "train")          # doctest: +SKIP
  >>> ds.images.shape, ds.num_classes                        # doctest: +SKIP
  ((1200, 32, 32, 3), 4)
"""

from __future__ import annotations

import os

import numpy as np

from dem_jax.data.sources import SPLITS, ArrayDataset

PREFIX = "folder:"
DEFAULT_SIZE = 32
EXTENSIONS = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def parse(name: str) -> tuple[str, int]:
    """`"folder:PATH[@SIZE]"` -> (PATH, SIZE).

    Example:
      >>> parse("folder:/data/x@28")
      ('/data/x', 28)
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not a folder data name (it starts with {PREFIX!r}).")
    path, size = name[len(PREFIX):], DEFAULT_SIZE
    head, sep, tail = path.rpartition("@")
    if sep and tail.isdigit():
        path, size = head, int(tail)
    if not path:
        raise ValueError(f"{name!r}: no folder given; write 'folder:PATH' or 'folder:PATH@SIZE'.")
    if size < 1:
        raise ValueError(f"{name!r}: the image size must be >= 1, got {size}.")
    return path, size


def class_names(root: str, split: str) -> list[str]:
    """The sorted class folder names of `root/split`.

    Raises:
      FileNotFoundError: `root/split` is missing.
      ValueError: it holds no class folder, or a class folder holds no image.
    """
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(
            f"{split_dir}: missing split folder. A folder data set holds "
            f"{os.path.join(root, 'train')} and {os.path.join(root, 'test')}, each with one "
            "sub-folder of images per class.")
    names = sorted(e.name for e in os.scandir(split_dir)
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"{split_dir}: no class folders in it (expected {split_dir}/<class>/<image>).")
    return names


def _image_files(class_dir: str) -> list[str]:
    files = []
    for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            raise ValueError(f"{entry.path}: a folder inside a class folder; images go directly "
                             "in <split>/<class>/.")
        if os.path.splitext(entry.name)[1].lower() not in EXTENSIONS:
            raise ValueError(f"{entry.path}: not a PNG or JPEG file (extensions {EXTENSIONS}).")
        files.append(entry.path)
    if not files:
        raise ValueError(f"{class_dir}: empty class folder (no PNG or JPEG image in it).")
    return files


def _read(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: unreadable image ({e}).") from e


def load_folder(name: str, split: str) -> ArrayDataset:
    """Loads one split of an image folder (see the module docstring).

    Args:
      name: `"folder:PATH"` or `"folder:PATH@SIZE"`.
      split: `"train"` or `"test"`.

    Returns:
      An `ArrayDataset`: float32 `[N, SIZE, SIZE, 1 or 3]` in `[0, 1]`, labels in
      sorted class-folder order, images in (class, file name) order.

    Raises:
      FileNotFoundError: the folder or the split folder is missing.
      ValueError: an empty class folder, a file that is no PNG/JPEG or cannot be
        read, or train and test with different classes; the message names the path.
    """
    from PIL import Image

    root, size = parse(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for {name!r}; valid splits: {SPLITS}.")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder (from data name {name!r}).")
    classes = class_names(root, split)
    # Both splits must name the same classes, or label k would mean two things.
    for other in SPLITS:
        if other != split and os.path.isdir(os.path.join(root, other)):
            other_classes = class_names(root, other)
            if other_classes != classes:
                only_here = sorted(set(classes) - set(other_classes))
                only_there = sorted(set(other_classes) - set(classes))
                raise ValueError(
                    f"{root}: the classes differ between {split} and {other}: only in "
                    f"{os.path.join(root, split)}: {only_here}; only in "
                    f"{os.path.join(root, other)}: {only_there}.")
    files, labels = [], []
    for label, cls in enumerate(classes):
        found = _image_files(os.path.join(root, split, cls))
        files += found
        labels += [label] * len(found)
    pictures = [_read(f) for f in files]
    rgb = any(p.mode not in _GRAY_MODES for p in pictures)
    images = np.empty((len(files), size, size, 3 if rgb else 1), np.float32)
    for i, (path, picture) in enumerate(zip(files, pictures)):
        if picture.mode in ("I", "I;16", "F"):  # 16-bit or float grayscale: scale to 8 bits
            arr = np.asarray(picture, np.float32)
            top = 65535.0 if picture.mode != "F" and arr.max() > 255 else 255.0
            picture = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        picture = picture.convert("RGB" if rgb else "L")
        if picture.size != (size, size):
            picture = picture.resize((size, size), Image.BILINEAR, reducing_gap=None)
        pixels = np.asarray(picture, np.float32) / 255.0
        images[i] = pixels if rgb else pixels[..., None]
    return ArrayDataset(images, np.asarray(labels, np.int32), len(classes),
                        f"folder:{os.path.basename(os.path.normpath(root))}")
