"""Checks every pipeline family's tests run the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def quick_cache_search(model: Any, tmp_path: Path, study: str) -> Any:
    """ECAD's cache search (block skipping where the family has it) on 2 prompts through the pipeline's own encoder,
    PSNR on whole outputs and MACs counted on the real forward, 4 steps, at least 4 evaluations, none failed."""
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    result = run_search(model=model, space="cache", strategy="ecad", objectives=["psnr", "macs"], study=study,
                        store=tmp_path / "r.db", budget=Budget(evaluations=4), samples=2, prompts=["a cat", "a dog"],
                        cache_dir=tmp_path / "cache", batch_size=2, space_options={"num_steps": 4},
                        strategy_options={"population": 4}, progress=False, validate=False)
    assert result.evaluations >= 4 and result.failed == 0
    return result


SPACES = ("solver", "cache", "cachequant", "dc", "joint")


def every_baseline_runs(model: Any, conditions: Any, spaces: tuple[str, ...] = SPACES) -> int:
    """Every baseline of each space (each schedule once) sampled on one sample through `apply_schedule`, to a finite
    output; the number of schedules run."""
    import torch

    from schedsearch.runtime.apply import apply_schedule
    from schedsearch.study import build_space

    ran = set()
    for name in spaces:
        named = build_space(name, model.info).baselines()
        assert named, name
        for label, schedule in named:
            if schedule.key in ran:
                continue
            ran.add(schedule.key)
            with apply_schedule(model, schedule) as applied:
                out = applied.sample(conditions, [0], decode=False)
            assert torch.isfinite(out).all(), f"{name}: {label}"
    return len(ran)
