"""One room per method: the registry table of search methods by `--strategy` name, and `make_strategy`.

| name | file | method |
|---|---|---|
| `ecad` | `methods/ecad.py` | ECAD's genetic cache schedules (NSGA-II on recompute bits) |
| `predictor` | `methods/s3.py` | S³'s predictor-guided search (solver schedules, any space) |
| `dp` | `methods/cachequant.py` | CacheQuant's dynamic-programming refresh steps |
| `dc-fit` | `methods/dc_solver.py` | DC-Solver's fitted compensation ratios |
| `nsga2`, `tpe`, `optuna-nsga2` | `methods/general.py` | general-purpose optimisers (pymoo, optuna) on any space |
| `bilevel` | `methods/bilevel.py` | ours: S³'s predictor on solver genes, then ECAD's screened GA on their masks |

No torch, no numpy at import: the CLI reads this table to build its `--help`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from schedsearch.errors import UserInputError
from schedsearch.methods.base import PRESET_NAMES, SPACE_NAMES, Method
from schedsearch.methods.bilevel import Bilevel
from schedsearch.methods.cachequant import CacheQuant
from schedsearch.methods.dc_solver import DCSolver
from schedsearch.methods.ecad import Ecad
from schedsearch.methods.general import TPE, OptunaNSGA2, PymooNSGA2
from schedsearch.methods.s3 import S3

if TYPE_CHECKING:
    from schedsearch.search.base import Strategy
    from schedsearch.spaces.base import SearchSpace

__all__ = ["METHODS", "PRESET_NAMES", "SPACE_NAMES", "Method", "check_combination", "get_method", "make_strategy"]

METHODS: dict[str, Method] = {m.name: m for m in (Ecad(), PymooNSGA2(), TPE(), OptunaNSGA2(), CacheQuant(), S3(),
                                                  DCSolver(), Bilevel())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserInputError("--strategy", f"unknown {name!r}", f"choose from {', '.join(METHODS)}")
    return METHODS[name]


def check_combination(strategy: str, space: str, options: dict[str, Any] | None = None) -> Method:
    """A combination that makes no sense is an error before any work (e.g. dp on the solver space)."""
    if space not in SPACE_NAMES:
        raise UserInputError("--space", f"unknown {space!r}", f"choose from {', '.join(SPACE_NAMES)}")
    method = get_method(strategy)
    method.check(space, options or {})
    return method


def check_preset(preset: str) -> str:
    if preset not in PRESET_NAMES:
        raise UserInputError("--preset", f"unknown {preset!r}", f"choose from {', '.join(PRESET_NAMES)}")
    return preset


def make_strategy(
    name: str,
    space: SearchSpace,
    n_objectives: int,
    *,
    preset: str = "quick",
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> Strategy:
    """Build method `name`'s engine on `space`, seeded (where the method takes seeds) with the space's encoded
    baselines and `options["seeds"]`; the rest of `options` overrides the preset's engine options."""
    opts = dict(options or {})
    method = check_combination(name, space.name, opts)
    check_preset(preset)
    extra: Sequence[Any] = opts.pop("seeds", [])
    initial, forbid = [], []
    if method.seeded:
        initial = [space.encode(s) for _, s in space.baselines()] + list(extra)
        forbid = space.all_recompute_genomes() if hasattr(space, "all_recompute_genomes") else []
    options = {**method.defaults(preset, initial), **opts}
    return method.engine(space, n_objectives, seed=seed, preset=preset, initial=initial, forbid=forbid,
                         options=options)
