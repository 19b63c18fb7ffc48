"""Calibration sets: the fixed conditions, seeds and teacher outputs every candidate of a study is scored on.

A set is its `CalibrationSpec` (model, conditions, one seed per sample, guidance, teacher schedule, split). Its
content hash names a directory holding the teacher's images (computed once, in shards, written atomically and
resumably) and cached FID reference statistics per feature extractor (EDM's `fid.py ref` idea). The *search* and
*held-out* splits use disjoint seeds (and, for prompt models, the prompt file the user gives each split), so an
exported schedule is validated on samples the search never saw.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from schedsearch.errors import UserInputError
from schedsearch.results.atomic import atomic_write_bytes, atomic_write_text
from schedsearch.spaces.baselines import dpm_solver_plan, linspace_timesteps
from schedsearch.spaces.schedule import Schedule

Split = Literal["search", "heldout"]
SPLITS = ("search", "heldout")
HELDOUT_SEED_OFFSET = 1_000_000  # held-out seeds never collide with search seeds
SHARD = 256
FORMAT = "schedsearch.calibration/v1"
DEFAULT_CACHE_ENV = "SCHEDSEARCH_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(DEFAULT_CACHE_ENV, Path.home() / ".cache" / "schedsearch"))


@dataclass(frozen=True)
class CalibrationSpec:
    model: str
    conditions: tuple[Any, ...]  # class ids or prompts, one per sample
    seeds: tuple[int, ...]
    guidance: float
    teacher: Schedule
    split: Split = "search"
    fid_reference: Literal["real", "teacher"] = "teacher"
    # the per-sample shape where a model can be loaded at several sizes (diffusers pipelines: resolution, frames),
    # so a teacher of one size is never reused for another; None for the fixed-size builtin models (their hashes
    # predate the field and stay as they were)
    sample_shape: tuple[int, ...] | None = None
    # how prompts were encoded, where a family's encoding changed (Wan: at the call's 512 tokens), so teacher images
    # of the older encoding are never reused; None elsewhere (hashes unchanged)
    text_encoding: str | None = None
    # a two-transformer model's low-noise guidance scale where it was given (Wan 2.2's guidance_scale_2); None
    # otherwise (hashes unchanged)
    guidance_2: float | None = None

    def __post_init__(self) -> None:
        if len(self.conditions) != len(self.seeds) or not self.seeds:
            raise ValueError(f"calibration: {len(self.conditions)} conditions for {len(self.seeds)} seeds "
                             "(need the same, non-zero number)")
        if self.split not in SPLITS:
            raise ValueError(f"calibration.split: {self.split!r}; use one of {SPLITS}")

    def __len__(self) -> int:
        return len(self.seeds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.model,
            "conditions": list(self.conditions),
            "seeds": list(self.seeds),
            "guidance": self.guidance,
            "teacher": self.teacher.to_dict(),
            "split": self.split,
            "fid_reference": self.fid_reference,
            **({} if self.sample_shape is None else {"sample_shape": list(self.sample_shape)}),
            **({} if self.text_encoding is None else {"text_encoding": self.text_encoding}),
            **({} if self.guidance_2 is None else {"guidance_2": self.guidance_2}),
        }

    @property
    def hash(self) -> str:
        content = self.to_dict()
        content["teacher"] = self.teacher.key
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def head(self, n: int) -> CalibrationSpec:
        """The first n samples: a cheaper fidelity of the same set (its teacher images are a prefix)."""
        if not 1 <= n <= len(self):
            raise ValueError(f"samples: {n} is not in [1, {len(self)}] (the calibration set's size)")
        return CalibrationSpec(self.model, self.conditions[:n], self.seeds[:n], self.guidance, self.teacher,
                               self.split, self.fid_reference, self.sample_shape, self.text_encoding,
                               self.guidance_2)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CalibrationSpec:
        if data.get("format") != FORMAT:
            raise ValueError(f"calibration manifest: format {data.get('format')!r} is not {FORMAT!r}")
        shape = data.get("sample_shape")
        return CalibrationSpec(data["model"], tuple(data["conditions"]), tuple(data["seeds"]), float(data["guidance"]),
                               Schedule.from_dict(data["teacher"]), data["split"], data["fid_reference"],
                               None if shape is None else tuple(shape), data.get("text_encoding"),
                               data.get("guidance_2"))


def teacher_schedule(model_name: str, num_train_timesteps: int, steps: int = 100) -> Schedule:
    """The default teacher: DPM-Solver++(2M) at 100 steps (issue: DPM-Solver++ 100 or DDIM 250)."""
    plan = dpm_solver_plan(linspace_timesteps(num_train_timesteps, steps), order=2)
    return Schedule(model_name, plan, meta={"name": f"teacher dpmsolver++ {steps}"})


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line (PartiPrompts / DrawBench-style text files); '#' starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError("--prompts", f"no file {path}", "give a text file with one prompt per line")
    prompts = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserInputError("--prompts", f"{path} has no prompts", "write one prompt per line ('#' starts a comment)")
    return prompts


def default_spec(
    info: Any,
    *,
    samples: int = 256,
    split: Split = "search",
    guidance: float | None = None,
    prompts: Sequence[str] | None = None,
    teacher_steps: int = 100,
    images_per_prompt: int = 1,
    fid_reference: str | None = None,
) -> CalibrationSpec:
    """Class models: classes cycle 0..C-1 (balanced); prompt models: the given prompts, `images_per_prompt` each,
    cycled until there are `samples` (every sample has its own seed, so a repeated prompt is a new image).
    Seeds: 0.. for the search split, 1,000,000.. for held-out. FID reference: real held-out digits for the builtin
    model, the teacher's images otherwise; `fid_reference="teacher"` measures how far a schedule's distribution is
    from the model's own converged one, which is what a sampler can change (the builtin model's gap to real digits
    is larger than any sampler's effect, see README)."""
    if fid_reference not in (None, "real", "teacher"):
        raise UserInputError("--fid-reference", f"{fid_reference!r} is not 'real' or 'teacher'", "use one of them")
    offset = HELDOUT_SEED_OFFSET if split == "heldout" else 0
    if info.conditioning == "class":
        conditions: list[Any] = [i % info.num_classes for i in range(samples)]
    elif info.conditioning == "prompt":
        if not prompts:
            raise UserInputError("--prompts", f"{info.name} is prompt-conditioned",
                                 "give a prompt file (--prompts FILE)")
        # more samples than prompts: the prompts again, in order, each time with new seeds (not silently fewer)
        base = [p for p in prompts for _ in range(images_per_prompt)]
        conditions = [base[i % len(base)] for i in range(samples)]
    else:
        conditions = [None] * samples
    seeds = tuple(offset + i for i in range(len(conditions)))
    builtin = info.name.startswith("builtin:mnist")
    return CalibrationSpec(
        model=info.name,
        conditions=tuple(conditions),
        seeds=seeds,
        guidance=float(info.guidance_default if guidance is None else guidance),
        teacher=teacher_schedule(info.name, info.num_train_timesteps, teacher_steps),
        split=split,
        fid_reference=fid_reference or ("real" if builtin else "teacher"),
        sample_shape=None if builtin else tuple(int(v) for v in info.sample_shape),
        text_encoding=(getattr(info, "extra", None) or {}).get("text_encoding"),
        guidance_2=(getattr(info, "extra", None) or {}).get("guidance_2"),
    )


