"""Published VGG weights → a vggjax checkpoint: Keras .h5, torchvision .pth, timm or torchvision
.safetensors, and the authors' Caffe .caffemodel.

    python -m vggjax.convert --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --model=D --output=DIR [--verify]

DIR becomes a workdir that `vggjax.load_pretrained` and `restore_params` (so also
`--config.init_from`) read: checkpoints/0/state holds the parameters, config.json the model, its
input mean and where the weights came from. Each source's input convention is folded exactly into
conv1_1, so the converted net takes what every vggjax net takes, RGB on 0–255 minus a mean RGB:

- Keras and the Caffe release itself: BGR minus [103.939, 116.779, 123.68] → conv1_1's input
  channels reversed; mean RGB (123.68, 116.779, 103.939).
- torchvision, timm: RGB/255 normalised by mean m and std s → conv1_1's input channels divided
  by 255·s, since (x/255 − m)/s = (x − 255m)/(255s); mean RGB 255·m.

Their batch-norm nets (vgg16_bn, ...) convert too: each BN's scale and shift go to the conv's
`<conv>_bn` parameters, its running mean and variance to `batch_stats`.

No file's code is run: Keras files are read through their h5 attributes as Keras's own legacy
loader reads them (so files of any Keras version load), PyTorch's through an unpickler that
builds nothing but dicts and tensors, safetensors from its JSON header, .caffemodel files from
the protobuf wire format (no Caffe needed; the .prototxt is not needed either: the weights carry
their layer names and shapes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import itertools
import json
import logging
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from vggjax import checkpoints, models, pretrained

SOURCES = ("keras", "torchvision", "timm", "caffe")
KERAS_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
# The names of the three FC layers in each PyTorch layout. timm stores fc6 and fc7 as convs.
TORCH_FC_NAMES = {
    "torchvision": ("classifier.0", "classifier.3", "classifier.6"),
    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc"),
}
MAX_RELATIVE_DIFFERENCE = 1e-4
_TORCH_NORM_STATS = ("running_mean", "running_var")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclasses.dataclass
class SourceLayer:
    """A conv or FC layer of the file, its kernel already in vggjax's layout: HWIO or (in, out)."""

    name: str  # as the file names it, for messages
    kernel: np.ndarray
    bias: np.ndarray
    # The batch norm after a conv (torchvision's and timm's vgg*_bn): weight, bias, running_mean,
    # running_var, as named in the file.
    norm: dict[str, np.ndarray] | None = None


