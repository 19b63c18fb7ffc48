"""Objectives by name: `build_objectives(["fid", "psnr", "macs"], context)` checks everything before work starts.

An objective factory takes the `ObjectiveContext` (the loaded model, the calibration set's reference statistics,
cost tables) and returns an `Objective`. Third parties add their own with `register_objective`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schedsearch.errors import UserInputError
from schedsearch.objectives.base import Objective, ObjectiveUnavailableError

if TYPE_CHECKING:
    from schedsearch.objectives.fid import FeatureStats
    from schedsearch.runtime.models import LoadedModel


@dataclass(frozen=True)
class ObjectiveContext:
    """What objective factories may use. `reference_stats(extractor_name)` returns (and caches) the FID reference
    statistics of the calibration set for that feature extractor; `options` carries per-objective settings
    (e.g. {"clip_model": "ViT-B-32"})."""

    model: LoadedModel
    reference_stats: Callable[[str], FeatureStats] | None = None
    cost_cache_dir: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectiveEntry:
    factory: Callable[[ObjectiveContext], Objective]
    description: str


_REGISTRY: dict[str, ObjectiveEntry] = {}


def register_objective(name: str, factory: Callable[[ObjectiveContext], Objective], description: str) -> None:
    _REGISTRY[name] = ObjectiveEntry(factory, description)


def objective_names() -> list[str]:
    _load_standard()
    return sorted(_REGISTRY)


def describe_objectives() -> dict[str, str]:
    _load_standard()
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def parse_objective_list(text: str | Sequence[str], field_name: str = "--objectives") -> list[str]:
    """'fid,psnr,macs' -> names; unknown or repeated names are an error naming the field and the valid names."""
    _load_standard()
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    names = [n for n in names if n]
    if not names:
        raise UserInputError(field_name, "no objective given", f"choose from {', '.join(objective_names())}")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise UserInputError(field_name, f"unknown objective(s) {unknown}",
                             f"choose from {', '.join(objective_names())}")
    if len(set(names)) != len(names):
        raise UserInputError(field_name, f"{names} names an objective twice", "name each once")
    return names


def build_objectives(names: Sequence[str], context: ObjectiveContext) -> list[Objective]:
    """Instantiate and `check()` every objective, so a missing weight file fails before any sampling."""
    names = parse_objective_list(list(names))
    objectives = []
    for name in names:
        objective = _REGISTRY[name].factory(context)
        try:
            objective.check()
        except ObjectiveUnavailableError:
            raise
        except (ImportError, FileNotFoundError, OSError) as exc:
            raise ObjectiveUnavailableError(f"objective {name!r}: {exc}") from exc
        objectives.append(objective)
    return objectives


_loaded = False


def _load_standard() -> None:
    """Import the modules that register the shipped objectives (on first use, so `import` stays light)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import importlib.util

    importlib.import_module("schedsearch.objectives.standard")
    if importlib.util.find_spec("schedsearch.objectives.extra") is not None:  # objectives with optional dependencies
        importlib.import_module("schedsearch.objectives.extra")
