"""schedsearch: find the best inference schedules (solver steps, cache reuse) of a diffusion model, offline.

Public API. Names that need torch are imported lazily, so `schedsearch.spaces` and `schedsearch.search` stay
importable (and testable) without it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from schedsearch.spaces.schedule import Schedule, ScheduleError, SolverPlan, SolverStep, load_schedule, save_schedule

__version__ = "0.1.0"

_LAZY = {
    "load_model": "schedsearch.runtime.models",
    "initial_noise": "schedsearch.runtime.models",
    "sample": "schedsearch.runtime.sampler",
    "apply_schedule": "schedsearch.runtime.apply",
    "export_front": "schedsearch.results.export",
    "run_search": "schedsearch.study",
    "StudyConfig": "schedsearch.config",
    "SchedsearchError": "schedsearch.errors",
    "UserInputError": "schedsearch.errors",
    "run_study": "schedsearch.search.loop",
    "Budget": "schedsearch.search.base",
    "ResultStore": "schedsearch.results.store",
    "write_report": "schedsearch.results.report",
}

__all__ = [
    "Schedule",
    "ScheduleError",
    "SolverPlan",
    "SolverStep",
    "load_schedule",
    "save_schedule",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'schedsearch' has no attribute {name!r}")
