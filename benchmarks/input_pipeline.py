"""Input pipeline throughput: vggjax's grain training pipeline next to a torchvision-style one.

    python benchmarks/input_pipeline.py --cpus=1 --num_workers=0      # per core
    python benchmarks/input_pipeline.py --num_workers=2 --scale=256-512

Writes --images JPEGs of ImageNet-like sizes (`jpegs.write_jpegs`: each side 300-500 px, one
image in ten 1000-2000 px; quality 90, from smooth colour fields and sensor-like grain) as a
class-per-folder data set in a temporary folder, each under --names names, then times batches of
--batch_size 224×224 crops from:

- vggjax: `pipeline.train_dataset` (grain): decode (simplejpeg, reduced in the DCT domain where S
  allows), isotropic rescale to S (OpenCV), random crop, flip, in `--num_workers` worker processes
  (0: in this process, which still decodes on two threads). Its batches are uint8 crops and each
  image's RGB shift (colour shift minus the mean), which the jitted train step adds on the device
  (`augment.net_input`; its cost on this CPU is `stages_ms.vggjax_finish`);
- PIL: what torchvision's `Resize(S)`, `RandomCrop(224)`, `RandomHorizontalFlip()`,
  `ToTensor()` and `Normalize()` do, written with PIL and numpy, in `--num_workers` processes
  (a `multiprocessing.Pool`, as a DataLoader's workers; 0: in this process).

With --small_images=DIR (a folder of small images, e.g. MNIST's: configs/small_images.py), times
instead vggjax's two pipelines for them, as that config runs them (32-pixel crops, padding and
crop): from the files (grain, decoded every step, in --num_workers processes) and held in memory
(`config.data_in_memory`: decoded once, gathered by index). Compare with the step alone:
`python benchmarks/train_step.py --model=vgg11_bn --width=0.25 --fc_width=256 --image_size=32
--batch_size=128`.

They take turns (--rounds each, a fresh pipeline every turn, stopped at its end), each timing
--batches batches after --skip that start it. `--cpus=N` pins everything to N CPUs, so
`--cpus=1` compares the two per core. Ends with one JSON line of images/s, in total and
per worker, and the milliseconds per image of each stage of both, timed one stage at a time over
the generated images in this process.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jpegs  # benchmarks/jpegs.py
import numpy as np
from absl import app, flags
from PIL import Image

from vggjax import cli, recipe
from vggjax.data import augment, pipeline

_IMAGES = flags.DEFINE_integer("images", 200, "JPEGs to generate.")
_NAMES = flags.DEFINE_integer(
    "names",
    50,
    "Names (hard links) of each JPEG in the data set: an index of --images x --names, since "
    "grain's shuffle costs more per element on small sets (150 us at 200, 6 us at 10,000 and at "
    "ImageNet's 1.28M).",
)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 0, "Worker processes (0: in this process).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per batch.")
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per turn.")
_SKIP = flags.DEFINE_integer("skip", 3, "Untimed batches that start each turn.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Turns of each pipeline, alternating.")
_SCALE = flags.DEFINE_string("scale", "256", "Training scale S or S_MIN-S_MAX.")
_SMALL_IMAGES = flags.DEFINE_string(
    "small_images",
    "",
    "A folder DIR/{train,val}/<class>/<images> of small images: time configs/small_images.py's "
    "pipelines on it, from files and in memory, instead of the JPEG pipelines.",
)
_CPUS = flags.DEFINE_integer(
    "cpus",
    0,
    "Pin this process and its workers to the first N CPUs "
    "(0: all); --cpus=1 --num_workers=0 gives the per-core figures.",
)

CROP = 224
MEAN_RGB = recipe.paper_recipe("D").mean_rgb
# torchvision's ImageNet normalisation.
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def write_data_set(root: pathlib.Path) -> None:
    """--images JPEGs in root/jpegs/<class>/ (`jpegs.write_jpegs`), each linked --names times into
    root/train/<class>/, the data set both pipelines read."""
    jpegs.write_jpegs(root / "jpegs", _IMAGES.value)
    for path in (root / "jpegs").glob("*/*.jpg"):
        (root / "train" / path.parent.name).mkdir(parents=True, exist_ok=True)
        for k in range(_NAMES.value):
            os.link(path, root / "train" / path.parent.name / f"{path.stem}_{k:03d}.jpg")


def torchvision_style(path: str, rng: np.random.Generator, s_min: int, s_max: int) -> np.ndarray:
    """One training crop as torchvision's transforms make it: CHW float32, normalised."""
    image = torchvision_resize(Image.open(path).convert("RGB"), int(rng.integers(s_min, s_max + 1)))
    return torchvision_crop(image, rng)


def torchvision_resize(image: Image.Image, s: int) -> Image.Image:
    """Resize(S): the shorter side to S, bilinear with antialiasing."""
    width, height = image.size
    size = (s, int(s * height / width)) if width < height else (int(s * width / height), s)
    return image.resize(size, Image.BILINEAR)


