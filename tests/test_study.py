"""End to end on the builtin model with tiny settings: search → store → resume → dedupe → front → export → evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schedsearch.cli import main
from schedsearch.results.store import ResultStore
from schedsearch.search.base import Budget
from schedsearch.study import run_search

TINY = {"samples": 4, "batch_size": 8, "progress": False}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sscache")


def _run(store, study, cache_dir, budget=6, **kw):
    args = {"model": "builtin:mnist-dit", "space": "cache", "strategy": "ecad", "objectives": ["psnr", "macs"],
            "study": study, "store": store, "budget": Budget(evaluations=budget), "cache_dir": cache_dir,
            "space_options": {"num_steps": 6}, "strategy_options": {"population": 4}, **TINY}
    args.update(kw)
    return run_search(**args)


def test_study_resumes_and_dedupes_across_studies(tmp_path, cache_dir):
    store = tmp_path / "r.db"
    first = _run(store, "a", cache_dir)
    assert first.evaluations >= 6
    with ResultStore(store) as s:
        keys_a = s.keys("a")
        assert len(keys_a) == s.count("a") == first.evaluations  # one row per distinct candidate
        assert s.study_settings("a")["objectives"] == [["psnr", "max"], ["macs", "min"]]
        records = s.records("a")
    assert all(r.status == "ok" for r in records)
    assert all(r.calibration_hash.endswith("-n4") for r in records)
    assert all(r.metrics["macs"] > 0 for r in records)

    assert _run(store, "a", cache_dir, budget=4, resume=True).evaluations == 0  # the budget is the study's total
    resumed = _run(store, "a", cache_dir, budget=first.evaluations + 4, resume=True)
    assert resumed.evaluations >= 4
    with ResultStore(store) as s:
        assert s.keys("a") >= keys_a and s.count("a") == first.evaluations + resumed.evaluations

    # The same search under another name asks the same first generation: answered from the store, not rerun.
    other = _run(store, "b", cache_dir, budget=4)
    assert other.reused >= 4
    with ResultStore(store) as s:
        copied = [r for r in s.records("b") if r.summary.get("reused_from") == "a"]
    assert len(copied) == other.reused


def test_study_settings_must_match_on_resume(tmp_path, cache_dir):
    """--resume compares the stored config field by field and names the first that differs; nothing is added."""
    from schedsearch.errors import UserInputError

    store = tmp_path / "r.db"
    _run(store, "a", cache_dir, budget=2)
    with ResultStore(store) as s:
        count, settings = s.count("a"), s.study_settings("a")
    assert settings["strategy_options"] == {"population": 4} and settings["guidance"] is None
    with pytest.raises(UserInputError, match=r"^--objectives: study 'a' was run with"):
        _run(store, "a", cache_dir, budget=2, objectives=["mse", "macs"], resume=True)
    with pytest.raises(UserInputError, match=r"^--samples: study 'a' was run with 4, now 8"):
        _run(store, "a", cache_dir, budget=2, samples=8, resume=True)
    with pytest.raises(UserInputError, match=r"^--seed: .* 0, now 1"):
        _run(store, "a", cache_dir, budget=2, seed=1, resume=True)
    with pytest.raises(UserInputError, match=r"^--study: 'a' already exists .* pass --resume"):
        _run(store, "a", cache_dir, budget=2)
    with pytest.raises(UserInputError, match=r"^--resume: there is no study 'b'"):
        _run(store, "b", cache_dir, budget=2, resume=True)
    with pytest.raises(UserInputError, match=r"^--resume: there is no study 'c'"):
        _run(tmp_path / "none.db", "c", cache_dir, budget=2, resume=True)
    assert not (tmp_path / "none.db").exists()
    # a first run that stopped after storing its settings, before any record: run it again, no --resume needed
    with ResultStore(store) as s:
        s.set_study_settings("crashed", {"samples": 4, "objectives": [["psnr", "max"], ["macs", "min"]]})
    assert _run(store, "crashed", cache_dir, budget=2).evaluations >= 2
    with ResultStore(store) as s:
        assert s.count("a") == count and s.study_settings("a") == settings


def test_dp_sweeps_cachequant_plans(tmp_path, cache_dir):
    result = _run(tmp_path / "r.db", "dp", cache_dir, budget=50, space="cachequant", strategy="dp",
                  strategy_options={})
    with ResultStore(tmp_path / "r.db") as s:
        records = s.records("dp")
    assert result.evaluations == len(records) >= 1
    for r in records:
        cache = r.to_schedule().cache
        assert cache.kind == "unit" and cache.refresh_steps[0] == 0


def test_dc_fit_improves_on_plain_unipc(tmp_path, cache_dir):
    _run(tmp_path / "r.db", "dc", cache_dir, budget=10, space="dc", strategy="dc-fit", objectives=["mse", "nfe"],
         space_options={"nfe": 5}, strategy_options={})
    with ResultStore(tmp_path / "r.db") as s:
        records = s.records("dc")
    assert len(records) == 2
    plain = next(r for r in records if all(st.dc_ratio == 1.0 for st in r.to_schedule().solver.steps))
    fitted = next(r for r in records if r is not plain)
    assert fitted.metrics["mse"] < plain.metrics["mse"]


def test_cli_search_front_export_evaluate(tmp_path, cache_dir, capsys):
    store, out = tmp_path / "r.db", tmp_path / "front"
    common = ["--store", str(store), "--study", "s", "--cache-dir", str(cache_dir)]
    argv = ["search", "--space", "solver", "--strategy", "nsga2", "--objectives", "psnr,nfe", "--budget", "4",
            "--samples", "4", "--batch-size", "8", "--quiet", *common]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "on held-out seeds: the front strictly dominates" in printed  # the baselines, re-scored there too
    with ResultStore(store) as s:
        from schedsearch.results.query import compare_with_baselines

        held = compare_with_baselines(s, "s", "heldout")
        assert held is not None and held.baselines and set(held.dominated) <= set(held.baselines)
        heldout_keys = {r.to_schedule().key for r in s.records("s@heldout")}
        baseline_keys = {r.to_schedule().key for r in s.records("s@baselines")}
        assert heldout_keys & baseline_keys  # the baselines' front was re-scored on held-out seeds
    assert main(argv) == 2  # the study exists: --resume is required
    assert "--resume" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["front", "--store", str(store), "--study", "s", "--format", "json"]) == 0
    front = json.loads(capsys.readouterr().out)
    assert front and {"psnr", "nfe", "key"} <= set(front[0])
    psnr, nfe = np.array([r["psnr"] for r in front]), np.array([r["nfe"] for r in front])
    for i in range(len(front)):  # nothing on the printed front dominates another of its points
        assert not np.any((psnr >= psnr[i]) & (nfe <= nfe[i]) & ((psnr > psnr[i]) | (nfe < nfe[i])))
    assert all("psnr (held-out)" in r and "nfe (held-out)" not in r for r in front)  # a cost is seed-free
    assert main(["front", "--store", str(store), "--study", "s", "--format", "json", "--on", "heldout"]) == 0
    heldout = json.loads(capsys.readouterr().out)
    assert {r["psnr"] for r in heldout} <= {r["psnr (held-out)"] for r in front}  # the same schedules' re-scores
    assert main(["front", "--store", str(store), "--study", "s", "--all", "--on", "heldout"]) == 2
    assert main(["export", "--store", str(store), "--study", "s", "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert list(index["objectives"]) == ["psnr", "nfe"]  # the study's order, not the store's sorted keys
    assert set(index["baselines"]) == {"search", "heldout"} and index["baselines"]["heldout"]["baselines_front"]
    first = out / index["schedules"][0]["file"]
    capsys.readouterr()
    assert main(["evaluate", "--schedule", str(first), "--objectives", "psnr,nfe,macs", "--samples", "4",
                 "--cache-dir", str(cache_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["samples"] == 4 and set(result["metrics"]) >= {"psnr", "nfe", "macs"}


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["search", "--space", "solver", "--strategy", "dp", "--objectives", "psnr,nfe", "--budget", "2"],
         "--strategy"),
        (["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,speed", "--budget", "2"],
         "--objectives"),
        (["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs", "--budget", "0"],
         "--budget"),
        (["search", "--space", "solver", "--strategy", "nsga2", "--objectives", "psnr,nfe", "--budget", "2",
          "--no-block-skip"], "--no-block-skip"),
        (["search", "--space", "cache", "--strategy", "tpe", "--objectives", "psnr,macs", "--budget", "2",
          "--shift-seeds"], "--shift-seeds"),
        (["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs", "--budget", "2",
          "--batch-size", "0"], "--batch-size"),
        (["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs", "--budget", "2",
          "--samples", "8", "--low-fidelity-samples", "8"], "--low-fidelity-samples"),
        (["search", "--space", "cache", "--strategy", "ecad", "--objectives", "psnr,macs", "--budget", "2",
          "--guidance", "nan"], "--guidance"),
    ],
)
def test_cli_search_bad_input_writes_nothing(tmp_path, capsys, argv, field):
    store = tmp_path / "r.db"
    assert main([*argv, "--study", "s", "--store", str(store)]) == 2
    assert field in capsys.readouterr().err
    assert not store.exists()


def test_cli_evaluate_unknown_objective(tmp_path, capsys):
    from schedsearch.cli import main as cli

    path = tmp_path / "s.json"
    assert cli(["schedule", "ddim", "--steps", "5", "--out", str(path)]) == 0
    assert cli(["evaluate", "--schedule", str(path), "--objectives", "fid,sharpness", "--json"]) == 2
    assert "sharpness" in capsys.readouterr().err


def test_successive_halving_and_heldout_validation(tmp_path, cache_dir):
    from schedsearch.study import heldout_study

    store = tmp_path / "r.db"
    result = _run(store, "sh", cache_dir, budget=6, samples=4, low_fidelity_samples=2)
    with ResultStore(store) as s:
        records = s.records("sh")
        settings = s.study_settings("sh")
        heldout = s.records(heldout_study("sh"))
        s_baselines = s.records("sh@baselines")
    low = [r for r in records if r.calibration_hash.endswith("-n2")]
    full = [r for r in records if r.calibration_hash == settings["calibration"]]
    assert len(low) + len(full) == len(records) == result.evaluations
    assert 0 < len(full) < len(low)  # only the better part of each batch is promoted
    assert {r.to_schedule().key for r in full} <= {r.to_schedule().key for r in low}
    # Every front point was re-scored on the held-out split: other seeds, same sample count.
    assert heldout and all(r.calibration_hash != settings["calibration"] for r in heldout)
    baselines = {r.to_schedule().key for r in s_baselines}
    assert {r.to_schedule().key for r in heldout} <= {r.to_schedule().key for r in full} | baselines
    assert {r.to_schedule().key for r in heldout} & baselines  # the baselines' front, re-scored there too


def test_promote_picks_the_first_fronts():
    from schedsearch.search.loop import _promote

    values = np.array([[3.0, 3.0], [1.0, 2.0], [2.0, 1.0], [np.inf, np.inf], [2.5, 2.5]])
    assert _promote(values, 0.4) == [1, 2]
    assert _promote(values, 0.6) == [1, 2, 4]


def test_cachequant_dp_seeds_the_cache_space(builtin_model, cache_dir):
    """CacheQuant's DP refresh steps for the whole block stack seed ECAD's cache space, with and without block
    skipping: the seeds are exactly the DP's plans on the same feature table."""
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.methods.cachequant import dp_distance, dp_seed_genomes
    from schedsearch.search.dynamic import dp_sweep
    from schedsearch.spaces.cache_interval import CacheIntervalSpace
    from schedsearch.study import build_space

    space = build_space("cache", builtin_model.info, "quick", {"num_steps": 8})
    calibration = CalibrationSet.open(default_spec(builtin_model.info, samples=4), cache_dir)
    seeds = [space.decode(g).cache for g in dp_seed_genomes(builtin_model, calibration, space)]
    table = dp_distance(builtin_model, calibration, CacheIntervalSpace(space.structure, solver=space.solver))
    expected = [p.refresh_steps for p in dp_sweep(table).values()]
    assert len(seeds) == 2 * len(expected) and [s.skip_reused_blocks for s in seeds[:2]] == [False, True]
    full = "1" * space.genome.size
    refreshed = [tuple(i for i, row in enumerate(s.recompute) if row == full[: len(row)]) for s in seeds[::2]]
    assert refreshed == expected


