"""ONNX graphs of VGG nets, read with the `onnx` package (no runtime): PyTorch's exports
(torchvision's layout, NCHW, fc6 flattened NCHW) and tf2onnx's of Keras (NHWC input, a Transpose
to NCHW before the convs and back before the flatten, dense layers as MatMul + Add), with or
without BatchNormalization nodes.

The graph is walked as a chain from its one input: each node either computes a constant (a
weight, or a Transpose of one, as tf2onnx leaves HWIO kernels), or a shape (torch's
`x.view(x.size(0), -1)` exports as Shape, Gather, Concat before the Reshape), or is the next
layer of the chain. The feature part (conv, batch norm, ReLU, 2×2 max-pooling, five stages) must fit, or the
first node that does not is named. What follows pool5 is read as VGG's top (flatten, three dense
layers, an optional softmax, which the converted net leaves off: it gives logits); a head that
is not VGG's is left, and said so, as a `_notop` conversion leaves the top.

(This module is vggjax.convert.onnx; `import onnx` still means the package: imports are absolute.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from vggjax import models
from vggjax.convert.layout import SourceLayer, bn_name, torch_fc
from vggjax.errors import UserError

_PASS_THROUGH = ("Dropout", "Identity")  # eval-mode no-ops
_CONSTANT_OPS = ("Constant", "Identity", "Transpose", "Reshape", "Cast")
_TO_NCHW, _TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]
_TOP = ("flatten", "fc", "relu", "fc", "relu", "fc")
# After each feature layer, what may come next ("start": the graph's input).
_FOLLOWS = {
    "start": ("conv", "to_nchw"),
    "to_nchw": ("conv",),
    "conv": ("bn", "relu"),
    "bn": ("relu",),
    "relu": ("conv", "pool"),
    "pool": ("conv",),
}


@dataclasses.dataclass
class OnnxNet:
    """What a graph holds, in vggjax's layout: the convs (and their batch norms), the top's
    three dense layers (none if it has another head), each stage's conv kernel sizes, and the
    head's nodes left unconverted, described ('' when none were)."""

    convs: list[SourceLayer]
    fcs: list[SourceLayer]
    stages: tuple[tuple[int, ...], ...]
    left: str = ""

    def model_name(self, path: str, given: str | None) -> str:
        """`given`, checked against the stages' kernel sizes, or the Table 1 net they are."""
        kernels = {
            config: tuple(tuple(e[0] for e in stage) for stage in stages)
            for config, stages in models.TABLE_1.items()
            if "LRN" not in sum(stages, ())  # a graph has no LRN nodes to place
        }
        config = models.resolve_name(given)[0] if given else None
        if config is None:
            config = next((c for c, k in kernels.items() if k == self.stages), None)
        if config is None or kernels.get(config) != self.stages:
            wanted = (
                f"model {config}'s are {kernels.get(config)}" if config else "no Table 1 net's are"
            )
            raise UserError(
                f"{path}: the graph's conv stages have kernel sizes {self.stages}; {wanted}"
            )
        normed = any(layer.norm is not None for layer in self.convs)
        return given or (bn_name(config) if normed else None) or config


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise UserError("--from=onnx needs the onnx package: pip install onnx") from None
    return onnx


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant(node: Any, inputs: list[np.ndarray]) -> np.ndarray:
    """The value of a node whose inputs are all constants (an op of _CONSTANT_OPS)."""
    from onnx import numpy_helper

    attributes = _attributes(node)
    if node.op_type == "Constant":
        return numpy_helper.to_array(attributes["value"])
    if node.op_type == "Transpose":
        return inputs[0].transpose(attributes.get("perm"))
    if node.op_type == "Reshape":
        return inputs[0].reshape([d or s for d, s in zip(inputs[1], inputs[0].shape)])
    return inputs[0]  # Identity, and Cast (the weights are cast to float32 when placed)


