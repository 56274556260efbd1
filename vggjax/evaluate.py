"""Testing as in Sect. 3.2 and 4.1–4.4: dense, multi-scale, multi-crop, their combination, fusion.

Each validation image is decoded once per model and isotropically rescaled on the host to every
test scale Q it needs; the device computes each protocol's posteriors from the rescaled image.
Images of many sizes go through a few compiled shapes: each is zero-padded to a size bucket
(`bucket_shape`) and the dense net ignores the padding (`models.VGG`'s `sizes`), so the result is
that of the image alone. Posteriors are kept per image: protocols, scales and models combine on
the host, and `predictions.npz` lets runs be fused later (`fuse_predictions`) without recomputing.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vggjax import checkpoints, models, train
from vggjax.data import augment, sources

# The protocols are recipe.EVAL_PROTOCOLS; this is their "evaluation method" column (Tables 3–6).
METHODS = {
    "dense": "dense",
    "multi_scale_dense": "dense",
    "multi_crop": "multi-crop",
    "multi_crop_dense": "multi-crop & dense",
    "centre_crop": "centre crop",
}
GRID = 5  # Sect. 3.2: a 5×5 regular grid of crops, each also mirrored: 50 crops per scale


def centre_crop_scale(crop_size: int) -> int:
    """The torchvision/Keras protocol's smallest side: 256 for 224 crops, in proportion else."""
    return round(256 * crop_size / 224)


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


def grid_offsets(size: jax.Array | int, crop: int) -> jax.Array:
    """Top (or left) offsets of the GRID crops spanning a side of `size`: (..., GRID)."""
    return (jnp.asarray(size)[..., None] - crop) * jnp.arange(GRID) // (GRID - 1)


def crops_at(images: jax.Array, offsets: jax.Array, crop: int) -> jax.Array:
    """One crop×crop window per image, its top-left corner at offsets[n] = (y, x)."""
    return jax.vmap(
        lambda image, o: jax.lax.dynamic_slice(
            image, (o[0], o[1], 0), (crop, crop, image.shape[-1])
        )
    )(images, offsets)


