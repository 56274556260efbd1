"""Tests for vggjax.data.augment: the paper's preprocessing ops."""

import io

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vggjax.data import augment


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random image: JPEG-friendly, so decodes compare closely."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _positions(h: int, w: int) -> np.ndarray:
    """An image whose pixels name their own (y, x), to locate crops."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)


def test_sample_scale_stays_in_range_and_reaches_both_ends():
    rng = np.random.default_rng(0)
    draws = {augment.sample_scale(rng, 256, 260) for _ in range(500)}
    assert draws == {256, 257, 258, 259, 260}
    assert {augment.sample_scale(rng, 384, 384) for _ in range(20)} == {384}
    with pytest.raises(ValueError):
        augment.sample_scale(rng, 5, 4)


@pytest.mark.parametrize(
    "shape, s, expected",
    [
        ((30, 40, 3), 64, (64, 85, 3)),  # Landscape, upscaled.
        ((40, 30, 3), 64, (85, 64, 3)),  # Portrait, upscaled.
        ((300, 500, 3), 256, (256, 427, 3)),  # Downscaled.
        ((77, 77, 3), 50, (50, 50, 3)),
    ],
)
def test_rescale_makes_smallest_side_exactly_s(shape, s, expected):
    image = _photo(*shape[:2])
    out = augment.rescale_smallest_side(image, s)
    assert out.shape == expected and out.dtype == np.uint8


def test_rescale_keeps_colours():
    image = np.full((20, 30, 3), (10, 200, 90), np.uint8)
    assert (augment.rescale_smallest_side(image, 57) == (10, 200, 90)).all()
    for size in ((57, 85), (11, 17), (20, 13)):
        assert (augment.resize_antialiased(image, size) == (10, 200, 90)).all()


@pytest.mark.parametrize("shrink", [1.02, 1.1, 1.2, 1.35, 1.5, 1.75, 1.95, 2.5, 3.5, 0.7, 0.45])
def test_training_rescale_is_close_to_pils(shrink):
    """Training's OpenCV rescale against PIL's bilinear (evaluation's, torchvision's) on a
    photo-like JPEG (1/f spectrum, sharp-edged discs, quality 90). Measured mean absolute
    differences: 1.1-1.6 grey levels for shrinks of 1.02-1.5, 0.4-1.0 from 1.75 on, 0.2 when
    enlarging; 99th percentiles of 7, 1."""
    photo = _natural(480, 640)
    height = round(480 / shrink)
    size = augment.rescaled_size(photo.shape, height)
    fast = augment.resize_antialiased(photo, size).astype(float)
    pil = augment.rescale_smallest_side(photo, height).astype(float)
    assert fast.shape == pil.shape == (*size, 3)
    difference = np.abs(fast - pil)
    assert difference.mean() < (2.0 if shrink > 1 else 0.3)
    assert np.percentile(difference, 99) <= (8 if shrink > 1 else 1)


@pytest.mark.parametrize("height", [380, 300, 262, 240, 150])
def test_training_rescale_is_antialiased(height):
    """One-pixel stripes shrunk by 1.1-2.8 (a plain bilinear leaves them at a std of 64-82):
    PIL's widened bilinear damps them towards grey, and training's rescale nearly as much
    (measured: at most 8 grey levels more std than PIL's, near a shrink of 1.5-1.6)."""
    stripes = np.zeros((420, 420, 3), np.uint8)
    stripes[:, ::2] = 255
    pil = augment.rescale_smallest_side(stripes, height)[4:-4, 4:-4].std()
    fast = augment.resize_antialiased(stripes, (height, height))[4:-4, 4:-4].std()
    plain = cv2.resize(stripes, (height, height), interpolation=cv2.INTER_LINEAR)
    assert plain[4:-4, 4:-4].std() > pil + 10  # so the bound below tells them apart
    assert fast < pil + 10


def test_random_crop_is_a_window_at_varied_positions():
    image, rng = _positions(50, 60), np.random.default_rng(0)
    corners = set()
    for _ in range(200):
        crop, window = augment.train_crop(image, rng, crop=32, s_min=50, s_max=50)
        crop = crop[:, ::-1] if window.flipped else crop
        assert crop.shape == (32, 32, 3)
        y, x = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        assert (y, x) == window.offset
        np.testing.assert_array_equal(crop, image[y : y + 32, x : x + 32])
        corners.add((y, x))
    ys, xs = zip(*corners)
    assert (min(ys), max(ys), min(xs), max(xs)) == (0, 18, 0, 28)


def test_center_crop_is_central():
    image = _positions(50, 61)
    np.testing.assert_array_equal(augment.center_crop(image, 32), image[9:41, 14:46])
    with pytest.raises(ValueError, match="cannot crop"):
        augment.center_crop(image, 51)
    with pytest.raises(ValueError, match="cannot crop"):
        augment.train_crop(image, np.random.default_rng(0), crop=51, s_min=50, s_max=50)


def test_random_flip_mirrors_about_half_the_time():
    image, rng = _positions(8, 8), np.random.default_rng(0)
    flips = 0
    for _ in range(1000):
        out, window = augment.train_crop(image, rng, crop=8, s_min=8, s_max=8)
        assert window.flipped == np.array_equal(out, image[:, ::-1])
        if window.flipped:
            flips += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 440 < flips < 560  # Binomial(1000, 0.5): about 4 sd either side.


def test_colour_shift_is_one_pca_shift_per_image():
    """Drawn on the host (3 numbers an image, with the crop's rng), added to every pixel of its
    image in the step (`net_input`, jitted here as in train_step)."""
    image = _photo(6, 7)
    rng = np.random.default_rng(0)
    shifts = np.stack([augment.colour_shift(rng, std=0.1) for _ in range(4000)])
    assert shifts.dtype == np.float32 and shifts.shape == (4000, 3)
    batch = {"image": np.stack([image] * 4), "shift": shifts[:4]}
    for out in (augment.net_input(batch), jax.jit(augment.net_input)(batch)):
        assert out.dtype == np.float32 and out.shape == (4, 6, 7, 3)
        delta = (np.asarray(out) - image.astype(np.float32)).reshape(4, -1, 3)
        np.testing.assert_allclose(delta, np.repeat(shifts[:4, None], 42, 1), atol=1e-4)
    # In the eigenbasis the shift is alpha * eigval * 255, alpha ~ N(0, 0.1).
    alphas = shifts @ augment.IMAGENET_EIGVEC / (augment.IMAGENET_EIGVAL * 255)
    np.testing.assert_allclose(alphas.std(0), 0.1, rtol=0.05)
    np.testing.assert_allclose(alphas.mean(0), 0.0, atol=0.01)
    # Per channel: std = 255 * 0.1 * |eigvec[c] * eigval|.
    expected = 25.5 * np.linalg.norm(augment.IMAGENET_EIGVEC * augment.IMAGENET_EIGVAL, axis=1)
    np.testing.assert_allclose(shifts.std(0), expected, rtol=0.05)
    np.testing.assert_allclose(expected, (3.17, 3.22, 3.25), atol=0.01)


def test_colour_shift_with_zero_std_is_none():
    np.testing.assert_array_equal(augment.colour_shift(np.random.default_rng(0), std=0.0), 0)


def test_subtract_mean():
    image = np.full((2, 3, 3), (100, 120, 140), np.uint8)
    out = augment.subtract_mean(image, (123.68, 116.779, 103.939))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2], (-23.68, 3.221, 36.061), rtol=1e-5)


