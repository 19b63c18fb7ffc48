"""The options of `schedsearch train-builtin {dit,classifier,export}`, without torch, so `--help` is instant.
`schedsearch.calibration.train_builtin` runs them."""

from __future__ import annotations

import argparse
from pathlib import Path

from schedsearch.cli_common import HelpFormatter

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
WHAT = {
    "dit": "train the DiT (resumable; checkpoints and sample grids in --work-dir)",
    "classifier": "train the MNIST classifier used for FID features and class alignment",
    "export": "copy the trained EMA weights and the classifier into --assets-dir, with their provenance",
    "flow": "train builtin:mnist-flow, the SD3-style rectified-flow transformer (resumable, like dit)",
    "export-flow": "write mnist-flow's EMA weights (fp16) and its manifest into --assets-dir",
}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every train-builtin step takes (each says which step uses it)."""
    parser.add_argument("--work-dir", default="runs/builtin", help="checkpoints, logs and sample grids")
    parser.add_argument("--assets-dir", default=str(ASSETS_DIR), help="export: where the shipped weights go")
    parser.add_argument("--steps", type=int, default=8000, help="dit/flow: training steps in all (resumes below it)")
    parser.add_argument("--batch-size", type=int, default=128, help="dit/flow: images per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="dit/flow: AdamW learning rate after warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="dit/flow: linear warm-up steps")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="dit/flow: EMA decay of the exported weights")
    parser.add_argument("--ckpt-every", type=int, default=200, help="dit/flow: steps between checkpoints")
    parser.add_argument("--grid-every", type=int, default=1000, help="dit/flow: steps between sample grids")
    parser.add_argument("--grid-per-class", type=int, default=8, help="dit/flow: samples per class in each grid")
    parser.add_argument("--classifier-steps", type=int, default=1500, help="classifier: training steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def build_train_parser(prog: str = "schedsearch train-builtin", description: str | None = None,
                       parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`what` as a positional choice with every option; standalone or filled into the CLI's subparser."""
    if parser is None:
        parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("what", choices=list(WHAT), metavar="{" + ",".join(WHAT) + "}",
                        help="; ".join(f"{k}: {v}" for k, v in WHAT.items()))
    add_train_arguments(parser)
    return parser
