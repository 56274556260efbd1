"""--from=onnx: graphs exported by torch.onnx (torchvision's layout, plain and batch norm) and
built in tf2onnx's layout for Keras's VGG (tf2onnx needs TensorFlow, which CI lacks), each
converted net equal to onnxruntime on the graph; a new head is left and said so; a graph that is
not VGG's is named at its first node."""

import numpy as np
import onnx
import pytest
from convert_files import CFG, NARROW, images, keras_layers, relative_difference, torch_vgg
from onnx import TensorProto, helper, numpy_helper

from vggjax import convert, pretrained
from vggjax.convert.layout import KERAS_MEAN_BGR, TORCH_MEAN_RGB, TORCH_STD_RGB
from vggjax.errors import UserError

onnxruntime = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export"),
    pytest.mark.filterwarnings("ignore:The feature will be removed"),
]


def _export(net, path, batch_norm: bool = False) -> str:
    """torch.onnx's TorchScript exporter (the dynamo one needs onnxscript); PRESERVE keeps the
    BatchNormalization nodes, which eval mode would fold into the convs."""
    preserve = torch.onnx.TrainingMode.PRESERVE if batch_norm else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(
        net,
        torch.zeros(1, 3, 64, 64),
        str(path),
        dynamo=False,
        training=preserve,
        do_constant_folding=not batch_norm,  # torch warns that folding could change BN weights
        input_names=["x"],
        dynamic_axes={"x": {0: "batch"}},
    )
    return str(path)


def _runtime(path: str, x: np.ndarray, output: int = 0) -> np.ndarray:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[output]


def _converted(path: str, output, **kwargs):
    config = convert.convert("onnx", path, None, str(output), **kwargs)
    return (config, *pretrained.load_pretrained(str(output)))


class _ViewFlatten(torch.nn.Module):
    """torchvision's VGG before 0.3, `x.view(x.size(0), -1)`: exported as Shape, Gather, Concat
    and a Reshape whose shape is computed."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        x = self.net.avgpool(self.net.features(x))
        return self.net.classifier(x.view(x.size(0), -1))


@pytest.mark.parametrize("batch_norm, view", [(False, False), (True, False), (False, True)])
def test_torch_exports_equal_onnxruntime(tmp_path, batch_norm, view):
    """The graph's own input (raw) by default; with torchvision's convention (or RGB/255)
    folded, RGB on 0-255."""
    net = torch_vgg(CFG["D"], **NARROW, batch_norm=batch_norm)
    path = _export(_ViewFlatten(net) if view else net, tmp_path / "vgg16.onnx", batch_norm)
    assert any(n.op_type == "Shape" for n in onnx.load(path).graph.node) is view
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node) is batch_norm
    config, model, variables, preprocess = _converted(path, tmp_path / "raw")
    assert config["model"] == ("vgg16_bn" if batch_norm else "D") and config["mean_rgb"] == [0] * 3
    assert config["pretrained"]["include_top"] and config["pretrained"]["left"] == ""
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = model.apply(variables, preprocess(x.transpose(0, 2, 3, 1)))
    assert relative_difference(got, _runtime(path, x)) < 1e-5
    convention = "unit" if view else "torchvision"  # RGB/255, or normalised as torchvision does
    config, model, variables, preprocess = _converted(
        path, tmp_path / "folded", input_convention=convention
    )
    rgb = images(2, 64)
    normalised = rgb / 255
    if convention == "torchvision":
        normalised = (normalised - np.float32(TORCH_MEAN_RGB)) / np.float32(TORCH_STD_RGB)
    want = _runtime(path, normalised.transpose(0, 3, 1, 2).astype(np.float32))
    assert relative_difference(model.apply(variables, preprocess(rgb)), want) < 1e-5


def _keras_graph(path, batch_norm: bool) -> str:
    """Keras's VGG16 (1/16 wide, 64×64, 10 classes, softmax) as tf2onnx lays it out: NHWC input
    transposed to NCHW, kernels HWIO behind a Transpose node (odd layers) or already OIHW, back
    to NHWC before the flatten, dense layers as MatMul + Add; with batch_norm, a
    BatchNormalization after each conv with Keras's epsilon, 1e-3. The logits are a second
    output: the random net's softmax is all but one-hot."""
    rng = np.random.default_rng(1)
    nodes, weights, x = [helper.make_node("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2])], [], "t0"

    def add(op, inputs, arrays=(), **attributes):
        nonlocal x
        names = [f"{op}{len(nodes)}_{i}" for i in range(len(arrays))]
        weights.extend(numpy_helper.from_array(a, n) for a, n in zip(arrays, names))
        nodes.append(helper.make_node(op, [x, *inputs, *names], [f"y{len(nodes)}"], **attributes))
        x = nodes[-1].output[0]

    for i, (name, layer) in enumerate(keras_layers(CFG["D"], 16, 16, 10, 2)[1:]):
        if name.endswith("pool"):
            add("MaxPool", [], kernel_shape=[2, 2], strides=[2, 2])
        elif "conv" in name and i % 2:
            weights.append(numpy_helper.from_array(layer[0], f"{name}_hwio"))
            nodes.append(helper.make_node("Transpose", [f"{name}_hwio"], [name], perm=[3, 2, 0, 1]))
            add("Conv", [name], [layer[1]], kernel_shape=[3, 3], pads=[1] * 4)
        elif "conv" in name:
            add("Conv", [], [layer[0].transpose(3, 2, 0, 1), layer[1]], pads=[1] * 4)
        elif name == "flatten":
            add("Transpose", [], perm=[0, 2, 3, 1])
            add("Reshape", [], [np.int64([-1, 32 * 4])])
        else:
            add("MatMul", [], [layer[0]])
            add("Add", [], [layer[1]])
        if "conv" in name and batch_norm:
            stats = [rng.uniform(0.5, 1.5, layer[1].shape).astype(np.float32) for _ in range(4)]
            add("BatchNormalization", [], stats, epsilon=1e-3)
        if "conv" in name or name in ("fc1", "fc2"):
            add("Relu", [])
    logits = x
    add("Softmax", [], axis=-1)
    graph = helper.make_graph(
        nodes,
        "keras_vgg16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 64, 3])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", 10]) for y in (x, logits)],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_tf2onnx_layout_of_keras_equals_onnxruntime(tmp_path, batch_norm):
    """Caffe's convention (Keras's preprocess_input) folded; the softmax left off: logits."""
    path = _keras_graph(tmp_path / "keras.onnx", batch_norm)
    config, model, variables, preprocess = _converted(
        path, tmp_path / "o", input_convention="caffe"
    )
    assert config["model"] == ("vgg16_bn" if batch_norm else "D")
    assert config["pretrained"]["left"].startswith("the softmax after fc8")
    rgb = images(2, 64)
    bgr = (rgb[..., ::-1] - np.float32(KERAS_MEAN_BGR)).astype(np.float32)
    logits = np.asarray(model.apply(variables, preprocess(rgb)), np.float64)
    assert relative_difference(logits, _runtime(path, bgr, output=1)) < 1e-5
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    assert relative_difference(probabilities, _runtime(path, bgr)) < 1e-5


