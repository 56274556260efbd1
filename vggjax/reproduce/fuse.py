"""Fuses finished evaluations (Sect. 4.4, Table 6): their posteriors averaged, without recomputing.

    python -m vggjax.reproduce.fuse --workdir=runs/fused runs/eval-d runs/eval-e

Each argument is the workdir of a `--mode=eval` run (its eval_results.json and predictions.npz,
on the same images). Nets of different depths fuse here, which one `--mode=eval` cannot (its
nets share a config). WORKDIR/eval_results.json gets a row per protocol every evaluation has,
in the layout of `--mode=eval`'s, and the fused evaluations' nets and scales as `members`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from vggjax import cli, options, storage
from vggjax.errors import UserError

FLAGS = flags.FlagValues()  # fuse's own, not absl's global registry (cli.parse_flags)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where eval_results.json of the fusion goes.", flag_values=FLAGS
)

RESULTS = "eval_results.json"


def _member(folder: str) -> dict[str, Any]:
    """What a fused evaluation was: its net, training scale and test scales."""
    result = storage.read_json(
        storage.at(folder) / RESULTS, f"{folder} holds no {RESULTS}: evaluate it first"
    )
    scales = sorted({q for row in result["results"] for q in row["test_scales"]})
    return dict(
        evaluation=folder,
        model=result["model"],
        train_scale=result["train_scale"],
        test_scales=scales,
        dataset=result["dataset"],
    )


def fuse(folders: Sequence[str], workdir: str) -> dict[str, Any]:
    """Fuses the evaluations in `folders`; writes and returns WORKDIR/eval_results.json."""
    from vggjax.evaluators import classification  # jax: after the flags are checked

    if len(folders) < 2:
        raise UserError(f"fusing takes two evaluations or more, got {len(folders)}")
    members = [_member(folder) for folder in folders]
    fused = classification.fuse_predictions(
        [os.path.join(folder, "predictions.npz") for folder in folders]
    )
    model = " & ".join(member["model"] for member in members)
    rows = [
        dict(
            name=name,
            model=model,
            protocol="fusion",
            method=options.EVAL_PROTOCOLS["dense" if name.startswith("dense_q") else name],
            test_scales=[int(name[len("dense_q") :])] if name.startswith("dense_q") else [],
            top1_error=top1,
            top5_error=top5,
        )
        for name, (top1, top5) in fused.items()
    ]
    summary = dict(model=model, dataset=members[0]["dataset"], members=members, results=rows)
    storage.write_json(storage.at(workdir) / RESULTS, summary)
    print(
        classification.text_table(
            ("fusion", "evaluation method", "top-1 val. error (%)", "top-5 val. error (%)"),
            [
                (
                    r["name"],
                    r["method"],
                    f"{100 * r['top1_error']:.1f}",
                    f"{100 * r['top5_error']:.1f}",
                )
                for r in rows
            ],
        )
    )
    return summary


def _main(argv: list[str]) -> None:
    if not _WORKDIR.value:
        raise UserError("--workdir is required: where the fusion's eval_results.json goes")
    fuse(argv[1:], _WORKDIR.value)


def run() -> None:
    """`python -m vggjax.reproduce.fuse`."""
    cli.run(
        "vggjax.reproduce.fuse",
        app.run,
        _main,
        flags_parser=lambda argv: cli.parse_flags(argv, FLAGS, positional=True),
    )


if __name__ == "__main__":
    run()