def test_shift_seeds_reach_the_gas_first_generation(tmp_path, cache_dir):
    """With shift_seeds, ECAD's generation 0 holds every whole-stack seed (FORA, evenly spaced, the DP's) with one
    refresh moved one step; without it (the quick preset's default) none of them."""
    from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
    from schedsearch.methods.cachequant import dp_seed_genomes
    from schedsearch.methods.ecad import shifted_refresh_genomes
    from schedsearch.runtime.models import load_model
    from schedsearch.study import build_space

    store = tmp_path / "r.db"
    _run(store, "on", cache_dir, budget=1, strategy_options={"population": 4, "shift_seeds": True})
    _run(store, "off", cache_dir, budget=1)
    model = load_model("builtin:mnist-dit")
    space = build_space("cache", model.info, "quick", {"num_steps": 6})
    own = [space.encode(s) for _, s in space.baselines()]
    calibration = CalibrationSet.open(default_spec(model.info, samples=TINY["samples"]), cache_dir)
    dp = dp_seed_genomes(model, calibration, space)
    shifted = {space.decode(g).key for g in shifted_refresh_genomes(space, own + dp)}
    with ResultStore(store) as s:
        on = {r.to_schedule().key for r in s.records("on")}
        off = {r.to_schedule().key for r in s.records("off")}
    assert shifted and shifted <= on and not shifted & (off - {space.decode(g).key for g in own + dp})
    with pytest.raises(ValueError, match="shift_seeds"):
        _run(store, "bad", cache_dir, budget=1, strategy="nsga2", space="solver", objectives=["psnr", "nfe"],
             space_options=None, strategy_options={"shift_seeds": True})
    with ResultStore(store) as s:
        assert s.study_settings("bad") is None and s.count("bad") == 0  # refused before anything was written


