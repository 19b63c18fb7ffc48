"""Strategy registry: every name builds on its spaces, seeded with the space's baselines; nonsense is refused."""

from __future__ import annotations

import numpy as np
import pytest

from schedsearch.methods import METHODS as STRATEGIES
from schedsearch.methods import check_combination, make_strategy
from schedsearch.search.fixed import FixedStrategy
from schedsearch.spaces.base import ModelStructure
from schedsearch.spaces.registry import make_space

STRUCTURE = ModelStructure(name="builtin:mnist-dit", num_train_timesteps=1000, layout="transformer_blocks[6](attn1,ff)",
                           num_blocks=6, unit_group="transformer_blocks", unit_blocks=6)


@pytest.mark.parametrize("name", ["ecad", "nsga2", "tpe", "optuna-nsga2", "predictor"])
@pytest.mark.parametrize("space_name", ["cache", "solver"])
def test_general_strategies_ask_baselines_first(name, space_name):
    space = make_space(space_name, STRUCTURE, **({"num_steps": 6} if space_name == "cache" else {"nfe_range": (4, 5)}))
    strategy = make_strategy(name, space, 2, preset="quick", seed=0)
    asked = strategy.ask(None)
    assert asked and all(g.shape == (space.genome.size,) for g in asked)
    baseline_keys = {s.key for _, s in space.baselines()}
    assert baseline_keys & {space.decode(g).key for g in asked}  # the first batch is seeded with the baselines
    if space_name == "cache":
        assert not any(space.is_all_recompute(g) for g in asked) or name in ("tpe", "optuna-nsga2")


def test_dp_and_dc_fit_only_on_their_space():
    for strategy, space in (("dp", "cachequant"), ("dc-fit", "dc")):
        check_combination(strategy, space)
        with pytest.raises(ValueError, match=f"--space {space} only"):
            check_combination(strategy, "solver")
    with pytest.raises(ValueError, match="--strategy: unknown"):
        check_combination("random-walk", "cache")
    assert set(STRATEGIES) >= {"ecad", "nsga2", "tpe", "optuna-nsga2", "dp", "predictor", "dc-fit"}


def test_dp_strategy_needs_its_table_and_sweeps_once():
    space = make_space("cachequant", STRUCTURE, num_steps=8)
    with pytest.raises(ValueError, match="feature-distance table"):
        make_strategy("dp", space, 2)
    rng = np.random.default_rng(0)
    table = rng.random((8, 8))
    table = (table + table.T) / 2
    np.fill_diagonal(table, 0)
    strategy = make_strategy("dp", space, 2, options={"distance": table})
    first = strategy.ask(None)
    assert first and strategy.ask(None) == []
    assert all(space.decode(g).cache.refresh_steps[0] == 0 for g in first)


def test_fixed_strategy_skips_what_was_evaluated():
    space = make_space("dc", STRUCTURE, nfe=5)
    genomes = [np.ones(space.genome.size), np.full(space.genome.size, 1.2)]
    strategy = FixedStrategy(space.genome, 2, genomes=genomes)
    strategy.warm_start([genomes[0]], np.zeros((1, 2)))
    assert [g.tolist() for g in strategy.ask(None)] == [genomes[1].tolist()]
    assert strategy.ask(None) == []


def test_unknown_preset():
    with pytest.raises(ValueError, match="--preset"):
        make_strategy("ecad", make_space("cache", STRUCTURE, num_steps=4), 2, preset="fast")
