"""A plan as data: the training runs of an experiment, its evaluations and fusions, the tables
they fill; and the stages that carry it out, in dependency order.

A plan file (configs/plans/*.py) has `get_plan(ARG)` returning a `Plan`. Each stage is a
command a user could type (`Stage.command`): `python -m vggjax.main` for a training run or an
evaluation, `python -m vggjax.reproduce.fuse` for a fusion. Each works in a folder of its own
under the plan's root (`runs/NAME`, `evals/NAME`, `fusions/NAME`), and is finished when that
folder holds its results file.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
from collections.abc import Sequence
from typing import Any

from vggjax import options
from vggjax.errors import UserError

PYTHON = "python"  # how a printed command names the interpreter


@dataclasses.dataclass(frozen=True)
class Run:
    """A training run: `python -m vggjax.main --config=CONFIG --config.FIELD=VALUE ...`,
    initialised from the run named `init_from` (Sect. 3.1), if any."""

    name: str
    config: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: str = ""


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """`--mode=eval` of run `run`'s net with `protocols` at the test scales `scales` (Q)."""

    name: str
    run: str
    protocols: tuple[str, ...]
    scales: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Fusion:
    """Sect. 4.4: the posteriors of `evaluations` averaged, per protocol they all have."""

    name: str
    evaluations: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Row:
    """A table's row: result `result` (a row `name` of eval_results.json, e.g. "dense_q256")
    of evaluation or fusion `source`, beside the paper's top-1 and top-5 val. error (%) and,
    for Table 6, its top-5 test error (None: the paper gives none)."""

    label: str
    source: str
    result: str
    paper: tuple[float | None, ...]


@dataclasses.dataclass(frozen=True)
class Table:
    """One of the paper's tables: its number, title and rows; `layout` is how the paper lays
    it out ("scales": Tables 3 and 4; "methods": 5; "fusions": 6)."""

    number: int
    title: str
    layout: str
    rows: tuple[Row, ...]


LAYOUTS = ("scales", "methods", "fusions")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `python -m vggjax.reproduce` carries out: runs, evaluations, fusions; and tables."""

    runs: tuple[Run, ...]
    evaluations: tuple[Evaluation, ...]
    fusions: tuple[Fusion, ...] = ()
    tables: tuple[Table, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a plan: `python -m MODULE --workdir=ROOT/NAME ARGS`, finished when
    `ROOT/NAME/DONE` exists. `device`: it runs where the launcher puts the nets (a fusion runs
    where reproduce runs: it only averages files)."""

    name: str  # its folder under the root: runs/A-256, evals/A-256, fusions/D+E
    module: str
    args: tuple[str, ...]
    done: str
    needs: tuple[str, ...]
    device: bool

    def workdir(self, root: str) -> str:
        return os.path.join(root, self.name)

    def command(self, root: str, python: str = PYTHON) -> list[str]:
        return [python, "-m", self.module, f"--workdir={self.workdir(root)}", *self.args]


