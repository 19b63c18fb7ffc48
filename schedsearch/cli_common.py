"""What every `schedsearch` subcommand module shares: the error class of bad command-line input, the help formatter,
the default model. Light on purpose (argparse and schedsearch.errors only): `--help` imports it."""

from __future__ import annotations

import argparse
import math
from typing import Any

from schedsearch.errors import UserInputError

DEFAULT_MODEL = "builtin:mnist-dit"
MODEL_HELP = ("'builtin:mnist-dit' or 'builtin:mnist-flow' (shipped) or 'diffusers:<local pipeline dir or cached "
              "hub id>'")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one; a flag or an option whose default the help text explains shows none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CliError(UserInputError):
    """Bad input at the command line: printed as `error: ...`, exit code 2."""


def add_model_arguments(parser: Any) -> None:
    """--model and, for pipelines whose output size can be chosen, --resolution and --frames."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--resolution", type=int, help="pipelines: image/video side in pixels (default: the "
                        "pipeline's); part of the calibration set, so studies at two sizes never mix")
    parser.add_argument("--frames", type=int, help="video pipelines: frames per video (default: the pipeline's)")
    parser.add_argument("--guidance-2", type=float, help="two-transformer pipelines (Wan 2.2 A14B): the low-noise "
                        "transformer's guidance scale, the pipeline's guidance_scale_2 (default: --guidance)")


def model_kwargs(args: Any) -> dict[str, Any]:
    """The size options and the second transformer's guidance given, as `load_model` keyword arguments."""
    out = {"resolution": getattr(args, "resolution", None), "num_frames": getattr(args, "frames", None)}
    for name, flag in (("resolution", "--resolution"), ("num_frames", "--frames")):
        if out[name] is not None and out[name] < 1:
            raise CliError(flag, f"{out[name]} must be at least 1", f"e.g. {flag} 480, or leave it out")
    guidance_2 = getattr(args, "guidance_2", None)
    if guidance_2 is not None and not (math.isfinite(guidance_2) and guidance_2 >= 0):
        raise CliError("--guidance-2", f"{guidance_2} is not a finite number ≥ 0", "e.g. --guidance-2 3")
    return {k: v for k, v in {**out, "guidance_2": guidance_2}.items() if v is not None}


def parse_int_list(text: str, field: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise CliError(field, f"{text!r} is not a comma-separated list of integers", "e.g. 0,1,2") from exc
