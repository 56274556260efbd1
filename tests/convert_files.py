"""The published weight layouts, written without their libraries, for tests/test_convert.py.

torchvision- and timm-layout state dicts of random weights, torch.save's two file formats (by a
pickler that writes torch's global names), the Caffe release's .caffemodel (serialised by protobuf
in the official caffe.proto's messages), Keras's legacy .h5 layout; and the references the
converted nets are checked against: torchvision's forward pass in NCHW with jax.lax, and torch.nn's
VGG when torch is installed.
"""

import ast
import collections
import functools
import importlib.metadata
import io
import pathlib
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from vggjax.convert.torch import TORCH_LEGACY_MAGIC

# torchvision's configuration lists ("M": max-pooling), written out here rather than taken from
# vggjax's Table 1, so the references do not share the code under test.
CFG = {
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ],
}
NARROW = dict(divisor=16, fc=16, classes=10, window=2)  # D at 1/16 width, 64×64 crops
TORCH_MEAN, TORCH_STD = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
CAFFE_MEAN_BGR = np.float32([103.939, 116.779, 123.68])  # the VGG release's mean pixel


def relative_difference(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


# torchvision's layout ----------------------------------------------------------------------------


def torchvision_state(
    cfg, divisor, fc, classes, window, seed=0, batch_norm=False
) -> dict[str, np.ndarray]:
    """Random weights named and shaped as torchvision's VGG state dict (He-scaled kernels and
    non-zero biases, so a misplaced bias shows in the logits); with `batch_norm`, vgg*_bn's,
    each BN with random scale, shift and running statistics."""
    rng = np.random.default_rng(seed)

    def layer(shape, fan_in):
        return (
            (rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32),
            rng.standard_normal(shape[0]).astype(np.float32),
        )

    state, channels, i = {}, 3, 0
    for v in cfg:
        if v == "M":
            i += 1
            continue
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = layer(
            (v // divisor, channels, 3, 3), 9 * channels
        )
        channels, i = v // divisor, i + 2
        if batch_norm:
            state.update(
                {
                    f"features.{i - 1}.{k}": rng.uniform(lo, hi, channels).astype(np.float32)
                    for k, lo, hi in (
                        ("weight", 0.5, 1.5),
                        ("bias", -1, 1),
                        ("running_mean", -1, 1),
                        ("running_var", 0.5, 2),
                    )
                }
            )
            state[f"features.{i - 1}.num_batches_tracked"] = np.array(7, np.int64)
            i += 1
    for name, shape in (
        ("classifier.0", (fc, channels * window**2)),
        ("classifier.3", (fc, fc)),
        ("classifier.6", (classes, fc)),
    ):
        state[f"{name}.weight"], state[f"{name}.bias"] = layer(shape, shape[1])
    return state


def timm_state(state: dict[str, np.ndarray], channels: int, window: int) -> dict[str, np.ndarray]:
    """torchvision's weights in timm's layout: fc6 and fc7 as convs, as timm's checkpoint
    filter stores them."""
    names = {
        "classifier.0": "pre_logits.fc1",
        "classifier.3": "pre_logits.fc2",
        "classifier.6": "head.fc",
    }
    out = {}
    for key, value in state.items():
        layer, _, kind = key.rpartition(".")
        if layer == "classifier.0" and kind == "weight":
            value = value.reshape(-1, channels, window, window)
        elif layer == "classifier.3" and kind == "weight":
            value = value.reshape(*value.shape, 1, 1)
        out[f"{names.get(layer, layer)}.{kind}"] = value
    return out


def nchw_forward(
    state: dict[str, np.ndarray],
    cfg: list,
    rgb: np.ndarray,
    batch_norm: bool = False,
    caffe: bool = False,
) -> np.ndarray:
    """torchvision's VGG forward pass on RGB images in [0, 255]: NCHW, OIHW, NCHW flattening;
    with `batch_norm`, vgg*_bn's in eval mode (running statistics, eps 1e-5); with `caffe`, the
    Caffe release's input instead (BGR minus the mean BGR pixel), which is all it differs in."""
    x = (rgb[..., ::-1] - CAFFE_MEAN_BGR) if caffe else (rgb / 255 - TORCH_MEAN) / TORCH_STD
    x = jnp.asarray(x.transpose(0, 3, 1, 2))
    i = 0
    for v in cfg:
        if v == "M":
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
            i += 1
            continue
        x = jax.lax.conv_general_dilated(
            x,
            state[f"features.{i}.weight"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        x = x + state[f"features.{i}.bias"][:, None, None]
        if batch_norm:
            bn = {
                k: state[f"features.{i + 1}.{k}"][:, None, None]
                for k in ("weight", "bias", "running_mean", "running_var")
            }
            x = (x - bn["running_mean"]) / jnp.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn[
                "bias"
            ]
            i += 1
        x = jax.nn.relu(x)
        i += 2
    x = x.reshape(x.shape[0], -1)
    for j in (0, 3, 6):
        x = x @ state[f"classifier.{j}.weight"].T + state[f"classifier.{j}.bias"]
        x = jax.nn.relu(x) if j < 6 else x
    return np.asarray(x)


class _Global:
    """Pickles as the global `module.name`, as torch's own classes and functions do."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce__(self):
        return self.name

    def __call__(self):  # pickle reduces only to callables; this one is never called
        raise NotImplementedError


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, np.ascontiguousarray(array, np.float32)


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        a = self.storage.array
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (
                self.storage,
                0,
                a.shape,
                tuple(s // a.itemsize for s in a.strides),
                False,
                collections.OrderedDict(),
            ),
        )


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets save_global write any name
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_global(self, obj, name=None):
        if not isinstance(obj, _Global):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        pid = ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu", obj.array.size)
        return pid + (None,) if self.legacy else pid


def write_torch(path, state: dict[str, np.ndarray], legacy: bool = False) -> None:
    """torch.save's files, written without torch: the zip format, or the one before PyTorch 1.6
    (pickled header, state dict and storage keys, then each storage's size and data)."""
    storages = {name: _Storage(str(i), a) for i, (name, a) in enumerate(state.items())}
    pickled = io.BytesIO()
    _TorchPickler(pickled, legacy).dump(
        collections.OrderedDict((name, _Tensor(s)) for name, s in storages.items())
    )
    if not legacy:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", pickled.getvalue())
            z.writestr("archive/byteorder", "little")
            for s in storages.values():
                z.writestr(f"archive/data/{s.key}", s.array.tobytes())
            z.writestr("archive/version", "3\n")
        return
    with open(path, "wb") as f:
        sys_info = dict(
            protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4)
        )
        for header in (TORCH_LEGACY_MAGIC, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(pickled.getvalue())
        pickle.dump([s.key for s in storages.values()], f, protocol=2)
        for s in storages.values():
            f.write(s.array.size.to_bytes(8, "little") + s.array.tobytes())


def write_torch_layout(path, state, fmt: str) -> None:
    if fmt == "safetensors":
        safetensors.numpy.save_file(state, str(path))
    else:
        write_torch(path, state, legacy=fmt == "legacy")


def torch_vgg(cfg, divisor, fc, classes, window, batch_norm=False):
    """torchvision's VGG module at 1/divisor width, with torch.nn."""
    from torch import nn

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            layers, channels = [], 3
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [
                        nn.Conv2d(channels, v // divisor, 3, padding=1),
                        *[nn.BatchNorm2d(v // divisor)] * batch_norm,
                        nn.ReLU(True),
                    ]
                    channels = v // divisor
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(window)
            self.classifier = nn.Sequential(
                nn.Linear(channels * window**2, fc),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(fc, fc),
                nn.ReLU(True),
                nn.Dropout(),
                nn.Linear(fc, classes),
            )

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)).flatten(1))

    net = VGG().eval()
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(module.bias)  # torch starts biases at zero or near it
        if isinstance(module, nn.BatchNorm2d):  # statistics as if trained, not 0 and 1
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias)
            nn.init.normal_(module.running_mean)
            nn.init.uniform_(module.running_var, 0.5, 2)
    return net


def torch_logits(net, rgb: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(
            torch.from_numpy(((rgb / 255 - TORCH_MEAN) / TORCH_STD).transpose(0, 3, 1, 2))
        ).numpy()


# The Caffe release's layout -------------------------------------------------------------------------


@functools.cache
def caffe_net_parameter() -> type:
    """NetParameter of the official caffe.proto, not of descriptors written here: BVLC's
    caffe.proto of Caffe 1.0 as protoc compiled it into MMdnn's caffe_pb2.py (PyPI `mmdnn`, pinned
    in the test extra). That module predates protobuf 4 and no longer imports, so the
    FileDescriptorProto protoc serialised into it goes to a pool here, as a _pb2 module of today's
    protoc hands its own to the pool. Checked when chosen: it differs from BVLC's last caffe.proto
    only by four fields added after 1.0, none of which a VGG file sets."""
    path = importlib.metadata.distribution("mmdnn").locate_file(
        "mmdnn/conversion/caffe/caffe_pb2.py"
    )
    serialized = next(  # the module's `serialized_pb=_b('…')`: latin-1 text of the bytes
        ast.literal_eval(node.value.args[0])
        for node in ast.walk(ast.parse(pathlib.Path(path).read_text("utf-8")))
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized.encode("latin-1")))
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


# V1LayerParameter's LayerType names → LayerParameter's type names.
_CAFFE_TYPES = {
    "CONVOLUTION": "Convolution",
    "RELU": "ReLU",
    "POOLING": "Pooling",
    "INNER_PRODUCT": "InnerProduct",
    "DROPOUT": "Dropout",
    "SOFTMAX": "Softmax",
}


def _caffe_layers(state: dict[str, np.ndarray], cfg: list) -> list[tuple[str, str, tuple, dict]]:
    """(name, V1 type, blobs, layer parameters) of the release's deploy net, conv1_1 … prob."""
    layers, stage, conv, i = [], 1, 1, 0
    for v in cfg:
        if v == "M":
            pool = dict(pooling_param=dict(pool="MAX", kernel_size=2, stride=2))
            layers.append((f"pool{stage}", "POOLING", (), pool))
            stage, conv, i = stage + 1, 1, i + 1
            continue
        blobs = state[f"features.{i}.weight"], state[f"features.{i}.bias"]
        conv_param = dict(num_output=len(blobs[1]), pad=[1], kernel_size=[3])
        layers.append(
            (f"conv{stage}_{conv}", "CONVOLUTION", blobs, dict(convolution_param=conv_param))
        )
        layers.append((f"relu{stage}_{conv}", "RELU", (), {}))
        conv, i = conv + 1, i + 2
    for n, j in ((6, 0), (7, 3), (8, 6)):
        blobs = state[f"classifier.{j}.weight"], state[f"classifier.{j}.bias"]
        fc_param = dict(inner_product_param=dict(num_output=len(blobs[1])))
        layers.append((f"fc{n}", "INNER_PRODUCT", blobs, fc_param))
        if n < 8:
            layers.append((f"relu{n}", "RELU", (), {}))
            layers.append((f"drop{n}", "DROPOUT", (), dict(dropout_param=dict(dropout_ratio=0.5))))
    return layers + [("prob", "SOFTMAX", (), {})]


def write_caffemodel(path, state: dict[str, np.ndarray], cfg: list, legacy: bool = True) -> None:
    """torchvision-layout weights as the authors' .caffemodel, serialised by protobuf in the
    official schema's messages (caffe_net_parameter): input "data", then conv1_1 … fc8 with their
    ReLU, pooling and dropout layers, each with its bottom, top, learning-rate settings and layer
    parameters as the release has them, and softmax "prob"; `legacy`: the 2014 V1 format (enum
    types, 4-D blobs given as num/channels/height/width), else the later one (type names,
    BlobShape)."""
    net = caffe_net_parameter()(
        name="VGG_ILSVRC_16_layers", input=["data"], input_dim=[10, 3, 224, 224]
    )
    rates = (
        dict(blobs_lr=[1, 2], weight_decay=[1, 0])
        if legacy
        else dict(param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    )
    bottom = "data"
    for name, kind, blobs, params in _caffe_layers(state, cfg):
        top = bottom if kind in ("RELU", "DROPOUT") else name  # in place, as in the release
        layer = (net.layers if legacy else net.layer).add(
            name=name,
            type=kind if legacy else _CAFFE_TYPES[kind],
            bottom=[bottom],
            top=[top],
            **params,
            **(rates if blobs else {}),
        )
        for blob in blobs:
            if legacy:  # 4-D: (1, 1, out, in) for an FC weight, (1, 1, 1, out) for a bias
                dims = (1,) * (4 - blob.ndim) + blob.shape
                shape = dict(zip(("num", "channels", "height", "width"), dims))
            else:
                shape = dict(shape=dict(dim=blob.shape))
            layer.blobs.add(data=blob.ravel().tolist(), **shape)
        bottom = top
    pathlib.Path(path).write_bytes(net.SerializeToString())


# Keras's layout ----------------------------------------------------------------------------------


def keras_layers(cfg, divisor=1, fc=4096, classes=1000, window=7, top=True, seed=0):
    """(layer name, weights) of keras.applications' VGG, every layer listed, random weights."""
    rng = np.random.default_rng(seed)

    def weights(shape, fan_in):
        return [
            (rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2 / fan_in))),
            rng.standard_normal(shape[-1], np.float32),
        ]

    layers, channels, stage, k = [("input_layer", [])], 3, 1, 0
    for v in cfg:
        if v == "M":
            layers.append((f"block{stage}_pool", []))
            stage, k = stage + 1, 0
        else:
            k += 1
            layers.append(
                (f"block{stage}_conv{k}", weights((3, 3, channels, v // divisor), 9 * channels))
            )
            channels = v // divisor
    if top:
        layers += [
            ("flatten", []),
            ("fc1", weights((channels * window**2, fc), channels)),
            ("fc2", weights((fc, fc), fc)),
            ("predictions", weights((fc, classes), fc)),
        ]
    return layers


def write_keras_h5(path, layers, chunks: int = 1) -> None:
    """The layout of Keras's published VGG files (Keras 1/2 names, `{layer}_W_1:0`): the root's
    layer_names lists every layer, each layer's group lists its weight_names. With chunks > 1,
    layer_names is split as Keras splits attributes too large for one HDF5 header."""
    import h5py

    with h5py.File(path, "w") as f:
        names = np.array([name.encode() for name, _ in layers])
        if chunks == 1:
            f.attrs["layer_names"] = names
        for i, chunk in enumerate(np.array_split(names, chunks) if chunks > 1 else []):
            f.attrs[f"layer_names{i}"] = chunk
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.0.8"
        for name, weights in layers:
            group = f.create_group(name)
            weight_names = [f"{name}_{kind}_1:0".encode() for kind in "Wb"[: len(weights)]]
            group.attrs["weight_names"] = np.array(weight_names, dtype="S")
            for weight_name, value in zip(weight_names, weights):
                group.create_dataset(weight_name, data=value)
