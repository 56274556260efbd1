"""A trained net for serving without vggjax: a serialized `jax.export` artifact (StableHLO) and
an ONNX file, each taking uint8 RGB images (NHWC, 0–255) to class probabilities, the mean
subtraction inside, with a JSON file beside them stating that contract (and the class names
when the checkpoint's config.json has them).

  python -m vggjax.export --weights=torchvision:vgg16 --output=DIR [--dense] [--noonnx]

writes DIR/model.stablehlo, DIR/model.onnx and DIR/model.json. The classic form takes
crop_size² crops; the dense one (`--dense`, Sect. 3.2) images of any size of at least
crop_size², its class score map averaged over the image before the softmax. The batch size
is free in both, as are the height and width in the dense form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vggjax import checkpoints, cli, models, pretrained, storage
from vggjax.errors import UserError

PROGRAM = "vggjax.export"
FILES = {"stablehlo": "model.stablehlo", "onnx": "model.onnx", "contract": "model.json"}
# Lowered for each, so one artifact serves on any of them (the convs are plain: winograd="off").
PLATFORMS = ("cpu", "cuda", "tpu")
KNOWN_PLATFORMS = (*PLATFORMS, "rocm")  # jax.export's names
# ONNX opset 17 (IR version 8): read by onnxruntime ≥ 1.14 and most other runtimes.
ONNX_OPSET, ONNX_IR_VERSION = 17, 8

FLAGS = flags.FlagValues()  # export's own, not absl's global registry (cli.parse_flags)
_WEIGHTS = flags.DEFINE_string(
    "weights",
    None,
    "A workdir (training's or vggjax.convert's) or a published net's name (torchvision:vgg16).",
    flag_values=FLAGS,
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "A new or empty directory to write.", flag_values=FLAGS
)
_DENSE = flags.DEFINE_bool(
    "dense",
    False,
    "The dense form: images of any size ≥ crop_size² (Sect. 3.2).",
    flag_values=FLAGS,
)
_ONNX = flags.DEFINE_bool("onnx", True, "Also write the ONNX file.", flag_values=FLAGS)
_PLATFORMS = flags.DEFINE_list(
    "platforms", list(PLATFORMS), "Where the StableHLO artifact may run.", flag_values=FLAGS
)


def serving_net(model: models.VGG) -> models.VGG:
    """`model` with plain convolutions (no Winograd form), portable to any backend."""
    return model.clone(spec=dataclasses.replace(model.spec, winograd="off"))


def probabilities(
    model: models.VGG,
    variables: dict[str, Any],
    preprocess: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    dense: bool,
) -> jax.Array:
    """What the artifacts compute: uint8 images to class probabilities (N, classes); dense, the
    softmax of the score map's average over the image (the evaluators' dense protocol, unflipped)."""
    scores = model.apply(variables, preprocess(images), dense=dense).astype(jnp.float32)
    return jax.nn.softmax(scores.mean((1, 2)) if dense else scores)


def input_shape(crop_size: int, dense: bool) -> tuple[Any, ...]:
    """The artifact's input shape: a symbolic batch; dense, symbolic sides of at least crop_size."""
    if not dense:
        (batch,) = jax.export.symbolic_shape("batch")
        return batch, crop_size, crop_size, 3
    least = [f"height >= {crop_size}", f"width >= {crop_size}"]
    return *jax.export.symbolic_shape("batch, height, width", constraints=least), 3


def export_stablehlo(
    model: models.VGG,
    variables: dict[str, Any],
    preprocess: Callable[[jax.Array], jax.Array],
    dense: bool,
    platforms: Sequence[str] = PLATFORMS,
) -> jax.export.Exported:
    """`probabilities` as a `jax.export` artifact; `.serialize()` gives the file's bytes."""
    net = serving_net(model)
    serve = jax.jit(lambda images: probabilities(net, variables, preprocess, images, dense))
    shape = jax.ShapeDtypeStruct(input_shape(model.crop_size, dense), jnp.uint8)
    return jax.export.export(serve, platforms=tuple(platforms))(shape)


