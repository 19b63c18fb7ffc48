"""The five search spaces: every in-bounds genome repairs to a valid schedule; baselines round-trip; no torch."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import numpy as np
import pytest

from schedsearch.errors import UserInputError
from schedsearch.methods import SPACE_NAMES
from schedsearch.methods.ecad import shifted_refresh_genomes
from schedsearch.spaces.base import ModelStructure, SearchSpace
from schedsearch.spaces.baselines import (
    dpmpp_2m_plan,
    first_evaluated_step,
    fora_cache_plan,
    linspace_timesteps,
    trailing_timesteps,
    unipc_plan,
    windowed_every_n_cache_plan,
)
from schedsearch.spaces.cache_interval import CacheIntervalSpace
from schedsearch.spaces.cache_mask import CacheMaskSpace
from schedsearch.spaces.cache_plan import ComponentCachePlan, UnitCachePlan
from schedsearch.spaces.compensation import CompensationSpace
from schedsearch.spaces.joint import JointSpace
from schedsearch.spaces.registry import SPACES, make_space
from schedsearch.spaces.schedule import Schedule
from schedsearch.spaces.solver import SolverSpace

T = 1000
BUILTIN = ModelStructure(
    name="builtin:mnist-dit", num_train_timesteps=T, layout="transformer_blocks[6](attn1,ff)", num_blocks=6,
    unit_group="transformer_blocks", unit_blocks=6, block_skip=True,
)
PIXART = ModelStructure(
    name="pixart-like", num_train_timesteps=T, layout="transformer_blocks[4](attn1,attn2,ff)", num_blocks=4,
    unit_group="transformer_blocks", unit_blocks=4, has_cross_attention=True,
)
AFS_SOLVER = dataclasses.replace(unipc_plan(linspace_timesteps(T, 8)), first_step="zero_x0")

CASES = {
    "solver": lambda: SolverSpace(BUILTIN),
    "solver-small": lambda: SolverSpace(BUILTIN, nfe_range=(1, 3), analytical_first_step=False, max_order=2,
                                        rules=("bh2",), fixed_start=False),
    "cache": lambda: CacheMaskSpace(BUILTIN),
    "cache-pixart": lambda: CacheMaskSpace(PIXART, num_steps=10),
    "cache-afs": lambda: CacheMaskSpace(BUILTIN, solver=AFS_SOLVER),
    "cachequant": lambda: CacheIntervalSpace(BUILTIN),
    "cachequant-bounded": lambda: CacheIntervalSpace(BUILTIN, unit=(1, 5), max_group=4, solver=AFS_SOLVER),
    "dc": lambda: CompensationSpace(BUILTIN),
    "dc-nfe8": lambda: CompensationSpace(PIXART, nfe=8, ratio_range=(0.8, 1.2)),
    "joint": lambda: JointSpace(BUILTIN),
    "joint-pixart": lambda: JointSpace(PIXART, nfe_range=(3, 6)),
    "joint-nocomp": lambda: JointSpace(BUILTIN, nfe_range=(5, 7), compensation=False, analytical_first_step=False),
}


@pytest.fixture(params=sorted(CASES), scope="module")
def space(request: pytest.FixtureRequest) -> SearchSpace:
    return CASES[request.param]()


def _genomes(space: SearchSpace, seed: int = 0) -> list[np.ndarray]:
    """200 uniform genomes and 200 in-bounds perturbations of baselines / random genomes (bit flips, jitter)."""
    rng = np.random.default_rng(seed)
    spec = space.genome
    out = [spec.random(rng) for _ in range(200)]
    parents = [space.encode(s) for _, s in space.baselines()] + out[:20]
    lo, hi = np.array(spec.low), np.array(spec.high)
    for k in range(200):
        x = parents[k % len(parents)].copy()
        flip = rng.random(spec.size) < 0.1
        x = np.where(flip, lo + rng.random(spec.size) * (hi - lo), x)
        out.append(spec.clip(x + rng.normal(0, 0.05, spec.size) * (hi - lo)))
    out += [np.array(spec.low, dtype=float), np.array(spec.high, dtype=float)]
    return out


def _first_evaluated_row_full(schedule: Schedule) -> bool:
    cache = schedule.cache
    first = first_evaluated_step(schedule.solver)
    if isinstance(cache, ComponentCachePlan):
        return all(set(row) == {"1"} for row in cache.recompute[: first + 1])
    if isinstance(cache, UnitCachePlan):
        return cache.refresh_steps[0] == first
    return True


def test_random_and_perturbed_genomes_decode_to_valid_schedules(space: SearchSpace) -> None:
    for x in _genomes(space):
        schedule = space.decode(x).validate(T)
        assert _first_evaluated_row_full(schedule)
        # decode output is a point of the space; == compares what `key` hashes (model, solver, cache), faster
        assert space.decode(space.encode(schedule)) == schedule


def test_decode_is_deterministic(space: SearchSpace) -> None:
    x = space.genome.random(np.random.default_rng(1))
    assert space.decode(x).key == space.decode(x.copy()).key == space.decode(list(x)).key  # type: ignore[arg-type]


def test_baselines_round_trip(space: SearchSpace) -> None:
    named = space.baselines()
    assert named
    names = [n for n, _ in named]
    assert len(set(names)) == len(names)
    assert len({s.key for _, s in named}) == len(named)
    for name, schedule in named:
        schedule.validate(T)
        genome = space.encode(schedule)
        assert genome.shape == (space.genome.size,)
        np.testing.assert_array_equal(space.genome.clip(genome), genome)  # in bounds already
        assert space.decode(genome).key == schedule.key, name


def test_summary_columns(space: SearchSpace) -> None:
    schedule = space.sample(np.random.default_rng(2))
    summary = space.summary(schedule)
    assert summary["space"] == space.name
    assert summary["nfe"] == schedule.solver.nfe
    expected = {
        SolverSpace: {"mean_order", "num_correctors", "afs", "t_last"},
        CacheMaskSpace: {"recompute_fraction", "num_full_steps"},
        CacheIntervalSpace: {"num_refresh", "refresh_fraction", "max_gap"},
        CompensationSpace: {"mean_abs_ratio_dev", "max_abs_ratio_dev"},
        JointSpace: {"mean_order", "recompute_fraction", "mean_abs_ratio_dev", "recompute_nfe"},
    }[type(space)]
    assert expected <= set(summary)


@pytest.mark.parametrize("nfe_range", [(4, 10), (2, 5), (6, 6)])
def test_solver_nfe_in_range(nfe_range: tuple[int, int]) -> None:
    for cls in (SolverSpace, JointSpace):
        space = cls(BUILTIN, nfe_range=nfe_range)
        rng = np.random.default_rng(3)
        nfes = {space.sample(rng).solver.nfe for _ in range(200)}
        assert nfes <= set(range(nfe_range[0], nfe_range[1] + 1))
        assert len(nfes) == nfe_range[1] - nfe_range[0] + 1


def test_solver_rules_of_usf() -> None:
    space = SolverSpace(BUILTIN)
    rng = np.random.default_rng(4)
    for _ in range(200):
        plan = space.sample(rng).solver
        assert plan.steps[0].order == 1 and not plan.steps[-1].corrector
        assert all(s.order <= i + 1 for i, s in enumerate(plan.steps))
        assert plan.timesteps[0] == T - 1
        assert all(a - b >= space.min_spacing - 1e-9 for a, b in zip(plan.timesteps, plan.timesteps[1:], strict=False))


def test_solver_baselines_cover_the_seed_solvers_at_every_nfe() -> None:
    names = {n for n, _ in SolverSpace(BUILTIN, nfe_range=(4, 6)).baselines()}
    for nfe in (4, 5, 6):
        assert {f"ddim-nfe{nfe}", f"dpmpp2m-nfe{nfe}", f"unipc-bh1-nfe{nfe}", f"unipc-bh2-nfe{nfe}"} <= names
    assert "dpmpp3m-nfe6" in names  # at NFE 4 3M equals 2M (lower_order_final) and is dropped as a duplicate


def test_solver_expresses_trailing_timesteps_exactly() -> None:
    space = SolverSpace(BUILTIN)
    plan = unipc_plan(trailing_timesteps(T, 7))
    schedule = Schedule(BUILTIN.name, plan)
    assert space.decode(space.encode(schedule)) == schedule


def test_solver_encode_rejects_what_it_cannot_express() -> None:
    space = SolverSpace(BUILTIN, nfe_range=(4, 6))
    with pytest.raises(ValueError, match="nfe"):
        space.encode(Schedule(BUILTIN.name, unipc_plan(linspace_timesteps(T, 9))))


def test_cache_mask_genome_and_ecad_constraint() -> None:
    space = CacheMaskSpace(PIXART, num_steps=20)
    assert space.genome.size == 19 * 4 * 3 and space.genome.is_binary
    full = space.decode(space.all_recompute_genomes()[0])
    assert full.cache == ComponentCachePlan.full(PIXART.layout, 20)
    assert all(space.is_all_recompute(g) for g in space.all_recompute_genomes())
    assert not space.is_all_recompute(np.zeros(space.genome.size))
    # no baseline is the all-recompute schedule (ECAD's constraint)
    for _, schedule in space.baselines():
        assert not space.is_all_recompute(space.encode(schedule))
    zeros = space.decode(np.zeros(space.genome.size)).cache
    assert zeros.recompute[0] == "1" * 12 and set("".join(zeros.recompute[1:])) == {"0"}


def test_cache_mask_block_skip_gene() -> None:
    """Where blocks can be skipped whole, one last bit chooses it; it is set only where it changes the run (some
    block fully reused), both all-recompute genomes are forbidden, and FORA-like seeds come with "+skip" twins."""
    space = CacheMaskSpace(BUILTIN, num_steps=10)
    assert space.genome.size == 9 * 12 + 1 and space.genome.names[-1] == "skip_reused_blocks"
    seeds = dict(space.baselines())
    fora, twin = seeds["fora-every2"].cache, seeds["fora-every2+skip"].cache
    assert twin == dataclasses.replace(fora, skip_reused_blocks=True) and not fora.skip_reused_blocks
    x = space.encode(seeds["fora-every2+skip"])
    assert x[-1] == 1.0 and space.decode(x) == seeds["fora-every2+skip"]
    assert not any(n.startswith(("attn-every", "ff-every")) and n.endswith("+skip") for n in seeds)  # nothing to skip
    only_ff = space.encode(seeds["ff-every2"])  # ff reused, attn1 recomputed: no block is fully reused
    only_ff[-1] = 1.0
    assert space.decode(only_ff).cache == seeds["ff-every2"].cache
    assert len(space.all_recompute_genomes()) == 2
    assert all(space.is_all_recompute(g) and space.decode(g).cache.recompute_fraction() == 1.0
               for g in space.all_recompute_genomes())
    plain = CacheMaskSpace(BUILTIN, num_steps=10, block_skip=False)
    assert plain.genome.size == 9 * 12 and not any(n.endswith("+skip") for n, _ in plain.baselines())
    with pytest.raises(ValueError, match="skip_reused_blocks"):
        plain.encode(seeds["fora-every2+skip"])
    with pytest.raises(ValueError, match="block_skip"):
        CacheMaskSpace(PIXART, block_skip=True)  # PIXART's test structure says its blocks cannot be skipped
    joint = JointSpace(BUILTIN, nfe_range=(4, 10))
    seed = dict(joint.baselines())["dpmpp2m-nfe10+fora-every2+skip"]
    assert seed.cache.skip_reused_blocks and joint.decode(joint.encode(seed)) == seed


def test_cache_mask_refresh_schedule_is_a_whole_stack_unit() -> None:
    space = CacheMaskSpace(BUILTIN, num_steps=10)
    plain = space.refresh_schedule((0, 4, 7))
    assert [i for i, row in enumerate(plain.cache.recompute) if row == "1" * 12] == [0, 4, 7]
    assert all(row in ("1" * 12, "0" * 12) for row in plain.cache.recompute) and not plain.cache.skip_reused_blocks
    skipped = space.refresh_schedule((0, 4, 7), skip_reused_blocks=True)
    assert skipped.cache == dataclasses.replace(plain.cache, skip_reused_blocks=True)
    assert space.decode(space.encode(skipped)) == skipped
    with pytest.raises(ValueError, match="refresh_steps"):
        space.refresh_schedule((2, 5))  # the first evaluated step must be computed


def test_cache_mask_shifted_refresh_seeds_move_one_refresh_by_one_step() -> None:
    space = CacheMaskSpace(BUILTIN, num_steps=20)
    fora4 = space.refresh_schedule((0, 4, 8, 12, 16))
    assert space.whole_stack_refresh(space.encode(fora4)) == ((0, 4, 8, 12, 16), False)
    partial = space.encode(dict(space.baselines())["ff-every2"])  # ff reused, attention recomputed: not whole-stack
    assert space.whole_stack_refresh(partial) is None
    got = shifted_refresh_genomes(space, [space.encode(fora4), partial])
    moved = sorted(space.whole_stack_refresh(g)[0] for g in got)
    # brute force: every 5-refresh set at Hamming distance 2 whose one moved refresh went exactly one step
    expected = sorted(c for c in itertools.combinations(range(20), 5) if c[0] == 0
                      and len(set(c) ^ {0, 4, 8, 12, 16}) == 2
                      and abs(sum(set(c) - {0, 4, 8, 12, 16}) - sum({0, 4, 8, 12, 16} - set(c))) == 1)
    assert moved == expected and len(moved) == 8
    skip = space.encode(space.refresh_schedule((0, 10), skip_reused_blocks=True))
    got = shifted_refresh_genomes(space, [skip, space.encode(space.refresh_schedule((0, 9), True))])
    assert sorted(space.whole_stack_refresh(g) for g in got) == [((0, 8), True), ((0, 11), True)]  # inputs left out
    last = shifted_refresh_genomes(space, [space.encode(space.refresh_schedule((0, 1, 19)))])
    assert sorted(space.whole_stack_refresh(g)[0] for g in last) == [(0, 1, 18), (0, 2, 19)]  # stays in [1, 20)


def test_cache_mask_baselines_mirror_ecad_seeds() -> None:
    pixart = dict(CacheMaskSpace(PIXART).baselines())
    assert {"fora-every2", "fora-every3", "fora-every4", "fora-every5"} <= set(pixart)
    assert pixart["fora-every2"].cache == fora_cache_plan(PIXART.layout, 20, 2)
    assert any(n.startswith("tgate-") for n in pixart)
    assert any(n.startswith("evenly-") for n in pixart)
    assert {"attn-every2", "ff-every2"} <= set(pixart)
    builtin = dict(CacheMaskSpace(BUILTIN).baselines())
    assert not any(n.startswith("tgate-") for n in builtin)  # no cross-attention
    assert all(s.solver == dpmpp_2m_plan(T, 20) for s in builtin.values())


def test_windowed_fora_reuses_only_inside_its_window() -> None:
    plan = windowed_every_n_cache_plan(BUILTIN.layout, 20, 2, (1, 7))
    reused = [i for i, row in enumerate(plan.recompute) if row == "0" * 12]
    assert reused == [2, 4, 6]
    assert all(row == "1" * 12 for i, row in enumerate(plan.recompute) if i not in reused)
    assert [i for i, r in enumerate(windowed_every_n_cache_plan(BUILTIN.layout, 20, 3, (14, 20)).recompute)
            if r[0] == "0"] == [15, 16, 18, 19]
    with pytest.raises(ValueError, match="window"):
        windowed_every_n_cache_plan(BUILTIN.layout, 20, 2, (5, 21))
    with pytest.raises(ValueError, match="interval"):
        windowed_every_n_cache_plan(BUILTIN.layout, 20, 1, (1, 7))


def test_cache_mask_corner_seeds_cover_both_ends_of_the_front() -> None:
    space = CacheMaskSpace(BUILTIN)
    named = dict(space.baselines())
    windows = {n for n in named if n.endswith(("-early", "-middle", "-late"))}
    assert windows == {f"fora-every{k}-{w}" for k in (2, 3) for w in ("early", "middle", "late")}
    fractions = {n: s.cache.recompute_fraction() for n, s in named.items()}
    assert max(fractions.values()) == fractions["fora-every2-early"] == 17 / 20  # reuses steps 2, 4, 6 only
    assert min(fractions.values()) == fractions["fora-every7"] == 3 / 20  # steps 0, 7, 14
    for name in windows | {"fora-every7"}:  # every seed is a genome of the space (the GA starts from them)
        assert space.decode(space.encode(named[name])).cache == named[name].cache
    early = named["fora-every2-early"].cache.recompute
    assert [i for i, r in enumerate(early) if r == "0" * 12] == [2, 4, 6]


def test_cache_mask_under_afs_forces_first_two_rows() -> None:
    space = CacheMaskSpace(BUILTIN, solver=AFS_SOLVER)
    assert space.genome.size == (8 - 2) * 12 + 1  # + the block-skip bit
    schedule = space.decode(np.zeros(space.genome.size))
    assert schedule.cache.recompute[:2] == ("1" * 12,) * 2
    fora = dict(space.baselines())["fora-every2"].cache.recompute
    assert [row[0] for row in fora] == list("11010101")  # the pattern starts at the first evaluated step


def test_cache_interval_repair_and_baselines() -> None:
    space = CacheIntervalSpace(BUILTIN, num_steps=12, max_group=3)
    assert space.genome.size == 12
    plan = space.decode(np.zeros(12)).cache
    assert plan.refresh_steps == (0, 3, 6, 9)
    assert (plan.group, plan.start, plan.end) == ("transformer_blocks", 0, 6)
    names = [n for n, _ in space.baselines()]
    assert names == ["uniform-every2", "uniform-every3"]  # 4 and 5 exceed max_group
    assert dict(space.baselines())["uniform-every3"].cache.refresh_steps == (0, 3, 6, 9)
    with pytest.raises(ValueError, match="unit"):
        CacheIntervalSpace(dataclasses.replace(BUILTIN, unit_blocks=0))


def test_cache_interval_genome_is_the_dp_bit_layout() -> None:
    dynamic = pytest.importorskip("schedsearch.search.dynamic")
    space = CacheIntervalSpace(BUILTIN, num_steps=10)
    np.testing.assert_array_equal(dynamic.refresh_bits((0, 4, 7), 10), space.refresh_genome((0, 4, 7)))
    assert space.decode(space.refresh_genome((0, 4, 7))).cache.refresh_steps == (0, 4, 7)


def test_compensation_space() -> None:
    space = CompensationSpace(BUILTIN, nfe=6, ratio_range=(0.5, 1.5))
    assert space.genome.size == 4 and set(space.genome.kinds) == {"real"}
    (name, base), = space.baselines()
    assert name == "unipc-bh2-nfe6" and all(s.dc_ratio == 1.0 for s in base.solver.steps)
    assert base.solver == dataclasses.replace(unipc_plan(linspace_timesteps(T, 6)), dc_order=2)
    plan = space.decode(np.array([0.0, 2.0, 0.9, 1.1])).solver
    assert [s.dc_ratio for s in plan.steps] == [1.0, 1.0, 0.5, 1.5, 0.9, 1.1]
    with pytest.raises(ValueError, match="nfe"):
        CompensationSpace(BUILTIN, nfe=2)


def test_joint_space_parts() -> None:
    space = JointSpace(BUILTIN, nfe_range=(4, 6))
    rng = np.random.default_rng(5)
    seen_cache = seen_none = 0
    for _ in range(200):
        schedule = space.sample(rng)
        n = schedule.solver.num_steps
        assert all(s.dc_ratio == 1.0 for s in schedule.solver.steps[: space.dc_order])
        if schedule.cache is None:
            seen_none += 1
        else:
            seen_cache += 1
            assert schedule.cache.num_steps == n
    assert seen_cache > 0
    # all-recompute mask ⇒ no cache plan: the uncached solver schedule has one key
    x = space.encode(dict(space.baselines())["unipc-bh2-nfe5"])
    assert space.decode(x).cache is None
    names = {n for n, _ in space.baselines()}
    assert {"dpmpp2m-nfe6+fora2", "unipc-bh2-nfe6+fora3", "ddim-nfe4"} <= names
    # the cache space's seeds at its default plan are joint seeds as they are: both searches start alike
    cache_seeds = CacheMaskSpace(BUILTIN, num_steps=10).baselines()
    joint = [s for _, s in JointSpace(BUILTIN, nfe_range=(4, 10)).baselines()]
    for _, seed in cache_seeds:
        assert any(s.cache == seed.cache and s.solver.timesteps == seed.solver.timesteps
                   and s.solver.steps == seed.solver.steps for s in joint)
    off = JointSpace(BUILTIN, nfe_range=(4, 6), cache=False, compensation=False)
    assert off.genome.size == SolverSpace(BUILTIN, nfe_range=(4, 6)).genome.size


def test_registry() -> None:
    assert set(SPACES) == {"solver", "cache", "cachequant", "dc", "joint", "policy"}
    assert isinstance(make_space("dc", BUILTIN, nfe=7), CompensationSpace)
    with pytest.raises(UserInputError, match=r"--space: unknown 'nope'.*cachequant"):
        make_space("nope", BUILTIN)
    with pytest.raises(UserInputError, match=r"space_options \(solver\)"):
        make_space("solver", BUILTIN, bogus=1)
    with pytest.raises(UserInputError, match=r"space 'cache'.*num_steps"):
        make_space("cache", BUILTIN, num_steps=1)
    assert tuple(sorted(SPACES)) == SPACE_NAMES  # the CLI's light copy of the names


def test_spaces_import_without_torch() -> None:
    code = (
        "import sys; import schedsearch.spaces.registry, schedsearch.spaces.solver, schedsearch.spaces.cache_mask, "
        "schedsearch.spaces.cache_interval, schedsearch.spaces.compensation, schedsearch.spaces.joint; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unet_layouts_with_dotted_group_paths_seed_the_cache_space() -> None:
    """A UNet's block groups are paths with dots ("down_blocks.0"): ECAD's block-subset seeds must read the block
    and component from the layout, not by splitting slot names (the SD-UNet crash: too many values to unpack)."""
    from schedsearch.spaces.baselines import block_subset_cache_plan
    from schedsearch.spaces.cache_plan import slot_names

    layout = ("down_blocks.0[2](resnets,attentions);down_blocks.1[2](resnets,attentions);"
              "mid_block[1](resnets,attentions);up_blocks.1[3](resnets,attentions)")
    unet = ModelStructure(name="diffusers:tiny/sd", num_train_timesteps=T, layout=layout, num_blocks=8,
                          unit_group="deepcache", unit_blocks=1, has_cross_attention=True)
    seeds = dict(CacheMaskSpace(unet, num_steps=10).baselines())
    assert any("blocks" in name for name in seeds)  # the block-subset seeds exist
    plan = block_subset_cache_plan(layout, 4, steps=[1, 2], blocks=[1], components=["attentions"])
    expected = ["0" if name.rsplit(".", 2)[1:] == ["1", "attentions"] else "1" for name in slot_names(layout)]
    assert plan.recompute[1] == plan.recompute[2] == "".join(expected) and plan.recompute[0] == "1" * len(expected)
