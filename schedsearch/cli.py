"""The `schedsearch` command.

Errors: a `UserInputError` (bad option, a schedule for another model, a missing weight file) prints
`error: <field>: <problem>; <fix>` and exits 2, having written nothing. Anything else is a bug: one line saying so
and exit 1; `--debug` shows the traceback. Heavy modules (torch, diffusers, pandas) are imported only when a command
runs, so every `--help` answers at once.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from schedsearch.cli_common import CliError, HelpFormatter, add_model_arguments, model_kwargs, parse_int_list
from schedsearch.errors import UserInputError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
SOLVER_BASELINES = ("ddim", "dpmsolver++", "unipc", "pipeline")


def _cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from schedsearch.runtime.models import available_models

    if args.dir is not None and not args.dir.is_dir():
        raise CliError("--dir", f"{args.dir} is not a directory", "give a directory that holds saved pipelines")
    table = Table(title="models loadable here")
    for col in ("name", "family", "where", "status"):
        table.add_column(col)
    for row in available_models(None if args.dir is None else str(args.dir)):
        table.add_row(row["name"], row["family"], row["where"], row["status"])
    Console().print(table)
    return 0


def _schedule_for(args: argparse.Namespace, model: object) -> object:
    """The schedule to run: the file given (only on the model it was found for) or the model's default plan."""
    from schedsearch.runtime.execute import check_schedule_for
    from schedsearch.spaces.schedule import Schedule, load_schedule

    if args.schedule is None:
        return Schedule(model=model.info.name, solver=model.default_plan(args.steps))
    schedule = load_schedule(args.schedule)
    if schedule.model != model.info.name:
        raise CliError(f"{args.schedule}: field 'model'", f"is {schedule.model!r} but --model is {model.info.name!r}",
                       "a schedule runs only on the model it was found for")
    return check_schedule_for(model, schedule)


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from schedsearch.objectives.images import save_grid
    from schedsearch.runtime.execute import run_batches
    from schedsearch.runtime.models import load_model

    if args.n_per_class < 1:
        raise CliError("--n-per-class", f"{args.n_per_class} must be at least 1", "e.g. --n-per-class 8")
    if args.batch_size < 1:
        raise CliError("--batch-size", f"{args.batch_size} must be at least 1", "e.g. --batch-size 64")
    if args.schedule is None and args.steps < 1:
        raise CliError("--steps", f"{args.steps} must be at least 1", "e.g. --steps 20")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CliError("--guidance", f"{args.guidance} is not a finite number ≥ 0", "e.g. --guidance 2")
    if args.seed < 0:
        raise CliError("--seed", f"{args.seed} must be ≥ 0", "e.g. --seed 0")
    if args.out.suffix.lower() != ".png":
        raise CliError("--out", f"{args.out} is not a .png path", "give a file name ending in .png")
    model = load_model(args.model, **model_kwargs(args))
    schedule = _schedule_for(args, model)
    if model.info.conditioning == "class":
        classes = parse_int_list(args.classes, "--classes")
        bad = [c for c in classes if not 0 <= c < (model.info.num_classes or 0)]
        if not classes or bad:
            raise CliError("--classes", f"{bad or 'none given'}",
                           f"this model has classes 0..{model.info.num_classes - 1}")
        conditions: list[object] = [c for c in classes for _ in range(args.n_per_class)]
    else:
        prompts = [p.strip() for p in (args.prompts or "").split("|") if p.strip()]
        if not prompts:
            raise CliError("--prompts", "this model is prompt-conditioned", "give prompts separated by '|'")
        conditions = [p for p in prompts for _ in range(args.n_per_class)]
    seeds = [args.seed + i for i in range(len(conditions))]
    images = [img for _, img in run_batches(model, schedule, conditions, seeds, args.guidance, args.batch_size,
                                            progress=True)]
    path = save_grid(torch.cat(images), args.out, nrow=args.n_per_class)
    cached = f", cache {schedule.cache.kind}" if schedule.cache is not None else ""
    guidance = args.guidance if args.guidance is not None else model.info.guidance_default
    print(f"wrote {path} ({len(seeds)} samples, NFE {schedule.solver.nfe}{cached}, guidance {guidance})")
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    """Write a hand-made baseline as a schedule file: a starting point to edit, compare with, or seed a search."""
    from schedsearch.runtime.models import load_model, model_layout
    from schedsearch.spaces import baselines
    from schedsearch.spaces.schedule import Schedule, save_schedule

    if args.steps < 1:
        raise CliError("--steps", f"{args.steps} must be at least 1", "e.g. --steps 20")
    if args.fora < 0:
        raise CliError("--fora", f"{args.fora} must be ≥ 0", "0 for no cache, N to recompute every N steps")
    model = load_model(args.model, **model_kwargs(args))
    info = model.info
    ts = baselines.linspace_timesteps(info.num_train_timesteps, args.steps)
    if args.solver == "pipeline":
        plan = model.pipeline_plan(args.steps)
    elif args.solver == "ddim":
        plan = baselines.ddim_plan(baselines.leading_timesteps(info.num_train_timesteps, args.steps))
    elif args.solver == "dpmsolver++":
        plan = baselines.dpm_solver_plan(ts, args.order)
    else:
        plan = baselines.unipc_plan(ts, args.order)
    cache = baselines.fora_cache_plan(model_layout(info), plan.num_steps, args.fora) if args.fora else None
    solver = type(model.scheduler).__name__ if args.solver == "pipeline" else args.solver
    meta = {"baseline": solver, **({"cache": f"FORA N={args.fora}"} if cache else {})}
    schedule = Schedule(model=info.name, solver=plan, cache=cache, meta=meta)
    schedule = schedule.validate(info.num_train_timesteps, max_timestep=info.max_timestep)
    print(f"wrote {save_schedule(schedule, args.out)} (NFE {plan.nfe}, key {schedule.key})")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from schedsearch.runtime.models import load_model

    print(json.dumps(load_model(args.model, **model_kwargs(args)).info.as_dict(), indent=2))
    return 0


