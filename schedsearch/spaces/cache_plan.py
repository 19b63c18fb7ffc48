"""Cache plans: which block computations a run recomputes and which it takes from the cache. Plain data, no torch.

Two kinds, after the seed methods:
- `ComponentCachePlan` (ECAD, Aggarwal et al. 2025, §3.1): a recompute bit per (step, block, component); a 0 reuses
  that component's last computed output unchanged ("plain reuse"). With `skip_reused_blocks`, a block whose every
  component is reused at a step is skipped as a whole (input + its residual from the last step it ran), which also
  reuses its adaLN modulation: what a FORA / DeepCache unit does, and what a DiT's per-block timestep MLP costs.
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


def block_names(layout: str) -> list[str]:
    """'path.block' for every block, in slot order."""
    return [f"{path}.{b}" for path, count, _ in parse_layout(layout) for b in range(count)]


def block_slot_spans(layout: str) -> list[tuple[int, int]]:
    """[start, stop) of each block's slots in a recompute row, in `block_names` order."""
    spans, start = [], 0
    for _, count, comps in parse_layout(layout):
        for _ in range(count):
            spans.append((start, start + len(comps)))
            start += len(comps)
    return spans


@dataclass(frozen=True)
class ComponentCachePlan:
    """recompute[step] is a string of '1' (recompute) / '0' (reuse), one character per slot of `layout`.

    `skip_reused_blocks`: at a step where every component of a block is '0', skip the block (its modulation too)
    and add its cached residual instead; False (ECAD's plain reuse) recomputes the modulation around reused outputs.
    """

    layout: str
    recompute: tuple[str, ...]
    skip_reused_blocks: bool = False

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

    def skipped_blocks(self) -> list[list[bool]]:
        """(steps, blocks) in `block_names(layout)` order: True where the block is skipped as a whole."""
        spans = block_slot_spans(self.layout)
        return [
            [self.skip_reused_blocks and "1" not in row[a:b] for a, b in spans] for row in self.recompute
        ]

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
        out: dict[str, Any] = {"kind": self.kind, "layout": self.layout, "recompute": list(self.recompute)}
        if self.skip_reused_blocks:  # omitted when False: plain-reuse plans keep the keys they always had
            out["skip_reused_blocks"] = True
        return out


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


def _need_int(value: Any, where: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ScheduleError(where, f"{value!r} is not an integer", "step and block indices are whole numbers")


def _rows(rows: Any) -> tuple[str, ...]:
    """Recompute rows as strings of '0'/'1'. A row given as a list of 0/1 (or '0'/'1') is the same row: one
    encoding, so one content key."""
    if not isinstance(rows, list):
        raise ScheduleError("cache.recompute", f"expected a list of rows, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, list) and all(v in (0, 1, "0", "1") and not isinstance(v, bool) for v in row):
            row = "".join(str(v) for v in row)
        if not isinstance(row, str) or set(row) - {"0", "1"}:
            raise ScheduleError(f"cache.recompute[{i}]", f"{row!r} is not a string of 0/1 (one per slot)",
                                'e.g. "1101"')
        out.append(row)
    return tuple(out)


def cache_plan_from_dict(data: Any) -> CachePlan:
    if not isinstance(data, dict):
        raise ScheduleError("cache", f"expected an object, got {type(data).__name__}")
    kind = data.get("kind")
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        if kind == ComponentCachePlan.kind:
            skip = fields.get("skip_reused_blocks", False)
            if not isinstance(skip, bool):
                raise ScheduleError("cache.skip_reused_blocks", f"expected true or false, got {skip!r}")
            if not isinstance(fields["layout"], str):
                raise ScheduleError("cache.layout", f"{fields['layout']!r} is not a layout string",
                                    'e.g. "transformer_blocks[6](attn1,ff)"')
            return ComponentCachePlan(fields["layout"], _rows(fields["recompute"]), skip_reused_blocks=skip)
        if kind == UnitCachePlan.kind:
            for name in ("start", "end", "num_steps"):
                _need_int(fields[name], f"cache.{name}")
            steps = fields["refresh_steps"]
            if not isinstance(steps, list):
                raise ScheduleError("cache.refresh_steps", f"expected a list of step indices, got {steps!r}")
            for i, step in enumerate(steps):
                _need_int(step, f"cache.refresh_steps[{i}]")
            fields["refresh_steps"] = tuple(steps)
            return UnitCachePlan(**fields)
    except (KeyError, TypeError) as exc:
        raise ScheduleError("cache", f"bad {kind} plan ({exc})", "see README, 'Cache plans'") from exc
    raise ScheduleError("cache.kind", f"unknown {kind!r}", f"use {ComponentCachePlan.kind!r} or {UnitCachePlan.kind!r}")
