"""DC-Solver (Zhao et al., "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation",
ECCV 2024).

- space: `dc` (`spaces/compensation.py`): one compensation ratio per step of UniPC at a fixed NFE (§3.2).
- strategy: `dc-fit`: the paper's own procedure, not a search: ratios fitted greedily step by step against a
  DDIM-200 teacher trajectory on ~10 calibration samples with AdamW (lr 0.1, 20 iterations; §3.3,
  `calibration/dc_fit.py`), then evaluated beside plain UniPC (all ratios 1). The cascade polynomial regression
  that predicts ratios for unseen NFE and guidance (§3.4) is `dc_fit.CascadeRegression`.
- any other strategy (`tpe`, `nsga2`, ...) searches the same ratios directly.
"""

from __future__ import annotations

from typing import Any

from schedsearch.methods.base import Procedure

__all__ = ["DCSolver", "fitted_genomes"]

FIT_SAMPLES = 10  # calibration samples of the ratio fit (the paper fits on 10)


class DCSolver(Procedure):
    name = "dc-fit"
    title = "DC-Solver (Zhao et al., ECCV 2024): compensation ratios fitted to a teacher"
    spaces = ("dc",)
    computes = "genomes"
    computes_what = "the fitted ratio genomes (methods.dc_solver.fitted_genomes)"

    def compute(self, model: Any, calibration: Any, space: Any, config: Any) -> Any:
        return fitted_genomes(model, calibration, space, config.progress)

    def build(self, space: Any, n_objectives: int, seed: int, options: dict[str, Any]) -> Any:
        from schedsearch.search.fixed import FixedStrategy

        return FixedStrategy(space.genome, n_objectives, seed=seed, genomes=options["genomes"])


def fitted_genomes(model: Any, calibration: Any, space: Any, progress: bool = True) -> list[Any]:
    """DC-Solver §3.3 on the first 10 calibration samples: plain UniPC (the fit's own baseline) and the fitted
    ratios, as genomes of `space`."""
    import numpy as np

    from schedsearch.calibration.dc_fit import fit_dc_ratios

    spec = calibration.spec
    k = min(FIT_SAMPLES, len(spec))
    fitted = fit_dc_ratios(model, nfe=space.base.nfe, guidance=spec.guidance, classes=list(spec.conditions[:k]),
                           seeds=list(spec.seeds[:k]), plan=space.base, progress=progress)
    plain = np.ones(space.genome.size)
    return [plain, np.array(fitted.ratios[space.dc_order :], dtype=float)]
