"""Runtime cache policies: schedule data, the policy space, runs through diffusers' own hooks, observed cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from schedsearch.calibration.calibration_set import CalibrationSet, default_spec
from schedsearch.errors import UserInputError
from schedsearch.evaluation.local import LocalEvaluator
from schedsearch.objectives.cost import analytic_macs_table, observe_units, schedule_cost
from schedsearch.runtime.diffusers_caches import DiffusersCache, builtin_mag_ratios
from schedsearch.runtime.execute import run_batches
from schedsearch.runtime.models import initial_noise
from schedsearch.runtime.sampler import sample
from schedsearch.spaces.errors import ScheduleError
from schedsearch.spaces.policy_plan import RuntimePolicy
from schedsearch.spaces.schedule import Schedule
from schedsearch.study import build_space

KINDS = ["first_block_cache", "mag_cache", "taylorseer_cache", "pyramid_attention_broadcast", "faster_cache"]


@pytest.fixture(scope="module")
def space(builtin_model):
    return build_space("policy", builtin_model.info, "quick", {"kinds": KINDS, "steps_range": [6, 10]},
                       model=builtin_model, conditions=[0, 1, 2, 3], guidance=2.0)


def _images(model, schedule, n=4, batch=4):
    return torch.cat([im for _, im in run_batches(model, schedule, list(range(n)), list(range(n)), 2.0, batch)])


def test_policy_json_round_trip_and_key():
    plan_schedule = Schedule.from_dict({
        "format": "schedsearch.schedule/v1", "model": "builtin:mnist-dit",
        "solver": {"timesteps": [999.0, 500.0], "steps": [{"order": 1}, {"order": 1}]},
        "policy": {"kind": "first_block_cache", "params": {"threshold": 1}}})
    assert plan_schedule.policy.settings == {"threshold": 1.0}
    again = Schedule.from_json(plan_schedule.to_json())
    assert again.policy == plan_schedule.policy and again.key == plan_schedule.key
    # params given in another order, ints for floats: one content key
    a = RuntimePolicy("mag_cache", {"threshold": 0.1, "max_skip_steps": 2, "mag_ratios": [1, 0.9]})
    b = RuntimePolicy("mag_cache", {"mag_ratios": (1, 0.9), "max_skip_steps": 2, "threshold": 0.1})
    assert a == b
    # a schedule without a policy keeps its JSON (and key) as before: no "policy" entry
    assert "policy" not in Schedule("m", plan_schedule.solver).to_dict()


@pytest.mark.parametrize("policy, field", [
    ({"kind": "teacache", "params": {}}, "policy.kind"),
    ({"kind": "first_block_cache", "params": {"threshold": -0.1}}, "policy.params.threshold"),
    ({"kind": "first_block_cache", "params": {"treshold": 0.1}}, "policy.params.treshold"),
    ({"kind": "taylorseer_cache", "params": {"cache_interval": 2.5}}, "policy.params.cache_interval"),
    ({"kind": "taylorseer_cache", "params": {"disable_cache_before_step": 0}},
     "policy.params.disable_cache_before_step"),
    ({"kind": "mag_cache", "params": {"threshold": 0.1}}, "policy.params.mag_ratios"),
    ({"kind": "pyramid_attention_broadcast", "params": {"spatial_attention_timestep_low": 700.0,
                                                        "spatial_attention_timestep_high": 600.0}},
     "policy.params.spatial_attention_timestep_low"),
])
def test_bad_policies_name_their_field(policy, field):
    data = {"format": "schedsearch.schedule/v1", "model": "m",
            "solver": {"timesteps": [999.0], "steps": [{"order": 1}]}, "policy": policy}
    with pytest.raises(ScheduleError) as info:
        Schedule.from_dict(data)
    assert info.value.field_path == field


def test_policy_and_cache_plan_are_exclusive(builtin_model):
    from schedsearch.runtime.models import model_layout
    from schedsearch.spaces.baselines import fora_cache_plan

    plan = builtin_model.default_plan(6)
    with pytest.raises(ScheduleError, match="not both"):
        Schedule(builtin_model.info.name, plan, fora_cache_plan(model_layout(builtin_model.info), 6, 2),
                 policy=RuntimePolicy("first_block_cache", {"threshold": 0.1})).validate()


def test_space_decode_encode_round_trip_and_inactive_genes(space):
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(40):
        schedule = space.sample(rng)
        kinds.add(schedule.policy.kind)
        assert space.decode(space.encode(schedule)).key == schedule.key
        assert 6 <= schedule.solver.num_steps <= 10
        assert set(space.summary(schedule)) >= {"policy", "num_steps"}
    assert kinds == set(KINDS)
    # genes of the kinds not chosen do not change the schedule
    x = space.encode(space.sample(rng))
    kind = space.kinds[int(x[1])]
    other = next(k for k in space.kinds if k != kind)
    y = x.copy()
    y[space._slices[other]] = space.genome.clip(np.array(space.genome.high))[space._slices[other]]
    assert space.decode(y).key == space.decode(x).key


def test_space_baselines_are_the_runtime_defaults_and_comparisons_add_fewer_steps(space):
    from schedsearch.spaces.policy_plan import defaults

    baselines = dict(space.baselines())
    fbc = baselines["first_block_cache-default-10steps"]
    assert fbc.policy.settings["threshold"] == defaults("first_block_cache")["threshold"] == 0.05
    mag = baselines["mag_cache-default-10steps"].policy.settings
    assert (mag["threshold"], mag["max_skip_steps"], mag["retention_ratio"]) == (0.06, 3, 0.2)
    assert len(mag["mag_ratios"]) == 10  # calibrated at default_steps network calls
    names = [n for n, _ in space.comparisons()]
    assert {"no-cache-6steps", "no-cache-8steps", "no-cache-10steps"} <= set(names)
    for name, schedule in baselines.items():  # every default seeds the search: encodable
        assert space.decode(space.encode(schedule)).key == schedule.key, name


def test_policy_runs_equal_diffusers_hooks_applied_by_hand(builtin_model):
    """run_batches with a policy == diffusers' apply_* on the same network and sampler (the DiffusersCache path the
    cache baselines benchmark was measured with); threshold 0 is the uncached run exactly."""
    model = builtin_model
    plan = model.default_plan(8)
    uncached = _images(model, Schedule(model.info.name, plan))
    zero = Schedule(model.info.name, plan, policy=RuntimePolicy("first_block_cache", {"threshold": 0.0}))
    assert torch.equal(_images(model, zero), uncached)
    policy = RuntimePolicy("mag_cache", {"threshold": 0.2, "max_skip_steps": 2, "retention_ratio": 0.2,
                                         "mag_ratios": tuple(builtin_mag_ratios())})
    ours = _images(model, Schedule(model.info.name, plan, policy=policy))
    labels = torch.arange(4)
    x = initial_noise(range(4), model.info.sample_shape)
    with DiffusersCache(model.network, "mag_cache", threshold=0.2, max_skip_steps=2, retention_ratio=0.2,
                        num_inference_steps=8, mag_ratios=builtin_mag_ratios()) as cache:
        by_hand = sample(cache.wrap(model.denoiser(labels, 2.0)), x, plan, model.noise_schedule)
    assert torch.equal(ours, model.decode(by_hand))
    assert not torch.equal(ours, uncached)
    # removed again: the network is as before
    assert torch.equal(_images(model, Schedule(model.info.name, plan)), uncached)


@pytest.fixture(scope="module")
def calibration(builtin_model, tmp_path_factory):
    spec = default_spec(builtin_model.info, samples=6, teacher_steps=12)
    return CalibrationSet.open(spec, tmp_path_factory.mktemp("cal")).build(builtin_model, batch_size=6,
                                                                             progress=False)


def test_evaluator_observes_what_a_policy_ran(builtin_model, calibration):
    """Cost of an adaptive policy = what each sample's run computed: threshold 0 costs the uncached plan's MACs
    exactly; a high threshold costs less, with a per-sample spread (p90 ≥ mean)."""
    model = builtin_model
    plan = model.default_plan(8)
    evaluator = LocalEvaluator(model, calibration, ["psnr", "macs", "nfe"], batch_size=6)
    uncached = Schedule(model.info.name, plan)
    full = evaluator.evaluate_one(uncached)
    zero = evaluator.evaluate_one(Schedule(model.info.name, plan,
                                           policy=RuntimePolicy("first_block_cache", {"threshold": 0.0})))
    assert zero.status == "ok", zero.error
    assert zero.metrics["macs"] == pytest.approx(full.metrics["macs"], rel=1e-9)
    assert zero.metrics["macs.p90"] == pytest.approx(full.metrics["macs"], rel=1e-9)
    assert zero.metrics["psnr"] == pytest.approx(full.metrics["psnr"], abs=1e-3)
    assert zero.metrics["nfe"] == 8
    cheap = evaluator.evaluate_one(Schedule(model.info.name, plan,
                                            policy=RuntimePolicy("first_block_cache", {"threshold": 0.3})))
    assert cheap.status == "ok", cheap.error
    assert cheap.metrics["macs"] < full.metrics["macs"]
    assert cheap.metrics["macs.p90"] >= cheap.metrics["macs"]
    assert cheap.metrics["measured_s"] > 0
    # the same count by hand: observe_units over each sample's own run, in the MACs table's units
    from schedsearch.runtime.policy_runtime import PolicyRuntime

    table = analytic_macs_table(model.network, model.info)
    spec = calibration.spec
    policy = RuntimePolicy("first_block_cache", {"threshold": 0.3})
    by_hand = []
    for condition, seed in zip(spec.conditions, spec.seeds, strict=True):
        with PolicyRuntime(model, policy, plan) as runtime:
            denoise = runtime.wrap(model.denoiser([condition], spec.guidance))
            x = initial_noise([seed], model.info.sample_shape)
            observed = observe_units(model.network, model.info,
                                     lambda d=denoise, x=x: sample(d, x, plan, model.noise_schedule))
        by_hand.append(observed.per_sample(table, 1))
    assert cheap.metrics["macs"] == pytest.approx(float(np.mean(by_hand)), rel=1e-9)
    assert cheap.metrics["macs.p90"] == pytest.approx(float(np.percentile(by_hand, 90)), rel=1e-9)
    assert max(by_hand) <= schedule_cost(table, plan, model.info, None, multiplier=2.0)


def test_macs_refuses_to_predict_a_policy(builtin_model):
    from schedsearch.objectives.standard import MACs

    schedule = Schedule(builtin_model.info.name, builtin_model.default_plan(6),
                        policy=RuntimePolicy("first_block_cache", {"threshold": 0.1}))
    with pytest.raises(ValueError, match="observed"):
        MACs(builtin_model).value(schedule)


def test_search_on_the_policy_space_stores_spread_and_compares_with_defaults(builtin_model, tmp_path):
    from schedsearch.results.query import baselines_study
    from schedsearch.results.store import ResultStore
    from schedsearch.search.base import Budget
    from schedsearch.study import run_search

    run_search(model=builtin_model, store=tmp_path / "s.db", study="p", space="policy", strategy="tpe",
               objectives=("psnr", "macs"), samples=4, budget=Budget(evaluations=6),
               space_options={"kinds": ["first_block_cache", "taylorseer_cache"], "steps_range": [4, 6]},
               progress=False, cache_dir=tmp_path / "cache")
    store = ResultStore(tmp_path / "s.db")
    records = [r for r in store.records("p") if r.status == "ok"]
    assert len(records) >= 6
    assert all("macs.p90" in r.metrics for r in records if r.to_schedule().policy is not None)
    names = {r.to_schedule().meta.get("baseline") for r in store.records(baselines_study("p"))}
    assert {"first_block_cache-default-6steps", "no-cache-4steps"} <= names
    json.dumps([r.metrics for r in records])  # plain floats
    heldout = [r for r in store.records("p@heldout") if r.status == "ok"]
    assert heldout and all("macs.p90" in r.metrics for r in heldout if r.to_schedule().policy is not None)


def test_cli_refuses_policy_options_elsewhere_and_unknown_kinds(tmp_path):
    from schedsearch.cli import main

    base = ["search", "--strategy", "tpe", "--objectives", "psnr,macs", "--budget", "2", "--study", "x",
            "--store", str(tmp_path / "s.db")]
    assert main([*base, "--space", "cache", "--policies", "first_block_cache"]) == 2
    assert main([*base, "--space", "policy", "--policies", "teacache"]) == 2
    assert main([*base, "--space", "policy", "--steps-range", "9,3"]) == 2
    assert main([*base, "--space", "policy", "--solvers", "HeunDiscreteScheduler"]) == 2
    assert main([*base, "--space", "cache", "--solvers", "DDIMScheduler"]) == 2
    assert not (tmp_path / "s.db").exists()


def test_a_runtime_that_does_not_fit_the_model_is_refused_before_the_search():
    """diffusers' FirstBlockCache fails inside diffusers on SD3's context-pre-only last block: refused up front
    with the runtime's own error, not discovered as a study of failures."""
    from schedsearch.errors import UserInputError
    from schedsearch.runtime.models import load_model

    model = load_model("builtin:mnist-flow")
    with pytest.raises(UserInputError, match="first_block_cache does not run on builtin:mnist-flow"):
        build_space("policy", model.info, "quick", {"kinds": ["first_block_cache"], "steps_range": [4, 6]},
                    model=model, conditions=[0], guidance=2.0)


