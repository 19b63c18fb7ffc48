"""One call from "model + space + strategy + objectives" to a stored, resumable study (what the CLI runs).

Binds the torch side (model, calibration set, evaluator, the DP's feature table, DC-Solver's ratio fit) to the
torch-free search loop. Presets: `quick` runs every strategy on the builtin model on 2 CPU cores in minutes
(small populations, few calibration samples, 10-step cache plans); `paper` keeps the seed methods' settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schedsearch.results.store import ResultStore
from schedsearch.search.base import Budget
from schedsearch.search.loop import StudyResult, run_study
from schedsearch.search.registry import check_combination, make_strategy
from schedsearch.spaces.base import ModelStructure, SearchSpace
from schedsearch.spaces.registry import make_space


@dataclass(frozen=True)
class Preset:
    samples: int  # calibration samples per evaluation
    num_steps: int  # steps of the fixed solver plan in the cache spaces
    nfe_range: tuple[int, int]  # solver / joint spaces
    dc_nfe: int
    teacher_steps: int


BLOCK_SKIP_FAMILIES = ("dit", "pixart", "sd3", "flux")  # their blocks are in diffusers' TransformerBlockRegistry
PRESETS = {
    "quick": Preset(samples=32, num_steps=10, nfe_range=(4, 6), dc_nfe=5, teacher_steps=100),
    "paper": Preset(samples=1000, num_steps=20, nfe_range=(4, 10), dc_nfe=5, teacher_steps=100),
}


def model_structure(info: Any) -> ModelStructure:
    """The integers a space is built from (spaces never see the model): layout, blocks, the cacheable unit."""
    from schedsearch.runtime.models import model_layout

    unit = info.extra.get("deepcache_unit") if info.extra else None
    if unit:
        unit_group, unit_blocks = "deepcache", 1
    else:
        unit_group, unit_blocks = info.block_groups[0].path, info.block_groups[0].count
    return ModelStructure(
        name=info.name,
        num_train_timesteps=info.num_train_timesteps,
        layout=model_layout(info),
        num_blocks=info.num_blocks,
        unit_group=unit_group,
        unit_blocks=unit_blocks,
        has_cross_attention=any("attn2" in g.components for g in info.block_groups),
        block_skip=info.family in BLOCK_SKIP_FAMILIES,
    )


def build_space(name: str, info: Any, preset: str = "quick", options: dict[str, Any] | None = None) -> SearchSpace:
    p = _preset(preset)
    defaults: dict[str, dict[str, Any]] = {
        "solver": {"nfe_range": p.nfe_range},
        "cache": {"num_steps": p.num_steps},
        "cachequant": {"num_steps": p.num_steps},
        "dc": {"nfe": p.dc_nfe},
        "joint": {"nfe_range": p.nfe_range},
    }
    return make_space(name, model_structure(info), **{**defaults.get(name, {}), **(options or {})})


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def objective_directions(evaluator: Any, names: Sequence[str]) -> dict[str, str]:
    by_name = {o.name: o.direction for o in evaluator.objectives}
    return {n: by_name[n] for n in names}


def run_search(
    *,
    model: Any,
    space: str,
    strategy: str,
    objectives: Sequence[str],
    study: str,
    store: str | Path | ResultStore,
    budget: Budget,
    preset: str = "quick",
    samples: int | None = None,
    seed: int = 0,
    guidance: float | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    space_options: dict[str, Any] | None = None,
    strategy_options: dict[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    progress: bool = True,
    low_fidelity_samples: int | None = None,
    validate: bool = True,
    workers: int | None = None,
    ray_address: str | None = None,
    fid_reference: str | None = None,
) -> StudyResult:
    """Run or resume a study; every evaluation is appended to `store` as it finishes. Bad combinations and
    unavailable objectives fail here, before any sampling.

    low_fidelity_samples: score each batch on this many samples first and promote the better half to the full
        count (successive halving). fid_reference: "real" or "teacher" (see `default_spec`).
    strategy_options: the strategy's own options (e.g. population), plus `seeds` (extra genomes) and, for ecad on
        the cache space, `shift_seeds` (default: on unless preset is quick): seed every whole-stack refresh with
        one refresh moved a step (`CacheMaskSpace.shifted_refresh_genomes`).
    validate: re-score the final front on the held-out split (disjoint seeds) into the study `<study>@heldout`,
        which `export` reports beside the search metrics.
    workers / ray_address: evaluate on Ray (`workers` actors on a local Ray, or join the cluster at `ray_address`,
        e.g. "auto"); the driver still writes the store alone.
    """
    from schedsearch.calibration.calibration_set import CalibrationSet, default_cache_dir, default_spec
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.runtime.models import LoadedModel, load_model

    check_combination(strategy, space)
    if (strategy_options or {}).get("shift_seeds") and (space, strategy) != ("cache", "ecad"):
        raise ValueError(f"strategy_options.shift_seeds: seeds the ecad strategy on --space cache only, "
                         f"not {strategy} on {space}; drop it")
    p = _preset(preset)
    if isinstance(model, str):
        model = load_model(model)
    assert isinstance(model, LoadedModel)
    search_space = build_space(space, model.info, preset, space_options)
    n = p.samples if samples is None else samples
    spec = default_spec(model.info, samples=n, split="search", guidance=guidance, prompts=prompts,
                        teacher_steps=p.teacher_steps, fid_reference=fid_reference)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    calibration = CalibrationSet.open(spec, cache_dir)
    evaluator: Any
    if workers is not None or ray_address is not None:
        from schedsearch.evaluation.ray_evaluator import RayEvaluator

        calibration.build(model, batch_size=batch_size, progress=progress)  # workers only read it
        evaluator = RayEvaluator(model.info.name, spec, cache_dir, list(objectives), batch_size=batch_size,
                                 workers=workers, address=ray_address)
    else:
        evaluator = LocalEvaluator(model, calibration, list(objectives), batch_size=batch_size,
                                   cost_cache_dir=str(cache_dir))
    directions = objective_directions(evaluator, objectives)
    owns_store = not isinstance(store, ResultStore)
    results = ResultStore(store) if owns_store else store
    try:
        results.set_study_settings(study, {
            "model": model.info.name, "space": space, "strategy": strategy,
            "objectives": [[n, d] for n, d in directions.items()],  # a list: the store sorts dict keys
            "preset": preset, "samples": n, "seed": seed, "calibration": evaluator.calibration_hash,
            "space_options": _jsonable(space_options or {}),
        })
        if needs_teacher(evaluator, spec):
            calibration.build(model, batch_size=batch_size, progress=progress)
        opts = dict(strategy_options or {})
        if strategy == "dp":
            opts.setdefault("distance", _dp_distance(model, search_space, spec, cache_dir))
        if strategy == "dc-fit":
            opts.setdefault("genomes", _dc_fit_genomes(model, search_space, spec, progress))
        # ECAD's generation 0 takes every seed; pymoo's takes the first `population`; the predictor's stage 0 never
        # gets past the space's own. So the shifted seeds (hundreds) go to ecad only.
        shift_seeds = opts.pop("shift_seeds", preset != "quick") and strategy == "ecad"
        if space == "cache" and strategy in ("ecad", "nsga2"):
            seeds = list(opts.get("seeds", []))
            if search_space.block_skip and "seeds" not in opts:
                seeds = cachequant_seeds(model, search_space, spec, cache_dir)
            if shift_seeds:
                own = [search_space.encode(s) for _, s in search_space.baselines()]
                seeds += search_space.shifted_refresh_genomes(own + seeds)
            opts["seeds"] = seeds
        strat = make_strategy(strategy, search_space, len(directions), preset=preset, seed=seed, options=opts)
        low = None
        if low_fidelity_samples is not None:
            if not 1 <= low_fidelity_samples < n:
                raise ValueError(f"low_fidelity_samples: {low_fidelity_samples} must be in [1, {n}) (--samples)")
            low = LocalEvaluator(model, calibration, evaluator.objectives, samples=low_fidelity_samples,
                                 batch_size=batch_size)
        result = run_study(study=study, space=search_space, strategy=strat, objectives=directions,
                           evaluator=evaluator, store=results, budget=budget, progress=progress, low_fidelity=low)
        if validate:
            validate_front(model, results, study, directions, evaluator, spec, cache_dir, batch_size, progress)
        return result
    finally:
        if owns_store:
            results.close()
        if hasattr(evaluator, "close"):
            evaluator.close()


def needs_teacher(evaluator: Any, spec: Any) -> bool:
    """Teacher images cost a 100-step run per sample: build them only for objectives that compare against them
    (FID against real images needs none). Remote evaluators' objectives are names only, so build for them."""
    objectives = getattr(evaluator, "objectives", None) or []
    if any(isinstance(o, str) for o in objectives) or not objectives:
        return True
    teacher_fid = spec.fid_reference == "teacher" and any(o.name.startswith("fid") for o in objectives)
    return teacher_fid or any(getattr(o, "needs_teacher", False) for o in objectives)


