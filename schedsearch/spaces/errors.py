"""The one error type of schedule data: it names the offending field and how to fix it."""

from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule that cannot run. The message names the offending field and how to fix it."""

    def __init__(self, field_path: str, problem: str, fix: str = "") -> None:
        self.field_path = field_path
        message = f"{field_path}: {problem}"
        super().__init__(f"{message}. {fix}".strip() if fix else message)