def test_net_input_adds_the_shift_or_takes_ready_images():
    image = np.full((2, 3, 4, 3), (100, 120, 140), np.uint8)
    mean = (123.68, 116.779, 103.939)
    shift = np.stack([augment.subtract_mean(np.zeros(3), mean), np.float32([1, 2, 3])])
    out = augment.net_input({"image": jnp.asarray(image), "shift": jnp.asarray(shift)})
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[0], augment.subtract_mean(image[0], mean), rtol=1e-6)
    np.testing.assert_allclose(out[1, 2, 3], (101, 122, 143))
    ready = np.zeros((2, 3, 4, 3), np.float32)
    assert augment.net_input({"image": ready}) is ready  # synthetic batches: the net's input


def _rgba() -> Image.Image:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:2, ..., 3] = 255  # Top half opaque, bottom half transparent.
    return Image.fromarray(rgba, "RGBA")


@pytest.mark.parametrize(
    "make, expected_pixel",
    [
        (lambda: _encode(Image.new("L", (5, 4), 77), "PNG"), (77, 77, 77)),
        (lambda: _encode(Image.new("RGB", (5, 4), (9, 8, 7)), "PNG"), (9, 8, 7)),
        (
            lambda: _encode(
                Image.new("RGB", (5, 4), (200, 30, 90)).convert("P", palette=Image.ADAPTIVE), "PNG"
            ),
            (200, 30, 90),
        ),
        (lambda: _encode(_rgba(), "PNG"), (200, 100, 50)),
        (lambda: _encode(Image.new("LA", (5, 4), (60, 255)), "PNG"), (60, 60, 60)),
        (
            lambda: _encode(Image.fromarray(np.full((4, 5), 257 * 100, np.uint16)), "PNG"),
            (100, 100, 100),
        ),
        (
            lambda: _encode(Image.fromarray(np.full((4, 5), 65535, np.int32)), "TIFF"),
            (255, 255, 255),
        ),
        (lambda: np.full((4, 5, 3), 42, np.uint8), (42, 42, 42)),
        (lambda: np.full((4, 5), 42, np.uint8), (42, 42, 42)),
    ],
    ids=[
        "gray",
        "rgb",
        "palette",
        "rgba",
        "gray_alpha",
        "16bit_png",
        "32bit_tiff",
        "array",
        "gray_array",
    ],
)
def test_decode_gives_rgb_uint8(make, expected_pixel):
    image = augment.decode_image(make())
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[0, 0], expected_pixel)


