"""Glyphs: a many-class image family made offline, characters rendered from fonts.

`load("glyphs:<fonts>:<C>[:key=value,...]", split)` returns grayscale images
(32x32 by default, white ink on black) of `C` character classes. Each image is one
class's character drawn by Pillow in a font of the font set, then varied with its
own seeded draw of: font, font size, stroke weight, rotation, shear, scale, shift
and, as an option, an elastic distortion. Image `i` of a split depends only on
`(seed, split, i)` and the settings, so a data set is the same on every machine and
for any number of worker processes.

Font sets (`FONT_SETS`); the classes of a set come from its whole family, so that
`cjk_seen` and `cjk_unseen` (the font-shift pair) have the same classes:

| fonts | faces | family | classes |
|---|---|---|---|
| `dejavu` | the 12 DejaVu text faces that matplotlib ships (always there) | dejavu | Latin, Greek, Cyrillic letters |
| `dejavu_sans` / `dejavu_serif` | the Sans and Mono faces / the Serif faces | dejavu | same |
| `cjk` | 8 Debian CJK faces: Noto Sans/Serif CJK SC regular and bold, AR PL UKai and UMing, WenQuanYi Micro Hei and Zen Hei | cjk | CJK unified ideographs |
| `cjk_seen` / `cjk_unseen` | the 7 faces but AR PL UKai / AR PL UKai alone (a brush style no other face has) | cjk | same |

A class is kept only if every face of its family maps the character to a glyph
(fontTools cmap, not `.notdef`), draws ink, and draws something else than the face's
fallback box; and, so that no two classes are the same picture, only if its shape in
the family's first face differs from every class kept before (cosine similarity of
the bounding-box crops at 16x16 below `DUPLICATE_SIMILARITY`: drops Latin "O" when
Greek "Ο" and Cyrillic "О" come later, and "o" beside "O"). Candidates are visited in
a fixed order (DejaVu: Latin, Greek, Cyrillic in code order; CJK: a fixed permutation
of the shared ideographs) and the first `C` kept are the classes.

Options after the class count (`glyphs:cjk:100:train=200,elastic=1`): `train` images
per class in the train split (default 100), `test` images in the test split (default
6,400: 100 batches of 64, whatever `C`), `size` (32), `seed` (0), `elastic` (0 or 1).
Image `i` of a split has class `i % C`.

Cache: the first load renders both splits (in parallel over `workers` processes,
with a progress bar) and writes `<key>-train.npz`, `<key>-test.npz` and `<key>.json`
(the classes, the fonts with their files, the settings) to the cache directory:
`data_dir` if given, else `$DEM_JAX_GLYPHS_DIR`, else `~/.cache/dem_jax/glyphs`. The
key hashes the fonts (path, face index, file size), `C` and the settings.

Commands:
  python -m dem_jax.data.glyphs --survey            # fonts found, shared ideographs
  python -m dem_jax.data.glyphs --samples=docs/glyphs.png

Example:
  >>> ds = load_glyphs("glyphs:dejavu:20:train=5,test=40", "train")
  >>> ds.images.shape, ds.num_classes
  ((100, 32, 32, 1), 20)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np

from dem_jax.data.sources import SPLITS, ArrayDataset

PREFIX = "glyphs:"
VERSION = 1  # bump when the renderer changes what a setting draws
CJK_APT = ("apt-get install fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei "
           "fonts-arphic-ukai fonts-arphic-uming")
DUPLICATE_SIMILARITY = 0.95
CJK_RANGE = (0x4E00, 0x9FFF)  # CJK Unified Ideographs


@dataclasses.dataclass(frozen=True)
class Face:
    """One font face: a file, the face index inside a .ttc, where to get it."""

    name: str
    path: str
    index: int = 0
    package: str = ""


def _matplotlib_ttf() -> str:
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


def _dejavu() -> tuple[Face, ...]:
    d = _matplotlib_ttf()
    names = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
             "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
             "DejaVuSansMono-BoldOblique", "DejaVuSerif", "DejaVuSerif-Bold",
             "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic")
    return tuple(Face(n, os.path.join(d, n + ".ttf"), 0, "matplotlib") for n in names)


_NOTO = "/usr/share/fonts/opentype/noto"
_CJK = (
    # Face 2 of the Noto CJK collections is the Simplified Chinese one (SC).
    Face("noto_sans_sc", f"{_NOTO}/NotoSansCJK-Regular.ttc", 2, "fonts-noto-cjk"),
    Face("noto_sans_sc_bold", f"{_NOTO}/NotoSansCJK-Bold.ttc", 2, "fonts-noto-cjk"),
    Face("noto_serif_sc", f"{_NOTO}/NotoSerifCJK-Regular.ttc", 2, "fonts-noto-cjk"),
    Face("noto_serif_sc_bold", f"{_NOTO}/NotoSerifCJK-Bold.ttc", 2, "fonts-noto-cjk"),
    Face("wqy_microhei", "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0, "fonts-wqy-microhei"),
    Face("wqy_zenhei", "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0, "fonts-wqy-zenhei"),
    Face("arphic_uming", "/usr/share/fonts/truetype/arphic/uming.ttc", 0, "fonts-arphic-uming"),
    Face("arphic_ukai", "/usr/share/fonts/truetype/arphic/ukai.ttc", 0, "fonts-arphic-ukai"),
)


def _family(family: str) -> tuple[Face, ...]:
    return _dejavu() if family == "dejavu" else _CJK


# font set -> (family, names of the faces used; None = all of the family)
FONT_SETS = {
    "dejavu": ("dejavu", None),
    "dejavu_sans": ("dejavu", ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique",
                               "DejaVuSans-BoldOblique", "DejaVuSansMono",
                               "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
                               "DejaVuSansMono-BoldOblique")),
    "dejavu_serif": ("dejavu", ("DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic",
                                "DejaVuSerif-BoldItalic")),
    "cjk": ("cjk", None),
    "cjk_seen": ("cjk", tuple(f.name for f in _CJK if f.name != "arphic_ukai")),
    "cjk_unseen": ("cjk", ("arphic_ukai",)),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What varies per image, and how much.

    Attributes:
      size: output height and width in pixels.
      font_size: (low, high) font size as a fraction of the output size.
      stroke: (low, high) extra stroke width in output pixels (drawn at 2x, so
        0.5 steps).
      rotation: maximal rotation in degrees (uniform in +-rotation).
      shear: maximal horizontal shear (uniform in +-shear).
      scale: (low, high) zoom after drawing.
      shift: maximal shift, a fraction of the output size, per axis.
      elastic: elastic distortion (Simard et al., 2003) on or off.
      elastic_alpha, elastic_sigma: its displacement strength and smoothness, in
        output pixels.
    """

    size: int = 32
    font_size: tuple[float, float] = (0.55, 0.75)
    stroke: tuple[float, float] = (0.0, 0.5)
    rotation: float = 12.0
    shear: float = 0.2
    scale: tuple[float, float] = (0.85, 1.05)
    shift: float = 0.08
    elastic: bool = False
    elastic_alpha: float = 1.5
    elastic_sigma: float = 2.0


