"""What a method recipe is: the strategy engine it runs, its presets, and the model-side work before a search.

A recipe binds one search method (ECAD, S³, CacheQuant, DC-Solver, or a general-purpose optimiser) to the rest of
schedsearch, so the study code never branches on a method's name:
- `spaces`: the spaces it makes sense on (None = any). The seed methods' own procedures (CacheQuant's DP,
  DC-Solver's fit) work on their own representation only.
- `presets`: engine options for `quick` (every strategy on the builtin model on 2 CPU cores in minutes) and `paper`
  (the method's published defaults).
- `check(space, options)`: refuses options that do not apply, before any work (torch-free).
- `prepare(model, calibration, space, config)`: the model-side work (a feature table, a ratio fit, seeds) whose
  results become engine options. Runs after the calibration set exists; may cache beside it.
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

__all__ = ["PRESET_NAMES", "SPACE_NAMES", "Method"]

PRESET_NAMES = ("quick", "paper")
# The names of `schedsearch.spaces.registry.SPACES`, here without importing the spaces (numpy) for `--help`.
SPACE_NAMES = ("cache", "cachequant", "dc", "joint", "solver")


class Method:
    """A search method as schedsearch runs it. Subclasses set the class attributes and override what they need."""

    name: ClassVar[str]  # the `--strategy` name
    title: ClassVar[str]  # the method and its paper, for help texts and the README table
    spaces: ClassVar[tuple[str, ...] | None] = None  # spaces it runs on; None = any
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {"quick": {}, "paper": {}}
    seeded: ClassVar[bool] = True  # starts from the space's baselines (+ seeds); False for fixed procedures

    def check(self, space: str, options: Mapping[str, Any]) -> None:
        """Refuse a space or option this method cannot use (UserInputError naming the field)."""
        if self.spaces is not None and space not in self.spaces:
            raise UserInputError(
                "--strategy", f"{self.name} works on --space {' or '.join(self.spaces)} only (it is the seed "
                f"method's own procedure for that representation), not on --space {space}",
                f"use --space {self.spaces[0]}, or another strategy on {space}")

    def prepare(self, model: Any, calibration: Any, space: SearchSpace, config: Any) -> dict[str, Any]:
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
