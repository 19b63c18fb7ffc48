"""Hand-made solver schedules as points of the solver space: DDIM, DPM-Solver(++), UniPC.

Each builder reproduces the per-step decisions that diffusers' scheduler of the same name makes internally
(warm-up orders, lower-order final steps, which steps get UniC), so that running the plan with our unified sampler
gives diffusers' result (tests/test_sampler_equivalence.py) and a search can start from, and be compared with, them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan, slot_names
from schedsearch.spaces.schedule import Prediction, Rule, SolverPlan, SolverStep


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
    return SolverPlan(plan.timesteps, steps, plan.final_timestep, plan.first_step, plan.dc_order)


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
