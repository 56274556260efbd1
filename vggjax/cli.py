"""What every vggjax command line shares: `python -m vggjax.main` (and the `vggjax` console
script), `python -m vggjax.data.stats`, `python -m vggjax.convert` and `python -m vggjax.predict`.

`run` applies the programs' CPU settings first (`backend.tune_cpu(restart=True)`), then ends a user mistake
(a `UserError`, a bad flag included) with one line, `PROGRAM: error: MESSAGE`, on stderr and
exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags, logging

from vggjax import backend
from vggjax.errors import UserError


def run(program: str, main: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """`main(*args, **kwargs)` as the program `program`: backend.tune_cpu(restart=True) first,
    then `one_line_errors`."""
    backend.tune_cpu(restart=True)
    one_line_errors(program, main, *args, **kwargs)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOnly(pylogging.Filter):
    """INFO lines from vggjax's own modules only (orbax, grain and jax narrate every save, worker
    and backend probe), unless debugging: --verbosity=1 shows them all. By the module's path, not
    its name: a checkout called vggjax holds the virtual environment's libraries too."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return (
            record.levelno >= pylogging.WARNING
            or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
            or logging.get_verbosity() >= logging.DEBUG
        )


def show_own_info() -> None:
    """Shows vggjax's own INFO lines (its progress) and, of other libraries', warnings only, as
    `python -m vggjax.main` does; a program training through vggjax may call it too."""
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_OwnInfoOnly())


def one_line_errors(program: str, main: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    """`main(*args, **kwargs)`, a UserError ending it with one line and exit status 2: `run`
    without the program settings, for a command line called in-process."""
    try:
        main(*args, **kwargs)
    except UserError as e:
        fail(program, str(e))


def fail(program: str, message: str, status: int = 2) -> NoReturn:
    """Ends the program with `PROGRAM: error: MESSAGE` on stderr and exit status `status`."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(
    argv: list[str],
    flag_values: flags.FlagValues,
    known_only: bool = False,
    positional: bool = False,
) -> list[str]:
    """absl's parser for a program's own `flag_values`, then for absl's own flags (--verbosity,
    --help) in its global registry: a bad flag, or an argument that is not one, raises a
    UserError instead of a usage dump. What is left is returned: with `known_only`, unknown
    flags and other arguments; with `positional`, arguments that are not flags (files).

    A program keeps its flags out of absl's global registry so that importing it defines nothing
    in the user's process (their own `--config` or `--workdir` would clash)."""
    try:
        rest = flags.FLAGS(flag_values(argv, known_only=True), known_only=True)
        if not known_only:
            flag_values(rest)  # what is left: absl's one-line error for an unknown flag
    except flags.Error as e:
        raise UserError(str(e)) from e
    if len(rest) > 1 and not (known_only or positional):
        raise UserError(f"unexpected arguments {' '.join(rest[1:])}; all options are --flags")
    return rest
