"""vggjax.convert and load_pretrained: published layouts give the outputs of their own libraries.

References: keras.applications (JAX backend) reading the h5 files with Keras's own loader; torch
(when installed) reading torch.save's files; and, with no torch, torchvision's forward pass
written here in NCHW with jax.lax. Narrow nets everywhere but one full VGG16.
"""

import collections
import io
import os
import pickle
import re
import subprocess
import sys
import types
import zipfile

os.environ["KERAS_BACKEND"] = "jax"  # before keras is imported, whatever ~/.keras/keras.json says

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vggjax
from vggjax import checkpoints, convert, models, pretrained, recipe, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
        for header in (convert._TORCH_LEGACY_MAGIC, 1001, sys_info):
            pickle.dump(header, f, protocol=2)
        f.write(pickled.getvalue())
        pickle.dump([s.key for s in storages.values()], f, protocol=2)
        for s in storages.values():
            f.write(s.array.size.to_bytes(8, "little") + s.array.tobytes())


def write_torch_layout(path, state, fmt: str) -> None:
    if fmt == "safetensors":
        pytest.importorskip("safetensors.numpy").save_file(state, str(path))
    else:
        write_torch(path, state, legacy=fmt == "legacy")


def torch_vgg(cfg, divisor, fc, classes, window, batch_norm=False):
    """torchvision's VGG module at 1/divisor width, with torch.nn (skips without torch)."""
    nn = pytest.importorskip("torch").nn

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


