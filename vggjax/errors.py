"""The one exception type for user mistakes.

A bad flag, config value, path or file raises `UserError`; the command lines print its message
in one line and exit with status 2 (`vggjax.cli`). Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in what the user gave, with a message that names it and what is allowed."""


class DivergedError(UserError, FloatingPointError):
    """The loss or gradients became NaN or Inf: the run's settings, not the code, are at fault."""


def require(ok: bool, field: str, allowed: str, value: object) -> None:
    """UserError `{field} must be {allowed}, got {value!r}` unless `ok`."""
    if not ok:
        raise UserError(f"{field} must be {allowed}, got {value!r}")
