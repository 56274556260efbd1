"""grain pipelines yielding per-process numpy batches for training and eval.

Both pipelines read one global stream of examples and give process p the
elements p, p + P, p + 2P, ... of it, then batch locally. Global batch t is
therefore the contiguous block [t*B, (t+1)*B) of the stream whatever the
number of processes or workers, and its augmentation (seeded by stream
position) is the same too. Batches are dicts of `image` uint8
(B_local, crop, crop, 3), `shift` float32 (B_local, 3), the RGB offset the step adds to each
image's pixels (its colour shift minus the mean RGB; `augment.net_input`), `label` int32
(B_local,) and `mask` float32 (B_local,): 0 marks undecodable images and eval padding, which
must not count.
With `config.data_in_memory` the images are decoded once and held as arrays (`data.arrays`):
the same batches, gathered by index instead of decoded per step.
For box regression (`config.objective`, Appendix A) the images are those with boxes and a batch
also holds `box` float32 (B_local, 4), each crop's target (`data.boxes.target`); a crop that
shows none of its image's boxes is masked too.
"""

import dataclasses
import gc
import math
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from absl import logging

from vggjax import options
from vggjax.data import arrays, augment, boxes, sources
from vggjax.errors import UserError

# Each element is a whole batch: a few threads overlap batch assembly with
# training, while worker processes (config.num_workers) give the parallelism. Batches gathered
# from memory hold the GIL throughout: a second thread doubled their CPU time (MNIST in memory:
# 10.7 against 5.4 ms a training batch of 128, 1.4 against 0.65 s the test set), so they get one.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_READ_OPTIONS_IN_MEMORY = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)

_warned_ids: set[str] = set()  # Per process: each bad file is logged once.


def local_batch_size(config: Any, process_count: int) -> int:
    """This process's share of the global config.batch_size."""
    if config.batch_size % process_count:
        raise UserError(
            f"batch_size {config.batch_size} is not divisible by the {process_count} processes"
        )
    return config.batch_size // process_count


def steps_per_epoch(config: Any, num_examples: int) -> int:
    """Global batches needed to see num_examples once (the eval pass length)."""
    return math.ceil(num_examples / config.batch_size)


def _regresses_boxes(config: Any) -> bool:
    """Whether the net learns boxes (config.objective scr or pcr; classification by default)."""
    return config.get("objective", "classification") != "classification"


def listed(config: Any, split: str) -> sources.Source:
    """The images a run reads, not decoded: all of the split's, or for box regression those
    with boxes."""
    if _regresses_boxes(config):
        if config.get("data_in_memory", False):
            raise UserError("config.data_in_memory is for classification, not box regression")
        return boxes.boxed_source(config, split)
    return sources.make_source(config, split)


def source(config: Any, split: str, images: sources.Source | None = None) -> sources.Source:
    """The images a run reads (`images`: `listed(config, split)`, where the caller has it),
    decoded into memory with `config.data_in_memory`."""
    images = listed(config, split) if images is None else images
    if config.get("data_in_memory", False):
        return arrays.array_source(config, split, images)
    return images


def blank_example(config: Any) -> dict[str, np.ndarray]:
    """A masked zero example of the batches' elements: their keys, shapes and dtypes."""
    return _masked(0, config.crop_size, _regresses_boxes(config))


def _masked(label: int, crop: int, box: bool) -> dict[str, np.ndarray]:
    """A zero image (and box) that keeps batch shapes fixed but must not count."""
    example = {
        "image": np.zeros((crop, crop, 3), np.uint8),
        "shift": np.zeros(3, np.float32),
        "label": np.int32(label),
        "mask": np.float32(0.0),
    }
    return example | ({"box": np.zeros(4, np.float32)} if box else {})


def _example(
    element: dict[str, Any],
    crop_fn: Callable[[Any], tuple[np.ndarray, np.ndarray, augment.Window]],
    crop: int,
    box: bool,
) -> dict[str, np.ndarray]:
    """Applies crop_fn (the crop, its RGB shift, its window); an undecodable image becomes a masked
    zero image. With `box`, the example carries the crop's target box, and is masked when no box
    shows in the crop."""
    try:
        image, shift, window = crop_fn(element["data"])
    except augment.BadImageError as e:
        if element["id"] not in _warned_ids:
            _warned_ids.add(element["id"])
            logging.warning("Masking out undecodable image %s: %s", element["id"], e)
        return _masked(element["label"], crop, box)
    example = {
        "image": image,
        "shift": shift,
        "label": np.int32(element["label"]),
        "mask": np.float32(1.0),
    }
    if not box:
        return example
    target = boxes.target(window, element["boxes"])
    if target is None:
        return _masked(element["label"], crop, box)
    return example | {"box": target}


@dataclasses.dataclass(frozen=True)
class _TrainExample(grain.transforms.RandomMap):
    crop: int
    train_scale: tuple[int, int]
    mean_rgb: tuple[float, ...]
    colour_std: float
    pad: int = 0
    flip: bool = True
    box: bool = False

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        def transform(data: Any) -> tuple[np.ndarray, np.ndarray, augment.Window]:
            s_min, s_max = self.train_scale
            image, window = augment.train_crop(
                data, rng, crop=self.crop, s_min=s_min, s_max=s_max, pad=self.pad, flip=self.flip
            )
            return image, augment.random_shift(rng, self.colour_std, self.mean_rgb), window

        return _example(element, transform, self.crop, self.box)


