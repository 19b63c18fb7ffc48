"""The shipped objectives that need nothing beyond the model: fidelity to the teacher, class alignment, FID on the
model's default feature space, and the cost objectives (NFE, MACs, predicted latency)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from schedsearch.objectives.base import (
    Accumulator,
    CostObjective,
    ImageObjective,
    MeanAccumulator,
    ObjectiveUnavailableError,
    ScoreBatch,
    mean_interval,
    spread,
)
from schedsearch.objectives.features import FeatureExtractor, default_extractor_name, get_extractor
from schedsearch.objectives.registry import ObjectiveContext, register_objective

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from schedsearch.objectives.cost import CostTable, Observation
    from schedsearch.objectives.fid import FeatureStats
    from schedsearch.runtime.models import LoadedModel
    from schedsearch.spaces.schedule import Schedule

MAX_PSNR_DB = 100.0  # identical images would give +inf; cap so that means and fronts stay finite


def _teacher(batch: ScoreBatch, name: str) -> torch.Tensor:
    if batch.teacher is None:
        raise ValueError(f"{name}: the calibration set has no teacher images for this batch")
    return batch.teacher


class TeacherMSE(ImageObjective):
    name, direction, needs_teacher = "mse", "min", True

    def accumulator(self) -> Accumulator:
        from schedsearch.objectives.fidelity import mse

        return MeanAccumulator(self.name, lambda b: mse(b.images, _teacher(b, self.name)))


class TeacherPSNR(ImageObjective):
    name, direction, needs_teacher = "psnr", "max", True

    def accumulator(self) -> Accumulator:
        from schedsearch.objectives.fidelity import psnr

        return MeanAccumulator(self.name, lambda b: psnr(b.images, _teacher(b, self.name)).clamp(max=MAX_PSNR_DB))


class ClassAlignment(ImageObjective):
    """Mean classifier probability of the conditioning class: the builtin model's analogue of CLIP score."""

    name, direction = "class_alignment", "max"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def check(self) -> None:
        if not self.model.info.name.startswith("builtin:mnist"):
            raise ObjectiveUnavailableError(
                f"objective 'class_alignment': only for the builtin MNIST model, not {self.model.info.name}; "
                "use clip_score for prompt-conditioned models"
            )

    def accumulator(self) -> Accumulator:
        from schedsearch.objectives.clip_score import class_probabilities
        from schedsearch.runtime.builtin import load_builtin_classifier

        classifier = load_builtin_classifier()

        class _Acc(Accumulator):
            def __init__(self) -> None:
                self.probabilities: list[Any] = []
                self.correct: list[Any] = []

            def update(self, batch: ScoreBatch) -> None:
                probabilities, correct = class_probabilities(batch.images, list(batch.conditions), classifier)
                self.probabilities.append(probabilities)
                self.correct.append(correct)

            def result(self) -> dict[str, float]:
                import numpy as np

                probabilities, correct = np.concatenate(self.probabilities), np.concatenate(self.correct)
                return {"class_alignment": float(probabilities.sum()) / len(probabilities),
                        "class_accuracy": float(correct.sum()) / len(correct),
                        **mean_interval("class_alignment", [probabilities])}

        return _Acc()


class FrechetDistance(ImageObjective):
    """FID against the calibration set's reference statistics in the feature space of `extractor`."""

    direction = "min"

    def __init__(self, name: str, extractor: FeatureExtractor, reference: Any) -> None:
        self.name, self.extractor, self._reference = name, extractor, reference

    def check(self) -> None:
        self.extractor.check()
        if self._reference is None:
            raise ObjectiveUnavailableError(f"objective {self.name!r}: no calibration set to take reference stats from")

    def reference(self) -> FeatureStats:
        return self._reference(self.extractor.name)

    def accumulator(self) -> Accumulator:
        import numpy as np

        from schedsearch.objectives.fid import (
            MAX_INTERVAL_DIM,
            FeatureStatsAccumulator,
            frechet_interval,
            stats_distance,
        )
        from schedsearch.objectives.images import frames

        reference, extractor, name = self.reference(), self.extractor, self.name

        keep = extractor.dim <= MAX_INTERVAL_DIM  # features kept for the interval: N × D floats, small D only

        class _Acc(Accumulator):
            def __init__(self) -> None:
                self.acc = FeatureStatsAccumulator()
                self.kept: list[Any] = []

            def update(self, batch: ScoreBatch) -> None:
                features = extractor.features(frames(batch.images))
                self.acc.update(features)
                if keep:
                    self.kept.append(np.asarray(features, dtype=np.float64))

            def result(self) -> dict[str, float]:
                stats = self.acc.result()
                if stats.count < stats.dim:
                    import warnings

                    warnings.warn(
                        f"{name}: {stats.count} samples for {stats.dim}-d features; the covariance is singular and "
                        "the value is biased high (use more samples to compare with published figures)",
                        stacklevel=2,
                    )
                out = {name: stats_distance(stats, reference), f"{name}_samples": float(stats.count)}
                if keep and stats.count >= stats.dim:  # a singular covariance has no meaningful interval
                    low, high = frechet_interval(np.concatenate(self.kept), reference)
                    out |= {f"{name}.ci95_low": low, f"{name}.ci95_high": high}
                return out

        return _Acc()


