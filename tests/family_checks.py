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


def cli_search_export_evaluate(name: str, size: list[str], prompts: list[str], tmp_path: Path, capsys: Any) -> Any:
    """The CLI as users run it on a pipeline: a 4-evaluation cache search from a prompt file, its front exported,
    the cheapest exported schedule (one that reuses something) scored by `evaluate`; returns that schedule."""
    import json

    from schedsearch.cli import main
    from schedsearch.spaces.schedule import load_schedule

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    common = ["--samples", "2", "--prompts", str(prompt_file), "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "2"]
    assert main(["search", "--model", name, *size, "--space", "cache", "--strategy", "ecad", "--objectives",
                 "psnr,macs", "--budget", "4", "--study", "s", "--store", str(tmp_path / "r.db"), "--no-validate",
                 "--quiet", *common]) == 0
    assert main(["export", "--store", str(tmp_path / "r.db"), "--study", "s", "--out", str(tmp_path / "front")]) == 0
    index = json.loads((tmp_path / "front" / "index.json").read_text())
    cheapest = min(index["schedules"], key=lambda e: e["metrics"]["macs"])  # the front's most reuse
    path = tmp_path / "front" / cheapest["file"]
    schedule = load_schedule(path)
    assert "0" in "".join(schedule.cache.recompute)
    capsys.readouterr()
    assert main(["evaluate", "--model", name, *size, "--schedule", str(path), "--objectives", "psnr,macs",
                 "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    return schedule


def true_cfg_per_pass(model: Any, applied: Any, cond: Any, neg: Any, guidance: float, scale: float, x: Any,
                      plan: Any, separate: bool = True) -> Any:
    """Our sampler under `applied` (an `apply_schedule` on the model) running true CFG as the pipelines do: the
    conditional and the negative pass as two calls per step, each with its own cache (`separate=False`: one cache
    for both, the wrong way a test contrasts with)."""
    from schedsearch.runtime.apply import branch_of_call
    from schedsearch.runtime.sampler import sample

    runtime = applied.runtime
    on_cond, on_neg = model.denoiser(cond, guidance), model.denoiser(neg, guidance)

    def true_cfg(z: Any, t: float, i: int) -> Any:
        runtime.context.step_index = i
        runtime.context.branch = branch_of_call(0)
        c = on_cond(z, t, i)
        runtime.context.branch = branch_of_call(1 if separate else 0)
        u = on_neg(z, t, i)
        return u + scale * (c - u)

    runtime.reset()
    return sample(true_cfg, x, plan, model.noise_schedule, model.info.prediction_type)
