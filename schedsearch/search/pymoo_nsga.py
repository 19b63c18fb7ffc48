"""pymoo's NSGA-II (Deb et al. 2002) / NSGA-III (Deb & Jain 2014, ≥ 3 objectives) driven by ask/tell.

The `nsga2` strategy. ECAD's released code runs on pymoo too, but this engine is not ECAD's configuration: on bit
genomes it uses 4-point crossover p=0.9 and *per-bit* mutation, every child mutated with each bit flipped at
`bit_flip_prob` = 0.05 (pymoo `BitflipMutation(prob=1.0, prob_var=0.05)`; about 11 flips per child on the builtin
228-bit cache genome). ECAD's `BitflipMutation(prob=0.05)` mutates 5% of children with 1/n per bit; that is the
`ecad` strategy (`search/genetic.py`). On mixed genomes: pymoo's defaults, SBX (η=15, p=0.9) and polynomial mutation
(η=20). A repair rounds through `GenomeSpec.clip`. A failed candidate
(+inf) is told as infeasible (one inequality constraint violated), so feasibility-first survival drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.evaluator import Evaluator
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.repair import Repair
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.pntx import PointCrossover
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.operators.mutation.pm import PM
from pymoo.operators.sampling.rnd import BinaryRandomSampling, FloatRandomSampling
from pymoo.problems.static import StaticProblem
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from pymoo.util.ref_dirs import get_reference_directions

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.spaces.base import GenomeSpec

__all__ = ["GenomeRepair", "PymooNSGA"]

FAILED_VALUE = 1e300  # objective stand-in for failed (infeasible) candidates; survival never compares it


class GenomeRepair(Repair):
    """Round and clip each row with `GenomeSpec.clip`; replace forbidden genomes with random ones."""

    def __init__(self, spec: GenomeSpec, forbidden: set[bytes], seed: int) -> None:
        super().__init__()
        self.spec, self.forbidden = spec, forbidden
        self.rng = np.random.default_rng([seed, 1])

    def _do(self, problem: Problem, X: np.ndarray, **kwargs: Any) -> np.ndarray:
        out = np.array([self.spec.clip(x) for x in X]).reshape(len(X), self.spec.size)
        for i, x in enumerate(out):
            while genome_key(x) in self.forbidden:
                x = self.spec.random(self.rng)
            out[i] = x
        return out.astype(bool) if self.spec.is_binary else out  # pymoo's bit operators want booleans


class PymooNSGA(Strategy):
    """NSGA-II (NSGA-III with Das-Dennis reference directions when n_objectives ≥ 3) through pymoo's ask/tell.

    `ask()` returns one generation (`population` genomes; the first is `initial` topped up by pymoo's random
    sampling); the generation is told to pymoo once all of it has values. `warm_start` tells the stored records
    as the initial population and keeps its NSGA best `population`.
    """

    name = "pymoo-nsga"

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 population: int = 72, crossover_prob: float = 0.9, crossover_points: int = 4,
                 bit_flip_prob: float = 0.05, sbx_eta: float = 15.0, mutation_eta: float = 20.0,
                 forbid: Sequence[np.ndarray] = ()) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        self.population_size = population
        self.crossover_prob = crossover_prob
        self.crossover_points = crossover_points
        self.bit_flip_prob = bit_flip_prob
        self.sbx_eta = sbx_eta
        self.mutation_eta = mutation_eta
        self._forbidden = {genome_key(spec.clip(g)) for g in forbid}
        self._dtype = bool if spec.is_binary else float  # pymoo's bit operators want booleans
        self.problem = Problem(n_var=spec.size, n_obj=n_objectives, n_ieq_constr=1, vtype=self._dtype,
                               xl=np.array(spec.low, dtype=float), xu=np.array(spec.high, dtype=float))
        self.algorithm = self._setup(self._initial_population(), seed)
        self._generation: Population | None = None
        self._values: list[np.ndarray | None] = []
        self._queue: list[int] = []
        self._extra: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def batch_size(self) -> int:
        return self.population_size

    def _initial_population(self) -> np.ndarray:
        seeds: dict[bytes, np.ndarray] = {}
        for g in self.initial:
            if genome_key(g) not in self._forbidden:
                seeds.setdefault(genome_key(g), g)
        missing = self.population_size - len(seeds)
        sampling = BinaryRandomSampling() if self.spec.is_binary else FloatRandomSampling()
        rows = [*seeds.values()]
        if missing > 0:
            sampled = sampling.do(self.problem, missing, random_state=np.random.default_rng([self.seed, 0]))
            rows += list(sampled.get("X").astype(float))
        return np.array(rows, dtype=float).reshape(len(rows), self.spec.size).astype(self._dtype)

    def _setup(self, sampling: np.ndarray | Population, seed: int | list[int]) -> NSGA2:
        if self.spec.is_binary:
            crossover = PointCrossover(n_points=self.crossover_points, prob=self.crossover_prob)
            mutation = BitflipMutation(prob=1.0, prob_var=self.bit_flip_prob)
        else:
            crossover = SBX(eta=self.sbx_eta, prob=self.crossover_prob)
            mutation = PM(eta=self.mutation_eta)
        repair = GenomeRepair(self.spec, self._forbidden, self.seed)
        if not isinstance(sampling, Population):
            sampling = Population.new(X=np.asarray(sampling))
        options = dict(pop_size=self.population_size, sampling=sampling,
                       crossover=crossover, mutation=mutation, repair=repair, eliminate_duplicates=True)
        if self.n_objectives >= 3:
            p = 1
            while comb(p + 1 + self.n_objectives - 1, self.n_objectives - 1) <= self.population_size:
                p += 1
            ref_dirs = get_reference_directions("das-dennis", self.n_objectives, n_partitions=p)
            algorithm = NSGA3(ref_dirs=ref_dirs, **options)
        else:
            algorithm = NSGA2(**options)
        algorithm.setup(self.problem, termination=NoTermination(), seed=seed, verbose=False)
        return algorithm

    def _evaluated(self, X: np.ndarray, F: np.ndarray) -> Population:
        failed = ~np.isfinite(F).all(axis=1)
        pop = Population.new(X=np.asarray(X).astype(self._dtype))
        static = StaticProblem(self.problem, F=np.where(np.isfinite(F), F, FAILED_VALUE),
                               G=np.where(failed, 1.0, -1.0)[:, None])
        Evaluator().eval(static, pop)
        return pop

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if not self._queue:
            if self._generation is not None:  # asked again before the whole generation was told: tell what we have
                self._flush()
            self._generation = self.algorithm.ask()
            self._values = [None] * len(self._generation)
            self._queue = list(range(len(self._generation)))
        n = len(self._queue) if n is None else n
        picked, self._queue = self._queue[:n], self._queue[n:]
        X = self._generation.get("X")
        return [np.array(X[i], dtype=float) for i in picked]

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        open_rows: dict[bytes, list[int]] = {}
        if self._generation is not None:
            for i, x in enumerate(self._generation.get("X").astype(float)):
                if self._values[i] is None:
                    open_rows.setdefault(genome_key(x), []).append(i)
        for g, v in zip(genomes, values, strict=True):
            rows = open_rows.get(genome_key(self.spec.clip(g)))
            if rows:
                self._values[rows.pop(0)] = v
            else:
                self._extra.append((self.spec.clip(g), v))
        if self._generation is None or all(v is not None for v in self._values):
            self._flush()

    def _flush(self) -> None:
        """Tell pymoo the evaluated part of the current generation plus any extra evaluated genomes."""
        X: list[np.ndarray] = [g for g, _ in self._extra]
        F: list[np.ndarray] = [v for _, v in self._extra]
        if self._generation is not None:
            for x, v in zip(self._generation.get("X"), self._values, strict=True):
                if v is not None:
                    X.append(np.asarray(x, dtype=float))
                    F.append(v)
        self._generation, self._values, self._queue, self._extra = None, [], [], []
        if X:
            self.algorithm.tell(infills=self._evaluated(np.array(X), np.array(F)))

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Fresh algorithm whose initial population is the best `population` stored records (rank, crowding)."""
        if not len(genomes):
            return
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        records: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        for g, v in zip(genomes, values, strict=True):
            records.setdefault(genome_key(self.spec.clip(g)), (self.spec.clip(g), v))
        X = np.array([g for g, _ in records.values()])
        F = np.array([v for _, v in records.values()])
        keep = self._best_fronts(F, 2 * self.population_size)
        pop = self._evaluated(X[keep], F[keep])
        self.algorithm = self._setup(pop, [self.seed, len(genomes)])
        self.algorithm.tell(infills=self.algorithm.ask())  # initial "infill" = the evaluated records
        alg = self.algorithm
        alg.pop = alg.survival.do(self.problem, alg.pop, n_survive=min(self.population_size, len(alg.pop)),
                                  algorithm=alg, random_state=alg.random_state)
        self._generation, self._values, self._queue, self._extra = None, [], [], []

    @staticmethod
    def _best_fronts(F: np.ndarray, n: int) -> np.ndarray:
        """Indices of the first non-dominated fronts holding ≥ n finite rows (then failed rows if too few)."""
        finite = np.flatnonzero(np.isfinite(F).all(axis=1))
        failed = np.flatnonzero(~np.isfinite(F).all(axis=1))
        if len(finite) > n:
            fronts = NonDominatedSorting(method="efficient_non_dominated_sort").do(F[finite], n_stop_if_ranked=n)
            finite = np.sort(finite[np.concatenate(fronts)])
        return np.concatenate([finite, failed[: max(0, n - len(finite))]]).astype(int)

    def population_genomes(self) -> list[np.ndarray]:
        """The current (evaluated) population, as genomes."""
        pop = self.algorithm.pop
        return [] if pop is None else [np.array(x, dtype=float) for x in pop.get("X")]
