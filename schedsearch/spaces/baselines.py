"""Hand-made solver schedules as points of the solver space: DDIM, DPM-Solver(++), UniPC.

Each builder reproduces the per-step decisions that diffusers' scheduler of the same name makes internally
(warm-up orders, lower-order final steps, which steps get UniC), so that running the plan with our unified sampler
gives diffusers' result (tests/test_sampler_equivalence.py) and a search can start from, and be compared with, them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan, parse_layout, slot_names
from schedsearch.spaces.schedule import Prediction, Rule, Schedule, SolverPlan, SolverStep


def linspace_timesteps(num_train_timesteps: int, num_steps: int) -> tuple[float, ...]:
    """diffusers' `timestep_spacing="linspace"` (DPMSolverMultistep / UniPC default)."""
    ts = np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1]
    return tuple(float(t) for t in ts.astype(np.int64))


def leading_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int = 0) -> tuple[float, ...]:
    """diffusers' `timestep_spacing="leading"` (DDIM default): multiples of T // n, ending at 0 (+ offset)."""
    ratio = num_train_timesteps // num_steps
    ts = (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset
    return tuple(float(t) for t in ts)


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> tuple[float, ...]:
    """diffusers' `timestep_spacing="trailing"` (starts at T - 1)."""
    ts = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps).round().astype(np.int64) - 1
    return tuple(float(t) for t in ts)


def ddim_plan(
    timesteps: Sequence[float], prediction: Prediction = "data", final_timestep: float | None = None
) -> SolverPlan:
    """DDIM (η = 0) = first-order DPM-Solver in either prediction form (Lu et al. 2022, §4.1)."""
    steps = tuple(SolverStep(order=1, prediction=prediction) for _ in timesteps)
    return SolverPlan(timesteps=tuple(timesteps), steps=steps, final_timestep=final_timestep)


def dpm_solver_plan(
    timesteps: Sequence[float],
    order: int = 2,
    prediction: Prediction = "data",
    lower_order_final: bool = True,
    final_timestep: float | None = None,
) -> SolverPlan:
    """DPM-Solver++ (data) or DPM-Solver (noise) multistep with diffusers' default `solver_type="midpoint"`.

    Warm-up: step i uses at most i + 1 outputs. The step to σ = 0 is first order; with fewer than 15 steps the last
    step is first order and the one before it at most second order (`lower_order_final`).
    """
    n = len(timesteps)
    short = lower_order_final and n < 15
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        if i == n - 1 and (final_timestep is None or short):
            k = 1
        elif i == n - 2 and short:
            k = min(k, 2)
        orders.append(k)
    steps = tuple(SolverStep(order=k, prediction=prediction, rule="dpmsolver") for k in orders)
    return SolverPlan(timesteps=tuple(timesteps), steps=steps, final_timestep=final_timestep)


def unipc_plan(
    timesteps: Sequence[float],
    order: int = 2,
    rule: Rule = "bh2",
    prediction: Prediction = "data",
    corrector: bool = True,
    disable_corrector: Iterable[int] = (),
    final_timestep: float | None = None,
) -> SolverPlan:
    """UniPC (Zhao et al. 2023) as diffusers runs it: UniP-p predictor, UniC on every step but the last and those in
    `disable_corrector`; order min(order, steps left, outputs available) (`lower_order_final=True`)."""
    n = len(timesteps)
    off = set(disable_corrector)
    steps = tuple(
        SolverStep(
            order=min(order, n - i, i + 1),
            prediction=prediction,
            corrector=corrector and i < n - 1 and i not in off,
            rule=rule,
        )
        for i in range(n)
    )
    return SolverPlan(timesteps=tuple(timesteps), steps=steps, final_timestep=final_timestep)


def with_dc_ratios(plan: SolverPlan, ratios: Sequence[float]) -> SolverPlan:
    """The same plan with DC-Solver compensation ratios, one per step (warm-up steps must stay 1)."""
    if len(ratios) != plan.num_steps:
        raise ValueError(f"ratios: {len(ratios)} given for a plan of {plan.num_steps} steps")
    steps = tuple(
        SolverStep(s.order, s.prediction, s.corrector, s.rule, float(r))
        for s, r in zip(plan.steps, ratios, strict=True)
    )
    return replace(plan, steps=steps)


def fora_cache_plan(layout: str, num_steps: int, interval: int) -> ComponentCachePlan:
    """FORA (Selvaraju et al. 2024): every block's attention and MLP are recomputed every `interval` steps and
    reused in between."""
    if interval < 1:
        raise ValueError(f"interval: {interval} must be at least 1")
    n = len(slot_names(layout))
    return ComponentCachePlan(layout, tuple(("1" if i % interval == 0 else "0") * n for i in range(num_steps)))