def caffe_messages() -> dict[str, type]:
    """The caffe.proto messages a .caffemodel's weights live in, built with protobuf's own
    descriptors (the field numbers and types of caffe.proto), to write files as Caffe does."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    T = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="caffe_test.proto", package="caffe_test")
    specs = {
        "BlobShape": [("dim", 1, T.TYPE_INT64, True, None)],
        "BlobProto": [
            ("num", 1, T.TYPE_INT32, False, None),
            ("channels", 2, T.TYPE_INT32, False, None),
            ("height", 3, T.TYPE_INT32, False, None),
            ("width", 4, T.TYPE_INT32, False, None),
            ("data", 5, T.TYPE_FLOAT, True, None),
            ("shape", 7, T.TYPE_MESSAGE, False, "BlobShape"),
        ],
        "V1LayerParameter": [
            ("name", 4, T.TYPE_STRING, False, None),
            ("type", 5, T.TYPE_INT32, False, None),
            ("blobs", 6, T.TYPE_MESSAGE, True, "BlobProto"),
        ],
        "LayerParameter": [
            ("name", 1, T.TYPE_STRING, False, None),
            ("type", 2, T.TYPE_STRING, False, None),
            ("blobs", 7, T.TYPE_MESSAGE, True, "BlobProto"),
        ],
        "NetParameter": [
            ("name", 1, T.TYPE_STRING, False, None),
            ("layers", 2, T.TYPE_MESSAGE, True, "V1LayerParameter"),
            ("layer", 100, T.TYPE_MESSAGE, True, "LayerParameter"),
        ],
    }
    for message, fields in specs.items():
        m = proto.message_type.add(name=message)
        for name, number, kind, repeated, type_name in fields:
            f = m.field.add(
                name=name,
                number=number,
                type=kind,
                label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL,
            )
            if type_name:
                f.type_name = f".caffe_test.{type_name}"
            if repeated and kind != T.TYPE_MESSAGE:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe_test.{name}"))
        for name in specs
    }


def write_caffemodel(path, state: dict[str, np.ndarray], cfg: list, legacy: bool = True) -> None:
    """torchvision-layout weights as the authors' .caffemodel: layers conv1_1 … fc8 with ReLU,
    pooling and dropout layers between them; `legacy`: the 2014 V1 format (4-D blobs given as
    num/channels/height/width, enum layer types), else the later one (BlobShape, type names)."""
    m = caffe_messages()
    net = m["NetParameter"](name="VGG_ILSVRC_16_layers")
    types_ = {
        "conv": (4, "Convolution"),
        "relu": (18, "ReLU"),
        "pool": (17, "Pooling"),
        "fc": (14, "InnerProduct"),
        "drop": (6, "Dropout"),
    }

    def add(name, kind, *blobs):
        layer = (net.layers if legacy else net.layer).add(name=name)
        layer.type = types_[kind][0 if legacy else 1]
        for blob in blobs:
            b = layer.blobs.add()
            b.data.extend(blob.ravel().tolist())
            if legacy:
                b.num, b.channels, b.height, b.width = (1,) * (4 - blob.ndim) + blob.shape
            else:
                b.shape.dim.extend(blob.shape)

    stage, conv, i = 1, 1, 0
    for v in cfg:
        if v == "M":
            add(f"pool{stage}", "pool")
            stage, conv, i = stage + 1, 1, i + 1
            continue
        add(
            f"conv{stage}_{conv}",
            "conv",
            state[f"features.{i}.weight"],
            state[f"features.{i}.bias"],
        )
        add(f"relu{stage}_{conv}", "relu")
        conv, i = conv + 1, i + 2
    for n, j in ((6, 0), (7, 3), (8, 6)):
        add(f"fc{n}", "fc", state[f"classifier.{j}.weight"], state[f"classifier.{j}.bias"])
        if n < 8:
            add(f"relu{n}", "relu")
            add(f"drop{n}", "drop")
    with open(path, "wb") as f:
        f.write(net.SerializeToString())


@pytest.mark.parametrize("legacy", [True, False])
def test_caffe_release_layout_matches_its_forward_pass(tmp_path, legacy):
    state = torchvision_state(CFG["D"], **NARROW)
    write_caffemodel(tmp_path / "vgg16.caffemodel", state, CFG["D"], legacy)
    config = convert.convert("caffe", str(tmp_path / "vgg16.caffemodel"), "D", str(tmp_path / "o"))
    assert config["mean_rgb"] == [123.68, 116.779, 103.939]
    assert (config["model"], config["num_classes"], config["crop_size"]) == ("D", 10, 64)
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "o"))
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)), nchw_forward(state, CFG["D"], rgb, caffe=True)
        )
        < 1e-5
    )


def test_bad_caffemodels_are_named(tmp_path, capsys):
    state = torchvision_state(CFG["D"], **NARROW)
    write_caffemodel(tmp_path / "w.caffemodel", state, CFG["D"])
    data = (tmp_path / "w.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) * 9 // 10])
    assert "truncated .caffemodel" in _convert_error(tmp_path, "caffe", tmp_path / "cut.caffemodel")
    net_class = caffe_messages()["NetParameter"]
    full, gap = net_class.FromString(data), net_class()
    gap.layers.extend(layer for layer in full.layers if layer.name != "conv3_1")
    (tmp_path / "gap.caffemodel").write_bytes(gap.SerializeToString())
    assert "has 12 conv layers (conv1_1 … conv5_3); model D has 13" in _convert_error(
        tmp_path, "caffe", tmp_path / "gap.caffemodel"
    )
    (tmp_path / "empty.caffemodel").write_bytes(net_class(name="x").SerializeToString())
    assert "no convolution layers found" in _convert_error(
        tmp_path, "caffe", tmp_path / "empty.caffemodel"
    )
    with pytest.raises(SystemExit) as e:
        convert.main(
            [
                "--from=caffe",
                str(tmp_path / "w.caffemodel"),
                "--model=D",
                "--verify",
                f"--output={tmp_path / 'v'}",
            ]
        )
    assert (
        e.value.code == 2
        and "--verify has no reference for --from=caffe" in capsys.readouterr().err
    )


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
    h5py = pytest.importorskip("h5py")
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


@pytest.fixture
def keras(monkeypatch):
    """keras on JAX, its random init skipped: the weights come from files (138M draws: 8 s)."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("keras was imported with another backend")
    monkeypatch.setattr(
        keras.initializers.GlorotUniform,
        "__call__",
        lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype),
    )
    return keras


# Parity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,fmt",
    [
        ("torchvision", "zip"),
        ("torchvision", "legacy"),
        ("torchvision", "safetensors"),
        ("timm", "safetensors"),
    ],
)
def test_torch_layouts_match_torchvisions_forward_pass(tmp_path, source, fmt):
    state = torchvision_state(CFG["D"], **NARROW)
    file_state = timm_state(state, 32, 2) if source == "timm" else state
    write_torch_layout(tmp_path / "w", file_state, fmt)
    config = convert.convert(source, str(tmp_path / "w"), "vgg16", str(tmp_path / "out"))
    assert config["mean_rgb"] == [123.675, 116.28, 103.53]
    assert (config["model"], config["num_classes"], config["crop_size"]) == ("D", 10, 64)
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)), nchw_forward(state, CFG["D"], rgb)
        )
        < 1e-5
    )
    if fmt != "safetensors":  # the files written here are what torch itself reads
        torch = pytest.importorskip("torch")
        loaded = torch.load(tmp_path / "w", weights_only=True)
        assert all(np.array_equal(loaded[k].numpy(), v) for k, v in state.items())


