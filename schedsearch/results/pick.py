"""Pick one schedule by quality target: the cheapest on a study's front that meets every bound.

Bounds are read on the held-out re-scoring where the study has one for that schedule (what it will do on prompts
it was not searched on), on the search scores otherwise, and the answer says which. Cost is the first of
`latency_s`, `macs`, `nfe` the study measured, unless `by` names another metric (e.g. `macs.p90`, the cost an
adaptive policy reaches on its slower prompts).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from schedsearch.errors import UserInputError
from schedsearch.results.query import study_front
from schedsearch.results.store import Record, ResultStore

COST_PREFERENCE = ("latency_s", "macs", "nfe")


class NothingMeetsError(UserInputError):
    """No schedule on the front meets the bounds: the message says how close the best one came."""


@dataclass(frozen=True)
class Pick:
    record: Record
    values: dict[str, float]  # the metrics the bounds were checked on
    split: str  # "heldout" or "search"
    cost: str  # the metric minimised


def parse_bounds(items: list[str] | None, flag: str) -> dict[str, float]:
    """`name=value` pairs from `--min`/`--max` (comma-separated or repeated)."""
    out: dict[str, float] = {}
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if not sep or not name.strip() or not math.isfinite(number):
                raise UserInputError(flag, f"{part!r} is not NAME=NUMBER", f"e.g. {flag} psnr=30")
            out[name.strip()] = number
    return out


def pick(store: ResultStore, study: str, minimums: Mapping[str, float], maximums: Mapping[str, float],
         by: str | None = None) -> Pick:
    """The front's cheapest schedule (in `by`) with every metric ≥ its minimum and ≤ its maximum."""
    if not minimums and not maximums:
        raise UserInputError("--min/--max", "no quality target given", "e.g. --min psnr=30 or --max fid=20")
    front = study_front(store, study)
    known = set().union(*(r.metrics for r in front.records))
    for name in [*minimums, *maximums]:
        if name not in known:
            raise UserInputError(f"--min/--max {name}", f"the study has no metric {name!r}",
                                 f"use one of {', '.join(sorted(known))}")
    cost = by or next((c for c in COST_PREFERENCE if c in front.objectives), None)
    if cost is None or cost not in known:
        raise UserInputError("--by", f"the study has no cost metric {cost!r} to minimise",
                             f"name one with --by (one of {', '.join(sorted(known))})")
    candidates = []
    shortfall: list[tuple[float, str]] = []
    for record in front.records:
        heldout = front.heldout.get(record.to_schedule().key)
        values, split = (heldout, "heldout") if heldout else (record.metrics, "search")
        values = {**record.metrics, **values}
        misses = [(values[n] - b) / max(abs(b), 1e-12) for n, b in minimums.items() if values[n] < b]
        misses += [(b - values[n]) / max(abs(b), 1e-12) for n, b in maximums.items() if values[n] > b]
        if misses:
            shortfall.append((min(misses), record.key))
            continue
        candidates.append(Pick(record, values, split, cost))
    if not candidates:
        bounds = ", ".join([*(f"{n} ≥ {b:g}" for n, b in minimums.items()),
                            *(f"{n} ≤ {b:g}" for n, b in maximums.items())])
        best = max(shortfall)[1] if shortfall else "none"
        raise NothingMeetsError("--min/--max", f"no schedule on the front of {study!r} meets {bounds} "
                                f"(closest: {best})", "relax a bound, or search longer or with more steps")
    return min(candidates, key=lambda p: (p.values[cost], p.record.key))