def test_decode_16bit_png_scales_instead_of_clipping():
    ramp = np.linspace(0, 65535, 20).astype(np.uint16).reshape(4, 5)
    image = augment.decode_image(_encode(Image.fromarray(ramp), "PNG"))
    np.testing.assert_array_equal(image[..., 0], ramp // 257)


def test_decode_composites_transparency_on_black():
    image = augment.decode_image(_encode(_rgba(), "PNG"))
    assert (image[:2] == (200, 100, 50)).all() and (image[2:] == 0).all()


@pytest.mark.parametrize(
    "mode, options",
    [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}), ("L", {})],
    ids=["baseline", "progressive", "444", "grey"],
)
def test_decode_jpeg_gives_pils_pixels_at_every_draft_size(mode, options):
    photo = Image.fromarray(_natural(301, 403)).convert(mode)
    data = _encode(photo, "JPEG", quality=90, **options)
    for min_side, size in ((None, (301, 403)), (150, (151, 202)), (75, (76, 101)), (37, (38, 51))):
        pil = Image.open(io.BytesIO(data))
        if min_side:
            pil.draft("RGB", (min_side, min_side))
        expected = np.asarray(pil.convert("RGB"))
        assert expected.shape == (*size, 3)
        np.testing.assert_array_equal(augment.decode_image(data, min_side=min_side), expected)


def test_decode_cmyk_jpeg():
    cmyk = Image.new("RGB", (16, 16), (250, 20, 20)).convert("CMYK")
    image = augment.decode_image(_encode(cmyk, "JPEG", quality=95))
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert image[8, 8, 0] > 200 and image[8, 8, 1:].max() < 60


@pytest.mark.parametrize(
    "data",
    [
        b"",
        _encode(Image.fromarray(_photo(64, 64)), "JPEG")[:300],
        b"this is a text file, not an image\n",
        np.zeros((4, 5, 3), np.float64),
    ],
    ids=["empty", "truncated_jpeg", "text", "float_array"],
)
def test_decode_rejects_non_images(data):
    with pytest.raises(augment.BadImageError):
        augment.decode_image(data)
    assert issubclass(augment.BadImageError, ValueError)


def test_decode_rejects_decompression_bombs_as_pil_does(monkeypatch):
    data = _encode(Image.fromarray(_photo(64, 64)), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2 - 1)  # PIL's error: 2x the limit
    with pytest.raises(augment.BadImageError, match="decompression bomb"):
        augment.decode_image(data, min_side=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 2)
    assert augment.decode_image(data, min_side=8).shape == (8, 8, 3)


