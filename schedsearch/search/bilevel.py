"""Solver first, then caching on the best solvers: S³'s predictor on the solver genes of a joint genome, then ECAD's
GA on the cache genes of the best solver plans it found (ours; no seed method searches both).

Why two levels and not one GA over the whole joint genome: the two parts behave differently. Solver genes are few
and smooth (a random forest learns PSNR from them, S³ §4), while the cache mask is hundreds of bits whose meaning
depends on the solver (its step count and timesteps), where ECAD's GA and the reuse-error screen work. One GA over
both mostly perturbs the mask of whatever solver it started from; on the builtin DiT it stayed at 0.987 of the cache
front on held-out seeds. Here each part gets the search that suits it, and the mask search runs on solvers already
known to be good instead of DPM-Solver++ at a fixed step count.

Phase 1 asks uncached genomes only (the `solver` subproblem) until `solver_evaluations` are told. Phase 2 picks the
`anchors` solver plans of phase 1's front that are best in the first objective (the quality), and runs one GA per
anchor on its cache subproblem (`cache_for(anchor)`: its own seeds and screen), each generation from the anchor that
has had the fewest evaluations, so the anchors share the budget evenly. Every engine's state is a function of the
records (phase 1: S³'s predictor refitted on them; phase 2: each GA rebuilt from the records of its anchor), so a
resumed study continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.search.genetic import EcadGenetic, Screen
from schedsearch.search.predictor import PredictorSearch
from schedsearch.spaces.base import GenomeSpec

__all__ = ["BilevelSearch", "Subproblem"]


@dataclass(frozen=True)
class Subproblem:
    """Part of the joint genome searched on its own: its genes, and the maps to and from the whole genome.

    lift: sub-genome -> joint genome. lower: joint genome -> sub-genome, or None when the joint genome is not in
    this subproblem (another solver, or cached where the subproblem is uncached)."""

    spec: GenomeSpec
    lift: Callable[[np.ndarray], np.ndarray]
    lower: Callable[[np.ndarray], np.ndarray | None]
    initial: Sequence[np.ndarray] = ()
    forbid: Sequence[np.ndarray] = ()
    surrogate: Screen | None = field(default=None, compare=False)


class BilevelSearch(Strategy):
    """S³'s predictor on `solver`, then ECAD's GA on `cache_for(anchor)` for the best solver anchors (module
    docstring). `initial` genomes that lower into `solver` seed phase 1 (the others are ignored: the cache seeds come
    from `cache_for`). `solver_options` go to `PredictorSearch`, `cache_options` to each anchor's `EcadGenetic`."""

    name = "bilevel"

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 solver: Subproblem, cache_for: Callable[[np.ndarray], Subproblem], solver_evaluations: int,
                 anchors: int = 2, solver_options: dict[str, Any] | None = None,
                 cache_options: dict[str, Any] | None = None) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        if solver_evaluations < 1:
            raise ValueError(f"BilevelSearch: solver_evaluations must be ≥ 1, got {solver_evaluations}")
        if anchors < 1:
            raise ValueError(f"BilevelSearch: anchors must be ≥ 1, got {anchors}")
        self.solver, self.cache_for = solver, cache_for
        self.solver_evaluations, self.n_anchors = solver_evaluations, anchors
        self.cache_options = dict(cache_options or {})
        seeds = [s for s in (solver.lower(g) for g in self.initial) if s is not None]
        self._outer = PredictorSearch(solver.spec, n_objectives, seed=seed, initial=seeds or solver.initial,
                                      forbid=solver.forbid, **(solver_options or {}))
        # (solver genes, values) told, one per distinct solver (a proposal that decodes to a schedule already
        # evaluated is answered from the store without a new record), and how many were told in all: phase 1 ends
        # after `solver_evaluations` tells, so a predictor that repeats itself cannot hold it up
        self._phase1: list[tuple[np.ndarray, np.ndarray]] = []
        self._phase1_told = 0
        self._anchors: list[tuple[Subproblem, EcadGenetic]] = []
        self._anchor_genes: list[np.ndarray] = []
        self._told: list[set[bytes]] = []  # each anchor's distinct genomes told (set with the anchors)
        # joint genome -> the engines (-1: phase 1) that asked it and were not told yet: two sub-genomes may lift to
        # one joint genome (e.g. a block-skip bit that no fully reused block uses), even within one batch
        self._asked: dict[bytes, list[int]] = {}

    @property
    def batch_size(self) -> int:
        if not self._anchors:
            return min(self._outer.batch_size, self.solver_evaluations - self._phase1_told)
        return self._anchors[0][1].batch_size

    @property
    def anchors(self) -> list[np.ndarray]:
        """The anchors' solver genes (empty during phase 1)."""
        return [g.copy() for g in self._anchor_genes]

    # -- ask --
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if self._phase1_told < self.solver_evaluations:
            n = self.batch_size if n is None else min(n, self.solver_evaluations - self._phase1_told)
            return self._hand_out(-1, [self.solver.lift(g) for g in self._outer.ask(n)])
        self._start_phase2()
        for i in sorted(range(len(self._anchors)), key=lambda i: (len(self._told[i]), i)):
            sub, engine = self._anchors[i]
            genomes = engine.ask(n)
            if genomes:
                return self._hand_out(i, [sub.lift(g) for g in genomes])
        return []

    def _hand_out(self, engine: int, genomes: list[np.ndarray]) -> list[np.ndarray]:
        genomes = [self.spec.clip(g) for g in genomes]
        for g in genomes:
            self._asked.setdefault(genome_key(g), []).append(engine)
        return genomes

    def _start_phase2(self) -> None:
        """Pick the anchors (once): phase 1's non-dominated solver plans, best first objective first."""
        if self._anchors:
            return
        X = np.array([g for g, _ in self._phase1])
        F = np.array([v for _, v in self._phase1])
        ok = np.flatnonzero(np.isfinite(F).all(axis=1))
        if not len(ok):
            raise RuntimeError("BilevelSearch: every solver evaluation of phase 1 failed; nothing to cache")
        front = ok[NonDominatedSorting().do(F[ok], only_non_dominated_front=True)]
        order = front[np.lexsort((front, F[front, 0]))]
        self._anchor_genes = [X[i] for i in order[: self.n_anchors]]
        self._told = [set() for _ in self._anchor_genes]
        for i, genes in enumerate(self._anchor_genes):
            sub = self.cache_for(genes)
            engine = EcadGenetic(sub.spec, self.n_objectives, seed=self.seed * 1000 + i, initial=sub.initial,
                                 forbid=sub.forbid, surrogate=sub.surrogate, **self.cache_options)
            self._anchors.append((sub, engine))

    # -- tell --
    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        routed: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for g, v in zip(genomes, values, strict=True):
            g = self.spec.clip(g)
            engines = self._asked.get(genome_key(g))
            if not engines:
                raise ValueError("BilevelSearch.tell: a genome this strategy did not ask")
            engine = engines.pop(0)
            if not engines:
                del self._asked[genome_key(g)]
            sub = self.solver if engine < 0 else self._anchors[engine][0]
            routed.setdefault(engine, []).append((sub.lower(g), v))
        for engine, rows in routed.items():
            sub_genomes, sub_values = [g for g, _ in rows], np.array([v for _, v in rows])
            if engine < 0:
                self._outer.tell(sub_genomes, sub_values)
                self._phase1_told += len(rows)
                seen = {genome_key(g) for g, _ in self._phase1}
                for g, v in rows:
                    if genome_key(g) not in seen:
                        seen.add(genome_key(g))
                        self._phase1.append((g, v))
            else:
                self._anchors[engine][1].tell(sub_genomes, sub_values)
                self._told[engine] |= {genome_key(g) for g in sub_genomes}  # distinct, as records are

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Phase 1 from the uncached records (in order, up to `solver_evaluations`), finished if any record is
        cached (phase 2 had begun); then the anchors they imply, each GA warm-started from the records of its
        solver. A study stopped between phase 1's last tell and phase 2's first record tops phase 1 up to
        `solver_evaluations` distinct solvers instead."""
        if not len(genomes):
            return
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        genomes = [self.spec.clip(g) for g in genomes]
        lowered = [self.solver.lower(g) for g in genomes]
        first = [(s, v) for s, v in zip(lowered, values, strict=True) if s is not None][: self.solver_evaluations]
        if first:
            self._outer.warm_start([s for s, _ in first], np.array([v for _, v in first]))
            self._phase1 = list(first)
        cached = any(s is None for s in lowered)
        self._phase1_told = self.solver_evaluations if cached else len(self._phase1)
        if self._phase1_told < self.solver_evaluations:
            return
        self._start_phase2()
        for i, (sub, engine) in enumerate(self._anchors):
            rows = [(s, v) for s, v in ((sub.lower(g), v) for g, v in zip(genomes, values, strict=True))
                    if s is not None]
            if rows:
                engine.warm_start([s for s, _ in rows], np.array([v for _, v in rows]))
                self._told[i] = {genome_key(s) for s, _ in rows}