def heldout_study(study: str) -> str:
    return f"{study}@heldout"


def validate_front(model: Any, store: ResultStore, study: str, objectives: dict[str, str], evaluator: Any,
                   spec: Any, cache_dir: Path, batch_size: int, progress: bool) -> list[Any]:
    """Re-score every Pareto-optimal schedule of `study` on the held-out split (same sample count, disjoint seeds
    and, for prompt models, the same prompts) so an exported schedule's quality is not a product of selection."""
    import dataclasses

    from schedsearch.calibration.calibration_set import HELDOUT_SEED_OFFSET, CalibrationSet
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.results.pareto import non_dominated
    from schedsearch.search.loop import run_study
    from schedsearch.search.registry import FixedStrategy

    records = [r for r in store.records(study) if r.status == "ok" and r.calibration_hash == evaluator.calibration_hash]
    if not records:
        return []
    points = [[r.metrics[n] for n in objectives] for r in records]
    front = [r for r, keep in zip(records, non_dominated(points, list(objectives.values())), strict=True) if keep]
    heldout = dataclasses.replace(spec, split="heldout", seeds=tuple(HELDOUT_SEED_OFFSET + s for s in spec.seeds))
    calibration = CalibrationSet.open(heldout, cache_dir)
    check = LocalEvaluator(model, calibration, evaluator.objectives, batch_size=batch_size)
    if needs_teacher(check, heldout):
        calibration.build(model, batch_size=batch_size, progress=progress)
    schedules = [r.to_schedule() for r in front]
    space = _ListSpace(schedules)
    strategy = FixedStrategy(space.genome, len(objectives), genomes=[space.encode(s) for s in schedules])
    result = run_study(study=heldout_study(study), space=space, strategy=strategy, objectives=objectives,
                       evaluator=check, store=store, budget=Budget(evaluations=len(schedules) + 1),
                       progress=False)
    return list(result.records)


