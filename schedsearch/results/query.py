"""The one results query: a study's objectives, its front at its own calibration, and the held-out pairing.

`front`, `export`, `report` and the study's held-out validation all read a study through this module, so "the
front" means the same thing everywhere: ok records scored against the study's own calibration set (low-fidelity
rungs and other calibrations are not comparable), with finite values in every objective, non-dominated, ordered
best-first in the first objective (ties: next objectives, then key), with the knee marked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from schedsearch.errors import UserInputError
from schedsearch.results.pareto import knee_point, non_dominated
from schedsearch.results.store import Record, ResultStore, settings_objectives

__all__ = ["Comparison", "Front", "baselines_study", "compare_with_baselines", "heldout_columns", "heldout_metrics",
           "heldout_study", "study_front", "study_objectives"]

HELDOUT_SUFFIX = "@heldout"
BASELINES_SUFFIX = "@baselines"


def heldout_study(study: str) -> str:
    """The study holding `study`'s front re-scored on held-out seeds (`run_search(validate=True)`)."""
    return f"{study}{HELDOUT_SUFFIX}"


def baselines_study(study: str) -> str:
    """The study holding the space's hand-made baselines scored on the search split beside `study`."""
    return f"{study}{BASELINES_SUFFIX}"


def study_objectives(store: ResultStore, study: str, given: Mapping[str, str] | str | None = None) -> dict[str, str]:
    """The study's objectives {name: "min" | "max"} in search order, or the subset `given` names ("psnr,macs", or a
    mapping with directions for a study that stored none)."""
    settings = store.study_settings(study)
    if settings is None and store.count(study) == 0:
        known = ", ".join(repr(s) for s in store.studies()) or "none"
        raise UserInputError("--study", f"no study {study!r} in {store.path}", f"studies there: {known}")
    stored = settings_objectives(settings)
    if isinstance(given, Mapping):
        for name, direction in given.items():
            if direction not in ("min", "max"):
                raise UserInputError(f"objectives[{name!r}]", f"direction {direction!r}", "use 'min' or 'max'")
        if not given:
            raise UserInputError("objectives", "none given", "give at least one {name: 'min' | 'max'}")
        return dict(given)
    if not stored:
        raise UserInputError("--objectives", f"study {study!r} has no objectives in its settings",
                             "name them with their directions, e.g. {'psnr': 'max', 'macs': 'min'}")
    if given is None:
        return stored
    names = [n.strip() for n in given.split(",") if n.strip()]
    missing = [n for n in names if n not in stored]
    if missing or not names:
        raise UserInputError("--objectives", f"{missing or 'none'} not among this study's objectives",
                             f"choose from {', '.join(stored)}")
    return {n: stored[n] for n in names}


@dataclass(frozen=True)
class Front:
    """A study's Pareto front: `records` best-first in the first objective, `knee` an index into them."""

    study: str
    objectives: dict[str, str]
    records: tuple[Record, ...]
    knee: int
    scored: int  # usable records the front was taken from
    heldout: dict[str, dict[str, float]] = field(default_factory=dict)  # schedule key -> held-out metrics


def usable_records(store: ResultStore, study: str, objectives: Mapping[str, str]) -> list[Record]:
    """ok records at the study's own calibration with a finite value of every objective."""
    calibration = (store.study_settings(study) or {}).get("calibration")
    return [
        r for r in store.records(study)
        if r.status == "ok"
        and (calibration is None or r.calibration_hash == calibration)
        and all(math.isfinite(r.metrics.get(name, math.nan)) for name in objectives)  # Record metrics are floats
    ]


def study_front(store: ResultStore, study: str, objectives: Mapping[str, str] | str | None = None,
                *, required: bool = True, on: str = "search") -> Front:
    """The study's front (see the module docstring). With `required`, an empty front is a UserInputError.

    on: "search" (the scores the search saw) or "heldout": the front of the held-out re-scoring of the search's
    front (`run_search(validate=True)`): the same schedules on unseen seeds, where some may fall off."""
    if on not in ("search", "heldout"):
        raise UserInputError("--on", f"{on!r}", "use 'search' or 'heldout'")
    if on == "heldout":
        chosen = study_objectives(store, study, objectives)
        held = heldout_study(study)
        if held not in store.studies():
            raise UserInputError("--on", f"study {study!r} has no held-out re-scoring in {store.path}",
                                 "run the search without --no-validate (resume it to add the re-scoring)")
        front = study_front(store, held, chosen, required=required)
        return Front(study, front.objectives, front.records, front.knee, front.scored,
                     {r.to_schedule().key: r.metrics for r in front.records})
    if study not in store.studies():
        known = ", ".join(repr(s) for s in store.studies()) or "none"
        if store.study_settings(study) is not None:  # routine while a study starts
            raise UserInputError("--study", f"{study!r} has no records yet (is its first evaluation still running?)",
                                 "try again once it has scored some candidates")
        raise UserInputError("--study", f"{study!r} is not in {store.path} (no records)",
                             f"studies with records: {known}")
    chosen = study_objectives(store, study, objectives)
    usable = usable_records(store, study, chosen)
    if not usable:
        if required:
            raise UserInputError("--study", f"{study!r} has no ok record with finite metrics {list(chosen)} yet, so "
                                 "nothing to export or show", "wait for its first evaluations, or see every record "
                                 "with `schedsearch front --all`")
        return Front(study, chosen, (), -1, 0)
    directions = list(chosen.values())
    points = np.array([[float(r.metrics[n]) for n in chosen] for r in usable], dtype=float)
    front = np.flatnonzero(non_dominated(points, directions))
    signs = np.array([1.0 if d == "min" else -1.0 for d in directions])
    order = sorted(front, key=lambda i: (*(points[i] * signs), usable[i].key))
    knee = knee_point(points[order], directions)
    return Front(study, chosen, tuple(usable[i] for i in order), knee, len(usable), heldout_metrics(store, study))


