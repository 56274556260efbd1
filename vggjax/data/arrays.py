"""A data set held in memory as arrays (`config.data_in_memory`): what PyTorch users have for
small images, where decoding a folder's files in every epoch costs more than the step.

Each split is decoded once into a uint8 array (N, H, W, 3), cached in `config.data_cache_dir`
(default ~/.cache/vggjax/arrays) under a key of the data set, the split and, for a folder, each
file's name, size and modification time, so a changed folder is read again. Training batches
are gathered from it by index in the order grain's sampler gives the folder pipeline (the same
shuffle, process sharding and checkpointed position), each image's random scale, crop, flip and
colour shift those of the same per-element generator as there (computed for the whole batch at
once: `batch_rng`), so the same seed gives the same batches; the pixel work (rescale, padding,
crop and flip) is done on the whole batch, and with a fixed training scale S the split is
rescaled once and kept in memory (one more copy of it at S in each process reading it). Images
that cannot be decoded are recorded and masked as in the folder pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import grain
import numpy as np
from absl import logging

from vggjax.data import augment, batch_rng, sources
from vggjax.errors import UserError

_FILES = ("images.npy", "labels.npy", "good.npy", "meta.json")


def cache_root(config: Any) -> str:
    """Where decoded splits are kept: config.data_cache_dir, else the user's cache folder."""
    if config.get("data_cache_dir"):
        return config.data_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vggjax", "arrays")


def fingerprint(config: Any, split: str, source: sources.Source) -> str:
    """The cache key of a split: the data set, its folder and split, and its elements (for a
    folder, each file's name, label, size and modification time; else their number)."""
    data_dir = os.path.abspath(config.data_dir) if config.data_dir else ""
    digest = hashlib.sha256(json.dumps([config.dataset, data_dir, split]).encode())
    if isinstance(source, sources.FolderSource):
        for relpath, label in source.files:
            stat = os.stat(os.path.join(source.root, relpath))
            digest.update(f"{relpath}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(str(len(source)).encode())
    return digest.hexdigest()[:20]


class ArraySource(sources.Source):
    """A decoded split: images memory-mapped from the cache (shared by worker processes, which
    reopen it by path), labels, ids and which images decoded. An undecodable image's data is
    empty bytes, which the pipelines mask as they mask a bad file."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        self.class_names, self.ids = tuple(meta["class_names"]), meta["ids"]
        self.images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
        self.labels = np.load(os.path.join(path, "labels.npy"))
        self.good = np.load(os.path.join(path, "good.npy"))
        self._rescaled: tuple[int, np.ndarray] | None = None  # (S, the images at S): `rescaled`

    def __reduce__(self) -> tuple[Any, ...]:
        return ArraySource, (self.path,)

    def rescaled(self, s: int) -> np.ndarray:
        """Every image rescaled to smallest side `s` (`augment.train_rescale`), made on the first
        call and kept in this process: a fixed training scale rescales the same images in every
        epoch (MNIST's 28 pixels to 32: half the pipeline's time a batch)."""
        if self._rescaled is None or self._rescaled[0] != s:
            images = np.stack([augment.train_rescale(np.asarray(i), s) for i in self.images])
            self._rescaled = (s, images)
        return self._rescaled[1]

    def __len__(self) -> int:
        return len(self.labels)

    def catalogue(self) -> list[tuple[str, int]]:
        return list(zip(self.ids, map(int, self.labels)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        data = np.asarray(self.images[index]) if self.good[index] else b""
        return {"data": data, "label": int(self.labels[index]), "id": self.ids[index]}


def _decode_all(source: sources.Source) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images, labels, good, ids) of every element, read once; undecodable images are zeros and
    not good."""
    images, labels, good, ids, shape = [], [], [], [], None
    for index in range(len(source)):
        element = source[index]
        labels.append(element["label"])
        ids.append(element["id"])
        try:
            image = augment.decode_image(element["data"])
        except augment.BadImageError as e:
            logging.warning("Masking out undecodable image %s: %s", element["id"], e)
            images.append(None)
            good.append(False)
            continue
        if shape is None:
            shape = image.shape
        elif image.shape != shape:
            raise UserError(
                f"config.data_in_memory needs images of one size: {element['id']} is "
                f"{image.shape[0]}x{image.shape[1]}, others {shape[0]}x{shape[1]}"
            )
        images.append(image)
        good.append(True)
    if shape is None:
        raise UserError("config.data_in_memory: no image of the split could be decoded")
    blank = np.zeros(shape, np.uint8)
    stacked = np.stack([blank if image is None else image for image in images])
    return stacked, np.asarray(labels, np.int32), np.asarray(good, bool), ids


def _write(path: str, source: sources.Source) -> None:
    """Decodes `source` into the cache folder `path`, atomically (a folder renamed into place)."""
    logging.info("Decoding %d images into %s (once: config.data_in_memory).", len(source), path)
    images, labels, good, ids = _decode_all(source)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".building-")
    try:
        np.save(os.path.join(tmp, "images.npy"), images)
        np.save(os.path.join(tmp, "labels.npy"), labels)
        np.save(os.path.join(tmp, "good.npy"), good)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"class_names": list(source.class_names), "ids": ids}, f)
        os.rename(tmp, path)
    except OSError:
        if not all(os.path.exists(os.path.join(path, name)) for name in _FILES):
            raise  # not another process's finished copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def array_source(config: Any, split: str, source: sources.Source | None = None) -> ArraySource:
    """The split of config.dataset (its listed `source`, where the caller has it) decoded into
    memory, from the cache or decoded now."""
    source = sources.make_source(config, split) if source is None else source
    path = os.path.join(cache_root(config), fingerprint(config, split, source))
    if not all(os.path.exists(os.path.join(path, name)) for name in _FILES):
        _write(path, source)
    return ArraySource(path)


