"""ECAD's cache-schedule space (Aggarwal et al. 2025, §3.1): one recompute bit per (step, block, component).

The solver plan is fixed (default DPM-Solver++ 2M on linspace timesteps). Genome: for every step after the first
evaluated one (step 0, or step 1 under the analytical first step), one bit per slot of `structure.layout`, in
`cache_plan.slot_names` order; 1 = recompute, 0 = reuse the component's last output. The first evaluated step (and
a skipped AFS step before it) has nothing to reuse and is always recomputed, so it is left out of the genome.
ECAD's constraint (the schedule differs from all-recompute, §3.2) is `all_recompute_genomes()`, for the GA to forbid.

Ours, for models of two transformers (Wan 2.2, `ModelStructure.extra["expert_boundary"]`): the first step the
low-noise transformer runs has nothing cached in it either, so it is forced to recompute and left out of the genome
too (`baselines.forced_recompute_steps`); no genome, seed or refresh placement can express a reuse there.

Ours, beyond ECAD: on models whose blocks diffusers can skip (`ModelStructure.block_skip`: every transformer family)
one more bit, last, is `skip_reused_blocks`: a block whose components are all reused at a step is skipped whole,
modulation included (see `cache_plan`). It lets one genome express FORA's and DeepCache's block-residual reuse next
to ECAD's plain reuse; on the builtin DiT the skipped per-block adaLN is 1.4% of a block's MACs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, ModelStructure, SearchSpace
from schedsearch.spaces.baselines import (
    block_subset_cache_plan,
    centered_steps,
    dpmpp_2m_plan,
    evenly_spaced_cache_plan,
    evenly_spaced_indices,
    every_n_cache_plan,
    first_evaluated_step,
    forced_recompute_steps,
    tgate_interval_cache_plan,
    unique_named,
    windowed_every_n_cache_plan,
    with_recompute_rows,
)
from schedsearch.spaces.cache_plan import ComponentCachePlan, parse_layout, slot_names
from schedsearch.spaces.schedule import Schedule, SolverPlan

DEFAULT_NUM_STEPS = 20


def resolve_solver(structure: ModelStructure, num_steps: int | None, solver: SolverPlan | None) -> SolverPlan:
    """The fixed solver plan of a cache space: `solver`, or DPM-Solver++ 2M with `num_steps` (default 20)."""
    if solver is None:
        return dpmpp_2m_plan(structure.num_train_timesteps, DEFAULT_NUM_STEPS if num_steps is None else num_steps)
    if num_steps is not None and num_steps != solver.num_steps:
        raise ValueError(f"num_steps: {num_steps} differs from the given solver's {solver.num_steps} steps")
    return solver.validate(structure.num_train_timesteps)


def mask_rows(bits: np.ndarray, num_steps: int, num_slots: int, forced: int,
              also: Sequence[int] = ()) -> tuple[str, ...]:
    """Rows of '0'/'1' from `num_steps * num_slots` bits (row-major); rows 0..forced and the rows `also` all '1'."""
    grid = np.asarray(bits, dtype=float).reshape(num_steps, num_slots) > 0.5
    grid[: forced + 1] = True
    grid[list(also)] = True
    return tuple("".join("1" if b else "0" for b in row) for row in grid)


def rows_to_bits(rows: Sequence[str]) -> np.ndarray:
    return np.array([[c == "1" for c in row] for row in rows], dtype=float).reshape(-1)


def canonical_plan(layout: str, rows: tuple[str, ...], skip_reused_blocks: bool) -> ComponentCachePlan:
    """The plan, with `skip_reused_blocks` only where it changes something (some block fully reused at some step),
    so that two genomes running the same computation decode to one schedule."""
    plan = ComponentCachePlan(layout, rows, skip_reused_blocks=skip_reused_blocks)
    if skip_reused_blocks and not any(any(row) for row in plan.skipped_blocks()):
        return replace(plan, skip_reused_blocks=False)
    return plan


def component_fractions(plan: ComponentCachePlan) -> dict[str, float]:
    """Recompute fraction per component name (e.g. recompute_attn1), over all steps and blocks."""
    comps = [n.rsplit(".", 1)[1] for n in slot_names(plan.layout)]
    out: dict[str, float] = {}
    for c in dict.fromkeys(comps):
        idx = [j for j, k in enumerate(comps) if k == c]
        out[f"recompute_{c}"] = float(np.mean([row[j] == "1" for row in plan.recompute for j in idx]))
    return out


class CacheMaskSpace(SearchSpace):
    """ECAD: a recompute bit per (step after the first evaluated one, block, component) on a fixed solver plan."""

    name = "cache"

    def __init__(
        self,
        structure: ModelStructure,
        *,
        num_steps: int | None = None,
        solver: SolverPlan | None = None,
        block_skip: bool | None = None,
    ) -> None:
        self.structure = structure
        self.solver = resolve_solver(structure, num_steps, solver)
        self.layout = structure.layout
        self.slots = slot_names(self.layout)
        self.components = tuple(dict.fromkeys(c for _, _, comps in parse_layout(self.layout) for c in comps))
        self.num_steps = self.solver.num_steps
        self.first = first_evaluated_step(self.solver)
        if self.num_steps <= self.first + 1:
            raise ValueError(f"num_steps: {self.num_steps} steps leave no step to cache after the first evaluated one")
        # the first evaluated step, and each later transformer's first (Wan 2.2): recomputed, not genes
        self.forced = forced_recompute_steps(self.solver, structure.extra.get("expert_boundary"))
        self.genome_steps = tuple(i for i in range(self.first + 1, self.num_steps) if i not in self.forced)
        if not self.genome_steps:
            raise ValueError(f"num_steps: each of the {self.num_steps} steps is some transformer's first: nothing "
                             "to cache; use more steps")
        if block_skip and not structure.block_skip:
            raise ValueError(f"block_skip: the blocks of {structure.name} cannot be skipped whole (not a transformer)")
        self.block_skip = structure.block_skip if block_skip is None else block_skip
        names = [f"s{i}.{slot}" for i in self.genome_steps for slot in self.slots]
        self.mask_size = len(names)
        names += ["skip_reused_blocks"] if self.block_skip else []
        self.genome = GenomeSpec.bits(len(names), names)

    def decode(self, genome: np.ndarray) -> Schedule:
        x = self.genome.clip(genome)
        grid = np.ones((self.num_steps, len(self.slots)))
        grid[list(self.genome_steps)] = x[: self.mask_size].reshape(len(self.genome_steps), len(self.slots))
        rows = mask_rows(grid.reshape(-1), self.num_steps, len(self.slots), self.first)
        skip = self.block_skip and bool(x[self.mask_size] > 0.5)
        return Schedule(self.structure.name, self.solver, canonical_plan(self.layout, rows, skip),
                        meta={"space": self.name})

    def encode(self, schedule: Schedule) -> np.ndarray:
        cache = schedule.cache
        if schedule.solver != self.solver:
            raise ValueError(f"schedule.solver: differs from this {self.name} space's fixed solver plan")
        if not isinstance(cache, ComponentCachePlan) or cache.layout != self.layout:
            raise ValueError(f"schedule.cache: expected a component plan for layout {self.layout!r}")
        forced = sorted({*range(self.first + 1), *self.forced})
        if any("0" in cache.recompute[i] for i in forced):
            raise ValueError(f"schedule.cache.recompute: steps {forced} must recompute every slot (the first step "
                             "each transformer runs has nothing cached)")
        if cache.skip_reused_blocks and not self.block_skip:
            raise ValueError("schedule.cache.skip_reused_blocks: this space has no block-skip gene (block_skip=False)")
        mask = rows_to_bits([cache.recompute[i] for i in self.genome_steps])
        return np.append(mask, float(cache.skip_reused_blocks)) if self.block_skip else mask

    def all_recompute_genomes(self) -> list[np.ndarray]:
        """The genomes of the uncached schedule (either skip bit), which ECAD's constraint excludes (§3.2)."""
        ones = np.ones(self.genome.size)
        return [ones, np.append(ones[: self.mask_size], 0.0)] if self.block_skip else [ones]

    def is_all_recompute(self, genome: np.ndarray) -> bool:
        return bool(np.all(self.genome.clip(genome)[: self.mask_size] == 1.0))

    def _schedule(self, name: str, plan: ComponentCachePlan) -> tuple[str, Schedule]:
        """Baseline made for the evaluated steps: prefix the skipped AFS step, force the first evaluated one (and
        each later transformer's first)."""
        plan = replace(plan, recompute=("1" * len(self.slots),) * self.first + plan.recompute)
        plan = with_recompute_rows(plan, {*range(self.first + 1), *self.forced})
        return name, Schedule(self.structure.name, self.solver, plan, meta={"space": self.name, "baseline": name})

    def baselines(self) -> list[tuple[str, Schedule]]:
        """ECAD's heuristic seeds (repo: schedulers/cache_scheduler/generators): FORA-like every N (all components;
        attention only, ff always recomputed; ff only), TGATE-like cross-attention gating (layouts with attn2),
        evenly spaced full steps, and per-component reuse on middle / evenly spaced blocks over centred steps.
        The all-recompute schedule is excluded (ECAD's constraint); duplicates are dropped."""
        n, layout, comps = self.num_steps - self.first, self.layout, self.components  # evaluated steps
        attn = [c for c in comps if c.startswith("attn")]
        out = [self._schedule(f"fora-every{k}", every_n_cache_plan(layout, n, k, comps)) for k in (2, 3, 4, 5)]
        out += self._corner_seeds()
        if attn and len(attn) < len(comps):
            out += [self._schedule(f"attn-every{k}", every_n_cache_plan(layout, n, k, attn)) for k in (2, 3)]
        if "ff" in comps and len(comps) > 1:
            out += [self._schedule(f"ff-every{k}", every_n_cache_plan(layout, n, k, ["ff"])) for k in (2, 3)]
        if "attn2" in comps:
            for gate in sorted({max(1, round(n / 2)), max(1, round(3 * n / 4))}):
                for sp in (1, 3):
                    plan = tgate_interval_cache_plan(layout, n, gate, sp_interval=sp)
                    out.append(self._schedule(f"tgate-m{gate}-k{sp}", plan))
        for count in sorted({max(2, round(n / 2)), max(2, round(n / 3)), max(2, round(n / 4))}, reverse=True):
            if count < n:
                out.append(self._schedule(f"evenly-{count}", evenly_spaced_cache_plan(layout, n, count)))
        blocks = min(count for _, count, _ in parse_layout(layout))
        affected = max(1, blocks // 2)
        steps = centered_steps(n, max(1, (3 * n) // 4))
        middle = range(blocks // 2 - affected // 2, blocks // 2 - affected // 2 + affected)
        for comp in comps:
            spread = evenly_spaced_indices(0, blocks - 1, affected)
            out.append(self._schedule(f"{comp}-evenly-blocks{affected}-steps{len(steps)}",
                                      block_subset_cache_plan(layout, n, steps, spread, [comp])))
            out.append(self._schedule(f"{comp}-middle-blocks{affected}-steps{len(steps)}",
                                      block_subset_cache_plan(layout, n, steps, middle, [comp])))
        if self.block_skip:
            out += self._block_skip_seeds(out)
        full = ComponentCachePlan.full(layout, self.num_steps)
        return [(name, s) for name, s in unique_named(out) if s.cache != full]

    def refresh_schedule(self, refresh_steps: Sequence[int], skip_reused_blocks: bool = False) -> Schedule:
        """Every slot recomputed on `refresh_steps`, every slot reused elsewhere: a whole-stack unit refreshed on
        those steps (exactly so with `skip_reused_blocks`). How CacheQuant's DP refresh steps seed this space. A
        later transformer's first step (Wan 2.2) is refreshed whether given or not: it cannot be anything else."""
        steps = set(refresh_steps)
        if self.first not in steps or not steps <= set(range(self.num_steps)):
            raise ValueError(f"refresh_steps: {sorted(steps)} must include step {self.first} and lie in "
                             f"[0, {self.num_steps})")
        steps |= set(self.forced)
        width = len(self.slots)
        rows = tuple("1" * width if i in steps or i < self.first else "0" * width for i in range(self.num_steps))
        plan = canonical_plan(self.layout, rows, skip_reused_blocks and self.block_skip)
        return Schedule(self.structure.name, self.solver, plan, meta={"space": self.name})

    def whole_stack_refresh(self, genome: np.ndarray) -> tuple[tuple[int, ...], bool] | None:
        """(refresh steps, skip flag) when every evaluated step of `genome` recomputes every slot or reuses every slot
        (FORA every N, evenly spaced full steps, CacheQuant's DP placements), else None."""
        x = self.genome.clip(genome)
        grid = x[: self.mask_size].reshape(len(self.genome_steps), len(self.slots)) > 0.5
        if not np.all(grid.all(axis=1) | ~grid.any(axis=1)):
            return None
        full_steps = {s for s, full in zip(self.genome_steps, grid.all(axis=1), strict=True) if full}
        steps = tuple(sorted({*self.forced, *full_steps}))
        return steps, self.block_skip and bool(x[self.mask_size] > 0.5)

    def _block_skip_seeds(self, seeds: list[tuple[str, Schedule]]) -> list[tuple[str, Schedule]]:
        """Ours: each seed that reuses whole blocks again with `skip_reused_blocks` ("+skip"). FORA every N + skip is
        DeepCache-style refresh of the whole block stack every N steps."""
        out = []
        for name, schedule in seeds:
            plan = schedule.cache
            skipped = canonical_plan(plan.layout, plan.recompute, True)
            if skipped.skip_reused_blocks:
                out.append((f"{name}+skip", Schedule(schedule.model, schedule.solver, skipped,
                                                     meta={**schedule.meta, "baseline": f"{name}+skip"})))
        return out

    def _corner_seeds(self) -> list[tuple[str, Schedule]]:
        """Ours, beyond ECAD's generators: FORA every 2 / 3 inside the first, middle or last third of the evaluated
        steps (the mild-caching corner: on the builtin model reusing steps 2, 4, 6 of 20 keeps 40.3 dB at 1.17×
        fewer MACs), and FORA every 7 (the fast end, past every 5). Without them 16 generations never reach either
        end of the front, where FirstBlockCache and DeepCache-every-5 sit."""
        n, layout = self.num_steps - self.first, self.layout
        out = []
        if n >= 6:
            thirds = [round(k * (n - 1) / 3) + 1 for k in range(4)]  # [1, ..., n]: after the forced first step
            for name, (start, stop) in zip(("early", "middle", "late"), itertools.pairwise(thirds), strict=True):
                for k in (2, 3):
                    if stop - start > 1:
                        plan = windowed_every_n_cache_plan(layout, n, k, (start, stop))
                        out.append(self._schedule(f"fora-every{k}-{name}", plan))
        if n > 7:
            out.append(self._schedule("fora-every7", every_n_cache_plan(layout, n, 7, self.components)))
        return out

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        out = super().summary(schedule)
        if isinstance(schedule.cache, ComponentCachePlan):
            out.update(cache_summary(schedule.cache))
        return out


def cache_summary(plan: ComponentCachePlan) -> dict[str, Any]:
    """Decision columns of a component plan (shared with the joint space)."""
    full = "1" * plan.num_slots
    return {
        "recompute_fraction": plan.recompute_fraction(),
        "num_full_steps": sum(row == full for row in plan.recompute),
        "skip_reused_blocks": plan.skip_reused_blocks,
        **component_fractions(plan),
    }
