"""Search strategies (ask/tell over genomes). No torch; the strategies' libraries load on first use."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schedsearch.search.genetic import EcadGenetic
    from schedsearch.search.optuna_sampler import OptunaStrategy
    from schedsearch.search.predictor import PredictorSearch
    from schedsearch.search.pymoo_nsga import PymooNSGA

__all__ = ["EcadGenetic", "OptunaStrategy", "PredictorSearch", "PymooNSGA"]

_MODULES = {
    "EcadGenetic": "schedsearch.search.genetic",
    "OptunaStrategy": "schedsearch.search.optuna_sampler",
    "PredictorSearch": "schedsearch.search.predictor",
    "PymooNSGA": "schedsearch.search.pymoo_nsga",
}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
