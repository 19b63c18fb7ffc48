"""Cache plans: which block computations a run recomputes and which it takes from the cache. Plain data, no torch.

Two kinds, after the seed methods:
- `ComponentCachePlan` (ECAD, Aggarwal et al. 2025, §3.1): a recompute bit per (step, block, component); a 0 reuses
  that component's last computed output unchanged ("plain reuse").
- `UnitCachePlan` (DeepCache / FORA / CacheQuant §3.2): a contiguous range of blocks is a cached unit, recomputed only
  on `refresh_steps`; on the other steps its residual (output - input) from the last refresh is added instead.

Slots are laid out group by group, block by block, component by component, in the order the model reports them
(`ModelInfo.block_groups`); `layout` names that order so a plan made for another model is caught by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from schedsearch.spaces.errors import ScheduleError


def layout_of(groups: Sequence[tuple[str, int, Sequence[str]]]) -> str:
    """Canonical layout string, e.g. "transformer_blocks[28](attn1,attn2,ff)"."""
    return ";".join(f"{path}[{count}]({','.join(components)})" for path, count, components in groups)


def parse_layout(layout: str) -> list[tuple[str, int, tuple[str, ...]]]:
    groups = []
    for part in layout.split(";"):
        try:
            head, comps = part.rstrip(")").split("](")
            path, count = head.split("[")
            groups.append((path, int(count), tuple(c for c in comps.split(",") if c)))
        except ValueError as exc:
            raise ScheduleError("cache.layout", f"cannot parse {part!r}", 'expected "path[count](comp,comp)"') from exc
    return groups


def slot_names(layout: str) -> list[str]:
    """'path.block.component' for every slot, in bit order."""
    return [f"{path}.{b}.{c}" for path, count, comps in parse_layout(layout) for b in range(count) for c in comps]


@dataclass(frozen=True)
class ComponentCachePlan:
    """recompute[step] is a string of '1' (recompute) / '0' (reuse), one character per slot of `layout`."""

    layout: str
    recompute: tuple[str, ...]

    kind = "components"

    @property
    def num_steps(self) -> int:
        return len(self.recompute)

    @property
    def num_slots(self) -> int:
        return len(self.recompute[0]) if self.recompute else 0

    def recompute_fraction(self) -> float:
        bits = "".join(self.recompute)
        return bits.count("1") / max(1, len(bits))

    @staticmethod
    def full(layout: str, num_steps: int) -> ComponentCachePlan:
        """Recompute everything: the reference the cached runs are measured against."""
        return ComponentCachePlan(layout, ("1" * len(slot_names(layout)),) * num_steps)

    def validate(self, num_steps: int | None = None, first_evaluated_step: int = 0) -> ComponentCachePlan:
        n_slots = len(slot_names(self.layout))
        if num_steps is not None and self.num_steps != num_steps:
            raise ScheduleError(
                "cache.recompute",
                f"has {self.num_steps} steps but the solver plan has {num_steps}",
                "give one row per solver step",
            )
        for i, row in enumerate(self.recompute):
            if len(row) != n_slots or set(row) - {"0", "1"}:
                raise ScheduleError(
                    f"cache.recompute[{i}]",
                    f"expected {n_slots} characters of 0/1 for layout {self.layout!r}, got {len(row)}",
                )
        if self.recompute and "0" in self.recompute[first_evaluated_step]:
            raise ScheduleError(
                f"cache.recompute[{first_evaluated_step}]",
                "the first evaluated step has nothing cached to reuse",
                "recompute every slot on it",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layout": self.layout, "recompute": list(self.recompute)}


@dataclass(frozen=True)
class UnitCachePlan:
    """Blocks [start, end) of group `group` form the cached unit; it is recomputed on `refresh_steps` only."""

    group: str
    start: int
    end: int
    refresh_steps: tuple[int, ...]
    num_steps: int

    kind = "unit"

    def validate(self, num_steps: int | None = None, first_evaluated_step: int = 0) -> UnitCachePlan:
        if num_steps is not None and self.num_steps != num_steps:
            raise ScheduleError(
                "cache.num_steps", f"is {self.num_steps} but the solver plan has {num_steps} steps", "make them equal"
            )
        if not 0 <= self.start < self.end:
            raise ScheduleError("cache.start", f"unit [{self.start}, {self.end}) is empty or negative")
        steps = self.refresh_steps
        if list(steps) != sorted(set(steps)) or any(not 0 <= s < self.num_steps for s in steps):
            raise ScheduleError(
                "cache.refresh_steps", f"{list(steps)} must be increasing step indices in [0, {self.num_steps})"
            )
        if first_evaluated_step not in steps:
            raise ScheduleError(
                "cache.refresh_steps",
                f"does not contain the first evaluated step {first_evaluated_step}",
                "the unit must be computed before it can be reused",
            )
        return self

    def refresh_mask(self) -> list[bool]:
        refresh = set(self.refresh_steps)
        return [i in refresh for i in range(self.num_steps)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "group": self.group,
            "start": self.start,
            "end": self.end,
            "refresh_steps": list(self.refresh_steps),
            "num_steps": self.num_steps,
        }


CachePlan = ComponentCachePlan | UnitCachePlan


def cache_plan_from_dict(data: Any) -> CachePlan:
    if not isinstance(data, dict):
        raise ScheduleError("cache", f"expected an object, got {type(data).__name__}")
    kind = data.get("kind")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        if kind == ComponentCachePlan.kind:
            return ComponentCachePlan(layout=fields["layout"], recompute=tuple(fields["recompute"]))
        if kind == UnitCachePlan.kind:
            fields["refresh_steps"] = tuple(fields["refresh_steps"])
            return UnitCachePlan(**fields)
    except (KeyError, TypeError) as exc:
        raise ScheduleError("cache", f"bad {kind} plan ({exc})", "see README, 'Cache plans'") from exc
    raise ScheduleError("cache.kind", f"unknown {kind!r}", f"use {ComponentCachePlan.kind!r} or {UnitCachePlan.kind!r}")
