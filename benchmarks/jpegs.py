"""ImageNet-like JPEGs for the input benchmarks (no flags, so any benchmark can import it)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (640, 480))  # (width, height)


def write_jpegs(root: pathlib.Path, count: int, classes: int = 10) -> None:
    """`root/class_<k>/<i>.jpg`: photo-like JPEGs, smooth colour fields (an upsampled random grid)
    plus sensor-like noise, quality 90."""
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        grid = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 14, smooth.shape), 0, 255).astype(np.uint8)
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
