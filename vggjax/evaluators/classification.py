"""Testing as in Sect. 3.2 and 4.1–4.4: dense, multi-scale, multi-crop, their combination, fusion.

The `classification` evaluator (`--mode=eval` of a classification net). Each protocol is a head
of the bucketed inference engine (`vggjax.engine`): per-image posteriors at one test scale Q,
computed exactly for images of any size. Posteriors are kept per image: protocols, scales and
models combine on the host, and `predictions.npz` lets runs be fused later (`fuse_predictions`)
without recomputing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vggjax import checkpoints, engine, models, options, storage
from vggjax.data import sources
from vggjax.errors import UserError

GRID = 5  # Sect. 3.2: a 5×5 regular grid of crops, each also mirrored: 50 crops per scale


def centre_crop_scale(crop_size: int) -> int:
    """The torchvision/Keras protocol's smallest side: 256 for 224 crops, in proportion else."""
    return round(256 * crop_size / 224)


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


def dense_posteriors(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    flip: bool = True,
    alignment: str = "top_left",
) -> jax.Array:
    """Sect. 3.2: the softmax of the class score map averaged over the image; with `flip`,
    averaged with the mirror image's. `alignment` (options.DENSE_ALIGNMENTS) places the map."""
    scores = engine.dense_averages(model, variables, images, sizes, flip=flip, alignment=alignment)
    return jax.nn.softmax(scores).mean(1)


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


def posterior_heads(flip: bool = True, alignment: str = "top_left") -> dict[str, engine.Head]:
    """The classification protocols' per-scale posteriors; undecodable images get 1/classes."""
    uniform = lambda width: 1.0 / width
    dense = functools.partial(dense_posteriors, flip=flip, alignment=alignment)
    return {
        "dense": engine.Head(dense, uniform),
        "multi_crop": engine.Head(multi_crop_posteriors, uniform),
        "centre_crop": engine.Head(centre_crop_posteriors, uniform),
    }


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


def train_scale_label(train_scale: Sequence[int]) -> str:
    """The paper's "train (S)" column: S, or [S_min;S_max] for scale jittering."""
    s_min, s_max = train_scale
    return str(s_min) if s_min == s_max else f"[{s_min};{s_max}]"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned with two spaces between them, the header first."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]
    )


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
    return text_table(header, rows)


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
                method=options.EVAL_PROTOCOLS[protocol],
                test_scales=scales,
                top1_error=top1,
                top5_error=top5,
            )
        )
    return results


def protocols_engine(config: ml_collections.ConfigDict) -> engine.Engine:
    """The inference engine computing what `config.eval`'s protocols need at each scale."""
    heads = posterior_heads(config.eval.flip, config.eval.dense_alignment)
    return engine.Engine.from_config(config, plan(config), heads)


def check_classes(config: ml_collections.ConfigDict, source: sources.Source) -> None:
    """Raises the UserError for a net whose classes are not the validation set's."""
    if source.num_classes != config.num_classes:
        raise UserError(
            f"config.num_classes is {config.num_classes} but the {config.dataset} "
            f"validation set has {source.num_classes} classes"
        )