class _Walk:
    """The chain of layers from the graph's input, constants folded as they come."""

    def __init__(self, path: str, model: Any):
        from onnx import numpy_helper

        graph = model.graph
        self.path, self.model = path, model
        self.constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.shapes: set[str] = set()  # tensors computed from the chain's shape
        inputs = [i for i in graph.input if i.name not in self.constants]
        if len(inputs) != 1:
            raise UserError(f"{path}: the graph has {len(inputs)} inputs; a VGG has one image")
        dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
        if len(dims) != 4 or 3 not in (dims[1], dims[3]):
            raise UserError(f"{path}: the graph's input has shape {dims}, not NCHW or NHWC RGB")
        self.current = inputs[0].name
        self.layout = "NCHW" if dims[1] == 3 else "NHWC"

    @functools.cached_property
    def ranks(self) -> dict[str, int]:
        """Each tensor's number of axes, by ONNX's shape inference (only if a Reshape needs it:
        it copies the whole model)."""
        from onnx import shape_inference

        inferred = shape_inference.infer_shapes(self.model).graph.value_info
        return {v.name: len(v.type.tensor_type.shape.dim) for v in inferred}

    def fail(self, node: Any, why: str) -> UserError:
        return UserError(f"{self.path}: could not place node {node.name!r} ({node.op_type}): {why}")

    def weight(self, node: Any, index: int, default: np.ndarray | None = None) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            if default is None:
                raise self.fail(node, f"input {index} is missing")
            return default
        if node.input[index] not in self.constants:
            raise self.fail(node, f"input {node.input[index]!r} is not a constant")
        return self.constants[node.input[index]].astype(np.float32)

    def layer(self, node: Any) -> tuple[str, Any] | None:
        """(kind, what) of the chain's next node; None for a constant or a pass-through."""
        if all(name in self.constants for name in node.input) and node.op_type in _CONSTANT_OPS:
            values = [self.constants[name] for name in node.input]
            self.constants[node.output[0]] = _constant(node, values)
            return None
        if node.op_type == "Shape" or all(
            n in self.constants or n in self.shapes for n in node.input
        ):
            self.shapes.update(node.output)
            return None
        if not node.input or node.input[0] != self.current:
            raise self.fail(node, f"it does not take the chain's output {self.current!r}")
        self.current = node.output[0]
        if node.op_type in _PASS_THROUGH:
            return None
        return _LAYERS.get(node.op_type, _unknown)(self, node, _attributes(node))


def _unknown(walk: _Walk, node: Any, attributes: dict[str, Any]) -> tuple[str, Any]:
    raise walk.fail(node, "not a layer of VGG")


def _nchw(walk: _Walk, node: Any) -> None:
    if walk.layout != "NCHW":
        raise walk.fail(node, "it takes an NHWC tensor; ONNX's convs and pools take NCHW")


