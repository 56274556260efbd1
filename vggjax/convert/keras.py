"""Keras .h5 weight files, read through their h5 attributes as Keras's own legacy loader reads
them (`layer_names`, then each layer's `weight_names`), so files of any Keras version load and no
Keras is needed."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from vggjax.convert.layout import SourceLayer
from vggjax.errors import UserError


def _string_list(group: Any, name: str) -> list[str]:
    """A list attribute as Keras writes it: whole, or in chunks name0, name1, … when large."""
    values = list(group.attrs[name]) if name in group.attrs else []
    for i in itertools.count():
        if f"{name}{i}" not in group.attrs:
            break
        values.extend(group.attrs[f"{name}{i}"])
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str) -> list[SourceLayer]:
    """The layers with weights, in the order of the file's `layer_names` (Keras loads by order)."""
    try:
        import h5py
    except ImportError:
        raise UserError(
            "reading Keras .h5 files needs h5py: pip install 'vggjax[convert]'"
        ) from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        names = _string_list(root, "layer_names")
        if not names:
            raise UserError(
                f"{path}: no layer_names attribute, so not a Keras weights file in "
                f"the published (legacy h5) layout; Keras 3's .weights.h5 is "
                f"another: load it in Keras and save with model.save('x.h5')"
            )
        layers = []
        for name in names:
            try:
                group = root[name]
                weights = [np.asarray(group[w]) for w in _string_list(group, "weight_names")]
            except (KeyError, OSError) as e:
                raise UserError(f"{path}: cannot read layer {name} ({e})") from None
            if weights and len(weights) != 2:
                raise UserError(
                    f"{path}: layer {name} has {len(weights)} weights; a VGG conv or "
                    f"dense layer has 2 (kernel, bias)"
                )
            if weights:
                layers.append(SourceLayer(name, *weights))
    return layers