@dataclasses.dataclass(frozen=True)
class Spec:
    """A glyph data set: font set, class count, split sizes, seed, settings."""

    fonts: str
    num_classes: int
    train_per_class: int = 100
    test_size: int = 6400
    seed: int = 0
    settings: Settings = Settings()

    def split_size(self, split: str) -> int:
        return self.num_classes * self.train_per_class if split == "train" else self.test_size


def parse(name: str) -> Spec:
    """`"glyphs:<fonts>:<C>[:key=value,...]"` -> Spec.

    Example:
      >>> parse("glyphs:cjk:100:train=20").train_per_class
      20
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"{name!r} is not a glyphs data name (it starts with {PREFIX!r}).")
    parts = name[len(PREFIX):].split(":")
    usage = ("write 'glyphs:<fonts>:<classes>[:key=value,...]', fonts one of "
             f"{tuple(FONT_SETS)}, keys train, test, size, seed, elastic; e.g. "
             "'glyphs:cjk:100' or 'glyphs:dejavu:20:train=50'")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise ValueError(f"{name!r}: {usage}.")
    if parts[0] not in FONT_SETS:
        raise ValueError(f"{name!r}: unknown font set {parts[0]!r}; {usage}.")
    num_classes = int(parts[1])
    if num_classes < 2:
        raise ValueError(f"{name!r}: needs at least 2 classes, got {num_classes}.")
    opts = {}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, eq, value = item.partition("=")
        if not eq or key not in ("train", "test", "size", "seed", "elastic") or not value.isdigit():
            raise ValueError(f"{name!r}: bad option {item!r}; {usage}.")
        opts[key] = int(value)
    if min(opts.get("train", 1), opts.get("test", 1), opts.get("size", 1)) < 1:
        raise ValueError(f"{name!r}: train, test and size must be >= 1.")
    settings = Settings(size=opts.get("size", 32), elastic=bool(opts.get("elastic", 0)))
    return Spec(parts[0], num_classes, opts.get("train", 100), opts.get("test", 6400),
                opts.get("seed", 0), settings)


def faces_of(fonts: str) -> tuple[tuple[Face, ...], tuple[Face, ...]]:
    """(faces used for drawing, faces of the family that every class must have).

    Raises:
      FileNotFoundError: a face is not installed; the message names the apt-get line.
    """
    family, names = FONT_SETS[fonts]
    every = _family(family)
    missing = [f for f in every if not os.path.isfile(f.path)]
    if missing:
        how = (CJK_APT + " (as root)" if family == "cjk" else
               "pip install matplotlib (it ships the DejaVu fonts)")
        raise FileNotFoundError(
            f"glyphs:{fonts} needs fonts that are not installed: "
            + ", ".join(f"{f.path} ({f.package})" for f in missing) + f". Install them: {how}.")
    used = every if names is None else tuple(f for f in every if f.name in names)
    return used, every


# ----------------------------------------------------------------------------- classes


def _candidates(family: str, faces: tuple[Face, ...]) -> list[int]:
    """Codepoints every face maps to a glyph other than .notdef, in visiting order."""
    if family == "dejavu":
        ranges = [(0x41, 0x5A), (0x61, 0x7A), (0x391, 0x3A9), (0x3B1, 0x3C9), (0x410, 0x44F)]
        wanted = [cp for lo, hi in ranges for cp in range(lo, hi + 1) if cp != 0x3A2]
    else:
        wanted = list(range(CJK_RANGE[0], CJK_RANGE[1] + 1))
    shared = set(wanted)
    for face in faces:
        shared &= _cmap(face)
    ordered = [cp for cp in wanted if cp in shared]
    if family != "dejavu":  # a spread over the whole block, not its first radicals
        ordered = [ordered[i] for i in np.random.default_rng(0).permutation(len(ordered))]
    return ordered


@functools.lru_cache(maxsize=None)
def _cmap(face: Face) -> frozenset:
    from fontTools.ttLib import TTFont

    font = TTFont(face.path, fontNumber=face.index, lazy=True)
    cmap = font.getBestCmap() or {}
    font.close()
    return frozenset(cp for cp, glyph in cmap.items() if glyph != ".notdef")


@functools.lru_cache(maxsize=None)
def _pil_font(face: Face, pixels: int):
    from PIL import ImageFont

    return ImageFont.truetype(face.path, pixels, index=face.index)


def _draw(face: Face, char: str, pixels: int, stroke: int = 0, canvas: int | None = None):
    """uint8 [canvas, canvas] with `char` centred (by its ink box), white on black."""
    from PIL import Image, ImageDraw

    canvas = canvas or 2 * pixels
    font = _pil_font(face, pixels)
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font, stroke_width=stroke)
    xy = ((canvas - (right - left)) / 2 - left, (canvas - (bottom - top)) / 2 - top)
    draw.text(xy, char, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    return image


def _shape(image: np.ndarray) -> np.ndarray | None:
    """The ink's bounding-box crop at 16x16, zero-mean unit-norm (None without ink)."""
    from PIL import Image

    rows, cols = np.flatnonzero(image.max(1) > 64), np.flatnonzero(image.max(0) > 64)
    if not rows.size:
        return None
    crop = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    side = max(crop.shape)  # pad to a square: keeps "l" and "-" apart
    square = np.zeros((side, side), np.uint8)
    r0, c0 = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[r0:r0 + crop.shape[0], c0:c0 + crop.shape[1]] = crop
    v = np.asarray(Image.fromarray(square).resize((16, 16), Image.BILINEAR), np.float32).ravel()
    v -= v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else None