def _fid_factory(extractor_name: str | None) -> Any:
    def make(ctx: ObjectiveContext) -> FrechetDistance:
        chosen = extractor_name or default_extractor_name(ctx.model.info)
        name = "fid" if extractor_name is None else f"fid_{extractor_name.split('-')[0]}"
        return FrechetDistance(name, get_extractor(chosen, ctx.model.info), ctx.reference_stats)

    return make


# ---- cost ----------------------------------------------------------------------------------------------------------


class NFE(CostObjective):
    name = "nfe"

    def value(self, schedule: Schedule) -> float:
        return float(schedule.solver.nfe)


def probe_forward(model: LoadedModel, batch: int, guidance: float | None = None) -> Any:
    """One model evaluation of `batch` samples at mid-trajectory (neutral conditions): what cost tables measure."""

    from schedsearch.runtime.models import initial_noise

    conditions: Any = [0] * batch if model.info.conditioning == "class" else [""] * batch
    denoise = model.denoiser(conditions, guidance)
    x = initial_noise(list(range(batch)), model.info.sample_shape)
    t = float(model.info.num_train_timesteps // 2)

    def run() -> torch.Tensor:
        return denoise(x, t, 0)

    return run


class MACs(CostObjective):
    """Multiply-accumulates per image of the whole run (a CFG pair counts twice), from the per step × block ×
    component table: analytic for DiT/PixArt, counted by FlopCounterMode otherwise."""

    name = "macs"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._table: CostTable | None = None

    def table(self) -> CostTable:
        if self._table is None:
            from schedsearch.objectives.cost import analytic_macs_table, measured_macs_table

            try:
                self._table = analytic_macs_table(self.model.network, self.model.info)
            except NotImplementedError:
                run = probe_forward(self.model, 1, guidance=1.0)
                self._table = measured_macs_table(self.model.network, self.model.info, run, batch=1)
        return self._table

    def value(self, schedule: Schedule) -> float:
        from schedsearch.objectives.cost import schedule_cost

        _refuse_policy(schedule, self.name)
        multiplier = 2.0 if self.model.info.guidance_default != 1.0 else 1.0
        return schedule_cost(self.table(), schedule.solver, self.model.info, schedule.cache, multiplier=multiplier)

    def observed(self, schedule: Schedule, per_sample: Sequence[Observation]) -> dict[str, float]:
        """Every batch row that ran, counted (a CFG pair twice): the same units as `value`."""
        table = self.table()
        return spread(self.name, [o.per_sample(table, 1) for o in per_sample])


class PredictedLatency(CostObjective):
    """Seconds per image predicted from a per step × block × component latency table measured once per model,
    device and batch (cached on disk), calibrated on one uncached run so sampler overhead is included."""

    name = "latency_s"
    batch = 16

    def __init__(self, model: LoadedModel, cache_dir: str | None) -> None:
        self.model, self.cache_dir = model, cache_dir
        self._table: CostTable | None = None

    def _path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        safe = self.model.info.name.replace("/", "_").replace(":", "_")
        return Path(self.cache_dir) / f"latency_{safe}_{_device_tag(self.model)}_b{self.batch}.json"

    def table(self) -> CostTable:
        from schedsearch.objectives.cost import table_from_dict, table_to_dict

        if self._table is not None:
            return self._table
        path = self._path()
        if path is not None and path.is_file():
            self._table = table_from_dict(json.loads(path.read_text()))
            return self._table
        self._table = self._measure()
        if path is not None:
            from schedsearch.results.atomic import atomic_write_text

            atomic_write_text(path, json.dumps(table_to_dict(self._table), indent=1))
        return self._table

    def _measure(self) -> CostTable:
        from schedsearch.objectives.cost import (
            ExpertCostTable,
            calibrate_base,
            evaluated_steps,
            measure_latency,
            measured_latency_table,
        )
        from schedsearch.runtime.models import initial_noise
        from schedsearch.runtime.sampler import sample

        model = self.model
        device = str(next(model.network.parameters()).device)
        table = measured_latency_table(model.network, model.info, probe_forward(model, self.batch), repeats=3,
                                       device=device)
        plan = model.default_plan(10)
        conditions: Any = [0] * self.batch if model.info.conditioning == "class" else [""] * self.batch
        denoise = model.denoiser(conditions)
        x = initial_noise(list(range(self.batch)), model.info.sample_shape)
        timing = measure_latency(lambda: sample(denoise, x, plan, model.noise_schedule, model.info.prediction_type),
                                 warmup=1, repeats=3, device=device)
        if not isinstance(table, ExpertCostTable):
            return calibrate_base(table, timing.median_s, plan.nfe)
        from schedsearch.spaces.baselines import step_experts

        experts = step_experts(plan, model.info.extra["expert_boundary"])  # the run's evaluations per transformer
        return calibrate_base(table, timing.median_s, [sum(experts[i] == e for i in evaluated_steps(plan))
                                                       for e in range(len(table.experts))])

    def value(self, schedule: Schedule) -> float:
        from schedsearch.objectives.cost import schedule_cost

        _refuse_policy(schedule, self.name)
        seconds = schedule_cost(self.table(), schedule.solver, self.model.info, schedule.cache)
        return seconds / self.batch if math.isfinite(seconds) else float("nan")

    def observed(self, schedule: Schedule, per_sample: Sequence[Observation]) -> dict[str, float]:
        """Each unit's share of the table's call (rows that ran / rows of a full call of one sample: 2 with CFG,
        as the table's probe ran), summed over the run, per image of the table's batch."""
        table = self.table()
        rows = 2 if self.model.info.guidance_default != 1.0 else 1
        return spread(self.name, [o.cost(table, full_batch=rows) / self.batch for o in per_sample])


def _refuse_policy(schedule: Schedule, name: str) -> None:
    """A runtime policy decides while it runs: its cost is observed (`observed`), never predicted as if it
    computed everything."""
    if schedule.policy is not None:
        raise ValueError(f"{name}: schedule {schedule.key} has a runtime policy ({schedule.policy.kind}); its cost "
                         "is what it ran, observed during its evaluation (CostObjective.observed)")


def _device_tag(model: LoadedModel) -> str:
    """A latency table belongs to one device: the GPU's name, or the CPU architecture and thread count."""
    import platform

    import torch

    device = next(model.network.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return f"{platform.machine()}-cpu{torch.get_num_threads()}"


register_objective("mse", lambda ctx: TeacherMSE(), "mean squared error to the teacher image of the same seed (min)")
register_objective("psnr", lambda ctx: TeacherPSNR(), "PSNR in dB to the teacher image of the same seed (max)")
register_objective(
    "class_alignment", lambda ctx: ClassAlignment(ctx.model), "builtin: classifier probability of the class (max)"
)
register_objective("fid", _fid_factory(None), "Fréchet distance in the model's default feature space (min)")
register_objective("fid_classifier", _fid_factory("classifier"), "Fréchet distance, builtin classifier features")
register_objective("nfe", lambda ctx: NFE(), "model evaluations per image (min)")
register_objective("macs", lambda ctx: MACs(ctx.model), "multiply-accumulates per image (min)")
register_objective(
    "latency_s", lambda ctx: PredictedLatency(ctx.model, ctx.cost_cache_dir), "predicted seconds per image (min)"
)

__all__ = [
    "NFE",
    "ClassAlignment",
    "FrechetDistance",
    "MACs",
    "PredictedLatency",
    "TeacherMSE",
    "TeacherPSNR",
    "probe_forward",
]
