"""An engine's compiled programs: built ahead in a thread pool, cached by shape, counted, timed.

A program (heads, bucket, batch size) is lowered when its first batch is complete and compiled in
a thread pool while the host reads on and the device runs the batches whose programs are ready;
JAX's persistent compilation cache, when configured, serves programs an earlier run compiled,
and `Programs.cost` says how many did.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent import futures
from typing import Any

import jax
import numpy as np

from vggjax.engine.buckets import Batching

_hits = threading.local()


def _count_cache_hits(event: str, **kwargs: Any) -> None:
    """Counts, per thread, the programs JAX loaded from its persistent cache instead of compiling."""
    if event == "/jax/compilation_cache/cache_hits":
        _hits.count = getattr(_hits, "count", 0) + 1


@functools.cache
def _listen_for_cache_hits() -> None:
    """Registers `_count_cache_hits` with JAX, once per process, when an engine first builds a
    program: importing vggjax registers nothing."""
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


class Programs:
    """The jitted `steps` (heads' names → step) compiled for each batch shape they are asked for.

    compile_threads: programs compiled at once (default: the host's cores, at most 8);
    compiler_options: XLA options for every program (e.g. {"xla_gpu_autotune_level": 0}).
    """

    def __init__(
        self,
        steps: dict[tuple[str, ...], Any],
        batching: Batching,
        batch_sharding: jax.sharding.Sharding,
        compile_threads: int | None = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.steps, self.batching, self.batch_sharding = steps, batching, batch_sharding
        self.compiler_options = compiler_options
        self._built: dict[tuple, futures.Future] = {}
        self._pool = futures.ThreadPoolExecutor(
            compile_threads or min(8, os.cpu_count() or 1), thread_name_prefix="vggjax-compile"
        )
        self._clock, self._lock = _Clock(), threading.Lock()
        self._counts = dict(compiled_shapes=0, cached_shapes=0)

    def __len__(self) -> int:
        """Programs asked for so far (built or building)."""
        return len(self._built)

    def get(
        self,
        variables: Any,
        names: tuple[str, ...],
        bucket: tuple[int, int],
        size: int,
        inputs: dict[str, np.ndarray] | None = None,
    ) -> futures.Future:
        """The compiled step computing heads `names` on batches of `size` images in `bucket`
        (and per-image `inputs`, whole columns): lowered here the first time it is asked for,
        compiled (or loaded from the persistent cache) in the thread pool."""
        key, args = self._key(variables, names, bucket, size, inputs)
        if key not in self._built:
            _listen_for_cache_hits()
            self._clock.start()
            try:
                lowered = self.steps[names].lower(variables, *args)
            except BaseException:
                self._clock.stop()
                raise
            self._built[key] = self._pool.submit(self._compile, lowered)
        return self._built[key]

    def _key(self, variables: Any, names: tuple[str, ...], *batch: Any) -> tuple[tuple, tuple]:
        """A program's key (heads, shapes and dtypes of all it takes) and its batch's arguments;
        batch: bucket, size and inputs, as `get` takes them."""
        bucket, size, inputs = batch
        args = self.batching.abstract(bucket, size, inputs or {}, self.batch_sharding)
        leaves, tree = jax.tree.flatten((variables, args))
        return (names, tree, tuple((x.shape, x.dtype) for x in leaves)), args

    def has(self, variables: Any, names: tuple[str, ...], *batch: Any) -> bool:
        """Whether `get` was asked for this one already (built or building)."""
        return self._key(variables, names, *batch)[0] in self._built

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
        return sum(not program.done() for program in list(self._built.values()))

    def cost(self) -> dict[str, Any]:
        """Programs XLA compiled, programs loaded from the persistent compilation cache, and the
        wall time building programs took (lowering included; parallel builds count once)."""
        with self._lock:
            return dict(self._counts, compile_seconds=round(self._clock.seconds, 2))

    def start(
        self, program: jax.stages.Compiled, variables: Any, arrays: tuple[Any, ...]
    ) -> dict[str, jax.Array]:
        """Runs a built program on a host batch (`Batching.assemble`'s), sharded over the
        devices; returns without waiting for the device."""
        return program(variables, *jax.device_put(arrays, self.batch_sharding))

    def widths(self, variables: Any, inputs: dict[str, np.ndarray]) -> dict[str, int]:
        """Each head's output width (classes for posteriors), without running anything."""
        crop, shapes = self.batching.crop_size, {}
        for step in self.steps.values():
            args = self.batching.abstract(
                (crop, crop), self.batching.per_process_batch, inputs, None
            )
            shapes.update(jax.eval_shape(step, variables, *args))
        return {name: s.shape[-1] for name, s in shapes.items()}