# Keras .h5 ---------------------------------------------------------------------------------------


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
        raise ValueError(
            "reading Keras .h5 files needs h5py: pip install 'vggjax[convert]'"
        ) from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        root = f["model_weights"] if "layer_names" not in f.attrs and "model_weights" in f else f
        names = _string_list(root, "layer_names")
        if not names:
            raise ValueError(
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
                raise ValueError(f"{path}: cannot read layer {name} ({e})") from None
            if weights and len(weights) != 2:
                raise ValueError(
                    f"{path}: layer {name} has {len(weights)} weights; a VGG conv or "
                    f"dense layer has 2 (kernel, bias)"
                )
            if weights:
                layers.append(SourceLayer(name, *weights))
    return layers


# PyTorch .pth (zip and legacy) -------------------------------------------------------------------


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    data: np.ndarray | None = None  # None: absent from the file


@dataclasses.dataclass
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(
    storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> _Tensor:
    return _Tensor(storage, offset, tuple(shape), tuple(stride))


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    **{("torch", name): np.dtype(dtype) for name, dtype in _TORCH_STORAGES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: the only globals it resolves are OrderedDict and
    torch's tensor rebuilders, which here build `_Tensor` records."""

    def __init__(
        self,
        file: BinaryIO,
        path: str,
        storage: Callable[[np.dtype, str, tuple[Any, ...]], _Storage],
    ):
        super().__init__(file, encoding="utf-8")
        self.path, self.storage = path, storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise ValueError(
                f"{self.path}: holds a pickled {module}.{name}, not only tensors; "
                f"refusing to unpickle it (save the model's state_dict())"
            )
        return _ALLOWED_GLOBALS[module, name]

    def persistent_load(self, pid: Any) -> _Storage:
        """("storage", dtype, key, location, numel[, view]) → the storage of that key."""
        if not (
            isinstance(pid, tuple)
            and len(pid) >= 5
            and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], np.dtype)
        ):
            raise ValueError(f"{self.path}: unknown persistent object {pid!r:.60}")
        return self.storage(pid[1], str(pid[2]), pid[5:])


def _read_torch_zip(path: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a complete zip archive (a truncated .pth file?)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: a zip without one data.pkl, so not a PyTorch file")
        prefix, members = pickles[0][: -len("data.pkl")], set(archive.namelist())
        order = "<"
        if prefix + "byteorder" in members:
            order = "<" if archive.read(prefix + "byteorder") == b"little" else ">"
        storages: dict[str, _Storage] = {}

        def storage(dtype: np.dtype, key: str, _: tuple[Any, ...]) -> _Storage:
            if key not in storages:
                storages[key] = _Storage(dtype.newbyteorder(order))
                if f"{prefix}data/{key}" in members:
                    raw = archive.read(f"{prefix}data/{key}")
                    storages[key].data = np.frombuffer(
                        raw[: len(raw) // dtype.itemsize * dtype.itemsize], storages[key].dtype
                    )
            return storages[key]

        with archive.open(pickles[0]) as f:
            return _StateDictUnpickler(f, path, storage).load()


def _read_torch_legacy(path: str) -> Any:
    """torch.save's format before PyTorch 1.6 (torchvision's VGG files): pickles, then each
    storage as its element count and raw data."""

    def no_storage(*_: Any) -> _Storage:
        raise ValueError(f"{path}: not a PyTorch file")

    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            header = [_StateDictUnpickler(f, path, no_storage).load() for _ in range(3)]
        except (pickle.UnpicklingError, EOFError, ValueError):
            header = []
        if not header or header[0] != _TORCH_LEGACY_MAGIC or not isinstance(header[2], dict):
            raise ValueError(f"{path}: not a PyTorch file (.pth), nor safetensors")
        order = "<" if header[2].get("little_endian", True) else ">"

        def storage(dtype: np.dtype, key: str, view: tuple[Any, ...]) -> _Storage:
            if view != (None,):
                raise ValueError(f"{path}: holds storage views, which this reader does not support")
            return storages.setdefault(key, _Storage(dtype.newbyteorder(order)))

        try:
            state = _StateDictUnpickler(f, path, storage).load()
            keys = _StateDictUnpickler(f, path, no_storage).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(
                f"{path}: the pickled state dict is cut short or damaged ({e})"
            ) from None
        for key in keys if isinstance(keys, list) else ():
            if str(key) not in storages:
                raise ValueError(f"{path}: data for storage {key!r}, which no tensor uses")
            dtype = storages[str(key)].dtype
            count = int.from_bytes(f.read(8), "little" if order == "<" else "big")
            data = f.read(count * dtype.itemsize)
            if len(data) < count * dtype.itemsize:
                break  # truncated: the tensors of this storage and the next ones have no data
            storages[str(key)].data = np.frombuffer(data, dtype)
    return state


def _tensor_array(path: str, name: str, tensor: Any) -> np.ndarray:
    if not isinstance(tensor, _Tensor) or not isinstance(tensor.storage, _Storage):
        raise ValueError(
            f"{path}: {name} is a {type(tensor).__name__}, not a tensor; a state dict "
            f"holds tensors only"
        )
    if min((tensor.offset, *tensor.shape, *tensor.stride)) < 0:
        raise ValueError(f"{path}: {name} has a negative offset, size or stride")
    data = tensor.storage.data
    end = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) + 1
    if data is None or (math.prod(tensor.shape) and end > data.size):
        raise ValueError(f"{path}: the data of {name} is missing or cut short (a truncated file?)")
    return np.lib.stride_tricks.as_strided(
        data[tensor.offset :], tensor.shape, [s * data.itemsize for s in tensor.stride]
    ).copy()


def read_tensors(path: str, file_format: str) -> dict[str, np.ndarray]:
    """The tensors of a state dict saved by torch.save (either format) or of a safetensors file."""
    if file_format == "safetensors":
        return read_safetensors(path)
    state = _read_torch_zip(path) if file_format == "torch zip" else _read_torch_legacy(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {name: _tensor_array(path, name, t) for name, t in state.items()}


# safetensors -------------------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, the data."""
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a .pth or .safetensors file (or its header is cut short)")
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            if end > len(body):
                raise ValueError(f"{path}: the data of {name} is cut short (a truncated file?)")
            tensors[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"])
        except (KeyError, TypeError, ValueError) as e:
            message = str(e) if str(e).startswith(path) else f"{path}: bad header entry for {name}"
            raise ValueError(message) from None
    return tensors


# Caffe .caffemodel --------------------------------------------------------------------------------
# The authors' own release (VGG_ILSVRC_16_layers.caffemodel, ..._19_layers): a protobuf NetParameter,
# read here from the wire format with the few field numbers of caffe.proto it needs, so neither
# Caffe nor its generated protobuf code is required. Both of caffe.proto's layer messages occur:
# V1LayerParameter (`layers`, the 2014 release) and LayerParameter (`layer`, files re-saved later).

_CAFFE_LAYERS = {2: dict(name=4, type=5, blobs=6), 100: dict(name=1, type=2, blobs=7)}
_CAFFE_WEIGHT_TYPES = {4: "conv", 14: "fc", "Convolution": "conv", "InnerProduct": "fc"}


def _varint(path: str, data: bytes, i: int) -> tuple[int, int]:
    """The varint at data[i:] and the index after it."""
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError(f"{path}: the file ends inside a record (a truncated .caffemodel?)")
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
                raise ValueError(
                    f"{path}: the file ends inside a record (a truncated .caffemodel?)"
                )
        else:
            raise ValueError(f"{path}: not a Caffe .caffemodel (protobuf wire type {wire})")
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
        raise ValueError(
            f"{path}: layer {layer} has {array.size} values for a blob of shape "
            f"{tuple(shape)} (a truncated .caffemodel?)"
        )
    return array.reshape(shape)


def read_caffemodel(path: str) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv and FC layers of a Caffe .caffemodel (in file order), in vggjax's layout."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    convs, fcs = [], []
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
            raise ValueError(
                f"{path}: layer {name} has {len(layer['blobs'])} blobs, not a weight and a bias"
            )
        weight, bias = (_caffe_blob(path, name, b) for b in layer["blobs"])
        if kind == "conv":
            if weight.ndim != 4:
                raise ValueError(
                    f"{path}: layer {name} has a weight of shape {weight.shape}, not "
                    f"a conv kernel (out, in, h, w)"
                )
            convs.append(SourceLayer(name, weight.transpose(2, 3, 1, 0), bias.reshape(-1)))
        else:  # (out, in) or the old format's (1, 1, out, in); fc6's input flattened CHW
            weight = weight.reshape(weight.shape[-2:])
            in_channels = convs[-1].kernel.shape[-1] if not fcs and convs else weight.shape[1]
            fcs.append(
                SourceLayer(name, _torch_fc(path, name, weight, in_channels), bias.reshape(-1))
            )
    if not convs:
        raise ValueError(f"{path}: no convolution layers found; not a Caffe .caffemodel of a VGG")
    return convs, fcs


# Layouts -----------------------------------------------------------------------------------------


def _torch_fc(path: str, name: str, weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A torch FC weight (out, C·k·k) flattened NCHW, or timm's conv form (out, C, k, k), as
    vggjax's (k·k·C, out) flattened NHWC."""
    out = weight.shape[0]
    window = math.isqrt(weight.size // max(out * in_channels, 1))
    if weight.ndim not in (2, 4) or out * in_channels * window**2 != weight.size:
        raise ValueError(
            f"{path}: {name}.weight has shape {weight.shape}, which does not take the "
            f"{in_channels} channels of the layer before it"
        )
    return weight.reshape(out, in_channels, window, window).transpose(2, 3, 1, 0).reshape(-1, out)


def torch_layers(
    path: str, tensors: dict[str, np.ndarray], source: str
) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv layers (`features.N`, by N) and FC layers of a torchvision or timm state dict."""
    fc_names = TORCH_FC_NAMES[source]
    layers: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        layer, _, kind = key.rpartition(".")
        if kind == "num_batches_tracked":  # a BN layer's training counter: not needed
            continue
        if (
            not (re.fullmatch(r"features\.\d+", layer) or layer in fc_names)
            or kind not in ("weight", "bias") + _TORCH_NORM_STATS
        ):
            raise ValueError(
                f"{path}: unexpected tensor {key}; a {source} VGG has features.N "
                f"(convs, and batch norms in the _bn nets) and {', '.join(fc_names)}"
            )
        layers.setdefault(layer, {})[kind] = value
    for layer, weights in layers.items():
        kinds = ("weight", "bias") + _TORCH_NORM_STATS * any(
            k in weights for k in _TORCH_NORM_STATS
        )
        for kind in kinds:
            if kind not in weights:
                raise ValueError(f"{path}: {layer}.{kind} is missing")

    convs: list[SourceLayer] = []
    conv_names = [k for k in layers if k not in fc_names]
    for layer in sorted(conv_names, key=lambda k: int(k.split(".")[1])):  # features.N by N
        weight = layers[layer]["weight"]
        if "running_mean" in layers[layer]:  # a batch norm: belongs to the conv just before it
            if not convs or convs[-1].norm is not None:
                raise ValueError(f"{path}: batch norm {layer} follows no conv layer")
            convs[-1].norm = layers[layer]
            continue
        if weight.ndim != 4:
            raise ValueError(
                f"{path}: {layer}.weight has shape {weight.shape}, not a conv "
                f"kernel (out, in, h, w)"
            )
        convs.append(SourceLayer(layer, weight.transpose(2, 3, 1, 0), layers[layer]["bias"]))
    missing = [n for n in fc_names if n not in layers]
    if 0 < len(missing) < len(fc_names):
        vgg_name = models.FC_LAYERS[fc_names.index(missing[0])]
        raise ValueError(f"{path}: FC layer {missing[0]} ({vgg_name}) is missing")
    fcs = []
    in_channels = convs[-1].kernel.shape[-1] if convs else 0
    for layer in fc_names if not missing else ():
        kernel = _torch_fc(path, layer, layers[layer]["weight"], in_channels)
        fcs.append(SourceLayer(layer, kernel, layers[layer]["bias"]))
        in_channels = kernel.shape[1]
    return convs, fcs


def split_keras_layers(layers: list[SourceLayer]) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """Keras's layers split into the convs and the dense layers after them (already HWIO and
    (in, out), with fc6's input flattened NHWC: the same layout as vggjax)."""
    convs = list(itertools.takewhile(lambda layer: layer.kernel.ndim == 4, layers))
    return convs, layers[len(convs) :]


def build_variables(
    path: str, model_name: str, convs: list[SourceLayer], fcs: list[SourceLayer]
) -> tuple[models.VGG, dict[str, Any]]:
    """The vggjax model the layers fit (width, FC size, classes and crop read off their shapes)
    and its variables (params; batch_stats for BN nets); ValueError naming the first layer that
    does not fit `model_name`."""
    config, batch_norm = models.resolve_name(model_name)
    normed = [layer.name for layer in convs if layer.norm is not None]
    if normed and not batch_norm:
        raise ValueError(
            f"{path} has batch norm layers after its convs (after {normed[0]}): "
            f"convert it with --model={_bn_name(config) or 'vgg16_bn'}"
        )
    if batch_norm and len(normed) != len(convs):
        raise ValueError(
            f"{path}: --model={model_name} has a batch norm after every conv, but "
            f"{next(layer.name for layer in convs if layer.norm is None)} has none"
        )
    names = [layer.name for layer in models.layer_table(config) if layer.kind == "conv"]
    if len(convs) != len(names):
        found = f" ({convs[0].name} … {convs[-1].name})" if convs else ""
        raise ValueError(
            f"{path} has {len(convs)} conv layers{found}; model {config} has "
            f"{len(names)} ({names[0]} … {names[-1]})"
        )
    if fcs and len(fcs) != len(models.FC_LAYERS):
        raise ValueError(
            f"{path} has {len(fcs)} dense layers after the convs ({fcs[0].name} … "
            f"{fcs[-1].name}); VGG's top has 3 (fc6, fc7, fc8)"
        )
    sizes = {}
    if fcs:
        fan_in, channels = fcs[0].kernel.shape[0], convs[-1].kernel.shape[-1]
        window = math.isqrt(fan_in // channels)
        if window**2 * channels != fan_in:
            raise ValueError(
                f"{path}: fc6 ({fcs[0].name}) has {fan_in} inputs, not a square map "
                f"of the last conv's {channels} channels"
            )
        sizes = dict(
            num_classes=fcs[2].kernel.shape[1],
            fc_width=fcs[0].kernel.shape[1],
            crop_size=32 * window,
        )
    model = models.create_model(
        _bn_name(config) if batch_norm else config, width=convs[0].kernel.shape[-1] / 64, **sizes
    )
    expected = models.abstract_variables(model)["params"]
    params, stats = {}, {}

    def f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32, copy=False)

    for name, layer in zip(names + list(models.FC_LAYERS), convs + fcs):
        got = (layer.kernel.shape, layer.bias.shape)
        want = (expected[name]["kernel"].shape, expected[name]["bias"].shape)
        if got != want:
            raise ValueError(
                f"{path}: {layer.name} ({name}) has kernel and bias shapes {got} in "
                f"vggjax's layout, but model {config} needs {want} there"
            )
        params[name] = {"kernel": f32(layer.kernel), "bias": f32(layer.bias)}
        if layer.norm is not None:
            norm = layer.norm
            if any(norm[k].shape != layer.bias.shape for k in ("weight",) + _TORCH_NORM_STATS):
                raise ValueError(
                    f"{path}: the batch norm after {layer.name} does not have "
                    f"{layer.bias.shape[0]} channels like the conv"
                )
            params[name + "_bn"] = {"scale": f32(norm["weight"]), "bias": f32(norm["bias"])}
            stats[name + "_bn"] = {
                "mean": f32(norm["running_mean"]),
                "var": f32(norm["running_var"]),
            }
    return model, {"params": params, **({"batch_stats": stats} if stats else {})}


def _bn_name(config: str) -> str | None:
    """The name of Table 1 column `config` with batch norm (vgg16_bn for D), if it has one."""
    return next((name for name, c in models.BATCH_NORM_NETS.items() if c == config), None)


def fold_input_convention(
    params: dict[str, dict[str, np.ndarray]], source: str
) -> tuple[float, float, float]:
    """Makes conv1_1 take RGB on 0–255 minus the returned mean RGB, exactly (in place)."""
    kernel = params["conv1_1"]["kernel"]  # (h, w, in = 3, out)
    if source in ("keras", "caffe"):  # Caffe's BGR order: reverse the input channels
        params["conv1_1"]["kernel"] = np.ascontiguousarray(kernel[:, :, ::-1])
        return KERAS_MEAN_BGR[::-1]
    scale = 255.0 * np.asarray(TORCH_STD_RGB)[:, None]
    params["conv1_1"]["kernel"] = (kernel / scale).astype(np.float32)
    return tuple(round(255.0 * m, 6) for m in TORCH_MEAN_RGB)


def file_format(path: str) -> str:
    """ "hdf5", "torch zip" or "torch legacy" (torch.save's formats) or "safetensors", by content."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if magic == _HDF5_MAGIC:
        return "hdf5"
    if magic.startswith(b"PK"):
        return "torch zip"
    return "torch legacy" if magic.startswith(b"\x80") else "safetensors"


def read_layers(source: str, path: str) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv and FC layers of a published weight file, in vggjax's layout."""
    if source not in SOURCES:
        raise ValueError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "caffe":
        return read_caffemodel(path)
    found = file_format(path)
    if (source == "keras") != (found == "hdf5"):
        raise ValueError(
            f"{path} is {'an' if found == 'hdf5' else 'not an'} HDF5 file; "
            f"--from=keras reads Keras's .h5 files, --from=torchvision and "
            f"--from=timm .pth and .safetensors"
        )
    if source == "keras":
        return split_keras_layers(read_keras_h5(path))
    return torch_layers(path, read_tensors(path, found), source)


def convert(source: str, path: str, model_name: str, output: str) -> dict[str, Any]:
    """Converts `path` into the workdir `output` (new or empty); returns its config.json."""
    if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
        raise ValueError(f"--output {output} exists and is not an empty directory")
    convs, fcs = read_layers(source, path)
    model, variables = build_variables(path, model_name, convs, fcs)
    mean = fold_input_convention(variables["params"], source)
    config = dict(
        model=_bn_name(model.config) if model.batch_norm else model.config,
        width=model.width,
        mean_rgb=list(mean),
    )
    if fcs:
        config.update(
            num_classes=model.num_classes, fc_width=model.fc_width, crop_size=model.crop_size
        )
    config["pretrained"] = dict(
        source=source,
        file=os.path.basename(path),
        include_top=bool(fcs),
        input="RGB on 0-255 minus mean_rgb (the source's convention folded into conv1_1)",
    )
    checkpoints.save_params(output, variables)
    with open(os.path.join(output, pretrained.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return config


# Verification against the source library ---------------------------------------------------------


def _library(name: str, source: str, install: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ValueError(
            f"--verify for {source} weights needs {name}, which is not installed ({install})"
        ) from None


def reference(source: str, path: str) -> Callable[[models.VGG, bool, np.ndarray], np.ndarray]:
    """The source library's own outputs on `path`: run(model, include_top, RGB images on
    0–255) → logits, or the last pooled map without the top, of the library's net of `model`'s
    configuration. ValueError at once if the library is missing, so nothing is converted for a
    check that cannot run."""
    if source == "caffe":
        raise ValueError(
            "--verify has no reference for --from=caffe: it would need Caffe itself "
            "(the converted net can be checked against Keras's VGG16/VGG19 files, "
            "which were converted from the same release)"
        )
    if source == "keras":
        os.environ.setdefault("KERAS_BACKEND", "jax")
        keras = _library("keras", source, "pip install keras")

        def run(model: models.VGG, include_top: bool, images: np.ndarray) -> np.ndarray:
            depth = {"D": 16, "E": 19}.get(model.config)
            if depth is None or model.batch_norm:
                raise ValueError("--verify: keras.applications has VGG16 (D) and VGG19 (E) only")
            app = getattr(keras.applications, f"vgg{depth}")
            net = getattr(app, f"VGG{depth}")(
                weights=None,
                include_top=include_top,
                input_shape=images.shape[1:],
                classes=model.num_classes,
                classifier_activation=None,
            )
            net.load_weights(path)
            return np.asarray(net(app.preprocess_input(images.copy()), training=False))

        return run

    torch = _library("torch", source, "pip install torch")
    library = _library(source, source, f"pip install {source}")
    load = (
        _library("safetensors.torch", source, "pip install safetensors").load_file
        if file_format(path) == "safetensors"
        else lambda p: torch.load(p, weights_only=True)
    )

    def run(model: models.VGG, include_top: bool, images: np.ndarray) -> np.ndarray:
        name = {"A": "vgg11", "B": "vgg13", "D": "vgg16", "E": "vgg19"}.get(model.config)
        if name is None:
            raise ValueError(f"--verify: {source} has no VGG of configuration {model.config}")
        name += "_bn" * model.batch_norm
        net = (
            getattr(library.models, name)(num_classes=model.num_classes)
            if source == "torchvision"
            else library.create_model(name, pretrained=False, num_classes=model.num_classes)
        )
        net.load_state_dict(load(path))
        x = (images / 255.0 - np.float32(TORCH_MEAN_RGB)) / np.float32(TORCH_STD_RGB)
        with torch.no_grad():
            return net.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()

    return run


def verify(
    output: str, run: Callable[[models.VGG, bool, np.ndarray], np.ndarray], num_images: int = 2
) -> tuple[float, str]:
    """max |vggjax − reference| / max |reference| of the converted net in `output` and the
    source library's, on the same random RGB images, and what was compared."""
    model, variables, preprocess = pretrained.load_pretrained(output)
    include_top = "fc8" in variables["params"]
    images = (
        np.random.default_rng(0)
        .uniform(0, 255, (num_images, model.crop_size, model.crop_size, 3))
        .astype(np.float32)
    )
    try:
        expected = run(model, include_top, images)
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        raise ValueError(f"--verify: the reference could not run: {e}".splitlines()[0]) from None
    x = preprocess(images)
    got = np.asarray(
        model.apply(variables, x) if include_top else pretrained.conv_features(model, variables, x)
    )
    if got.shape != expected.shape:
        raise ValueError(
            f"--verify: vggjax gives shape {got.shape}, the reference {expected.shape}"
        )
    what = (
        f"{'logits' if include_top else 'last pooled maps'} of {num_images} random "
        f"{model.crop_size}×{model.crop_size} images"
    )
    return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))), what


# Command line ------------------------------------------------------------------------------------


def _fail(message: str, status: int = 2) -> None:
    print(f"vggjax.convert: error: {message}", file=sys.stderr)
    sys.exit(status)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not a usage dump
        _fail(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(prog="python -m vggjax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "file", help="the published weight file (.h5, .pth, .safetensors or .caffemodel)"
    )
    parser.add_argument(
        "--from", dest="source", required=True, choices=SOURCES, help="whose layout the file is in"
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Table 1 configuration: D (vgg16) or E "
        "(vgg19); A (vgg11) and B (vgg13), and the batch-norm nets (vgg16_bn), "
        "for torchvision and timm",
    )
    parser.add_argument("--output", required=True, help="new or empty directory to write")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the converted net's "
        "outputs with the source library's own (needs that library)",
    )
    args = parser.parse_args(argv)
    try:
        run = reference(args.source, args.file) if args.verify else None
        config = convert(args.source, args.file, args.model, args.output)
        top = "with the top" if config["pretrained"]["include_top"] else "conv layers only"
        print(
            f"Wrote VGG {config['model']} ({top}) from {args.file} to {args.output}; input: "
            f"RGB on 0-255 minus {tuple(config['mean_rgb'])}"
        )
        if run is not None:
            difference, what = verify(args.output, run)
            print(
                f"Compared with {args.source}: max relative difference {difference:.2e} "
                f"over the {what} (limit {MAX_RELATIVE_DIFFERENCE:.0e})"
            )
            if not difference < MAX_RELATIVE_DIFFERENCE:
                _fail(f"the converted net differs from {args.source}'s by {difference:.2e}", 1)
    except ValueError as e:
        _fail(str(e))


if __name__ == "__main__":
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax narrates every read-only restore
    main()