def torchvision_crop(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """RandomCrop(224), RandomHorizontalFlip(), ToTensor(), Normalize()."""
    width, height = image.size
    left, top = int(rng.integers(0, width - CROP + 1)), int(rng.integers(0, height - CROP + 1))
    image = image.crop((left, top, left + CROP, top + CROP))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32) / 255.0
    return ((pixels - MEAN) / STD).transpose(2, 0, 1)


def torchvision_batch(args: tuple[list[str], int, int, int]) -> dict[str, np.ndarray]:
    paths, seed, s_min, s_max = args
    rng = np.random.default_rng(seed)
    return {"image": np.stack([torchvision_style(p, rng, s_min, s_max) for p in paths])}


def time_batches(batches: Iterator[dict[str, np.ndarray]], count: int) -> tuple[int, float, float]:
    """(images, seconds, this process's CPU seconds) of `count` batches, after --skip batches that
    start the workers and fill the prefetch buffers, which are as full at the end: what was
    prefetched cancels out. With workers, the CPU seconds are the training process's share."""
    for _ in range(_SKIP.value):
        next(batches)
    start, cpu = time.perf_counter(), time.process_time()
    images = sum(len(next(batches)["image"]) for _ in range(count))
    return images, time.perf_counter() - start, time.process_time() - cpu


def vggjax_turn(data_dir: str, scale: tuple[int, int], turn: int) -> tuple[int, float, float]:
    c = recipe.paper_recipe("D")
    c.dataset, c.data_dir, c.num_classes = "folder", data_dir, 10
    c.batch_size, c.num_workers, c.train_scale = _BATCH.value, _NUM_WORKERS.value, scale
    batches = iter(pipeline.train_dataset(c, seed=turn))
    try:
        return time_batches(batches, _BATCHES.value)
    finally:
        pipeline.close(batches)  # its threads and workers stop: nothing runs in the PIL turn


def torchvision_turn(data_dir: str, scale: tuple[int, int], turn: int) -> tuple[int, float, float]:
    paths = sorted(str(p) for p in pathlib.Path(data_dir).glob("train/*/*.jpg"))
    rng = np.random.default_rng(turn)
    jobs = ((list(rng.choice(paths, _BATCH.value)), seed, *scale) for seed in itertools.count())
    if not _NUM_WORKERS.value:
        return time_batches(map(torchvision_batch, jobs), _BATCHES.value)
    with multiprocessing.get_context("spawn").Pool(_NUM_WORKERS.value) as pool:
        return time_batches(prefetched(pool, jobs, 2 * _NUM_WORKERS.value), _BATCHES.value)


