"""The authors' own Caffe release (VGG_ILSVRC_16_layers.caffemodel, ..._19_layers).

A .caffemodel is a protobuf NetParameter, read here from the wire format with the few field
numbers of caffe.proto it needs, so neither Caffe nor its generated protobuf code is required (nor
the .prototxt: the weights carry their layer names and shapes). Both of caffe.proto's layer
messages occur: V1LayerParameter (`layers`, the 2014 release) and LayerParameter (`layer`, files
re-saved later).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from vggjax.convert.layout import SourceLayer, torch_fc
from vggjax.errors import UserError

# NetParameter's field number of each layer message → that message's field numbers.
_CAFFE_LAYERS = {2: dict(name=4, type=5, blobs=6), 100: dict(name=1, type=2, blobs=7)}
_CAFFE_WEIGHT_TYPES = {4: "conv", 14: "fc", "Convolution": "conv", "InnerProduct": "fc"}


def _varint(path: str, data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i:] and the index after it."""
    value = shift = 0
    while True:
        if i >= len(data):
            raise UserError(f"{path}: the file ends inside a record (a truncated .caffemodel?)")
        value |= (data[i] & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if not data[i - 1] & 0x80:
            return value, i


def _protobuf_fields(path: str, data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(path, data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(path, data, i)
        elif wire in (1, 2, 5):
            size, i = (8, i) if wire == 1 else (4, i) if wire == 5 else _varint(path, data, i)
            value, i = data[i : i + size], i + size
            if i > len(data):
                raise UserError(f"{path}: the file ends inside a record (a truncated .caffemodel?)")
        else:
            raise UserError(f"{path}: not a Caffe .caffemodel (protobuf wire type {wire})")
        yield field, wire, value


def _caffe_blob(path: str, layer: str, data: bytes) -> np.ndarray:
    """A BlobProto: float data (packed or not) shaped by `shape` or by num/channels/height/width."""
    legacy, dims, values = {}, [], []
    for field, wire, value in _protobuf_fields(path, data):
        if field in (1, 2, 3, 4) and wire == 0:
            legacy[field] = value
        elif field == 5:
            values.append(np.frombuffer(value, "<f4"))
        elif field == 8:
            values.append(np.frombuffer(value, "<f8").astype(np.float32))
        elif field == 7:
            for dim_field, dim_wire, dim in _protobuf_fields(path, value):
                if dim_field == 1 and dim_wire == 0:
                    dims.append(dim)
                elif dim_field == 1:  # packed: varints back to back
                    i = 0
                    while i < len(dim):
                        d, i = _varint(path, dim, i)
                        dims.append(d)
    shape = dims or [legacy.get(k, 1) for k in (1, 2, 3, 4)]
    array = np.concatenate(values) if values else np.zeros(0, np.float32)
    if array.size != math.prod(shape):
        raise UserError(
            f"{path}: layer {layer} has {array.size} values for a blob of shape "
            f"{tuple(shape)} (a truncated .caffemodel?)"
        )
    return array.reshape(shape)


def _weight_layers(path: str, data: bytes) -> Iterator[tuple[str, str, list[bytes]]]:
    """(name, "conv" or "fc", its blobs' bytes) of each layer with weights, in file order."""
    for field, wire, value in _protobuf_fields(path, data):
        if field not in _CAFFE_LAYERS or wire != 2:
            continue
        names, layer = _CAFFE_LAYERS[field], {"blobs": []}
        for f, _, v in _protobuf_fields(path, value):
            if f == names["name"]:
                layer["name"] = v.decode("utf8", "replace")
            elif f == names["type"]:
                layer["type"] = v.decode("utf8", "replace") if isinstance(v, bytes) else v
            elif f == names["blobs"]:
                layer["blobs"].append(v)
        kind = _CAFFE_WEIGHT_TYPES.get(layer.get("type"))
        if kind is None or not layer["blobs"]:
            continue  # ReLU, pooling, dropout, softmax, data layers: no weights
        name = layer.get("name", "?")
        if len(layer["blobs"]) != 2:
            raise UserError(
                f"{path}: layer {name} has {len(layer['blobs'])} blobs, not a weight and a bias"
            )
        yield name, kind, layer["blobs"]


def read_caffemodel(path: str) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv and FC layers of a Caffe .caffemodel (in file order), in vggjax's layout."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    convs, fcs = [], []
    for name, kind, blobs in _weight_layers(path, data):
        weight, bias = (_caffe_blob(path, name, b) for b in blobs)
        if kind == "conv":
            if weight.ndim != 4:
                raise UserError(
                    f"{path}: layer {name} has a weight of shape {weight.shape}, not "
                    f"a conv kernel (out, in, h, w)"
                )
            convs.append(SourceLayer(name, weight.transpose(2, 3, 1, 0), bias.reshape(-1)))
        else:  # (out, in) or the old format's (1, 1, out, in); fc6's input flattened CHW
            weight = weight.reshape(weight.shape[-2:])
            in_channels = convs[-1].kernel.shape[-1] if not fcs and convs else weight.shape[1]
            fcs.append(
                SourceLayer(name, torch_fc(path, name, weight, in_channels), bias.reshape(-1))
            )
    if not convs:
        raise UserError(f"{path}: no convolution layers found; not a Caffe .caffemodel of a VGG")
    return convs, fcs
