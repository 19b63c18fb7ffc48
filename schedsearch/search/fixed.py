"""`FixedStrategy`: asks a given list of genomes once, then nothing. No torch.

What runs a precomputed answer through the same loop and store as a search: DC-Solver's fitted ratios, the
held-out re-scoring of a front, the baselines of a benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schedsearch.search.base import Strategy, as_value_matrix, genome_key

__all__ = ["FixedStrategy", "score_schedules"]


class FixedStrategy(Strategy):
    """Asks a precomputed list of genomes once (dc-fit's fitted ratios, imported schedules), then nothing."""

    name = "fixed"

    def __init__(self, spec: Any, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 genomes: Sequence[np.ndarray] = ()) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        self._pending = [spec.clip(g) for g in genomes]
        self.values = np.zeros((0, n_objectives))

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        count = len(self._pending) if n is None else n
        out, self._pending = self._pending[:count], self._pending[count:]
        return out

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        self.values = np.concatenate([self.values, as_value_matrix(values, len(genomes), self.n_objectives)])

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        done = {genome_key(g) for g in genomes}
        self._pending = [g for g in self._pending if genome_key(g) not in done]


def score_schedules(study: str, schedules: Sequence[Any], objectives: dict[str, str], evaluator: Any, store: Any,
                    *, progress: bool = False) -> Any:
    """Score a fixed list of schedules into `study` through the study loop (stored as they finish, answered by the
    store where already scored, resumable): the space's baselines beside a search, a front on held-out seeds."""
    from schedsearch.search.base import Budget
    from schedsearch.search.loop import run_study
    from schedsearch.spaces.listed import ListSpace

    listed = ListSpace(schedules)
    strategy = FixedStrategy(listed.genome, len(objectives), genomes=listed.genomes())
    # one ask holds every schedule the study lacks (a budget in evaluations would count its earlier records too)
    return run_study(study=study, space=listed, strategy=strategy, objectives=objectives, evaluator=evaluator,
                     store=store, budget=Budget(generations=1), progress=progress)