_CHECK_PIXELS = 32
_MIN_INK = 0.01  # of the canvas: a dot-sized glyph is too small to be a class


def real_glyph(face: Face, codepoint: int) -> bool:
    """Whether `face` draws `codepoint` as ink of its own (not blank, not its fallback box)."""
    if codepoint not in _cmap(face):
        return False
    ink = np.asarray(_draw(face, chr(codepoint), _CHECK_PIXELS))
    if (ink > 64).mean() < _MIN_INK:
        return False
    return not np.array_equal(ink, _notdef(face))


@functools.lru_cache(maxsize=None)
def _notdef(face: Face) -> np.ndarray:
    # U+10FFFD (private use, plane 16) is in none of these fonts: Pillow draws .notdef.
    return np.asarray(_draw(face, chr(0x10FFFD), _CHECK_PIXELS))


def select_classes(fonts: str, num_classes: int) -> list[int]:
    """The first `num_classes` codepoints that every face of the family draws, no two alike.

    Raises:
      ValueError: the family has fewer such characters than `num_classes`.
    """
    family = FONT_SETS[fonts][0]
    _, every = faces_of(fonts)
    kept, shapes = [], []
    for cp in _candidates(family, every):
        if not all(real_glyph(face, cp) for face in every):
            continue
        shape = _shape(np.asarray(_draw(every[0], chr(cp), _CHECK_PIXELS)))
        if shape is None or (shapes and float(np.max(np.stack(shapes) @ shape))
                             > DUPLICATE_SIMILARITY):
            continue
        kept.append(cp)
        shapes.append(shape)
        if len(kept) == num_classes:
            return sorted(kept)
    raise ValueError(
        f"glyphs:{fonts} has only {len(kept)} distinct characters that every font of the "
        f"{family} family draws; asked for {num_classes}. "
        + ("Use the CJK fonts (glyphs:cjk:<C>) for more classes." if family == "dejavu" else ""))