def mirror(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Each image mirrored within its own valid width, still top-left in the padded batch."""
    columns = jnp.arange(images.shape[2])
    source = sizes[:, 1:] - 1 - columns  # (N, W); negative in the padding, which stays put
    source = jnp.where(source >= 0, source, columns)
    return jnp.take_along_axis(images, source[:, None, :, None], axis=2)


def dense_scores(
    model: models.VGG, variables: Any, images: jax.Array, sizes: jax.Array
) -> jax.Array:
    """Sect. 3.2: the class score map averaged over each image's own positions: (N, classes).
    images: (N, H, W, 3), each image top-left in its padding; sizes: valid (height, width)."""
    scores = model.apply(variables, images, dense=True, sizes=sizes).astype(jnp.float32)
    valid = models.dense_map_sizes(sizes, model.crop_size)
    inside = models.valid_mask(valid, scores.shape[1], scores.shape[2])[..., None]
    return jnp.sum(jnp.where(inside, scores, 0.0), (1, 2)) / jnp.sum(inside, (1, 2))


def dense_posteriors(
    model: models.VGG, variables: Any, images: jax.Array, sizes: jax.Array, flip: bool = True
) -> jax.Array:
    """Softmax of `dense_scores`; with `flip`, averaged with the mirror's (Sect. 3.2)."""
    p = jax.nn.softmax(dense_scores(model, variables, images, sizes))
    if flip:
        p = (p + jax.nn.softmax(dense_scores(model, variables, mirror(images, sizes), sizes))) / 2
    return p


def _classic_posteriors(model: models.VGG, variables: Any, crops: jax.Array) -> jax.Array:
    return jax.nn.softmax(model.apply(variables, crops).astype(jnp.float32))


def multi_crop_posteriors(
    model: models.VGG, variables: Any, images: jax.Array, sizes: jax.Array
) -> jax.Array:
    """Sect. 3.2: the mean posterior of a GRID×GRID grid of crops and their mirrors."""
    crop = model.crop_size
    ys, xs = grid_offsets(sizes[:, 0], crop), grid_offsets(sizes[:, 1], crop)
    offsets = jnp.stack(jnp.broadcast_arrays(ys[:, :, None], xs[:, None, :]), -1)
    offsets = offsets.reshape(-1, GRID * GRID, 2).swapaxes(0, 1)  # (positions, N, 2)

    def at(offset):  # one grid position at a time: memory of 2N crops, not 50N
        crops = crops_at(images, offset, crop)
        return _classic_posteriors(model, variables, crops) + _classic_posteriors(
            model, variables, crops[:, :, ::-1]
        )

    return jax.lax.map(at, offsets).sum(0) / (2 * GRID * GRID)


def centre_crop_posteriors(
    model: models.VGG, variables: Any, images: jax.Array, sizes: jax.Array
) -> jax.Array:
    """One central crop, no mirror (`augment.center_crop`'s window)."""
    crops = crops_at(images, (sizes - model.crop_size) // 2, model.crop_size)
    return _classic_posteriors(model, variables, crops)


class Head(NamedTuple):
    """A per-scale output the device computes for a batch: (N, width) arrays.

    compute(model, variables, images, sizes) takes mean-subtracted padded images; `fill` is the
    row an undecodable image gets (the uniform posterior, say)."""

    compute: Callable[..., jax.Array]
    fill: Callable[[int], float]


def posterior_heads(flip: bool = True) -> dict[str, Head]:
    """The classification protocols' per-scale posteriors; undecodable images get 1/classes."""
    uniform = lambda width: 1.0 / width
    return {
        "dense": Head(functools.partial(dense_posteriors, flip=flip), uniform),
        "multi_crop": Head(multi_crop_posteriors, uniform),
        "centre_crop": Head(centre_crop_posteriors, uniform),
    }


def _step(
    model: models.VGG,
    heads: tuple[tuple[str, Callable[..., jax.Array]], ...],
    mean_rgb: tuple[float, ...],
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
) -> dict[str, jax.Array]:
    """The outputs of `heads` at one scale, from a padded uint8 batch."""
    x = images.astype(jnp.float32) - jnp.asarray(mean_rgb, jnp.float32)
    return {name: compute(model, variables, x, sizes) for name, compute in heads}


def plan(config: ml_collections.ConfigDict) -> dict[int, tuple[str, ...]]:
    """Test scale Q → the per-scale posteriors ("heads") the configured protocols need there."""
    protocols = set(config.eval.protocols)
    heads = ("dense",) * bool(protocols & {"dense", "multi_scale_dense", "multi_crop_dense"}) + (
        "multi_crop",
    ) * bool(protocols & {"multi_crop", "multi_crop_dense"})
    scales = dict.fromkeys(config.eval.scales, heads) if heads else {}
    if "centre_crop" in protocols:
        q = centre_crop_scale(config.crop_size)
        scales[q] = scales.get(q, ()) + ("centre_crop",)
    return scales


def protocol_posteriors(
    raw: dict[tuple[str, int], np.ndarray], config: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Each protocol's per-image posteriors from the per-scale ones (`raw[head, Q]`)."""
    protocols, scales = config.eval.protocols, tuple(config.eval.scales)

    def over_scales(head):
        return sum(raw[head, q] for q in scales) / len(scales)

    out = {}
    if "dense" in protocols:
        out.update({f"dense_q{q}": raw["dense", q] for q in scales})
    if "multi_scale_dense" in protocols:
        out["multi_scale_dense"] = over_scales("dense")
    if "multi_crop" in protocols:
        out["multi_crop"] = over_scales("multi_crop")
    if "multi_crop_dense" in protocols:  # Table 5: the two techniques' posteriors averaged
        out["multi_crop_dense"] = (over_scales("dense") + over_scales("multi_crop")) / 2
    if "centre_crop" in protocols:
        out["centre_crop"] = raw["centre_crop", centre_crop_scale(config.crop_size)]
    return out


def fuse(posteriors: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Sect. 4.4: the posteriors of several models averaged, for each protocol they all have."""
    names = [name for name in posteriors[0] if all(name in p for p in posteriors)]
    return {name: sum(p[name] for p in posteriors) / len(posteriors) for name in names}


def error_rates(posteriors: np.ndarray, labels: np.ndarray, bad: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 error; undecodable images (`bad`) are errors whatever their posterior."""
    k = min(5, posteriors.shape[1])
    top_k = np.argpartition(-posteriors, k - 1, axis=1)[:, :k]
    top1 = (posteriors.argmax(1) != labels) | bad
    top5 = ~(top_k == labels[:, None]).any(1) | bad
    n = max(len(labels), 1)
    return float(top1.sum() / n), float(top5.sum() / n)


def _load(source: sources.Source, scales: tuple[int, ...], index: int) -> dict[str, Any]:
    """Stream element `index`, decoded and rescaled to each of `scales` (None: undecodable)."""
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


class Evaluator:
    """The jitted protocol steps of one model on one mesh, and the host loop that feeds them.

    The loop groups images by (scale, bucket) and runs a group when it holds a full batch; the
    groups left at the end run padded with masked entries, so no image is dropped or repeated.
    `compiled` collects the distinct (heads, bucket) programs run, each compiled once.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        mesh: jax.sharding.Mesh,
        scales: dict[int, tuple[str, ...]] | None = None,
        heads: dict[str, Head] | None = None,
    ):
        """scales: test scale Q → the heads computed there (default: what `config.eval`'s
        protocols need, `plan`); heads: what each name computes (default: `posterior_heads`)."""
        self.config, self.model = config, train.model_from_config(config)
        self.plan = plan(config) if scales is None else scales
        self.heads = posterior_heads(config.eval.flip) if heads is None else heads
        self.batch_size, remainder = divmod(config.eval.batch_size, jax.process_count())
        if remainder or self.batch_size % mesh.size:
            raise ValueError(
                f"config.eval.batch_size ({config.eval.batch_size}) must split evenly "
                f"over {jax.process_count()} processes of {mesh.size} devices each"
            )
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self.steps = {
            names: jax.jit(
                functools.partial(
                    _step,
                    self.model,
                    tuple((n, self.heads[n].compute) for n in names),
                    tuple(config.mean_rgb),
                ),
                in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
                out_shardings=self.batch_sharding,
            )
            for names in set(self.plan.values())
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

    def outputs(
        self, variables: Any, elements: Iterable[dict[str, Any]], count: int, what: str = ""
    ) -> dict[str, Any]:
        """Per-scale head outputs `raw[head, Q]` (count × width), labels, ids and undecodable
        flags of `count` elements (dicts of `_load`'s form, `index` counting from 0)."""
        widths = self.widths(variables)
        raw = {
            (head, q): np.zeros((count, widths[head]), np.float32)
            for q, heads in self.plan.items()
            for head in heads
        }
        labels, bad, ids = np.zeros(count, np.int32), np.zeros(count, bool), [""] * count
        queues: dict[tuple[int, tuple[int, int]], list[tuple[int, np.ndarray]]] = (
            collections.defaultdict(list)
        )
        inflight: list[tuple[list[int], int, dict[str, jax.Array]]] = []

        def collect(index: list[int], q: int, out: dict[str, jax.Array]) -> None:
            for head, p in out.items():
                raw[head, q][index] = np.asarray(p)[: len(index)]

        def launch(q: int, bucket: tuple[int, int]) -> None:
            items = queues.pop((q, bucket))
            images = np.zeros((self.batch_size, *bucket, 3), np.uint8)
            sizes = np.full((self.batch_size, 2), self.model.crop_size, np.int32)  # masked slots
            for slot, (_, image) in enumerate(items):
                images[slot, : image.shape[0], : image.shape[1]] = image
                sizes[slot] = image.shape[:2]
            self.compiled.add((self.plan[q], bucket))
            out = self.steps[self.plan[q]](
                variables,
                jax.device_put(images, self.batch_sharding),
                jax.device_put(sizes, self.batch_sharding),
            )
            inflight.append(([k for k, _ in items], q, out))
            if len(inflight) > 1:  # the device runs this batch while the host reads the last
                collect(*inflight.pop(0))

        start = last_log = time.monotonic()
        for done, element in enumerate(elements, start=1):
            k = element["index"]
            labels[k], ids[k] = element["label"], element["id"]
            if element["images"] is None:
                bad[k] = True
                for (head, _), p in raw.items():
                    p[k] = self.heads[head].fill(p.shape[1])
            else:
                for q, image in zip(self.plan, element["images"]):
                    key = (q, bucket_shape(*image.shape[:2], self.config.eval.bucket_multiple))
                    queues[key].append((k, image))
                    if len(queues[key]) == self.batch_size:
                        launch(*key)
            now = time.monotonic()
            if jax.process_index() == 0 and now - last_log > 30:
                last_log, rate = now, done / (now - start)
                logging.info(
                    "Evaluating %s: %d/%d images, %.1f images/s, %.0f s left",
                    what,
                    done,
                    count,
                    rate,
                    (count - done) / rate,
                )
        for key in list(queues):
            launch(*key)
        for item in inflight:
            collect(*item)
        if jax.process_index() == 0:
            seconds = time.monotonic() - start
            logging.info(
                "Evaluated %s: %d images in %.0f s, %.1f images/s",
                what,
                count,
                seconds,
                count / max(seconds, 1e-9),
            )
        return dict(raw=raw, labels=labels, bad=bad, ids=ids)

    def evaluate_source(
        self, variables: Any, source: sources.Source, what: str = ""
    ) -> dict[str, Any]:
        """`outputs` over all of `source`: this process reads its share, all get the whole."""
        pi, pc = jax.process_index(), jax.process_count()
        count = len(range(pi, len(source), pc))
        load = functools.partial(_load, source, tuple(self.plan))
        dataset = (
            grain.MapDataset.range(len(source))[pi::pc]
            .map(load)
            .to_iter_dataset(
                grain.ReadOptions(
                    num_threads=max(1, self.config.num_workers),
                    prefetch_buffer_size=2 * self.batch_size,
                )
            )
        )
        # Local positions: stream element p + k·P is this process's k-th.
        elements = (dict(element, index=element["index"] // pc) for element in dataset)
        local = self.outputs(variables, elements, count, what)
        arrays = dict(
            labels=local["labels"],
            bad=local["bad"],
            **{f"{head}@{q}": p for (head, q), p in local["raw"].items()},
        )
        arrays = _gather(arrays, len(source))
        return dict(
            raw={(head, q): arrays[f"{head}@{q}"] for head, q in local["raw"]},
            labels=arrays["labels"],
            bad=arrays["bad"],
            ids=_gather_ids(local["ids"], len(source)),
        )


def _train_scale(config: ml_collections.ConfigDict) -> str:
    s_min, s_max = config.train_scale
    return str(s_min) if s_min == s_max else f"[{s_min};{s_max}]"


def format_table(results: list[dict[str, Any]], train_scale: str) -> str:
    """The paper's layout (Tables 3–6): config, train S, test Q, method, top-1/top-5 val. error."""
    header = (
        "ConvNet config.",
        "train (S)",
        "test (Q)",
        "evaluation method",
        "top-1 val. error (%)",
        "top-5 val. error (%)",
    )
    rows = [
        (
            r["model"],
            train_scale,
            ",".join(map(str, r["test_scales"])),
            r["method"],
            f"{100 * r['top1_error']:.1f}",
            f"{100 * r['top5_error']:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )


def _results(
    prefix: str,
    model: str,
    posteriors: dict[str, np.ndarray],
    labels: np.ndarray,
    bad: np.ndarray,
    config: ml_collections.ConfigDict,
) -> list[dict[str, Any]]:
    results = []
    for name, p in posteriors.items():
        protocol = "dense" if name.startswith("dense_q") else name
        if protocol == "dense":
            scales = [int(name[len("dense_q") :])]
        elif protocol == "centre_crop":
            scales = [centre_crop_scale(config.crop_size)]
        else:
            scales = list(config.eval.scales)
        top1, top5 = error_rates(p, labels, bad)
        results.append(
            dict(
                name=prefix + name,
                model=model,
                protocol=protocol,
                method=METHODS[protocol],
                test_scales=scales,
                top1_error=top1,
                top5_error=top5,
            )
        )
    return results


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Evaluates the workdir's latest checkpoint (or `config.eval.checkpoints`) on the 'val'
    split with `config.eval.protocols`; writes eval_results.json and predictions.npz there."""
    # Each process runs its own share on its own devices: the hosts need not agree on the order
    # of bucket shapes, and evaluation needs no communication until the posteriors are gathered.
    evaluator = Evaluator(config, train.make_mesh(jax.local_devices()))
    source = sources.make_source(config, "val")
    if source.num_classes != config.num_classes:
        raise ValueError(
            f"config.num_classes is {config.num_classes} but the {config.dataset} "
            f"validation set has {source.num_classes} classes"
        )
    paths = tuple(config.eval.checkpoints) or (workdir,)
    several = len(paths) > 1
    start = time.monotonic()
    per_model, results = [], []
    for i, path in enumerate(paths):
        variables = checkpoints.restore_params(path, evaluator.replicated)
        data = evaluator.evaluate_source(variables, source, f"{path} ({i + 1}/{len(paths)})")
        per_model.append(protocol_posteriors(data["raw"], config))
        results += _results(
            f"ckpt{i}_" * several,
            f"{config.model} #{i}" if several else config.model,
            per_model[-1],
            data["labels"],
            data["bad"],
            config,
        )
    seconds = time.monotonic() - start
    posteriors = {
        f"ckpt{i}_{name}" if several else name: p
        for i, model in enumerate(per_model)
        for name, p in model.items()
    }
    if "fusion" in config.eval.protocols:
        fused = fuse(per_model)
        results += _results(
            "fusion_", f"{config.model} ×{len(paths)}", fused, data["labels"], data["bad"], config
        )
        posteriors.update({f"fusion_{name}": p for name, p in fused.items()})
    summary = dict(
        model=config.model,
        dataset=config.dataset,
        checkpoints=list(paths),
        train_scale=_train_scale(config),
        crop_size=config.crop_size,
        flip=config.eval.flip,
        images=len(source),
        bad_images=int(data["bad"].sum()),
        compiled_shapes=len(evaluator.compiled),
        seconds=round(seconds, 1),
        images_per_second=round(len(source) * len(paths) / seconds, 1),
        results=results,
    )
    if jax.process_index() == 0:
        print(format_table(results, summary["train_scale"]))
        with open(os.path.join(workdir, "eval_results.json"), "w") as f:
            json.dump(summary, f, indent=2)
        np.savez(
            os.path.join(workdir, "predictions.npz"),
            ids=data["ids"],
            labels=data["labels"],
            bad=data["bad"],
            **{f"posteriors_{name}": p for name, p in posteriors.items()},
        )
    return summary


def fuse_predictions(paths: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Table 6 from finished runs: (top-1, top-5) error of the averaged posteriors of each
    protocol all the predictions.npz files hold (e.g. nets D and E evaluated separately)."""
    files = [np.load(path) for path in paths]
    for path, f in zip(paths[1:], files[1:]):
        if not np.array_equal(f["ids"], files[0]["ids"]):
            raise ValueError(f"{path} holds other images (or another order) than {paths[0]}")
    fused = fuse(
        [
            {k[len("posteriors_") :]: f[k] for k in f.files if k.startswith("posteriors_")}
            for f in files
        ]
    )
    bad = np.any([f["bad"] for f in files], axis=0)
    return {name: error_rates(p, files[0]["labels"], bad) for name, p in fused.items()}