def contract(
    model: models.VGG,
    mean_rgb: Sequence[float],
    dense: bool,
    files: dict[str, str],
    classes: Any = None,
) -> dict[str, Any]:
    """The JSON beside the artifacts: what they take and give, and the class names if known."""
    crop = model.crop_size
    side = {"min": crop} if dense else crop
    result = {
        "form": "dense" if dense else "classic",
        "input": {
            "dtype": "uint8",
            "layout": "NHWC",
            "channels": "RGB",
            "range": [0, 255],
            "batch": "any",
            "height": side,
            "width": side,
            "preprocessing": f"inside: minus the mean RGB {list(mean_rgb)}",
        },
        "output": {
            "dtype": "float32",
            "shape": ["batch", model.num_classes],
            "values": (
                "class probabilities: the softmax of the class scores"
                + (" averaged over the image" if dense else "")
            ),
        },
        "files": files,
        "model": model.spec.model,
    }
    if classes is not None:
        result["classes"] = classes
    return result


def _onnx() -> Any:
    """The onnx package, an optional extra: imported only to write an ONNX file."""
    try:
        import onnx
    except ImportError as e:
        raise UserError(
            "the ONNX file needs the onnx package: pip install vggjax[export] (or --noonnx)"
        ) from e
    return onnx


class _OnnxGraph:
    """The nodes and weights of an ONNX graph as it is written, one named value after another."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes: list[Any] = []
        self.weights: list[Any] = []

    def add(self, op: str, *inputs: str, output: str | None = None, **attributes: Any) -> str:
        """Node `op` on `inputs`; its output's name (`output`, or one made up)."""
        name = output or f"{op.lower()}_{len(self.nodes)}"
        node = self.onnx.helper.make_node(op, list(inputs), [name], name=name, **attributes)
        self.nodes.append(node)
        return name

    def weight(self, name: str, value: Any) -> str:
        """A float32 constant of the graph; its name."""
        array = np.asarray(value, np.float32)
        self.weights.append(self.onnx.numpy_helper.from_array(array, name))
        return name


def _onnx_conv(graph: _OnnxGraph, x: str, name: str, kernel: Any, bias: Any, pad: int) -> str:
    """An HWIO conv kernel (stride 1, `pad` on each side) as ONNX's Conv on NCHW."""
    kernel = np.asarray(kernel).transpose(3, 2, 0, 1)  # OIHW
    w, b = graph.weight(f"{name}/kernel", kernel), graph.weight(f"{name}/bias", bias)
    return graph.add("Conv", x, w, b, kernel_shape=list(kernel.shape[2:]), pads=[pad] * 4)


def _onnx_layer(
    graph: _OnnxGraph, x: str, layer: models.Layer, variables: dict[str, Any], dense: bool
) -> str:
    """One row of the layer table on NCHW values, as models.VGG computes it in inference."""
    if layer.kind == "pool":
        return graph.add("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    if layer.kind == "lrn":  # ONNX divides alpha by size; Krizhevsky's formula does not
        p = models.LRN_PARAMS
        return graph.add(
            "LRN", x, size=p["size"], alpha=p["alpha"] * p["size"], beta=p["beta"], bias=p["k"]
        )
    params = variables["params"][layer.name]
    if layer.kind == "conv":
        x = _onnx_conv(graph, x, layer.name, params["kernel"], params["bias"], layer.kernel // 2)
        if layer.name + "_bn" in variables["params"]:
            bn, stats = (variables[k][layer.name + "_bn"] for k in ("params", "batch_stats"))
            values = [bn["scale"], bn["bias"], stats["mean"], stats["var"]]
            names = [graph.weight(f"{layer.name}_bn/{i}", v) for i, v in enumerate(values)]
            x = graph.add("BatchNormalization", x, *names, epsilon=models.BN_EPSILON)
        return graph.add("Relu", x)
    kernel = np.asarray(models.fc_as_conv(params["kernel"], layer.kernel))  # HWIO
    if dense:
        x = _onnx_conv(graph, x, layer.name, kernel, params["bias"], 0)
    else:  # the classic form flattens NHWC; these values are NCHW
        if layer.name == "fc6":
            x = graph.add("Flatten", x, axis=1)
        flat = kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1])
        w, b = (
            graph.weight(f"{layer.name}/kernel", flat),
            graph.weight(f"{layer.name}/bias", params["bias"]),
        )
        x = graph.add("Gemm", x, w, b)
    return x if layer.name == "fc8" else graph.add("Relu", x)


