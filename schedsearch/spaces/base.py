"""The search-space contract: a space turns flat genomes into valid `Schedule`s and back. Plain numpy, no torch.

A genome is a 1-D float array; each gene has a kind ("bit" ∈ {0, 1}, "int" in [low, high], "real" in [low, high]).
Strategies only see genomes and the `GenomeSpec`; spaces alone know what a gene means, so every strategy works on
every space. `decode` repairs any genome inside the bounds into a valid schedule (monotone timesteps, orders the
history allows, ...), so strategies never need to know the constraints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from schedsearch.spaces.schedule import Schedule

GeneKind = Literal["bit", "int", "real"]
GENE_KINDS = ("bit", "int", "real")


@dataclass(frozen=True)
class GenomeSpec:
    """Kinds and inclusive bounds of every gene, and a name per gene for plots and errors."""

    kinds: tuple[GeneKind, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.kinds)
        if len(self.low) != n or len(self.high) != n or (self.names and len(self.names) != n):
            raise ValueError(f"GenomeSpec: kinds/low/high/names lengths differ ({n}, {len(self.low)}, "
                             f"{len(self.high)}, {len(self.names)})")
        bad = [k for k in self.kinds if k not in GENE_KINDS]
        if bad:
            raise ValueError(f"GenomeSpec.kinds: unknown {bad}; use {GENE_KINDS}")
        if any(lo > hi for lo, hi in zip(self.low, self.high, strict=True)):
            raise ValueError("GenomeSpec: a gene has low > high")

    @property
    def size(self) -> int:
        return len(self.kinds)

    @property
    def is_binary(self) -> bool:
        return all(k == "bit" for k in self.kinds)

    @staticmethod
    def bits(n: int, names: Sequence[str] = ()) -> GenomeSpec:
        return GenomeSpec(("bit",) * n, (0.0,) * n, (1.0,) * n, tuple(names))

    @staticmethod
    def concat(*specs: GenomeSpec) -> GenomeSpec:
        return GenomeSpec(
            tuple(k for s in specs for k in s.kinds),
            tuple(v for s in specs for v in s.low),
            tuple(v for s in specs for v in s.high),
            tuple(n for s in specs for n in (s.names or ("",) * s.size)) if any(s.names for s in specs) else (),
        )

    def clip(self, genome: np.ndarray) -> np.ndarray:
        """Inside the bounds, integers and bits rounded: what every space's decode starts from."""
        x = np.clip(np.asarray(genome, dtype=float).reshape(-1), self.low, self.high)
        if x.size != self.size:
            raise ValueError(f"genome: expected {self.size} genes, got {x.size}")
        discrete = np.array([k != "real" for k in self.kinds])
        x[discrete] = np.rint(x[discrete])
        return x

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """Uniform over each gene's range (every integer value equally likely)."""
        lo, hi = np.array(self.low), np.array(self.high)
        discrete = np.array([k != "real" for k in self.kinds])
        x = lo + rng.random(self.size) * (hi - lo)
        x[discrete] = np.floor(lo[discrete] + rng.random(int(discrete.sum())) * (hi - lo + 1)[discrete])
        return self.clip(x)


@dataclass(frozen=True)
class ModelStructure:
    """The plain integers and names a space is built from (DESIGN: spaces never see the model itself)."""

    name: str
    num_train_timesteps: int
    layout: str  # component slot layout of the cache plan, see cache_plan.layout_of
    num_blocks: int
    unit_group: str = ""  # block group path a unit cache addresses ("deepcache" for a UNet's deep branch)
    unit_blocks: int = 0  # blocks in that group (1 for the deepcache branch)
    has_cross_attention: bool = False
    block_skip: bool = False  # blocks can be skipped whole (diffusers knows where their states are): transformers
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


class SearchSpace(ABC):
    """What can be searched. Subclasses fix `name` and build `genome` in __init__ from a `ModelStructure`."""

    name: str
    genome: GenomeSpec
    structure: ModelStructure

    @abstractmethod
    def decode(self, genome: np.ndarray) -> Schedule:
        """Genome -> valid schedule; repairs rather than rejects (clip, round, enforce the space's constraints)."""

    @abstractmethod
    def encode(self, schedule: Schedule) -> np.ndarray:
        """Schedule of this space -> genome, so that decode(encode(s)) == s for schedules the space can express."""

    @abstractmethod
    def baselines(self) -> list[tuple[str, Schedule]]:
        """Hand-made schedules of this space (named), to compare with and to seed initial populations."""

    def comparisons(self) -> list[tuple[str, Schedule]]:
        """What a study's front is compared with (`<study>@baselines`): the baselines, and schedules the space
        cannot express but a user would try instead (the policy space: fewer steps, no cache)."""
        return self.baselines()

    def sample(self, rng: np.random.Generator) -> Schedule:
        return self.decode(self.genome.random(rng))

    def summary(self, schedule: Schedule) -> dict[str, Any]:
        """Decision columns for analyses (nfe, recompute fraction, ...)."""
        out: dict[str, Any] = {"space": self.name}
        if schedule.solver is not None:
            out["nfe"] = schedule.solver.nfe
        if schedule.cache is not None and hasattr(schedule.cache, "recompute_fraction"):
            out["recompute_fraction"] = schedule.cache.recompute_fraction()
        return out
