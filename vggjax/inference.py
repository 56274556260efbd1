"""The bucketed dense inference engine: whole images of any size through a few compiled shapes.

Evaluation (Sect. 3.2), Appendix B's features and localisation all apply a net densely to whole
images rescaled to test scales Q. This module runs such per-image computations ("heads") over a
data set, exactly and batched:

- each image is decoded once and rescaled on the host to every Q it is needed at (`load`);
- it is zero-padded into a size bucket (`bucket_shape`), top-left, and its valid size travels
  with it, so the dense net ignores the padding (`models.VGG`'s `sizes`) and `dense_average`
  averages over the image's own map positions only: the result is that of the image alone;
- images wait per (Q, bucket) until a batch is full; what is left at the end runs in padded
  batches whose empty slots are dropped, so nothing is lost or counted twice;
- a batch is sharded over the devices of a mesh on its `data` axis; the device runs one batch
  while the host assembles the next;
- on several hosts each process reads its share of the images (elements p, p + P, …) and
  `Engine.run_source` gathers every result on every process, in the source's order.

A head is `compute(model, variables, images, sizes) → (N, width)`, given mean-subtracted padded
images and their valid sizes; `fill(width)` is the row an undecodable image gets.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vggjax import models
from vggjax.data import augment, sources
from vggjax.errors import UserError


class Head(NamedTuple):
    """A per-scale output the device computes for a batch: (N, width) arrays."""

    compute: Callable[..., jax.Array]
    fill: Callable[[int], float]


def bucket_shape(height: int, width: int, multiple: int = 32) -> tuple[int, int]:
    """The padded shape an image of this size is evaluated in.

    Each side is rounded up to a multiple of `multiple`, doubled for every doubling of the side
    over the smallest one: padding stays under `multiple`/smallest side, and an image however
    elongated falls into one of a few buckets per octave of aspect ratio.
    """
    short = min(height, width)

    def side(n: int) -> int:
        step = multiple << ((n // short).bit_length() - 1)
        return -(-n // step) * step

    return side(height), side(width)


def mirror(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Each image mirrored within its own valid width, still top-left in the padded batch."""
    columns = jnp.arange(images.shape[2])
    source = sizes[:, 1:] - 1 - columns  # (N, W); negative in the padding, which stays put
    source = jnp.where(source >= 0, source, columns)
    return jnp.take_along_axis(images, source[:, None, :, None], axis=2)


def dense_average(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    output: str | None = None,
) -> jax.Array:
    """The dense net's map (class scores, or the activation of layer `output`) averaged over
    each image's own positions: (N, channels). images: (N, H, W, 3), each image top-left in its
    padding; sizes: valid (height, width)."""
    maps = model.apply(variables, images, dense=True, sizes=sizes, output=output)
    maps = maps.astype(jnp.float32)
    valid = models.dense_map_sizes(sizes, model.crop_size)
    inside = models.valid_mask(valid, maps.shape[1], maps.shape[2])[..., None]
    return jnp.sum(jnp.where(inside, maps, 0.0), (1, 2)) / jnp.sum(inside, (1, 2))


def _step(
    model: models.VGG,
    heads: tuple[tuple[str, Callable[..., jax.Array]], ...],
    mean_rgb: tuple[float, ...],
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
) -> dict[str, jax.Array]:
    """The outputs of `heads` at one scale, from a padded uint8 batch."""
    x = augment.subtract_mean(images, mean_rgb)
    return {name: compute(model, variables, x, sizes) for name, compute in heads}


def load(source: sources.Source, scales: tuple[int, ...], index: int) -> dict[str, Any]:
    """Source element `index`, decoded and rescaled to each of `scales` (None: undecodable)."""
    element = source[index]
    try:
        image = augment.decode_image(element["data"], min_side=max(scales))
        images = [augment.rescale_smallest_side(image, q) for q in scales]
    except augment.BadImageError as e:
        logging.warning("Undecodable image %s counts as an error: %s", element["id"], e)
        images = None
    return dict(index=index, id=element["id"], label=element["label"], images=images)


