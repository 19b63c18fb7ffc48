"""`schedsearch search | front | export | evaluate | report`: the study commands. Input is checked before any work;
bad input exits 2 with the field named and nothing written."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from schedsearch.search.registry import PRESETS as STRATEGY_PRESETS
from schedsearch.search.registry import STRATEGIES
from schedsearch.spaces.registry import SPACES


class StudyCliError(ValueError):
    pass


def _budget(args: argparse.Namespace) -> Any:
    from schedsearch.search.base import Budget

    if args.budget is not None and args.budget < 1:
        raise StudyCliError(f"--budget: {args.budget} must be at least 1 evaluation")
    if args.budget is None and args.time_limit is None and args.generations is None:
        raise StudyCliError("--budget: give --budget N (evaluations), --time-limit SECONDS or --generations G")
    return Budget(evaluations=args.budget, wall_time_s=args.time_limit, generations=args.generations)


def _open_store(path: Path, create: bool) -> Any:
    from schedsearch.results.store import ResultStore

    if not create and not path.is_file():
        raise StudyCliError(f"--store: no results store at {path}")
    return ResultStore(path, create=create)


def _cmd_search(args: argparse.Namespace) -> int:
    from schedsearch.objectives.registry import parse_objective_list
    from schedsearch.search.registry import check_combination
    from schedsearch.study import run_search

    check_combination(args.strategy, args.space)  # before loading anything
    _quiet_libraries()
    objectives = parse_objective_list(args.objectives)
    budget = _budget(args)
    if not args.study.strip():
        raise StudyCliError("--study: give the study a name")
    if args.store.exists():
        with _open_store(args.store, create=False) as store:
            exists = store.study_settings(args.study) is not None or store.count(args.study) > 0
        if exists and not args.resume:
            raise StudyCliError(
                f"--study: {args.study!r} already exists in {args.store}; pass --resume to continue it, "
                "or choose another name"
            )
    prompts = None
    if args.prompts is not None:
        from schedsearch.calibration.calibration_set import read_prompts

        prompts = read_prompts(args.prompts)
    result = run_search(
        model=args.model, space=args.space, strategy=args.strategy, objectives=objectives, study=args.study,
        store=args.store, budget=budget, preset=args.preset, samples=args.samples, seed=args.seed,
        guidance=args.guidance, cache_dir=args.cache_dir, batch_size=args.batch_size, prompts=prompts,
        progress=not args.quiet, low_fidelity_samples=args.low_fidelity_samples, validate=not args.no_validate,
        fid_reference=args.fid_reference, space_options=_space_options(args),
        strategy_options=_strategy_options(args), **_distribution(args),
    )
    print(f"study {args.study}: {result.evaluations} new evaluations, {result.reused} reused from the store, "
          f"{result.wall_time_s:.0f} s")
    with _open_store(args.store, create=False) as store:
        _print_front(store, args.study, None, all_records=False, fmt="table")
    print(f"export the front: schedsearch export --store {args.store} --study {args.study} --out DIR")
    return 0


def _space_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.no_block_skip:
        return None
    if args.space not in ("cache", "joint"):
        raise StudyCliError(f"--no-block-skip: applies to --space cache or joint, not {args.space}; drop it")
    return {"block_skip": False}


def _strategy_options(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.shift_seeds is None:
        return None
    if (args.space, args.strategy) != ("cache", "ecad"):
        raise StudyCliError(f"--shift-seeds: applies to --space cache with --strategy ecad, not "
                            f"{args.strategy} on {args.space}; drop it")
    return {"shift_seeds": args.shift_seeds}


def _quiet_libraries() -> None:
    """optuna logs every trial at INFO; the progress bar already says what a user needs."""
    import logging

    logging.getLogger("optuna").setLevel(logging.WARNING)


def _distribution(args: argparse.Namespace) -> dict[str, Any]:
    """Ray options only when asked: the local evaluator needs no Ray at all."""
    out: dict[str, Any] = {}
    if args.workers is not None:
        if args.workers < 1:
            raise StudyCliError(f"--workers: {args.workers} must be at least 1")
        out["workers"] = args.workers
    if args.ray_address is not None:
        out["ray_address"] = args.ray_address
    return out


def study_objectives(store: Any, study: str, given: str | None) -> dict[str, str]:
    from schedsearch.results.store import settings_objectives

    settings = store.study_settings(study)
    if settings is None and store.count(study) == 0:
        known = ", ".join(store.studies()) or "none"
        raise StudyCliError(f"--study: no study {study!r} in {store.path}; studies there: {known}")
    stored = settings_objectives(settings)
    if given is None:
        if not stored:
            raise StudyCliError(f"--objectives: study {study!r} has no stored objectives; name them (e.g. psnr,macs)")
        return stored
    names = [n.strip() for n in given.split(",") if n.strip()]
    missing = [n for n in names if n not in stored]
    if missing:
        raise StudyCliError(f"--objectives: {missing} not among this study's objectives {list(stored)}")
    return {n: stored[n] for n in names}


def _front_frame(store: Any, study: str, objectives: dict[str, str], all_records: bool) -> Any:
    from schedsearch.results.pareto import non_dominated

    df = store.to_frame(study)
    calibration = (store.study_settings(study) or {}).get("calibration")
    if calibration and not all_records:  # low-fidelity rows of successive halving are not front material
        df = df[df["calibration_hash"] == calibration]
    cols = [f"metric.{n}" for n in objectives]
    ok = df[(df["status"] == "ok")].dropna(subset=cols)
    if not all_records:
        ok = ok[non_dominated(ok[cols].to_numpy(float), list(objectives.values()))] if len(ok) else ok
    summary = [c for c in df.columns if c.startswith("summary.") and c.split(".", 1)[1] not in {"space", *objectives}]
    keep = ["key", *cols, *summary]
    out = (df if all_records else ok)[[c for c in keep if c in df.columns] + (["status"] if all_records else [])]
    return out.sort_values(cols[-1]).rename(columns=lambda c: c.split(".", 1)[-1])


def _print_front(store: Any, study: str, given: str | None, all_records: bool, fmt: str) -> None:
    objectives = study_objectives(store, study, given)
    frame = _front_frame(store, study, objectives, all_records)
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        print(json.dumps(json.loads(frame.to_json(orient="records")), indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        preferred = ["key", *objectives, "nfe", "recompute_fraction", "num_refresh", "mean_abs_ratio_dev", "status"]
        frame = frame[[c for c in preferred if c in frame.columns]].assign(key=frame["key"].str[:10])
        what = "all records" if all_records else "Pareto front"
        arrows = ", ".join(f"{n} {'↓' if d == 'min' else '↑'}" for n, d in objectives.items())
        table = Table(title=f"{study}: {what} ({len(frame)}; {arrows})")
        for col in frame.columns:
            table.add_column(col, justify="right" if col != "key" else "left")
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        Console().print(table)


def _cmd_front(args: argparse.Namespace) -> int:
    with _open_store(args.store, create=False) as store:
        _print_front(store, args.study, args.objectives, args.all, args.format)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from schedsearch.results.export import export_front

    with _open_store(args.store, create=False) as store:
        objectives = study_objectives(store, args.study, args.objectives)
        index = export_front(store, args.study, args.out, objectives)
    print(f"wrote {index}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from schedsearch.calibration.calibration_set import CalibrationSet, default_cache_dir, default_spec, read_prompts
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.objectives.registry import parse_objective_list
    from schedsearch.runtime.execute import check_schedule_for
    from schedsearch.runtime.models import load_model
    from schedsearch.spaces.schedule import load_schedule
    from schedsearch.study import needs_teacher

    names = parse_objective_list(args.objectives)
    schedule = load_schedule(args.schedule)
    if args.samples < 1:
        raise StudyCliError(f"--samples: {args.samples} must be at least 1")
    model = load_model(args.model)
    check_schedule_for(model, schedule)
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    spec = default_spec(model.info, samples=args.samples, split=args.split, guidance=args.guidance, prompts=prompts,
                        fid_reference=args.fid_reference)
    cache_dir = args.cache_dir or default_cache_dir()
    calibration = CalibrationSet.open(spec, cache_dir)
    evaluator = LocalEvaluator(model, calibration, names, batch_size=args.batch_size, cost_cache_dir=str(cache_dir))
    if needs_teacher(evaluator, spec):  # the same rule as a search's: FID against real images needs no teacher
        calibration.build(model, batch_size=args.batch_size, progress=not args.json)
    result = evaluator.evaluate_one(schedule)
    out = {
        "schedule": str(args.schedule), "key": schedule.key, "model": model.info.name, "status": result.status,
        "metrics": result.metrics, "samples": result.samples, "split": args.split,
        "calibration_hash": evaluator.calibration_hash, "wall_time_s": round(result.wall_time_s, 3),
    }
    if result.status != "ok":
        out["error"] = result.error
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for name, value in result.metrics.items():
            print(f"{name:>20s}  {value:.6g}")
        if result.status != "ok":
            print(result.error, file=sys.stderr)
    return 0 if result.status == "ok" else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from schedsearch.results.report import report_main

    return report_main(str(args.store), args.study, str(args.out))


def add_study_commands(sub: Any) -> None:
    s = sub.add_parser("search", help="run (or --resume) a schedule search; every evaluation is stored as it ends")
    s.add_argument("--model", default="builtin:mnist-dit")
    s.add_argument("--space", required=True, choices=sorted(SPACES))
    s.add_argument("--strategy", required=True, choices=STRATEGIES)
    s.add_argument("--objectives", required=True, help="comma-separated, first = quality, e.g. psnr,macs")
    s.add_argument("--budget", type=int, help="number of evaluations (checked between asks)")
    s.add_argument("--time-limit", type=float, help="wall-time budget in seconds")
    s.add_argument("--generations", type=int, help="number of asks (GA generations)")
    s.add_argument("--study", required=True)
    s.add_argument("--store", type=Path, required=True, help="SQLite results store (created if absent)")
    s.add_argument("--resume", action="store_true", help="continue an existing study of the same settings")
    s.add_argument("--preset", default="quick", choices=STRATEGY_PRESETS)
    s.add_argument("--samples", type=int, help="calibration samples per evaluation (default: the preset's)")
    s.add_argument("--guidance", type=float)
    s.add_argument("--prompts", type=Path, help="prompt file (one per line) for prompt-conditioned models")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--cache-dir", type=Path, help="calibration sets and cost tables (default ~/.cache/schedsearch)")
    s.add_argument("--workers", type=int, help="evaluate on K Ray workers (starts a local Ray on 127.0.0.1)")
    s.add_argument("--ray-address", help="connect to an existing Ray cluster ('auto' or host:port)")
    s.add_argument("--low-fidelity-samples", type=int,
                   help="score candidates on this many samples first; promote the better half (successive halving)")
    s.add_argument("--fid-reference", choices=("real", "teacher"),
                   help="FID against real images (builtin default) or the teacher's images (default otherwise)")
    s.add_argument("--no-block-skip", action="store_true",
                   help="cache/joint: ECAD's space exactly, without the bit that skips fully reused blocks whole")
    s.add_argument("--shift-seeds", action=argparse.BooleanOptionalAction, default=None,
                   help="cache + ecad: also seed each whole-stack refresh (FORA, DP) with one refresh moved a "
                        "step (default: on, off with --preset quick)")
    s.add_argument("--no-validate", action="store_true", help="skip re-scoring the front on the held-out split")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(run=_cmd_search)

    f = sub.add_parser("front", help="print the Pareto front (or --all records) of a study")
    f.add_argument("--store", type=Path, required=True)
    f.add_argument("--study", required=True)
    f.add_argument("--objectives", help="subset of the study's objectives (default: all of them)")
    f.add_argument("--all", action="store_true", help="every record, not only the front")
    f.add_argument("--format", default="table", choices=("table", "csv", "json"))
    f.set_defaults(run=_cmd_front)

    e = sub.add_parser("export", help="write every Pareto-optimal schedule as JSON, plus index.json")
    e.add_argument("--store", type=Path, required=True)
    e.add_argument("--study", required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--objectives", help="subset of the study's objectives (default: all of them)")
    e.set_defaults(run=_cmd_export)

    v = sub.add_parser("evaluate", help="score one schedule file on the calibration set")
    v.add_argument("--model", default="builtin:mnist-dit")
    v.add_argument("--schedule", type=Path, required=True)
    v.add_argument("--objectives", required=True, help="comma-separated, e.g. fid,class_alignment,psnr,macs")
    v.add_argument("--samples", type=int, default=256)
    v.add_argument("--split", default="search", choices=("search", "heldout"))
    v.add_argument("--guidance", type=float)
    v.add_argument("--prompts", type=Path)
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--cache-dir", type=Path)
    v.add_argument("--fid-reference", choices=("real", "teacher"),
                   help="FID against real images (builtin default) or the teacher's images (default otherwise)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(run=_cmd_evaluate)

    r = sub.add_parser("report", help="write a self-contained HTML report of a study")
    r.add_argument("--store", type=Path, required=True)
    r.add_argument("--study", required=True)
    r.add_argument("--out", type=Path, required=True)
    r.set_defaults(run=_cmd_report)
