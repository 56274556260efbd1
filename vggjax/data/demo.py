"""A small procedural shapes data set, so training runs end to end anywhere.

Layout (the folder source's): `train/<class>/NNNN.jpg`, `val/<class>/NNNN.jpg`
and `boxes.json` mapping each relative path to the object's bounding box
`[x0, y0, x1, y1]` in pixels of the stored image (x1, y1 exclusive).
Every image is drawn from its own seed, so the set is identical on every
machine and the first images do not depend on the per-class counts.
"""

import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from vggjax.errors import UserError

CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "frame",
    "saltire",
    "crescent",
)
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 50
SEED = 20140904  # The paper's arXiv v1 date.
DIRNAME = "demo-v1"
BOXES_FILE = "boxes.json"
_SUPERSAMPLE = 4  # Shapes are drawn at 4x and reduced, for smooth edges.


def default_root() -> str:
    """`$VGGJAX_CACHE/demo-v1`, else `~/.cache/vggjax/demo-v1`."""
    cache = os.environ.get("VGGJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "vggjax"
    )
    return os.path.join(cache, DIRNAME)


def _star(n: int = 5, inner: float = 0.4) -> list[tuple[float, float]]:
    radii = [0.5, 0.5 * inner] * n
    angles = [math.pi * (k / n - 0.5) for k in range(2 * n)]
    return [(0.5 + r * math.cos(a), 0.5 + r * math.sin(a)) for r, a in zip(radii, angles)]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, w: int, h: int) -> None:
    """Draws class `name` filling a w x h box, in unit-square coordinates."""

    def box(x0, y0, x1, y1):
        return (x0 * w, y0 * h, x1 * w - 1, y1 * h - 1)

    def poly(points):
        return [(x * (w - 1), y * (h - 1)) for x, y in points]

    if name == "circle":
        draw.ellipse(box(0, 0, 1, 1), fill=255)
    elif name == "square":
        draw.rectangle(box(0, 0, 1, 1), fill=255)
    elif name == "triangle":
        draw.polygon(poly([(0.5, 0), (1, 1), (0, 1)]), fill=255)
    elif name == "star":
        draw.polygon(poly(_star()), fill=255)
    elif name == "cross":
        draw.rectangle(box(0.34, 0, 0.66, 1), fill=255)
        draw.rectangle(box(0, 0.34, 1, 0.66), fill=255)
    elif name == "ring":
        draw.ellipse(box(0, 0, 1, 1), fill=255)
        draw.ellipse(box(0.3, 0.3, 0.7, 0.7), fill=0)
    elif name == "diamond":
        draw.polygon(poly([(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]), fill=255)
    elif name == "frame":
        draw.rectangle(box(0, 0, 1, 1), fill=255)
        draw.rectangle(box(0.28, 0.28, 0.72, 0.72), fill=0)
    elif name == "saltire":
        t = 0.16
        draw.polygon(poly([(0, t), (t, 0), (1, 1 - t), (1 - t, 1)]), fill=255)
        draw.polygon(poly([(1 - t, 0), (1, t), (t, 1), (0, 1 - t)]), fill=255)
    elif name == "crescent":
        draw.ellipse(box(0, 0, 1, 1), fill=255)
        draw.ellipse(box(0.35, -0.05, 1.25, 0.95), fill=0)
    else:
        raise ValueError(f"unknown demo class {name!r}")


def _shape_mask(name: str, w: int, h: int) -> Image.Image:
    s = _SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s))
    _draw_shape(ImageDraw.Draw(mask), name, w * s, h * s)
    return mask.resize((w, h), Image.BOX)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A random two-colour gradient crossed by a few thin random lines."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:h, 0:w]
    t = (x * math.cos(angle) + y * math.sin(angle)) / max(w, h)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = Image.fromarray((c0 + (c1 - c0) * t[..., None]).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(2, 6)):
        xy = [tuple(rng.uniform(0, [w, h])) for _ in range(2)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(xy, fill=colour, width=int(rng.integers(1, 3)))
    return np.asarray(image, np.float32)


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A random colour far from the background's mean, so shapes stay visible."""
    mean = background.reshape(-1, 3).mean(0)
    while True:
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) > 120:
            return colour


def _render(name: str, rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """One image of class `name` and its object's box."""
    short = int(rng.integers(64, 129))
    long = min(160, round(short * rng.uniform(1.0, 4 / 3)))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    side = rng.uniform(0.45, 0.75) * short
    aspect = math.sqrt(rng.uniform(0.8, 1.25))
    bw, bh = min(w, round(side * aspect)), min(h, round(side / aspect))
    # Keep the object's centre in the middle 40% so random crops still see it.
    cx = rng.uniform(max(bw / 2, 0.3 * w), min(w - bw / 2, 0.7 * w))
    cy = rng.uniform(max(bh / 2, 0.3 * h), min(h - bh / 2, 0.7 * h))
    x0, y0 = round(cx - bw / 2), round(cy - bh / 2)

    image = _background(rng, w, h)
    mask = np.zeros((h, w, 1), np.float32)
    mask[y0 : y0 + bh, x0 : x0 + bw, 0] = np.asarray(_shape_mask(name, bw, bh))
    mask /= 255.0
    image = image * (1 - mask) + _object_colour(rng, image) * mask
    image += rng.normal(0, rng.uniform(4, 20), image.shape)
    bx0, by0, bx1, by1 = Image.fromarray((mask[..., 0] > 0.5).astype(np.uint8)).getbbox()
    pixels = np.clip(image, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels), [bx0, by0, bx1, by1]


def _generate(root: str, counts: dict[str, int]) -> None:
    boxes = {}
    for split_id, (split, count) in enumerate(sorted(counts.items())):
        for class_id, name in enumerate(CLASSES):
            os.makedirs(os.path.join(root, split, name))
            for i in range(count):
                rng = np.random.default_rng([SEED, split_id, class_id, i])
                image, box = _render(name, rng)
                relpath = f"{split}/{name}/{i:04d}.jpg"
                image.save(os.path.join(root, relpath), "JPEG", quality=int(rng.integers(75, 96)))
                boxes[relpath] = box
    with open(os.path.join(root, BOXES_FILE), "w") as f:
        json.dump(boxes, f, indent=0, sort_keys=True)


def ensure_demo_dataset(
    root: str | None = None,
    *,
    train_per_class: int = TRAIN_PER_CLASS,
    val_per_class: int = VAL_PER_CLASS,
) -> str:
    """Returns the demo set's directory, generating it there on first use.

    Generation happens in a temporary sibling directory renamed into place, so
    a killed run never leaves a half set behind and concurrent callers each
    either win the rename or find the winner's complete set.
    """
    root = os.path.abspath(os.path.expanduser(root or default_root()))
    if os.path.exists(os.path.join(root, BOXES_FILE)):
        return root
    if os.path.isdir(root) and os.listdir(root):
        raise UserError(
            f"{root} is not empty and holds no demo data set "
            f"({BOXES_FILE} missing): remove it or choose another "
            "directory"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        _generate(tmp, {"train": train_per_class, "val": val_per_class})
        os.rename(tmp, root)  # Replaces an empty root; fails on a non-empty one.
    except OSError:
        if not os.path.exists(os.path.join(root, BOXES_FILE)):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