def test_cache_dit_presets_are_compared_and_a_missing_cache_dit_names_the_extra(builtin_model, monkeypatch):
    pytest.importorskip("cache_dit")
    space = build_space("policy", builtin_model.info, "quick", {"kinds": ["dbcache"], "steps_range": [8, 10]},
                        model=builtin_model, conditions=[0], guidance=2.0)
    compared = dict(space.comparisons())
    f8b0 = compared["dbcache-default-10steps"].policy.settings  # cache-dit's default is its F8B0 0.08 preset
    assert (f8b0["Fn_compute_blocks"], f8b0["Bn_compute_blocks"], f8b0["residual_diff_threshold"]) == (5, 0, 0.08)
    import cache_dit

    assert list(compared["cache-dit-mask-medium-10steps"].policy.settings["steps_computation_mask"]) == \
        cache_dit.steps_mask(total_steps=10, mask_policy="medium")
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = space.sample(rng)
        assert s.policy.get("Fn_compute_blocks") + s.policy.get("Bn_compute_blocks") <= 6
        assert space.decode(space.encode(s)).key == s.key

    import importlib.util

    from schedsearch.cli import main
    from schedsearch.config import StudyConfig
    from schedsearch.errors import UnavailableError
    from schedsearch.search.base import Budget

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    with pytest.raises(UnavailableError, match=r'schedsearch\[cache-dit\]'):
        StudyConfig(model="builtin:mnist-dit", space="policy", strategy="tpe", objectives=("psnr", "macs"),
                    study="x", store="s.db", budget=Budget(evaluations=2), space_options={"kinds": ["dbcache"]})
    assert main(["export", "--store", "nowhere.db", "--study", "x", "--out", "o", "--format", "cache-dit"]) == 2


