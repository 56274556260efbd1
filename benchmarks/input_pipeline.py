"""Input pipeline throughput: vggjax's grain training pipeline next to a torchvision-style one.

    python benchmarks/input_pipeline.py --cpus=1 --num_workers=0      # per core
    python benchmarks/input_pipeline.py --num_workers=2 --scale=256-512

Writes --images JPEGs of ImageNet-like sizes (500×375, 375×500, 640×480; quality 90, ~105 KB
each, from smooth colour fields and grain) as a class-per-folder data set in a temporary
folder, then times batches of --batch_size 224×224 crops from:

- vggjax: `pipeline.train_dataset` (grain): decode, isotropic rescale to S, random crop, flip,
  RGB colour shift, mean subtraction, in `--num_workers` worker processes (0: in this process,
  which still decodes on two threads);
- PIL: what torchvision's `Resize(S)`, `RandomCrop(224)`, `RandomHorizontalFlip()`,
  `ToTensor()` and `Normalize()` do, written with PIL and numpy, in `--num_workers` processes
  (a `multiprocessing.Pool`, as a DataLoader's workers; 0: in this process).

Both run the same number of batches after one warm-up batch. `--cpus=N` pins everything to N
CPUs, so `--cpus=1` compares the two per core. Ends with one JSON line of images/s, in total and
per worker.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator

import numpy as np
from absl import app, flags
from PIL import Image

from vggjax import recipe
from vggjax.data import pipeline

_IMAGES = flags.DEFINE_integer("images", 200, "JPEGs to generate.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes (0: in this process).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches (after one warm-up batch).")
_SCALE = flags.DEFINE_string("scale", "256", "Training scale S or S_MIN-S_MAX.")
_CPUS = flags.DEFINE_integer(
    "cpus",
    0,
    "Pin this process and its workers to the first N CPUs "
    "(0: all); --cpus=1 --num_workers=0 gives the per-core figures.",
)

SIZES = ((500, 375), (375, 500), (640, 480))  # (width, height)
CROP = 224
# torchvision's ImageNet normalisation.
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def write_jpegs(root: pathlib.Path, count: int, classes: int = 10) -> None:
    """Photo-like JPEGs: smooth colour fields (an upsampled random grid) plus sensor-like noise."""
    rng = np.random.default_rng(0)
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        grid = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((width, height), Image.BICUBIC), np.float32)
        pixels = np.clip(smooth + rng.normal(0, 14, smooth.shape), 0, 255).astype(np.uint8)
        folder = root / "train" / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def torchvision_style(path: str, rng: np.random.Generator, s_min: int, s_max: int) -> np.ndarray:
    """One training crop as torchvision's transforms make it: CHW float32, normalised."""
    image = Image.open(path).convert("RGB")
    s = int(rng.integers(s_min, s_max + 1))
    width, height = image.size
    if width < height:  # Resize(S): the shorter side to S, bilinear with antialiasing
        size = (s, int(s * height / width))
    else:
        size = (int(s * width / height), s)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(rng.integers(0, size[0] - CROP + 1)), int(rng.integers(0, size[1] - CROP + 1))
    image = image.crop((left, top, left + CROP, top + CROP))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def torchvision_batch(args: tuple[list[str], int, int, int]) -> dict[str, np.ndarray]:
    paths, seed, s_min, s_max = args
    rng = np.random.default_rng(seed)
    return {"image": np.stack([torchvision_style(p, rng, s_min, s_max) for p in paths])}


def time_batches(batches: Iterator[dict[str, np.ndarray]], count: int) -> float:
    """Images/s over `count` batches, after one warm-up batch (which starts the workers)."""
    next(batches)
    start = time.perf_counter()
    images = sum(len(next(batches)["image"]) for _ in range(count))
    return images / (time.perf_counter() - start)


def vggjax_rate(data_dir: str, scale: tuple[int, int]) -> float:
    c = recipe.paper_recipe("D")
    c.dataset, c.data_dir, c.num_classes = "folder", data_dir, 10
    c.batch_size, c.num_workers, c.train_scale = _BATCH.value, _NUM_WORKERS.value, scale
    batches = iter(pipeline.train_dataset(c))
    try:
        return time_batches(batches, _BATCHES.value)
    finally:
        batches.close()


def torchvision_rate(data_dir: str, scale: tuple[int, int]) -> float:
    paths = sorted(str(p) for p in pathlib.Path(data_dir).glob("train/*/*.jpg"))
    rng = np.random.default_rng(0)
    jobs = (
        (list(rng.choice(paths, _BATCH.value)), seed, *scale) for seed in range(_BATCHES.value + 1)
    )
    if not _NUM_WORKERS.value:
        return time_batches(map(torchvision_batch, jobs), _BATCHES.value)
    with multiprocessing.get_context("spawn").Pool(_NUM_WORKERS.value) as pool:
        return time_batches(pool.imap(torchvision_batch, jobs), _BATCHES.value)


def main(argv: list[str]) -> None:
    del argv
    if _CPUS.value:
        os.sched_setaffinity(0, range(_CPUS.value))  # inherited by worker processes
    scale = recipe.parse_scale(_SCALE.value)
    with tempfile.TemporaryDirectory() as data_dir:
        write_jpegs(pathlib.Path(data_dir), _IMAGES.value)
        files = list(pathlib.Path(data_dir).glob("train/*/*.jpg"))
        kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        rates = {"vggjax": vggjax_rate(data_dir, scale), "pil": torchvision_rate(data_dir, scale)}
    workers = max(_NUM_WORKERS.value, 1)
    result = dict(
        images=len(files),
        mean_jpeg_kb=round(kb, 1),
        scale=_SCALE.value,
        crop=CROP,
        batch_size=_BATCH.value,
        batches=_BATCHES.value,
        num_workers=_NUM_WORKERS.value,
        cpus=len(os.sched_getaffinity(0)),
    )
    for name, rate in rates.items():
        result[f"{name}_images_per_sec"] = round(rate, 1)
        result[f"{name}_images_per_sec_per_worker"] = round(rate / workers, 1)
    result["vggjax_over_pil"] = round(rates["vggjax"] / rates["pil"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
