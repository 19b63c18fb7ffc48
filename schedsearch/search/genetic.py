"""ECAD's genetic algorithm (Aggarwal et al. 2025, arXiv 2506, the search section and repo AniAggarwal/ecad), with deap.

NSGA-II (μ+λ) survival (`tools.selNSGA2`), binary tournament on dominance and crowding distance for parents
(`tools.selTournamentDCD`), 4-point crossover with p=0.9, population 72, seed 0. Mutation is ECAD's released
`BitflipMutation(prob=0.05)` with pymoo ≥ 0.6 semantics (ecad/genetic/train_nsga2_base.py): a child is mutated with
probability 0.05, and a mutated child flips each bit with probability 1/n (pymoo's default `prob_var`), so about one
bit. (Reading "p=0.05" per bit instead flips ~11 of the builtin model's 228 bits in every child, and the search
then never refines a schedule it has found.) Genes that are not bits (other spaces) get SBX crossover
(`tools.cxSimulatedBinaryBounded`) and polynomial bounded mutation on every child (`tools.mutPolynomialBounded`,
1/n per gene, pymoo's PM defaults), then `GenomeSpec.clip` rounds the integers.

Ours, both off by default (ECAD's own GA): `surrogate`, a free predictor of the objective vector, lets each generation
breed `screen_pool` times the children it evaluates and run only the best predicted (surrogate pre-selection);
`initial_limit` bounds generation 0 to a diverse part of the seeds, the rest entering later generations as
immigrants, so that at small budgets the GA breeds instead of working through hundreds of seeds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from deap import base, tools
from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.spaces.base import GenomeSpec

__all__ = ["EcadGenetic", "Screen", "k_point_crossover", "rank_by_prediction"]

# genomes -> their predicted objective vectors (len × n_objectives, minimised), with no model call
Screen = Callable[[Sequence[np.ndarray]], np.ndarray]

FAILED_VALUE = 1e300  # finite stand-in for +inf so crowding distances stay finite; dominated by every real value


class _Individual(list):
    """A genome as deap wants it: a mutable list of floats with a `fitness` attribute."""

    fitness: base.Fitness


def k_point_crossover(ind1: list, ind2: list, k: int) -> tuple[list, list]:
    """Swap every other of the k+1 segments between k distinct random cut points (deap has only 1- and 2-point).

    Uses the `random` module like deap's own operators, so it follows the same seeding."""
    size = min(len(ind1), len(ind2))
    k = min(k, size - 1)
    if k <= 0:
        return ind1, ind2
    cuts = [*sorted(random.sample(range(1, size), k)), size]
    for a, b in zip(cuts[0::2], cuts[1::2], strict=False):
        ind1[a:b], ind2[a:b] = ind2[a:b], ind1[a:b]
    return ind1, ind2


