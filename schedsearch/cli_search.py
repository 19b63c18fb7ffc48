"""`schedsearch search | front | export | evaluate | report`: the study commands. Input is checked before any work
(`StudyConfig`); bad input exits 2 with the field named and nothing written."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from schedsearch.cli_common import CliError, add_model_arguments, model_kwargs, parse_int_list
from schedsearch.methods import METHODS, PRESET_NAMES, SPACE_NAMES


def _budget(args: argparse.Namespace) -> Any:
    from schedsearch.search.base import Budget

    for name in ("budget", "generations", "budget_passes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise CliError(flag, f"{value} must be at least 1", f"e.g. {flag} 48")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CliError("--time-limit", f"{args.time_limit} must be positive (seconds)", "e.g. --time-limit 600")
    if args.budget is None and args.time_limit is None and args.generations is None and args.budget_passes is None:
        raise CliError("--budget", "no budget given", "give --budget N (evaluations), --budget-passes P (denoiser "
                       "passes), --time-limit SECONDS or --generations G")
    return Budget(evaluations=args.budget, wall_time_s=args.time_limit, generations=args.generations,
                  forward_passes=args.budget_passes)


def _open_store(path: Path, create: bool) -> Any:
    from schedsearch.results.store import ResultStore

    if not create and not path.is_file():
        raise CliError("--store", f"no results store at {path}", "give the path a search wrote")
    return ResultStore(path, create=create)


def study_config(args: argparse.Namespace) -> Any:
    """The `StudyConfig` of `schedsearch search`'s options (validated; nothing loaded or written yet)."""
    from schedsearch.config import StudyConfig
    from schedsearch.objectives.registry import parse_objective_list

    prompts = None
    if args.prompts is not None:
        from schedsearch.calibration.calibration_set import read_prompts

        prompts = read_prompts(args.prompts)
    strategy_options: dict[str, Any] = {} if args.shift_seeds is None else {"shift_seeds": args.shift_seeds}
    if args.screen is not None:
        strategy_options["screen"] = args.screen
    space_options: dict[str, Any] = {"block_skip": False} if args.no_block_skip else {}
    if args.policies is not None:
        space_options["kinds"] = [k.strip() for k in args.policies.split(",") if k.strip()]
    if args.steps_range is not None:
        space_options["steps_range"] = parse_int_list(args.steps_range, "--steps-range")
    if args.dbcache_masks:
        space_options["dbcache_masks"] = True
    if args.solvers is not None:
        space_options["solvers"] = [v.strip() for v in args.solvers.split(",") if v.strip()]
    return StudyConfig(
        model=args.model, **model_kwargs(args), space=args.space, strategy=args.strategy,
        objectives=tuple(parse_objective_list(args.objectives)), study=args.study, store=args.store,
        budget=_budget(args), preset=args.preset, samples=args.samples, seed=args.seed, guidance=args.guidance,
        prompts=prompts, fid_reference=args.fid_reference, low_fidelity_samples=args.low_fidelity_samples,
        space_options=space_options, strategy_options=strategy_options,
        batch_size=args.batch_size, share_prefixes=not args.no_share_prefixes,
        prefix_memory=args.prefix_memory, cache_dir=args.cache_dir,
        workers=args.workers, ray_address=args.ray_address,
        validate=not args.no_validate, progress=not args.quiet, resume=args.resume,
    )


def _cmd_search(args: argparse.Namespace) -> int:
    import logging

    from schedsearch.study import run_search

    if args.shift_seeds is not None and (args.space, args.strategy) != ("cache", "ecad"):
        raise CliError("--shift-seeds", f"applies to --space cache with --strategy ecad, not {args.strategy} on "
                       f"{args.space}", "drop it")
    if args.screen is not None and (args.space, args.strategy) not in (("cache", "ecad"), ("joint", "bilevel")):
        raise CliError("--screen", f"applies to --space cache with --strategy ecad or --space joint with --strategy "
                       f"bilevel, not {args.strategy} on {args.space}", "drop it")
    config = study_config(args)
    logging.getLogger("optuna").setLevel(logging.WARNING)  # optuna logs every trial; the progress bar says enough
    result = run_search(config)
    print(f"study {args.study}: {result.evaluations} new evaluations ({result.forward_passes:,} denoiser passes), "
          f"{result.reused} reused from the store, {result.failed} failed, {result.wall_time_s:.0f} s")
    for cause, count in sorted(result.failures.items(), key=lambda kv: -kv[1]):
        print(f"  failed ×{count}: {cause}")
    if result.failures:
        print("  a failure that may not repeat is retried when the study is resumed (--resume); see every attempt "
              "with ResultStore.attempts(study)")
    with _open_store(args.store, create=False) as store:
        _print_front(store, args.study, None, all_records=False, fmt="table")
        _print_comparison(store, args.study)
    print(f"export the front: schedsearch export --store {args.store} --study {args.study} --out DIR")
    return 0


