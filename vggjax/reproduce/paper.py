"""The paper's classification experiments (Sect. 4.1–4.4) as one grid, with its numbers.

`grid` builds the plan of Tables 3–6 for any recipe: net A (and A-LRN) from scratch at the
smallest S; B–E initialised from A (Sect. 3.1); S = 384 fine-tuned from the S = 256 net; scale
jittering from the S = 384 net; each tested densely at Q = S (Table 3) and at three Q
(Table 4), D and E also with multi-crop and both (Table 5); the fusions of Table 6. The plan
files (configs/plans/) say which configs and scales; the paper's numbers are here, once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from vggjax.reproduce.plan import Evaluation, Fusion, Plan, Row, Run, Table

SCRATCH = ("A", "A-LRN")  # trained from random weights; the deeper nets start from A
KINDS = ("fixed", "large", "jittered")  # S = 256, S = 384, S ∈ [256; 512]
# (net, training scale) → the run it starts from (Sect. 3.1).
TRAINING: dict[tuple[str, str], tuple[str, str] | None] = {
    **{(net, "fixed"): None for net in SCRATCH},
    **{(net, "fixed"): ("A", "fixed") for net in "BCDE"},
    **{(net, "large"): (net, "fixed") for net in "CDE"},
    **{(net, "jittered"): (net, "large") for net in "CDE"},
}
MULTI_CROP = ("D", "E")  # Table 5's nets (trained with jittered S)

# The paper's top-1 and top-5 val. error (%), by (net, training scale).
TABLE_3 = {
    ("A", "fixed"): (29.6, 10.4),
    ("A-LRN", "fixed"): (29.7, 10.5),
    ("B", "fixed"): (28.7, 9.9),
    ("C", "fixed"): (28.1, 9.4),
    ("C", "large"): (28.1, 9.3),
    ("C", "jittered"): (27.3, 8.8),
    ("D", "fixed"): (27.0, 8.8),
    ("D", "large"): (26.8, 8.7),
    ("D", "jittered"): (25.6, 8.1),
    ("E", "fixed"): (27.3, 9.0),
    ("E", "large"): (26.9, 8.7),
    ("E", "jittered"): (25.5, 8.0),
}
TABLE_4 = {
    ("B", "fixed"): (28.2, 9.6),
    ("C", "fixed"): (27.7, 9.2),
    ("C", "large"): (27.8, 9.2),
    ("C", "jittered"): (26.3, 8.2),
    ("D", "fixed"): (26.6, 8.6),
    ("D", "large"): (26.5, 8.6),
    ("D", "jittered"): (24.8, 7.5),
    ("E", "fixed"): (26.9, 8.7),
    ("E", "large"): (26.7, 8.6),
    ("E", "jittered"): (24.8, 7.5),
}
# By (net, protocol), all trained with jittered S and tested at three Q.
TABLE_5 = {
    ("D", "multi_scale_dense"): (24.8, 7.5),
    ("D", "multi_crop"): (24.6, 7.5),
    ("D", "multi_crop_dense"): (24.4, 7.2),
    ("E", "multi_scale_dense"): (24.8, 7.5),
    ("E", "multi_crop"): (24.6, 7.4),
    ("E", "multi_crop_dense"): (24.4, 7.1),
}
# Table 6: fusion → its nets, and by protocol the paper's top-1 val, top-5 val and top-5 test
# error. The ILSVRC submission's multi-scale D had only its FC layers fine-tuned; the grid's
# has all of them (the paper's post-submission nets).
FUSIONS = {
    "ilsvrc-7": (
        (("D", "fixed"), ("D", "large"), ("D", "jittered"), ("C", "fixed"), ("C", "large"))
        + (("E", "fixed"), ("E", "large"))
    ),
    "D+E": (("D", "jittered"), ("E", "jittered")),
}
TABLE_6 = {
    ("ilsvrc-7", "multi_scale_dense"): (24.7, 7.5, 7.3),
    ("D+E", "multi_scale_dense"): (24.0, 7.1, 7.0),
    ("D+E", "multi_crop"): (23.9, 7.2, None),
    ("D+E", "multi_crop_dense"): (23.7, 6.8, 6.8),
}


def scale_label(scale: tuple[int, int]) -> str:
    """ "256", or "256-512" for jittered S: as configs/*.py's argument names a training scale."""
    s_min, s_max = scale
    return str(s_min) if s_min == s_max else f"{s_min}-{s_max}"


@dataclasses.dataclass(frozen=True)
class Scales:
    """A grid's training scales S (the paper's 256, 384 and [256; 512], or smaller ones) and
    the step between its test scales Q for a fixed S (Sect. 4.2: {S − 32, S, S + 32})."""

    fixed: int = 256
    large: int = 384
    jittered: tuple[int, int] = (256, 512)
    q_step: int = 32

    def train(self, kind: str) -> tuple[int, int]:
        """(S_min, S_max) of training scale `kind`."""
        return self.jittered if kind == "jittered" else (getattr(self, kind),) * 2

    def label(self, kind: str) -> str:
        return scale_label(self.train(kind))

    def single(self, kind: str) -> int:
        """Table 3's Q: S, or (S_min + S_max) / 2 for jittered S."""
        s_min, s_max = self.train(kind)
        return (s_min + s_max) // 2

    def multi(self, kind: str) -> tuple[int, ...]:
        """Table 4's Q: {S − step, S, S + step}, or {S_min, (S_min + S_max) / 2, S_max}."""
        s_min, s_max = self.train(kind)
        if s_min == s_max:
            return (s_min - self.q_step, s_min, s_min + self.q_step)
        return (s_min, self.single(kind), s_max)


# How a plan trains net `net` at training scale `kind` (S = `scale`): (config file, overrides).
Recipe = Callable[[str, str, tuple[int, int]], tuple[str, dict[str, Any]]]


def _name(net_kind: tuple[str, str], scales: Scales) -> str:
    net, kind = net_kind
    return f"{net}-{scales.label(kind)}"


def _runs(recipe: Recipe, scales: Scales, from_net_a: bool) -> tuple[Run, ...]:
    runs = []
    for (net, kind), start in TRAINING.items():
        if start == ("A", "fixed") and not from_net_a:
            start = None
        config, overrides = recipe(net, kind, scales.train(kind))
        init_from = _name(start, scales) if start else ""
        runs.append(Run(_name((net, kind), scales), config, overrides, init_from))
    return tuple(runs)


def _evaluations(scales: Scales) -> tuple[Evaluation, ...]:
    evaluations = []
    for net, kind in TRAINING:
        if net in SCRATCH:  # Table 3 only
            protocols, q = ("dense",), (scales.single(kind),)
        else:
            protocols, q = ("dense", "multi_scale_dense"), scales.multi(kind)
            if net in MULTI_CROP and kind == "jittered":
                protocols += ("multi_crop", "multi_crop_dense")
        name = _name((net, kind), scales)
        evaluations.append(Evaluation(name, name, protocols, q))
    return tuple(evaluations)


def _tables(scales: Scales) -> tuple[Table, ...]:
    def row(key, result, paper):
        return Row(key[0], _name(key, scales), result, paper)

    table_3 = [row(k, f"dense_q{scales.single(k[1])}", v) for k, v in TABLE_3.items()]
    table_4 = [row(k, "multi_scale_dense", v) for k, v in TABLE_4.items()]
    table_5 = [row((net, "jittered"), p, v) for (net, p), v in TABLE_5.items()]
    table_6 = [Row(name, name, p, v) for (name, p), v in TABLE_6.items()]
    return (
        Table(3, "ConvNet performance at a single test scale", "scales", tuple(table_3)),
        Table(4, "ConvNet performance at multiple test scales", "scales", tuple(table_4)),
        Table(5, "ConvNet evaluation techniques comparison", "methods", tuple(table_5)),
        Table(6, "Multiple ConvNet fusion results", "fusions", tuple(table_6)),
    )


def grid(recipe: Recipe, scales: Scales = Scales(), from_net_a: bool = True) -> Plan:
    """Tables 3–6 as a plan: every net and training scale of the paper, trained by `recipe`;
    B–E at the smallest S start from net A, or (`from_net_a` False) from random weights."""
    fusions = tuple(
        Fusion(name, tuple(_name(key, scales) for key in members))
        for name, members in FUSIONS.items()
    )
    return Plan(_runs(recipe, scales, from_net_a), _evaluations(scales), fusions, _tables(scales))


# configs/demo.py's 64-pixel crops: S = 72 (as 256 is to 224), 112 (as 384) and [72; 144].
SMALL_SCALES = Scales(fixed=72, large=112, jittered=(72, 144), q_step=8)


def small_grid(budgets: dict[str, dict[str, Any]], **data: Any) -> Plan:
    """The grid on configs/demo.py's recipe (nets at 1/8 width, 128-wide FC layers, 64-pixel
    crops, no dropout, Glorot's initialisation) at SMALL_SCALES, batch 32: the paper's
    experiment shrunk for a CPU. `budgets` gives each run's budget overrides by how it starts
    ("scratch", or the training scale: "fixed", "large", "jittered"); `data` the data set's
    fields (e.g. dataset="folder", data_dir=...). As in the paper, S = 384's and jittered S's
    fine-tunes copy every layer at learning rate 1e-3."""

    def recipe(net: str, kind: str, scale: tuple[int, int]) -> tuple[str, dict[str, Any]]:
        overrides = {"model": net, **data, "train_scale": scale}
        overrides.update(eval_scale=(scale[0] + scale[1]) // 2, batch_size=32)
        overrides.update(budgets["scratch" if net in SCRATCH else kind])
        if kind != "fixed":
            overrides.update(learning_rate=1e-3, init_layers="all")
        return "configs/demo.py", overrides

    return grid(recipe, SMALL_SCALES)
