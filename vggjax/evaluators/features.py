"""Appendix B: very deep features for other data sets (the `features` evaluator).

The net without its last FC layer is applied densely to the whole image rescaled to Q (the map
placed as `features.dense_alignment` says); its 4096-D penultimate activations are averaged over
the map and with those of the mirror image, then over several Q either averaged or stacked, and
L2-normalised. Two nets' descriptors are stacked ("late fusion"). The images go through the
bucketed inference engine (`vggjax.engine`), so any image size runs exactly, batched and sharded
over the devices.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vggjax import engine, models, options, pretrained, storage
from vggjax.data import sources
from vggjax.errors import UserError


def dense_descriptor(
    model: models.VGG,
    variables: Any,
    images: jax.Array,
    sizes: jax.Array,
    flip: bool = True,
    alignment: str = "top_left",
) -> jax.Array:
    """One scale's descriptor: fc7's activations averaged over each image's own map positions,
    and with the mirror image's (an engine `Head`'s compute).

    Args:
      model, variables: the net.
      images: a padded batch, mean-subtracted, each image top-left in its bucket.
      sizes: each image's valid (height, width), so the padding does not count.
      flip: average with the mirror image's descriptor too.
      alignment: where the map lies on each image, one of options.DENSE_ALIGNMENTS (as
        `eval.dense_alignment` for the test protocols).

    Returns:
      (N, fc_width) descriptors, not yet normalised (`aggregate` does).
    """
    averages = engine.dense_averages(model, variables, images, sizes, "fc7", flip, alignment)
    return averages.mean(1)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows of unit L2 norm; all-zero rows (undecodable images) stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def aggregate(per_scale: list[np.ndarray], how: str) -> np.ndarray:
    """One descriptor per image from its descriptors at several Q.

    Args:
      per_scale: (N, D) descriptors, one array per Q.
      how: "average" (VOC in the paper) or "stack" (Caltech), options.AGGREGATIONS.

    Returns:
      (N, D) averaged or (N, len(per_scale)·D) stacked, rows of unit L2 norm.
    """
    options.one_of("aggregation", how, options.AGGREGATIONS)
    return l2_normalise(np.mean(per_scale, 0) if how == "average" else np.concatenate(per_scale, 1))


def settings(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """What a set of features depends on, stored with them (transfer reuses matching files)."""
    paths = tuple(config.features.checkpoints) or (workdir,)
    return dict(
        checkpoints=[str(storage.at(p)) for p in paths],
        scales=list(config.features.scales),
        aggregation=config.features.aggregation,
        flip=bool(config.features.flip),
        dense_alignment=config.features.dense_alignment,
        dataset=config.dataset,
        data_dir=os.path.abspath(config.data_dir or "."),
    )


def extract(config: ml_collections.ConfigDict, workdir: str, split: str) -> dict[str, np.ndarray]:
    """Appendix B's descriptors of every image of a split, computed (not read from a file).

    Args:
      config: the data set and `config.features` (checkpoints, scales, aggregation, flip,
        dense_alignment).
      workdir: the net whose latest checkpoint is used when `features.checkpoints` is empty.
      split: 'train' or 'val'.

    Returns:
      `features` (N, D), unit rows (two nets: their descriptors stacked), `ids`, `labels`,
      `num_classes`, and `bad`: undecodable images, whose descriptor is zero.

    Raises:
      UserError: a checkpoint without config.json or without FC layers (converted without the
        top: the descriptors are fc7's), or a data set that cannot be read.
    """
    paths = settings(config, workdir)["checkpoints"]
    nets = [pretrained.with_net_of(config, path) for path in paths]  # bad paths fail first
    source = sources.make_source(config, split)
    scales = tuple(config.features.scales)
    compute = functools.partial(
        dense_descriptor,
        flip=config.features.flip,
        alignment=config.features.dense_alignment,
    )
    heads = {"features": engine.Head(compute, fill=lambda width: 0.0)}
    per_net = []
    for i, (path, net) in enumerate(zip(paths, nets)):
        runner = engine.Engine.from_config(net, dict.fromkeys(scales, ("features",)), heads)
        _, variables, _ = pretrained.load_pretrained(path, runner.replicated)
        if "fc7" not in variables["params"]:
            raise UserError(
                f"{path} has no FC layers (converted without the top): the features "
                f"of Appendix B are fc7's activations"
            )
        data = runner.run_source(variables, source, f"{split} features, net {i + 1}")
        per_net.append(
            aggregate([data["raw"]["features", q] for q in scales], config.features.aggregation)
        )
    return dict(
        ids=data["ids"],
        labels=data["labels"],
        bad=data["bad"],
        num_classes=np.int32(source.num_classes),
        features=l2_normalise(np.concatenate(per_net, 1)),
    )


def path_of(workdir: str, split: str) -> str:
    """Where `run` writes `split`'s features: WORKDIR/features_<split>.npz."""
    return str(storage.at(workdir) / f"features_{split}.npz")


def save(path: str, features: dict[str, np.ndarray], about: dict[str, Any]) -> None:
    """Writes `extract`'s arrays with the `settings` they were made with, which `load` checks."""
    storage.write_npz(path, **features, **{f"setting_{k}": np.asarray(v) for k, v in about.items()})


def load(path: str, about: dict[str, Any] | None = None) -> dict[str, np.ndarray] | None:
    """Features `save` wrote, for reuse.

    Args:
      path: an .npz file, local or gs://.
      about: the `settings` they must have been made with (None: any).

    Returns:
      `extract`'s arrays, or None where the file is missing or was made with other settings.
    """
    if not storage.at(path).exists():
        return None
    stored = storage.read_npz(path)
    if about is not None and any(
        f"setting_{k}" not in stored or stored[f"setting_{k}"].tolist() != v
        for k, v in about.items()
    ):
        return None
    return {k: v for k, v in stored.items() if not k.startswith("setting_")}


def _write(workdir: str, split: str, data: dict[str, np.ndarray], about: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        save(path_of(workdir, split), data, about)
        logging.info(
            "Wrote %s: %d images × %d features (%d undecodable).",
            path_of(workdir, split),
            *data["features"].shape,
            int(data["bad"].sum()),
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, np.ndarray]]:
    """The `features` evaluator (`--mode=features`).

    Args:
      config: as `extract` reads it; `features.splits` names the splits.
      workdir: where features_<split>.npz is written (process 0), and the default net.

    Returns:
      {split: `extract`'s arrays}.
    """
    about, out = settings(config, workdir), {}
    for split in config.features.splits:
        out[split] = extract(config, workdir, split)
        _write(workdir, split, out[split], about)
    return out


def cached(config: ml_collections.ConfigDict, workdir: str, split: str) -> dict[str, np.ndarray]:
    """The workdir's features of `split` if made with `config`'s settings, else extracted and
    saved: `transfer` extracts once for any number of SVM runs."""
    about = settings(config, workdir)
    found = load(path_of(workdir, split), about)
    if found is not None:
        logging.info("Using the features in %s.", path_of(workdir, split))
        return found
    data = extract(config, workdir, split)
    _write(workdir, split, data, about)
    return data
