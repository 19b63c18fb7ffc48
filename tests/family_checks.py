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