def _print_comparison(store: Any, study: str) -> None:
    """How the front compares with the space's hand-made baselines, on the search split and on held-out seeds."""
    from schedsearch.results.query import compare_with_baselines

    for split in ("search", "heldout"):
        found = compare_with_baselines(store, study, split)
        if found is None or not found.front:
            continue
        where = "held-out seeds" if split == "heldout" else "search seeds"
        others = [b for b in found.undominated if b not in found.on_front]
        tied = f"; {len(found.on_front)} are on the front themselves" if found.on_front else ""
        missed = f"; not dominated: {', '.join(others)}" if others else ""
        print(f"on {where}: the front strictly dominates {len(found.dominated)} of the {len(found.baselines)} "
              f"schedules on the baselines' front ({len(found.separated)} with 95% intervals apart){tied}{missed}")


def _front_frame(store: Any, study: str, given: str | None, all_records: bool,
                 on: str = "search") -> tuple[Any, dict[str, str]]:
    """The front (or every record) as a table: the objectives, held-out scores beside them where the front was
    re-scored on unseen seeds, then the schedules' summary columns."""
    from schedsearch.results.query import heldout_columns, heldout_metrics, study_front, study_objectives
    from schedsearch.results.store import records_frame

    if all_records:
        objectives = study_objectives(store, study, given)
        records = store.records(study)
        heldout = heldout_metrics(store, study)
    else:
        front = study_front(store, study, given, on=on)
        objectives = front.objectives
        records = list(front.records)
        heldout = front.heldout if on == "search" else {}  # on held-out the records are the held-out scores
    frame = records_frame(records)
    held_cols = []
    for name, values in heldout_columns(records, heldout, objectives).items():
        frame[f"metric.{name} (held-out)"] = values
        held_cols.append(f"metric.{name} (held-out)")
    cols = [f"metric.{n}" for n in objectives]
    cols += [f"metric.{n}.p90" for n in objectives if f"metric.{n}.p90" in frame.columns]  # a policy's slow prompts
    summary = [c for c in frame.columns
               if c.startswith("summary.") and c.split(".", 1)[1] not in {"space", *objectives}]
    keep = [c for c in ["key", *cols, *held_cols, *summary] if c in frame.columns] + (["status"] if all_records else [])
    return frame[keep].rename(columns=lambda c: c.split(".", 1)[-1]), objectives


