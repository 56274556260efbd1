"""Names what images show: a trained net's top classes, with their probabilities, per image file.

  python -m vggjax.predict --weights=torchvision:vgg16 cat.jpg photos/ [--output=top5.jsonl]

`--weights` is anything `load_pretrained` reads: a published net's name, a `vggjax.convert`
output or a training workdir. Folders are searched for image files (by suffix); a file that
cannot be decoded is named and skipped. The images run through the inference engine as
evaluation's protocols (`evaluators.classification`): `centre_crop` (the torchvision/Keras
protocol: smallest side 256, the central 224 crop), `dense` (the whole image at one scale Q,
mirrored too; Sect. 3.2) or `multi_scale_dense` (dense averaged over several Q);
`--dense_alignment` places their score map (`options.DENSE_ALIGNMENTS`). The engine logs its
progress every 30 s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import app, flags

from vggjax import classes, cli, options, pretrained, recipe
from vggjax.data import sources
from vggjax.errors import UserError
from vggjax.evaluators import classification

PROTOCOLS = ("centre_crop", "dense", "multi_scale_dense")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
)

FLAGS = flags.FlagValues()  # predict's own, not absl's global registry (cli.parse_flags)
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "A published net (torchvision:vgg16), or a workdir.", flag_values=FLAGS
)
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "centre_crop", PROTOCOLS, "How each image is tested.", flag_values=FLAGS
)
_SCALES = flags.DEFINE_list(
    "scales",
    [],
    "Test scales Q of the dense protocols (default: see `predict`).",
    flag_values=FLAGS,
)
_ALIGNMENT = flags.DEFINE_enum(
    "dense_alignment",
    "top_left",
    list(options.DENSE_ALIGNMENTS),
    "Where the dense protocols' score map lies on an image (config.eval.dense_alignment).",
    flag_values=FLAGS,
)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes per image.", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Write JSON lines here instead of printing.", flag_values=FLAGS
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "Images per batch (a multiple of the device count).", flag_values=FLAGS
)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """`top`: each decodable file's top classes, in the order the files were named;
    `skipped`: the files that could not be decoded."""

    top: dict[str, list[classes.Prediction]]
    skipped: list[str]


class _Files(sources.Source):
    """Image files as a source (label 0, the path as id); an unreadable one decodes as nothing."""

    def __init__(self, files: Sequence[str], class_names: Sequence[str]):
        self.files, self.class_names = tuple(files), tuple(class_names)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        return {"data": data, "label": 0, "id": path}


def image_files(paths: Sequence[str]) -> list[str]:
    """The files named, and the image files (by suffix) under the folders named, sorted."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES
            )
        elif os.path.exists(path):
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if not files:
        raise UserError(f"no image files in {', '.join(paths)}")
    return files


def _config(
    net: dict[str, Any],
    path: str,
    protocol: str,
    scales: Sequence[int],
    batch_size: int,
    dense_alignment: str,
) -> ml_collections.ConfigDict:
    """The evaluation config of the net at `path` (`net`: its config.json) testing `protocol`
    at `scales`."""
    pretrained.check_classifier(net, path)
    config = pretrained.with_net_of(recipe.paper_recipe(net["model"]), path)
    q = classification.centre_crop_scale(config.crop_size)
    if protocol == "centre_crop" and scales:
        raise UserError("--scales is for the dense protocols; centre_crop's scale is fixed")
    if protocol == "dense" and len(scales) > 1:
        raise UserError("dense tests one scale; multi_scale_dense averages several")
    defaults = {"dense": (q,), "multi_scale_dense": (q - q // 8, q, q + q // 8)}
    config.eval.scales = tuple(scales) or defaults.get(protocol, (q,))
    config.eval.protocols, config.eval.batch_size = (protocol,), batch_size
    config.eval.dense_alignment = dense_alignment
    return config


def predict(
    weights: str,
    paths: Sequence[str],
    protocol: str = "centre_crop",
    k: int = 5,
    scales: Sequence[int] = (),
    batch_size: int = 32,
    dense_alignment: str = "top_left",
) -> Predictions:
    """Each image's `k` most probable classes: what `python -m vggjax.predict` prints.

    Args:
      weights: what `load_pretrained` reads (`"torchvision:vgg16"`, a workdir).
      paths: image files, and folders searched (recursively) for image files.
      protocol: one of PROTOCOLS.
      k: classes per image.
      scales: test scales Q of `dense` (one) or `multi_scale_dense` (several). Default: Q =
        256 for 224 crops (in proportion else), and Q ± Q/8 too for multi_scale_dense.
      batch_size: images per batch, a multiple of the local device count.
      dense_alignment: where the dense protocols' score map lies on an image, one of
        `options.DENSE_ALIGNMENTS` (top_left: the paper's).

    Returns:
      `Predictions`: the top classes of each decodable file, and the files skipped.

    Raises:
      UserError: no such file, no image files, weights without a classifier, a protocol or
        scales that do not fit.
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    options.one_of("dense_alignment", dense_alignment, options.DENSE_ALIGNMENTS)
    path = pretrained.resolve(weights)
    net = pretrained.read_config(path)
    config = _config(net, path, protocol, scales, batch_size, dense_alignment)
    names = classes.of_config(net)
    files = image_files(paths)
    runner = classification.protocols_engine(config)
    _, variables, _ = pretrained.load_pretrained(path, runner.replicated)
    data = runner.run_source(variables, _Files(files, [c.id for c in names]), weights)
    posteriors = classification.protocol_posteriors(data["raw"], config)
    key = f"dense_q{config.eval.scales[0]}" if protocol == "dense" else protocol
    top = classes.top_k(posteriors[key], names, k, from_logits=False)
    return Predictions(
        top={f: t for f, t, bad in zip(files, top, data["bad"]) if not bad},
        skipped=[f for f, bad in zip(files, data["bad"]) if bad],
    )


def _write(result: Predictions, output: str | None) -> None:
    """The top classes as text on stdout, or as JSON lines in `output`; the skipped files on
    stderr."""
    if output:
        with open(output, "w", encoding="utf-8") as f:
            for file, top in result.top.items():
                rows = [p._asdict() for p in top]
                f.write(json.dumps({"file": file, "top": rows}) + "\n")
    else:
        for file, top in result.top.items():
            print(file)
            for p in top:
                print(f"  {p.probability:7.2%}  {p.name}  ({p.id}, #{p.index})")
    if result.skipped:
        count = len(result.skipped) + len(result.top)
        print(
            f"vggjax.predict: skipped {len(result.skipped)} of {count} files that could not be "
            f"decoded: {', '.join(result.skipped)}",
            file=sys.stderr,
        )


def main(argv: list[str]) -> None:
    """The command line, its flags parsed (`cli.parse_flags`): argv[1:] are the images."""
    paths = argv[1:]
    if not _WEIGHTS.value:
        raise UserError("--weights is required: a published net (torchvision:vgg16) or a workdir")
    if not paths:
        raise UserError("name the image files or folders to classify")
    try:
        scales = [int(q) for q in _SCALES.value]
    except ValueError as e:
        raise UserError(f"--scales must be integers, got {','.join(_SCALES.value)}") from e
    result = predict(
        _WEIGHTS.value,
        paths,
        _PROTOCOL.value,
        _TOP_K.value,
        scales,
        _BATCH_SIZE.value,
        _ALIGNMENT.value,
    )
    _write(result, _OUTPUT.value)


if __name__ == "__main__":
    cli.run(
        "vggjax.predict",
        app.run,
        main,
        flags_parser=lambda argv: cli.parse_flags(argv, FLAGS, positional=True),
    )