def _gather(local: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    """Process p holds stream elements p, p + P, ...: all of them, in order, on every process."""
    count = jax.process_count()
    if count == 1:
        return local
    from jax.experimental import multihost_utils

    rows = -(-total // count)
    padded = {
        k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in local.items()
    }
    gathered = multihost_utils.process_allgather(padded)  # (P, rows, ...)
    return {
        k: np.swapaxes(np.asarray(v), 0, 1).reshape(count * rows, *v.shape[2:])[:total]
        for k, v in gathered.items()
    }


def _gather_ids(ids: list[str], total: int) -> np.ndarray:
    """`_gather` for strings: as fixed-width UTF-8 bytes, the width agreed by all processes."""
    if jax.process_count() == 1:
        return np.asarray(ids, dtype=str)
    from jax.experimental import multihost_utils

    encoded = np.char.encode(np.asarray(ids, dtype=str), "utf-8")
    width = int(np.max(multihost_utils.process_allgather(np.int32(encoded.dtype.itemsize))))
    as_bytes = encoded.astype(f"S{width}").view(np.uint8).reshape(len(ids), width)
    gathered = _gather({"ids": as_bytes}, total)["ids"]
    return np.char.decode(np.ascontiguousarray(gathered).view(f"S{width}")[:, 0], "utf-8")


class _Pass:
    """One pass's results and the batches waiting or running on the device."""

    def __init__(self, engine: Engine, variables: Any, count: int):
        self.engine, self.variables = engine, variables
        widths = engine.widths(variables)
        self.raw = {
            (head, q): np.zeros((count, widths[head]), np.float32)
            for q, heads in engine.plan.items()
            for head in heads
        }
        self.labels, self.bad = np.zeros(count, np.int32), np.zeros(count, bool)
        self.ids = [""] * count
        self.queues: dict[tuple[int, tuple[int, int]], list[tuple[int, np.ndarray]]] = (
            collections.defaultdict(list)
        )
        self.inflight: list[tuple[list[int], int, dict[str, jax.Array]]] = []

    def add(self, element: dict[str, Any]) -> None:
        """Queues an element's images; runs each queue that fills a batch."""
        k = element["index"]
        self.labels[k], self.ids[k] = element["label"], element["id"]
        if element["images"] is None:
            self.bad[k] = True
            for (head, _), p in self.raw.items():
                p[k] = self.engine.heads[head].fill(p.shape[1])
            return
        for q, image in zip(self.engine.plan, element["images"]):
            key = (q, bucket_shape(*image.shape[:2], self.engine.bucket_multiple))
            self.queues[key].append((k, image))
            if len(self.queues[key]) == self.engine.batch_size:
                self.launch(*key)

    def launch(self, q: int, bucket: tuple[int, int]) -> None:
        items = self.queues.pop((q, bucket))
        out = self.engine.run_batch(self.variables, q, bucket, [image for _, image in items])
        self.inflight.append(([k for k, _ in items], q, out))
        if len(self.inflight) > 1:  # the device runs this batch while the host reads the last
            self.collect(*self.inflight.pop(0))

    def collect(self, index: list[int], q: int, out: dict[str, jax.Array]) -> None:
        for head, p in out.items():
            self.raw[head, q][index] = np.asarray(p)[: len(index)]

    def finish(self) -> dict[str, Any]:
        for key in list(self.queues):
            self.launch(*key)
        for item in self.inflight:
            self.collect(*item)
        return dict(raw=self.raw, labels=self.labels, bad=self.bad, ids=self.ids)


class Engine:
    """The jitted per-scale steps of one model on one mesh, and the host loop that feeds them.

    plan: test scale Q → the names of the heads computed there; heads: what each name computes.
    `compiled` collects the distinct (heads, bucket) programs run, each compiled once.
    """

    def __init__(
        self,
        model: models.VGG,
        mean_rgb: tuple[float, ...],
        mesh: jax.sharding.Mesh,
        plan: dict[int, tuple[str, ...]],
        heads: dict[str, Head],
        batch_size: int,
        bucket_multiple: int = 32,
        num_threads: int = 1,
    ):
        self.model, self.plan, self.heads = model, plan, heads
        self.bucket_multiple, self.num_threads = bucket_multiple, max(1, num_threads)
        self.batch_size, remainder = divmod(batch_size, jax.process_count())
        if remainder or self.batch_size % mesh.size:
            raise UserError(
                f"config.eval.batch_size ({batch_size}) must split evenly "
                f"over {jax.process_count()} processes of {mesh.size} devices each"
            )
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.steps = {
            names: jax.jit(
                functools.partial(
                    _step, model, tuple((n, heads[n].compute) for n in names), tuple(mean_rgb)
                ),
                in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
                out_shardings=self.batch_sharding,
            )
            for names in set(plan.values())
        }
        self.compiled: set[tuple[tuple[str, ...], tuple[int, int]]] = set()

    def widths(self, variables: Any) -> dict[str, int]:
        """Each head's output width (classes for posteriors), without running anything."""
        crop = self.model.crop_size
        images = jax.ShapeDtypeStruct((self.batch_size, crop, crop, 3), jnp.uint8)
        sizes = jax.ShapeDtypeStruct((self.batch_size, 2), jnp.int32)
        shapes = {}
        for step in self.steps.values():
            shapes.update(jax.eval_shape(step, variables, images, sizes))
        return {name: s.shape[-1] for name, s in shapes.items()}

    def run_batch(
        self, variables: Any, q: int, bucket: tuple[int, int], images: list[np.ndarray]
    ) -> dict[str, jax.Array]:
        """Starts the heads of scale `q` on up to batch_size images padded into `bucket`; rows
        past len(images) are empty slots (a crop-sized valid region of zeros)."""
        batch = np.zeros((self.batch_size, *bucket, 3), np.uint8)
        sizes = np.full((self.batch_size, 2), self.model.crop_size, np.int32)
        for slot, image in enumerate(images):
            batch[slot, : image.shape[0], : image.shape[1]] = image
            sizes[slot] = image.shape[:2]
        self.compiled.add((self.plan[q], bucket))
        return self.steps[self.plan[q]](
            variables,
            jax.device_put(batch, self.batch_sharding),
            jax.device_put(sizes, self.batch_sharding),
        )

    def outputs(
        self, variables: Any, elements: Iterable[dict[str, Any]], count: int, what: str = ""
    ) -> dict[str, Any]:
        """Per-scale head outputs `raw[head, Q]` (count × width), labels, ids and undecodable
        flags of `count` elements (dicts of `load`'s form, `index` counting from 0)."""
        run = _Pass(self, variables, count)
        start = last_log = time.monotonic()
        for done, element in enumerate(elements, start=1):
            run.add(element)
            now = time.monotonic()
            if jax.process_index() == 0 and now - last_log > 30:
                last_log, rate = now, done / (now - start)
                left = (count - done) / rate
                logging.info(
                    "Evaluating %s: %d/%d images, %.1f images/s, %.0f s left",
                    *(what, done, count, rate, left),
                )
        result = run.finish()
        if jax.process_index() == 0:
            seconds = time.monotonic() - start
            logging.info(
                "Evaluated %s: %d images in %.0f s, %.1f images/s",
                *(what, count, seconds, count / max(seconds, 1e-9)),
            )
        return result

    def run_source(self, variables: Any, source: sources.Source, what: str = "") -> dict[str, Any]:
        """`outputs` over all of `source`: this process reads its share, all get the whole."""
        pi, pc = jax.process_index(), jax.process_count()
        count = len(range(pi, len(source), pc))
        read = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=2 * self.batch_size
        )
        dataset = (
            grain.MapDataset.range(len(source))[pi::pc]
            .map(functools.partial(load, source, tuple(self.plan)))
            .to_iter_dataset(read)
        )
        # Local positions: stream element p + k·P is this process's k-th.
        elements = (dict(element, index=element["index"] // pc) for element in dataset)
        local = self.outputs(variables, elements, count, what)
        arrays = _gather(
            dict(
                labels=local["labels"],
                bad=local["bad"],
                **{f"{head}@{q}": p for (head, q), p in local["raw"].items()},
            ),
            len(source),
        )
        return dict(
            raw={(head, q): arrays[f"{head}@{q}"] for head, q in local["raw"]},
            labels=arrays["labels"],
            bad=arrays["bad"],
            ids=_gather_ids(local["ids"], len(source)),
        )
