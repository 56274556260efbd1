"""The paper's image preprocessing (Sect. 3.1) as pure numpy/PIL functions.

Training: isotropic rescale to a sampled smallest side S, random crop, random
horizontal flip, Krizhevsky's RGB colour shift, mean RGB subtraction.
Evaluation: rescale to Q, centre crop, mean subtraction.
Each crop comes with its `Window`, which carries boxes through the rescale, crop and flip
exactly (localisation, Appendix A).
"""

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

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
    try:
        image = Image.open(io.BytesIO(data))
        if min_side is not None and image.format == "JPEG":
            image.draft("RGB", (min_side, min_side))
        image.load()
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BadImageError(f"cannot decode image: {e}") from e


def rescale_smallest_side(image: np.ndarray, s: int) -> np.ndarray:
    """Isotropic resize of a uint8 image so that min(H, W) == s exactly."""
    h, w = image.shape[:2]
    if min(h, w) == s:
        return image
    if h <= w:
        size = (max(s, round(w * s / h)), s)  # PIL sizes are (width, height).
    else:
        size = (s, max(s, round(h * s / w)))
    # PIL's bilinear filter widens its support when shrinking (antialiasing).
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


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


def _random_offset(image: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int]:
    h, w = _check_fits(image, size)
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def _centre_offset(image: np.ndarray, size: int) -> tuple[int, int]:
    h, w = _check_fits(image, size)
    return (h - size) // 2, (w - size) // 2


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central size x size window."""
    return Window(image.shape[:2], _centre_offset(image, size), size).cut(image)


def colour_shift(image: np.ndarray, rng: np.random.Generator, std: float = 0.1) -> np.ndarray:
    """Krizhevsky's PCA lighting on the 0-255 scale: one RGB shift per image."""
    alpha = rng.normal(0.0, std, size=3).astype(np.float32)
    shift = IMAGENET_EIGVEC @ (alpha * IMAGENET_EIGVAL) * 255.0
    return image.astype(np.float32) + shift


def subtract_mean(image: Any, mean_rgb: Sequence[float]) -> Any:
    """Centres pixels (0–255, RGB last) on the training set's mean RGB: the paper's only
    normalisation and every vggjax net's input. numpy in, numpy out; jax in (also traced), jax out."""
    return image.astype(np.float32) - np.asarray(mean_rgb, np.float32)


@dataclasses.dataclass(frozen=True)
class Window:
    """Where a crop lies: the size x size window at `offset` (top, left) of the image rescaled to
    `rescaled` (height, width), mirrored or not. Boxes follow it exactly (`boxes`)."""

    rescaled: tuple[int, int]
    offset: tuple[int, int]
    size: int
    flipped: bool = False

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The window's pixels of the rescaled image."""
        (y, x), s = self.offset, self.size
        crop = image[y : y + s, x : x + s]
        return crop[:, ::-1] if self.flipped else crop

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (K, 4): x0, y0, x1, y1 as fractions of the whole image's width and height →
        pixel edges of the crop, mirrored with it; parts outside the crop are kept."""
        (h, w), (y, x) = self.rescaled, self.offset
        b = np.asarray(boxes, np.float64) * [w, h, w, h] - [x, y, x, y]
        if self.flipped:
            b = np.stack([self.size - b[:, 2], b[:, 1], self.size - b[:, 0], b[:, 3]], axis=1)
        return b


def train_crop(
    data: bytes | np.ndarray,
    rng: np.random.Generator,
    *,
    crop: int,
    s_min: int,
    s_max: int,
    mean_rgb: Sequence[float],
    colour_std: float,
) -> tuple[np.ndarray, Window]:
    """Sect. 3.1 training augmentation: float32 crop x crop x 3, and the window it was cut from."""
    s = sample_scale(rng, s_min, s_max)
    image = rescale_smallest_side(decode_image(data, min_side=s), s)
    offset = _random_offset(image, crop, rng)
    window = Window(image.shape[:2], offset, crop, flipped=bool(rng.random() < 0.5))
    return subtract_mean(colour_shift(window.cut(image), rng, colour_std), mean_rgb), window


def eval_crop(
    data: bytes | np.ndarray, *, crop: int, q: int, mean_rgb: Sequence[float]
) -> tuple[np.ndarray, Window]:
    """Single centre crop at test scale Q: float32 crop x crop x 3, and its window."""
    image = rescale_smallest_side(decode_image(data, min_side=q), q)
    window = Window(image.shape[:2], _centre_offset(image, crop), crop)
    return subtract_mean(window.cut(image), mean_rgb), window
