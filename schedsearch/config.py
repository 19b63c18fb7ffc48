"""`StudyConfig`: everything a study is, in one frozen, validated value. The CLI builds it; `run_search` takes it.

Validated once, when built: a bad field is a `UserInputError` naming it, before anything is loaded or written. The
fields that define what a study computes (`STUDY_FIELDS`) are stored with the study; `--resume` compares them with
the stored ones field by field and names the first that differs. Budget, workers, batch size and the like may
change between runs of one study. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from schedsearch.errors import UserInputError
from schedsearch.methods import check_combination, check_preset
from schedsearch.search.base import Budget

__all__ = ["PRESETS", "STUDY_FIELDS", "Preset", "StudyConfig"]


@dataclass(frozen=True)
class Preset:
    """Study-level settings of a preset; the strategies' own preset options live with each method."""

    samples: int  # calibration samples per evaluation
    num_steps: int  # steps of the fixed solver plan in the cache spaces
    nfe_range: tuple[int, int]  # solver / joint spaces
    dc_nfe: int  # NFE of the dc space
    teacher_steps: int  # steps of the teacher run that fidelity objectives compare with
    policy_steps: tuple[int, int]  # step range of the policy space; its high end is where runtime defaults run

    def space_defaults(self, space: str) -> dict[str, Any]:
        return {
            "solver": {"nfe_range": self.nfe_range},
            "cache": {"num_steps": self.num_steps},
            "cachequant": {"num_steps": self.num_steps},
            "dc": {"nfe": self.dc_nfe},
            "joint": {"nfe_range": self.nfe_range},
            "policy": {"steps_range": self.policy_steps},
        }.get(space, {})


PRESETS = {
    # every strategy on the builtin model on 2 CPU cores in minutes: few samples, 10-step cache plans
    "quick": Preset(samples=32, num_steps=10, nfe_range=(4, 6), dc_nfe=5, teacher_steps=100, policy_steps=(8, 20)),
    # the seed methods' settings
    "paper": Preset(samples=1000, num_steps=20, nfe_range=(4, 10), dc_nfe=5, teacher_steps=100,
                    policy_steps=(10, 28)),
}

# Fields that define what a study computes: stored with it, and compared on --resume.
STUDY_FIELDS = ("model", "space", "strategy", "preset", "samples", "seed", "guidance", "fid_reference",
                "low_fidelity_samples", "space_options", "strategy_options", "resolution", "num_frames", "guidance_2")
# How a field is spelled on the command line, for messages.
_FLAGS = {"space_options": "--no-block-skip (space options)",
          "strategy_options": "--shift-seeds / --screen (strategy options)", "num_frames": "--frames",
          "guidance_2": "--guidance-2"}


