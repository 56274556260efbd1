"""Source layers → vggjax's parameter tree, and each source's input convention folded into conv1_1.

The readers give `SourceLayer`s with kernels already in vggjax's layout (HWIO, FC (in, out) with
fc6's input flattened NHWC); here they are matched to a Table 1 model, whose width, FC size,
classes and crop are read off their shapes. Every vggjax net takes RGB on 0–255 minus a mean RGB:

- Keras and the Caffe release itself: BGR minus [103.939, 116.779, 123.68] → conv1_1's input
  channels reversed; mean RGB (123.68, 116.779, 103.939).
- torchvision, timm: RGB/255 normalised by mean m and std s → conv1_1's input channels divided
  by 255·s, since (x/255 − m)/s = (x − 255m)/(255s); mean RGB 255·m.

An ONNX graph does not say which it takes: `--input_convention` names one of these ("caffe",
"torchvision"), "unit" (RGB/255: divided by 255, mean 0) or "raw" (nothing folded, mean 0: the
net takes the graph's own input values).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any

import numpy as np

from vggjax import models
from vggjax.errors import UserError

SOURCES = ("keras", "torchvision", "timm", "caffe", "onnx")
INPUT_CONVENTIONS = ("torchvision", "caffe", "unit", "raw")
# Each source's own convention; an ONNX graph's is named by the user (INPUT_CONVENTIONS).
SOURCE_CONVENTIONS = {
    "keras": "caffe",
    "caffe": "caffe",
    "torchvision": "torchvision",
    "timm": "torchvision",
}
KERAS_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)
# The names of the three FC layers in each PyTorch layout. timm stores fc6 and fc7 as convs.
TORCH_FC_NAMES = {
    "torchvision": ("classifier.0", "classifier.3", "classifier.6"),
    "timm": ("pre_logits.fc1", "pre_logits.fc2", "head.fc"),
}
_TORCH_NORM_STATS = ("running_mean", "running_var")


@dataclasses.dataclass
class SourceLayer:
    """A conv or FC layer of the file, its kernel already in vggjax's layout: HWIO or (in, out)."""

    name: str  # as the file names it, for messages
    kernel: np.ndarray
    bias: np.ndarray
    # The batch norm after a conv (torchvision's and timm's vgg*_bn): weight, bias, running_mean,
    # running_var, as named in the file.
    norm: dict[str, np.ndarray] | None = None