@dataclasses.dataclass(frozen=True)
class Position(grain.transforms.MapWithIndex):
    """An element of the shuffled stream → its stream position (which seeds its draws) and the
    index of its image."""

    def map_with_index(self, position: int, index: int) -> dict[str, np.int64]:
        return {"position": np.int64(position), "index": np.int64(index)}


@dataclasses.dataclass(frozen=True)
class Draws(grain.transforms.Map):
    """A batch of `Position`s → each element's random choices, drawn as the folder pipeline's
    `train_crop` and `random_shift` draw them from the generator grain's `random_map(seed=seed)`
    gives its position, for the whole batch at once (`batch_rng`): scale S, window (offset,
    flip), RGB shift."""

    seed: int
    shape: tuple[int, int]  # of the stored images
    crop: int
    train_scale: tuple[int, int]
    pad: int
    flip: bool
    mean_rgb: tuple[float, ...]
    colour_std: float

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = batch_rng.BatchRng(self.seed, batch["position"])
        scale = rng.integers(self.train_scale[0], self.train_scale[1] + 1)
        sizes = {int(s): augment.rescaled_size(self.shape, int(s)) for s in np.unique(scale)}
        rescaled = np.array([sizes[int(s)] for s in scale], np.int64).reshape(-1, 2)
        rows, cols = augment.window_positions(rescaled, self.crop, self.pad).T
        offset = np.stack([rng.integers(0, rows), rng.integers(0, cols)], axis=1) - self.pad
        flipped = rng.random() < 0.5 if self.flip else np.zeros(len(scale), bool)
        if self.colour_std:  # normal draws: numpy's own generators, each from its stream's place
            shift = np.stack([self._shift(g) for g in rng.generators()])
        else:
            shift = np.broadcast_to(self._shift(None), (len(scale), 3))
        return {
            "index": batch["index"],
            "scale": scale.astype(np.int32),
            "offset": offset,
            "flipped": flipped,
            "shift": np.array(shift, np.float32),
        }

    def _shift(self, rng: np.random.Generator | None) -> np.ndarray:
        return augment.random_shift(rng, self.colour_std, self.mean_rgb)


@dataclasses.dataclass(frozen=True)
class Gather(grain.transforms.Map):
    """A batch of draws → a training batch: the images gathered from memory, rescaled to their
    S (once for all epochs where S is fixed: `ArraySource.rescaled`), cropped and flipped as
    drawn (`augment.cut_batch`), bad images masked."""

    source: ArraySource
    crop: int
    train_scale: tuple[int, int]

    def map(self, draws: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, scale = draws["index"], draws["scale"]
        channels = self.source.images.shape[-1]
        crops = np.empty((len(index), self.crop, self.crop, channels), np.uint8)
        for s in np.unique(scale):
            group = np.flatnonzero(scale == s)
            crops[group] = augment.cut_batch(
                self._rescaled(index[group], int(s)),
                draws["offset"][group],
                self.crop,
                draws["flipped"][group],
            )
        good = self.source.good[index]
        crops[~good] = 0
        return {
            "image": crops,
            "shift": np.where(good[:, None], draws["shift"], np.float32(0)),
            "label": self.source.labels[index],
            "mask": good.astype(np.float32),
        }

    def _rescaled(self, index: np.ndarray, s: int) -> np.ndarray:
        """The images at `index` rescaled to smallest side `s`."""
        if self.train_scale[0] == self.train_scale[1]:
            return self.source.rescaled(s)[index]
        return np.stack([augment.train_rescale(image, s) for image in self.source.images[index]])
