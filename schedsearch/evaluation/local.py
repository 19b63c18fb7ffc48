"""Score schedules on one process: run each on the calibration set batch by batch, stream the batches through
every image objective, add the cost objectives. No Ray needed; the Ray evaluator runs this same code per worker."""

from __future__ import annotations

import contextlib
import math
import platform
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from schedsearch.calibration.calibration_set import CalibrationSet
from schedsearch.errors import SchedsearchError
from schedsearch.objectives.base import CostObjective, ImageObjective, Objective, ScoreBatch, spread
from schedsearch.objectives.registry import ObjectiveContext, build_objectives
from schedsearch.runtime.models import LoadedModel
from schedsearch.spaces.schedule import Schedule


@dataclass(frozen=True)
class Evaluation:
    """The outcome of one schedule: metrics by name, or status "failed" with the error text."""

    schedule: Schedule
    metrics: dict[str, float] = field(default_factory=dict)
    status: str = "ok"
    error: str = ""
    wall_time_s: float = 0.0
    device: str = ""
    samples: int = 0
    forward_passes: int = 0  # model work: one per sample row of every denoiser call (a CFG pair counts two)


class NonFiniteOutputError(SchedsearchError, RuntimeError):
    """The model produced NaN/inf for a candidate: the candidate fails, the study goes on."""