class _NewHead(torch.nn.Module):
    """A VGG backbone fine-tuned with a new head: global average pooling and one linear layer."""

    def __init__(self, features):
        super().__init__()
        self.features, self.head = features, torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def test_a_new_head_is_left_and_its_convs_convert(tmp_path, capsys):
    features = torch_vgg(CFG["D"], **NARROW).features
    path = _export(_NewHead(features), tmp_path / "tuned.onnx")
    convert.main(["--from=onnx", path, f"--output={tmp_path / 'o'}"])
    out = capsys.readouterr().out
    assert "(conv layers only)" in out and "input: the ONNX graph's own input values" in out
    assert "Left: the head after pool5 is not VGG's top" in out and "Gemm '/head/Gemm'" in out
    model, variables, preprocess = pretrained.load_pretrained(str(tmp_path / "o"))
    assert "fc6" not in variables["params"]
    features_path = _export(features, tmp_path / "features.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = pretrained.conv_features(model, variables, preprocess(x.transpose(0, 2, 3, 1)))
    want = _runtime(features_path, x).transpose(0, 2, 3, 1)
    assert relative_difference(got, want) < 1e-5


def test_graphs_that_are_not_vgg_get_one_line(tmp_path, capsys):
    path = _export(torch_vgg(CFG["D"], **NARROW), tmp_path / "vgg16.onnx")
    model = onnx.load(path)
    model.graph.node[3].op_type = "Sigmoid"  # conv1_2's ReLU
    onnx.save(model, str(tmp_path / "sigmoid.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    for file, args, message in [
        ("sigmoid.onnx", [], "could not place node '/features/features.3/Relu' (Sigmoid)"),
        ("vgg16.onnx", ["--model=E"], "kernel sizes ((3, 3), (3, 3), (3, 3, 3)"),
        ("vgg16.onnx", ["--input_convention=bgr"], "argument --input_convention: invalid"),
        ("junk.onnx", [], "junk.onnx is not a readable ONNX file"),
        ("vgg16.onnx", ["--verify"], "--verify has no reference for --from=onnx"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert.main(["--from=onnx", str(tmp_path / file), f"--output={tmp_path}/o", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("vggjax.convert: error: ") and message in err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match="--input_convention is for --from=onnx"):
        convert.convert("torchvision", path, "D", str(tmp_path / "t"), input_convention="raw")
