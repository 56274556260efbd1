"""Dense evaluation's alignments measured: each `config.eval.dense_alignment`'s top-1 error at
each test scale Q and over them (issue 25, item 6).

    python benchmarks/dense_alignment.py --config=configs/demo.py --workdir=RUN \\
        --config.dataset=folder --config.data_dir=/work/data/mnist \\
        --config.eval.scales='(32, 36, 40)' [--alignments=top_left,centred] [--every=N]

The net of RUN (its latest checkpoint; the net's fields and mean RGB from its config.json) is
tested on the config's 'val' split as `--mode=eval` does, with each of `--alignments` (default
all of `options.DENSE_ALIGNMENTS`) in one pass: each image is decoded and rescaled once, and
each bucket's program computes every alignment's dense posteriors. The protocols are the config's
dense ones (dense, multi_scale_dense, multi_crop_dense; multi-crop itself has no alignment and
is computed once). Prints a Markdown table of top-1 errors (a row per protocol and Q, a column
per alignment) and one JSON line.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import app, flags, logging

from vggjax import checkpoints, cli, engine, main, options, pretrained
from vggjax.data import sources
from vggjax.errors import UserError
from vggjax.evaluators import classification

DENSE_PROTOCOLS = ("dense", "multi_scale_dense", "multi_crop_dense")

FLAGS = flags.FlagValues()  # the script's own; main's (--config, --workdir) parse the rest
_ALIGNMENTS = flags.DEFINE_list(
    "alignments", list(options.DENSE_ALIGNMENTS), "The alignments measured.", flag_values=FLAGS
)
_EVERY = flags.DEFINE_integer(
    "every", 1, "Test every N-th image of the split only (a quicker figure).", flag_values=FLAGS
)


class Every(sources.Source):
    """Every `step`-th element of `source` (all classes, where a prefix would hold the first)."""

    def __init__(self, source: sources.Source, step: int):
        self.source, self.step, self.class_names = source, step, source.class_names

    def __len__(self) -> int:
        return -(-len(self.source) // self.step)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[index * self.step]


def heads(config: Any) -> dict[str, engine.Head]:
    """A dense head per alignment (named after it), and multi-crop if a protocol needs it."""
    out = {
        alignment: classification.posterior_heads(config.eval.flip, alignment)["dense"]
        for alignment in _ALIGNMENTS.value
    }
    if "multi_crop_dense" in config.eval.protocols:
        out["multi_crop"] = classification.posterior_heads()["multi_crop"]
    return out


def plan(config: Any) -> dict[int, tuple[str, ...]]:
    """Every head at every Q."""
    return dict.fromkeys(config.eval.scales, tuple(heads(config)))


def errors(config: Any, data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Protocol (dense_qQ per scale) → alignment → top-1 error."""
    table: dict[str, dict[str, float]] = {}
    for alignment in _ALIGNMENTS.value:
        raw = {
            (head if head == "multi_crop" else "dense", q): p
            for (head, q), p in data["raw"].items()
            if head in (alignment, "multi_crop")
        }
        for name, p in classification.protocol_posteriors(raw, config).items():
            top1, _ = classification.error_rates(p, data["labels"], data["bad"])
            table.setdefault(name, {})[alignment] = top1
    return table


def markdown(table: dict[str, dict[str, float]]) -> str:
    alignments = _ALIGNMENTS.value
    rows = ["| protocol | " + " | ".join(alignments) + " |", "|---" * (1 + len(alignments)) + "|"]
    for name, row in table.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * row[a]:.2f}" for a in alignments) + " |")
    return "\n".join(rows)


def measure(parsed: tuple[Any, frozenset[str]]) -> None:
    """The table and the JSON line, from main's parsed flags (`main.parse_flags`)."""
    workdir = main.FLAGS.workdir
    if not workdir:
        raise UserError("--workdir is required: the run whose net is tested")
    config = pretrained.with_net_of(parsed[0], workdir)
    protocols = tuple(p for p in config.eval.protocols if p in DENSE_PROTOCOLS)
    config.eval.protocols = protocols or ("dense", "multi_scale_dense")
    options.validate(config)
    for alignment in _ALIGNMENTS.value:
        options.one_of("--alignments", alignment, options.DENSE_ALIGNMENTS)
    source = sources.make_source(config, "val")
    classification.check_classes(config, source)
    source = Every(source, max(1, _EVERY.value))
    runner = engine.Engine.from_config(config, plan(config), heads(config))
    start = time.monotonic()
    variables = checkpoints.restore_params(workdir, runner.replicated)
    data = runner.run_source(variables, source, workdir)
    table = errors(config, data)
    print(markdown(table))
    summary = dict(
        workdir=workdir,
        dataset=config.dataset,
        scales=list(config.eval.scales),
        flip=config.eval.flip,
        every=source.step,
        images=len(source),
        seconds=round(time.monotonic() - start, 1),
        top1_error=table,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    cli.run(
        "dense_alignment",
        app.run,
        measure,
        flags_parser=lambda argv: main.parse_flags(cli.parse_flags(argv, FLAGS, known_only=True)),
    )
