"""Which class each output of a net is, and the top classes of its scores.

A workdir's config.json records its net's classes as `classes`: [{"id", "name"}], in the order of
fc8's outputs. `vggjax.convert` writes ILSVRC-2012's for the published 1,000-class nets (WordNet
ids and readable names, from imagenet_classes.txt beside this file: nothing is downloaded);
training writes its data set's (a folder's class folders, in their sorted order); a fine-tune on
the same class ids keeps the names of the net it starts from.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from vggjax import checkpoints
from vggjax.errors import UserError

IMAGENET_FILE = pathlib.Path(__file__).with_name("imagenet_classes.txt")


class Class(NamedTuple):
    """One output of a net: its id (a WordNet id, a folder's name) and a readable name."""

    id: str
    name: str


class Prediction(NamedTuple):
    """One of an image's top classes."""

    index: int
    id: str
    name: str
    probability: float


@functools.cache
def imagenet() -> tuple[Class, ...]:
    """ILSVRC-2012's 1,000 classes in the published nets' order (index 0: n01440764, tench); each
    name is the first of its WordNet lemmas ("tabby" for "tabby, tabby cat")."""
    lines = IMAGENET_FILE.read_text(encoding="utf-8").splitlines()
    rows = (line.split("\t") for line in lines if line and not line.startswith("#"))
    return tuple(Class(wnid, lemmas.split(", ")[0]) for wnid, lemmas in rows)


def named(ids: Sequence[str]) -> tuple[Class, ...]:
    """Classes of these ids: an ImageNet WordNet id (a folder `n01440764/`) gets its readable
    name, any other id (a folder's name) is its own name."""
    names = {c.id: c.name for c in imagenet()}
    return tuple(Class(i, names.get(i, i)) for i in ids)


def to_json(classes: Sequence[Class]) -> list[dict[str, str]]:
    """config.json's `classes`."""
    return [c._asdict() for c in classes]


def of_config(config: Mapping[str, Any]) -> tuple[Class, ...]:
    """The classes a config.json records; for a published net converted before they were
    recorded, ImageNet's; else numbered ones ("0", "1", …)."""
    if "classes" in config:
        return tuple(Class(str(c["id"]), str(c["name"])) for c in config["classes"])
    count = config.get("num_classes", 0)
    if "pretrained" in config and count == len(imagenet()):
        return imagenet()
    return tuple(Class(str(i), str(i)) for i in range(count))


def _inherited(init_from: str, ids: tuple[str, ...]) -> tuple[Class, ...] | None:
    """The classes of the net at `init_from` when they have these ids (a fine-tune of the same
    classes), else None."""
    try:
        recorded = of_config(checkpoints.read_config(init_from))
    except UserError:  # no config.json: nothing recorded
        return None
    return recorded if tuple(c.id for c in recorded) == ids else None


def run_record(config: ml_collections.ConfigDict, ids: Sequence[str]) -> dict[str, Any]:
    """What a training run writes as its config.json: its whole config and the classes of its
    training set (class ids `ids`, in label order), named as its `init_from` net names them
    when it has the same ids."""
    ids = tuple(ids)
    own = (_inherited(config.init_from, ids) if config.get("init_from") else None) or named(ids)
    return {**json.loads(config.to_json_best_effort()), "classes": to_json(own)}


def top_k(
    scores: Any, classes: Sequence[Class], k: int = 5, from_logits: bool = True
) -> list[Prediction] | list[list[Prediction]]:
    """The `k` most probable classes, most probable first.

    Args:
      scores: one image's (C,) scores or a batch's (N, C): logits (fc8's outputs), or
        probabilities with `from_logits=False`.
      classes: the net's C classes (`pretrained.class_names`).
      k: how many (at most C).
      from_logits: softmax the scores first.

    Returns:
      `Prediction(index, id, name, probability)`s: a list for (C,) scores, a list per image
      for (N, C).
    """
    p = np.asarray(scores, np.float32)
    if p.shape[-1] != len(classes):
        raise UserError(f"scores over {p.shape[-1]} classes, but {len(classes)} classes named")
    if from_logits:
        p = np.exp(p - p.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    rows = p.reshape(-1, p.shape[-1])
    order = np.argsort(-rows, axis=1, kind="stable")[:, : min(k, len(classes))]
    top = [
        [Prediction(int(i), *classes[i], float(row[i])) for i in best]
        for row, best in zip(rows, order)
    ]
    return top[0] if p.ndim == 1 else top
