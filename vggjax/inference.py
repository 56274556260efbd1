"""The bucketed dense inference engine: whole images of any size through a few compiled shapes.

Evaluation (Sect. 3.2), Appendix B's features and localisation all apply a net densely to whole
images rescaled to test scales Q. This module runs such per-image computations ("heads") over a
data set, exactly and batched:

- each image is decoded once and rescaled on the host to every Q it is needed at (`load`);
- it is zero-padded into a size bucket (`bucket_shape`), top-left, and its valid size travels
  with it, so the dense net ignores the padding (`models.VGG`'s `sizes`) and `dense_average`
  averages over the image's own map positions only: the result is that of the image alone;
- images wait per program input, (the heads of their Q, bucket), until a batch is full: scales
  with the same heads share batches. What is left at the end runs in a batch of the smallest
  allowed size that holds it (`Engine.batch_sizes`: the devices' count doubling up to the
  batch size), or of the full size where the bucket ran full batches: at most half of a
  bucket's slots are empty (above one per device), and each bucket needs one program; the
  empty slots are dropped, so nothing is lost or counted twice;
- a program (heads, bucket, batch size) is lowered when its first batch is complete and
  compiled in a thread pool while the host reads on and the device runs the batches whose
  programs are ready (`Engine.program`); JAX's persistent compilation cache, when configured,
  serves programs an earlier run compiled;
- a batch is sharded over the devices of a mesh on its `data` axis; the device runs one batch
  while the host assembles the next;
- on several hosts each process reads its share of the images (elements p, p + P, …) and
  `Engine.run_source` gathers every result on every process, in the source's order.

A head is `compute(model, variables, images, sizes, **inputs) → (N, width)`, given mean-subtracted
padded images, their valid sizes and any per-image `inputs` the pass was given (localisation's
classes to box); `fill(width)` is the row an undecodable image gets.
"""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
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

# Host memory the batches waiting for their program may hold before the reading waits too.
_MAX_WAITING_BYTES = 2 << 30
_LOG_EVERY_SECONDS = 30


class Head(NamedTuple):
    """A per-scale output the device computes for a batch: (N, width) arrays."""

    compute: Callable[..., jax.Array]
    fill: Callable[[int], float]