def _frozen(options: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    if options is None:
        return MappingProxyType({})
    if not isinstance(options, Mapping):
        raise UserInputError(name, f"{type(options).__name__} is not a mapping", "give a dict of option: value")
    return MappingProxyType(dict(options))


@dataclass(frozen=True)
class StudyConfig:
    """One study, as run by `schedsearch search` / `run_search`.

    model: a model name, "builtin:mnist-dit" (default) or "diffusers:<local path or cached id>".
    resolution / num_frames: a pipeline's output size in pixels (square) and a video pipeline's frame count
        (default: the pipeline's); the builtin models have one size.
    space: "cache" | "cachequant" | "dc" | "joint" | "solver" (`schedsearch.spaces`).
    strategy: a method of `schedsearch.methods` ("ecad", "predictor", "dp", "dc-fit", "nsga2", "tpe",
        "optuna-nsga2"); some work on one space only.
    objectives: metric names, the first is the quality the progress bar reports (e.g. ("psnr", "macs")).
    study: the study's name in the store; store: the SQLite results store (created if absent).
    budget: when to stop (evaluations, wall seconds, generations; whichever first). Not part of the study's
        identity: a resumed study may get more.
    preset: "quick" (default; minutes on 2 CPU cores) or "paper" (the seed methods' settings).
    samples: calibration samples per evaluation, ≥ 1 (default: the preset's, 32 quick / 1000 paper).
    seed: the strategy's random seed, ≥ 0 (default 0). Sample seeds are fixed by the calibration set.
    guidance: classifier-free guidance scale, ≥ 0 (default: the model's own).
    guidance_2: a two-transformer model's low-noise guidance scale (Wan 2.2's guidance_scale_2; default: guidance).
    prompts: prompts for prompt-conditioned models (one calibration condition each).
    fid_reference: "real" | "teacher" (default: real images where the model has them, else the teacher's).
    low_fidelity_samples: score each batch on this many samples first and promote the better half
        (successive halving); 1 ≤ n < samples (default: off).
    space_options / strategy_options: the space's and the method's own keyword options (e.g.
        {"block_skip": False}, {"population": 24, "shift_seeds": True}).
    batch_size: images per model call, ≥ 1 (default 64); memory, not results.
    share_prefixes: evaluate a generation's static cache plans as a prefix tree, each shared prefix computed
        once (default on; bit-identical results, less model work; on Ray, each worker shares within its run).
    prefix_memory: GiB the prefix tree may keep of states across generations (default 2; more saves more model
        work where the device has the memory; results do not depend on it).
    cache_dir: calibration sets and cost tables (default: $SCHEDSEARCH_CACHE or ~/.cache/schedsearch).
    workers / ray_address: evaluate on Ray: `workers` ≥ 1 actors on a local Ray, or join `ray_address` ("auto").
    validate: re-score the final front on held-out seeds into `<study>@heldout` (default on).
    progress: progress bars (default on).
    resume: continue an existing study (default off: an existing study is refused, and so is resuming a missing
        one). The budget is the study's total, so a resumed study stops where an uninterrupted one would.
    """

    space: str
    strategy: str
    objectives: tuple[str, ...]
    study: str
    store: Path
    budget: Budget
    model: str = "builtin:mnist-dit"
    resolution: int | None = None
    num_frames: int | None = None
    preset: str = "quick"
    samples: int | None = None
    seed: int = 0
    guidance: float | None = None
    guidance_2: float | None = None
    prompts: tuple[str, ...] | None = None
    fid_reference: str | None = None
    low_fidelity_samples: int | None = None
    space_options: Mapping[str, Any] = field(default_factory=dict)
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    share_prefixes: bool = True
    prefix_memory: float = 2.0
    cache_dir: Path | None = None
    workers: int | None = None
    ray_address: str | None = None
    validate: bool = True
    progress: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        put = object.__setattr__  # normalise once, then the value is frozen
        if isinstance(self.objectives, str):
            put(self, "objectives", tuple(n.strip() for n in self.objectives.split(",") if n.strip()))
        put(self, "objectives", tuple(self.objectives))
        put(self, "store", Path(self.store))
        if self.cache_dir is not None:
            put(self, "cache_dir", Path(self.cache_dir))
        if self.prompts is not None:
            put(self, "prompts", tuple(self.prompts))
        put(self, "space_options", _frozen(self.space_options, "space_options"))
        put(self, "strategy_options", _frozen(self.strategy_options, "strategy_options"))
        self._check()

    def _check(self) -> None:
        check_preset(self.preset)
        check_combination(self.strategy, self.space, dict(self.strategy_options))
        if not isinstance(self.share_prefixes, bool):
            raise UserInputError("share_prefixes", f"{self.share_prefixes!r} is not a bool", "pass True or False")
        memory = self.prefix_memory
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not (0 < memory < math.inf):
            raise UserInputError("--prefix-memory", f"{memory!r} is not a positive number of GiB",
                                 "give e.g. --prefix-memory 8, or leave it out for 2 GiB")
        if not isinstance(self.budget, Budget):
            raise UserInputError("budget", f"{self.budget!r} is not a Budget", "pass Budget(evaluations=N)")
        if not str(self.study).strip():
            raise UserInputError("--study", "empty name", "give the study a name")
        if not self.objectives:
            raise UserInputError("--objectives", "none given", "name a quality and a cost, e.g. psnr,macs")
        _positive_int(self.samples, "--samples")
        _positive_int(self.resolution, "--resolution")
        _positive_int(self.num_frames, "--frames")
        _positive_int(self.batch_size, "--batch-size")
        _positive_int(self.workers, "--workers")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise UserInputError("--seed", f"{self.seed!r} is not an integer ≥ 0", "give e.g. --seed 0")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)
                                              and self.guidance >= 0):
            raise UserInputError("--guidance", f"{self.guidance!r} is not a finite number ≥ 0",
                                 "give e.g. --guidance 2, or leave it out for the model's default")
        if self.guidance_2 is not None and not (isinstance(self.guidance_2, (int, float))
                                                and math.isfinite(self.guidance_2) and self.guidance_2 >= 0):
            raise UserInputError("--guidance-2", f"{self.guidance_2!r} is not a finite number ≥ 0",
                                 "give e.g. --guidance-2 3, or leave it out for --guidance")
        if self.fid_reference not in (None, "real", "teacher"):
            raise UserInputError("--fid-reference", f"{self.fid_reference!r}", "use 'real' or 'teacher'")
        if self.low_fidelity_samples is not None:
            n = self.resolved_samples
            low = self.low_fidelity_samples
            if not isinstance(low, int) or not 1 <= low < n:
                raise UserInputError("--low-fidelity-samples", f"{low!r} must be in [1, {n}) (--samples is {n})",
                                     "give fewer samples than --samples, or leave it out")
        if self.prompts is not None and not self.prompts:
            raise UserInputError("--prompts", "no prompts given", "give a file with one prompt per line")
        if self.space_options.get("block_skip") is False and self.space not in ("cache", "joint"):
            raise UserInputError("--no-block-skip", f"applies to --space cache or joint, not {self.space}",
                                 "drop it")
        self._check_policy_options()

    def _check_policy_options(self) -> None:
        """--policies / --steps-range: only for the policy space, known kinds, a valid range (before any work)."""
        from schedsearch.spaces.policy_plan import CACHE_DIT_KINDS, POLICY_KINDS

        kinds, steps = self.space_options.get("kinds"), self.space_options.get("steps_range")
        if self.space != "policy":
            for name, flag in (("kinds", "--policies"), ("steps_range", "--steps-range"),
                               ("dbcache_masks", "--dbcache-masks"), ("solvers", "--solvers")):
                if name in self.space_options:
                    raise UserInputError(flag, f"applies to --space policy, not {self.space}", "drop it")
            return
        if kinds is not None:
            bad = [k for k in kinds if k not in POLICY_KINDS]
            if not kinds or bad or isinstance(kinds, str):
                raise UserInputError("--policies", f"unknown {bad or kinds!r}",
                                     f"use a comma-separated subset of {', '.join(POLICY_KINDS)}")
            if set(kinds) & set(CACHE_DIT_KINDS):
                from schedsearch.runtime.cache_dit_runtime import require_cache_dit

                require_cache_dit("--policies")
        solvers = self.space_options.get("solvers")
        if solvers is not None:
            from schedsearch.spaces.policy import SOLVER_CHOICES

            bad = [v for v in solvers if v not in SOLVER_CHOICES]
            if isinstance(solvers, str) or bad:
                raise UserInputError("--solvers", f"unknown {bad or solvers!r}",
                                     f"use a comma-separated subset of {', '.join(SOLVER_CHOICES)}")
        if steps is not None:
            ok = (isinstance(steps, (list, tuple)) and len(steps) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in steps) and 2 <= steps[0] <= steps[1])
            if not ok:
                raise UserInputError("--steps-range", f"{steps!r} is not LOW,HIGH with 2 ≤ LOW ≤ HIGH",
                                     "e.g. --steps-range 8,20")

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """The size options and the second transformer's guidance given, as `load_model` keyword arguments."""
        given = {"resolution": self.resolution, "num_frames": self.num_frames, "guidance_2": self.guidance_2}
        return {k: v for k, v in given.items() if v is not None}

    @property
    def prefix_memory_bytes(self) -> int:
        """`prefix_memory` (GiB) in bytes, what the evaluators bound their kept states by."""
        return int(self.prefix_memory * 1024**3)

    @property
    def resolved_samples(self) -> int:
        return PRESETS[self.preset].samples if self.samples is None else self.samples

    @property
    def preset_settings(self) -> Preset:
        return PRESETS[self.preset]

    def identity(self) -> dict[str, Any]:
        """The fields that define what the study computes, as JSON-ready values (stored with the study)."""
        out = {name: getattr(self, name) for name in STUDY_FIELDS}
        out["samples"] = self.resolved_samples
        out["space_options"] = _jsonable(self.space_options)
        out["strategy_options"] = _jsonable(self.strategy_options)
        return out

    def differing_field(self, stored: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
        """(field, stored value, given value) of the first study field that differs from a stored study's settings;
        fields the stored settings lack (an older schedsearch's) are not compared."""
        for name, value in self.identity().items():
            if name in stored and stored[name] != value:
                return name, stored[name], value
        return None

    def flag(self, name: str) -> str:
        """The command-line spelling of a field, for messages."""
        return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _positive_int(value: Any, name: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise UserInputError(name, f"{value!r} must be an integer ≥ 1", f"give e.g. {name} 8")


def _jsonable(value: Any) -> Any:
    """Mappings, tuples and numpy arrays (seed genomes) as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value

