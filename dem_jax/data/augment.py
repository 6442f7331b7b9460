"""Weak and strong augmentation on the device, batched, jitted and seeded (semi-supervised learning).

The two views of FixMatch-style methods (USB's "weak" and "strong" transforms):

* **weak**: a random crop of the image padded by `pad` pixels on each side
  (reflect padding, USB's `RandomCrop(padding, padding_mode="reflect")`; `pad`
  defaults to H/8, USB's crop ratio 0.875) and, where the data allows
  (`flip=True`: clothing, natural images; not digits), a horizontal flip with
  probability 1/2;
* **strong**: the weak view, then `num_ops` operations drawn uniformly from
  `OPS` with a random magnitude each (RandAugment as USB runs it,
  `RandAugment(3, 5)`: the magnitude is drawn per operation, not fixed), then
  Cutout of a square of side up to `cutout` x the image side, filled with 0.5.

Every function takes ONE key per image (`[N]` keys for `[N, H, W, C]` images),
so a view depends only on its image's key and never on how a batch is split
over devices: the train steps fold each example's global index into the step's
key. Images are float `[N, H, W, C]` in `[0, 1]`; outputs stay in `[0, 1]`.

dm-pix supplies the crop, flip, the affine warp, brightness, contrast,
saturation and solarize; written here are what it lacks: autocontrast,
posterize, sharpness and Cutout. The geometric operations drawn for an image
(`GEOMETRIC`: rotation, shears, translations) are composed into ONE warp,
applied after its photometric operations (pointwise, so they commute with a
warp up to interpolation): one resampling per image instead of one per drawn
operation, and no resampling at all for the photometric branches, which is
what makes the batched strong view cheap on a CPU. The warp fills with 0 (the
background of the offline data sets; USB fills with grey on CIFAR).

  >>> import jax, numpy as np
  >>> from dem_jax.data import augment
  >>> x = np.random.default_rng(0).random((4, 28, 28, 1), np.float32)
  >>> keys = jax.random.split(jax.random.key(0), 4)
  >>> augment.strong(keys, x, flip=True).shape
  (4, 28, 28, 1)
"""

from __future__ import annotations

import functools
import math

import dm_pix as pix
import jax
import jax.numpy as jnp

# RandAugment's operations (FixMatch's list less equalize, whose histogram is
# costly on the device; "color" is the identity on grayscale images).
OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "posterize",
       "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x",
       "translate_y")


GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _autocontrast(image):
    lo = image.min(axis=(0, 1), keepdims=True)
    hi = image.max(axis=(0, 1), keepdims=True)
    return jnp.where(hi > lo, (image - lo) / jnp.maximum(hi - lo, 1e-6), image)


def _posterize(image, bits):
    levels = 2.0 ** bits
    return jnp.floor(image * 255.0 / (256.0 / levels)) * (256.0 / levels) / 255.0


def _sharpness(image, factor):
    # PIL's ImageEnhance.Sharpness: blend with a 3x3 smoothed copy (centre weight 5/13).
    kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
    k = jnp.tile(kernel[:, :, None, None], (1, 1, 1, image.shape[-1]))
    smooth = jax.lax.conv_general_dilated(
        image[None], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=image.shape[-1])[0]
    return smooth + factor * (image - smooth)


def _photometric(index, image, m):
    """Operation `OPS[index]` at signed magnitude `m` in [-1, 1]; geometric ones are the identity here."""
    def color(x):
        return pix.adjust_saturation(x, 1.0 + 0.9 * m) if x.shape[-1] == 3 else x

    same = lambda x: x  # noqa: E731
    ops = {
        "identity": same,
        "autocontrast": _autocontrast,
        "brightness": lambda x: pix.adjust_brightness(x, 0.4 * m),
        "color": color,
        "contrast": lambda x: pix.adjust_contrast(x, 1.0 + 0.9 * m),
        "posterize": lambda x: _posterize(x, jnp.round(8.0 - 4.0 * jnp.abs(m))),
        "sharpness": lambda x: _sharpness(x, 1.0 + 0.9 * m),
        "solarize": lambda x: pix.solarize(x, 1.0 - jnp.abs(m)),
    }
    return jnp.clip(jax.lax.switch(index, [ops.get(name, same) for name in OPS], image), 0.0, 1.0)


def _inverse_map(index, m, h, w):
    """Homogeneous `[3, 3]` map from output to input (row, col) of `OPS[index]`, about the centre."""
    angle = jnp.deg2rad(30.0) * m
    c, s = jnp.cos(angle), jnp.sin(angle)
    eye = jnp.eye(3)
    maps = {
        "rotate": jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]),
        "shear_x": eye.at[0, 1].set(0.3 * m),
        "shear_y": eye.at[1, 0].set(0.3 * m),
        "translate_x": eye.at[1, 2].set(0.3 * w * m),
        "translate_y": eye.at[0, 2].set(0.3 * h * m),
    }
    stacked = jnp.stack([maps.get(name, eye) for name in OPS])
    centre = jnp.eye(3).at[:2, 2].set(jnp.array([(h - 1) / 2, (w - 1) / 2]))
    uncentre = jnp.eye(3).at[:2, 2].set(-jnp.array([(h - 1) / 2, (w - 1) / 2]))
    return centre @ stacked[index] @ uncentre


