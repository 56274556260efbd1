"""Published VGG weights → a vggjax checkpoint: Keras .h5, torchvision .pth, timm or torchvision
.safetensors, the authors' Caffe .caffemodel, and ONNX graphs (PyTorch's and tf2onnx's exports).

    python -m vggjax.convert --from=keras vgg16_weights_tf_dim_ordering_tf_kernels.h5 \
        --model=D --output=DIR [--verify]
    python -m vggjax.convert --from=keras vgg16 --output=DIR   # the published file, by name

DIR (a folder, or gs://bucket/path) becomes a workdir that `vggjax.load_pretrained` and `restore_params` (so also
`--config.init_from`) read: checkpoints/0/state holds the parameters, config.json the model, its
input mean and where the weights came from. Each source's input convention is folded exactly into
conv1_1 (layout.py), so the converted net takes what every vggjax net takes, RGB on 0–255 minus a
mean RGB. Their batch-norm nets (vgg16_bn, ...) convert too: each BN's scale and shift go to the
conv's `<conv>_bn` parameters, its running mean and variance to `batch_stats`.

No file's code is run: Keras files are read through their h5 attributes as Keras's own legacy
loader reads them (keras.py), PyTorch's through an unpickler that builds nothing but dicts and
tensors and safetensors from its JSON header (torch.py), .caffemodel files from the protobuf wire
format (caffe.py), ONNX graphs with the `onnx` package, no runtime (onnx.py). hub.py fetches, verifies and caches the published files by name, verify.py is
`--verify`, __main__.py the command line.
"""

from __future__ import annotations

import os
from typing import Any

from vggjax import checkpoints, classes, models, storage
from vggjax.convert.caffe import read_caffemodel
from vggjax.convert.hub import WEIGHTS, converted, weight_file
from vggjax.convert.keras import read_keras_h5
from vggjax.convert.layout import (
    INPUT_CONVENTIONS,
    SOURCES,
    SourceLayer,
    build_variables,
    fold_input_convention,
    split_keras_layers,
    torch_layers,
)
from vggjax.convert.onnx import read_onnx
from vggjax.convert.torch import file_format, read_tensors
from vggjax.convert.verify import MAX_RELATIVE_DIFFERENCE, reference, verify
from vggjax.errors import UserError

RAW_INPUT = "the ONNX graph's own input values, in NHWC (no input convention folded)"

__all__ = [
    "INPUT_CONVENTIONS",
    "MAX_RELATIVE_DIFFERENCE",
    "RAW_INPUT",
    "SOURCES",
    "WEIGHTS",
    "SourceLayer",
    "convert",
    "converted",
    "file_format",
    "main",
    "read_layers",
    "reference",
    "verify",
    "weight_file",
]


def read_layers(source: str, path: str) -> tuple[list[SourceLayer], list[SourceLayer]]:
    """The conv and FC layers of a published weight file, in vggjax's layout."""
    if source not in SOURCES:
        raise UserError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "caffe":
        return read_caffemodel(path)
    if source == "onnx":
        net = read_onnx(path)
        return net.convs, net.fcs
    found = file_format(path)
    if (source == "keras") != (found == "hdf5"):
        raise UserError(
            f"{path} is {'an' if found == 'hdf5' else 'not an'} HDF5 file; "
            f"--from=keras reads Keras's .h5 files, --from=torchvision and "
            f"--from=timm .pth and .safetensors"
        )
    if source == "keras":
        return split_keras_layers(read_keras_h5(path))
    return torch_layers(path, read_tensors(path, found), source)


def _input(source: str, convention: str | None) -> str:
    """The convention folded into conv1_1: the source's own, or the one named for an ONNX graph
    (none, "raw", by default)."""
    if source != "onnx":
        if convention is not None:
            raise UserError(
                f"--input_convention is for --from=onnx; a {source} file's input is known"
            )
        return source
    if convention not in INPUT_CONVENTIONS + (None,):
        raise UserError(
            f"--input_convention must be one of {', '.join(INPUT_CONVENTIONS)}, got {convention!r}"
        )
    return convention or "raw"


def _read(
    source: str, path: str, model_name: str | None, convention: str
) -> tuple[list[SourceLayer], list[SourceLayer], str, dict[str, Any]]:
    """The file's conv and FC layers, the model they are, and what they add to config.json's
    `pretrained` record: the input they take, and for ONNX what of the graph was left."""
    whose = f"{convention}'s" if source == "onnx" else "the source's"
    folded = f"RGB on 0-255 minus mean_rgb ({whose} convention folded into conv1_1)"
    if source != "onnx":
        return (*read_layers(source, path), model_name, dict(input=folded))
    net = read_onnx(path)
    record = dict(input=RAW_INPUT if convention == "raw" else folded)
    record.update(input_convention=convention, left=net.left)
    return net.convs, net.fcs, net.model_name(path, model_name), record


def convert(
    source: str,
    path: str,
    model_name: str | None,
    output: str,
    input_convention: str | None = None,
) -> dict[str, Any]:
    """A published weight file as a vggjax workdir that `load_pretrained` and `init_from` read.

    Args:
      source: the library the file is from (one of SOURCES): it fixes the layout and the
        input convention folded into conv1_1.
      path: the weight file (a published net's name goes through `weight_file` first).
      model_name: the Table 1 net the file holds (`D`, `vgg16`, `vgg16_bn`); its width, FC
        size, classes and crop are read off the weights' shapes. For an ONNX graph, None
        infers it from the conv stages.
      output: a new or empty folder, or a gs:// path.
      input_convention: for an ONNX graph, what its input is (INPUT_CONVENTIONS), folded into
        conv1_1; by default "raw": the net takes the graph's own input values, in NHWC.

    Returns:
      The config.json written beside the checkpoint: the model fields, the mean RGB the net
      now subtracts, a `pretrained` record (source, file, include_top; for ONNX the convention
      and what of the graph was `left`) and, for a 1,000-class top, ILSVRC-2012's `classes`
      (ids and names, `vggjax.classes`).

    Raises:
      UserError: `output` is not empty, or the file is not of `source`'s format, is cut off,
        or holds another net than `model_name` (the message names the first layer that
        does not fit).
    """
    folder = storage.at(output)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--output {output} exists and is not an empty directory")
    convention = _input(source, input_convention)
    convs, fcs, model_name, record = _read(source, path, model_name, convention)
    model, variables = build_variables(path, model_name, convs, fcs)
    mean = fold_input_convention(variables["params"], convention)
    # What the weights' shapes tell: without the top (`_notop`), only what the convs do.
    parts = ("conv", "fc", "fc8") if fcs else ("conv",)
    config = {field: getattr(model.spec, field) for field in models.fields_fixing(*parts)}
    config["mean_rgb"] = list(mean)
    if fcs and model.spec.num_classes == len(classes.imagenet()):  # every published top
        config["classes"] = classes.to_json(classes.imagenet())
    config["pretrained"] = dict(
        source=source,
        file=os.path.basename(path),
        include_top=bool(fcs),
        **record,
    )
    checkpoints.save_params(output, variables)
    storage.write_json(folder / checkpoints.CONFIG_FILE, config)
    return config


def main(argv: list[str] | None = None) -> None:
    """`python -m vggjax.convert`, callable in-process (imported only when called: runpy warns
    when it runs a __main__ module that is already imported)."""
    from vggjax.convert.__main__ import main as command_line

    command_line(argv)