@pytest.mark.parametrize("source,fmt", [("torchvision", "zip"), ("timm", "safetensors")])
def test_batch_norm_nets_convert_with_their_statistics(tmp_path, source, fmt):
    """vgg16_bn: each BN's scale and shift become conv*_bn's parameters, its running
    statistics batch_stats; the logits equal torchvision's eval-mode forward pass."""
    state = torchvision_state(CFG["D"], **NARROW, batch_norm=True)
    file_state = timm_state(state, 32, 2) if source == "timm" else state
    write_torch_layout(tmp_path / "w", file_state, fmt)
    config = convert.convert(source, str(tmp_path / "w"), "vgg16_bn", str(tmp_path / "out"))
    assert config["model"] == "vgg16_bn"
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    assert model.batch_norm and set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        variables["batch_stats"]["conv5_3_bn"]["var"], state["features.41.running_var"]
    )
    rgb = images(2, 64)
    assert (
        relative_difference(
            model.apply(variables, preprocess(rgb)),
            nchw_forward(state, CFG["D"], rgb, batch_norm=True),
        )
        < 1e-5
    )
    assert "convert it with --model=vgg16_bn" in _convert_error(
        tmp_path / "e1", source, tmp_path / "w"
    )
    write_torch(tmp_path / "plain.pth", torchvision_state(CFG["D"], **NARROW))
    assert "has a batch norm after every conv, but features.0 has none" in _convert_error(
        tmp_path / "e2", "torchvision", tmp_path / "plain.pth", "vgg16_bn"
    )


def test_torch_batch_norm_net_matches_torch(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    net = torch_vgg(CFG["D"], **NARROW, batch_norm=True)
    torch.save(net.state_dict(), tmp_path / "vgg16_bn.pth")
    convert.convert("torchvision", str(tmp_path / "vgg16_bn.pth"), "vgg16_bn", str(tmp_path / "o"))
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "o"))
    rgb = images(2, 64)
    assert (
        relative_difference(model.apply(variables, preprocess(rgb)), torch_logits(net, rgb)) < 1e-5
    )
    stub = types.SimpleNamespace(models=types.SimpleNamespace(vgg16_bn=lambda num_classes: net))
    monkeypatch.setitem(sys.modules, "torchvision", stub)  # --verify builds vgg16_bn
    difference, _ = convert.verify(
        str(tmp_path / "o"), convert.reference("torchvision", str(tmp_path / "vgg16_bn.pth"))
    )
    assert difference < 1e-5


def test_torch_saved_files_match_torch(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    net = torch_vgg(CFG["D"], **NARROW)
    rgb = images(2, 64)
    for fmt in ("zip", "legacy", "safetensors"):
        path = str(tmp_path / f"vgg16.{fmt}")
        if fmt == "safetensors":
            pytest.importorskip("safetensors.torch").save_file(net.state_dict(), path)
        else:
            torch.save(net.state_dict(), path, _use_new_zipfile_serialization=fmt == "zip")
        convert.convert("torchvision", path, "D", str(tmp_path / fmt))
        model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / fmt))
        difference = relative_difference(
            model.apply(variables, preprocess(rgb)), torch_logits(net, rgb)
        )
        print(f"torch.save {fmt}: relative difference {difference:.1e}")
        assert difference < 1e-5
    # --verify's torchvision path, with this narrow net standing in for torchvision's vgg16.
    stub = types.SimpleNamespace(models=types.SimpleNamespace(vgg16=lambda num_classes: net))
    monkeypatch.setitem(sys.modules, "torchvision", stub)
    difference, what = convert.verify(
        str(tmp_path / "zip"), convert.reference("torchvision", str(tmp_path / "vgg16.zip"))
    )
    assert difference < 1e-5 and what == "logits of 2 random 64×64 images"


@pytest.mark.parametrize("top", [True, False])
def test_keras_vgg19_matches_keras(tmp_path, keras, top):
    """Keras 3 writing the legacy h5 layout itself (model.save), with the top and without."""
    net = keras.applications.VGG19(
        weights=None, include_top=top, input_shape=(32, 32, 3), classifier_activation=None
    )
    net.set_weights([w for _, layer in keras_layers(CFG["E"], window=1, top=top) for w in layer])
    net.save(tmp_path / "vgg19.h5")
    config = convert.convert("keras", str(tmp_path / "vgg19.h5"), "E", str(tmp_path / "out"))
    assert config["mean_rgb"] == [123.68, 116.779, 103.939]
    assert config["pretrained"]["include_top"] is top and ("num_classes" in config) is top
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "out"))
    assert ("fc6" in variables["params"]) is top and len(variables["params"]) == 16 + 3 * top
    rgb = images(2, 32)
    want = np.asarray(net(keras.applications.vgg19.preprocess_input(rgb.copy())))
    got = (
        model.apply(variables, preprocess(rgb))
        if top
        else pretrained.conv_features(model, variables, preprocess(rgb))
    )
    assert want.shape == ((2, 1000) if top else (2, 1, 1, 512))
    assert relative_difference(got, want) < 1e-5


