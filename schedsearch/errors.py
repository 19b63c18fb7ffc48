"""The error classes of schedsearch, and the one rule that sorts them: whose move is it?

- `UserInputError`: the user can fix it (a bad option, a schedule for another model, a missing weight file, an
  unknown study). The CLI prints `error: <field>: <problem>; <fix>` and exits 2, with no traceback.
- any other `SchedsearchError` (and every other exception): a bug or an environment failure the user cannot fix by
  changing their input. The CLI prints one line saying it is an internal error to report, and the traceback only
  with `--debug`. A bug is never shown as the user's mistake.

`UserInputError` is also a `ValueError`, so code (and tests) that catch `ValueError` around validation keep working.
No imports beyond the standard library: every layer, torch-free ones included, raises these.
"""

from __future__ import annotations

__all__ = ["InternalError", "SchedsearchError", "UnavailableError", "UserInputError"]


class SchedsearchError(Exception):
    """Base of every error schedsearch raises on purpose."""


class UserInputError(SchedsearchError, ValueError):
    """Input the user can correct. `field` names the option, file field or setting; `fix` says what to do."""

    def __init__(self, field: str, problem: str | None = None, fix: str = "") -> None:
        if problem is None:  # one preformatted message, "<field>: <problem>; <fix>"
            field, _, problem = field.partition(": ") if ": " in field else ("input", "", field)
            message = f"{field}: {problem}"
        else:
            message = f"{field}: {problem}; {fix}" if fix else f"{field}: {problem}"
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(message)


class UnavailableError(UserInputError, RuntimeError):
    """Something the input asks for is not on this machine (weights, a package, a file): the fix says how to get it.
    Still the user's move, so it exits 2 like other input errors."""


class InternalError(SchedsearchError, RuntimeError):
    """A state that should be impossible: a bug to report, not something the user typed."""
