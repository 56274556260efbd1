"""The report's PNG plots, drawn with matplotlib (the optional `report` extra): training curves
from the runs' TensorBoard scalars, top-1 error against depth (Table 3) and against Q (dense)."""

from __future__ import annotations

import io
from typing import Any

from absl import logging

from vggjax import metrics, models, storage
from vggjax.reproduce import report
from vggjax.reproduce.plan import Plan


def curves(root: str, run: str) -> dict[str, list[tuple[int, float]]]:
    """A run's logged scalars by tag (train/loss, val/top1_error, ...), in step order; a step
    logged again after resuming from a checkpoint counts once, as last logged."""
    out: dict[str, dict[int, float]] = {}
    for tag, step, _, value in metrics.scalar_events(
        storage.at(root) / "runs" / run / "tensorboard"
    ):
        out.setdefault(tag, {})[step] = value
    return {tag: sorted(points.items()) for tag, points in out.items()}


def depth(model: str) -> int:
    """Weight layers of a Table 1 net: its convs and three FC layers (11 for A, 19 for E)."""
    stages = models.TABLE_1[models.resolve_name(model)[0]]
    return sum(layer != "LRN" for stage in stages for layer in stage) + 3


def _legend(axis: Any) -> None:
    if axis.get_legend_handles_labels()[0]:  # a plot of nothing measured yet has none
        axis.legend(fontsize="small", ncol=2)


def _training_curves(plt: Any, plan: Plan, root: str) -> Any:
    figure, (loss, error) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in plan.runs:
        scalars = curves(root, run.name)
        for axis, tag in ((loss, "train/loss"), (error, "val/top1_error")):
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                axis.plot(steps, values, label=run.name, marker="." if axis is error else None)
    loss.set(title="training loss", xlabel="step")
    error.set(title="validation top-1 error (during training)", xlabel="step")
    _legend(error)
    return figure


def _error_vs_depth(plt: Any, plan: Plan, results: dict[str, Any]) -> Any:
    """Table 3's rows: measured top-1 error against depth, one line per training scale."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in next((t.rows for t in plan.tables if t.number == 3), ()):
        result = results.get(row.source)
        measured = report.result_row(result, row.result)
        if measured:
            lines.setdefault(f"S = {result['train_scale']}", []).append(
                (depth(result["model"]), 100 * measured["top1_error"])
            )
    for label, points in lines.items():
        axis.plot(*zip(*sorted(points)), marker="o", label=label)
    axis.set(title="Table 3: error against depth", xlabel="weight layers", ylabel="top-1 error (%)")
    _legend(axis)
    return figure


def _error_vs_q(plt: Any, plan: Plan, results: dict[str, Any]) -> Any:
    """Each evaluation's dense top-1 error at each Q."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for evaluation in plan.evaluations:
        rows = [
            r for r in (results.get(evaluation.name) or {}).get("results", ())
            if r["name"].startswith("dense_q")
        ]  # fmt: skip
        if len(rows) > 1:
            points = sorted((r["test_scales"][0], 100 * r["top1_error"]) for r in rows)
            axis.plot(*zip(*points), marker="o", label=evaluation.name)
    axis.set(
        title="dense evaluation: error against Q", xlabel="test scale Q", ylabel="top-1 error (%)"
    )
    _legend(axis)
    return figure


def draw(plan: Plan, root: str, results: dict[str, Any]) -> list[tuple[str, str]]:
    """Writes the plots beside REPORT.md; returns (file, caption) of each (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.info("No plots: matplotlib is not installed (pip install -e '.[report]').")
        return []
    figures = {
        "training_curves.png": ("Training curves", _training_curves(plt, plan, root)),
        "error_vs_depth.png": ("Error against depth", _error_vs_depth(plt, plan, results)),
        "error_vs_q.png": ("Error against Q", _error_vs_q(plt, plan, results)),
    }
    for file, (_, figure) in figures.items():
        png = io.BytesIO()
        figure.tight_layout()
        figure.savefig(png, format="png", dpi=100)
        plt.close(figure)
        (storage.at(root) / file).write_bytes(png.getvalue())
    return [(file, caption) for file, (caption, _) in figures.items()]
