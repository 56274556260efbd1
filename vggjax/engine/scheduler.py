"""One pass over the images: batches wait per program input until full, run as their programs
are built, and the results land in per-scale arrays.

Images wait per program input, (the heads of their Q, bucket), until a batch is full: scales with
the same heads share batches. What is left at the end runs in a batch of the smallest allowed
size that holds it (`Batching.sizes`), or of the full size where the bucket ran full batches: at
most half of a bucket's slots are empty (above one per device), and each bucket needs one
program; the empty slots are dropped, so nothing is lost or counted twice. The device runs one
batch while the host assembles the next.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

from vggjax.engine.buckets import Batching, HostBatch
from vggjax.engine.programs import Programs

# Host memory the batches waiting for their program may hold before the reading waits too.
_MAX_WAITING_BYTES = 2 << 30
_LOG_EVERY_SECONDS = 30


class _Batch(NamedTuple):
    """A batch assembled on the host: its filled slots' element positions and scales Q, and
    the program's arguments after the variables (images, sizes, inputs), padded to its size."""

    index: np.ndarray
    scales: np.ndarray
    arrays: HostBatch


class Pass:
    """One pass's results and the batches waiting for their program or running on the device.

    plan: test scale Q → the names of the heads computed there; fills: each head's `Head.fill`;
    batching and programs: the engine's; variables: on the devices as the programs expect;
    inputs: name → (count, ...) rows the heads get for each element; what: for the log.
    """

    def __init__(
        self,
        plan: dict[int, tuple[str, ...]],
        fills: dict[str, Callable[[int], float]],
        batching: Batching,
        programs: Programs,
        variables: Any,
        count: int,
        inputs: dict[str, np.ndarray],
        what: str,
    ):
        self.plan, self.fills, self.batching, self.programs = plan, fills, batching, programs
        self.variables, self.count, self.inputs, self.what = variables, count, inputs, what
        widths = programs.widths(variables, inputs)
        self.raw = {
            (head, q): np.zeros((count, widths[head]), np.float32)
            for q, heads in plan.items()
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
                p[k] = self.fills[head](p.shape[1])
        else:
            full = self.batching.per_process_batch
            for q, image in zip(self.plan, element["images"]):
                key = (self.plan[q], self.batching.bucket(image))
                self.queues[key].append((k, q, image))
                if len(self.queues[key]) == full:
                    self.full.add(key)
                    self.launch(key, full)
        self.dispatch()
        self.log()

    def launch(self, key: tuple, size: int) -> None:
        """Assembles a queue's batch and asks for its program (compiled in the background)."""
        names, bucket = key
        items = self.queues.pop(key)
        index = np.asarray([k for k, _, _ in items])
        inputs = {name: a[index] for name, a in self.inputs.items()}
        arrays = self.batching.assemble(bucket, size, [image for _, _, image in items], inputs)
        program = self.programs.get(self.variables, names, bucket, size, self.inputs)
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
            # By identity: batches of one program compare their arrays under ==.
            self.waiting = [item for item in self.waiting if not any(item is r for r in ready)]
            for item in ready:
                self.run(*item)

    def run(self, program: futures.Future, batch: _Batch) -> None:
        out = self.programs.start(program.result(), self.variables, batch.arrays)
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
            key: self.batching.per_process_batch
            if key in self.full
            else self.batching.size_for(len(items))
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
        building, cost = self.programs.building(), self.programs.cost()
        building += sum(
            not self.programs.has(self.variables, *key, size, self.inputs)
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