def test_pick_takes_the_cheapest_that_meets_held_out_targets(tmp_path, capsys):
    from schedsearch.cli import main
    from schedsearch.results.pick import pick
    from schedsearch.results.store import ResultStore

    store_path = tmp_path / "s.db"
    assert main(["search", "--model", "builtin:mnist-dit", "--space", "policy", "--strategy", "tpe",
                 "--objectives", "psnr,macs", "--budget", "6", "--samples", "4", "--steps-range", "4,6",
                 "--policies", "first_block_cache,taylorseer_cache", "--study", "p", "--store", str(store_path),
                 "--cache-dir", str(tmp_path / "cache"), "--quiet"]) == 0
    with ResultStore(store_path) as store:
        from schedsearch.results.query import study_front

        front = study_front(store, "p")
        assert front.heldout  # validated: held-out scores exist for the front
        heldout_psnr = sorted(m["psnr"] for m in front.heldout.values())
        target = heldout_psnr[len(heldout_psnr) // 2]
        chosen = pick(store, "p", {"psnr": target}, {})
        assert chosen.split == "heldout" and chosen.values["psnr"] >= target
        # brute force: no cheaper front schedule meets the target on its held-out scores
        for record in front.records:
            held = front.heldout[record.to_schedule().key]
            if held["psnr"] >= target:
                assert held["macs"] >= chosen.values["macs"]
    out = tmp_path / "pick"
    assert main(["pick", "--store", str(store_path), "--study", "p", "--min", f"psnr={target}", "--out", str(out),
                 "--format", "diffusers"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [e["key"] for e in index["schedules"]] == [chosen.record.key]
    runtime = index["schedules"][0]["runtime"]
    if chosen.record.to_schedule().policy is not None:
        assert runtime["files"] and all((out / f).is_file() for f in runtime["files"])
    else:
        assert "not_expressible" in runtime
    auto = tmp_path / "auto"  # the default format is the picked policy's own runtime
    assert main(["pick", "--store", str(store_path), "--study", "p", "--min", f"psnr={target}", "--out",
                 str(auto)]) == 0
    entry = json.loads((auto / "index.json").read_text())["schedules"][0]
    policy = chosen.record.to_schedule().policy
    assert entry.get("runtime", {}).get("format") == (None if policy is None else policy.runtime)
    capsys.readouterr()
    assert main(["pick", "--store", str(store_path), "--study", "p", "--min", "psnr=1000"]) == 3
    assert "nothing meets" in capsys.readouterr().err
    assert main(["pick", "--store", str(store_path), "--study", "p", "--min", "psnr"]) == 2
    assert main(["pick", "--store", str(store_path), "--study", "p"]) == 2


def test_runtimes_one_after_another_leave_the_network_as_before(builtin_model):
    """diffusers' hook registry leaves an instance `forward`; cache-dit's DiT patch functor replaces it and adds a
    registered module: after each policy the uncached run and the state dict are exactly as before."""
    pytest.importorskip("cache_dit")
    model = builtin_model
    plan = model.default_plan(6)
    uncached = _images(model, Schedule(model.info.name, plan), n=2, batch=2)
    keys = set(model.network.state_dict())
    for kind, settings in [("faster_cache", {}), ("dbcache", {"Fn_compute_blocks": 1}),
                           ("first_block_cache", {"threshold": 0.2}), ("dbcache", {"Fn_compute_blocks": 2})]:
        _images(model, Schedule(model.info.name, plan, policy=RuntimePolicy(kind, settings)), n=2, batch=2)
        assert torch.equal(_images(model, Schedule(model.info.name, plan), n=2, batch=2), uncached), kind
        assert set(model.network.state_dict()) == keys, kind


def test_apply_schedule_runs_a_policy_on_a_model_and_sends_pipelines_to_the_export(builtin_model):
    from schedsearch.runtime import builtin_flow
    from schedsearch.runtime.apply import apply_schedule

    model = builtin_model
    schedule = Schedule(model.info.name, model.default_plan(6),
                        policy=RuntimePolicy("first_block_cache", {"threshold": 0.3}))
    with apply_schedule(model, schedule) as applied:
        images = applied.sample([0, 1, 2, 3], [0, 1, 2, 3], 2.0)
    assert torch.equal(images, _images(model, schedule))
    pipe = builtin_flow.flow_pipeline(builtin_flow.load_builtin_flow())
    flow_schedule = Schedule("builtin:mnist-flow", model.default_plan(6),
                             policy=RuntimePolicy("taylorseer_cache", {"cache_interval": 3}))
    with pytest.raises(ScheduleError, match="--format diffusers"):
        apply_schedule(pipe, flow_schedule, strict=False)


def test_dbcache_mask_genes_decode_to_cache_dits_own_presets(builtin_model):
    pytest.importorskip("cache_dit")
    import cache_dit

    space = build_space("policy", builtin_model.info, "quick",
                        {"kinds": ["dbcache"], "steps_range": [8, 12], "dbcache_masks": True},
                        model=builtin_model, conditions=[0], guidance=2.0)
    assert space.genome.names[-2:] == ("dbcache.steps_mask", "dbcache.steps_mask_static")
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(40):
        schedule = space.sample(rng)
        settings = schedule.policy.settings
        mask = settings.get("steps_computation_mask")
        if mask is not None:
            assert list(mask) in [cache_dit.steps_mask(total_steps=schedule.solver.nfe, mask_policy=p)
                                  for p in ("slow", "medium", "fast", "ultra")]
            seen.add(settings["steps_computation_policy"])
        assert space.decode(space.encode(schedule)).key == schedule.key
        assert "steps_mask" not in settings  # genes of the space, not settings of cache-dit
    assert seen == {"static", "dynamic"}
    static = next(s for s in (space.sample(rng) for _ in range(200))
                  if s.policy.settings.get("steps_computation_policy") == "static")
    assert _images(builtin_model, static, n=2, batch=1).isfinite().all()
    with pytest.raises(UserInputError, match="dbcache_masks"):
        build_space("policy", builtin_model.info, "quick", {"kinds": ["mag_cache"], "dbcache_masks": True},
                    model=builtin_model, conditions=[0], guidance=2.0)
