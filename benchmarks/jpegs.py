"""ImageNet-like JPEGs for the input benchmarks (no flags, so any benchmark can import it)."""

from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

SIDES, LARGE_SIDES = (300, 500), (1000, 2000)  # px, as issue 11 asks; every tenth image is large


def write_jpegs(root: pathlib.Path, count: int, classes: int = 10) -> None:
    """`root/class_<k>/<i>.jpg`: photo-like JPEGs, smooth colour fields (an upsampled random grid)
    plus sensor-like noise, quality 90; each side 300-500 px, one image in ten 1000-2000 px (77 KB
    on average for the small ones, 969 KB for the large)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        low, high = LARGE_SIDES if i % 10 == 9 else SIDES
        width, height = (int(side) for side in rng.integers(low, high + 1, 2))
        grid = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 14, smooth.shape), 0, 255).astype(np.uint8)
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