def uniform_unit_plan(group: str, start: int, end: int, num_steps: int, interval: int) -> UnitCachePlan:
    """DeepCache-style uniform refresh of a block range: recompute the unit every `interval` steps."""
    return UnitCachePlan(group, start, end, tuple(range(0, num_steps, interval)), num_steps)


def tgate_cache_plan(layout: str, num_steps: int, gate_step: int) -> ComponentCachePlan:
    """TGATE (Zhang et al. 2024): cross-attention converges early, so from `gate_step` on every attn2 output is
    frozen (reused) while everything else is recomputed. Needs a model with cross-attention (PixArt)."""
    names = slot_names(layout)
    if not any(n.endswith(".attn2") for n in names):
        raise ValueError(f"layout: {layout!r} has no cross-attention (attn2) to gate; TGATE needs a text model")
    if not 1 <= gate_step <= num_steps:
        raise ValueError(f"gate_step: {gate_step} must lie in [1, {num_steps}]")
    rows = []
    for i in range(num_steps):
        rows.append("".join("0" if i >= gate_step and n.endswith(".attn2") else "1" for n in names))
    return ComponentCachePlan(layout, tuple(rows))


def evenly_spaced_cache_plan(layout: str, num_steps: int, recompute_steps: int) -> ComponentCachePlan:
    """ECAD's "evenly spaced" seed (§3.3): `recompute_steps` full steps spread evenly, the first one included."""
    if not 1 <= recompute_steps <= num_steps:
        raise ValueError(f"recompute_steps: {recompute_steps} must lie in [1, {num_steps}]")
    full = {round(k * (num_steps - 1) / max(1, recompute_steps - 1)) for k in range(recompute_steps)}
    n = len(slot_names(layout))
    return ComponentCachePlan(layout, tuple(("1" if i in full else "0") * n for i in range(num_steps)))


# --- helpers shared by the search spaces (solver.py, cache_mask.py, ...) ---------------------------------------------


def first_evaluated_step(plan: SolverPlan) -> int:
    """Index of the first step that runs the model (1 under USF's analytical first step, else 0)."""
    return 1 if plan.first_step == "zero_x0" else 0


def expert_of_time(t: float, boundary: Mapping[str, Any]) -> int:
    """Which expert of a two-transformer model (Wan 2.2) runs at model time t: 0 (`transformer`, high noise) where
    the timestep the network gets is >= the boundary, else 1 (`transformer_2`), as WanPipeline.__call__ compares
    `t >= boundary_ratio * num_train_timesteps`. `boundary`: {"timestep": ratio · T, "num_train_timesteps": T,
    "flow_shift": the flow schedule's shift, or None for a VP schedule}. The network timestep of a flow model is the
    shifted σ(t)·T (FlowSchedule's formula, in its order of operations); both sides are compared in float32, as the
    pipeline compares its float32 (or int64) timestep tensor with a Python float, so a step that lands exactly on
    the boundary goes where the pipeline sends it."""
    value = float(t)
    shift = boundary.get("flow_shift")
    if shift is not None:
        total = boundary["num_train_timesteps"]
        s = value / total
        value = shift * s / (1.0 + (shift - 1.0) * s) * total
    return 0 if np.float32(value) >= np.float32(boundary["timestep"]) else 1


def step_experts(plan: SolverPlan, boundary: Mapping[str, Any] | None) -> tuple[int, ...]:
    """The expert of every step of `plan` (all 0 for a one-network model, `boundary` None)."""
    if boundary is None:
        return (0,) * plan.num_steps
    return tuple(expert_of_time(plan.network_time(i), boundary) for i in range(plan.num_steps))


def forced_recompute_steps(plan: SolverPlan, boundary: Mapping[str, Any] | None = None) -> tuple[int, ...]:
    """Steps a cache plan must recompute in full: the first evaluated step, and on a two-transformer model the first
    evaluated step of each expert, where that transformer has nothing cached yet (its hooks keep their own outputs:
    the other transformer's are of other weights)."""
    first = first_evaluated_step(plan)
    experts = step_experts(plan, boundary)
    starts = {first}
    for i in range(first + 1, plan.num_steps):
        if experts[i] not in experts[first:i]:
            starts.add(i)
    return tuple(sorted(starts))


def dpmpp_2m_plan(num_train_timesteps: int, num_steps: int) -> SolverPlan:
    """DPM-Solver++ 2M on diffusers' linspace timesteps: the fixed solver of the cache spaces (ECAD, CacheQuant)."""
    return dpm_solver_plan(linspace_timesteps(num_train_timesteps, num_steps), order=2, prediction="data")


def unique_named(named: Iterable[tuple[str, Schedule]]) -> list[tuple[str, Schedule]]:
    """Drop schedules whose `key` an earlier one already has (the first name wins)."""
    seen: set[str] = set()
    out = []
    for name, schedule in named:
        if schedule.key not in seen:
            seen.add(schedule.key)
            out.append((name, schedule))
    return out


