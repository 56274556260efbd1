"""ROOT/REPORT.md: the plan's tables as the paper lays them out, measured beside the paper's
numbers, and PNG plots (training curves, error against depth, error against Q).

Every measured number is read from the stages' own files: a run's results.json and config.json,
an evaluation's or fusion's eval_results.json (the plots: the runs' TensorBoard scalars too). A stage not finished
shows "—". The plots need matplotlib (`pip install -e '.[report]'`); without it they are left
out, with one line saying so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from absl import logging

from vggjax import storage
from vggjax.errors import UserError
from vggjax.reproduce.plan import Plan, Table

REPORT = "REPORT.md"
MISSING = "—"


def _read(path: Any) -> dict[str, Any] | None:
    try:
        return storage.read_json(path, "")
    except UserError:  # not written yet: the stage is not finished
        return None


def percent(fraction: float | None) -> str:
    """A measured error as the report shows it (two decimals: the paper's one would hide it)."""
    return MISSING if fraction is None else f"{100 * fraction:.2f}"


def _paper(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def result_row(result: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """The row named `name` of an eval_results.json (None: not measured)."""
    rows = [r for r in (result or {}).get("results", ()) if r["name"] == name]
    return rows[0] if rows else None


def _members(result: dict[str, Any] | None, fallback: str) -> str:
    """Table 6's "combined ConvNet models": (net/S/Q) of each fused evaluation."""
    if not result:
        return fallback
    return ", ".join(
        f"({m['model']}/{m['train_scale']}/{','.join(map(str, m['test_scales']))})"
        for m in result["members"]
    )


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


ERRORS = ("top-1 val. error (%)", "paper", "top-5 val. error (%)", "paper")


def table(t: Table, results: dict[str, dict[str, Any] | None]) -> list[str]:
    """Table `t` in markdown: its rows' measured errors (from `results`, by stage) and the
    paper's, in the paper's columns."""
    rows = []
    for r in t.rows:
        result = results.get(r.source)
        row = result_row(result, r.result)
        errors = [
            percent(row and row["top1_error"]),
            _paper(r.paper[0]),
            percent(row and row["top5_error"]),
            _paper(r.paper[1]),
        ]
        scales = [
            (result or {}).get("train_scale", MISSING),
            ",".join(map(str, row["test_scales"])) if row else MISSING,
        ]
        method = row["method"] if row else MISSING
        if t.layout == "scales":
            rows.append([r.label, *scales, *errors])
        elif t.layout == "methods":
            rows.append([r.label, method, *scales, *errors])
        else:
            rows.append([_members(result, r.label), method, *errors, _paper(r.paper[2])])
    header = {
        "scales": ("ConvNet config. (Table 1)", "train (S)", "test (Q)", *ERRORS),
        "methods": ("ConvNet config. (Table 1)", "evaluation method", "train (S)", "test (Q)")
        + ERRORS,
        "fusions": ("Combined ConvNet models", "evaluation method", *ERRORS, "top-5 test (paper)"),
    }[t.layout]
    return [f"## Table {t.number}: {t.title}", "", *_markdown(header, rows), ""]


def _train_scale(config: dict[str, Any] | None) -> str:
    if not config or "train_scale" not in config:
        return MISSING
    s_min, s_max = config["train_scale"]
    return str(s_min) if s_min == s_max else f"[{s_min};{s_max}]"


def runs_table(plan: Plan, root: str) -> list[str]:
    """Each training run's own validation error at its eval_scale, from its results.json."""
    rows = []
    for run in plan.runs:
        folder = storage.at(root) / "runs" / run.name
        result = _read(folder / "results.json") or {}
        rows.append(
            [
                run.name,
                str(result.get("model", MISSING)),
                _train_scale(_read(folder / "config.json")),
                run.init_from or MISSING,
                str(result.get("step", MISSING)),
                str(result.get("eval_scale", MISSING)),
                percent(result.get("top1_error")),
                percent(result.get("top5_error")),
            ]
        )
    header = ("run", "net", "train (S)", "initialised from", "steps", "Q (crop)", *ERRORS[::2])
    return ["## Training runs", "", *_markdown(header, rows), ""]


def read_results(plan: Plan, root: str) -> dict[str, dict[str, Any] | None]:
    """eval_results.json of each evaluation and fusion, by name (None: not finished)."""
    folders = [("evals", e.name) for e in plan.evaluations]
    folders += [("fusions", f.name) for f in plan.fusions]
    return {
        name: _read(storage.at(root) / kind / name / "eval_results.json") for kind, name in folders
    }


def write(plan: Plan, root: str, title: str) -> str:
    """Writes ROOT/REPORT.md (and its plots); returns its path."""
    from vggjax.reproduce import plots

    results = read_results(plan, root)
    lines = [f"# {title}", ""]
    lines += [
        "Measured: this plan's runs (top-1 and top-5 error on the validation set, %), read from "
        "each stage's results files. Paper: Simonyan & Zisserman (2015), on ILSVRC-2012. "
        f"{MISSING}: not measured yet.",
        "",
    ]
    for t in plan.tables:
        lines += table(t, results)
    lines += runs_table(plan, root)
    figures = plots.draw(plan, root, results)
    lines += [f"![{caption}]({file})\n" for file, caption in figures]
    path = os.path.join(root, REPORT)
    storage.write_text(path, "\n".join(lines))
    logging.info("Wrote %s.", path)
    return path