@dataclasses.dataclass(frozen=True)
class _EvalExample(grain.transforms.Map):
    """Eval transform of stream element i; i >= len(source) is padding."""

    source: sources.Source
    crop: int
    q: int
    mean_rgb: tuple[float, ...]
    box: bool = False

    def map(self, index: int) -> dict[str, np.ndarray]:
        if index >= len(self.source):
            return _masked(0, self.crop, self.box)

        def transform(data: Any) -> tuple[np.ndarray, np.ndarray, augment.Window]:
            image, window = augment.eval_crop(data, crop=self.crop, q=self.q)
            return image, augment.subtract_mean(np.zeros(3), self.mean_rgb), window

        return _example(self.source[index], transform, self.crop, self.box)


def _finish(
    ds: grain.MapDataset,
    *,
    batch: int,
    process_index: int,
    process_count: int,
    num_workers: int,
    in_memory: bool,
    per_batch: tuple[grain.transforms.Map, ...] = (),
) -> grain.IterDataset:
    """Shards the stream by process, batches (then maps `per_batch` over the batches, in turn),
    and runs it in workers, read by the threads `in_memory` (gathered from arrays, or decoded)
    calls for."""
    ds = ds[process_index::process_count].batch(batch, drop_remainder=True)
    for transform in per_batch:
        ds = ds.map(transform)
    read = _READ_OPTIONS_IN_MEMORY if in_memory else _READ_OPTIONS
    return ds.to_iter_dataset(read).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers)
    )


def close(iterator: grain.DatasetIterator) -> None:
    """Stops the iterator's worker processes now, and frees the shared memory of the batches they
    sent: grain unlinks a batch's when its arrays are collected, and some are held in reference
    cycles, which at exit are never collected (resource_tracker then reports them leaked)."""
    iterator.close()
    gc.collect()


def _augmentation(config: Any) -> dict[str, Any]:
    """The training crop's settings, as both training pipelines take them."""
    return dict(
        crop=config.crop_size,
        train_scale=tuple(config.train_scale),
        mean_rgb=tuple(config.mean_rgb),
        colour_std=config.colour_shift_std,
        pad=config.get("crop_padding", 0),
        flip=config.get("random_flip", True),
    )


def train_dataset(
    config: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    images: sources.Source | None = None,
) -> grain.IterDataset:
    """Endless augmented training batches, reshuffled every epoch: from the images held in
    memory (`config.data_in_memory`: the same batches, gathered by index), else decoded.
    `images`: `source(config, "train")`, where the caller has it already (None: read here)."""
    batch = local_batch_size(config, process_count)
    options.check_train_scale(config)
    images = source(config, "train") if images is None else images
    in_memory = config.get("data_in_memory", False)
    # The same stream of element indices either way: a fresh permutation in every epoch.
    ds = grain.MapDataset.range(len(images)) if in_memory else grain.MapDataset.source(images)
    seed = config.seed if seed is None else seed
    ds = ds.seed(seed).shuffle().repeat()
    per_batch = ()
    if in_memory:  # draws and pixels per batch, each image's draws those of its position
        ds = ds.map_with_index(arrays.Position())
        per_batch = (
            arrays.Draws(_draws_seed(seed), images.images.shape[1:3], **_augmentation(config)),
            arrays.Gather(images, config.crop_size, tuple(config.train_scale)),
        )
    else:
        transform = _TrainExample(**_augmentation(config), box=_regresses_boxes(config))
        ds = ds.random_map(transform, seed=_draws_seed(seed))
    return _finish(
        ds,
        batch=batch,
        process_index=process_index,
        process_count=process_count,
        num_workers=config.num_workers,
        in_memory=in_memory,
        per_batch=per_batch,
    )


def _draws_seed(seed: int) -> int:
    """The training augmentation's seed: the one grain's `ds.seed(seed)` gives a random map
    after its shuffle and repeat (three nodes below it), stated so that both training pipelines
    share it (the in-memory one draws for a batch at once: `arrays.Draws`) and runs from before
    keep their draws."""
    return int(np.random.SeedSequence([seed, 3]).generate_state(1, np.uint32)[0])


def eval_dataset(
    config: Any, *, split: str = "val", process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
    """One pass over `split` at scale Q = config.eval_scale, padded with masks.

    The stream is padded to a multiple of the global batch size, so every
    process yields the same number of batches and each image counts once.
    """
    batch = local_batch_size(config, process_count)
    options.check_eval_scale(config)
    images = source(config, split)
    padded = steps_per_epoch(config, len(images)) * config.batch_size
    ds = grain.MapDataset.range(padded).map(
        _EvalExample(
            source=images,
            crop=config.crop_size,
            q=config.eval_scale,
            mean_rgb=tuple(config.mean_rgb),
            box=_regresses_boxes(config),
        )
    )
    return _finish(
        ds,
        batch=batch,
        process_index=process_index,
        process_count=process_count,
        num_workers=config.num_workers,
        in_memory=config.get("data_in_memory", False),
    )