# ----------------------------------------------------------------------------- rendering


def _affine(rng: np.random.Generator, s: Settings, canvas: int) -> tuple:
    """PIL's output->input affine coefficients for a random rotation, shear, scale, shift."""
    theta = math.radians(rng.uniform(-s.rotation, s.rotation))
    shear = rng.uniform(-s.shear, s.shear)
    scale = rng.uniform(*s.scale)
    shift = rng.uniform(-s.shift, s.shift, 2) * canvas
    c = canvas / 2
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    inv = np.linalg.inv(forward)
    # input = inv @ (output - c - shift) + c
    offset = np.array([c, c]) - inv @ (np.array([c, c]) + shift)
    return (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])


def _elastic(image: np.ndarray, rng: np.random.Generator, s: Settings, factor: int) -> np.ndarray:
    from scipy import ndimage

    h, w = image.shape
    sigma, alpha = s.elastic_sigma * factor, s.elastic_alpha * factor
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha / 0.1
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha / 0.1
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return ndimage.map_coordinates(image.astype(np.float32), [yy + dy, xx + dx], order=1,
                                   mode="constant").clip(0, 255).astype(np.uint8)


_SUPERSAMPLE = 2


def render(face: Face, char: str, rng: np.random.Generator, settings: Settings) -> np.ndarray:
    """One varied image of `char` in `face`: uint8 `[size, size]`.

    Drawn at twice the output size and box-filtered down (antialiasing).

    Example:
      >>> face = _dejavu()[0]
      >>> render(face, "A", np.random.default_rng(0), Settings()).shape
      (32, 32)
    """
    from PIL import Image

    s = settings
    canvas = _SUPERSAMPLE * s.size
    pixels = int(round(rng.uniform(*s.font_size) * canvas))
    stroke = int(rng.integers(round(s.stroke[0] * _SUPERSAMPLE),
                              round(s.stroke[1] * _SUPERSAMPLE) + 1))
    image = _draw(face, char, pixels, stroke, canvas)
    image = image.transform((canvas, canvas), Image.AFFINE, _affine(rng, s, canvas),
                            resample=Image.BILINEAR)
    if s.elastic:
        image = Image.fromarray(_elastic(np.asarray(image), rng, s, _SUPERSAMPLE))
    return np.asarray(image.reduce(_SUPERSAMPLE))


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_range(spec: Spec, faces: tuple[Face, ...], codepoints: list[int], split: str,
                 start: int, stop: int) -> np.ndarray:
    """Images `start..stop-1` of a split: uint8 `[stop - start, size, size]`.

    Image `i` has class `i % C`; its font and variation come from `(seed, split, i)`.
    """
    out = np.empty((stop - start, spec.settings.size, spec.settings.size), np.uint8)
    for j, i in enumerate(range(start, stop)):
        rng = _image_rng(spec.seed, split, i)
        face = faces[int(rng.integers(len(faces)))]
        out[j] = render(face, chr(codepoints[i % len(codepoints)]), rng, spec.settings)
    return out