class CalibrationSet:
    """A built calibration set on disk: `<cache>/calibration/<hash>/` with manifest.json and teacher shards."""

    def __init__(self, spec: CalibrationSpec, root: Path) -> None:
        self.spec, self.root = spec, Path(root)

    @classmethod
    def open(cls, spec: CalibrationSpec, cache_dir: str | Path | None = None) -> CalibrationSet:
        root = Path(cache_dir or default_cache_dir()) / "calibration" / spec.hash
        return cls(spec, root)

    @property
    def hash(self) -> str:
        return self.spec.hash

    def _shard_path(self, index: int) -> Path:
        return self.root / f"teacher_{index:05d}.safetensors"

    def missing_shards(self) -> list[int]:
        return [i for i in range((len(self.spec) + SHARD - 1) // SHARD) if not self._shard_path(i).is_file()]

    @property
    def is_built(self) -> bool:
        return (self.root / "manifest.json").is_file() and not self.missing_shards()

    def build(self, model: Any, batch_size: int = 64, progress: bool = True) -> CalibrationSet:
        """Compute missing teacher shards (a killed build resumes at the first missing shard)."""
        from safetensors.torch import save

        from schedsearch.runtime.execute import run_batches

        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / "manifest.json", json.dumps(self.spec.to_dict(), indent=1))
        missing = self.missing_shards()
        bar = None
        if progress and missing:
            from tqdm.auto import tqdm

            total = sum(min(len(self.spec), (i + 1) * SHARD) - i * SHARD for i in missing)
            bar = tqdm(total=total, desc=f"teacher {self.spec.split}", unit="img")
        for index in missing:
            lo, hi = index * SHARD, min(len(self.spec), (index + 1) * SHARD)
            parts = []
            for _, images in run_batches(model, self.spec.teacher, self.spec.conditions[lo:hi], self.spec.seeds[lo:hi],
                                         self.spec.guidance, batch_size):
                parts.append(images.to(torch.float16).cpu())
                if bar is not None:
                    bar.update(len(images))
            atomic_write_bytes(self._shard_path(index), save({"images": torch.cat(parts).contiguous()}))
        if bar is not None:
            bar.close()
        return self

    def teacher(self, start: int, stop: int) -> torch.Tensor:
        """Teacher images [start, stop) in [-1, 1], float32 (stored as float16 to keep big sets on disk)."""
        from safetensors.torch import load_file

        if not self.is_built:
            raise FileNotFoundError(f"calibration set {self.hash} is not built at {self.root}; build it first")
        out = []
        for index in range(start // SHARD, (stop - 1) // SHARD + 1):
            shard = load_file(self._shard_path(index))["images"]
            lo = max(start - index * SHARD, 0)
            hi = min(stop - index * SHARD, len(shard))
            out.append(shard[lo:hi].float())
        return torch.cat(out)

    def reference_stats(self, extractor: Any, batch_size: int = 256) -> Any:
        """FID reference statistics for one feature extractor, computed once and cached beside the teacher."""
        from schedsearch.objectives.fid import FeatureStats, FeatureStatsAccumulator
        from schedsearch.objectives.images import frames

        path = self.root / f"fid_ref_{self.spec.fid_reference}_{extractor.name}.npz"
        if path.is_file():
            return FeatureStats.load(path)
        acc = FeatureStatsAccumulator()
        if self.spec.fid_reference == "real":
            acc.update(extractor.features(torch.from_numpy(_real_images(self.spec.model))))
        else:
            for start in range(0, len(self.spec), batch_size):
                acc.update(extractor.features(frames(self.teacher(start, min(len(self.spec), start + batch_size)))))
        stats = acc.result()
        stats.save(path)
        return stats


    def cached_array(self, name: str, key: str, compute: Callable[[], Any]) -> Any:
        """A numpy array derived from this set (a feature-distance table), computed once by `compute()` and kept
        beside the teacher as `<name>_<hash of key>.npy` (`key` names what it depends on: plan, unit, samples)."""
        import io

        import numpy as np

        path = self.root / f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}.npy"
        if path.is_file():
            return np.load(path, allow_pickle=False)
        array = compute()
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
        return array

    def reference_stats_by_name(self, info: Any) -> Any:
        """`extractor name -> FeatureStats`, the form objective factories take."""
        from schedsearch.objectives.features import get_extractor

        return lambda name: self.reference_stats(get_extractor(name, info))


def _real_images(model_name: str) -> Any:
    if model_name.startswith("builtin:mnist"):
        from schedsearch.calibration.mnist_data import load_split

        return load_split().heldout_images  # 1,000 held-out real digits, never trained on
    raise UserInputError("--fid-reference", f"'real': no real image set is known for {model_name}",
                         "use --fid-reference teacher")


def needs_teacher(objectives: Sequence[Any], spec: CalibrationSpec) -> bool:
    """Teacher images cost a 100-step run per sample: build them only for objectives that compare against them
    (FID against real images needs none). Remote evaluators' objectives are names only, so build for them."""
    if not objectives or any(isinstance(o, str) for o in objectives):
        return True
    teacher_fid = spec.fid_reference == "teacher" and any(o.name.startswith("fid") for o in objectives)
    return teacher_fid or any(getattr(o, "needs_teacher", False) for o in objectives)
