"""Tests of dem_jax.data.corruptions: contract, determinism, severity ordering, errors."""

import functools

import numpy as np
import pytest

from dem_jax.data import corruptions
from dem_jax.data.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_dataset
from dem_jax.data.sources import load

# Corruptions that draw no random numbers: the seed must not matter.
DETERMINISTIC = ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression")


@functools.cache
def digits_8x8() -> np.ndarray:
    """16 real 8x8 grayscale digits."""
    return load("digits", "test").images[:16]


@functools.cache
def photos_32x32() -> np.ndarray:
    """9 natural 32x32 RGB crops from scikit-image's bundled photos."""
    import skimage.data
    import skimage.transform

    crops = []
    for photo in (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()):
        h, w = photo.shape[:2]
        side = min(h, w) // 2
        for top, left in ((0, 0), (h // 3, w // 3), (h // 2, w // 4)):
            crop = photo[top:top + side, left:left + side]
            crops.append(skimage.transform.resize(crop, (32, 32), anti_aliasing=True))
    return np.stack(crops).astype(np.float32)


IMAGE_SETS = {"8x8 gray": digits_8x8, "32x32 rgb": photos_32x32}


def test_names_and_order_are_the_imagenet_c_ones():
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    ), "CORRUPTIONS must keep the ImageNet-C names in the paper's continual order"
    assert set(corruptions._FUNCTIONS) == set(CORRUPTIONS), "every name needs an implementation"
    assert SEVERITIES == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("images_name", list(IMAGE_SETS))
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_output_contract_and_determinism(name, images_name):
    images = IMAGE_SETS[images_name]()[:4]
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        where = f"{name} severity {severity} on {images_name}"
        assert out.shape == images.shape, f"{where}: shape {out.shape}, expected {images.shape}"
        assert out.dtype == np.float32, f"{where}: dtype {out.dtype}, expected float32"
        assert 0.0 <= out.min() and out.max() <= 1.0, f"{where}: values leave [0, 1]"
        np.testing.assert_array_equal(
            corrupt(images, name, severity, seed=0), out, err_msg=f"{where}: same seed, different output"
        )
        other = corrupt(images, name, severity, seed=1)
        if name in DETERMINISTIC:
            np.testing.assert_array_equal(other, out, err_msg=f"{where}: draws nothing, yet the seed mattered")
        else:
            assert not np.array_equal(other, out), f"{where}: seeds 0 and 1 gave the same output"


@pytest.mark.parametrize("images_name", list(IMAGE_SETS))
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_distortion_grows_with_severity(name, images_name):
    images = IMAGE_SETS[images_name]()
    distortion = [float(np.abs(corrupt(images, name, s, seed=0) - images).mean()) for s in SEVERITIES]
    shown = ", ".join(f"{d:.4f}" for d in distortion)
    assert all(b >= a for a, b in zip(distortion, distortion[1:])), (
        f"{name} on {images_name}: mean |corrupted - clean| must not fall as severity rises; "
        f"severities 1..5 gave {shown}"
    )
    assert distortion[-1] > distortion[0], f"{name} on {images_name}: severity 5 no worse than 1 ({shown})"
    assert distortion[0] > 0, f"{name} on {images_name}: severity 1 leaves the images unchanged"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 3), (3, 12, 20, 1), (2, 28, 28, 1)])
def test_any_small_shape(shape):
    images = np.random.default_rng(0).random(shape, np.float32)
    for name in CORRUPTIONS:
        out = corrupt(images, name, 5, seed=0)
        assert out.shape == shape and np.isfinite(out).all(), f"{name} failed on shape {shape}"


def test_each_image_gets_its_own_noise():
    image = digits_8x8()[:1]
    out = corrupt(np.repeat(image, 2, axis=0), "gaussian_noise", 3, seed=0)
    assert not np.array_equal(out[0], out[1]), "two copies of one image got identical noise"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_corruptions_do_not_depend_on_the_batch(name):
    # e.g. grayscale JPEG codes a whole batch as one mosaic: it must equal coding each image alone.
    images = np.concatenate([digits_8x8()[:3], load("digits", "train").images[:2]])
    images = np.pad(images, ((0, 0), (3, 2), (1, 4), (0, 0)))  # 13x13: not a multiple of 8
    together = corrupt(images, name, 5, seed=0)
    for k in range(len(images)):
        np.testing.assert_allclose(
            corrupt(images[k:k + 1], name, 5, seed=0)[0], together[k], atol=1e-6,
            err_msg=f"{name}: image {k} corrupted alone differs from the same image in a batch",
        )


def test_corrupt_dataset_names_and_keeps_labels():
    ds = load("digits", "test").subset(np.arange(10))
    out = corrupt_dataset(ds, "gaussian_noise", 5, seed=3)
    assert out.name == "digits-gaussian_noise-5"
    np.testing.assert_array_equal(out.labels, ds.labels, err_msg="labels must not change")
    np.testing.assert_array_equal(out.images, corrupt(ds.images, "gaussian_noise", 5, seed=3))
    assert out.num_classes == ds.num_classes


def test_bad_arguments_raise_clear_errors():
    images = digits_8x8()[:2]
    with pytest.raises(ValueError, match="Valid names: gaussian_noise"):
        corrupt(images, "gaussian", 1, seed=0)
    for severity in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity must be an int in 1..5"):
            corrupt(images, "fog", severity, seed=0)
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        corrupt(images[..., 0], "fog", 1, seed=0)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        corrupt(np.zeros((1, 8, 8, 2), np.float32), "fog", 1, seed=0)
    with pytest.raises(ValueError, match="divide uint8 by 255"):
        corrupt((images * 255).astype(np.uint8), "fog", 1, seed=0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        corrupt(images * 2, "fog", 1, seed=0)
    with_nan = images.copy()
    with_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        corrupt(with_nan, "contrast", 1, seed=0)


def test_command_line_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    corruptions.main(["--source=digits", f"--out={out}", "--index=3", "--seed=1"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the command must write a PNG file"
