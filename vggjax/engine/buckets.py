"""Images of any size as batches of a few shapes: size buckets, batch sizes, padded batches, and
the dense net averaged over each image's own positions (heads).

Each image is zero-padded into a size bucket (`bucket_shape`), top-left, and its valid size
travels with it, so the dense net ignores the padding (`models.VGG`'s `sizes`) and
`dense_average` averages over the image's own map positions only: the result is that of the
image alone. `aligned_average` places the map elsewhere than top-left (`options.DENSE_ALIGNMENTS`)
by shifting each image by its own margins, so that stays true.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vggjax import models, options
from vggjax.data import augment, sources
from vggjax.errors import UserError


class Head(NamedTuple):
    """A per-scale output the device computes for a batch: (N, width) arrays.

    compute(model, variables, images, sizes, **inputs) → (N, width), given mean-subtracted padded
    images, their valid sizes and any per-image `inputs` the pass was given (localisation's
    classes to box); fill(width) is the value of the row an undecodable image gets.
    """

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


def unseen_margins(sizes: jax.Array, crop_size: int) -> jax.Array:
    """(N, 2) pixels of each side that no window of the dense map covers: its windows are
    crop-sized at a stride of 32, pooling floors each map, so up to 31 a side go unseen."""
    return sizes - crop_size - 32 * (models.dense_map_sizes(sizes, crop_size) - 1)


def shift(images: jax.Array, sizes: jax.Array, offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each image with its first offsets[n] = (rows, columns) dropped, still top-left in the
    padded batch, and its new valid size: its dense map's windows start that far in. The rows
    and columns dropped wrap round into the padding, which the net ignores."""
    rows = (jnp.arange(images.shape[1]) + offsets[:, :1]) % images.shape[1]
    columns = (jnp.arange(images.shape[2]) + offsets[:, 1:]) % images.shape[2]
    images = jnp.take_along_axis(images, rows[:, :, None, None], axis=1)
    return jnp.take_along_axis(images, columns[:, None, :, None], axis=2), sizes - offsets


def alignment_offsets(sizes: jax.Array, crop_size: int, alignment: str) -> jax.Array:
    """(shifts, N, 2): where each image's dense map starts for `alignment` (one of
    `options.DENSE_ALIGNMENTS`): every pair of its fractions of the unseen margins."""
    fractions = jnp.asarray(options.DENSE_ALIGNMENTS[alignment], jnp.float32)
    margins = unseen_margins(sizes, crop_size).astype(jnp.float32)
    per_side = jnp.floor(fractions[:, None, None] * margins).astype(jnp.int32)  # (k, N, 2)
    ys, xs = per_side[:, None, :, :1], per_side[None, :, :, 1:]
    return jnp.concatenate(jnp.broadcast_arrays(ys, xs), -1).reshape(-1, *sizes.shape)


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


def aligned_average(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    output: str | None = None,
    alignment: str = "top_left",
) -> jax.Array:
    """`dense_average` with the map placed on each image as `alignment` says; several shifts:
    their maps' positions averaged together (each shift has as many), one shift at a time."""
    if not any(options.DENSE_ALIGNMENTS[alignment]):  # top-left: no shift
        return dense_average(model, variables, images, sizes, output)
    offsets = alignment_offsets(sizes, model.crop_size, alignment)

    def at(offset):
        return dense_average(model, variables, *shift(images, sizes, offset), output)

    return at(offsets[0]) if len(offsets) == 1 else jax.lax.map(at, offsets).mean(0)


def dense_averages(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    output: str | None = None,
    flip: bool = False,
    alignment: str = "top_left",
) -> jax.Array:
    """`aligned_average` of each image and, with `flip`, of its mirror: (N, 1 or 2, channels).

    The mirrors run in the same application of the net as the images (each next to its own, so
    a batch sharded over devices stays where it is): one traced net per program, half the
    Python that compiling a program costs, and twice the batch for the device."""
    if flip:
        both = jnp.stack([images, mirror(images, sizes)], 1)
        images, sizes = both.reshape(-1, *images.shape[1:]), jnp.repeat(sizes, 2, axis=0)
    averages = aligned_average(model, variables, images, sizes, output, alignment)
    return averages.reshape(-1, 1 + flip, averages.shape[-1])


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


HostBatch = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]  # images, sizes, inputs


@dataclasses.dataclass(frozen=True)
class Batching:
    """How one process's images become batches: their buckets, the batch sizes allowed, the
    padded arrays.

    per_process_batch: this process's share of the global batch, the full size; sizes: the
    smaller ones a last batch may shrink to (one slot per device, doubling up to the full size);
    multiple and per_octave: `bucket_shape`'s; crop_size: the net's (an empty slot's valid size).
    """

    per_process_batch: int
    sizes: tuple[int, ...]
    multiple: int
    per_octave: int
    crop_size: int

    @classmethod
    def split(cls, global_batch: int, devices: int, **fields: Any) -> Batching:
        """The batching of one process of `jax.process_count()` when each runs `devices` devices
        and the batches of all together hold `global_batch` images."""
        per_process_batch, remainder = divmod(global_batch, jax.process_count())
        if remainder or per_process_batch % devices:
            raise UserError(
                f"the global batch ({global_batch}) must split evenly over "
                f"{jax.process_count()} processes of {devices} devices each"
            )
        sizes = {min(per_process_batch, devices << k) for k in range(global_batch.bit_length())}
        return cls(per_process_batch, tuple(sorted(sizes)), **fields)

    def bucket(self, image: np.ndarray) -> tuple[int, int]:
        """The bucket (padded shape) an image is evaluated in."""
        return bucket_shape(*image.shape[:2], self.multiple, self.per_octave)

    def size_for(self, count: int) -> int:
        """The smallest allowed batch size holding `count` images."""
        return next(size for size in self.sizes if size >= count)

    def assemble(
        self,
        bucket: tuple[int, int],
        size: int,
        images: list[np.ndarray],
        inputs: dict[str, np.ndarray] | None = None,
    ) -> HostBatch:
        """A batch of `size` on the host: images padded top-left into `bucket`, their valid sizes
        and rows of `inputs`; slots past len(images) are empty (a crop-sized valid region of
        zeros, inputs of zeros)."""
        batch = np.zeros((size, *bucket, 3), np.uint8)
        sizes = np.full((size, 2), self.crop_size, np.int32)
        for slot, image in enumerate(images):
            batch[slot, : image.shape[0], : image.shape[1]] = image
            sizes[slot] = image.shape[:2]
        inputs = {
            name: np.pad(a, [(0, size - len(a))] + [(0, 0)] * (a.ndim - 1))
            for name, a in (inputs or {}).items()
        }
        return batch, sizes, inputs

    @staticmethod
    def abstract(
        bucket: tuple[int, int], size: int, inputs: dict[str, np.ndarray], sharding: Any
    ) -> tuple[Any, ...]:
        """A batch's (images, sizes, inputs) as shapes and dtypes; `inputs` holds whole columns."""

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct((size, *shape), dtype, sharding=sharding)

        return (
            spec((*bucket, 3), jnp.uint8),
            spec((2,), jnp.int32),
            {name: spec(a.shape[1:], a.dtype) for name, a in inputs.items()},
        )
