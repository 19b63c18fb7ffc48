"""The `schedsearch` command. Every subcommand exits non-zero with a message naming the bad field, and writes
nothing, when its input is wrong."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
SOLVER_BASELINES = ("ddim", "dpmsolver++", "unipc")


class CliError(Exception):
    """Bad input at the command line: printed as `error: ...`, exit code 2."""


def _parse_int_list(text: str, field: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CliError(f"{field}: {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from exc


def _cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from schedsearch.runtime.models import available_models

    table = Table(title="models loadable here")
    for col in ("name", "where", "status"):
        table.add_column(col)
    for row in available_models():
        table.add_row(row["name"], row["where"], row["status"])
    Console().print(table)
    return 0


def _load_schedule(args: argparse.Namespace, model) -> tuple[object, object]:
    """(solver plan, cache plan or None) for this model; a schedule made for another model is refused."""
    from schedsearch.spaces.schedule import load_schedule

    if args.schedule is None:
        return model.default_plan(args.steps), None
    schedule = load_schedule(args.schedule)
    if schedule.model != model.info.name:
        raise CliError(
            f"{args.schedule}: field 'model' is {schedule.model!r} but --model is {model.info.name!r}; "
            "a schedule runs only on the model it was found for"
        )
    return schedule.validate(model.info.num_train_timesteps).solver, schedule.cache


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from schedsearch.objectives.images import save_grid
    from schedsearch.runtime.cache_hooks import CacheRuntime
    from schedsearch.runtime.models import initial_noise, load_model
    from schedsearch.runtime.sampler import sample

    if args.n_per_class < 1:
        raise CliError("--n-per-class: must be at least 1")
    if args.out.suffix.lower() != ".png":
        raise CliError(f"--out: {args.out} must end in .png")
    model = load_model(args.model)
    plan, cache = _load_schedule(args, model)
    runtime = CacheRuntime(model.network, model.info, cache) if cache is not None else None
    if model.info.conditioning == "class":
        classes = _parse_int_list(args.classes, "--classes")
        bad = [c for c in classes if not 0 <= c < (model.info.num_classes or 0)]
        if not classes or bad:
            raise CliError(f"--classes: {bad or 'none given'}; this model has classes 0..{model.info.num_classes - 1}")
        conditions: object = torch.tensor(classes).repeat_interleave(args.n_per_class)
    else:
        if not args.prompts:
            raise CliError("--prompts: this model is prompt-conditioned; give one or more prompts separated by '|'")
        prompts = [p.strip() for p in args.prompts.split("|") if p.strip()]
        conditions = [p for p in prompts for _ in range(args.n_per_class)]
    n = len(conditions)
    seeds = [args.seed + i for i in range(n)]
    images = []
    try:
        for start in range(0, n, args.batch_size):
            part = slice(start, min(n, start + args.batch_size))
            denoise = model.denoiser(conditions[part], args.guidance)
            if runtime is not None:
                denoise = runtime.wrap(denoise)
            x = initial_noise(seeds[part], model.info.sample_shape)
            out = sample(denoise, x, plan, model.noise_schedule, model.info.prediction_type, progress=True)
            images.append(model.decode(out))
    finally:
        if runtime is not None:
            runtime.remove()
    path = save_grid(torch.cat(images), args.out, nrow=args.n_per_class)
    cached = f", cache {cache.kind}" if cache is not None else ""
    print(
        f"wrote {path} ({n} samples, NFE {plan.nfe}{cached}, guidance {args.guidance or model.info.guidance_default})"
    )
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    """Write a hand-made baseline as a schedule file: a starting point to edit, compare with, or seed a search."""
    from schedsearch.runtime.models import load_model
    from schedsearch.spaces import baselines
    from schedsearch.spaces.schedule import Schedule, save_schedule

    if args.steps < 1:
        raise CliError("--steps: must be at least 1")
    info = load_model(args.model).info
    ts = baselines.linspace_timesteps(info.num_train_timesteps, args.steps)
    if args.solver == "ddim":
        plan = baselines.ddim_plan(baselines.leading_timesteps(info.num_train_timesteps, args.steps))
    elif args.solver == "dpmsolver++":
        plan = baselines.dpm_solver_plan(ts, args.order)
    else:
        plan = baselines.unipc_plan(ts, args.order)
    cache = None
    if args.fora:
        from schedsearch.runtime.models import model_layout

        cache = baselines.fora_cache_plan(model_layout(info), plan.num_steps, args.fora)
    meta = {"baseline": args.solver, **({"cache": f"FORA N={args.fora}"} if cache else {})}
    schedule = Schedule(model=info.name, solver=plan, cache=cache, meta=meta).validate(info.num_train_timesteps)
    print(f"wrote {save_schedule(schedule, args.out)} (NFE {plan.nfe}, key {schedule.key})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from schedsearch.runtime.models import load_model

    print(json.dumps(load_model(args.model).info.as_dict(), indent=2))
    return 0


def _cmd_train_builtin(args: argparse.Namespace) -> int:
    from schedsearch.calibration import train_builtin

    train_builtin.main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="schedsearch", description="Find the best inference schedules of a diffusion model."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the models that can be loaded here").set_defaults(run=_cmd_models)

    info = sub.add_parser("info", help="what the search spaces see of a model (steps, blocks, components)")
    info.add_argument("--model", default="builtin:mnist-dit")
    info.set_defaults(run=_cmd_info)

    smp = sub.add_parser("sample", help="run a schedule and write a PNG grid (one row per class or prompt)")
    smp.add_argument("--model", default="builtin:mnist-dit")
    smp.add_argument("--schedule", type=Path, help="schedule JSON (default: the model's DPM-Solver++ 2M plan)")
    smp.add_argument("--steps", type=int, default=20, help="steps of the default plan (ignored with --schedule)")
    smp.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="class ids for class-conditional models")
    smp.add_argument("--prompts", help="prompts separated by '|' for text-conditional models")
    smp.add_argument("--n-per-class", type=int, default=8)
    smp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    smp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    smp.add_argument("--batch-size", type=int, default=64)
    smp.add_argument("--out", type=Path, default=Path("grid.png"))
    smp.set_defaults(run=_cmd_sample)

    sch = sub.add_parser("schedule", help="write a baseline solver schedule (DDIM, DPM-Solver++, UniPC) as JSON")
    sch.add_argument("solver", choices=SOLVER_BASELINES)
    sch.add_argument("--model", default="builtin:mnist-dit")
    sch.add_argument("--steps", type=int, default=20)
    sch.add_argument("--order", type=int, default=2, choices=(1, 2, 3))
    sch.add_argument("--fora", type=int, default=0, metavar="N", help="add a FORA cache plan: recompute every N steps")
    sch.add_argument("--out", type=Path, required=True)
    sch.set_defaults(run=_cmd_schedule)

    trn = sub.add_parser("train-builtin", help="train the builtin model / classifier (see --help of the module)")
    trn.add_argument("rest", nargs=argparse.REMAINDER)
    trn.set_defaults(run=_cmd_train_builtin)

    from schedsearch.cli_search import add_study_commands

    add_study_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from schedsearch.objectives.base import ObjectiveUnavailableError
    from schedsearch.results.store import StoreError
    from schedsearch.runtime.models import ModelNotAvailableError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    # ScheduleError, CachePlanMismatchError and the registry's errors are ValueErrors naming the field
    except (CliError, ModelNotAvailableError, ValueError, ObjectiveUnavailableError, StoreError,
            FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