def _render_chunk(args) -> np.ndarray:
    return render_range(*args)


def render_split(spec: Spec, faces, codepoints, split: str, *, workers: int = 2,
                 chunk: int = 1000) -> np.ndarray:
    """A whole split, rendered by `workers` processes with a progress bar."""
    from tqdm import tqdm

    n = spec.split_size(split)
    jobs = [(spec, faces, codepoints, split, lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    bar = dict(desc=f"glyphs {split}", total=n, unit="img", file=sys.stderr, leave=False,
               dynamic_ncols=True)
    parts = []
    if workers <= 1 or len(jobs) == 1:
        with tqdm(**bar) as progress:
            for job in jobs:
                parts.append(_render_chunk(job))
                progress.update(len(parts[-1]))
    else:
        import multiprocessing

        # spawn: the caller may hold JAX's threads, which a fork would copy broken.
        with multiprocessing.get_context("spawn").Pool(workers) as pool, tqdm(**bar) as progress:
            for part in pool.imap(_render_chunk, jobs):
                parts.append(part)
                progress.update(len(part))
    return np.concatenate(parts) if parts else np.empty((0, spec.settings.size,) * 2, np.uint8)


# ----------------------------------------------------------------------------- cache


def resolve_cache_dir(data_dir: str | None = None) -> str:
    """`data_dir`, else `$DEM_JAX_GLYPHS_DIR`, else `~/.cache/dem_jax/glyphs`."""
    if data_dir:
        return data_dir
    return os.environ.get("DEM_JAX_GLYPHS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dem_jax", "glyphs")


def record(spec: Spec) -> dict:
    """What defines the data (fonts with their files, classes count, settings), without the classes."""
    used, every = faces_of(spec.fonts)
    face = lambda f: {"name": f.name, "path": f.path, "index": f.index, "package": f.package,
                      "bytes": os.path.getsize(f.path)}
    return {"version": VERSION, "fonts": spec.fonts, "faces": [face(f) for f in used],
            "class_faces": [face(f) for f in every], "num_classes": spec.num_classes,
            "train_per_class": spec.train_per_class, "test_size": spec.test_size,
            "seed": spec.seed, "settings": dataclasses.asdict(spec.settings)}


def cache_key(rec: dict) -> str:
    text = json.dumps(rec, sort_keys=True)
    return f"{rec['fonts']}-{rec['num_classes']}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_npz(path: str, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
    os.replace(tmp, path)


def build(spec: Spec, data_dir: str | None = None, *,
          workers: int | None = None) -> tuple[dict, str]:
    """Renders both splits into the cache unless there.

    Returns:
      (the JSON record with the classes, the cache path prefix `<dir>/<key>`).
    """
    rec = record(spec)
    directory = resolve_cache_dir(data_dir)
    base = os.path.join(directory, cache_key(rec))
    done = all(os.path.isfile(f"{base}-{s}.npz") for s in SPLITS) and os.path.isfile(base + ".json")
    if done:
        with open(base + ".json", encoding="utf-8") as f:
            return json.load(f), base
    os.makedirs(directory, exist_ok=True)
    codepoints = select_classes(spec.fonts, spec.num_classes)
    used, _ = faces_of(spec.fonts)
    workers = workers or min(2, os.cpu_count() or 1)
    for split in SPLITS:
        images = render_split(spec, used, codepoints, split, workers=workers)
        labels = (np.arange(len(images)) % spec.num_classes).astype(np.int32)
        _save_npz(f"{base}-{split}.npz", images=images, labels=labels)
    rec = {**rec, "codepoints": codepoints, "classes": "".join(map(chr, codepoints))}
    text = json.dumps(rec, indent=1, ensure_ascii=False)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, base + ".json")
    return rec, base


def load_glyphs(name: str, split: str, *, cache_dir: str | None = None,
                workers: int | None = None) -> ArrayDataset:
    """One split of a glyph data set (rendered and cached on first use).

    Args:
      name: `"glyphs:<fonts>:<C>[:key=value,...]"` (module docstring).
      split: `"train"` or `"test"`.
      cache_dir: where the rendered data is kept (default: see `cache_dir()`).
      workers: rendering processes (default: up to 2).

    Returns:
      An `ArrayDataset`: float32 `[N, size, size, 1]` in `[0, 1]`, labels `i % C`.

    Example:
      >>> load_glyphs("glyphs:dejavu:10:train=2,test=20", "test").labels[:12].tolist()
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r} for {name!r}; valid splits: {SPLITS}.")
    spec = parse(name)
    rec, base = build(spec, cache_dir, workers=workers)
    with np.load(f"{base}-{split}.npz") as z:
        images, labels = z["images"], z["labels"]
    if len(rec["codepoints"]) != spec.num_classes or len(labels) != spec.split_size(split):
        raise ValueError(f"{base}: the cached glyphs do not match {name!r}; delete the files "
                         f"{base}-*.npz and {base}.json to render them again.")
    return ArrayDataset((images.astype(np.float32) / 255.0)[..., None], labels,
                        spec.num_classes, name)


# ----------------------------------------------------------------------------- commands


def survey(family: str = "cjk") -> dict:
    """Per face: characters mapped in the family's range; shared by all; real in all."""
    every = _family(family)
    installed = [f for f in every if os.path.isfile(f.path)]
    out = {"faces": {f.name: f.path for f in installed},
           "missing": [f"{f.path} ({f.package})" for f in every if f not in installed]}
    if not installed:
        return out
    candidates = _candidates(family, tuple(installed))
    out["per_face"] = {f.name: len([cp for cp in _cmap(f) if CJK_RANGE[0] <= cp <= CJK_RANGE[1]])
                       if family == "cjk" else len(_cmap(f)) for f in installed}
    out["shared_cmap"] = len(candidates)
    out["shared_real"] = sum(all(real_glyph(f, cp) for f in installed) for cp in candidates)
    return out


def save_samples(path: str, fonts: str = "cjk", num_classes: int = 1000, per_row: int = 16,
                 rows: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = Spec(fonts, num_classes)
    used, _ = faces_of(fonts)
    codepoints = select_classes(fonts, num_classes)
    images = render_range(spec, used, codepoints, "train", 0, per_row * rows)
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 0.6, rows * 0.6))
    for ax, im in zip(axes.ravel(), images):
        ax.imshow(im, cmap="gray", vmin=0, vmax=255)
        ax.axis("off")
    fig.suptitle(f"glyphs:{fonts}:{num_classes}, train images 0..{per_row * rows - 1}")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--survey", action="store_true", help="count the fonts' shared ideographs")
    p.add_argument("--samples", default="", help="write a picture of sample images here")
    p.add_argument("--fonts", default="cjk")
    p.add_argument("--classes", type=int, default=1000)
    args = p.parse_args(argv)
    if args.survey:
        print(json.dumps(survey(FONT_SETS[args.fonts][0]), indent=1))
    if args.samples:
        save_samples(args.samples, args.fonts, args.classes)


if __name__ == "__main__":
    main()