def test_model_work_is_counted_and_can_be_the_budget(tmp_path, cache_dir):
    """Every evaluation records the denoiser passes it ran (rows: 4 samples × 6 steps × 2 for the CFG pair = 48,
    whatever it caches, when each plan runs from noise: no prefix sharing) and its images; copies from another study
    cost none; a budget in passes is the study's total across resumes, checked between asks like the others."""
    store = tmp_path / "w.db"
    result = run_search(model="builtin:mnist-dit", space="cache", strategy="ecad", objectives=["psnr", "macs"],
                        study="w", store=store, budget=Budget(forward_passes=48 * 5), cache_dir=cache_dir,
                        space_options={"num_steps": 6}, strategy_options={"population": 4}, validate=False,
                        share_prefixes=False, **TINY)
    with ResultStore(store) as s:
        records = s.records("w")
    own = [r for r in records if "reused_from" not in r.summary]
    assert own and all(r.summary["forward_passes"] == 48 and r.summary["images"] == 4 for r in own)
    assert result.forward_passes == 48 * result.evaluations >= 48 * 5
    again = run_search(model="builtin:mnist-dit", space="cache", strategy="ecad", objectives=["psnr", "macs"],
                       study="w", store=store, budget=Budget(forward_passes=48 * 5), cache_dir=cache_dir,
                       space_options={"num_steps": 6}, strategy_options={"population": 4}, validate=False,
                       resume=True, share_prefixes=False, **TINY)
    assert again.evaluations == 0 and again.forward_passes == 0
    copied = _run(store, "w2", cache_dir, budget=4, validate=False)
    with ResultStore(store) as s:
        assert all("forward_passes" not in r.summary for r in s.records("w2") if "reused_from" in r.summary)
    assert copied.reused >= 1
    assert main(["search", "--model", "builtin:mnist-dit", "--space", "cache", "--strategy", "ecad", "--objectives",
                 "psnr,macs", "--budget-passes", "0", "--study", "x", "--store", str(tmp_path / "x.db")]) == 2
