"""The objective contract: a name, a direction, what it needs, and a streaming score.

Image objectives see the run's images batch by batch (`Accumulator.update`), so a study never holds every image
(FID accumulates feature moments; MSE a running sum). Cost objectives are functions of the schedule alone (NFE,
MACs, predicted latency) and need no sampling. Every objective states up front what it needs — the teacher images
of the calibration set, reference statistics, or external weights — and `check()` raises before any work starts
when something is missing, never falling back to another metric.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from schedsearch.errors import UnavailableError

if TYPE_CHECKING:
    import torch

    from schedsearch.objectives.cost import Observation
    from schedsearch.spaces.schedule import Schedule

Direction = Literal["min", "max"]


class ObjectiveUnavailableError(UnavailableError):
    """An asked-for objective cannot run here (missing weights or package); the message says how to fix it."""


@dataclass(frozen=True)
class ScoreBatch:
    """One batch of a run: decoded images in [-1, 1] (B, C, H, W), their conditions and seeds, and the teacher's
    images for the same conditions and seeds when the calibration set has them."""

    images: torch.Tensor
    conditions: Sequence[Any]
    seeds: Sequence[int]
    teacher: torch.Tensor | None = None


class Accumulator(ABC):
    @abstractmethod
    def update(self, batch: ScoreBatch) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, float]:
        """Metric values by name (an objective may report side metrics, e.g. accuracy beside class_probability)."""


class Objective(ABC):
    """Base of both kinds. `name` is the metric the search optimises; `direction` says which way is better."""

    name: str
    direction: Direction
    kind: Literal["image", "cost"] = "image"
    needs_teacher: bool = False

    def check(self) -> None:  # noqa: B027 - optional hook
        """Raise ObjectiveUnavailableError if this objective cannot run here (called before any work)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction, "kind": self.kind, "needs_teacher": self.needs_teacher}


class ImageObjective(Objective):
    kind: Literal["image", "cost"] = "image"

    @abstractmethod
    def accumulator(self) -> Accumulator:
        """A fresh streaming scorer for one run."""


class CostObjective(Objective):
    kind: Literal["image", "cost"] = "cost"
    direction: Direction = "min"

    @abstractmethod
    def value(self, schedule: Schedule) -> float:
        """The cost of one sample's run of `schedule` (per image), without running it."""

    def observed(self, schedule: Schedule, per_sample: Sequence[Observation]) -> dict[str, float]:
        """The cost of a run whose reuse was decided while it ran (a runtime policy), from what each sample's run
        computed (`objectives.cost.Observation`, one per sample): the mean under `name` and the 90th percentile
        under `<name>.p90`, since adaptive policies cost more on some prompts than on others. Objectives whose
        value does not depend on what ran (NFE) return `value(schedule)`."""
        return {self.name: self.value(schedule)}


def spread(name: str, values: Sequence[float]) -> dict[str, float]:
    """Mean of per-sample costs under `name`, their 90th percentile under `<name>.p90`."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    return {name: float(array.mean()), f"{name}.p90": float(np.percentile(array, 90))}


CI_LEVEL = 0.95
CI_RESAMPLES = 1000


class MeanAccumulator(Accumulator):
    """Mean of a per-image value over the run: the common case (MSE, PSNR, SSIM, CLIP score, ImageReward).

    Also a 95% bootstrap confidence interval of that mean over the samples (`<name>.ci95_low`/`_high`; scipy's
    percentile bootstrap, 1,000 resamples, a fixed seed so a re-run gives the same interval): how far the figure
    could move on other seeds, which is what says whether one schedule really beats another. It keeps one float per
    image (not the images)."""

    def __init__(self, name: str, per_image: Any) -> None:
        self.name, self.per_image = name, per_image
        self.total, self.count = 0.0, 0
        self.values: list[Any] = []

    def update(self, batch: ScoreBatch) -> None:
        values = self.per_image(batch)
        self.total += float(values.double().sum())
        self.count += int(values.numel())
        self.values.append(values.detach().double().flatten().cpu().numpy())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError(f"{self.name}: no images were scored")
        return {self.name: self.total / self.count, **mean_interval(self.name, self.values)}


def mean_interval(name: str, parts: Any) -> dict[str, float]:
    """`<name>.ci95_low` / `<name>.ci95_high` of the mean of the concatenated per-sample values (none for < 2)."""
    import numpy as np
    from scipy.stats import bootstrap

    values = np.concatenate(parts) if len(parts) else np.zeros(0)
    if len(values) < 2:
        return {}
    if np.all(values == values[0]):
        low = high = float(values[0])
    else:
        found = bootstrap((values,), np.mean, confidence_level=CI_LEVEL, n_resamples=CI_RESAMPLES,
                          method="percentile", random_state=np.random.default_rng(0))
        low, high = float(found.confidence_interval.low), float(found.confidence_interval.high)
    return {f"{name}.ci95_low": low, f"{name}.ci95_high": high}