def test_full_vgg16_in_the_published_layout_verifies_against_keras(tmp_path, keras, capsys):
    """The one full-size net: a file laid out as vgg16_weights_tf_dim_ordering_tf_kernels.h5,
    converted and checked with `--verify` (Keras's own loader and preprocess_input)."""
    write_keras_h5(tmp_path / "vgg16.h5", keras_layers(CFG["D"]), chunks=2)
    convert.main(
        [
            "--from=keras",
            str(tmp_path / "vgg16.h5"),
            "--model=D",
            "--verify",
            f"--output={tmp_path / 'out'}",
        ]
    )
    out = capsys.readouterr().out
    assert "Wrote VGG D (with the top)" in out and "(123.68, 116.779, 103.939)" in out
    assert "over the logits of 2 random 224×224 images" in out
    with capsys.disabled():
        print("\n" + out.strip().splitlines()[-1])
    model, variables, _ = pretrained.load_pretrained(str(tmp_path / "out"))
    assert models.count_params(variables["params"]) == 138_357_544


def test_load_pretrained_reads_a_training_workdir(tmp_path):
    c = recipe.paper_recipe("vgg11_bn")
    c.width, c.fc_width, c.num_classes, c.crop_size = 1 / 16, 16, 10, 32
    c.mean_rgb = (100.0, 110.0, 120.0)
    model = train.model_from_config(c)
    rng = np.random.default_rng(0)  # positive values: BN variances among them
    variables = jax.tree.map(
        lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), models.abstract_variables(model)
    )
    checkpoints.save_params(str(tmp_path), variables)
    (tmp_path / "config.json").write_text(c.to_json_best_effort())  # as training writes it
    rgb = images(2, 32)
    want = model.apply(variables, rgb - np.float32(c.mean_rgb))
    for path in (tmp_path, tmp_path / "checkpoints" / "0"):
        loaded, loaded_variables, preprocess = vggjax.load_pretrained(str(path))
        assert loaded == model and set(loaded_variables) == {"params", "batch_stats"}
        np.testing.assert_allclose(loaded.apply(loaded_variables, preprocess(rgb)), want, atol=1e-6)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no config.json in .*: it tells the model"):
        pretrained.load_pretrained(str(tmp_path))


# Bad files: one line naming the problem ----------------------------------------------------------


def _convert_error(tmp_path, source, path, model="D") -> str:
    with pytest.raises(ValueError) as e:
        convert.convert(source, str(path), model, str(tmp_path / "out"))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    return str(e.value)


def test_keras_files_of_the_wrong_model_or_missing_layers(tmp_path):
    layers = keras_layers(CFG["D"], divisor=16, fc=16, classes=10, window=1)
    write_keras_h5(tmp_path / "d.h5", layers)
    assert "has 13 conv layers (block1_conv1 … block5_conv3); model E has 16" in _convert_error(
        tmp_path, "keras", tmp_path / "d.h5", "E"
    )
    write_keras_h5(tmp_path / "gap.h5", [layer for layer in layers if layer[0] != "block4_conv2"])
    assert "has 12 conv layers" in _convert_error(tmp_path, "keras", tmp_path / "gap.h5")
    bad = [
        (name, [w[:, :-1] if name == "fc2" and w.ndim == 2 else w for w in weights])
        for name, weights in layers
    ]
    write_keras_h5(tmp_path / "shape.h5", bad)
    assert "fc2 (fc7) has kernel and bias shapes ((16, 15), (16,))" in _convert_error(
        tmp_path, "keras", tmp_path / "shape.h5"
    )
    assert "vggjax_bn" not in _convert_error(tmp_path, "keras", tmp_path / "d.h5", "vgg16_bn")