def test_decode_draft_keeps_smallest_side_at_least_min_side():
    photo = _photo(600, 800)
    data = _encode(Image.fromarray(photo), "JPEG", quality=95)
    assert augment.decode_image(data).shape == (600, 800, 3)
    small = augment.decode_image(data, min_side=100)
    assert small.shape == (150, 200, 3)  # Decoded at 1/4 size.
    assert augment.decode_image(data, min_side=300).shape == (300, 400, 3)
    assert augment.decode_image(data, min_side=301).shape == (600, 800, 3)
    # After the rescale, drafting changes pixels only slightly.
    fast = augment.rescale_smallest_side(small, 100).astype(float)
    full = augment.rescale_smallest_side(photo, 100).astype(float)
    assert np.abs(fast - full).mean() < 2


def test_train_transform_shape_and_determinism():
    data = _encode(Image.fromarray(_photo(90, 120)), "JPEG")
    kwargs = dict(crop=32, s_min=32, s_max=64)
    outs = [
        augment.train_crop(data, np.random.default_rng(seed), **kwargs)[0] for seed in (0, 0, 1)
    ]
    assert outs[0].shape == (32, 32, 3) and outs[0].dtype == np.uint8
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


def test_train_crop_is_its_window_of_the_training_rescale():
    photo = _natural(300, 400)
    data = _encode(Image.fromarray(photo), "PNG")
    for seed in range(6):
        crop, window = augment.train_crop(
            data, np.random.default_rng(seed), crop=64, s_min=80, s_max=200
        )
        rescaled = augment.resize_antialiased(photo, window.rescaled)
        np.testing.assert_array_equal(crop, window.cut(rescaled))


def test_eval_transform_is_centre_crop_of_rescaled_image():
    photo = _photo(90, 120)
    data = _encode(Image.fromarray(photo), "PNG")
    out, window = augment.eval_crop(data, crop=48, q=64)
    assert window == augment.Window((64, 85), (8, 18), 48)
    expected = augment.center_crop(augment.rescale_smallest_side(photo, 64), 48)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8


# Helpers ---------------------------------------------------------------------------------------


def _natural(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image, as decoded from a quality-90 JPEG: correlated RGB noise with a 1/f
    amplitude spectrum (as natural images have) and a few sharp-edged discs of flat colour."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None]
    amplitude = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    channels = [
        np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), (h, w))
        for _ in range(3)
    ]
    mix = np.array([[1, 0.9, 0.8], [0.9, 1, 0.9], [0.8, 0.9, 1]])
    x = np.stack(channels, -1) @ mix
    x = (x - x.mean()) / x.std() * 45 + 120
    y, xx = np.mgrid[:h, :w]
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, min(h, w) // 4)
        x[(y - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    data = _encode(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)), "JPEG", quality=90)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_padded_crop_reaches_past_each_edge_by_the_padding():
    image, rng = _positions(10, 12), np.random.default_rng(0)
    padded = np.pad(image, ((3, 3), (3, 3), (0, 0)))
    offsets = set()
    for _ in range(300):
        crop, window = augment.train_crop(image, rng, crop=8, s_min=10, s_max=10, pad=3)
        y, x = window.offset
        cut = padded[y + 3 : y + 11, x + 3 : x + 11]
        np.testing.assert_array_equal(crop, cut[:, ::-1] if window.flipped else cut)
        offsets.add(window.offset)
    ys, xs = zip(*offsets)
    assert (min(ys), max(ys), min(xs), max(xs)) == (-3, 5, -3, 7)
    with pytest.raises(ValueError, match="cannot crop"):
        augment.random_window(rng, (10, 12), crop=17, pad=3)


def test_flips_can_be_turned_off():
    image, rng = _positions(8, 8), np.random.default_rng(0)
    for _ in range(50):
        out, window = augment.train_crop(image, rng, crop=8, s_min=8, s_max=8, flip=False)
        assert not window.flipped
        np.testing.assert_array_equal(out, image)


def test_cut_batch_is_each_windows_cut():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 9, 11, 3), dtype=np.uint8)
    windows = [augment.random_window(rng, (9, 11), crop=8, pad=2) for _ in images]
    crops = augment.cut_batch(
        images, np.array([w.offset for w in windows]), 8, np.array([w.flipped for w in windows])
    )
    assert {w.flipped for w in windows} == {True, False}
    for crop, image, window in zip(crops, images, windows):
        np.testing.assert_array_equal(crop, window.cut(image))