class EcadGenetic(Strategy):
    """ECAD's NSGA-II over genomes (ECAD's defaults: population 72, 4-point crossover p=0.9, a child mutated with
    p=0.05 by flipping each bit with p=1/n; `bit_flip_prob` overrides the 1/n).

    `ask()` returns one generation: first the initial population (`initial` topped up with random genomes), then
    offspring of the current population. `tell()` merges the evaluated candidates into the population and keeps the
    NSGA-II best `population` ((μ+λ) survival). `forbid` lists genomes never to propose (ECAD: all-recompute).
    The random state after every tell is a function of (seed, number of evaluations told), and `warm_start` rebuilds
    the population as the NSGA-II best of all records, so a study resumed after a generation asks what the
    uninterrupted one would have asked next.

    `surrogate` (ours): offspring are bred `screen_pool` times over (with the waiting immigrants) and the `population`
    best by predicted non-dominated rank and crowding among the pool and the population's own predictions are
    asked; the others are forgotten, so the state stays a function of the records. `initial_limit` (ours): at most
    this many seeds in generation 0 (the best predicted with a surrogate, else a spread in Hamming distance); the
    others wait as immigrants (screened into the pool with a surrogate, else a quarter of each generation).
    """

    name = "ecad-ga"

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 population: int = 72, crossover_points: int = 4, crossover_prob: float = 0.9,
                 mutation_prob: float = 0.05, bit_flip_prob: float | None = None, sbx_eta: float = 15.0,
                 mutation_eta: float = 20.0, forbid: Sequence[np.ndarray] = (), max_retries: int = 50,
                 surrogate: Screen | None = None, screen_pool: int = 8, initial_limit: int | None = None) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        if population < 2:
            raise ValueError(f"EcadGenetic: population must be ≥ 2, got {population}")
        if screen_pool < 1:
            raise ValueError(f"EcadGenetic: screen_pool must be ≥ 1, got {screen_pool}")
        if initial_limit is not None and initial_limit < 1:
            raise ValueError(f"EcadGenetic: initial_limit must be ≥ 1, got {initial_limit}")
        self.surrogate, self.screen_pool, self.initial_limit = surrogate, screen_pool, initial_limit
        self._predicted: dict[bytes, np.ndarray] = {}
        self._immigrants: list[np.ndarray] = []
        self.population_size = population
        self.crossover_points = crossover_points
        self.crossover_prob = crossover_prob
        for field, value in (("mutation_prob", mutation_prob), ("bit_flip_prob", bit_flip_prob)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"EcadGenetic: {field} must lie in [0, 1], got {value}")
        self.mutation_prob = mutation_prob
        self.bit_flip_prob = min(0.5, 1.0 / spec.size) if bit_flip_prob is None else bit_flip_prob
        self.sbx_eta = sbx_eta
        self.mutation_eta = mutation_eta
        self.max_retries = max_retries
        self._forbidden = {genome_key(spec.clip(g)) for g in forbid}
        self._fitness_cls = type(f"_Fitness{n_objectives}", (base.Fitness,), {"weights": (-1.0,) * n_objectives})
        kinds = np.array(spec.kinds)
        fixed = np.array(spec.low) == np.array(spec.high)
        self._bits = np.flatnonzero(kinds == "bit").tolist()
        self._numeric = np.flatnonzero((kinds != "bit") & ~fixed).tolist()  # fixed genes: nothing to vary
        self._low = [spec.low[i] for i in self._numeric]
        self._high = [spec.high[i] for i in self._numeric]
        self.population: list[_Individual] = []  # evaluated survivors
        self._queue: list[np.ndarray] = []
        self._seen: set[bytes] = set()
        self._n_told = 0
        self._started = False
        self._reseed(0)

    @property
    def batch_size(self) -> int:
        return self.population_size

    # -- randomness: numpy for fresh genomes, the `random` module (what deap uses) swapped in for the operators --
    def _reseed(self, n_told: int) -> None:
        self._rng = np.random.default_rng([self.seed, n_told])
        self._py_state = random.Random(int(self._rng.integers(2**63))).getstate()

    @contextmanager
    def _deap_random(self) -> Iterator[None]:
        outer = random.getstate()
        random.setstate(self._py_state)
        try:
            yield
        finally:
            self._py_state = random.getstate()
            random.setstate(outer)

    # -- ask --
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if not self._queue:
            self._queue = self._next_generation()
        n = len(self._queue) if n is None else n
        out, self._queue = self._queue[:n], self._queue[n:]
        return [g.copy() for g in out]

    def _next_generation(self) -> list[np.ndarray]:
        if not self._started:
            self._started = True
            seeds = [g for g in self.initial if self._admit(g)]
            if self.initial_limit is not None and len(seeds) > self.initial_limit:
                chosen = set(self._diverse(seeds, self.initial_limit))
                self._immigrants = [g for i, g in enumerate(seeds) if i not in chosen]
                seeds = [g for i, g in enumerate(seeds) if i in chosen]
            return seeds + self._random_genomes(self.population_size - len(seeds))
        if not self.population:  # the initial generation was asked but not told yet: more random ones
            return self._random_genomes(self.population_size)
        if self.surrogate is not None:
            return self._screened_offspring(self.population_size)
        n_immigrants = min(len(self._immigrants), self.population_size // 4)
        immigrants, self._immigrants = self._immigrants[:n_immigrants], self._immigrants[n_immigrants:]
        return self._offspring(self.population_size - n_immigrants) + immigrants

    # -- ours: bounded seeds and screened offspring --
    def _predict(self, genomes: Sequence[np.ndarray]) -> np.ndarray:
        """The screen's predictions, remembered per genome (the population is predicted again every generation)."""
        keys = [genome_key(g) for g in genomes]
        new = [i for i, k in enumerate(keys) if k not in self._predicted]
        if new:
            values = np.asarray(self.surrogate([genomes[i] for i in new]), dtype=float).reshape(len(new), -1)
            for i, v in zip(new, values, strict=True):
                self._predicted[keys[i]] = v
        return np.array([self._predicted[k] for k in keys]).reshape(len(keys), -1)

    def _diverse(self, seeds: list[np.ndarray], k: int) -> list[int]:
        """Indices of k seeds: the best predicted with a screen, else a greedy farthest-point spread in Hamming
        distance from the first seed (deterministic, so a resumed study picks the same)."""
        if self.surrogate is not None:
            return rank_by_prediction(self._predict(seeds), np.arange(len(seeds)), k)
        bits = np.array(seeds)
        chosen = [0]
        distance = np.abs(bits - bits[0]).sum(axis=1)
        while len(chosen) < k:
            best = int(np.argmax(distance))
            chosen.append(best)
            distance = np.minimum(distance, np.abs(bits - bits[best]).sum(axis=1))
        return chosen

    def _screened_offspring(self, n: int) -> list[np.ndarray]:
        """`n` of `screen_pool × n` children and the waiting immigrants, chosen by predicted rank and crowding
        against the population's predictions; the rest are un-proposed (their keys leave `_seen`)."""
        children = self._offspring(n * self.screen_pool)
        pool = children + self._immigrants
        population = self.population_genomes()
        predicted = self._predict(population + pool)
        candidates = np.arange(len(population), len(population) + len(pool))
        picked = {int(i) - len(population) for i in rank_by_prediction(predicted, candidates, n)}
        kept = {genome_key(children[i]) for i in picked if i < len(children)}
        for genome in children:
            if genome_key(genome) not in kept:
                self._seen.discard(genome_key(genome))
        immigrants = [g for j, g in enumerate(self._immigrants) if len(children) + j in picked]
        self._immigrants = [g for j, g in enumerate(self._immigrants) if len(children) + j not in picked]
        return [g for i, g in enumerate(children) if i in picked] + immigrants

    def _admit(self, genome: np.ndarray) -> bool:
        """True (and remember it) if the genome is neither forbidden nor already proposed/evaluated."""
        key = genome_key(genome)
        if key in self._forbidden or key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _random_genomes(self, n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        tries = 0
        while len(out) < n and tries < n * self.max_retries:
            tries += 1
            g = self.spec.random(self._rng)
            if self._admit(g):
                out.append(g)
        return out

    def _offspring(self, n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with self._deap_random():
            parents = self._select_parents(n + n % 2)
            for p1, p2 in zip(parents[0::2], parents[1::2], strict=True):
                for child in self._mate(p1, p2):
                    if len(out) < n:
                        out.append(self._unique_child(child, p1, p2))
        return [g for g in out if g is not None]

    def _select_parents(self, n: int) -> list[_Individual]:
        pop = self.population
        if len(pop) < 4:
            return [random.choice(pop) for _ in range(n)]
        chosen: list[_Individual] = []
        while len(chosen) < n:
            chosen += tools.selTournamentDCD(pop, len(pop) - len(pop) % 4)
        return chosen[:n]

    def _mate(self, p1: _Individual, p2: _Individual) -> tuple[list, list]:
        c1, c2 = list(p1), list(p2)
        if random.random() < self.crossover_prob:
            k_point_crossover(c1, c2, self.crossover_points)
            if self._numeric:
                n1, n2 = [c1[i] for i in self._numeric], [c2[i] for i in self._numeric]
                tools.cxSimulatedBinaryBounded(n1, n2, self.sbx_eta, self._low, self._high)
                for j, i in enumerate(self._numeric):
                    c1[i], c2[i] = n1[j], n2[j]
        return self._mutate(c1), self._mutate(c2)

    def _mutate(self, genes: list, force: bool = False) -> list:
        """Bits: with probability `mutation_prob` (always when `force`), flip each with `bit_flip_prob`.
        Numeric genes: polynomial mutation on every child."""
        genes = list(genes)
        if self._bits and (force or random.random() < self.mutation_prob):
            bits = [genes[i] for i in self._bits]
            tools.mutFlipBit(bits, indpb=self.bit_flip_prob)
            for j, i in enumerate(self._bits):
                genes[i] = bits[j]
        if self._numeric:
            num = [genes[i] for i in self._numeric]
            tools.mutPolynomialBounded(num, self.mutation_eta, self._low, self._high, indpb=1.0 / len(num))
            for j, i in enumerate(self._numeric):
                genes[i] = num[j]
        return genes

    def _unique_child(self, child: list, p1: _Individual, p2: _Individual) -> np.ndarray | None:
        """The child, re-mutated while it is forbidden or a duplicate (pymoo's `eliminate_duplicates`); a forbidden
        child that stays forbidden becomes a random genome; a duplicate one is kept rather than lost."""
        genome = self.spec.clip(child)
        for _ in range(self.max_retries):
            if self._admit(genome):
                return genome
            genome = self.spec.clip(self._mutate(random.choice((p1, p2)), force=True))
        if genome_key(genome) not in self._forbidden:
            return genome
        fresh = self._random_genomes(1)
        return fresh[0] if fresh else None

    # -- tell --
    def _individual(self, genome: np.ndarray, values: np.ndarray) -> _Individual:
        ind = _Individual(float(v) for v in genome)
        ind.fitness = self._fitness_cls(tuple(np.where(np.isfinite(values), values, FAILED_VALUE)))
        return ind

    def _survive(self, candidates: list[_Individual]) -> list[_Individual]:
        """NSGA-II selection of `population` individuals; a vectorised non-dominated sort first keeps only the fronts
        needed, so that rebuilding from a large store stays fast (deap's sort is quadratic in pure Python)."""
        k = min(self.population_size, len(candidates))
        if len(candidates) > 4 * k:
            F = np.array([ind.fitness.values for ind in candidates])
            fronts = NonDominatedSorting(method="efficient_non_dominated_sort").do(F, n_stop_if_ranked=k)
            keep = sorted(int(i) for front in fronts for i in front)
            candidates = [candidates[i] for i in keep]
        return tools.selNSGA2(candidates, k)

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        told = [self._individual(self.spec.clip(g), v) for g, v in zip(genomes, values, strict=True)]
        for ind in told:
            self._seen.add(genome_key(np.asarray(ind)))
        self._started = True
        self.population = self._survive(self.population + told)
        self._n_told += len(told)
        self._reseed(self._n_told)

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Population = NSGA-II best `population` of all stored evaluations (first occurrence of each genome)."""
        if not len(genomes):
            return
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        records: dict[bytes, _Individual] = {}
        for g, v in zip(genomes, values, strict=True):
            g = self.spec.clip(g)
            records.setdefault(genome_key(g), self._individual(g, v))
        self._seen.update(records)
        self._started = True
        # seeds not in the store yet (a study resumed by a newer schedsearch, or given new seeds) go first, or wait
        # as immigrants where generation 0 was bounded
        waiting = [g for g in (self.spec.clip(x) for x in self.initial) if self._admit(g)]
        if self.initial_limit is not None:
            self._immigrants = waiting
        else:
            self._queue = waiting
        self.population = self._survive(list(records.values()))
        self._n_told = len(genomes)
        self._reseed(self._n_told)

    def population_genomes(self) -> list[np.ndarray]:
        """The current (evaluated) population, as genomes."""
        return [np.array(ind, dtype=float) for ind in self.population]


def rank_by_prediction(values: np.ndarray, candidates: np.ndarray, k: int) -> list[int]:
    """Up to k of the row indices `candidates`, in NSGA-II order of `values` (minimised): by non-dominated front
    of all rows (the other rows compete but are never chosen), then by crowding distance within a front."""
    fronts = NonDominatedSorting().do(values)
    wanted = set(int(c) for c in candidates)
    out: list[int] = []
    for front in fronts:
        crowding = calc_crowding_distance(values[front]) if len(front) > 2 else np.full(len(front), np.inf)
        order = np.lexsort((front, -crowding))  # most isolated first; ties by index, deterministic
        out += [int(front[i]) for i in order if int(front[i]) in wanted]
        if len(out) >= k:
            break
    return out[:k]