def flag_value(value: Any) -> str:
    """A config value as `--config.FIELD=VALUE` takes it: a tuple as "(64, 72)" (its strings
    quoted), anything else as str() writes it."""
    if isinstance(value, (tuple, list)):
        items = [f'"{v}"' if isinstance(v, str) else flag_value(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    return str(value)


def _config_args(run: Run, overrides: dict[str, Any], extra: Sequence[str]) -> tuple[str, ...]:
    return (
        f"--config={run.config}",
        *(f"--config.{field}={flag_value(value)}" for field, value in overrides.items()),
        *extra,
    )


def _run_stage(run: Run, root: str, extra: Sequence[str]) -> Stage:
    overrides = dict(run.overrides)
    if run.init_from:
        overrides["init_from"] = os.path.join(root, "runs", run.init_from)
    needs = (f"runs/{run.init_from}",) if run.init_from else ()
    return Stage(
        f"runs/{run.name}",
        "vggjax.main",
        _config_args(run, overrides, extra),
        "results.json",
        needs,
        True,
    )


def _eval_stage(evaluation: Evaluation, run: Run, root: str, extra: Sequence[str]) -> Stage:
    net = os.path.join(root, "runs", run.name)
    args = _config_args(
        run,
        {
            **run.overrides,
            "eval.checkpoints": (net,),
            "eval.protocols": evaluation.protocols,
            "eval.scales": evaluation.scales,
        },
        extra,
    )
    needs = (f"runs/{run.name}",)
    return Stage(
        f"evals/{evaluation.name}", "vggjax.main", ("--mode=eval", *args), "eval_results.json",
        needs, True,
    )  # fmt: skip


def _fusion_stage(fusion: Fusion, root: str) -> Stage:
    needs = tuple(f"evals/{name}" for name in fusion.evaluations)
    args = tuple(os.path.join(root, name) for name in needs)
    return Stage(
        f"fusions/{fusion.name}", "vggjax.reproduce.fuse", args, "eval_results.json", needs, False
    )


def stages(plan: Plan, root: str, extra: Sequence[str] = ()) -> list[Stage]:
    """The plan's stages, each after the stages it needs (otherwise in the plan's order);
    `extra` (`--config.FIELD=VALUE`, e.g. the data's folder) ends every net's command line."""
    runs = {run.name: run for run in plan.runs}
    unordered = [
        *(_run_stage(run, root, extra) for run in plan.runs),
        *(_eval_stage(e, runs[e.run], root, extra) for e in plan.evaluations),
        *(_fusion_stage(f, root) for f in plan.fusions),
    ]
    by_name = {stage.name: stage for stage in unordered}
    ordered: dict[str, Stage] = {}

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        if stage.name in path:
            raise UserError(f"the plan's runs start from each other in a cycle: {stage.name}")
        if stage.name not in ordered:
            for need in stage.needs:
                visit(by_name[need], (*path, stage.name))
            ordered[stage.name] = stage

    for stage in unordered:
        visit(stage, ())
    return list(ordered.values())


def select(all_stages: Sequence[Stage], only: Sequence[str]) -> list[Stage]:
    """The stages named in `only` and those they need (all stages when `only` is empty)."""
    by_name = {stage.name: stage for stage in all_stages}
    unknown = [name for name in only if name not in by_name]
    if unknown:
        raise UserError(
            f"--only names no stage of the plan: {', '.join(unknown)}; its stages are "
            f"{', '.join(by_name)}"
        )
    wanted: set[str] = set()
    todo = list(only)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(by_name[name].needs)
    return [stage for stage in all_stages if not only or stage.name in wanted]


def _check_names(plan: Plan) -> None:
    for kind, items in (
        ("run", plan.runs),
        ("evaluation", plan.evaluations),
        ("fusion", plan.fusions),
    ):
        names = [item.name for item in items]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UserError(f"the plan names two {kind}s {', '.join(twice)}")
        for name in names:
            if not name or "/" in name or name.startswith("."):
                raise UserError(f"a {kind} of the plan is named {name!r}: use a folder name")


def _check_references(plan: Plan) -> None:
    runs = {run.name for run in plan.runs}
    evaluations = {e.name for e in plan.evaluations}
    refs = [
        *((f"run {r.name}'s init_from", r.init_from, runs) for r in plan.runs if r.init_from),
        *((f"evaluation {e.name}", e.run, runs) for e in plan.evaluations),
        *((f"fusion {f.name}", name, evaluations) for f in plan.fusions for name in f.evaluations),
        *(
            (f"Table {t.number}", row.source, evaluations | {f.name for f in plan.fusions})
            for t in plan.tables
            for row in t.rows
        ),
    ]
    for where, name, known in refs:
        if name not in known:
            raise UserError(f"{where} names {name!r}, which the plan does not have")


def check(plan: Any, where: str) -> Plan:
    """`plan` if it is a sound Plan, else a UserError naming the first fault."""
    if not isinstance(plan, Plan):
        raise UserError(f"{where}: get_plan() returned {type(plan).__name__}, not a Plan")
    _check_names(plan)
    _check_references(plan)
    for run in plan.runs:
        if not os.path.isfile(run.config.split(":", 1)[0]):
            raise UserError(f"run {run.name}'s config file {run.config!r} not found")
    for evaluation in plan.evaluations:
        for protocol in evaluation.protocols:
            options.one_of(
                f"evaluation {evaluation.name}'s protocol", protocol, options.EVAL_PROTOCOLS
            )
    for table in plan.tables:
        options.one_of(f"Table {table.number}'s layout", table.layout, LAYOUTS)
    return plan


def load(path: str) -> Plan:
    """`get_plan(ARG)` of a plan file, `path` being `FILE` or `FILE:ARG`, checked."""
    file, *arg = path.split(":", 1)
    if not os.path.isfile(file):
        raise UserError(f"plan file {file!r} not found; the plans are in configs/plans/")
    get_plan = runpy.run_path(file).get("get_plan")
    if get_plan is None:
        raise UserError(f"plan file {file!r} has no get_plan()")
    try:
        plan = get_plan(*arg)
    except TypeError as e:  # an argument it does not take
        raise UserError(f"{path}: {e}") from None
    return check(plan, path)
