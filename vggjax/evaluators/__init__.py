"""Evaluators chosen by name, as in big_vision's `evaluators/`: one module per job.

Each module's `run(config, workdir)` tests what the config names, writes its tables and files
in the workdir (process 0) and returns its results:

- `classification`: the paper's test protocols, Tables 3–6 (Sect. 3.2, 4);
- `localisation`: Appendix A's two protocols, Tables 8 and 9;
- `features`: Appendix B's descriptors of a data set;
- `transfer`: Appendix B's linear SVMs on them, scored.

They load when asked for by name, so a command line or a program pays only for its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import ml_collections

from vggjax.errors import UserError

EVALUATORS = ("classification", "localisation", "features", "transfer")

Evaluator = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]


def get(name: str) -> Evaluator:
    """The `run` of evaluator `name` (one of EVALUATORS)."""
    if name not in EVALUATORS:
        raise UserError(f"no evaluator {name!r}; there are {', '.join(EVALUATORS)}")
    return importlib.import_module(f"{__name__}.{name}").run


def for_mode(mode: str, config: ml_collections.ConfigDict) -> str:
    """The evaluator a command line's `--mode` names: `eval` tests a net as its objective asks
    (class scores: classification; a box: localisation), the others are evaluators' names."""
    if mode == "eval":
        return "classification" if config.objective == "classification" else "localisation"
    return mode
