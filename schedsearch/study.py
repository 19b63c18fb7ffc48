"""One call from a `StudyConfig` to a stored, resumable study (what `schedsearch search` runs).

Binds the torch side (model, calibration set, evaluator) to the torch-free loop. What is particular to a method
(its engine, presets, seeds, the model-side work before it searches) is in its recipe (`schedsearch.methods`);
this file names no method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from schedsearch.config import PRESETS, StudyConfig
from schedsearch.errors import UserInputError
from schedsearch.methods import check_preset, get_method, make_strategy
from schedsearch.results.query import baselines_study, heldout_study, study_front
from schedsearch.results.store import ResultStore
from schedsearch.results.study_lock import study_lock
from schedsearch.search.loop import StudyResult, run_study
from schedsearch.spaces.base import SearchSpace

__all__ = ["PRESETS", "StudyConfig", "build_space", "heldout_study", "run_search", "study_exists", "validate_front"]


def build_space(name: str, info: Any, preset: str = "quick", options: Mapping[str, Any] | None = None, *,
                model: Any = None, conditions: Sequence[Any] = (), guidance: float | None = None) -> SearchSpace:
    """Space `name` for a model (its `ModelInfo`), with the preset's defaults under `options`.

    The policy space also needs the loaded `model`: its pipeline's scheduler at every step count, and what its
    policies need from it (MagCache's ratios, calibrated on a run with the first `conditions` at `guidance`)."""
    import dataclasses

    from schedsearch.runtime.models import model_structure
    from schedsearch.spaces.registry import make_space

    defaults = PRESETS[check_preset(preset)].space_defaults(name)
    options = {**defaults, **dict(options or {})}
    structure = model_structure(info)
    if name == "policy":
        structure = dataclasses.replace(structure, extra=_policy_model_side(model, options, conditions, guidance))
    return make_space(name, structure, **options)


# Families whose stock pipeline calls the transformer once for the conditional and once for the unconditional batch
# per step, under cache contexts "cond"/"uncond" (WanPipeline, QwenImagePipeline): a policy's state and decisions
# are per pass.
CFG_SPLIT_FAMILIES = ("wan", "qwen_image")


def _probe_policies(model: Any, kinds: Sequence[str], plan: Any, fixed: Mapping[str, Any], conditions: Any,
                    count: int, guidance: float | None) -> None:
    """Run each kind's default policy once (one sample, the shortest plan) so a runtime that does not fit this model
    (FirstBlockCache on a context-pre-only SD3 block, FasterCache on a token-layout output, DBCache's Fn beyond
    the blocks) is refused before any search, with the runtime's own error."""
    from schedsearch.runtime.execute import run_batches
    from schedsearch.spaces.policy_plan import KNOBS, RuntimePolicy
    from schedsearch.spaces.schedule import Schedule

    for kind in kinds:
        values = {k.name: k.default for k in KNOBS[kind]}
        if kind == "dbcache":
            values.update(Fn_compute_blocks=1, Bn_compute_blocks=0)
        if kind == "taylorseer_cache":
            values["disable_cache_before_step"] = 1
        policy = RuntimePolicy(kind, tuple({**values, **fixed.get(kind, {})}.items()))
        try:
            for _ in run_batches(model, Schedule(model.info.name, plan, policy=policy), conditions,
                                 list(range(count)), guidance, 1):
                pass
        except UserInputError:
            raise
        except Exception as exc:
            raise UserInputError("--policies", f"{kind} does not run on {model.info.name} ({type(exc).__name__}: "
                                 f"{exc})", "drop it from --policies") from exc


def _policy_model_side(model: Any, options: Mapping[str, Any], conditions: Sequence[Any],
                       guidance: float | None) -> dict[str, Any]:
    from schedsearch.runtime.policy_runtime import model_fixed_params
    from schedsearch.spaces.policy import DEFAULT_KINDS

    if model is None:
        raise UserInputError("--space", "policy needs the loaded model (its scheduler and calibrated ratios)",
                             "call build_space(..., model=loaded_model)")
    try:
        lo, hi = (int(v) for v in options.get("steps_range", (10, 20)))
        default_steps = int(options.get("default_steps", hi))
    except (TypeError, ValueError) as exc:
        raise UserInputError("space_options.steps_range", f"{options.get('steps_range')!r} is not (low, high)",
                             "e.g. steps_range=[8, 20]") from exc
    if not 2 <= lo <= hi <= 1000:
        raise UserInputError("space_options.steps_range", f"({lo}, {hi}) is not 2 ≤ low ≤ high ≤ 1000",
                             "e.g. steps_range=[8, 20]")
    kinds = tuple(options.get("kinds", DEFAULT_KINDS))
    if model.info.family in CFG_SPLIT_FAMILIES:
        raise UserInputError("--space policy", f"{model.info.family}'s pipeline runs the conditional and "
                             "unconditional passes as separate calls, each with its own cache state, so an adaptive "
                             "policy scored on schedsearch's batched CFG would decide differently when deployed",
                             "tune static schedules (--space cache) for this family")
    plans = {n: model.default_plan(n) for n in range(lo, hi + 1)}
    if conditions and isinstance(conditions[0], Mapping):  # pre-encoded embeddings: one batch as the denoiser takes it
        calibrate_on: Any = conditions[0]
        count = len(next(iter(calibrate_on.values())))
        probe_on, probe_count = calibrate_on, count
    else:
        calibrate_on = list(conditions[:4]) or ([0, 1, 2, 3] if model.info.conditioning == "class" else [])
        count, probe_on, probe_count = len(calibrate_on), calibrate_on[:1], 1
    fixed = model_fixed_params(model, kinds, default_steps, calibrate_on, guidance, count)
    _probe_policies(model, kinds, plans[lo], fixed, probe_on, probe_count, guidance)
    scheduler = "DPMSolverMultistepScheduler"  # default_plan's fallback: no pipeline scheduler, or none it can run
    if model.scheduler is not None:
        try:
            if all(plans[n] == model.pipeline_plan(n) for n in (lo, hi)):
                scheduler = "pipeline"
        except UserInputError:
            pass
    return {"plans": plans, "policy_fixed": fixed, "scheduler": scheduler,
            "solver_plans": _solver_plans(model, tuple(options.get("solvers", ())), lo, hi)}


def _solver_plans(model: Any, solvers: Sequence[str], lo: int, hi: int) -> dict[tuple[str, int], Any]:
    """Plans of the stock schedulers `solvers` at every step count, each built from the pipeline's own scheduler
    config (`Cls.from_config(pipe.scheduler.config)`, what the export's snippet does), or with its defaults where the
    model has no pipeline scheduler (the builtin DiT). VP models only: a flow pipeline's scheduler config does not
    carry over to DPM-Solver/UniPC without flow-specific settings."""
    if not solvers:
        return {}
    import diffusers

    from schedsearch.runtime.noise import FlowSchedule
    from schedsearch.runtime.scheduler_plan import plan_from_scheduler

    if isinstance(model.noise_schedule, FlowSchedule):
        raise UserInputError("--solvers", f"{model.info.name} is a flow-matching model; other schedulers are searched "
                             "on VP models only", "drop --solvers (its own FlowMatch scheduler is searched)")
    out = {}
    for name in solvers:
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise UserInputError("--solvers", f"unknown scheduler {name!r}", "use diffusers' class names")
        scheduler = cls.from_config(model.scheduler.config) if model.scheduler is not None else cls()
        for n in range(lo, hi + 1):
            out[(name, n)] = plan_from_scheduler(scheduler, n, model.noise_schedule, None)
    return out


def run_search(config: StudyConfig | None = None, *, model: Any = None, store: Any = None,
               **fields: Any) -> StudyResult:
    """Run or resume a study; every evaluation is appended to the store as it finishes. Bad input fails before any
    sampling or write. Give a `StudyConfig`, or its fields as keywords (`model` may be a loaded model and `store`
    an open `ResultStore`)."""
    from schedsearch.calibration.calibration_set import CalibrationSet, default_cache_dir, default_spec
    from schedsearch.runtime.models import load_model

    loaded = None if model is None or isinstance(model, str) else model
    if config is None:
        if model is not None:
            fields["model"] = model if loaded is None else loaded.info.name
        if store is not None:
            fields["store"] = store.path if isinstance(store, ResultStore) else store
        config = StudyConfig(**fields)
    elif fields:
        raise TypeError(f"run_search: give a StudyConfig or its fields, not both ({', '.join(fields)})")
    method = get_method(config.strategy)
    _check_existence(config, store if isinstance(store, ResultStore) else None)
    loaded = loaded or load_model(config.model, **config.model_kwargs)
    spec = default_spec(loaded.info, samples=config.resolved_samples, split="search", guidance=config.guidance,
                        prompts=config.prompts, teacher_steps=config.preset_settings.teacher_steps,
                        fid_reference=config.fid_reference)
    space = build_space(config.space, loaded.info, config.preset, config.space_options, model=loaded,
                        conditions=spec.conditions, guidance=spec.guidance)
    cache_dir = config.cache_dir or default_cache_dir()
    calibration = CalibrationSet.open(spec, cache_dir)
    evaluator = _evaluator(config, loaded, calibration, cache_dir)
    results = store if isinstance(store, ResultStore) else ResultStore(config.store)
    try:
        with study_lock(results.path, config.study):
            _check_existence(config, results)
            return _search(config, method, loaded, space, spec, calibration, evaluator, results, cache_dir)
    finally:
        if results is not store:
            results.close()
        if hasattr(evaluator, "close"):
            evaluator.close()


def _search(config: StudyConfig, method: Any, loaded: Any, space: SearchSpace, spec: Any, calibration: Any,
            evaluator: Any, results: ResultStore, cache_dir: Path) -> StudyResult:
    """The study itself, under its lock: settings, teacher images, the method's preparation, the loop, validation."""
    from schedsearch.calibration.calibration_set import needs_teacher

    directions = {o.name: o.direction for o in evaluator.objectives if o.name in config.objectives}
    directions = {n: directions[n] for n in config.objectives}
    _record_settings(results, config, directions, evaluator.calibration_hash)
    if needs_teacher(evaluator.objectives, spec):
        calibration.build(loaded, batch_size=config.batch_size, progress=config.progress)
    options = method.prepare(loaded, calibration, space, config, objectives=[
        next(o for o in evaluator.objectives if o.name == n) for n in directions])
    strategy = make_strategy(config.strategy, space, len(directions), preset=config.preset, seed=config.seed,
                             options=options)
    low = None
    if config.low_fidelity_samples is not None:
        from schedsearch.evaluation.local import LocalEvaluator

        low = LocalEvaluator(loaded, calibration, evaluator.objectives, samples=config.low_fidelity_samples,
                             batch_size=config.batch_size)
    result = run_study(study=config.study, space=space, strategy=strategy, objectives=directions,
                       evaluator=evaluator, store=results, budget=config.budget, progress=config.progress,
                       low_fidelity=low)
    if config.validate:
        baselines = score_baselines(space, results, config.study, evaluator, directions)
        validate_front(loaded, results, config.study, evaluator, spec, cache_dir, config.batch_size,
                       config.progress, extra=baselines)
    return result


def study_exists(store: str | Path, study: str) -> bool:
    """Has `store` (a path) a study of this name? For scripts that continue a study when it is there:
    `run_search(..., resume=study_exists(store, study))`. Reads the store only if the file exists."""
    return _study_state(store, study)[1]


def _study_state(store: str | Path | ResultStore, study: str) -> tuple[bool, bool]:
    """(has records, exists: records or stored settings), reading a store path only if the file is there."""
    if not isinstance(store, ResultStore):
        if not Path(store).is_file():
            return False, False
        with ResultStore(store, create=False) as opened:
            return _study_state(opened, study)
    started = store.count(study) > 0
    return started, started or store.study_settings(study) is not None


def _check_existence(config: StudyConfig, store: ResultStore | None) -> None:
    """A new study must have no records yet, a resumed one must exist; checked before any work (reading the store
    only if it exists) and again under the study's lock. A study whose first run stopped before its first record
    (settings stored, then a crash) may simply be run again, with or without --resume."""
    started, exists = _study_state(config.store if store is None else store, config.study)
    where = config.store
    if started and not config.resume:
        raise UserInputError("--study", f"{config.study!r} already exists in {where}",
                             "pass --resume (resume=True) to continue it, or choose another name")
    if config.resume and not exists:
        raise UserInputError("--resume", f"there is no study {config.study!r} in {where} to resume",
                             "drop --resume to start it")


def _evaluator(config: StudyConfig, model: Any, calibration: Any, cache_dir: Path) -> Any:
    """Local by default; Ray when workers or a cluster address are given (the driver still writes the store)."""
    if config.workers is not None or config.ray_address is not None:
        from schedsearch.evaluation.ray_evaluator import RayEvaluator

        calibration.build(model, batch_size=config.batch_size, progress=config.progress)  # workers only read it
        return RayEvaluator(model.info.name, calibration.spec, cache_dir, list(config.objectives),
                            batch_size=config.batch_size, workers=config.workers, address=config.ray_address,
                            share_prefixes=config.share_prefixes, model_kwargs=config.model_kwargs,
                            prefix_memory_bytes=config.prefix_memory_bytes)
    from schedsearch.evaluation.local import LocalEvaluator

    return LocalEvaluator(model, calibration, list(config.objectives), batch_size=config.batch_size,
                          cost_cache_dir=str(cache_dir), share_prefixes=config.share_prefixes,
                          prefix_memory_bytes=config.prefix_memory_bytes)


def _record_settings(store: ResultStore, config: StudyConfig, directions: dict[str, str], calibration: str) -> None:
    """Store the study's identity the first time; on resume, name the first field that differs."""
    settings = {**config.identity(), "objectives": [[n, d] for n, d in directions.items()],  # a list: keeps order
                "calibration": calibration}
    stored = store.study_settings(config.study)
    if stored is not None:
        differing = config.differing_field(stored)
        if differing is None and stored.get("objectives") not in (None, settings["objectives"]):
            differing = ("objectives", stored["objectives"], settings["objectives"])
        if differing is None and stored.get("calibration") not in (None, calibration):
            differing = ("calibration", stored["calibration"], calibration)
        if differing is not None:
            name, old, new = differing
            raise UserInputError(config.flag(name), f"study {config.study!r} was run with {old!r}, now {new!r}",
                                 "give the same value to resume it, or a new --study name")
    store.set_study_settings(config.study, settings)


def score_baselines(space: SearchSpace, store: ResultStore, study: str, evaluator: Any,
                    objectives: dict[str, str]) -> list[Any]:
    """Score the space's hand-made baselines (FORA, DeepCache, DDIM, UniPC, ...) on the search split into
    `<study>@baselines` (free where the search already scored them: the store answers) and return the schedules
    of their front: what the study's front is compared with, on held-out seeds too."""
    from schedsearch.search.fixed import score_schedules

    schedules = [s for _, s in space.comparisons()]
    if not schedules:
        return []
    score_schedules(baselines_study(study), schedules, objectives, evaluator, store)
    front = study_front(store, baselines_study(study), objectives, required=False)
    return [r.to_schedule() for r in front.records]


def validate_front(model: Any, store: ResultStore, study: str, evaluator: Any, spec: Any, cache_dir: Path,
                   batch_size: int, progress: bool, extra: Sequence[Any] = ()) -> list[Any]:
    """Re-score every Pareto-optimal schedule of `study` (and the `extra` schedules: the baselines' front) on the
    held-out split (same sample count, disjoint seeds and, for prompt models, the same prompts) so an exported
    schedule's quality, and its comparison with the baselines, is not a product of selection."""
    import dataclasses

    from schedsearch.calibration.calibration_set import HELDOUT_SEED_OFFSET, CalibrationSet, needs_teacher
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.search.fixed import score_schedules

    front = study_front(store, study, required=False)
    if not front.records:
        return []
    found = {r.key: i for i, r in enumerate(store.records(study))}  # re-score in the order the search found them
    schedules = [r.to_schedule() for r in sorted(front.records, key=lambda r: found[r.key])]
    keys = {s.key for s in schedules}
    schedules += [s for s in extra if s.key not in keys]
    heldout = dataclasses.replace(spec, split="heldout", seeds=tuple(HELDOUT_SEED_OFFSET + s for s in spec.seeds))
    calibration = CalibrationSet.open(heldout, cache_dir)
    check = LocalEvaluator(model, calibration, evaluator.objectives, batch_size=batch_size)
    if needs_teacher(check.objectives, heldout):
        calibration.build(model, batch_size=batch_size, progress=progress)
    return list(score_schedules(heldout_study(study), schedules, front.objectives, check, store).records)