def _cmd_train_builtin(args: argparse.Namespace) -> int:
    from schedsearch.calibration import train_builtin

    argv = [args.what, *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("what", "run", "command", "debug"))]
    train_builtin.main(argv)
    return 0


def _parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    from schedsearch.cli_search import add_study_commands
    from schedsearch.cli_train import build_train_parser

    parser = argparse.ArgumentParser(
        prog="schedsearch", description="Find the best inference schedules (solver steps, cache reuse) of a "
        "diffusion model, offline.", formatter_class=HelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = _parser(sub, "models", "list the models that can be loaded here, with their family")
    models.add_argument("--dir", type=Path, help="also list saved pipelines under this directory (3 levels down)")
    models.set_defaults(run=_cmd_models)

    info = _parser(sub, "info", "what the search spaces see of a model (steps, blocks, components)")
    add_model_arguments(info)
    info.set_defaults(run=_cmd_info)

    smp = _parser(sub, "sample", "run a schedule and write a PNG grid (one row per class or prompt)")
    add_model_arguments(smp)
    smp.add_argument("--schedule", type=Path,
                     help="schedule JSON (default: the pipeline's own scheduler; DPM-Solver++ 2M for the builtin DiT)")
    smp.add_argument("--steps", type=int, default=20, help="steps of the default plan (ignored with --schedule)")
    smp.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="class ids for class-conditional models")
    smp.add_argument("--prompts", help="prompts separated by '|' for text-conditional models")
    smp.add_argument("--n-per-class", type=int, default=8, help="samples per class or prompt (one grid row each)")
    smp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    smp.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    smp.add_argument("--batch-size", type=int, default=64, help="images per model call (memory, not results)")
    smp.add_argument("--out", type=Path, default=Path("grid.png"), help="PNG file to write")
    smp.set_defaults(run=_cmd_sample)

    sch = _parser(sub, "schedule", "write a baseline solver schedule (DDIM, DPM-Solver++, UniPC) as JSON")
    sch.add_argument("solver", choices=SOLVER_BASELINES,
                     help="the hand-made solver; 'pipeline': the pipeline's own scheduler with its settings")
    add_model_arguments(sch)
    sch.add_argument("--steps", type=int, default=20, help="number of solver steps")
    sch.add_argument("--order", type=int, default=2, choices=(1, 2, 3), help="multistep order (DPM-Solver++, UniPC)")
    sch.add_argument("--fora", type=int, default=0, metavar="N", help="add a FORA cache plan: recompute every N "
                     "steps (0: no cache)")
    sch.add_argument("--out", type=Path, required=True, help="schedule JSON to write")
    sch.set_defaults(run=_cmd_schedule)

    trn = _parser(sub, "train-builtin", "train the builtin model or its classifier, or export them into the package")
    build_train_parser(parser=trn)
    trn.set_defaults(run=_cmd_train_builtin)

    add_study_commands(sub, _parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted; a study resumes with --resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        from schedsearch import __version__

        print(f"internal error (a bug in schedsearch {__version__}, not in your input): {type(exc).__name__}: "
              f"{exc}. Please report it with the output of `schedsearch --debug {args.command} ...`.", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
