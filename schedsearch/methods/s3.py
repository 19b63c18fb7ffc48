"""S³ (Liu et al., "Enhancing the Sampling of Diffusion Models with Solver Schedule Search", ICLR 2024).

- space: `solver` (`spaces/solver.py`): per-step continuous timesteps, order, prediction type, corrector, update
  rule and analytical first step (the paper's §3 search space), at a fixed NFE or an NFE range.
- strategy: `predictor` (`search/predictor.py`): the paper's multi-stage search (§4): evaluate an initial set,
  fit a performance predictor, evolve candidates on the predictor, evaluate its top-k, repeat. Ours: a random forest
  per objective (the paper's predictor network is not in the released code); each stage reports its rank
  correlation. It runs on any space; S³'s own is `solver`.
- seeds: the space's hand-made solvers (DDIM, DPM-Solver++ 2M/3M, UniPC bh1/bh2 at each NFE).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from schedsearch.methods.base import Method

__all__ = ["S3"]


class S3(Method):
    name = "predictor"
    title = "S³ (Liu et al., ICLR 2024): predictor-guided multi-stage search"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "quick": {"batch": 8, "n_estimators": 50, "evolution_generations": 60}, "paper": {}}

    def defaults(self, preset: str, initial: Sequence[Any]) -> dict[str, Any]:
        out = dict(self.presets.get(preset, {}))
        if preset == "quick":  # stage 0 evaluates the seeds, at least 12 and at most 24 of them
            out = {"initial_size": max(12, min(len(initial), 24)), **out}
        return out

    def engine(self, space: Any, n_objectives: int, *, seed: int, preset: str, initial: Sequence[Any],
               forbid: Sequence[Any], options: dict[str, Any]) -> Any:
        from schedsearch.search.predictor import PredictorSearch

        return PredictorSearch(space.genome, n_objectives, seed=seed, initial=initial, forbid=forbid, **options)