def bucket_shape(
    height: int, width: int, multiple: int = 32, per_octave: int = 8
) -> tuple[int, int]:
    """The padded shape an image of this size is evaluated in.

    Each side is rounded up to a multiple of `multiple`, the step doubling with each doubling
    of the side past `per_octave` × `multiple`: sides fall into `per_octave` buckets per octave
    (coarser steps at large Q, where each program costs most to compile), padding stays under
    1/`per_octave` of a side past that, and an image however elongated needs a few buckets.
    """

    def side(n: int) -> int:
        step = multiple << max(0, (n // (multiple * per_octave)).bit_length() - 1)
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


def dense_averages(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    output: str | None = None,
    flip: bool = False,
) -> jax.Array:
    """`dense_average` of each image and, with `flip`, of its mirror: (N, 1 or 2, channels).

    The mirrors run in the same application of the net as the images (each next to its own, so
    a batch sharded over devices stays where it is): one traced net per program, half the
    Python that compiling a program costs, and twice the batch for the device."""
    if flip:
        both = jnp.stack([images, mirror(images, sizes)], 1)
        images, sizes = both.reshape(-1, *images.shape[1:]), jnp.repeat(sizes, 2, axis=0)
    averages = dense_average(model, variables, images, sizes, output)
    return averages.reshape(-1, 1 + flip, averages.shape[-1])


def _step(
    model: models.VGG,
    heads: tuple[tuple[str, Callable[..., jax.Array]], ...],
    mean_rgb: tuple[float, ...],
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    inputs: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """The outputs of `heads` at one scale, from a padded uint8 batch and per-image `inputs`."""
    x = augment.subtract_mean(images, mean_rgb)
    return {name: compute(model, variables, x, sizes, **inputs) for name, compute in heads}


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


_hits = threading.local()


def _count_cache_hits(event: str, **kwargs: Any) -> None:
    """Counts, per thread, the programs JAX loaded from its persistent cache instead of compiling."""
    if event == "/jax/compilation_cache/cache_hits":
        _hits.count = getattr(_hits, "count", 0) + 1


jax.monitoring.register_event_listener(_count_cache_hits)


class _Clock:
    """Wall time during which at least one program was being built (overlaps count once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active, self._since, self._total = 0, 0.0, 0.0

    def start(self) -> None:
        with self._lock:
            if not self._active:
                self._since = time.monotonic()
            self._active += 1

    def stop(self) -> None:
        with self._lock:
            self._active -= 1
            if not self._active:
                self._total += time.monotonic() - self._since

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._total + (time.monotonic() - self._since if self._active else 0.0)


class _Batch(NamedTuple):
    """A batch assembled on the host: its filled slots' element positions and scales Q, and
    the program's arguments after the variables (images, sizes, inputs), padded to its size."""

    index: np.ndarray
    scales: np.ndarray
    arrays: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]


class _Pass:
    """One pass's results and the batches waiting for their program or running on the device."""

    def __init__(
        self, engine: Engine, variables: Any, count: int, inputs: dict[str, np.ndarray], what: str
    ):
        self.engine, self.inputs, self.what, self.count = engine, inputs, what, count
        self.variables = jax.device_put(variables, engine.replicated)  # as the programs expect
        widths = engine.widths(variables, inputs)
        self.raw = {
            (head, q): np.zeros((count, widths[head]), np.float32)
            for q, heads in engine.plan.items()
            for head in heads
        }
        self.labels, self.bad = np.zeros(count, np.int32), np.zeros(count, bool)
        self.ids = [""] * count
        self.queues: dict[tuple, list[tuple[int, int, np.ndarray]]] = collections.defaultdict(list)
        self.full: set[tuple] = set()  # (heads, bucket) queues that filled a batch
        self.waiting: list[tuple[futures.Future, _Batch]] = []
        self.inflight: list[tuple[_Batch, dict[str, jax.Array]]] = []
        self.read, self.batches, self.padded_pixels = 0, 0, 0
        self.tails: dict[tuple, int] = {}  # at the end, the queues left: their batch sizes
        self.start = self.last_log = time.monotonic()

    def add(self, element: dict[str, Any]) -> None:
        """Queues an element's images; a queue that fills a batch launches it."""
        k, self.read = element["index"], self.read + 1
        self.labels[k], self.ids[k] = element["label"], element["id"]
        if element["images"] is None:
            self.bad[k] = True
            for (head, _), p in self.raw.items():
                p[k] = self.engine.heads[head].fill(p.shape[1])
        else:
            for q, image in zip(self.engine.plan, element["images"]):
                key = (self.engine.plan[q], self.engine.bucket(image))
                self.queues[key].append((k, q, image))
                if len(self.queues[key]) == self.engine.batch_size:
                    self.full.add(key)
                    self.launch(key, self.engine.batch_size)
        self.dispatch()
        self.log()

    def launch(self, key: tuple, size: int) -> None:
        """Assembles a queue's batch and asks for its program (compiled in the background)."""
        names, bucket = key
        items = self.queues.pop(key)
        index = np.asarray([k for k, _, _ in items])
        inputs = {name: a[index] for name, a in self.inputs.items()}
        arrays = self.engine.assemble(bucket, size, [image for _, _, image in items], inputs)
        program = self.engine.program(self.variables, names, bucket, size, self.inputs)
        self.waiting.append((program, _Batch(index, np.asarray([q for _, q, _ in items]), arrays)))
        self.batches += 1
        self.padded_pixels += arrays[0].size // 3  # batch × bucket: what the device runs

    def dispatch(self, wait: bool = False) -> None:
        """Runs the waiting batches whose programs are built; with `wait` (or while too many
        wait in host memory) waits for the programs still compiling."""
        while self.waiting:
            held = sum(batch.arrays[0].nbytes for _, batch in self.waiting)
            block = wait or held > _MAX_WAITING_BYTES
            if block:
                pending = [program for program, _ in self.waiting]
                futures.wait(pending, _LOG_EVERY_SECONDS, futures.FIRST_COMPLETED)
                self.log()
            ready = [item for item in self.waiting if item[0].done()]
            if not ready and not block:
                return
            for item in ready:
                self.waiting.remove(item)
                self.run(*item)

    def run(self, program: futures.Future, batch: _Batch) -> None:
        out = self.engine.start(program.result(), self.variables, batch.arrays)
        self.inflight.append((batch, out))
        if len(self.inflight) > 1:  # the device runs this batch while the host reads the last
            self.collect(*self.inflight.pop(0))

    def collect(self, batch: _Batch, out: dict[str, jax.Array]) -> None:
        for head, p in out.items():
            values = np.asarray(p)[: len(batch.index)]
            for q in np.unique(batch.scales):
                rows = batch.scales == q
                self.raw[head, int(q)][batch.index[rows]] = values[rows]

    def finish(self) -> dict[str, Any]:
        """Runs what is left: a queue whose bucket ran full batches in a full one (its program is
        built), any other in the smallest allowed batch that holds it. The device runs each
        batch whose program is ready while the next programs are lowered."""
        self.tails = {
            key: self.engine.batch_size if key in self.full else self.engine.batch_for(len(items))
            for key, items in self.queues.items()
        }
        while self.tails:
            key, size = self.tails.popitem()
            self.launch(key, size)
            self.dispatch()
            self.log()
        self.dispatch(wait=True)
        for item in self.inflight:
            self.collect(*item)
        return dict(
            raw=self.raw,
            labels=self.labels,
            bad=self.bad,
            ids=self.ids,
            batches=self.batches,
            padded_pixels=self.padded_pixels,
        )

    def log(self) -> None:
        """The progress line (process 0, every 30 s): images read, and either the rate and
        time left or, while programs compile, how many are left and the time spent on them."""
        now = time.monotonic()
        if jax.process_index() or now - self.last_log < _LOG_EVERY_SECONDS:
            return
        self.last_log, rate = now, self.read / max(now - self.start, 1e-9)
        building, cost = self.engine.building(), self.engine.cost()
        building += sum(
            not self.engine.has_program(self.variables, *key, size, self.inputs)
            for key, size in self.tails.items()
        )
        if building:
            logging.info(
                "Evaluating %s: %d/%d images read; compiling %d programs (%d built, %.0f s so far)",
                *(self.what, self.read, self.count, building),
                *(cost["compiled_shapes"] + cost["cached_shapes"], cost["compile_seconds"]),
            )
        else:
            logging.info(
                "Evaluating %s: %d/%d images, %.1f images/s, %.0f s left",
                *(self.what, self.read, self.count, rate, (self.count - self.read) / rate),
            )


class Engine:
    """The per-scale steps of one model on one mesh, their compiled programs, and the host loop
    that feeds them.

    plan: test scale Q → the names of the heads computed there; heads: what each name computes;
    batch_size: the global batch (each process runs its share); bucket_multiple and
    buckets_per_octave: `bucket_shape`'s; num_threads: host threads decoding images;
    compile_threads: programs compiled at once (default: the host's cores, at most 8);
    compiler_options: XLA options for every program (e.g. {"xla_gpu_autotune_level": 0}).
    `cost()` says how many programs XLA compiled, how many came from the persistent cache, and
    the wall time spent building them.
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
        buckets_per_octave: int = 8,
        compile_threads: int | None = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.model, self.plan, self.heads = model, plan, heads
        self.bucket_multiple, self.num_threads = bucket_multiple, max(1, num_threads)
        self.buckets_per_octave, self.compiler_options = buckets_per_octave, compiler_options
        self.batch_size, remainder = divmod(batch_size, jax.process_count())
        if remainder or self.batch_size % mesh.size:
            raise UserError(
                f"config.eval.batch_size ({batch_size}) must split evenly "
                f"over {jax.process_count()} processes of {mesh.size} devices each"
            )
        # Batches shrink to these sizes: one slot per device, doubling up to the batch size.
        self.batch_sizes = tuple(
            sorted({min(self.batch_size, mesh.size << k) for k in range(batch_size.bit_length())})
        )
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.steps = {
            names: jax.jit(
                functools.partial(
                    _step, model, tuple((n, heads[n].compute) for n in names), tuple(mean_rgb)
                ),
                in_shardings=(self.replicated, *(self.batch_sharding,) * 3),
                out_shardings=self.batch_sharding,
            )
            for names in set(plan.values())
        }
        self.programs: dict[tuple, futures.Future] = {}
        self._pool = futures.ThreadPoolExecutor(
            compile_threads or min(8, os.cpu_count() or 1), thread_name_prefix="vggjax-compile"
        )
        self._clock, self._lock = _Clock(), threading.Lock()
        self._counts = dict(compiled_shapes=0, cached_shapes=0)

    def bucket(self, image: np.ndarray) -> tuple[int, int]:
        """The bucket (padded shape) an image is evaluated in."""
        return bucket_shape(*image.shape[:2], self.bucket_multiple, self.buckets_per_octave)

    def batch_for(self, count: int) -> int:
        """The smallest allowed batch size holding `count` images."""
        return next(size for size in self.batch_sizes if size >= count)

    def widths(self, variables: Any, inputs: dict[str, np.ndarray] | None = None) -> dict[str, int]:
        """Each head's output width (classes for posteriors), without running anything."""
        crop = self.model.crop_size
        shapes = {}
        for step in self.steps.values():
            args = self._abstract_batch((crop, crop), self.batch_size, inputs or {}, None)
            shapes.update(jax.eval_shape(step, variables, *args))
        return {name: s.shape[-1] for name, s in shapes.items()}

    def _abstract_batch(
        self, bucket: tuple[int, int], size: int, inputs: dict[str, np.ndarray], sharding: Any
    ) -> tuple[Any, ...]:
        """A batch's (images, sizes, inputs) as shapes and dtypes; `inputs` holds whole columns."""

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sharding)

        return (
            spec((*bucket, 3), jnp.uint8),
            spec((2,), jnp.int32),
            {name: spec(a.shape[1:], a.dtype) for name, a in inputs.items()},
        )

    def program(
        self,
        variables: Any,
        names: tuple[str, ...],
        bucket: tuple[int, int],
        size: int,
        inputs: dict[str, np.ndarray] | None = None,
    ) -> futures.Future:
        """The compiled step computing heads `names` on batches of `size` images in `bucket`
        (and per-image `inputs`, whole columns): lowered here the first time it is asked for,
        compiled (or loaded from the persistent cache) in the engine's thread pool."""
        key, args = self._key(variables, names, bucket, size, inputs)
        if key not in self.programs:
            self._clock.start()
            try:
                lowered = self.steps[names].lower(variables, *args)
            except BaseException:
                self._clock.stop()
                raise
            self.programs[key] = self._pool.submit(self._compile, lowered)
        return self.programs[key]

    def _key(self, variables: Any, names: tuple[str, ...], *batch: Any) -> tuple[tuple, tuple]:
        """A program's key (heads, shapes and dtypes of all it takes) and its batch's arguments;
        batch: bucket, size and inputs, as `program` takes them."""
        bucket, size, inputs = batch
        args = self._abstract_batch(bucket, size, inputs or {}, self.batch_sharding)
        leaves, tree = jax.tree.flatten((variables, args))
        return (names, tree, tuple((x.shape, x.dtype) for x in leaves)), args

    def has_program(self, variables: Any, names: tuple[str, ...], *batch: Any) -> bool:
        """Whether `program` was asked for this one already (built or building)."""
        return self._key(variables, names, *batch)[0] in self.programs

    def _compile(self, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        try:
            hits = getattr(_hits, "count", 0)
            compiled = lowered.compile(self.compiler_options)
            cached = getattr(_hits, "count", 0) > hits
            with self._lock:
                self._counts["cached_shapes" if cached else "compiled_shapes"] += 1
            return compiled
        finally:
            self._clock.stop()

    def building(self) -> int:
        """Programs asked for and not built yet."""
        return sum(not program.done() for program in list(self.programs.values()))

    def cost(self) -> dict[str, Any]:
        """Programs XLA compiled, programs loaded from the persistent compilation cache, and the
        wall time building programs took (lowering included; parallel builds count once)."""
        with self._lock:
            return dict(self._counts, compile_seconds=round(self._clock.seconds, 2))

    def assemble(
        self,
        bucket: tuple[int, int],
        size: int,
        images: list[np.ndarray],
        inputs: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """A batch of `size` on the host: images padded top-left into `bucket`, their valid sizes
        and rows of `inputs`; slots past len(images) are empty (a crop-sized valid region of
        zeros, inputs of zeros)."""
        batch = np.zeros((size, *bucket, 3), np.uint8)
        sizes = np.full((size, 2), self.model.crop_size, np.int32)
        for slot, image in enumerate(images):
            batch[slot, : image.shape[0], : image.shape[1]] = image
            sizes[slot] = image.shape[:2]
        inputs = {
            name: np.pad(a, [(0, size - len(a))] + [(0, 0)] * (a.ndim - 1))
            for name, a in (inputs or {}).items()
        }
        return batch, sizes, inputs

    def start(
        self, program: jax.stages.Compiled, variables: Any, arrays: tuple[Any, ...]
    ) -> dict[str, jax.Array]:
        """Runs a built program on a host batch (`assemble`'s), sharded over the devices."""
        return program(variables, *jax.device_put(arrays, self.batch_sharding))

    def run_batch(
        self,
        variables: Any,
        q: int,
        bucket: tuple[int, int],
        images: list[np.ndarray],
        inputs: dict[str, np.ndarray] | None = None,
    ) -> dict[str, jax.Array]:
        """Starts the heads of scale `q` on images padded into `bucket`, with their rows of
        `inputs`, in the smallest allowed batch holding them (compiling its program first if
        need be); rows past len(images) are empty slots."""
        size = self.batch_for(len(images))
        variables = jax.device_put(variables, self.replicated)
        program = self.program(variables, self.plan[q], bucket, size, inputs).result()
        return self.start(program, variables, self.assemble(bucket, size, images, inputs))

    def outputs(
        self,
        variables: Any,
        elements: Iterable[dict[str, Any]],
        count: int,
        what: str = "",
        inputs: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """Per-scale head outputs `raw[head, Q]` (count × width), labels, ids and undecodable
        flags of `count` elements (dicts of `load`'s form, `index` counting from 0); `inputs`:
        name → (count, ...) rows the heads get for each element. Also the pass's `batches` and
        `padded_pixels` (what the device ran, padding and empty slots included)."""
        run = _Pass(self, variables, count, inputs or {}, what)
        for element in elements:
            run.add(element)
        result = run.finish()
        if jax.process_index() == 0:
            seconds, cost = time.monotonic() - run.start, self.cost()
            logging.info(
                "Evaluated %s: %d images in %.0f s, %.1f images/s; %d programs compiled, "
                "%d from the cache, %.0f s building them",
                *(what, count, seconds, count / max(seconds, 1e-9)),
                *(cost["compiled_shapes"], cost["cached_shapes"], cost["compile_seconds"]),
            )
        return result

    def run_source(
        self,
        variables: Any,
        source: sources.Source,
        what: str = "",
        inputs: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """`outputs` over all of `source` (with `inputs`' rows in the source's order): this
        process reads its share, all get the whole."""
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
        inputs = {name: np.asarray(a)[pi::pc] for name, a in (inputs or {}).items()}
        local = self.outputs(variables, elements, count, what, inputs)
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
