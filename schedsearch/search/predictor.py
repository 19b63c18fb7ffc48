"""S³'s predictor-based multi-stage search (Liu et al., ICLR 2024, §4).

Stage 0 evaluates an initial sample. Every later stage fits a performance predictor on all evaluations so far,
runs an evolutionary search on the predictor alone (cheap: no model is run), and evaluates only the top-k predicted
candidates. The paper's predictor is a learned network over the encoded solver schedule (not in the released code);
here it is a scikit-learn regressor per objective on the genome, and the evolution is pymoo's NSGA-II on the
predicted objectives. The predictor's quality is measured before it sees each stage's batch (Spearman ρ of its
predictions against the batch's measured values) and kept in `rank_correlations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2, RankAndCrowding
from pymoo.core.population import Population
from pymoo.core.problem import Problem
from pymoo.core.termination import NoTermination
from pymoo.operators.crossover.pntx import PointCrossover
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.bitflip import BitflipMutation
from pymoo.operators.mutation.pm import PM
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting
from scipy.stats import spearmanr
from sklearn.ensemble import ExtraTreesRegressor, GradientBoostingRegressor, RandomForestRegressor

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.search.pymoo_nsga import GenomeRepair
from schedsearch.spaces.base import GenomeSpec

__all__ = ["PredictorSearch"]

Surrogate = Literal["random_forest", "extra_trees", "gradient_boosting"]


class _PredictedProblem(Problem):
    """The surrogate as a pymoo problem; remembers every genome it scored, so all of them are candidates."""

    def __init__(self, spec: GenomeSpec, models: list[Any]) -> None:
        super().__init__(n_var=spec.size, n_obj=len(models), vtype=bool if spec.is_binary else float,
                         xl=np.array(spec.low, dtype=float), xu=np.array(spec.high, dtype=float))
        self.models = models
        self.seen_X: list[np.ndarray] = []
        self.seen_F: list[np.ndarray] = []

    def _evaluate(self, X: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        X = np.asarray(X, dtype=float)
        F = np.column_stack([m.predict(X) for m in self.models])
        self.seen_X.append(X)
        self.seen_F.append(F)
        out["F"] = F


class PredictorSearch(Strategy):
    """Predictor-based multi-stage search (S³ §4): evaluate `initial_size` genomes (`initial` + random), then per
    stage fit one `surrogate` regressor per objective, evolve `evolution_population` genomes for
    `evolution_generations` NSGA-II generations on the predictions, and propose the `batch` best predicted new
    genomes (non-dominated sorting, crowding distance for spread; never one already evaluated or `forbid`-den).
    Failed (+inf) evaluations are not fitted (a regressor cannot learn +inf) but are never proposed again.
    """

    name = "s3-predictor"

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 initial_size: int = 32, batch: int = 16, surrogate: Surrogate = "random_forest",
                 n_estimators: int = 100, evolution_population: int = 100, evolution_generations: int = 200,
                 forbid: Sequence[np.ndarray] = ()) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        if surrogate not in ("random_forest", "extra_trees", "gradient_boosting"):
            raise ValueError(f"PredictorSearch: unknown surrogate {surrogate!r}")
        self.initial_size = initial_size
        self.batch = batch
        self.surrogate = surrogate
        self.n_estimators = n_estimators
        self.evolution_population = evolution_population
        self.evolution_generations = evolution_generations
        self._forbidden = {genome_key(spec.clip(g)) for g in forbid}
        self._rng = np.random.default_rng(seed)
        self._X: list[np.ndarray] = []
        self._F: list[np.ndarray] = []
        self._known: set[bytes] = set()  # evaluated, asked or forbidden
        self._predicted: dict[bytes, np.ndarray] = {}  # predictions of asked genomes, made before they were told
        self._models: list[Any] = []
        self._stage = 0
        self.rank_correlations: list[dict[str, Any]] = []

    @property
    def batch_size(self) -> int:
        return self.initial_size if not self._X else self.batch

    def _new_model(self, objective: int) -> Any:
        state = self.seed * 1000 + objective
        if self.surrogate == "gradient_boosting":
            return GradientBoostingRegressor(n_estimators=self.n_estimators, random_state=state)
        cls = RandomForestRegressor if self.surrogate == "random_forest" else ExtraTreesRegressor
        return cls(n_estimators=self.n_estimators, min_samples_leaf=1, random_state=state)

    def _fit(self) -> None:
        X, F = np.array(self._X), np.array(self._F)
        ok = np.isfinite(F).all(axis=1)
        if ok.sum() < 2:
            self._models = []
            return
        self._models = [self._new_model(j).fit(X[ok], F[ok, j]) for j in range(self.n_objectives)]

    def predict(self, genomes: Sequence[np.ndarray]) -> np.ndarray:
        """Predicted objectives (len × n_objectives) of the current surrogate (fitted on everything told)."""
        if not self._models:
            raise RuntimeError("PredictorSearch.predict: no surrogate fitted yet (tell some finite values first)")
        X = np.array([self.spec.clip(g) for g in genomes])
        return np.column_stack([m.predict(X) for m in self._models])

    # -- ask --
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        n = self.batch_size if n is None else n
        if not self._models:  # stage 0 (or nothing learnable yet): seeds, then random genomes
            out: list[np.ndarray] = []
            for g in self.initial if not self._X else ():
                if len(out) < n and self._claim(g):
                    out.append(g)
            return out + self._random(n - len(out))
        return self._from_predictor(n)

    def _claim(self, genome: np.ndarray) -> bool:
        key = genome_key(genome)
        if key in self._known or key in self._forbidden:
            return False
        self._known.add(key)
        return True

    def _random(self, n: int) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for _ in range(100 * max(n, 0)):
            if len(out) >= n:
                break
            g = self.spec.random(self._rng)
            if self._claim(g):
                out.append(g)
        return out

    def _from_predictor(self, n: int) -> list[np.ndarray]:
        problem = _PredictedProblem(self.spec, self._models)
        algorithm = self._evolution(problem)
        for _ in range(self.evolution_generations):
            algorithm.next()
        X = np.vstack(problem.seen_X)
        F = np.vstack(problem.seen_F)
        _, first = np.unique(X, axis=0, return_index=True)
        fresh = [int(i) for i in np.sort(first)
                 if genome_key(X[i]) not in self._known and genome_key(X[i]) not in self._forbidden]
        out: list[np.ndarray] = []
        if fresh:
            pop = Population.new(X=X[fresh], F=F[fresh])
            survival = RankAndCrowding(nds=NonDominatedSorting(method="efficient_non_dominated_sort"))
            best = survival.do(problem, pop, n_survive=min(n, len(pop)), random_state=self._rng)
            for x, f in zip(best.get("X"), best.get("F"), strict=True):
                if self._claim(x):
                    out.append(np.array(x, dtype=float))
                    self._predicted[genome_key(x)] = np.asarray(f, dtype=float)
        rest = self._random(n - len(out))  # the predictor ran out of new ideas: explore
        if rest:
            for g, f in zip(rest, self.predict(rest), strict=True):
                self._predicted[genome_key(g)] = f
        return out + rest

    def _evolution(self, problem: _PredictedProblem) -> NSGA2:
        """NSGA-II on the predictor, seeded with the evaluated genomes' best (by measured values) and random ones."""
        X, F = np.array(self._X), np.array(self._F)
        ok = np.flatnonzero(np.isfinite(F).all(axis=1))
        P = self.evolution_population
        fronts = NonDominatedSorting(method="efficient_non_dominated_sort").do(F[ok], n_stop_if_ranked=P // 2)
        elite = X[ok[np.concatenate(fronts)][: P // 2]]
        random_rows = np.array([self.spec.random(self._rng) for _ in range(P - len(elite))]).reshape(-1, X.shape[1])
        sampling = np.vstack([elite, random_rows]).astype(bool if self.spec.is_binary else float)
        if self.spec.is_binary:
            crossover, mutation = PointCrossover(n_points=2, prob=0.9), BitflipMutation(prob=1.0)
        else:
            crossover, mutation = SBX(eta=15, prob=0.9), PM(eta=20)
        algorithm = NSGA2(pop_size=P, sampling=sampling, crossover=crossover, mutation=mutation,
                          repair=GenomeRepair(self.spec, self._forbidden, self.seed), eliminate_duplicates=True)
        algorithm.setup(problem, termination=NoTermination(), seed=int(self._rng.integers(2**31)), verbose=False)
        return algorithm

    # -- tell --
    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        genomes = [self.spec.clip(g) for g in genomes]
        self._record_quality(genomes, values)
        for g, v in zip(genomes, values, strict=True):
            self._X.append(g)
            self._F.append(v)
            self._known.add(genome_key(g))
        self._fit()
        self._stage += 1

    def _record_quality(self, genomes: list[np.ndarray], values: np.ndarray) -> None:
        """Spearman ρ per objective between the predictions made when the batch was asked and its measured values."""
        rows = [(self._predicted.pop(genome_key(g)), v) for g, v in zip(genomes, values, strict=True)
                if genome_key(g) in self._predicted and np.isfinite(v).all()]
        if not rows:
            return
        pred = np.array([p for p, _ in rows])
        real = np.array([v for _, v in rows])
        entry: dict[str, Any] = {"stage": self._stage, "n": len(rows)}
        for j in range(self.n_objectives):
            constant = len(rows) < 3 or np.ptp(pred[:, j]) == 0 or np.ptp(real[:, j]) == 0
            entry[f"f{j}"] = float("nan") if constant else float(spearmanr(pred[:, j], real[:, j]).statistic)
        self.rank_correlations.append(entry)

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """All stored evaluations become training data (no quality entry: nothing was predicted for them)."""
        if len(genomes):
            self._predicted.clear()
            self.tell(genomes, values)
