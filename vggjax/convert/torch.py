"""PyTorch state dicts as files: torch.save's two formats and safetensors, read without torch.

torch.save's files are pickles, which can run any code on load; they go through an unpickler
that resolves no global but OrderedDict and torch's tensor rebuilders, so it builds nothing but
dicts and tensor records. safetensors files are read from their JSON header.

(This module is vggjax.convert.torch; `import torch` anywhere still means PyTorch, since imports
are absolute.)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pickle
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from vggjax.errors import UserError

TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch.save's legacy format
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
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


def file_format(path: str) -> str:
    """ "hdf5" (Keras), "torch zip" or "torch legacy" (torch.save's formats) or "safetensors",
    by content: the one place that tells Keras's files from torch's."""
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if magic == _HDF5_MAGIC:
        return "hdf5"
    if magic.startswith(b"PK"):
        return "torch zip"
    return "torch legacy" if magic.startswith(b"\x80") else "safetensors"


def read_tensors(path: str, file_format: str) -> dict[str, np.ndarray]:
    """The tensors of a state dict saved by torch.save (either format) or of a safetensors file."""
    if file_format == "safetensors":
        return read_safetensors(path)
    state = _read_torch_zip(path) if file_format == "torch zip" else _read_torch_legacy(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {name: _tensor_array(path, name, t) for name, t in state.items()}


# torch.save's pickles -----------------------------------------------------------------------------


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
            raise UserError(
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
            raise UserError(f"{self.path}: unknown persistent object {pid!r:.60}")
        return self.storage(pid[1], str(pid[2]), pid[5:])


def _read_torch_zip(path: str) -> Any:
    """torch.save's format since PyTorch 1.6: a zip of data.pkl and one member per storage."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not a complete zip archive (a truncated .pth file?)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise UserError(f"{path}: a zip without one data.pkl, so not a PyTorch file")
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
        raise UserError(f"{path}: not a PyTorch file")

    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        try:
            header = [_StateDictUnpickler(f, path, no_storage).load() for _ in range(3)]
        except (pickle.UnpicklingError, EOFError, ValueError):
            header = []
        if not header or header[0] != TORCH_LEGACY_MAGIC or not isinstance(header[2], dict):
            raise UserError(f"{path}: not a PyTorch file (.pth), nor safetensors")
        order = "<" if header[2].get("little_endian", True) else ">"

        def storage(dtype: np.dtype, key: str, view: tuple[Any, ...]) -> _Storage:
            if view != (None,):
                raise UserError(f"{path}: holds storage views, which this reader does not support")
            return storages.setdefault(key, _Storage(dtype.newbyteorder(order)))

        try:
            state = _StateDictUnpickler(f, path, storage).load()
            keys = _StateDictUnpickler(f, path, no_storage).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise UserError(
                f"{path}: the pickled state dict is cut short or damaged ({e})"
            ) from None
        for key in keys if isinstance(keys, list) else ():
            if str(key) not in storages:
                raise UserError(f"{path}: data for storage {key!r}, which no tensor uses")
            dtype = storages[str(key)].dtype
            count = int.from_bytes(f.read(8), "little" if order == "<" else "big")
            data = f.read(count * dtype.itemsize)
            if len(data) < count * dtype.itemsize:
                break  # truncated: the tensors of this storage and the next ones have no data
            storages[str(key)].data = np.frombuffer(data, dtype)
    return state


def _tensor_array(path: str, name: str, tensor: Any) -> np.ndarray:
    """The array a `_Tensor` record views, copied out of its storage."""
    if not isinstance(tensor, _Tensor) or not isinstance(tensor.storage, _Storage):
        raise UserError(
            f"{path}: {name} is a {type(tensor).__name__}, not a tensor; a state dict "
            f"holds tensors only"
        )
    if min((tensor.offset, *tensor.shape, *tensor.stride)) < 0:
        raise UserError(f"{path}: {name} has a negative offset, size or stride")
    data = tensor.storage.data
    end = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride)) + 1
    if data is None or (math.prod(tensor.shape) and end > data.size):
        raise UserError(f"{path}: the data of {name} is missing or cut short (a truncated file?)")
    return np.lib.stride_tricks.as_strided(
        data[tensor.offset :], tensor.shape, [s * data.itemsize for s in tensor.stride]
    ).copy()


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
        raise UserError(f"{path}: not a .pth or .safetensors file (or its header is cut short)")
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            cut_short = end > len(body)
            if not cut_short:
                tensors[name] = np.frombuffer(body[start:end], dtype).reshape(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: bad header entry for {name}") from None
        if cut_short:
            raise UserError(f"{path}: the data of {name} is cut short (a truncated file?)")
    return tensors
