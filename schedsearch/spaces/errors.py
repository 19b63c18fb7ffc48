"""The one error type of schedule data: it names the offending field and how to fix it."""

from __future__ import annotations

from schedsearch.errors import UserInputError


class ScheduleError(UserInputError):
    """A schedule that cannot run. The message names the offending field and how to fix it."""

    def __init__(self, field_path: str, problem: str, fix: str = "") -> None:
        self.field_path = field_path
        super().__init__(field_path, problem, fix)