def test_torch_files_with_wrong_shapes_layers_or_layout(tmp_path):
    state = torchvision_state(CFG["D"], **NARROW)
    write_torch(tmp_path / "timm.pth", timm_state(state, 32, 2))
    assert "unexpected tensor pre_logits.fc1.weight" in _convert_error(
        tmp_path, "torchvision", tmp_path / "timm.pth"
    )
    write_torch(tmp_path / "gap.pth", {k: v for k, v in state.items() if "features.10." not in k})
    assert "has 12 conv layers (features.0 … features.28); model D has 13" in _convert_error(
        tmp_path, "torchvision", tmp_path / "gap.pth"
    )
    write_torch(tmp_path / "fc.pth", {k: v for k, v in state.items() if "classifier.3" not in k})
    assert "FC layer classifier.3 (fc7) is missing" in _convert_error(
        tmp_path, "torchvision", tmp_path / "fc.pth"
    )
    write_torch(tmp_path / "shape.pth", {**state, "classifier.6.bias": np.zeros(9, np.float32)})
    assert "classifier.6 (fc8) has kernel and bias shapes ((16, 10), (9,))" in _convert_error(
        tmp_path, "torchvision", tmp_path / "shape.pth"
    )
    assert "not an HDF5 file" in _convert_error(tmp_path, "keras", tmp_path / "shape.pth")


def test_truncated_files_are_named(tmp_path):
    state = torchvision_state(CFG["D"], **NARROW)
    write_torch(tmp_path / "legacy.pth", state, legacy=True)
    write_torch(tmp_path / "zip.pth", state)
    write_torch_layout(tmp_path / "w.safetensors", state, "safetensors")
    write_keras_h5(tmp_path / "w.h5", keras_layers(CFG["D"], divisor=16, fc=16, window=1))
    messages = {}
    for name in ("legacy.pth", "zip.pth", "w.safetensors", "w.h5"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) * 9 // 10])
        messages[name] = _convert_error(
            tmp_path, "keras" if name == "w.h5" else "torchvision", tmp_path / name
        )
    assert re.search(
        r"the data of features\.\d+\.weight is missing or cut short", messages["legacy.pth"]
    )
    assert "not a complete zip archive (a truncated .pth file?)" in messages["zip.pth"]
    assert re.search(r"the data of features\.\d+\.weight is cut short", messages["w.safetensors"])
    assert "not a readable HDF5 file" in messages["w.h5"]


def test_pickles_of_anything_but_tensors_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"features.0.weight": Payload()}, protocol=2))
    message = _convert_error(tmp_path, "torchvision", tmp_path / "evil.pth")
    assert "holds a pickled posix.system, not only tensors; refusing to unpickle it" in message
    assert not (tmp_path / "ran").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "vggjax.convert",
            "--from=torchvision",
            "nope.pth",
            "--model=D",
            "--output=o",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == "vggjax.convert: error: cannot read nope.pth: No such file or directory\n"
    for args, message in [
        (["--from=onnx", "w.pth", "--model=D", "--output=o"], "argument --from: invalid"),
        (["--from=caffe", "w.pth", "--model=D", "--output=o"], "w.pth: not a Caffe .caffemodel"),
        (["--from=torchvision", "w.pth", "--output=o"], "required: --model"),
        (["--from=torchvision", "w.pth", "--model=F", "--output=o"], "unknown model 'F'"),
        (["--from=torchvision", "w.pth", "--model=D", "--output=full"], "not an empty dir"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert.main(
                [
                    a.replace("w.pth", str(tmp_path / "w.pth")).replace(
                        "=full", f"={tmp_path / 'full'}"
                    )
                    for a in args
                ]
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("vggjax.convert: error: ") and message in err
        assert len(err.strip().splitlines()) == 1, err


def test_verify_says_when_the_reference_library_is_missing(tmp_path, monkeypatch, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    for name in ("timm", "torch"):  # importing them now raises ImportError, installed or not
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as e:
        convert.main(
            [
                "--from=timm",
                str(tmp_path / "w.pth"),
                "--model=D",
                "--verify",
                f"--output={tmp_path / 'out'}",
            ]
        )
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "--verify for timm weights needs" in err and "which is not installed" in err


def test_verify_fails_when_the_outputs_differ(tmp_path, monkeypatch, capsys):
    write_torch(tmp_path / "w.pth", torchvision_state(CFG["D"], **NARROW))
    monkeypatch.setattr(
        convert,
        "reference",
        lambda source, path: (
            lambda model, top, rgb: np.ones((len(rgb), model.num_classes), np.float32)
        ),
    )
    with pytest.raises(SystemExit) as e:
        convert.main(
            [
                "--from=torchvision",
                str(tmp_path / "w.pth"),
                "--model=D",
                "--verify",
                f"--output={tmp_path / 'out'}",
            ]
        )
    out, err = capsys.readouterr()
    assert e.value.code == 1 and "Compared with torchvision: max relative difference" in out
    assert err.startswith("vggjax.convert: error: the converted net differs from torchvision's by")
