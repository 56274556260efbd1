"""The paper's image preprocessing (Sect. 3.1): host-side functions on numpy arrays.

Training: isotropic rescale to a sampled smallest side S, random crop, random horizontal flip
(`train_crop`, a uint8 crop; for small images the crop may reach `pad` pixels past the image's
edges, which are zeros: the padding-and-crop of CIFAR and MNIST recipes, and flips may be off), Krizhevsky's RGB colour shift and mean RGB subtraction (one RGB
`shift` per image, drawn on the host with the crop's randomness and added to its pixels by
`net_input` inside the jitted step: the host sends uint8 crops, a quarter of float32's bytes,
and does no float work). Evaluation: rescale to Q, centre crop (`eval_crop`), minus the mean.
Each crop comes with its `Window`, which carries boxes through the rescale, crop and flip
exactly (localisation, Appendix A).

Decoding is libjpeg-turbo's through simplejpeg for JPEGs (the same pixels as PIL's, faster:
BENCHMARKS.md, Input pipeline), PIL's for everything else. Evaluation rescales with PIL's
antialiased bilinear; training with OpenCV's SIMD bilinear after a Gaussian blur
(`resize_antialiased`), a few grey levels from PIL's.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image


@functools.cache
def _cv2() -> Any:
    """OpenCV, imported on first use with one thread (parallelism comes from grain's workers;
    OpenCV's threads would fight them). Not at import: cv2's import writes LD_LIBRARY_PATH into
    the environment, and importing vggjax changes nothing of the user's; it is put back."""
    before = os.environ.get("LD_LIBRARY_PATH")
    import cv2

    if before is None:
        os.environ.pop("LD_LIBRARY_PATH", None)
    else:
        os.environ["LD_LIBRARY_PATH"] = before
    cv2.setNumThreads(1)
    return cv2


# Krizhevsky et al. (2012) PCA of ImageNet RGB pixels on the [0, 1] scale.
IMAGENET_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_EIGVEC = np.array(  # Columns are the eigenvectors, rows are R, G, B.
    [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)

_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class BadImageError(ValueError):
    """Data that is not a decodable image; pipelines mask such examples out."""


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode to uint8 RGB; transparency is composited on black."""
    if image.mode in _WIDE_INT_MODES:
        # PIL's convert clips 16-bit values at 255; scale the 16-bit range instead.
        wide = np.clip(np.asarray(image, np.int64), 0, 65535) // 257
        image = Image.fromarray(wide.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size)
        image.paste(rgba, mask=rgba.getchannel("A"))
    return np.asarray(image.convert("RGB"))


def _draft_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The JPEG decoding reduction (1, 2, 4 or 8; DCT-domain, so much faster for large photos that
    are about to be downscaled) that keeps the smallest side >= min_side: PIL's draft rule."""
    fits = min(size) // min_side if min_side else 1
    return next(k for k in (8, 4, 2, 1) if k <= max(fits, 1))


def _decode_jpeg(data: bytes, min_side: int | None) -> np.ndarray:
    """A YCbCr or greyscale JPEG through simplejpeg; ValueError for anything else (CMYK, broken
    data, more pixels than PIL's decompression-bomb limit), which PIL then decodes or rejects.
    Only the power-of-two reductions: libjpeg-turbo's others (e.g. 6/8) have no SIMD and decode
    slower than the whole image."""
    height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    if colourspace not in ("YCbCr", "Gray"):
        raise ValueError(f"{colourspace} JPEG")
    if Image.MAX_IMAGE_PIXELS and height * width > 2 * Image.MAX_IMAGE_PIXELS:
        raise ValueError("a decompression bomb")
    k = _draft_factor((height, width), min_side)
    return simplejpeg.decode_jpeg(data, min_height=-(-height // k), min_width=-(-width // k))


def decode_image(data: bytes | np.ndarray, min_side: int | None = None) -> np.ndarray:
    """Decodes encoded image bytes (or wraps a decoded array) to uint8 HxWx3.

    With `min_side`, JPEGs are decoded at 1/2, 1/4 or 1/8 size when the
    smallest side stays >= min_side, which is much faster for large photos
    that are about to be downscaled anyway.
    """
    if isinstance(data, np.ndarray):
        try:
            return _to_rgb(Image.fromarray(data))
        except (TypeError, ValueError) as e:
            raise BadImageError(
                f"array of shape {data.shape} and dtype {data.dtype} is not an image: {e}"
            ) from e
    if not data:
        raise BadImageError("empty image data (0 bytes)")
    if data[:2] == b"\xff\xd8":  # a JPEG's start-of-image marker
        try:
            return _decode_jpeg(data, min_side)
        except ValueError:
            pass  # not for simplejpeg: PIL decides, with the same pixels where both can
    try:
        image = Image.open(io.BytesIO(data))
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode image: {e}") from e


def rescaled_size(shape: tuple[int, ...], s: int) -> tuple[int, int]:
    """(height, width) of an image of `shape` isotropically rescaled so that min(H, W) == s."""
    h, w = shape[:2]
    return (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)


def rescale_smallest_side(image: np.ndarray, s: int) -> np.ndarray:
    """Isotropic resize of a uint8 image so that min(H, W) == s exactly, with PIL's bilinear
    filter, which widens its support when shrinking (antialiasing): evaluation's rescale."""
    if min(image.shape[:2]) == s:
        return image
    height, width = rescaled_size(image.shape, s)
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


# σ of the blur before a bilinear shrink by f, in source pixels per unit of f. At 0.4 f training's
# rescale stays within 1.6 grey levels (mean absolute difference) of PIL's on photo-like images,
# and damps one-pixel stripes more than OpenCV's INTER_AREA, if less than PIL near f = 1.5
# (tests/test_augment.py); a σ that matched PIL more closely on photos would damp stripes less.
_BLUR_PER_SHRINK = 0.4


def resize_antialiased(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 image → (height, width) with OpenCV's SIMD bilinear, after a Gaussian blur along each
    shrunk axis: antialiased like PIL's bilinear (which widens its kernel instead), and faster
    (BENCHMARKS.md, Input pipeline). Pixel centres map as in PIL, so boxes follow it as they
    follow PIL's rescale."""
    (h, w), (height, width) = image.shape[:2], size
    sigma_y, sigma_x = (_BLUR_PER_SHRINK * f if f > 1 else 0.0 for f in (h / height, w / width))
    if sigma_y or sigma_x:
        ksize = tuple(2 * math.ceil(3 * sigma) + 1 for sigma in (sigma_x, sigma_y))
        image = _cv2().GaussianBlur(image, ksize, sigmaX=sigma_x, sigmaY=sigma_y)
    return _cv2().resize(image, (width, height), interpolation=_cv2().INTER_LINEAR)


def sample_scale(rng: np.random.Generator, s_min: int, s_max: int) -> int:
    """Training scale S ~ U{s_min, ..., s_max}; fixed S when s_min == s_max."""
    if s_min > s_max:
        raise ValueError(f"scale range [{s_min}, {s_max}] is empty")
    return int(rng.integers(s_min, s_max + 1))


def _check_fits(image: np.ndarray, size: int) -> tuple[int, int]:
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from a {h}x{w} image")
    return h, w


def _centre_offset(image: np.ndarray, size: int) -> tuple[int, int]:
    h, w = _check_fits(image, size)
    return (h - size) // 2, (w - size) // 2


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window."""
    return Window(image.shape[:2], _centre_offset(image, size), size).cut(image)


def random_window(
    rng: np.random.Generator, rescaled: tuple[int, int], crop: int, pad: int = 0, flip: bool = True
) -> Window:
    """Sect. 3.1's random crop x crop window of an image rescaled to `rescaled` (height, width),
    mirrored half the time when `flip`. With `pad`, the window may reach that many pixels past
    each edge (zeros there): the small-image recipes' padding and random crop."""
    rows, cols = window_positions(np.asarray(rescaled), crop, pad)
    offset = (int(rng.integers(0, rows)) - pad, int(rng.integers(0, cols)) - pad)
    return Window(rescaled, offset, crop, flipped=flip and bool(rng.random() < 0.5))


def window_positions(rescaled: np.ndarray, crop: int, pad: int) -> np.ndarray:
    """How many top and left offsets `random_window` draws from, for images rescaled to
    `rescaled` (..., 2: height, width); ValueError where the window does not fit."""
    span, sizes = crop - 2 * pad, rescaled.reshape(-1, 2)
    too_small = sizes[(sizes < span).any(axis=1)]
    if len(too_small):
        h, w = too_small[0]
        raise ValueError(f"cannot crop {crop}x{crop} from a {h}x{w} image padded by {pad}")
    return rescaled - span + 1


def cut_batch(
    images: np.ndarray, offsets: np.ndarray, size: int, flipped: np.ndarray
) -> np.ndarray:
    """`Window.cut` of each image of a batch (B, H, W, C) of one shape: the size x size crops at
    `offsets` (B, 2) (zeros past the edges), mirrored where `flipped` (B,). A slice per image:
    a third of the time of one fancy-index gather over the batch."""
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    (h, w), channels = images.shape[1:3], images.shape[3]
    pad = max(0, -offsets.min(initial=0), *(offsets.max(axis=0, initial=0) + size - (h, w)))
    if pad:  # (np.pad is several times slower than this copy)
        canvas = np.zeros((len(images), h + 2 * pad, w + 2 * pad, channels), images.dtype)
        canvas[:, pad : pad + h, pad : pad + w] = images
        images = canvas
    crops = np.empty((len(images), size, size, channels), images.dtype)
    corners, mirrored = (offsets + pad).tolist(), np.asarray(flipped, bool).reshape(-1).tolist()
    for i, ((top, left), flip) in enumerate(zip(corners, mirrored)):
        window = images[i, top : top + size, left : left + size]
        crops[i] = window[:, ::-1] if flip else window
    return crops


def colour_shift(rng: np.random.Generator, std: float = 0.1) -> np.ndarray:
    """Krizhevsky's PCA lighting on the 0-255 scale: the RGB shift (3,) of one image, added to
    each of its pixels (`net_input`). With std 0, zeros, drawing nothing: it is each training
    image's last draw, so skipping it changes no other (3 µs an image saved)."""
    if std == 0:
        return np.zeros(3, np.float32)
    alpha = rng.normal(0.0, std, size=3).astype(np.float32)
    return IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL) * np.float32(255.0)


def random_shift(
    rng: np.random.Generator, colour_std: float, mean_rgb: Sequence[float]
) -> np.ndarray:
    """A training image's RGB `shift` (`net_input`): its colour shift minus the mean RGB."""
    return subtract_mean(colour_shift(rng, colour_std), mean_rgb)


def subtract_mean(image: Any, mean_rgb: Sequence[float]) -> Any:
    """Centres pixels (0–255, RGB last) on the training set's mean RGB: the paper's only
    normalisation and every vggjax net's input. numpy in, numpy out; jax in (also traced), jax out."""
    return image.astype(np.float32) - np.asarray(mean_rgb, np.float32)


def net_input(batch: dict[str, Any]) -> Any:
    """A batch's images as the net takes them: the uint8 crops plus each image's RGB `shift` (its
    colour shift minus the mean RGB), float32. A batch without `shift` holds them ready (synthetic
    data). numpy in, numpy out; jax in (inside the jitted step), jax out."""
    if "shift" not in batch:
        return batch["image"]
    return batch["image"].astype(np.float32) + batch["shift"][:, None, None, :]


@dataclasses.dataclass(frozen=True)
class Window:
    """Where a crop lies: the size x size window at `offset` (top, left) of the image rescaled to
    `rescaled` (height, width), mirrored or not. Boxes follow it exactly (`boxes`)."""

    rescaled: tuple[int, int]
    offset: tuple[int, int]
    size: int
    flipped: bool = False

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The window's pixels of the rescaled image (zeros where it reaches past its edges)."""
        (y, x), s, (h, w) = self.offset, self.size, image.shape[:2]
        pad = max(0, -y, -x, y + s - h, x + s - w)
        if pad:
            image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        crop = image[y + pad : y + pad + s, x + pad : x + pad + s]
        return crop[:, ::-1] if self.flipped else crop

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (K, 4): x0, y0, x1, y1 as fractions of the whole image's width and height →
        pixel edges of the crop, mirrored with it; parts outside the crop are kept."""
        (h, w), (y, x) = self.rescaled, self.offset
        b = np.asarray(boxes, np.float64) * [w, h, w, h] - [x, y, x, y]
        if self.flipped:
            b = np.stack([self.size - b[:, 2], b[:, 1], self.size - b[:, 0], b[:, 3]], axis=1)
        return b


def train_rescale(image: np.ndarray, s: int) -> np.ndarray:
    """Training's isotropic rescale of a decoded image to smallest side S (`resize_antialiased`)."""
    if min(image.shape[:2]) == s:
        return image
    return resize_antialiased(image, rescaled_size(image.shape, s))


def train_crop(
    data: bytes | np.ndarray,
    rng: np.random.Generator,
    *,
    crop: int,
    s_min: int,
    s_max: int,
    pad: int = 0,
    flip: bool = True,
) -> tuple[np.ndarray, Window]:
    """Sect. 3.1's rescale to S, random crop and flip (`random_window`): uint8 crop x crop x 3,
    and the window it was cut from. The colour shift (`random_shift`) is drawn next, from the
    same rng."""
    s = sample_scale(rng, s_min, s_max)
    image = train_rescale(decode_image(data, min_side=s), s)
    window = random_window(rng, image.shape[:2], crop, pad, flip)
    return window.cut(image), window


def eval_crop(data: bytes | np.ndarray, *, crop: int, q: int) -> tuple[np.ndarray, Window]:
    """Single centre crop at test scale Q: uint8 crop x crop x 3, and its window."""
    image = rescale_smallest_side(decode_image(data, min_side=q), q)
    window = Window(image.shape[:2], _centre_offset(image, crop), crop)
    return window.cut(image), window
