"""What a method recipe is: the strategy engine it runs, its presets, and the model-side work before a search.

A recipe binds one search method (ECAD, S³, CacheQuant, DC-Solver, or a general-purpose optimiser) to the rest of
schedsearch, so the study code never branches on a method's name:
- `spaces`: the spaces it makes sense on (None = any). The seed methods' own procedures (CacheQuant's DP,
  DC-Solver's fit) work on their own representation only.
- `presets`: engine options for `quick` (every strategy on the builtin model on 2 CPU cores in minutes) and `paper`
  (the method's published defaults).
- `check(space, options)`: refuses options that do not apply, before any work (torch-free).
- `prepare(model, calibration, space, config, objectives)`: the model-side work (a feature table, a ratio fit,
  seeds, a predictor of the study's objectives) whose results become engine options. Runs after the calibration set
  exists; may cache beside it.
- `engine(space, n_objectives, seed, initial, forbid, options)`: the torch-free `Strategy` that proposes genomes.

Recipe modules import torch and the engines lazily, so the registry (and `schedsearch --help`) stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from schedsearch.errors import UserInputError

if TYPE_CHECKING:
    import numpy as np

    from schedsearch.search.base import Strategy
    from schedsearch.spaces.base import SearchSpace

__all__ = ["PRESET_NAMES", "SPACE_NAMES", "Method", "Procedure"]

PRESET_NAMES = ("quick", "paper")
# Strategy options a recipe's `prepare` consumes, by method: any other method is told whose they are.
RECIPE_OPTIONS_OF = {"ecad": ("shift_seeds", "screen"), "bilevel": ("screen", "solver_share")}
RECIPE_OPTIONS = {name for names in RECIPE_OPTIONS_OF.values() for name in names}
# The names of `schedsearch.spaces.registry.SPACES`, here without importing the spaces (numpy) for `--help`.
SPACE_NAMES = ("cache", "cachequant", "dc", "joint", "policy", "solver")


class Method:
    """A search method as schedsearch runs it. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]  # the `--strategy` name
    title: ClassVar[str]  # the method and its paper, for help texts and the README table
    spaces: ClassVar[tuple[str, ...] | None] = None  # spaces it runs on; None = any
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"quick": {}, "paper": {}}
    seeded: ClassVar[bool] = True  # starts from the space's baselines (+ seeds); False for fixed procedures
    recipe_options: ClassVar[tuple[str, ...]] = ()  # strategy options its `prepare` takes (not its engine's)

    def check(self, space: str, options: Mapping[str, Any]) -> None:
        """Refuse a space or option this method cannot use (UserInputError naming the field)."""
        if self.spaces is not None and space not in self.spaces:
            raise UserInputError(
                "--strategy", f"{self.name} works on --space {' or '.join(self.spaces)} only (it is the seed "
                f"method's own procedure for that representation), not on --space {space}",
                f"use --space {self.spaces[0]}, or another strategy on {space}")
        for name in sorted(set(options) & RECIPE_OPTIONS - set(self.recipe_options)):
            owner = next(m for m, opts in RECIPE_OPTIONS_OF.items() if name in opts)
            raise UserInputError(f"strategy_options.{name} (--{name.replace('_', '-')})",
                                 f"belongs to the {owner} strategy, not {self.name} on --space {space}", "drop it")

    def prepare(self, model: Any, calibration: Any, space: SearchSpace, config: Any,
                objectives: Sequence[Any] = ()) -> dict[str, Any]:
        """Engine options that need the model (default: none beyond the user's strategy options)."""
        return dict(config.strategy_options)

    def engine(self, space: SearchSpace, n_objectives: int, *, seed: int, preset: str,
               initial: Sequence[np.ndarray], forbid: Sequence[np.ndarray], options: dict[str, Any]) -> Strategy:
        raise NotImplementedError

    def defaults(self, preset: str, initial: Sequence[Any]) -> dict[str, Any]:
        """The preset's engine options (some depend on the number of seeds)."""
        return dict(self.presets.get(preset, {}))

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.title}>"


class Procedure(Method):
    """A seed method's own procedure rather than a search: `prepare` computes one thing from the model (`computes`,
    unless the user's strategy options give it), and the engine turns it into the genomes it asks, once."""

    seeded = False
    computes: ClassVar[str]  # the strategy option prepare fills in
    computes_what: ClassVar[str]  # what that is, for the error when it is missing

    def compute(self, model: Any, calibration: Any, space: SearchSpace, config: Any) -> Any:
        raise NotImplementedError

    def build(self, space: SearchSpace, n_objectives: int, seed: int, options: dict[str, Any]) -> Strategy:
        raise NotImplementedError

    def prepare(self, model: Any, calibration: Any, space: SearchSpace, config: Any,
                objectives: Sequence[Any] = ()) -> dict[str, Any]:
        options = dict(config.strategy_options)
        if self.computes not in options:
            options[self.computes] = self.compute(model, calibration, space, config)
        return options

    def engine(self, space: SearchSpace, n_objectives: int, *, seed: int, preset: str,
               initial: Sequence[np.ndarray], forbid: Sequence[np.ndarray], options: dict[str, Any]) -> Strategy:
        if self.computes not in options:
            raise UserInputError(f"strategy_options.{self.computes}", f"{self.name} needs {self.computes_what}",
                                 "run it through run_search, which computes it from the model")
        return self.build(space, n_objectives, seed, options)