def prefetched(pool: Any, jobs: Iterator[Any], ahead: int) -> Iterator[dict[str, np.ndarray]]:
    """The pool's batches in order, at most `ahead` computed ahead, like a DataLoader's workers
    (`Pool.imap` would queue every job at once)."""
    pending = collections.deque(
        pool.apply_async(torchvision_batch, (next(jobs),)) for _ in range(ahead)
    )
    while True:
        yield pending.popleft().get()
        pending.append(pool.apply_async(torchvision_batch, (next(jobs),)))


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def stage_times(data_dir: str, scale: tuple[int, int]) -> dict[str, float]:
    """Milliseconds per image of each stage of both pipelines, one stage at a time over all the
    images (each at a scale S drawn for both alike), after one untimed pass."""
    rng = np.random.default_rng(0)
    images = [
        (p.read_bytes(), int(rng.integers(scale[0], scale[1] + 1)))
        for p in sorted(pathlib.Path(data_dir).glob("jpegs/*/*.jpg"))
    ]
    decoded = [(augment.decode_image(data, min_side=s), s) for data, s in images]
    rescaled = [
        augment.resize_antialiased(image, augment.rescaled_size(image.shape, s))
        for image, s in decoded
    ]
    opened = [(Image.open(io.BytesIO(data)).convert("RGB"), s) for data, s in images]
    resized = [torchvision_resize(image, s) for image, s in opened]
    batch = {
        "image": np.zeros((_BATCH.value, CROP, CROP, 3), np.uint8),
        "shift": np.zeros((_BATCH.value, 3), np.float32),
    }
    finish = jax.jit(augment.net_input)

    def crop_flip_shift(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (h, w), flip = image.shape[:2], bool(rng.random() < 0.5)
        offset = (int(rng.integers(0, h - CROP + 1)), int(rng.integers(0, w - CROP + 1)))
        crop = np.array(augment.Window((h, w), offset, CROP, flip).cut(image))  # batching copies
        return crop, augment.subtract_mean(augment.colour_shift(rng), MEAN_RGB)

    stages = {
        "vggjax_decode": lambda: [augment.decode_image(d, min_side=s) for d, s in images],
        "vggjax_rescale": lambda: [
            augment.resize_antialiased(i, augment.rescaled_size(i.shape, s)) for i, s in decoded
        ],
        "vggjax_crop_flip_shift": lambda: [crop_flip_shift(i) for i in rescaled],
        "vggjax_finish": lambda: [
            jax.block_until_ready(finish(batch)) for _ in range(len(images) // _BATCH.value)
        ],
        "pil_decode": lambda: [Image.open(io.BytesIO(d)).convert("RGB") for d, _ in images],
        "pil_resize": lambda: [torchvision_resize(i, s) for i, s in opened],
        "pil_crop_flip_float": lambda: [torchvision_crop(i, rng) for i in resized],
    }
    times = {}
    for name, run in stages.items():
        run()
        start = time.perf_counter()
        run()
        count = (
            len(images) // _BATCH.value * _BATCH.value if name == "vggjax_finish" else len(images)
        )
        times[name] = round((time.perf_counter() - start) / count * 1e3, 3)
    return times


def small_images_config(in_memory: bool, cache_dir: str) -> Any:
    """configs/small_images.py on --small_images, read from files or held in memory."""
    spec = importlib.util.spec_from_file_location(
        "small_images", pathlib.Path(__file__).parent.parent / "configs" / "small_images.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(_SMALL_IMAGES.value)
    c.batch_size, c.data_in_memory, c.data_cache_dir = _BATCH.value, in_memory, cache_dir
    c.num_workers = _NUM_WORKERS.value
    return c


def small_images() -> dict[str, Any]:
    """Images/s of configs/small_images.py's training batches, from files and in memory, taking
    turns; the in-memory set is decoded before the first turn (into a temporary cache)."""
    totals = {"files": np.zeros(3), "memory": np.zeros(3)}
    with tempfile.TemporaryDirectory() as cache:
        pipeline.source(small_images_config(True, cache), "train")  # decoded once, not timed
        for turn in range(_ROUNDS.value):
            for name in totals:
                batches = iter(
                    pipeline.train_dataset(small_images_config(name == "memory", cache), seed=turn)
                )
                try:
                    totals[name] += time_batches(batches, _BATCHES.value)
                finally:
                    pipeline.close(batches)
    result = dict(small_images=_SMALL_IMAGES.value, batch_size=_BATCH.value)
    for name, (images, seconds, cpu) in totals.items():
        result[f"{name}_images_per_sec"] = round(images / seconds, 1)
        result[f"{name}_main_cpu_ms_per_batch"] = round(cpu / images * _BATCH.value * 1e3, 2)
    result["memory_over_files"] = round(
        result["memory_images_per_sec"] / result["files_images_per_sec"], 3
    )
    return result


def main(argv: list[str]) -> None:
    del argv
    if _CPUS.value:
        os.sched_setaffinity(0, range(_CPUS.value))  # inherited by worker processes
    if _SMALL_IMAGES.value:
        print(json.dumps(small_images() | dict(num_workers=_NUM_WORKERS.value, cpus=_cpus())))
        return
    scale = recipe.parse_scale(_SCALE.value)
    with tempfile.TemporaryDirectory() as data_dir:
        write_data_set(pathlib.Path(data_dir))
        files = list(pathlib.Path(data_dir).glob("jpegs/*/*.jpg"))
        kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        totals = {"vggjax": np.zeros(3), "pil": np.zeros(3)}  # images, seconds, CPU seconds
        for turn in range(_ROUNDS.value):  # taking turns, so both see the same machine
            for name, run in (("vggjax", vggjax_turn), ("pil", torchvision_turn)):
                totals[name] += run(data_dir, scale, turn)
        rates = {name: images / seconds for name, (images, seconds, _) in totals.items()}
        stages = stage_times(data_dir, scale)
    workers = max(_NUM_WORKERS.value, 1)
    result = dict(
        images=len(files),
        names=_NAMES.value,
        mean_jpeg_kb=round(kb, 1),
        scale=_SCALE.value,
        crop=CROP,
        batch_size=_BATCH.value,
        batches=_BATCHES.value,
        rounds=_ROUNDS.value,
        num_workers=_NUM_WORKERS.value,
        cpus=_cpus(),
    )
    for name, rate in rates.items():
        result[f"{name}_images_per_sec"] = round(rate, 1)
        result[f"{name}_images_per_sec_per_worker"] = round(rate / workers, 1)
        # What the training process spends per batch besides the workers (receiving batches):
        result[f"{name}_main_cpu_ms_per_batch"] = round(
            totals[name][2] / totals[name][0] * _BATCH.value * 1e3, 2
        )
    result["vggjax_over_pil"] = round(rates["vggjax"] / rates["pil"], 3)
    result["stages_ms"] = stages
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run("input_pipeline", app.run, main)  # as every vggjax command line runs: tune_cpu first
