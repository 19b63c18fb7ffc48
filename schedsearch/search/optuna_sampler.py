"""optuna's TPE (Bergstra et al. 2011; multi-objective: Ozaki et al. 2020) or NSGA-II sampler through ask/tell.

A peer of the seed methods' searches (DESIGN "optuna_sampler.py"): one optuna parameter per gene, the study kept in
an optuna storage (an RDB URL such as ``sqlite:///study.db``, or a journal file path) so that a killed study
resumes by loading itself; `warm_start` then only adds records the storage does not already hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState, create_trial

from schedsearch.search.base import Strategy, as_value_matrix, genome_key
from schedsearch.spaces.base import GenomeSpec

__all__ = ["OptunaStrategy"]


def open_storage(storage: str | BaseStorage | None) -> str | BaseStorage | None:
    """An optuna storage: URLs (``sqlite:///x.db``) go to optuna as they are; a plain path is a journal file."""
    if isinstance(storage, str) and "://" not in storage:
        return JournalStorage(JournalFileBackend(storage))
    return storage


class OptunaStrategy(Strategy):
    """optuna sampler over genomes: `sampler="tpe"` (TPESampler, multi-objective when n_objectives > 1) or
    `"nsga2"` (NSGAIISampler with `population`). Initial genomes are enqueued (once per storage). A failed candidate
    (any non-finite value) is told as `TrialState.FAIL`: optuna would accept +inf, but its multi-objective TPE
    weights and NSGA-II crowding are not meant for infinite values, and failed trials are simply ignored.
    """

    name = "optuna"

    def __init__(self, spec: GenomeSpec, n_objectives: int, *, seed: int = 0, initial: Sequence[np.ndarray] = (),
                 sampler: Literal["tpe", "nsga2"] = "tpe", storage: str | BaseStorage | None = None,
                 study_name: str = "schedsearch", population: int = 50, n_startup_trials: int = 10,
                 batch: int | None = None) -> None:
        super().__init__(spec, n_objectives, seed=seed, initial=initial)
        if sampler == "tpe":
            opt_sampler: optuna.samplers.BaseSampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=n_startup_trials)
        elif sampler == "nsga2":
            opt_sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
        else:
            raise ValueError(f"OptunaStrategy: sampler must be 'tpe' or 'nsga2', got {sampler!r}")
        self.sampler = sampler
        self._batch = batch if batch is not None else (population if sampler == "nsga2" else 1)
        self.names = tuple(f"g{i:04d}" for i in range(spec.size))
        self.distributions: dict[str, BaseDistribution] = {
            name: FloatDistribution(lo, hi) if kind == "real" else IntDistribution(round(lo), round(hi))
            for name, kind, lo, hi in zip(self.names, spec.kinds, spec.low, spec.high, strict=True)
        }
        self.study = optuna.create_study(storage=open_storage(storage), sampler=opt_sampler, study_name=study_name,
                                         directions=["minimize"] * n_objectives, load_if_exists=True)
        self._pending: dict[bytes, list[int]] = {}
        self._enqueued = False

    @property
    def batch_size(self) -> int:
        return self._batch

    def _params(self, genome: np.ndarray) -> dict[str, Any]:
        return {name: float(v) if kind == "real" else int(v)
                for name, kind, v in zip(self.names, self.spec.kinds, self.spec.clip(genome), strict=True)}

    def _genome(self, params: dict[str, Any]) -> np.ndarray | None:
        if set(params) != set(self.names):
            return None  # a trial of another space in the same study
        return self.spec.clip(np.array([params[name] for name in self.names], dtype=float))

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if not self._enqueued:  # lazily, so that warm_start's records are known and not re-enqueued
            for g in self.initial:
                self.study.enqueue_trial(self._params(g), skip_if_exists=True)
            self._enqueued = True
        out = []
        for _ in range(self.batch_size if n is None else n):
            trial = self.study.ask(self.distributions)
            genome = self._genome(trial.params)
            assert genome is not None
            self._pending.setdefault(genome_key(genome), []).append(trial.number)
            out.append(genome)
        return out

    def _tell_trial(self, number: int, values: np.ndarray) -> None:
        if np.isfinite(values).all():
            self.study.tell(number, [float(v) for v in values])
        else:
            self.study.tell(number, state=TrialState.FAIL)

    def _add(self, genome: np.ndarray, values: np.ndarray) -> None:
        finite = bool(np.isfinite(values).all())
        self.study.add_trial(create_trial(
            params=self._params(genome), distributions=self.distributions,
            values=[float(v) for v in values] if finite else None,
            state=TrialState.COMPLETE if finite else TrialState.FAIL))

    def tell(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        for g, v in zip(genomes, values, strict=True):
            numbers = self._pending.get(genome_key(self.spec.clip(g)))
            if numbers:
                self._tell_trial(numbers.pop(0), v)
            else:
                self._add(self.spec.clip(g), v)

    def warm_start(self, genomes: Sequence[np.ndarray], values: np.ndarray) -> None:
        """Add the records the study does not hold yet (matched by params, counting repeats); a record of a trial
        left RUNNING by a killed process is told to it; RUNNING trials without a record are marked failed."""
        values = as_value_matrix(values, len(genomes), self.n_objectives)
        finished: dict[bytes, int] = {}
        running: dict[bytes, list[int]] = {}
        for trial in self.study.get_trials(deepcopy=False):
            genome = self._genome(trial.params)
            if genome is None:
                continue
            if trial.state.is_finished():
                finished[genome_key(genome)] = finished.get(genome_key(genome), 0) + 1
            elif trial.state == TrialState.RUNNING:
                running.setdefault(genome_key(genome), []).append(trial.number)
        for g, v in zip(genomes, values, strict=True):
            g = self.spec.clip(g)
            key = genome_key(g)
            if finished.get(key, 0) > 0:
                finished[key] -= 1
            elif running.get(key):
                self._tell_trial(running[key].pop(0), v)
            else:
                self._add(g, v)
        for numbers in running.values():
            for number in numbers:
                self.study.tell(number, state=TrialState.FAIL)