def _print_front(store: Any, study: str, given: str | None, all_records: bool, fmt: str, on: str = "search") -> None:
    frame, objectives = _front_frame(store, study, given, all_records, on)
    if fmt == "csv":
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == "json":
        print(json.dumps(json.loads(frame.to_json(orient="records")), indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        held = [f"{n} (held-out)" for n in objectives]
        preferred = ["key", *objectives, *[f"{n}.p90" for n in objectives], *held, "nfe", "policy",
                     "recompute_fraction", "num_refresh", "mean_abs_ratio_dev", "status"]
        frame = frame[[c for c in preferred if c in frame.columns]].assign(key=frame["key"].str[:10])
        split = "held-out" if on == "heldout" else "search"
        what = "all records" if all_records else f"Pareto front on the {split} split"
        arrows = ", ".join(f"{n} {'↓' if d == 'min' else '↑'}" for n, d in objectives.items())
        table = Table(title=f"{study}: {what} ({len(frame)}; {arrows})")
        for col in frame.columns:
            table.add_column(col, justify="right" if col != "key" else "left")
        for row in frame.itertuples(index=False):
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
        Console().print(table)


def _cmd_front(args: argparse.Namespace) -> int:
    with _open_store(args.store, create=False) as store:
        if args.all and args.on != "search":
            raise CliError("--on", "applies to the front, not to --all", "drop one of them")
        _print_front(store, args.study, args.objectives, args.all, args.format, args.on)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from schedsearch.results.export import export_front

    with _open_store(args.store, create=False) as store:
        index = export_front(store, args.study, args.out, args.objectives, fmt=args.format)
    print(f"wrote {index}")
    return 0


def _cmd_pick(args: argparse.Namespace) -> int:
    """Exit 0 with the pick exported; 3 when no schedule meets the targets (2 for bad input, as everywhere)."""
    from schedsearch.results.export import export_front
    from schedsearch.results.pick import NothingMeetsError, parse_bounds, pick

    minimums, maximums = parse_bounds(args.min, "--min"), parse_bounds(args.max, "--max")
    with _open_store(args.store, create=False) as store:
        try:
            chosen = pick(store, args.study, minimums, maximums, args.by)
        except NothingMeetsError as exc:
            print(f"nothing meets the targets: {exc.problem}; {exc.fix}", file=sys.stderr)
            return 3
        shown = {n: chosen.values[n] for n in sorted({*minimums, *maximums, chosen.cost}) if n in chosen.values}
        print(f"picked {chosen.record.key} ({chosen.split} scores): "
              + ", ".join(f"{n} = {v:.4g}" for n, v in shown.items()))
        if args.out is not None:
            fmt = args.format
            if fmt == "auto":  # the chosen schedule's own runtime, schedsearch's format for anything else
                policy = chosen.record.to_schedule().policy
                fmt = "schedsearch" if policy is None else policy.runtime
            out = export_front(store, args.study, args.out, fmt=fmt, only=[chosen.record.key])
            print(f"wrote {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from schedsearch.calibration.calibration_set import (
        CalibrationSet,
        default_cache_dir,
        default_spec,
        needs_teacher,
        read_prompts,
    )
    from schedsearch.evaluation.local import LocalEvaluator
    from schedsearch.objectives.registry import parse_objective_list
    from schedsearch.runtime.execute import check_schedule_for
    from schedsearch.runtime.models import load_model
    from schedsearch.spaces.schedule import load_schedule

    names = parse_objective_list(args.objectives)
    schedule = load_schedule(args.schedule)
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CliError("--guidance", f"{args.guidance} is not a finite number ≥ 0", "e.g. --guidance 2")
    if args.samples < 1:
        raise CliError("--samples", f"{args.samples} must be at least 1", "e.g. --samples 256")
    if args.batch_size < 1:
        raise CliError("--batch-size", f"{args.batch_size} must be at least 1", "e.g. --batch-size 64")
    model = load_model(args.model, **model_kwargs(args))
    check_schedule_for(model, schedule)
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    spec = default_spec(model.info, samples=args.samples, split=args.split, guidance=args.guidance, prompts=prompts,
                        fid_reference=args.fid_reference)
    cache_dir = args.cache_dir or default_cache_dir()
    calibration = CalibrationSet.open(spec, cache_dir)
    evaluator = LocalEvaluator(model, calibration, names, batch_size=args.batch_size, cost_cache_dir=str(cache_dir))
    if needs_teacher(evaluator.objectives, spec):  # the same rule as a search's
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
    from schedsearch.results.report import write_report

    if args.images < 0:
        raise CliError("--images", f"{args.images} must be ≥ 0", "0 draws no samples")
    with _open_store(args.store, create=False) as store:
        print(write_report(store, args.study, args.out, images=args.images))
    return 0


def _store_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", type=Path, required=True, help="the SQLite results store a search wrote")
    p.add_argument("--study", required=True, help="the study's name in the store")


def add_study_commands(sub: Any, parser: Callable[..., argparse.ArgumentParser]) -> None:
    strategies = "; ".join(f"{m.name}: {m.title}" + (f" (on {'/'.join(m.spaces)})" if m.spaces else "")
                           for m in METHODS.values())
    s = parser(sub, "search", "run (or --resume) a schedule search; every evaluation is stored as it ends")
    add_model_arguments(s)
    s.add_argument("--space", required=True, choices=SPACE_NAMES,
                   help="cache: ECAD's recompute mask; cachequant: a unit's refresh steps; dc: DC-Solver's ratios; "
                        "solver: S³'s solver schedule; joint: solver × cache × compensation; policy: the knobs of "
                        "the runtime caches of diffusers and cache-dit, with the number of steps")
    s.add_argument("--strategy", required=True, choices=list(METHODS), help=strategies)
    s.add_argument("--objectives", required=True, help="comma-separated, first = quality, e.g. psnr,macs")
    s.add_argument("--budget", type=int, help="the study's total number of evaluations, counting those of earlier "
                   "runs of a resumed study (checked between asks, so a GA finishes its generation)")
    s.add_argument("--budget-passes", type=int, help="the study's total model work in denoiser passes (one sample "
                   "at one step; a CFG pair counts two), counted like --budget across resumes")
    s.add_argument("--time-limit", type=float, help="wall-time budget in seconds")
    s.add_argument("--generations", type=int, help="number of asks (GA generations)")
    s.add_argument("--study", required=True, help="the study's name in the store")
    s.add_argument("--store", type=Path, required=True, help="SQLite results store (created if absent)")
    s.add_argument("--resume", action="store_true", help="continue an existing study of the same settings (without "
                   "it an existing study is refused; with it, a missing one is)")
    s.add_argument("--preset", default="quick", choices=PRESET_NAMES,
                   help="quick: minutes on 2 CPU cores (32 samples, 10-step cache plans, small populations); "
                        "paper: the seed methods' settings (1000 samples, 20 steps, ECAD population 72)")
    s.add_argument("--samples", type=int, help="calibration samples per evaluation (default: the preset's)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    s.add_argument("--prompts", type=Path, help="prompt file (one per line) for prompt-conditioned models")
    s.add_argument("--seed", type=int, default=0, help="the strategy's random seed")
    s.add_argument("--batch-size", type=int, default=64, help="images per model call (memory, not results)")
    s.add_argument("--cache-dir", type=Path, help="calibration sets and cost tables (default: $SCHEDSEARCH_CACHE "
                   "or ~/.cache/schedsearch)")
    s.add_argument("--workers", type=int, help="evaluate on K Ray workers (starts a local Ray on 127.0.0.1)")
    s.add_argument("--ray-address", help="connect to an existing Ray cluster ('auto' or host:port)")
    s.add_argument("--low-fidelity-samples", type=int,
                   help="score candidates on this many samples first; promote the better half (successive halving)")
    s.add_argument("--fid-reference", choices=("real", "teacher"),
                   help="FID against real images (builtin default) or the teacher's images (default otherwise)")
    s.add_argument("--no-block-skip", action="store_true",
                   help="cache/joint: ECAD's space exactly, without the bit that skips fully reused blocks whole")
    s.add_argument("--policies", help="policy: comma-separated runtime caches to tune (default "
                   "first_block_cache,mag_cache,taylorseer_cache; also pyramid_attention_broadcast, faster_cache, "
                   "dbcache: cache-dit's)")
    s.add_argument("--steps-range", help="policy: LOW,HIGH number of steps searched beside the cache's knobs "
                   "(default: the preset's, 8,20 quick); runtime defaults are compared at HIGH")
    s.add_argument("--solvers", help="policy: stock schedulers searched beside the pipeline's own (built from its "
                   "config, so the export swaps them in by name): DPMSolverMultistepScheduler, "
                   "UniPCMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler (VP models)")
    s.add_argument("--dbcache-masks", action="store_true", help="policy with dbcache: also search cache-dit's "
                   "steps-mask presets (slow/medium/fast/ultra) and their static/dynamic policy")
    s.add_argument("--shift-seeds", action=argparse.BooleanOptionalAction, default=None,
                   help="cache + ecad: also seed each whole-stack refresh (FORA, DP) with one refresh moved a "
                        "step (default: on, off with --preset quick)")
    s.add_argument("--screen", type=int, metavar="K",
                   help="cache + ecad: breed K children per child evaluated and run only those a free reuse-error "
                        "predictor ranks best; generation 0 then holds --population seeds, the rest wait as "
                        "immigrants (default: off, ECAD's own GA; 8 is a good start); joint + bilevel: the same "
                        "screen on each anchor solver's masks (default 8; 0 turns it off)")
    s.add_argument("--no-share-prefixes", action="store_true",
                   help="evaluate every cache plan from noise on its own (default: a generation's plans run as a "
                        "prefix tree, each shared prefix once; identical results, less model work)")
    s.add_argument("--prefix-memory", type=float, default=2.0, metavar="GIB",
                   help="memory the prefix tree may keep of earlier generations' states (default 2 GiB; more "
                        "saves more model work, results do not depend on it)")
    s.add_argument("--no-validate", action="store_true", help="skip re-scoring the front on the held-out split")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(run=_cmd_search)

    f = parser(sub, "front", "print the Pareto front (or --all records) of a study")
    _store_study(f)
    f.add_argument("--objectives", help="subset of the study's objectives (default: all of them)")
    f.add_argument("--all", action="store_true", help="every record, not only the front")
    f.add_argument("--format", default="table", choices=("table", "csv", "json"), help="output format")
    f.add_argument("--on", default="search", choices=("search", "heldout"),
                   help="the front of the search's scores, or of the held-out re-scoring (unseen seeds) of that "
                        "front; held-out columns are shown beside the search's either way")
    f.set_defaults(run=_cmd_front)

    e = parser(sub, "export", "write every Pareto-optimal schedule as JSON, plus index.json")
    _store_study(e)
    e.add_argument("--out", type=Path, required=True, help="directory to write (replaced whole if it is an export)")
    e.add_argument("--objectives", help="subset of the study's objectives (default: all of them)")
    e.set_defaults(run=_cmd_export)

    e.add_argument("--format", default="schedsearch", choices=("schedsearch", "diffusers", "cache-dit"),
                   help="also write each schedule in a runtime's own format: diffusers (cache config JSON + the lines "
                        "that enable it on a stock pipeline) or cache-dit (a YAML for cache_dit.load_configs)")

    k = parser(sub, "pick", "the cheapest schedule of a study's front that meets quality targets (held-out scores "
                            "where the study has them); exit 3 if none does")
    _store_study(k)
    k.add_argument("--min", action="append", help="NAME=VALUE lower bounds, e.g. --min psnr=30 (repeatable)")
    k.add_argument("--max", action="append", help="NAME=VALUE upper bounds for minimised metrics, e.g. --max fid=20")
    k.add_argument("--by", help="the cost to minimise (default: latency_s, macs or nfe, the first the study has; "
                                "macs.p90 for a policy's slower prompts)")
    k.add_argument("--out", type=Path, help="export the pick here")
    k.add_argument("--format", default="auto", choices=("auto", "schedsearch", "diffusers", "cache-dit"),
                   help="the export's format (see export --format); auto: the picked policy's own runtime")
    k.set_defaults(run=_cmd_pick)

    v = parser(sub, "evaluate", "score one schedule file on the calibration set")
    add_model_arguments(v)
    v.add_argument("--schedule", type=Path, required=True, help="schedule JSON to score")
    v.add_argument("--objectives", required=True, help="comma-separated, e.g. fid,class_alignment,psnr,macs")
    v.add_argument("--samples", type=int, default=256, help="calibration samples")
    v.add_argument("--split", default="search", choices=("search", "heldout"),
                   help="search seeds (0..) or held-out seeds (1,000,000..)")
    v.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    v.add_argument("--prompts", type=Path, help="prompt file (one per line) for prompt-conditioned models")
    v.add_argument("--batch-size", type=int, default=64, help="images per model call (memory, not results)")
    v.add_argument("--cache-dir", type=Path, help="calibration sets and cost tables (default: $SCHEDSEARCH_CACHE "
                   "or ~/.cache/schedsearch)")
    v.add_argument("--fid-reference", choices=("real", "teacher"),
                   help="FID against real images (builtin default) or the teacher's images (default otherwise)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(run=_cmd_evaluate)

    r = parser(sub, "report", "write a self-contained HTML report of a study")
    _store_study(r)
    r.add_argument("--out", type=Path, required=True, help="directory for <study>.html")
    r.add_argument("--images", type=int, default=8, help="held-out samples of the knee and two other front points "
                   "beside the teacher (loads the model; 0: none)")
    r.set_defaults(run=_cmd_report)
