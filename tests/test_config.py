"""StudyConfig validation, the method registry and the CLI's manners (no model is loaded here)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from schedsearch.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, build_parser, main
from schedsearch.config import PRESETS, StudyConfig
from schedsearch.errors import SchedsearchError, UnavailableError, UserInputError
from schedsearch.methods import METHODS, make_strategy
from schedsearch.search.base import Budget


def _config(**kw):
    args = {"space": "cache", "strategy": "ecad", "objectives": ("psnr", "macs"), "study": "s", "store": "r.db",
            "budget": Budget(evaluations=4)}
    return StudyConfig(**{**args, **kw})


@pytest.mark.parametrize(("change", "field"), [
    ({"space": "solver", "strategy": "dp"}, "--strategy"),
    ({"space": "latent"}, "--space"),
    ({"strategy": "anneal"}, "--strategy"),
    ({"preset": "fast"}, "--preset"),
    ({"samples": 0}, "--samples"),
    ({"batch_size": 0}, "--batch-size"),
    ({"workers": 0}, "--workers"),
    ({"seed": -1}, "--seed"),
    ({"guidance": float("inf")}, "--guidance"),
    ({"fid_reference": "imagenet"}, "--fid-reference"),
    ({"low_fidelity_samples": 32}, "--low-fidelity-samples"),  # quick preset: 32 samples, so must be < 32
    ({"space": "solver", "space_options": {"block_skip": False}}, "--no-block-skip"),
    ({"space": "joint", "strategy_options": {"shift_seeds": True}}, "--shift-seeds"),
    ({"objectives": ()}, "--objectives"),
    ({"study": " "}, "--study"),
    ({"budget": 10}, "budget"),
])
def test_config_names_the_bad_field(change, field):
    with pytest.raises(UserInputError) as err:
        _config(**change)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_config_is_frozen_and_knows_its_identity():
    config = _config(objectives="psnr, macs", strategy_options={"population": 24}, space_options={"num_steps": 6})
    assert config.objectives == ("psnr", "macs") and config.resolved_samples == PRESETS["quick"].samples
    with pytest.raises(AttributeError):
        config.samples = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.strategy_options["population"] = 3  # type: ignore[index]
    identity = config.identity()
    assert identity["samples"] == 32 and identity["strategy_options"] == {"population": 24}
    assert config.differing_field(identity) is None
    assert config.differing_field({**identity, "seed": 3}) == ("seed", 3, 0)
    assert config.differing_field({"model": identity["model"]}) is None  # an older store's: compared as far as it goes
    assert _config(low_fidelity_samples=8).low_fidelity_samples == 8


def test_every_method_builds_its_engine_with_its_presets():
    from schedsearch.spaces.base import ModelStructure
    from schedsearch.spaces.registry import make_space

    structure = ModelStructure(name="builtin:mnist-dit", num_train_timesteps=1000,
                               layout="transformer_blocks[2](attn1,ff)", num_blocks=2,
                               unit_group="transformer_blocks", unit_blocks=2, block_skip=True)
    from schedsearch.methods.bilevel import bilevel_subproblems

    for name, method in METHODS.items():
        if name == "dc-fit":
            space = make_space("dc", structure, nfe=5)
        elif name == "bilevel":
            space = make_space("joint", structure, nfe_range=(3, 5))
        else:
            space = make_space((method.spaces or ("cache",))[0], structure, num_steps=6)
        options = {"distance": [[0.0] * 6] * 6} if name == "dp" else {"genomes": []} if name == "dc-fit" else {}
        if name == "bilevel":  # the cache subproblems are built lazily, from the model, when phase 2 starts
            solver, cache_for = bilevel_subproblems(None, None, space, (), None)
            options = {"solver": solver, "cache_for": cache_for, "solver_evaluations": 8}
        for preset in ("quick", "paper"):
            strategy = make_strategy(name, space, 2, preset=preset, options=options)
            if name in ("ecad", "nsga2"):  # ECAD's population: 16 quick, 72 as published
                assert strategy.population_size == {"quick": 16, "paper": 72}[preset]
            if name == "bilevel":
                assert strategy.cache_options["population"] == {"quick": 16, "paper": 72}[preset]


def test_error_classes_share_one_base():
    from schedsearch.objectives.base import ObjectiveUnavailableError
    from schedsearch.results.export import ExportError
    from schedsearch.results.report import ReportError
    from schedsearch.results.store import StoreError
    from schedsearch.runtime.cache_hooks import CachePlanMismatchError
    from schedsearch.runtime.models import ModelNotAvailableError
    from schedsearch.spaces.errors import ScheduleError

    for cls in (ObjectiveUnavailableError, ExportError, ReportError, StoreError, CachePlanMismatchError,
                ModelNotAvailableError, ScheduleError):
        assert issubclass(cls, UserInputError) and issubclass(cls, SchedsearchError), cls
    assert issubclass(ModelNotAvailableError, UnavailableError)


def test_a_bug_is_reported_as_a_bug_not_as_bad_input(monkeypatch, capsys):
    import schedsearch.cli as cli

    def broken(args):
        raise ValueError("too many values to unpack (expected 3)")  # an internal ValueError, as in the UNet crash

    monkeypatch.setattr(cli, "_cmd_info", broken)
    assert main(["info"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("internal error (a bug in schedsearch") and "Traceback" not in err
    assert "--debug" in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="too many values"):
        main(["--debug", "info"])


def test_user_input_error_exits_2_without_traceback(capsys, tmp_path):
    assert main(["front", "--store", str(tmp_path / "none.db"), "--study", "s"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: --store: no results store at") and "; " in err and "Traceback" not in err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_has_help_and_train_builtin_lists_its_steps(capsys):
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"search", "front", "export", "evaluate", "report", "sample", "schedule", "train-builtin"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["train-builtin", "--help"])
    out = capsys.readouterr().out
    assert "{dit,classifier,export,flow,export-flow}" in out and "--steps" in out and "(default: 8000)" in out
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "(default: quick)" in out and all(name in out for name in METHODS)


def test_help_imports_no_heavy_module():
    """`--help` answers at once: building the parser imports neither torch, numpy, pandas nor diffusers."""
    code = ("import sys; from schedsearch.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'pandas', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent).stdout
    assert out.strip() == "[]"


def test_a_recipe_option_of_another_method_is_refused_naming_its_owner():
    with pytest.raises(UserInputError, match=r"^strategy_options.shift_seeds \(--shift-seeds\): belongs to the ecad"):
        _config(strategy="nsga2", strategy_options={"shift_seeds": True})
    assert _config(strategy="ecad", strategy_options={"shift_seeds": True}).strategy_options["shift_seeds"]
