"""`ListSpace`: a space of given schedules (genome = index). No torch.

Lets a fixed list of schedules (a front to re-score on held-out seeds, imported schedules) run through the same
loop, deduplication and store as a search.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from schedsearch.spaces.base import GenomeSpec, SearchSpace
from schedsearch.spaces.schedule import Schedule

__all__ = ["ListSpace"]


class ListSpace(SearchSpace):
    name = "list"

    def __init__(self, schedules: Sequence[Schedule]) -> None:
        self.schedules = list(schedules)
        self.genome = GenomeSpec(("int",), (0.0,), (float(max(0, len(self.schedules) - 1)),))
        self.keys = [s.key for s in self.schedules]

    def decode(self, genome: Any) -> Schedule:
        return self.schedules[int(self.genome.clip(genome)[0])]

    def encode(self, schedule: Schedule) -> np.ndarray:
        return np.array([float(self.keys.index(schedule.key))])

    def genomes(self) -> list[np.ndarray]:
        return [self.encode(s) for s in self.schedules]

    def baselines(self) -> list[tuple[str, Schedule]]:
        return []