def centered_steps(num_steps: int, count: int) -> list[int]:
    """`count` step indices spread evenly and centred in [0, num_steps) (ECAD's `apply_n_times_centered`)."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"count: {count} must lie in [1, {num_steps}]")
    pts = np.linspace(0, num_steps + 1, count + 2)[1:-1]
    return [int(p) for p in np.ceil(pts - 1)]


def evenly_spaced_indices(start: int, stop: int, count: int) -> list[int]:
    """`count` integers spread evenly over [start, stop] inclusive (ECAD's `evenly_spaced`)."""
    if count == 1:
        return [start]
    step = (stop - start) / (count - 1)
    return [round(start + i * step) for i in range(count)]


def every_n_cache_plan(layout: str, num_steps: int, interval: int, components: Iterable[str]) -> ComponentCachePlan:
    """ECAD's `recompute_*_every_n` seeds: `components` are recomputed every `interval` steps (reused in between),
    every other component on every step. All components = FORA."""
    if interval < 1:
        raise ValueError(f"interval: {interval} must be at least 1")
    cached = set(components)
    comps = [n.rsplit(".", 1)[1] for n in slot_names(layout)]
    rows = tuple("".join("1" if i % interval == 0 or c not in cached else "0" for c in comps) for i in range(num_steps))
    return ComponentCachePlan(layout, rows)


def block_subset_cache_plan(
    layout: str, num_steps: int, steps: Iterable[int], blocks: Iterable[int], components: Iterable[str]
) -> ComponentCachePlan:
    """ECAD's `middle_cache_*` / `evenly_cache_*` seeds: on `steps`, the `components` of `blocks` (indices within each
    block group) are reused; everything else is recomputed."""
    step_set, block_set, comp_set = set(steps), set(blocks), set(components)
    # (block, component) per slot from the layout itself: a UNet group path holds dots ("down_blocks.0")
    parsed = [(b, c) for _, count, comps in parse_layout(layout) for b in range(count) for c in comps]
    rows = []
    for i in range(num_steps):
        rows.append("".join(
            "0" if i in step_set and b in block_set and c in comp_set else "1" for b, c in parsed
        ))
    return ComponentCachePlan(layout, tuple(rows))


def tgate_interval_cache_plan(
    layout: str, num_steps: int, gate_step: int, sp_interval: int = 1, warmup: int = 2
) -> ComponentCachePlan:
    """TGATE as ECAD seeds it (`helper_tgate_without_ca_avg`): before `gate_step` self-attention is recomputed on the
    `warmup` first steps and every `sp_interval`-th step, cross-attention always; from `gate_step` on self-attention
    is recomputed and cross-attention frozen. Feed-forward always recomputed. sp_interval=1 is `tgate_cache_plan`."""
    names = slot_names(layout)
    if not any(n.endswith(".attn2") for n in names):
        raise ValueError(f"layout: {layout!r} has no cross-attention (attn2) to gate; TGATE needs a text model")
    if sp_interval < 1:
        raise ValueError(f"sp_interval: {sp_interval} must be at least 1")
    rows = []
    for i in range(num_steps):
        attn1 = (i < warmup or i % sp_interval == 0) if i < gate_step else True
        attn2 = i < gate_step
        rows.append("".join(
            "1" if (c == "attn1" and attn1) or (c == "attn2" and attn2) or c not in ("attn1", "attn2") else "0"
            for c in (n.rsplit(".", 1)[1] for n in names)
        ))
    return ComponentCachePlan(layout, tuple(rows))


def with_recompute_rows(plan: ComponentCachePlan, rows: Iterable[int]) -> ComponentCachePlan:
    """The same plan with `rows` set to recompute everything (e.g. the first evaluated step)."""
    full = "1" * plan.num_slots
    force = set(rows)
    return replace(plan, recompute=tuple(full if i in force else r for i, r in enumerate(plan.recompute)))


def windowed_every_n_cache_plan(
    layout: str, num_steps: int, interval: int, window: tuple[int, int]
) -> ComponentCachePlan:
    """FORA restricted to the steps of `window` = [start, stop): inside it every slot is recomputed at `start`,
    `start + interval`, ... and reused in between; outside it every step is recomputed. Ours, not ECAD's: it seeds
    the mild-caching corner (a few reused steps), which FORA every N and the evenly spaced seeds do not reach."""
    start, stop = window
    if interval < 2:
        raise ValueError(f"interval: {interval} must be at least 2 (1 reuses nothing)")
    if not 0 <= start < stop <= num_steps:
        raise ValueError(f"window: [{start}, {stop}) must be a non-empty range within [0, {num_steps})")
    n = len(slot_names(layout))
    reuse = {i for i in range(start, stop) if (i - start) % interval}
    return ComponentCachePlan(layout, tuple(("0" if i in reuse else "1") * n for i in range(num_steps)))