def _run_checkpoints(
    config: ml_collections.ConfigDict, paths: tuple[str, ...], source: sources.Source
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Each checkpoint's protocol posteriors and result rows, the last pass's labels and ids,
    and what building the programs cost (`Engine.cost`)."""
    runner = protocols_engine(config)
    several = len(paths) > 1
    per_model, results = [], []
    for i, path in enumerate(paths):
        variables = checkpoints.restore_params(path, runner.replicated)
        data = runner.run_source(variables, source, f"{path} ({i + 1}/{len(paths)})")
        per_model.append(protocol_posteriors(data["raw"], config))
        model = f"{config.model} #{i}" if several else config.model
        prefix = f"ckpt{i}_" * several
        results += _results(prefix, model, per_model[-1], data["labels"], data["bad"], config)
    return per_model, results, data, runner.cost()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The `classification` evaluator (`--mode=eval`): the paper's test protocols on 'val'.

    Args:
      config: the net and data set, and in `config.eval` the protocols, scales Q and batching;
        `eval.checkpoints` names the nets to test (several: each, and with `fusion` their
        averaged posteriors, Table 6).
      workdir: the run whose latest checkpoint is tested when `eval.checkpoints` is empty;
        eval_results.json and predictions.npz are written there (process 0).

    Returns:
      What eval_results.json holds: a `results` row per protocol (and scale, for `dense`)
      with its top-1 and top-5 errors, and the run's images, undecodable images, seconds and
      what building the programs cost.

    Raises:
      UserError: no such data set or folder, a net whose classes are not the validation
        set's, or an `eval.batch_size` that does not split over the devices.
    """
    source = sources.make_source(config, "val")
    check_classes(config, source)
    paths = tuple(config.eval.checkpoints) or (workdir,)
    start = time.monotonic()
    per_model, results, data, cost = _run_checkpoints(config, paths, source)
    seconds = time.monotonic() - start
    several = len(paths) > 1
    posteriors = {
        f"ckpt{i}_{name}" if several else name: p
        for i, model in enumerate(per_model)
        for name, p in model.items()
    }
    if "fusion" in config.eval.protocols:
        fused = fuse(per_model)
        model = f"{config.model} ×{len(paths)}"
        results += _results("fusion_", model, fused, data["labels"], data["bad"], config)
        posteriors.update({f"fusion_{name}": p for name, p in fused.items()})
    summary = dict(
        model=config.model,
        dataset=config.dataset,
        checkpoints=list(paths),
        train_scale=train_scale_label(config.train_scale),
        crop_size=config.crop_size,
        flip=config.eval.flip,
        dense_alignment=config.eval.dense_alignment,
        images=len(source),
        bad_images=int(data["bad"].sum()),
        **cost,  # compiled_shapes (by XLA), cached_shapes (from the cache), compile_seconds
        seconds=round(seconds, 1),
        images_per_second=round(len(source) * len(paths) / seconds, 1),
        results=results,
    )
    if jax.process_index() == 0:
        _write(workdir, summary, data, posteriors)
    return summary


def _write(
    workdir: str, summary: dict[str, Any], data: dict[str, Any], posteriors: dict[str, np.ndarray]
) -> None:
    """The table on stdout; eval_results.json and predictions.npz (for later fusion) in workdir."""
    print(format_table(summary["results"], summary["train_scale"]))
    folder = storage.at(workdir)  # made if new: eval.checkpoints may name other runs' nets
    storage.write_json(folder / "eval_results.json", summary)
    storage.write_npz(
        folder / "predictions.npz",
        ids=data["ids"],
        labels=data["labels"],
        bad=data["bad"],
        **{f"posteriors_{name}": p for name, p in posteriors.items()},
    )


def fuse_predictions(paths: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Table 6 from finished runs, without recomputing: nets evaluated separately, fused.

    Args:
      paths: predictions.npz files that `run` wrote, on the same images in the same order.

    Returns:
      {protocol: (top-1, top-5) error} of the averaged posteriors, for each protocol every file
      holds; an image undecodable in any run counts as an error.

    Raises:
      UserError: the files hold other images, or the same in another order.
    """
    files = [storage.read_npz(path) for path in paths]
    for path, f in zip(paths[1:], files[1:]):
        if not np.array_equal(f["ids"], files[0]["ids"]):
            raise UserError(f"{path} holds other images (or another order) than {paths[0]}")
    fused = fuse(
        [{k[len("posteriors_") :]: f[k] for k in f if k.startswith("posteriors_")} for f in files]
    )
    bad = np.any([f["bad"] for f in files], axis=0)
    return {name: error_rates(p, files[0]["labels"], bad) for name, p in fused.items()}
