"""The strategy contract (ask/tell over genomes) and the study budget. No torch.

Strategies propose genomes of a `GenomeSpec` and learn from objective vectors that are always *minimised*
(the loop flips maximised objectives before `tell`). A failed evaluation is told as a row of +inf, so every
strategy sees every candidate it asked for. State is rebuilt from records (`warm_start`), as optuna's GA
samplers do, so a killed study resumes without pickles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from schedsearch.spaces.base import GenomeSpec


class Strategy(ABC):
    """Proposes genomes. Subclasses take `spec`, `n_objectives` and `seed` (keyword-only options after that)."""

    name: str = ""

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0,
                 initial: Sequence[np.ndarray] = ()) -> None:
        self.spec = spec
        self.n_objectives = n_objectives
        self.seed = seed
        self.initial = [spec.clip(g) for g in initial]  # seeds of the first population (encoded baselines)

    @abstractmethod
    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """Up to `n` genomes to evaluate next (None: the strategy's natural batch, e.g. one generation).
        An empty list means the strategy has nothing more to propose (e.g. an exhaustive DP sweep is done)."""

    @abstractmethod
    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Objective vectors (len(genomes) × n_objectives, minimised, +inf for failures) of asked genomes."""

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Resume from earlier evaluations of this study; default: treat them as told."""
        if len(genomes):
            self.tell(genomes, values)

    @property
    def batch_size(self) -> int:
        """How many evaluations the strategy wants before it can tell (one generation for GAs)."""
        return 1


@dataclass(frozen=True)
class Budget:
    """When a study stops: whichever limit comes first. None = no limit of that kind."""

    evaluations: int | None = None
    wall_time_s: float | None = None
    generations: int | None = None
    forward_passes: int | None = None  # model work: denoiser rows (one sample at one step; a CFG pair is two)

    def __post_init__(self) -> None:
        names = ("evaluations", "wall_time_s", "generations", "forward_passes")
        if all(getattr(self, name) is None for name in names):
            raise ValueError(f"Budget: give at least one of {', '.join(names)}")
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"Budget.{name} must be positive, got {value}")

    def spent(self, evaluations: int, wall_time_s: float, generations: int, forward_passes: int = 0) -> bool:
        return (
            (self.evaluations is not None and evaluations >= self.evaluations)
            or (self.wall_time_s is not None and wall_time_s >= self.wall_time_s)
            or (self.generations is not None and generations >= self.generations)
            or (self.forward_passes is not None and forward_passes >= self.forward_passes)
        )


def genome_key(genome: np.ndarray | Sequence[float]) -> bytes:
    """Hashable identity of a genome (its float64 bytes): how strategies recognise one already asked or forbidden."""
    return np.asarray(genome, dtype=float).tobytes()


def as_value_matrix(values: np.ndarray | Sequence[Sequence[float]], n: int, m: int) -> np.ndarray:
    """Validated (n, m) float array; NaN becomes +inf (a failed metric is the worst value)."""
    arr = np.asarray(values, dtype=float).reshape(n, m) if n else np.zeros((0, m))
    return np.where(np.isnan(arr), np.inf, arr)