class _ListSpace(SearchSpace):
    """A space of given schedules (genome = index): lets a fixed list run through the same loop and store."""

    name = "list"

    def __init__(self, schedules: Sequence[Any]) -> None:
        from schedsearch.spaces.base import GenomeSpec

        self.schedules = list(schedules)
        self.genome = GenomeSpec(("int",), (0.0,), (float(max(0, len(self.schedules) - 1)),))
        self.keys = [s.key for s in self.schedules]

    def decode(self, genome: Any) -> Any:
        return self.schedules[int(self.genome.clip(genome)[0])]

    def encode(self, schedule: Any) -> Any:
        import numpy as np

        return np.array([float(self.keys.index(schedule.key))])

    def baselines(self) -> list[tuple[str, Any]]:
        return []


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def cachequant_seeds(model: Any, space: Any, spec: Any, cache_dir: Path) -> list[Any]:
    """Ours: CacheQuant's DP refresh steps (§3.2, every interval of its sweep) for the whole block stack, as cache-space
    genomes with and without block skipping. Uniform FORA / DeepCache refresh is one point of each such sweep; the
    DP places the same number of refreshes where the features change most, so the GA starts past those baselines."""
    from schedsearch.search.dynamic import dp_sweep
    from schedsearch.spaces.cache_interval import CacheIntervalSpace

    unit_space = CacheIntervalSpace(space.structure, solver=space.solver)
    offset = space.solver.num_steps - space.solver.nfe
    plans = dp_sweep(_dp_distance(model, unit_space, spec, cache_dir), step_offset=offset)
    return [space.encode(space.refresh_schedule(p.refresh_steps, skip))
            for p in plans.values() for skip in (False, True)]


def _dp_distance(model: Any, space: Any, spec: Any, cache_dir: Path) -> Any:
    """CacheQuant §3.2: the unit's step-to-step feature distances from one full run on 8 calibration samples,
    computed once per (calibration set, solver plan, unit) and kept beside the teacher images."""
    import hashlib

    import numpy as np

    from schedsearch.calibration.calibration_set import CalibrationSet
    from schedsearch.calibration.unit_features import unit_feature_distances
    from schedsearch.results.atomic import atomic_write_bytes
    from schedsearch.spaces.schedule import Schedule

    k = min(8, len(spec))
    unit = (space.group, *space.unit)
    tag = hashlib.sha256(f"{Schedule(spec.model, space.solver).key}{unit}{k}".encode()).hexdigest()[:12]
    path = CalibrationSet.open(spec, cache_dir).root / f"unit_distances_{tag}.npy"
    if path.is_file():
        table = np.load(path, allow_pickle=False)
    else:
        table = unit_feature_distances(model, space.solver, unit, list(spec.conditions[:k]), list(spec.seeds[:k]),
                                       spec.guidance)
        import io

        buffer = io.BytesIO()
        np.save(buffer, table, allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
    offset = space.solver.num_steps - space.solver.nfe
    return table[offset:, offset:]


def _dc_fit_genomes(model: Any, space: Any, spec: Any, progress: bool) -> list[Any]:
    """DC-Solver §3.3: ratios fitted greedily against the teacher trajectory on ~10 calibration samples."""
    import numpy as np

    from schedsearch.calibration.dc_fit import fit_dc_ratios

    k = min(10, len(spec))
    fitted = fit_dc_ratios(model, nfe=space.base.nfe, guidance=spec.guidance, classes=list(spec.conditions[:k]),
                           seeds=list(spec.seeds[:k]), plan=space.base, progress=progress)
    plain = np.ones(space.genome.size)  # UniPC without compensation: the fit's own baseline
    return [plain, np.array(fitted.ratios[space.dc_order :], dtype=float)]