def torch_fc(path: str, name: str, weight: np.ndarray, in_channels: int) -> np.ndarray:
    """A torch FC weight (out, C·k·k) flattened NCHW, or timm's conv form (out, C, k, k), as
    vggjax's (k·k·C, out) flattened NHWC. Caffe's FC weights are laid out as torch's."""
    out = weight.shape[0]
    window = math.isqrt(weight.size // max(out * in_channels, 1))
    if weight.ndim not in (2, 4) or out * in_channels * window**2 != weight.size:
        raise UserError(
            f"{path}: {name}.weight has shape {weight.shape}, which does not take the "
            f"{in_channels} channels of the layer before it"
        )
    return weight.reshape(out, in_channels, window, window).transpose(2, 3, 1, 0).reshape(-1, out)


def _torch_layer_tensors(
    path: str, tensors: dict[str, np.ndarray], source: str
) -> dict[str, dict[str, np.ndarray]]:
    """A state dict grouped by layer ({"features.0": {"weight": …, "bias": …}}), every tensor
    checked to belong to a VGG of `source`'s layout and every layer to be complete."""
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
            raise UserError(
                f"{path}: unexpected tensor {key}; a {source} VGG has features.N "
                f"(convs, and batch norms in the _bn nets) and {', '.join(fc_names)}"
            )
        layers.setdefault(layer, {})[kind] = value
    for layer, weights in layers.items():
        normed = any(k in weights for k in _TORCH_NORM_STATS)
        for kind in ("weight", "bias") + _TORCH_NORM_STATS * normed:
            if kind not in weights:
                raise UserError(f"{path}: {layer}.{kind} is missing")
    return layers


def torch_layers(
    path: str, tensors: dict[str, np.ndarray], source: str
) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv layers (`features.N`, by N) and FC layers of a torchvision or timm state dict."""
    fc_names = TORCH_FC_NAMES[source]
    layers = _torch_layer_tensors(path, tensors, source)
    convs: list[SourceLayer] = []
    conv_names = [k for k in layers if k not in fc_names]
    for layer in sorted(conv_names, key=lambda k: int(k.split(".")[1])):  # features.N by N
        weight = layers[layer]["weight"]
        if "running_mean" in layers[layer]:  # a batch norm: belongs to the conv just before it
            if not convs or convs[-1].norm is not None:
                raise UserError(f"{path}: batch norm {layer} follows no conv layer")
            convs[-1].norm = layers[layer]
            continue
        if weight.ndim != 4:
            raise UserError(
                f"{path}: {layer}.weight has shape {weight.shape}, not a conv "
                f"kernel (out, in, h, w)"
            )
        convs.append(SourceLayer(layer, weight.transpose(2, 3, 1, 0), layers[layer]["bias"]))
    missing = [n for n in fc_names if n not in layers]
    if 0 < len(missing) < len(fc_names):
        vgg_name = models.FC_LAYERS[fc_names.index(missing[0])]
        raise UserError(f"{path}: FC layer {missing[0]} ({vgg_name}) is missing")
    fcs = []
    in_channels = convs[-1].kernel.shape[-1] if convs else 0
    for layer in fc_names if not missing else ():
        kernel = torch_fc(path, layer, layers[layer]["weight"], in_channels)
        fcs.append(SourceLayer(layer, kernel, layers[layer]["bias"]))
        in_channels = kernel.shape[1]
    return convs, fcs


def split_keras_layers(layers: list[SourceLayer]) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """Keras's layers split into the convs and the dense layers after them (already HWIO and
    (in, out), with fc6's input flattened NHWC: the same layout as vggjax)."""
    convs = list(itertools.takewhile(lambda layer: layer.kernel.ndim == 4, layers))
    return convs, layers[len(convs) :]


def bn_name(config: str) -> str | None:
    """The name of Table 1 column `config` with batch norm (vgg16_bn for D), if it has one."""
    return next((name for name, c in models.BATCH_NORM_NETS.items() if c == config), None)


def _check_layers(
    path: str, model_name: str, convs: list[SourceLayer], fcs: list[SourceLayer]
) -> tuple[str, bool, list[str]]:
    """UserError naming the first way the layers' batch norms or counts do not fit `model_name`;
    else its Table 1 configuration, whether it has batch norm, and its conv layers' names."""
    config, batch_norm = models.resolve_name(model_name)
    normed = [layer.name for layer in convs if layer.norm is not None]
    if normed and not batch_norm:
        raise UserError(
            f"{path} has batch norm layers after its convs (after {normed[0]}): "
            f"convert it with --model={bn_name(config) or 'vgg16_bn'}"
        )
    if batch_norm and len(normed) != len(convs):
        raise UserError(
            f"{path}: --model={model_name} has a batch norm after every conv, but "
            f"{next(layer.name for layer in convs if layer.norm is None)} has none"
        )
    names = [
        layer.name for layer in models.layer_table(models.ModelSpec(config)) if layer.kind == "conv"
    ]
    if len(convs) != len(names):
        found = f" ({convs[0].name} … {convs[-1].name})" if convs else ""
        raise UserError(
            f"{path} has {len(convs)} conv layers{found}; model {config} has "
            f"{len(names)} ({names[0]} … {names[-1]})"
        )
    if fcs and len(fcs) != len(models.FC_LAYERS):
        raise UserError(
            f"{path} has {len(fcs)} dense layers after the convs ({fcs[0].name} … "
            f"{fcs[-1].name}); VGG's top has 3 (fc6, fc7, fc8)"
        )
    return config, batch_norm, names


def _top_sizes(path: str, convs: list[SourceLayer], fcs: list[SourceLayer]) -> dict[str, int]:
    """num_classes, fc_width and crop_size read off the FC layers' shapes (none without a top)."""
    if not fcs:
        return {}
    fan_in, channels = fcs[0].kernel.shape[0], convs[-1].kernel.shape[-1]
    window = math.isqrt(fan_in // channels)
    if window**2 * channels != fan_in:
        raise UserError(
            f"{path}: fc6 ({fcs[0].name}) has {fan_in} inputs, not a square map "
            f"of the last conv's {channels} channels"
        )
    return dict(
        num_classes=fcs[2].kernel.shape[1], fc_width=fcs[0].kernel.shape[1], crop_size=32 * window
    )


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32, copy=False)


def _batch_norm(path: str, layer: SourceLayer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `<conv>_bn` params (scale, bias) and batch_stats (mean, var) of the BN after `layer`."""
    norm = layer.norm
    if any(norm[k].shape != layer.bias.shape for k in ("weight",) + _TORCH_NORM_STATS):
        raise UserError(
            f"{path}: the batch norm after {layer.name} does not have "
            f"{layer.bias.shape[0]} channels like the conv"
        )
    return (
        {"scale": _f32(norm["weight"]), "bias": _f32(norm["bias"])},
        {"mean": _f32(norm["running_mean"]), "var": _f32(norm["running_var"])},
    )


def build_variables(
    path: str, model_name: str, convs: list[SourceLayer], fcs: list[SourceLayer]
) -> tuple[models.VGG, dict[str, Any]]:
    """The vggjax model the layers fit (width, FC size, classes and crop read off their shapes)
    and its variables (params; batch_stats for BN nets); UserError naming the first layer that
    does not fit `model_name`."""
    config, batch_norm, names = _check_layers(path, model_name, convs, fcs)
    model = models.create_model(
        bn_name(config) if batch_norm else config,
        width=convs[0].kernel.shape[-1] / 64,
        **_top_sizes(path, convs, fcs),
    )
    expected = models.abstract_variables(model)["params"]
    params, stats = {}, {}
    for name, layer in zip(names + list(models.FC_LAYERS), convs + fcs):
        got = (layer.kernel.shape, layer.bias.shape)
        want = (expected[name]["kernel"].shape, expected[name]["bias"].shape)
        if got != want:
            raise UserError(
                f"{path}: {layer.name} ({name}) has kernel and bias shapes {got} in "
                f"vggjax's layout, but model {config} needs {want} there"
            )
        params[name] = {"kernel": _f32(layer.kernel), "bias": _f32(layer.bias)}
        if layer.norm is not None:
            params[name + "_bn"], stats[name + "_bn"] = _batch_norm(path, layer)
    return model, {"params": params, **({"batch_stats": stats} if stats else {})}


def fold_input_convention(
    params: dict[str, dict[str, np.ndarray]], convention: str
) -> tuple[float, float, float]:
    """Makes conv1_1 take RGB on 0–255 minus the returned mean RGB, exactly (in place), for a
    net that took `convention`'s input (one of INPUT_CONVENTIONS, or a source of
    SOURCE_CONVENTIONS); "raw" changes nothing."""
    convention = SOURCE_CONVENTIONS.get(convention, convention)
    kernel = params["conv1_1"]["kernel"]  # (h, w, in = 3, out)
    if convention == "caffe":  # Caffe's BGR order: reverse the input channels
        params["conv1_1"]["kernel"] = np.ascontiguousarray(kernel[:, :, ::-1])
        return KERAS_MEAN_BGR[::-1]
    if convention == "raw":
        return (0.0, 0.0, 0.0)
    torch = convention == "torchvision"
    scale = 255.0 * np.asarray(TORCH_STD_RGB if torch else (1.0,) * 3)[:, None]
    params["conv1_1"]["kernel"] = (kernel / scale).astype(np.float32)
    return tuple(round(255.0 * m, 6) for m in (TORCH_MEAN_RGB if torch else (0.0,) * 3))