def _conv(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    _nchw(walk, node)
    kernel = walk.weight(node, 1)
    side = kernel.shape[-1] if kernel.ndim == 4 else 0
    same = [side // 2] * 4 if side % 2 else None
    if (
        kernel.shape[2:] != (side, side)
        or a.get("group", 1) != 1
        or any(v != 1 for v in a.get("strides", []) + a.get("dilations", []))
        or (a.get("pads", [0] * 4) != same and a.get("auto_pad", b"") not in (b"SAME_UPPER",))
    ):
        raise walk.fail(node, "not a stride-1, 'same'-padded square conv with an odd kernel")
    bias = walk.weight(node, 2, np.zeros(kernel.shape[0], np.float32))
    return "conv", SourceLayer(node.name, kernel.transpose(2, 3, 1, 0), bias)


def _batch_norm(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    """torch's names for the BN's tensors, the variance shifted so that vggjax's epsilon
    (models.BN_EPSILON) gives the graph's: var + ε_graph = var' + ε_vggjax."""
    _nchw(walk, node)
    weight, bias, mean, var = (walk.weight(node, i) for i in range(1, 5))
    var = var + np.float32(a.get("epsilon", 1e-5) - models.BN_EPSILON)
    if (var < 0).any():
        raise walk.fail(node, f"its epsilon is below vggjax's {models.BN_EPSILON}")
    return "bn", dict(weight=weight, bias=bias, running_mean=mean, running_var=var)


def _max_pool(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    _nchw(walk, node)
    if a.get("kernel_shape") != [2, 2] or a.get("strides") != [2, 2] or any(a.get("pads", [])):
        raise walk.fail(node, "not VGG's 2×2 max-pooling with stride 2")
    return "pool", None


def _average_pool(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any] | None:
    """torch's AdaptiveAvgPool2d on a map of its own size: 1×1, the identity."""
    if a.get("kernel_shape") != [1, 1] or a.get("strides", [1, 1]) != [1, 1]:
        raise walk.fail(node, "an average pooling, not VGG's")
    return None


def _transpose(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    perm = list(a.get("perm", []))
    if (walk.layout, perm) not in (("NHWC", _TO_NCHW), ("NCHW", _TO_NHWC)):
        raise walk.fail(node, f"a transpose by {perm} of an {walk.layout} tensor")
    walk.layout = "NCHW" if perm == _TO_NCHW else "NHWC"
    return f"to_{walk.layout.lower()}", None


def _flatten(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    """Flatten, or a Reshape to two axes (its shape a constant, or computed: shape inference's)."""
    if node.op_type == "Flatten":
        rank = 1 + a.get("axis", 1)
    elif node.input[1] in walk.constants:
        rank = len(walk.constants[node.input[1]])
    else:
        rank = walk.ranks.get(node.output[0])
    if rank != 2:
        raise walk.fail(node, "not a flatten to (batch, features)")
    return "flatten", walk.layout


def _dense(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    """Gemm (bias in it) or MatMul (bias from the Add after it), as (name, kernel (in, out))."""
    weight = walk.weight(node, 1)
    if (a.get("alpha", 1.0), a.get("beta", 1.0), a.get("transA", 0)) != (1.0, 1.0, 0):
        raise walk.fail(node, "a Gemm with alpha, beta or transA set")
    kernel = weight.T if a.get("transB", 0) else weight
    bias = walk.weight(node, 2, np.zeros(kernel.shape[-1], np.float32)).reshape(-1)
    return ("fc" if node.op_type == "Gemm" else "matmul"), SourceLayer(node.name, kernel, bias)


def _add(walk: _Walk, node: Any, a: dict[str, Any]) -> tuple[str, Any]:
    return "add", walk.weight(node, 1).reshape(-1)


_LAYERS = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Relu": lambda walk, node, a: ("relu", None),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "Transpose": _transpose,
    "Flatten": _flatten,
    "Reshape": _flatten,
    "Gemm": _dense,
    "MatMul": _dense,
    "Add": _add,
    "Softmax": lambda walk, node, a: ("softmax", None),
}


def _features(walk: _Walk, nodes: list[Any]) -> tuple[list[SourceLayer], tuple, int]:
    """The convs (their batch norms attached), each stage's kernel sizes, and the index of the
    first node after pool5; UserError naming the first node that does not fit."""
    convs: list[SourceLayer] = []
    stages: list[tuple[int, ...]] = []
    stage: list[int] = []
    before = "start"
    for index, node in enumerate(nodes):
        layer = walk.layer(node)
        if layer is None:
            continue
        kind, what = layer
        if kind not in _FOLLOWS[before]:
            raise walk.fail(node, f"VGG has no {kind} after a {before}")
        before = kind
        if kind == "conv":
            convs.append(what)
            stage.append(what.kernel.shape[0])
        elif kind == "bn":
            convs[-1].norm = what
        elif kind == "pool":
            stages.append(tuple(stage))
            stage = []
            if len(stages) == 5:
                return convs, tuple(stages), index + 1
    raise UserError(f"{walk.path}: the graph ends after {len(stages)} of VGG's 5 conv stages")


def _head_layers(walk: _Walk, nodes: list[Any]) -> list[tuple[str, Any]] | None:
    """The head's layers, each MatMul and the Add of its bias made one dense layer, a leading
    transpose to NHWC and a trailing softmax dropped; None if a node is none of _LAYERS."""
    layers: list[tuple[str, Any]] = []
    try:
        for node in nodes:
            layer = walk.layer(node)
            if layer and layer[0] == "add" and layers and layers[-1][0] == "matmul":
                layers[-1] = ("fc", dataclasses.replace(layers[-1][1], bias=layer[1]))
            elif layer:
                layers.append(layer)
    except UserError:
        return None
    return [(k, w) for i, (k, w) in enumerate(layers) if (i, k) != (0, "to_nhwc")]


def _describe(nodes: list[Any]) -> str:
    shown = [f"{n.op_type} {n.name!r}" for n in nodes if n.op_type != "Constant"]
    listed = ", ".join(shown[:6]) + (", …" if len(shown) > 6 else "")
    return (
        f"the head after pool5 is not VGG's top (flatten and three dense layers): left its "
        f"{len(shown)} nodes ({listed}); converted the conv layers only"
    )


def _top(walk: _Walk, nodes: list[Any], channels: int) -> tuple[list[SourceLayer], str]:
    """VGG's three dense layers after pool5 (fc6's input in vggjax's NHWC order), and what was
    left: the head's nodes, described, with no dense layers, if it is not VGG's top."""
    layers = _head_layers(walk, nodes)
    softmax = bool(layers) and layers[-1][0] == "softmax"
    layers = layers[:-1] if softmax else layers
    if layers is None or tuple(kind for kind, _ in layers) != _TOP:
        return [], _describe(nodes)
    fcs = [layer for kind, layer in layers if kind == "fc"]
    if layers[0][1] == "NCHW":  # torch's flatten: fc6's inputs in (channel, y, x) order
        fcs[0].kernel = torch_fc(walk.path, fcs[0].name, fcs[0].kernel.T, channels)
    return fcs, "the softmax after fc8 (the converted net gives logits)" * softmax


def read_onnx(path: str) -> OnnxNet:
    """The VGG in the ONNX file at `path`, in vggjax's layout; UserError naming the first node
    that does not fit, or why the file is not an ONNX graph."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path)
    except (OSError, DecodeError, ValueError) as e:
        raise UserError(f"{path} is not a readable ONNX file ({type(e).__name__}: {e})") from None
    walk = _Walk(path, model)
    nodes = list(model.graph.node)
    convs, stages, end = _features(walk, nodes)
    fcs, left = _top(walk, nodes[end:], convs[-1].kernel.shape[-1])
    return OnnxNet(convs, fcs, stages, left)
