"""Carrying out a plan's stages on this machine, one after another in dependency order.

A stage whose results file exists is skipped; any other runs as the command it prints, in a
process of its own. A training run resumes from its workdir's latest checkpoint by itself, so
a plan killed mid-run and rerun loses at most one checkpoint interval. SIGTERM (a preempted
machine, a cluster's time limit) goes on to the running stage, which saves a checkpoint and
stops; the plan stops after it, to resume when rerun.
"""

from __future__ import annotations

import contextlib
import ctypes
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

from absl import logging

from vggjax import storage
from vggjax.reproduce.plan import Stage


class Stopped(Exception):
    """A stage ended without its results file: it failed, or was stopped to resume later."""


def shell_line(argv: Sequence[str]) -> str:
    """`argv` as one shell command, values quoted after `--flag=` as launch/common.sh shows
    them (`--config.eval.scales='(64, 72)'`)."""
    words = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        quoted = arg.startswith("--") and eq and shlex.quote(value) != value
        words.append(f"{flag}={shlex.quote(value)}" if quoted else shlex.quote(arg))
    return " ".join(words)


def finished(stage: Stage, root: str) -> bool:
    return (storage.at(stage.workdir(root)) / stage.done).exists()


def _die_with_parent() -> None:
    """In the child: SIGTERM when reproduce dies (killed, even by SIGKILL), so a stage never
    outlives its plan to race the rerun in the same workdir (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def execute(command: Sequence[str]) -> int:
    """Runs `command` in a process of its own, passing SIGTERM on to it; its exit status."""
    child = subprocess.Popen(command, preexec_fn=_die_with_parent)
    previous = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


Executor = Callable[[Sequence[str]], int]


def run_stage(stage: Stage, root: str, command: Sequence[str], executor: Executor) -> None:
    """Runs `command` (how `stage` runs here, or through a launcher); Stopped unless the stage
    then has its results file."""
    logging.info("%s: %s", stage.name, shell_line(command))
    status = executor(command)
    if not finished(stage, root):
        raise Stopped(
            f"{stage.name} ended (exit status {status}) without "
            f"{stage.workdir(root)}/{stage.done}; rerun the same command to resume it"
        )


def run_local(
    stages: Sequence[Stage], root: str, dry_run: bool = False, executor: Executor = execute
) -> None:
    """Runs the stages not finished, in order, each as its printed command; with `dry_run`,
    prints those commands instead."""
    for stage in stages:
        if finished(stage, root):
            logging.info("%s: finished (%s), skipped.", stage.name, stage.done)
            continue
        if dry_run:
            print(shell_line(stage.command(root)))
            continue
        run_stage(stage, root, stage.command(root, sys.executable), executor)
