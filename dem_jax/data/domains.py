"""Domain pairs for unsupervised domain adaptation (UDA): a labelled source, a shifted target.

`load_pair(name)` returns `(source, target)`, each a `DomainSplit` with a `train` and a
`test` `ArrayDataset`. Both domains of a pair have the same image size, channels and
classes, so that one model fits both.

| pair | source | target | images |
|---|---|---|---|
| `"mnist->mnist_m"` | MNIST | MNIST blended with photo crops (`blend_with_photos`) | 28x28 RGB |
| `"fashion_mnist->fashion_mnist_m"` | Fashion-MNIST | Fashion-MNIST blended with photo crops | 28x28 RGB |
| `"digits->mnist"` | scikit-learn digits, upsampled from 8x8 | MNIST | 28x28 grayscale |
| `"mnist->digits"` | MNIST | scikit-learn digits, upsampled from 8x8 | 28x28 grayscale |
| `"digits->digits_m"` | scikit-learn digits, upsampled from 8x8 | the same digits blended with photo crops at half contrast | 16x16 RGB |
| `"tfds:svhn_cropped->tfds:mnist"` | SVHN (tfds, needs the internet) | MNIST (tfds) | 32x32 RGB |

Any two data names of the `folder:` and `glyphs:` sources also make a pair,
`"<source name>-><target name>"`, e.g. `"glyphs:cjk_seen:100->glyphs:cjk_unseen:100"`
(a font shift: the same 100 characters, the target drawn in a font that the source
never saw) or `"folder:/data/photos->folder:/data/sketches"`: images at the source's
size, RGB if either domain is.

`size=` resizes both domains to `size x size` instead. The blended targets are made
from the *same* split of their source (target train = blended source-train images,
target test = blended source-test images, as MNIST-M is made from MNIST), each split
with its own crops drawn from a seed derived from `(seed, split)`.

MNIST-M (Ganin & Lempitsky 2015) blends each MNIST digit with a random crop of a
BSDS500 photo by the per-channel absolute difference `|photo - digit|`: the stroke
takes the photo's inverted colour, the background keeps the photo. BSDS500 is not
bundled anywhere offline, so the crops here come from the colour images shipped inside
the scikit-image wheel (`PHOTOS`): seven photographs and the colour wheel. The
photo of the Hubble deep field, which is also bundled, is left out: it is 92% black,
so its crops would leave the digits nearly unchanged. Each image is downscaled once
(antialiased) so that its short side is 4x and 8x the digit size (two scales, 16
backgrounds in all), then every digit gets a random crop of a random one: at 28x28 a
crop shows a quarter to an eighth of a photo's short side, larger structures than
in MNIST-M's 28-pixel crops of 481x321 photos.

Command: `python -m dem_jax.data.domains --out=docs/domains.png` writes 8 sample images
of each domain of each offline pair (pairs whose data is missing are skipped, saying so).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import numpy as np

from dem_jax.data import sources
from dem_jax.data.sources import ArrayDataset

DOMAIN_PAIRS = (
    "mnist->mnist_m",
    "fashion_mnist->fashion_mnist_m",
    "digits->mnist",
    "mnist->digits",
    "digits->digits_m",
    "tfds:svhn_cropped->tfds:mnist",
)
OFFLINE_PAIRS = tuple(p for p in DOMAIN_PAIRS if not p.startswith("tfds:"))
# Sources whose names pair freely: "<source>-><target>".
FREE_PREFIXES = (sources.FOLDER_PREFIX, sources.GLYPHS_PREFIX)


def free_pair(name: str) -> tuple[str, str] | None:
    """(source, target) of a `"<folder:/glyphs: name>-><folder:/glyphs: name>"` pair, else None.

    Example:
      >>> free_pair("glyphs:cjk_seen:100->glyphs:cjk_unseen:100")
      ('glyphs:cjk_seen:100', 'glyphs:cjk_unseen:100')
    """
    source, arrow, target = name.partition("->")
    if arrow and source.startswith(FREE_PREFIXES) and target.startswith(FREE_PREFIXES):
        return source, target
    return None


def check_pair(name: str) -> None:
    """Raises ValueError unless `name` is a known or a free pair."""
    if name not in _PAIRS and free_pair(name) is None:
        raise ValueError(f"Unknown domain pair {name!r}. Valid pairs: {', '.join(DOMAIN_PAIRS)}, "
                         "or '<source>-><target>' of two 'folder:' / 'glyphs:' data names.")

# The colour images bundled with scikit-image (no download), as loaders.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "retina",
    "motorcycle",
    "colorwheel",
)
# Short side of each downscaled photo, in multiples of the digit's longer side.
PHOTO_SCALES = (4, 8)

# pair -> (source domain, target domain, default size, RGB). A domain name ending in
# "_m" is its base data set blended with photos.
_PAIRS = {
    "mnist->mnist_m": ("mnist", "mnist_m", 28, True),
    "fashion_mnist->fashion_mnist_m": ("fashion_mnist", "fashion_mnist_m", 28, True),
    "digits->mnist": ("digits", "mnist", 28, False),
    "mnist->digits": ("mnist", "digits", 28, False),
    # The embedded pair (no download): 8x8 is upsampled to 16x16 so that a photo crop
    # shows texture at the scale of a stroke (at 8x8 a stroke is one or two pixels).
    "digits->digits_m": ("digits", "digits_m", 16, True),
    "tfds:svhn_cropped->tfds:mnist": ("tfds:svhn_cropped", "tfds:mnist", 32, True),
}
_BLENDED_SUFFIX = "_m"
# Photo strength of blended domains (default 1, MNIST-M's blend). digits_m uses half
# contrast: at full contrast a source model trained on the 1,347 digits is near chance
# on it (16% on 16x16), which leaves entropy-based adaptation nothing to build on;
# at 0.5 it starts near 45%, like source-only LeNet on MNIST-M (about 55%).
_BLEND_STRENGTH = {"digits_m": 0.5}
# Images per gather when blending: bounds the [chunk, H, W] index arrays to a few MB.
_BLEND_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class DomainSplit:
    """One domain of a pair.

    Attributes:
      name: the domain, e.g. `"mnist_m"`.
      train: the domain's training split (for the target: unlabelled in UDA; its
        labels are there for analysis only).
      test: the domain's test split.
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset


# ----------------------------------------------------------------------------- image ops


def _check_images(images, fn: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"{fn}: images must be [N, H, W, C], got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{fn}: images must be floating point in [0, 1], got dtype {images.dtype}")
    return images


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` weights of linear interpolation with half-pixel centres.

    The triangle kernel is widened by the shrink factor when shrinking, so that each
    output pixel averages the input pixels it covers instead of sampling two of them
    (antialiasing); rows are normalised, which clamps at the borders.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    weights = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _resize_hw(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`[N, H, W, C]` -> float32 `[N, height, width, C]`, separable (two matmuls)."""
    images = images.astype(np.float32, copy=False)
    if images.shape[1:3] == (height, width):
        return images
    rows = _resize_matrix(images.shape[1], height)
    cols = _resize_matrix(images.shape[2], width)
    channels_first = np.ascontiguousarray(np.moveaxis(images, 3, 1))  # [N, C, H, W]
    out = np.moveaxis(rows @ channels_first @ cols.T, 1, 3)
    # Float rounding of the weights may step a hair outside the input range.
    if images.size:
        out = np.clip(out, images.min(), images.max())
    return np.ascontiguousarray(out)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a batch to `size x size`.

    Linear interpolation with half-pixel centres, antialiased when shrinking (the
    kernel widens with the shrink factor); the same as
    `jax.image.resize(..., method="linear", antialias=True)`. Values stay in the input
    range (the weights are non-negative and sum to 1).

    Args:
      images: float `[N, H, W, C]`.
      size: output height and width, >= 1.

    Returns:
      float32 `[N, size, size, C]` (the input itself, as float32, if already that size).
    """
    images = _check_images(images, "resize")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"resize: size must be an int >= 1, got {size!r}")
    return _resize_hw(images, int(size), int(size))


def to_rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale `[N, H, W, 1]` -> float32 `[N, H, W, 3]` (the channel repeated); RGB passes through."""
    images = _check_images(images, "to_rgb")
    if images.shape[-1] == 3:
        return images.astype(np.float32, copy=False)
    if images.shape[-1] != 1:
        raise ValueError(f"to_rgb: images must have 1 or 3 channels, got shape {images.shape}")
    return np.repeat(images.astype(np.float32, copy=False), 3, axis=-1)


def _load_photo(name: str) -> np.ndarray:
    import skimage.data

    photo = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    return photo[..., :3].astype(np.float32) / 255.0


@functools.lru_cache(maxsize=4)
def _photo_bank(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Every photo at every scale, zero-padded into one array.

    Returns:
      bank: float32 `[P, Hmax, Wmax, 3]`, photo p in `bank[p, :h_p, :w_p]`;
      shapes: int `[P, 2]`, the `(h_p, w_p)`.
    """
    scaled = []
    for name in PHOTOS:
        photo = _load_photo(name)
        for factor in PHOTO_SCALES:
            short = factor * max(height, width)
            ratio = short / min(photo.shape[:2])
            h, w = max(height, round(photo.shape[0] * ratio)), max(width, round(photo.shape[1] * ratio))
            scaled.append(_resize_hw(photo[None], h, w)[0])
    shapes = np.array([p.shape[:2] for p in scaled])
    bank = np.zeros((len(scaled), *shapes.max(axis=0), 3), np.float32)
    for p, photo in enumerate(scaled):
        bank[p, : photo.shape[0], : photo.shape[1]] = photo
    bank.flags.writeable = False
    return bank, shapes


def blend_with_photos(images: np.ndarray, *, seed: int, size: int | None = None,
                      strength: float = 1.0) -> np.ndarray:
    """MNIST-M-style blending: `|photo crop - image|` per colour channel.

    Each image gets its own random crop of a random photo (see the module doc for the
    photos and their scales):
    `out[n, y, x, c] = |strength * crop_n[y, x, c] - image[n, y, x, 0]|`.

    Args:
      images: float grayscale `[N, H, W, 1]` in `[0, 1]` (white strokes on black).
      seed: the crops depend only on the seed and the image shape.
      size: if given, the images are first resized (bilinear) to `size x size`.
      strength: photo contrast in `[0, 1]`; 1 is MNIST-M's blend.

    Returns:
      float32 `[N, H, W, 3]` (or `[N, size, size, 3]`) in `[0, 1]`.

    Example:
      >>> mnist = sources.load("mnist", "test")
      >>> mnist_m = blend_with_photos(mnist.images, seed=0)     # [N, 28, 28, 3]
    """
    images = _check_images(images, "blend_with_photos")
    if images.shape[-1] != 1:
        raise ValueError(f"blend_with_photos: images must be grayscale [N, H, W, 1], got shape {images.shape}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"blend_with_photos: images must be in [0, 1], got [{images.min()}, {images.max()}]"
        )
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"blend_with_photos: strength must be in [0, 1], got {strength}")
    if size is not None:
        images = resize(images, size)
    images = images.astype(np.float32, copy=False)
    n, height, width = images.shape[:3]
    bank, shapes = _photo_bank(height, width)
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, len(bank), size=n)
    top = np.floor(rng.random(n) * (shapes[photo, 0] - height + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (shapes[photo, 1] - width + 1)).astype(np.int64)
    out = np.empty((n, height, width, 3), np.float32)
    ys, xs = np.arange(height), np.arange(width)
    for start in range(0, n, _BLEND_CHUNK):
        part = slice(start, start + _BLEND_CHUNK)
        crops = bank[
            photo[part, None, None],
            top[part, None, None] + ys[None, :, None],
            left[part, None, None] + xs[None, None, :],
        ]
        out[part] = np.abs(strength * crops - images[part])
    return out


# ----------------------------------------------------------------------------- pairs


def _split_seed(seed: int, split: str) -> int:
    return int(np.random.SeedSequence([seed, sources.SPLITS.index(split)]).generate_state(1)[0])


def _load_domain(domain: str, split: str, *, loaded: dict, data_dir, seed: int, size: int,
                 rgb: bool) -> ArrayDataset:
    blended = (not domain.startswith((sources.TFDS_PREFIX,) + FREE_PREFIXES)
               and domain.endswith(_BLENDED_SUFFIX))
    base = domain[: -len(_BLENDED_SUFFIX)] if blended else domain
    # A blended target and its source read the same files: load them once.
    if (base, split) not in loaded:
        loaded[base, split] = sources.load(base, split, data_dir=data_dir)
    ds = loaded[base, split]
    images = resize(ds.images, size) if size else ds.images
    if blended:
        if images.shape[-1] != 1:
            raise ValueError(f"{domain}: blending needs grayscale images, {base} has shape {images.shape}")
        images = blend_with_photos(images, seed=_split_seed(seed, split),
                                   strength=_BLEND_STRENGTH.get(domain, 1.0))
    elif rgb:
        images = to_rgb(images)
    elif images.shape[-1] != 1:
        raise ValueError(f"{domain}: expected grayscale images, got shape {images.shape}")
    return dataclasses.replace(ds, images=images, name=domain)


def load_pair(
    name: str, *, data_dir: str | None = None, seed: int = 0, size: int | None = None
) -> tuple[DomainSplit, DomainSplit]:
    """Loads a UDA pair: the source and the target domain, each with train and test.

    Args:
      name: one of `DOMAIN_PAIRS`, e.g. `"mnist->mnist_m"`.
      data_dir: passed to `sources.load` for both domains (a tfds data_dir for the
        tfds pair); None looks in the default places (see `sources`).
      seed: the photo crops of blended targets (train and test get different crops).
      size: image height and width of both domains; None for the pair's default (28,
        16 for digits -> digits_m, 32 for SVHN -> MNIST).

    Returns:
      `(source, target)` `DomainSplit`s with equal image shapes and class counts.

    Raises:
      ValueError: unknown pair, or domains that do not match.
      FileNotFoundError: the data is not on this machine (see `sources.load`).

    Example:
      >>> source, target = load_pair("mnist->mnist_m")
      >>> source.train.images.shape[1:], target.test.images.shape[1:]
      ((28, 28, 3), (28, 28, 3))
    """
    check_pair(name)
    loaded = {}
    if name in _PAIRS:
        source_name, target_name, default_size, rgb = _PAIRS[name]
    else:
        source_name, target_name = free_pair(name)
        for domain in (source_name, target_name):  # kept in `loaded` for _load_domain
            loaded[domain, "test"] = sources.load(domain, "test", data_dir=data_dir)
        default_size = loaded[source_name, "test"].images.shape[1]
        rgb = any(loaded[d, "test"].images.shape[-1] == 3 for d in (source_name, target_name))
    size = default_size if size is None else size
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"load_pair: size must be an int >= 1, got {size!r}")
    options = dict(loaded=loaded, data_dir=data_dir, seed=seed, size=int(size), rgb=rgb)
    source, target = (
        DomainSplit(domain, *(_load_domain(domain, split, **options) for split in sources.SPLITS))
        for domain in (source_name, target_name)
    )
    for a, b in ((source.train, source.test), (source.train, target.train), (source.train, target.test)):
        if a.images.shape[1:] != b.images.shape[1:] or a.num_classes != b.num_classes:
            raise ValueError(
                f"{name}: the domains do not match: {a.name} has images {a.images.shape[1:]} and "
                f"{a.num_classes} classes, {b.name} has {b.images.shape[1:]} and {b.num_classes}."
            )
    return source, target


# ----------------------------------------------------------------------------- picture


def _samples(ds: ArrayDataset, count: int) -> np.ndarray:
    """Indices of the first example of classes 0, 1, ..., then the next ones, `count` in all."""
    first = [int(np.flatnonzero(ds.labels == c)[0]) for c in range(ds.num_classes) if (ds.labels == c).any()]
    rest = [i for i in range(len(ds)) if i not in set(first)]
    return np.array((first + rest)[:count])


def plot_pairs(path: str, *, pairs=OFFLINE_PAIRS, data_dir=None, seed: int = 0, per_domain: int = 8) -> list[str]:
    """Writes a PNG with `per_domain` test images of each domain of each pair.

    Returns:
      The pairs that were skipped because their data is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, skipped = [], []
    for pair in pairs:
        try:
            source, target = load_pair(pair, data_dir=data_dir, seed=seed)
        except (FileNotFoundError, ImportError) as e:
            skipped.append(pair)
            print(f"skipping {pair}: " + str(e).replace("\n", "\n    "))
            continue
        index = _samples(source.test, per_domain)  # blended targets share the source's images
        for role, domain in (("source", source), ("target", target)):
            take = index if domain.name.endswith(_BLENDED_SUFFIX) else _samples(domain.test, per_domain)
            rows.append((f"{pair}\n{role}: {domain.name}", domain.test.images[take]))
    if not rows:
        raise FileNotFoundError("No domain pair could be loaded; nothing to plot.")
    fig, axes = plt.subplots(len(rows), per_domain, figsize=(per_domain * 0.9 + 2.2, len(rows) * 0.95),
                             squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(per_domain):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                picture = images[c]
                if picture.shape[-1] == 1:
                    ax.imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:
                    ax.imshow(picture, vmin=0, vmax=1, interpolation="nearest")
            if c == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/domains.png")
    parser.add_argument(
        "--data_dir", default=None,
        help="passed to every data set of every pair; where pairs need different directories, "
        "set DEM_JAX_MNIST_DIR / DEM_JAX_FASHION_MNIST_DIR instead",
    )
    parser.add_argument("--seed", type=int, default=0, help="photo crops of the blended domains")
    parser.add_argument("--per_domain", type=int, default=8, help="images shown per domain")
    args = parser.parse_args(argv)
    skipped = plot_pairs(args.out, data_dir=args.data_dir, seed=args.seed, per_domain=args.per_domain)
    print(f"wrote {args.out}" + (f" (skipped {', '.join(skipped)})" if skipped else ""))


if __name__ == "__main__":
    main()