def _warp(image, inverse_map):
    """`image` [H, W, C] resampled at `inverse_map @ (row, col, 1)` (bilinear, 0 outside)."""
    m = jnp.eye(3).at[:2, :2].set(inverse_map[:2, :2])
    offset = jnp.concatenate([inverse_map[:2, 2], jnp.zeros(1)])
    return pix.affine_transform(image, m, offset=offset, order=1, mode="constant", cval=0.0)


def _weak_one(key, image, flip: bool, pad: int):
    h, w, c = image.shape
    crop_key, flip_key = jax.random.split(key)
    if pad:
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        image = pix.random_crop(crop_key, padded, (h, w, c))
    if flip:
        image = pix.random_flip_left_right(flip_key, image)
    return image


def _cutout(key, image, max_fraction: float):
    h, w, _ = image.shape
    k_size, k_y, k_x = jax.random.split(key, 3)
    side = jax.random.uniform(k_size, (), maxval=max_fraction) * min(h, w)
    cy = jax.random.uniform(k_y, (), maxval=h)
    cx = jax.random.uniform(k_x, (), maxval=w)
    ys = jnp.arange(h)[:, None] + 0.5
    xs = jnp.arange(w)[None, :] + 0.5
    inside = (jnp.abs(ys - cy) <= side / 2) & (jnp.abs(xs - cx) <= side / 2)
    return jnp.where(inside[..., None], 0.5, image)


def _strong_one(key, image, flip: bool, pad: int, num_ops: int, cutout: float):
    h, w, _ = image.shape
    k_weak, k_ops, k_cut = jax.random.split(key, 3)
    image = _weak_one(k_weak, image, flip, pad)
    inverse_map = jnp.eye(3)
    for k in jax.random.split(k_ops, num_ops):
        k_idx, k_mag, k_sign = jax.random.split(k, 3)
        index = jax.random.randint(k_idx, (), 0, len(OPS))
        m = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0) * jax.random.uniform(k_mag, ())
        image = _photometric(index, image, m)
        # Applying A then B reads the input at T_A(T_B(o)): compose on the right.
        inverse_map = inverse_map @ _inverse_map(index, m, h, w)
    image = jnp.clip(_warp(image, inverse_map), 0.0, 1.0)
    return _cutout(k_cut, image, cutout) if cutout > 0 else image


def default_pad(size: int) -> int:
    """USB's crop padding: (1 - 0.875) x the image side, at least one pixel."""
    return max(1, int(math.floor(size * 0.125)))


@functools.partial(jax.jit, static_argnames=("flip", "pad"))
def weak(keys, images, *, flip: bool = False, pad: int | None = None):
    """The weak view of every image: random crop of the padded image (and a flip if `flip`).

    Args:
      keys: `[N]` PRNG keys, one per image.
      images: float `[N, H, W, C]` in `[0, 1]`.
      flip: random horizontal flips (not for digits).
      pad: crop padding in pixels; None = `default_pad(H)`.

    Returns:
      float32 `[N, H, W, C]` in `[0, 1]`.

    Example:
      >>> weak(jax.random.split(jax.random.key(1), 2), jnp.zeros((2, 8, 8, 1))).shape
      (2, 8, 8, 1)
    """
    images = jnp.asarray(images, jnp.float32)
    pad = default_pad(images.shape[1]) if pad is None else pad
    return jax.vmap(lambda k, x: _weak_one(k, x, flip, pad))(keys, images)


@functools.partial(jax.jit, static_argnames=("flip", "pad", "num_ops", "cutout"))
def strong(keys, images, *, flip: bool = False, pad: int | None = None, num_ops: int = 3,
           cutout: float = 0.5):
    """The strong view: the weak view, `num_ops` random RandAugment operations, then Cutout.

    Args:
      keys: `[N]` PRNG keys, one per image.
      images: float `[N, H, W, C]` in `[0, 1]`.
      flip: random horizontal flips in the weak part.
      pad: crop padding; None = `default_pad(H)`.
      num_ops: operations per image (USB: 3), each with its own random magnitude.
      cutout: largest Cutout side as a fraction of the image side (USB: 0.5); 0 = none.

    Returns:
      float32 `[N, H, W, C]` in `[0, 1]`.

    Example:
      >>> strong(jax.random.split(jax.random.key(1), 2), jnp.zeros((2, 8, 8, 1))).shape
      (2, 8, 8, 1)
    """
    images = jnp.asarray(images, jnp.float32)
    pad = default_pad(images.shape[1]) if pad is None else pad
    return jax.vmap(lambda k, x: _strong_one(k, x, flip, pad, num_ops, cutout))(keys, images)


def example_keys(key, start, count: int):
    """`count` keys, one per example, from the example's global index `start + i`.

    Folding in the global index makes a view independent of the device split.
    """
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(count))