class LocalEvaluator:
    """Evaluates on the first `samples` entries of a built calibration set, `batch_size` images at a time."""

    def __init__(
        self,
        model: LoadedModel,
        calibration: CalibrationSet,
        objectives: Sequence[str] | Sequence[Objective],
        *,
        samples: int | None = None,
        batch_size: int = 64,
        cost_cache_dir: str | None = None,
        options: dict[str, Any] | None = None,
        share_prefixes: bool = False,
        prefix_memory_bytes: int | None = None,
    ) -> None:
        if calibration.spec.model != model.info.name:
            raise ValueError(f"calibration set is for {calibration.spec.model!r}, model is {model.info.name!r}")
        self.model, self.calibration = model, calibration
        self.samples = len(calibration.spec) if samples is None else int(samples)
        calibration.spec.head(self.samples)  # range check
        self.batch_size = batch_size
        self.share_prefixes = share_prefixes
        self.prefix_memory_bytes = prefix_memory_bytes
        self._prefix_states: Any = None  # the prefix tree's kept states, across calls (one study's generations)
        if objectives and isinstance(objectives[0], str):
            context = ObjectiveContext(model, calibration.reference_stats_by_name(model.info), cost_cache_dir,
                                       dict(options or {}))
            self.objectives: list[Objective] = build_objectives(list(objectives), context)
        else:
            self.objectives = list(objectives)  # type: ignore[arg-type]
        device = next(model.network.parameters()).device
        self.device = (f"cuda {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                       else f"{platform.machine()} cpu")

    @property
    def calibration_hash(self) -> str:
        """Names the scoring conditions: the set and how many of its samples (a different fidelity is a new key)."""
        return f"{self.calibration.hash}-n{self.samples}"

    def evaluate(self, schedules: Iterable[Schedule]) -> Iterator[Evaluation]:
        """One evaluation per schedule, as each finishes. With `share_prefixes`, static component cache plans of
        one solver plan run as a prefix tree (`runtime/prefix_tree.py`): bit-identical results, each shared
        prefix computed once, yielded in prefix order. The tree's states are kept across calls (within its memory
        bound), so a plan of a later call resumes where a plan of an earlier one left its prefix."""
        schedules = list(schedules)
        if not self.share_prefixes or not isinstance(self.calibration.spec.conditions, Sequence):
            for schedule in schedules:
                yield self.evaluate_one(schedule)
            return
        from schedsearch.runtime.prefix_tree import prefix_groups

        for key, members in prefix_groups(schedules):
            if key is None:
                yield self.evaluate_one(schedules[members[0]])
            else:
                yield from self._evaluate_group([schedules[i] for i in members])

    def _evaluate_group(self, schedules: list[Schedule]) -> Iterator[Evaluation]:
        """Score plans that share prefixes: every plan on each sample batch through the prefix tree, each plan's
        images streamed into its own accumulators. Results come when the last batch is done."""
        from schedsearch.runtime.prefix_tree import DEFAULT_MAX_BYTES, PrefixStates, run_shared_prefixes

        if self._prefix_states is None:
            self._prefix_states = PrefixStates(self.prefix_memory_bytes or DEFAULT_MAX_BYTES)
        spec = self.calibration.spec.head(self.samples)
        image_objectives = [o for o in self.objectives if isinstance(o, ImageObjective)]
        cost_objectives = [o for o in self.objectives if isinstance(o, CostObjective)]
        needs_teacher = any(o.needs_teacher for o in image_objectives)
        accumulators = {j: [o.accumulator() for o in image_objectives] for j in range(len(schedules))}
        errors: dict[int, str] = {}
        passes = dict.fromkeys(range(len(schedules)), 0)
        seconds = dict.fromkeys(range(len(schedules)), 0.0)
        for lo in range(0, len(spec.seeds), self.batch_size):
            part = slice(lo, min(len(spec.seeds), lo + self.batch_size))
            live = [j for j in range(len(schedules)) if j not in errors]
            if not live:
                break
            denoise = self.model.denoiser(list(spec.conditions[part]), spec.guidance)
            teacher = self.calibration.teacher(part.start, part.stop) if needs_teacher else None
            start = time.perf_counter()
            for run in run_shared_prefixes(self.model, [schedules[j] for j in live], denoise, spec.seeds[part],
                                           states=self._prefix_states):
                j = live[run.index]
                passes[j] += run.forward_passes
                try:
                    if run.error is not None:
                        raise run.error
                    with torch.no_grad():
                        images = self.model.decode(run.latents)
                    _score_batch(schedules[j], images, spec, part, teacher, accumulators[j])
                except Exception as exc:  # recorded, never dropped: the study goes on
                    errors[j] = _failure_text(exc)
                seconds[j] += time.perf_counter() - start
                start = time.perf_counter()
        for j, schedule in enumerate(schedules):
            metrics: dict[str, float] = {}
            if j not in errors:
                for acc in accumulators[j]:
                    metrics.update(acc.result())
                for objective in cost_objectives:
                    metrics[objective.name] = objective.value(schedule)
                try:
                    _check_finite(schedule, metrics)
                except NonFiniteOutputError as exc:
                    errors[j] = _failure_text(exc)
            if j in errors:
                yield Evaluation(schedule, {}, "failed", errors[j], seconds[j], self.device, self.samples, passes[j])
            else:
                yield Evaluation(schedule, metrics, "ok", "", seconds[j], self.device, self.samples, passes[j])

    def evaluate_one(self, schedule: Schedule) -> Evaluation:
        from schedsearch.runtime.execute import counting_rows

        start = time.perf_counter()
        with counting_rows(self.model.network) as rows:
            try:
                metrics = self._score(schedule)
                status, error = "ok", ""
            except Exception as exc:  # recorded, never dropped: the study goes on
                metrics, status, error = {}, "failed", _failure_text(exc)
        return Evaluation(schedule, metrics, status, error, time.perf_counter() - start, self.device, self.samples,
                          rows[0])

    def _score(self, schedule: Schedule) -> dict[str, float]:
        from schedsearch.runtime.execute import run_batches

        spec = self.calibration.spec.head(self.samples)
        image_objectives = [o for o in self.objectives if isinstance(o, ImageObjective)]
        cost_objectives = [o for o in self.objectives if isinstance(o, CostObjective)]
        accumulators = [o.accumulator() for o in image_objectives]
        needs_teacher = any(o.needs_teacher for o in image_objectives)
        adaptive = schedule.policy is not None
        metrics: dict[str, float] = {}
        observations: list[Any] = []
        seconds: list[float] = []
        # A runtime policy decides per batch (a residual difference of the whole batch); deployed, it sees one
        # prompt at a time, so it is scored one sample per batch, and what each sample's run computed is its cost.
        batch_size = 1 if adaptive else self.batch_size
        with self._observer(adaptive) as observer:
            if accumulators or adaptive:
                batches = run_batches(self.model, schedule, spec.conditions, spec.seeds, spec.guidance, batch_size)
                start = time.perf_counter()
                for part, images in batches:
                    if observer is not None:
                        observations.append(observer.take())
                        seconds.append(time.perf_counter() - start)
                    teacher = self.calibration.teacher(part.start, part.stop) if needs_teacher else None
                    _score_batch(schedule, images, spec, part, teacher, accumulators)
                    start = time.perf_counter()
        for acc in accumulators:
            metrics.update(acc.result())
        for objective in cost_objectives:
            if adaptive:
                metrics.update(objective.observed(schedule, observations))
            else:
                metrics[objective.name] = objective.value(schedule)
        if adaptive:  # measured wall time per sample (batch of one): noisy on a shared machine, kept beside
            metrics.update(spread("measured_s", seconds))
        _check_finite(schedule, metrics)
        return metrics

    def _observer(self, adaptive: bool) -> Any:
        if not adaptive:
            return contextlib.nullcontext()
        from schedsearch.objectives.cost import UnitObserver

        return UnitObserver(self.model.network, self.model.info)


def _score_batch(schedule: Schedule, images: torch.Tensor, spec: Any, part: slice, teacher: torch.Tensor | None,
                 accumulators: Sequence[Any]) -> None:
    """One batch of a schedule's images into its accumulators; NaN/inf images fail the schedule."""
    if not bool(images.isfinite().all()):
        raise NonFiniteOutputError(f"schedule {schedule.key} produced NaN/inf images")
    if accumulators:
        batch = ScoreBatch(images.float(), spec.conditions[part], spec.seeds[part], teacher)
        for acc in accumulators:
            acc.update(batch)


def _check_finite(schedule: Schedule, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if math.isnan(v)]
    if bad:
        raise NonFiniteOutputError(f"objective(s) {bad} are NaN for schedule {schedule.key}")


def _failure_text(exc: BaseException) -> str:
    """A failed evaluation's error: the exception's line, then its last frames."""
    return f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_exception(exc, limit=4))}"
