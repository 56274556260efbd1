"""The command line: python -m vggjax.convert --from=SOURCE FILE --model=NAME --output=DIR
[--verify], or --from=SOURCE NAME --output=DIR for a published net by name (hub.py). A UserError
(a bad argument included) ends it with one line on stderr and status 2 (vggjax.cli); anything
else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import logging
from typing import NoReturn

from vggjax import (
    cli,
    convert,  # the package: its functions looked up at call time, as tests patch
)
from vggjax.errors import UserError

PROGRAM = "vggjax.convert"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not a usage dump
        raise UserError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m vggjax.convert", description=convert.__doc__.split("\n\n")[0])
    parser.add_argument(
        "file",
        help="the published weight file (.h5, .pth, .safetensors, .caffemodel or .onnx), or a "
        "published net's name, fetched and verified: torchvision's vgg11 … vgg19_bn, "
        "Keras's vgg16, vgg19, vgg16_notop, vgg19_notop, timm's vgg16.tv_in1k …",
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=convert.SOURCES,
        help="whose layout the file is in",
    )
    parser.add_argument(
        "--model",
        help="Table 1 configuration: D (vgg16) or E "
        "(vgg19); A (vgg11) and B (vgg13), and the batch-norm nets (vgg16_bn), "
        "for torchvision, timm and ONNX. Required for a file (an ONNX graph's is inferred from its "
        "convs); a published net's name knows its own",
    )
    parser.add_argument(
        "--input_convention",
        choices=convert.INPUT_CONVENTIONS,
        help="--from=onnx: what the graph's input is, folded into conv1_1: torchvision's "
        "normalisation of RGB/255, caffe's BGR minus the mean pixel, unit (RGB/255), or raw "
        "(the default: the converted net takes the graph's own input values, in NHWC)",
    )
    parser.add_argument("--output", required=True, help="new or empty directory to write")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare the converted net's "
        "outputs with the source library's own (needs that library)",
    )
    return parser


def _convert(args: argparse.Namespace) -> None:
    """Converts, and with --verify compares; status 1 if the nets differ."""
    if args.source == "onnx":  # no published graphs by name; the model is inferred
        path, model = args.file, args.model
    else:
        path, model = convert.weight_file(args.source, args.file, args.model)
    run = convert.reference(args.source, path) if args.verify else None
    config = convert.convert(args.source, path, model, args.output, args.input_convention)
    pretrained = config["pretrained"]
    top = "with the top" if pretrained["include_top"] else "conv layers only"
    raw = pretrained["input"] == convert.RAW_INPUT
    print(
        f"Wrote VGG {config['model']} ({top}) from {path} to {args.output}; input: "
        + (pretrained["input"] if raw else f"RGB on 0-255 minus {tuple(config['mean_rgb'])}")
    )
    if pretrained.get("left"):
        print(f"Left: {pretrained['left']}")
    if run is None:
        return
    difference, what = convert.verify(args.output, run)
    print(
        f"Compared with {args.source}: max relative difference {difference:.2e} "
        f"over the {what} (limit {convert.MAX_RELATIVE_DIFFERENCE:.0e})"
    )
    if not difference < convert.MAX_RELATIVE_DIFFERENCE:
        cli.fail(PROGRAM, f"the converted net differs from {args.source}'s by {difference:.2e}", 1)


def _main(argv: list[str] | None = None) -> None:
    _convert(_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (default sys.argv) and converts; user errors end in one line, status 2."""
    cli.one_line_errors(PROGRAM, _main, argv)


if __name__ == "__main__":
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax narrates every read-only restore
    cli.run(PROGRAM, _main)
