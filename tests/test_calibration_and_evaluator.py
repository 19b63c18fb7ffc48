"""Calibration sets (hash, teacher shards, resumable build, reference stats) and the local evaluator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from schedsearch.calibration import calibration_set as cs
from schedsearch.calibration.calibration_set import CalibrationSet, default_spec, read_prompts
from schedsearch.errors import UserInputError
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.objectives.base import ObjectiveUnavailableError
from schedsearch.objectives.registry import ObjectiveContext, build_objectives, parse_objective_list
from schedsearch.runtime.execute import run_batches
from schedsearch.runtime.models import load_model, model_layout
from schedsearch.spaces.baselines import dpm_solver_plan, fora_cache_plan, linspace_timesteps
from schedsearch.spaces.schedule import Schedule


@pytest.fixture(scope="module")
def model():
    return load_model("builtin:mnist-dit")


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    spec = default_spec(model.info, samples=6, teacher_steps=12)
    return CalibrationSet.open(spec, tmp_path_factory.mktemp("cal")).build(model, batch_size=4, progress=False)


def _schedule(model, steps=6, cache=None):
    return Schedule(model.info.name, dpm_solver_plan(linspace_timesteps(1000, steps), order=2), cache)


def test_spec_hash_and_splits(model):
    search = default_spec(model.info, samples=20)
    heldout = default_spec(model.info, samples=20, split="heldout")
    assert search.hash == default_spec(model.info, samples=20).hash
    assert search.hash != heldout.hash != default_spec(model.info, samples=20, guidance=3.0).hash
    assert not set(search.seeds) & set(heldout.seeds)
    assert sorted(search.conditions[:10]) == list(range(10))  # balanced classes
    assert search.head(5).seeds == search.seeds[:5]
    with pytest.raises(ValueError, match="samples"):
        search.head(21)
    assert cs.CalibrationSpec.from_dict(search.to_dict()).hash == search.hash


def test_teacher_images_equal_a_direct_run_and_build_resumes(model, built):
    spec = built.spec
    direct = torch.cat([imgs for _, imgs in run_batches(model, spec.teacher, spec.conditions, spec.seeds,
                                                        spec.guidance, batch_size=6)])
    stored = built.teacher(0, len(spec))
    assert torch.allclose(stored, direct, atol=2e-3)  # float16 storage
    assert torch.equal(built.teacher(2, 5), stored[2:5])
    shard = built.root / "teacher_00000.safetensors"
    before = shard.read_bytes()
    shard.unlink()  # a killed build: the shard is missing, the manifest is there
    assert not built.is_built and built.missing_shards() == [0]
    built.build(model, batch_size=3, progress=False)
    assert shard.read_bytes() == before  # deterministic: per-sample seeds, independent of the batch size


def test_teacher_shards_split_across_boundaries(model, tmp_path, monkeypatch):
    monkeypatch.setattr(cs, "SHARD", 4)
    spec = default_spec(model.info, samples=10, teacher_steps=4)
    cal = CalibrationSet.open(spec, tmp_path).build(model, progress=False)
    assert len(list(cal.root.glob("teacher_*.safetensors"))) == 3
    whole = cal.teacher(0, 10)
    assert torch.equal(cal.teacher(3, 9), whole[3:9])


def test_reference_stats_cached(model, built):
    from schedsearch.objectives.features import get_extractor

    extractor = get_extractor("classifier", model.info)
    stats = built.reference_stats(extractor)
    assert stats.count == 1000 and stats.dim == 64  # the held-out real digits
    assert (built.root / "fid_ref_real_classifier.npz").is_file()
    assert np.array_equal(built.reference_stats(extractor).mean, stats.mean)


def test_fid_against_the_teacher_distribution(model, tmp_path):
    spec = default_spec(model.info, samples=24, teacher_steps=12, fid_reference="teacher")
    assert spec.hash != default_spec(model.info, samples=24, teacher_steps=12).hash  # another reference, another set
    assert default_spec(model.info, samples=4).fid_reference == "real"
    with pytest.raises(ValueError, match="--fid-reference"):
        default_spec(model.info, samples=4, fid_reference="imagenet")
    cal = CalibrationSet.open(spec, tmp_path).build(model, batch_size=12, progress=False)
    ev = LocalEvaluator(model, cal, ["fid"], batch_size=12)
    teacher = ev.evaluate_one(spec.teacher).metrics["fid"]
    coarse = ev.evaluate_one(_schedule(model, 2)).metrics["fid"]
    assert abs(teacher) < 1e-2  # the same images as the reference, up to float16 storage
    assert coarse > 10 * max(teacher, 1e-3)
    assert (cal.root / "fid_ref_teacher_classifier.npz").is_file()


def test_evaluator_metrics(model, built):
    ev = LocalEvaluator(model, built, ["psnr", "mse", "class_alignment", "nfe", "macs"], batch_size=4)
    teacher = ev.evaluate_one(built.spec.teacher)
    assert teacher.status == "ok", teacher.error
    assert teacher.metrics["psnr"] > 60 and teacher.metrics["mse"] < 1e-5  # only the float16 storage differs
    fast = ev.evaluate_one(_schedule(model, 6))
    cached = ev.evaluate_one(_schedule(model, 6, fora_cache_plan(model_layout(model.info), 6, 2)))
    assert fast.metrics["psnr"] < teacher.metrics["psnr"]
    assert cached.metrics["macs"] < fast.metrics["macs"]
    assert fast.metrics["nfe"] == 6 and teacher.metrics["nfe"] == 12
    assert 0.5 < fast.metrics["class_alignment"] <= 1.0
    assert ev.calibration_hash == f"{built.hash}-n6"
    # quality means carry their 95% bootstrap interval over the samples; costs need none
    assert fast.metrics["psnr.ci95_low"] < fast.metrics["psnr"] < fast.metrics["psnr.ci95_high"]
    assert fast.metrics["mse.ci95_low"] < fast.metrics["mse"] < fast.metrics["mse.ci95_high"]
    assert "macs.ci95_low" not in fast.metrics
    assert fast.metrics["class_alignment.ci95_low"] <= fast.metrics["class_alignment"] <= 1.0


def test_evaluator_batches_do_not_change_scores(model, built):
    a = LocalEvaluator(model, built, ["psnr", "mse"], batch_size=6).evaluate_one(_schedule(model, 5))
    b = LocalEvaluator(model, built, ["psnr", "mse"], batch_size=4).evaluate_one(_schedule(model, 5))
    assert a.metrics == pytest.approx(b.metrics, rel=1e-5)


def test_evaluator_records_failures(model, built):
    ev = LocalEvaluator(model, built, ["psnr"], batch_size=4)
    wrong = Schedule("builtin:other", _schedule(model).solver)
    result = ev.evaluate_one(wrong)
    assert result.status == "failed" and "model" in result.error and not result.metrics


def test_objective_registry_errors(model):
    assert parse_objective_list("psnr, macs") == ["psnr", "macs"]
    with pytest.raises(ValueError, match="unknown objective"):
        parse_objective_list("psnr,sharpness")
    with pytest.raises(ValueError, match="twice"):
        parse_objective_list("psnr,psnr")
    with pytest.raises(ObjectiveUnavailableError, match="reference"):
        build_objectives(["fid"], ObjectiveContext(model))


def test_read_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# DrawBench subset\na red cube\n\n a cat \n")
    assert read_prompts(path) == ["a red cube", "a cat"]
    with pytest.raises(UserInputError, match=r"^--prompts: no file"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(UserInputError, match="has no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_predicted_latency_table_is_measured_once_and_orders_schedules(model, tmp_path, monkeypatch):
    from schedsearch.objectives.standard import PredictedLatency

    monkeypatch.setattr(PredictedLatency, "batch", 4)
    objective = PredictedLatency(model, str(tmp_path))
    full = objective.value(_schedule(model, 6))
    fora = objective.value(_schedule(model, 6, fora_cache_plan(model_layout(model.info), 6, 3)))
    short = objective.value(_schedule(model, 3))
    assert 0 < fora < full and 0 < short < full
    (table_file,) = tmp_path.glob("latency_*_b4.json")
    again = PredictedLatency(model, str(tmp_path))  # a new process would read the same table, not re-measure
    monkeypatch.setattr(PredictedLatency, "_measure", lambda self: pytest.fail("re-measured"))
    assert again.value(_schedule(model, 6)) == pytest.approx(full)
    assert table_file.is_file()


def test_more_samples_than_prompts_cycles_the_prompts_with_new_seeds():
    """--samples 5 with 2 prompts is 5 samples (prompts in turn, each with its own seed), not silently 2."""
    info = SimpleNamespace(name="diffusers:tiny", conditioning="prompt", num_classes=None, guidance_default=4.5,
                           num_train_timesteps=1000, default_plan=None, sample_shape=(4, 8, 8))
    spec = default_spec(info, samples=5, prompts=["a cat", "a dog"], teacher_steps=4)
    assert list(spec.conditions) == ["a cat", "a dog", "a cat", "a dog", "a cat"]
    assert list(spec.seeds) == [0, 1, 2, 3, 4]
    assert list(default_spec(info, samples=1, prompts=["a cat", "a dog"], teacher_steps=4).conditions) == ["a cat"]


def test_fid_carries_an_interval_once_the_covariance_is_full_rank(model, tmp_path):
    """64-d classifier features: from 64 samples on, `fid` has `fid.ci95_low/high` (jackknife, objectives/fid.py)
    around it; below, the covariance is singular and no interval is claimed."""
    spec = default_spec(model.info, samples=70, teacher_steps=12)  # real digits as the reference: no teacher run
    cal = CalibrationSet.open(spec, tmp_path)
    ev = LocalEvaluator(model, cal, ["fid"], batch_size=70)
    found = ev.evaluate_one(_schedule(model, 4)).metrics
    assert found["fid.ci95_low"] <= found["fid"] <= found["fid.ci95_high"]
    assert found["fid.ci95_high"] - found["fid.ci95_low"] > 0
    small = LocalEvaluator(model, cal, ["fid"], samples=40, batch_size=40)
    with pytest.warns(UserWarning, match="singular"):
        assert "fid.ci95_low" not in small.evaluate_one(_schedule(model, 4)).metrics