def export_onnx(
    model: models.VGG, variables: dict[str, Any], mean_rgb: Sequence[float], dense: bool
) -> Any:
    """`probabilities` as an ONNX model (float32 inside): uint8 NHWC images `images`, a dynamic
    batch (and dense, dynamic sides), to class probabilities `probabilities`."""
    graph = _OnnxGraph()
    onnx = graph.onnx
    x = graph.add("Cast", "images", to=onnx.TensorProto.FLOAT)
    x = graph.add("Sub", x, graph.weight("mean_rgb", mean_rgb))
    x = graph.add("Transpose", x, perm=[0, 3, 1, 2])
    for layer in model.layers:
        x = _onnx_layer(graph, x, layer, variables, dense)
    if dense:
        x = graph.add("ReduceMean", x, axes=[2, 3], keepdims=0)
    graph.add("Softmax", x, output="probabilities", axis=1)
    sides = ["height", "width"] if dense else [model.crop_size] * 2
    value = onnx.helper.make_tensor_value_info
    onnx_model = onnx.helper.make_model(
        onnx.helper.make_graph(
            graph.nodes,
            "vggjax",
            [value("images", onnx.TensorProto.UINT8, ["batch", *sides, 3])],
            [value("probabilities", onnx.TensorProto.FLOAT, ["batch", model.num_classes])],
            graph.weights,
        ),
        opset_imports=[onnx.helper.make_opsetid("", ONNX_OPSET)],
        producer_name="vggjax",
    )
    onnx_model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def _net_of(weights: str) -> tuple[models.VGG, dict[str, Any], Callable[..., Any], dict[str, Any]]:
    """load_pretrained's net and its config.json; a UserError if it gives no class scores."""
    path = pretrained.resolve(weights)
    config = checkpoints.read_config(path)
    pretrained.check_classifier(config, weights)  # before the weights are read
    model, variables, preprocess = pretrained.load_pretrained(path)
    return model, variables, preprocess, config


def export(
    weights: str,
    output: str,
    dense: bool = False,
    onnx: bool = True,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, str]:
    """Writes the artifacts of a trained net (see the module's docstring).

    Args:
      weights: what `load_pretrained` reads: a workdir or a published net's name.
      output: a new or empty directory.
      dense: the dense form (images of any size) instead of the classic one (crops).
      onnx: also write the ONNX file (needs the `onnx` package: `pip install vggjax[export]`).
      platforms: where the StableHLO artifact may run (jax.export's platforms).

    Returns:
      The paths written, by kind: "stablehlo", "contract" and (with `onnx`) "onnx".

    Raises:
      UserError: `output` is not empty, an unknown platform, the weights are not a
        classification net with its top, or `onnx` without the onnx package.
    """
    folder = storage.at(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--output {output} exists and is not an empty directory")
    unknown = sorted(set(platforms) - set(KNOWN_PLATFORMS))
    if unknown or not platforms:
        raise UserError(f"--platforms must be some of {', '.join(KNOWN_PLATFORMS)}, got {unknown}")
    if onnx:
        _onnx()  # missing: said before any work
    model, variables, preprocess, config = _net_of(weights)
    files = {"stablehlo": export_stablehlo(model, variables, preprocess, dense, platforms)}
    if onnx:
        files["onnx"] = export_onnx(model, variables, config["mean_rgb"], dense)
    names = {kind: FILES[kind] for kind in files}
    folder.mkdir(parents=True, exist_ok=True)
    for kind, exported in files.items():
        (folder / names[kind]).write_bytes(
            exported.serialize() if kind == "stablehlo" else exported.SerializeToString()
        )
    terms = contract(model, config["mean_rgb"], dense, names, config.get("classes"))
    storage.write_json(folder / FILES["contract"], terms)
    return {kind: str(folder / FILES[kind]) for kind in (*files, "contract")}


def main(argv: list[str]) -> None:
    del argv  # cli.parse_flags refuses arguments that are not flags
    if not _WEIGHTS.value or not _OUTPUT.value:
        raise UserError("--weights and --output are required")
    written = export(_WEIGHTS.value, _OUTPUT.value, _DENSE.value, _ONNX.value, _PLATFORMS.value)
    print("\n".join(f"Wrote {kind}: {path}" for kind, path in written.items()))


if __name__ == "__main__":
    cli.run(PROGRAM, app.run, main, flags_parser=lambda argv: cli.parse_flags(argv, FLAGS))
