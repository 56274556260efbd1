"""The bucketed dense inference engine: whole images of any size through a few compiled shapes.

Evaluation (Sect. 3.2), Appendix B's features and localisation all apply a net densely to whole
images rescaled to test scales Q. The engine runs such per-image computations ("heads") over a
data set, exactly and batched:

- each image is decoded once and rescaled on the host to every Q it is needed at (`load`);
- it is padded into a size bucket, its valid size travelling with it, so that the result is that
  of the image alone (buckets.py);
- images wait per program input until a batch is full, and the device runs each batch as soon
  as its program is built (scheduler.py);
- programs are compiled ahead in a thread pool, or loaded from JAX's persistent compilation
  cache (programs.py);
- a batch is sharded over the devices of a mesh on its `data` axis;
- on several hosts each process reads its share of the images (elements p, p + P, …) and
  `Engine.run_source` gathers every result on every process, in the source's order (gather.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import logging

from vggjax import models, sharding
from vggjax.data import augment, sources
from vggjax.engine import gather
from vggjax.engine.buckets import Batching, Head, bucket_shape, dense_average, dense_averages, load
from vggjax.engine.programs import Programs
from vggjax.engine.scheduler import Pass
from vggjax.errors import UserError

__all__ = ["Engine", "Head", "bucket_shape", "dense_average", "dense_averages", "load"]


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


class Engine:
    """The per-scale steps of one model on one mesh, their compiled programs, and the host loop
    that feeds them. Usually built by `from_config`.

    Args:
      model: the net.
      mean_rgb: subtracted from the images (uint8 up to the device) before the net.
      mesh: the devices of this process that run the batches (`from_config` uses all local
        ones).
      plan: test scale Q → the names of the heads computed there; scales with the same heads
        share batches and programs.
      heads: what each name computes (`Head`).
      global_batch: images per batch over all processes; each runs its share,
        `per_process_batch`, which must split evenly over its devices.
      bucket_multiple: images are padded to sides that are multiples of this (`bucket_shape`).
      num_threads: host threads decoding and rescaling images.
      buckets_per_octave: buckets per doubling of a side past `buckets_per_octave` ×
        `bucket_multiple`; fewer means fewer programs to compile and more padding.
      compile_threads: programs compiled at once (default: `programs.Programs`'s).
      compiler_options: XLA options for every program (e.g. {"xla_gpu_autotune_level": 0}).

    Raises:
      UserError: `global_batch` does not split evenly over the processes and their devices.
    """

    def __init__(
        self,
        model: models.VGG,
        mean_rgb: tuple[float, ...],
        mesh: jax.sharding.Mesh,
        plan: dict[int, tuple[str, ...]],
        heads: dict[str, Head],
        global_batch: int,
        bucket_multiple: int = 32,
        num_threads: int = 1,
        buckets_per_octave: int = 8,
        compile_threads: int | None = None,
        compiler_options: dict[str, Any] | None = None,
    ):
        self.model, self.plan, self.heads = model, plan, heads
        self.num_threads = max(1, num_threads)
        self.batching = Batching.split(
            global_batch,
            mesh.size,
            multiple=bucket_multiple,
            per_octave=buckets_per_octave,
            crop_size=model.crop_size,
        )
        self.replicated = sharding.replicated(mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
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
        self.programs = Programs(
            self.steps, self.batching, self.batch_sharding, compile_threads, compiler_options
        )

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        plan: dict[int, tuple[str, ...]],
        heads: dict[str, Head],
        mesh: jax.sharding.Mesh | None = None,
        **options: Any,
    ) -> Engine:
        """The engine of `config`'s net: how evaluation, features and localisation build theirs.

        Each process runs its own share on its own devices (the default mesh): the hosts need
        not agree on the order of bucket shapes, and nothing is communicated until the results
        are gathered.

        Args:
          config: gives the net (its model fields and mean RGB), the batching
            (`eval.batch_size`, `eval.bucket_multiple`, `eval.buckets_per_octave`) and the
            decoding threads (`num_workers`).
          plan: test scale Q → the names of the heads computed there.
          heads: what each name computes.
          mesh: default all of this process's devices.
          **options: the engine's other settings, for benchmarks (`compile_threads`,
            `compiler_options`).

        Raises:
          UserError: `config.eval.batch_size` does not split over the processes' devices.
        """
        try:
            return cls(
                models.model_from_config(config),
                tuple(config.mean_rgb),
                mesh or sharding.make_mesh(jax.local_devices()),
                plan,
                heads,
                config.eval.batch_size,
                bucket_multiple=config.eval.bucket_multiple,
                num_threads=config.num_workers,
                buckets_per_octave=config.eval.buckets_per_octave,
                **options,
            )
        except UserError as e:
            raise UserError(f"config.eval.batch_size: {e}") from e

    @property
    def per_process_batch(self) -> int:
        """This process's share of the global batch: a full batch's size."""
        return self.batching.per_process_batch

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes a last batch may shrink to, the full one included."""
        return self.batching.sizes

    def cost(self) -> dict[str, Any]:
        """What building the programs has cost so far: `compiled_shapes` (compiled by XLA),
        `cached_shapes` (loaded from JAX's persistent cache instead) and `compile_seconds` (wall
        time, lowering included, parallel builds counted once)."""
        return self.programs.cost()

    def outputs(
        self,
        variables: Any,
        elements: Iterable[dict[str, Any]],
        count: int,
        what: str = "",
        inputs: dict[str, np.ndarray] | None = None,
    ) -> dict[str, Any]:
        """One pass of the heads over this process's elements (`run_source` also gathers).

        Args:
          variables: the model's variables (put on the mesh, replicated, here).
          elements: dicts of `load`'s form, their `index` counting from 0 to `count` − 1.
          count: how many elements there are: the results are allocated before the first.
          what: names the pass in the progress and summary log lines.
          inputs: name → (count, ...) rows each element's heads get (e.g. localisation's
            classes to box), in `index` order.

        Returns:
          A dict: `raw[head, Q]` (count × width) per-scale head outputs, `labels`, `ids` and
          `bad` (undecodable: the head's `fill` row), in `index` order; and the pass's `batches`
          and `padded_pixels` (what the device ran, padding and empty slots included).
        """
        fills = {name: head.fill for name, head in self.heads.items()}
        variables = jax.device_put(variables, self.replicated)  # as the programs expect
        run = Pass(
            self.plan, fills, self.batching, self.programs, variables, count, inputs or {}, what
        )
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
        """`outputs` over all of `source`: each process reads and runs its share (elements p,
        p + P, …), and every process gets the whole, in the source's order.

        Args:
          variables: the model's variables.
          source: the images (e.g. `sources.make_source(config, "val")`).
          what: names the pass in the log lines.
          inputs: name → (len(source), ...) rows the heads get, in the source's order.

        Returns:
          `raw[head, Q]` (len(source) × width), `labels`, `bad` and `ids` of every element.
        """
        pi, pc = jax.process_index(), jax.process_count()
        count = len(range(pi, len(source), pc))
        read = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=2 * self.per_process_batch
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
        arrays = gather.gather(
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
            ids=gather.gather_ids(local["ids"], len(source)),
        )