def heldout_metrics(store: ResultStore, study: str) -> dict[str, dict[str, float]]:
    """Schedule key -> metrics of the study's held-out re-scoring (ok records only)."""
    return {r.to_schedule().key: r.metrics for r in store.records(heldout_study(study)) if r.status == "ok"}


@dataclass(frozen=True)
class Comparison:
    """The study's front against the baselines' front, on one split: which baselines some front point strictly
    dominates (no worse in every objective, better in one)."""

    split: str
    front: int  # schedules of the study's front scored on this split
    baselines: tuple[str, ...]  # names of the baselines' front
    dominated: tuple[str, ...]
    on_front: tuple[str, ...] = ()  # baselines the search kept on its own front (a tie, not a domination)
    separated: tuple[str, ...] = ()  # dominated with the 95% intervals apart in every objective that has one

    @property
    def undominated(self) -> tuple[str, ...]:
        return tuple(b for b in self.baselines if b not in self.dominated)


def compare_with_baselines(store: ResultStore, study: str, split: str = "heldout") -> Comparison | None:
    """The study's front vs the baselines' front (`<study>@baselines`) on the search or held-out split; None when
    the study has no scored baselines (validation off, or a space without hand-made ones)."""
    objectives = study_objectives(store, study)
    if baselines_study(study) not in store.studies():
        return None
    base = study_front(store, baselines_study(study), objectives, required=False)
    ours = study_front(store, study, objectives, required=False)
    if not base.records:
        return None
    ours_keys = [r.to_schedule().key for r in ours.records]
    ours_points = [r.metrics for r in ours.records]
    base_points = [(r, k, r.metrics) for r, k in ((r, r.to_schedule().key) for r in base.records)]
    if split == "heldout":
        held = ours.heldout  # the same study's held-out re-scoring, read once by study_front
        ours_points = [held[k] for k in ours_keys if k in held]
        base_points = [(r, k, held[k]) for r, k, _ in base_points if k in held]
    signs = {n: 1.0 if d == "min" else -1.0 for n, d in objectives.items()}

    def dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
        no_worse = all(signs[n] * a[n] <= signs[n] * b[n] for n in objectives)
        return no_worse and any(signs[n] * a[n] < signs[n] * b[n] for n in objectives)

    def separated(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
        """a dominates b and, where both carry a confidence interval, the intervals do not overlap."""
        if not dominates(a, b):
            return False
        for n in objectives:
            lo, hi = f"{n}.ci95_low", f"{n}.ci95_high"
            if all(k in m for m in (a, b) for k in (lo, hi)) and a[n] != b[n]:
                apart = a[lo] > b[hi] if signs[n] < 0 else a[hi] < b[lo]
                if not apart:
                    return False
        return True

    names = [_baseline_name(r) for r, _, _ in base_points]
    dominated = [name for name, (_, _, b) in zip(names, base_points, strict=True)
                 if any(dominates(a, b) for a in ours_points)]
    apart = [name for name, (_, _, b) in zip(names, base_points, strict=True)
             if any(separated(a, b) for a in ours_points)]
    front_keys = set(ours_keys)
    on_front = [name for name, (_, k, _) in zip(names, base_points, strict=True) if k in front_keys]
    return Comparison(split, len(ours_points), tuple(names), tuple(dominated), tuple(on_front), tuple(apart))


def heldout_columns(records: Sequence[Record], heldout: Mapping[str, Mapping[str, float]],
                    objectives: Mapping[str, str]) -> dict[str, list[float]]:
    """Per objective, the records' held-out values (NaN where not re-scored), for tables that show them beside the
    search's; left out where they equal the search values everywhere (a cost, MACs or NFE, is seed-free)."""
    if not heldout:
        return {}
    keys = [r.to_schedule().key for r in records]
    out = {}
    for name in objectives:
        values = [heldout.get(k, {}).get(name, math.nan) for k in keys]
        if values != [r.metrics.get(name, math.nan) for r in records]:
            out[name] = values
    return out


def _baseline_name(record: Record) -> str:
    meta = record.to_schedule().meta
    return str(meta.get("baseline") or meta.get("name") or record.key[:10])
