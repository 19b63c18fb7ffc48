"""Runtime cache policies as schedule data: which rule-based cache a run enables, with which knob values.

A `RuntimePolicy` names one of the runtime caches people deploy and its settings, exactly as that runtime takes
them, so an exported policy is a config the stock library reads (no schedsearch at inference):

- diffusers 0.42 hooks (`diffusers/hooks/*.py`): `first_block_cache` (FirstBlockCacheConfig), `mag_cache`
  (MagCacheConfig), `taylorseer_cache` (TaylorSeerCacheConfig), `pyramid_attention_broadcast`
  (PyramidAttentionBroadcastConfig), `faster_cache` (FasterCacheConfig);
- cache-dit 1.5.x: `dbcache` (DBCacheConfig, optionally with its TaylorSeer calibrator).

Unlike a static cache plan, these policies decide at run time (a residual difference under a threshold, an
accumulated magnitude error), so what one costs is only known from what it ran (`objectives.cost.observe_units`).

`KNOBS` is the table of every knob the policy space searches: its gene type, its search range and the runtime's
default. Knobs the model fixes (MagCache's calibrated ratios, TaylorSeer's module identifiers) are params too but
not genes. Plain data, no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from schedsearch.spaces.errors import ScheduleError

KnobGene = Literal["int", "real", "log", "bit"]


@dataclass(frozen=True)
class Knob:
    """One searched setting. `gene`: "log" is a real searched on a log10 scale (thresholds span decades) and
    rounded to 3 significant digits, so a found value pastes cleanly and equal settings share a key. `low`/`high`
    bound the search; `valid` bounds what a schedule may hold (a hand-written one may go beyond the search)."""

    name: str
    gene: KnobGene
    low: float
    high: float
    default: Any
    valid: tuple[float, float]
    doc: str = ""


DIFFUSERS_KINDS = ("first_block_cache", "mag_cache", "taylorseer_cache", "pyramid_attention_broadcast", "faster_cache")
CACHE_DIT_KINDS = ("dbcache",)
POLICY_KINDS = DIFFUSERS_KINDS + CACHE_DIT_KINDS

_INF = math.inf
KNOBS: dict[str, tuple[Knob, ...]] = {
    "first_block_cache": (
        Knob("threshold", "log", 0.005, 0.5, 0.05, (0.0, _INF),
             "skip the remaining blocks while the first block's relative residual change stays below it"),
    ),
    "mag_cache": (
        Knob("threshold", "log", 0.005, 0.5, 0.06, (0.0, _INF), "accumulated magnitude error allowed"),
        Knob("max_skip_steps", "int", 1, 6, 3, (1, 1000), "K: consecutive steps that may be skipped"),
        Knob("retention_ratio", "real", 0.0, 0.6, 0.2, (0.0, 1.0), "leading fraction of steps never skipped"),
    ),
    "taylorseer_cache": (
        Knob("cache_interval", "int", 2, 8, 5, (1, 1000), "full computation every this many steps"),
        Knob("max_order", "int", 0, 2, 1, (0, 4), "Taylor order of the forecast between full steps"),
        # at 0 the first step would forecast from nothing (diffusers: "Cannot predict without prior initialization")
        Knob("disable_cache_before_step", "int", 1, 8, 3, (1, 1000), "first steps always computed"),
    ),
    "pyramid_attention_broadcast": (
        Knob("spatial_attention_block_skip_range", "int", 2, 6, 2, (1, 1000),
             "self-attention recomputed every this many steps inside the window"),
        Knob("spatial_attention_timestep_low", "real", 0.0, 500.0, 100.0, (-1.0, 1e6),
             "window of network timesteps (low end) where attention is broadcast"),
        Knob("spatial_attention_timestep_high", "real", 500.0, 1000.0, 800.0, (-1.0, 1e6),
             "window of network timesteps (high end)"),
    ),
    "faster_cache": (
        Knob("spatial_attention_block_skip_range", "int", 2, 6, 2, (1, 1000), "self-attention reuse interval"),
        Knob("spatial_attention_timestep_high", "real", 200.0, 1000.0, 681.0, (-1.0, 1e6),
             "attention is reused below this network timestep"),
        Knob("unconditional_batch_skip_range", "int", 2, 8, 5, (1, 1000),
             "CFG-Cache: the unconditional branch is computed every this many steps"),
        Knob("unconditional_batch_timestep_high", "real", 200.0, 1000.0, 641.0, (-1.0, 1e6),
             "CFG-Cache applies below this network timestep"),
    ),
    "dbcache": (
        Knob("Fn_compute_blocks", "int", 1, 8, 8, (1, 10_000), "first blocks always computed (the probe)"),
        Knob("Bn_compute_blocks", "int", 0, 4, 0, (0, 10_000), "last blocks always computed"),
        Knob("residual_diff_threshold", "log", 0.01, 0.5, 0.08, (0.0, _INF),
             "cache the middle blocks while the probe's residual changes less than this"),
        Knob("max_warmup_steps", "int", 0, 10, 8, (0, 10_000), "first steps always computed"),
        Knob("max_continuous_cached_steps", "int", 1, 6, -1, (-1, 10_000), "cached steps in a row (-1: no limit)"),
        Knob("taylorseer_order", "int", 0, 2, 0, (0, 4), "cache-dit's TaylorSeer calibrator order (0: off)"),
    ),
}

# cache-dit's documented DBCache settings (its README/user guide: the default F8B0 at 0.08 with 8 warm-up steps, the
# F1B0 and F8B8 rows of its tables, and the F1B0 0.12 its example CLI defaults to), compared on every policy front
# that includes dbcache; Fn/Bn beyond a small model's blocks are clipped to it.
DBCACHE_PRESETS: dict[str, dict[str, Any]] = {
    "F8B0-0.08": {"Fn_compute_blocks": 8, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                  "max_warmup_steps": 8, "max_continuous_cached_steps": -1},
    "F1B0-0.08": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                  "max_warmup_steps": 8, "max_continuous_cached_steps": -1},
    "F1B0-0.20": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.20,
                  "max_warmup_steps": 8, "max_continuous_cached_steps": -1},
    "F8B8-0.12": {"Fn_compute_blocks": 8, "Bn_compute_blocks": 8, "residual_diff_threshold": 0.12,
                  "max_warmup_steps": 8, "max_continuous_cached_steps": -1},
    "F1B0-0.12-cli": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.12,
                      "max_warmup_steps": 8, "max_continuous_cached_steps": 3},
}
# cache-dit's steps computation mask presets (`cache_dit.steps_mask(mask_policy=...)`), with the default DBCache.
STEPS_MASK_PRESETS = ("slow", "medium", "fast", "ultra")

# Params a policy may hold besides its knobs: fixed by the model, not searched.
FIXED_PARAMS: dict[str, tuple[str, ...]] = {
    "mag_cache": ("mag_ratios",),
    "taylorseer_cache": ("cache_identifiers",),
    "dbcache": ("steps_computation_mask", "steps_computation_policy"),
}

Param = float | int | bool | str | tuple


def knob(kind: str, name: str) -> Knob:
    return next(k for k in KNOBS[kind] if k.name == name)


def defaults(kind: str) -> dict[str, Any]:
    """The runtime's own default settings of every knob of `kind` (diffusers' / cache-dit's dataclass defaults)."""
    return {k.name: k.default for k in KNOBS[kind]}


def _canonical(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_canonical(v) for v in value)
    return value


@dataclass(frozen=True)
class RuntimePolicy:
    """One runtime cache and its settings. `params` is sorted (name, value) pairs so equal settings share a key;
    `settings` gives them as a dict. The step count is the solver plan's; MagCache's `num_inference_steps` and
    cache-dit's are derived from it when the policy is applied or exported, never stored twice."""

    kind: str
    params: tuple[tuple[str, Param], ...] = ()

    def __post_init__(self) -> None:
        items = self.params.items() if isinstance(self.params, dict) else self.params
        canonical = []
        for name, value in items:
            if isinstance(value, int) and not isinstance(value, bool) and self._gene(name) in ("real", "log"):
                value = float(value)  # 0.1 and a hand-written 1 are floats alike: one key
            canonical.append((name, _canonical(value)))
        object.__setattr__(self, "params", tuple(sorted(canonical)))

    def _gene(self, name: str) -> str | None:
        found = [k for k in KNOBS.get(self.kind, ()) if k.name == name]
        return found[0].gene if found else None

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def runtime(self) -> str:
        return "cache-dit" if self.kind in CACHE_DIT_KINDS else "diffusers"

    def get(self, name: str) -> Any:
        """The setting, or the runtime's default for a knob left out."""
        settings = self.settings
        return settings[name] if name in settings else knob(self.kind, name).default

    def validate(self, prefix: str = "policy") -> RuntimePolicy:
        if self.kind not in POLICY_KINDS:
            raise ScheduleError(f"{prefix}.kind", f"unknown {self.kind!r}", f"use one of {POLICY_KINDS}")
        known = {k.name: k for k in KNOBS[self.kind]}
        fixed = FIXED_PARAMS.get(self.kind, ())
        for name, value in self.params:
            where = f"{prefix}.params.{name}"
            if name in fixed:
                _check_fixed(self.kind, name, value, where)
                continue
            if name not in known:
                raise ScheduleError(where, f"is not a setting of {self.kind}",
                                    f"known: {sorted([*known, *fixed])}")
            k = known[name]
            if k.gene == "bit":
                if not isinstance(value, bool):
                    raise ScheduleError(where, f"{value!r} is not true/false")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ScheduleError(where, f"{value!r} is not a finite number")
            if k.gene == "int" and not isinstance(value, int):
                raise ScheduleError(where, f"{value!r} is not an integer")
            lo, hi = k.valid
            if not lo <= value <= hi:
                raise ScheduleError(where, f"{value} is outside [{lo:g}, {hi:g}]", f"{self.kind}'s default is "
                                    f"{k.default}")
        s = self.settings
        if self.kind == "mag_cache" and "mag_ratios" not in s:
            raise ScheduleError(f"{prefix}.params.mag_ratios", "is missing",
                                "MagCache's ratios are model-dependent: calibrate them on the model "
                                "(schedsearch does when it builds the policy space)")
        for low, high in (("spatial_attention_timestep_low", "spatial_attention_timestep_high"),):
            if low in s and high in s and not s[low] < s[high]:
                raise ScheduleError(f"{prefix}.params.{low}", f"{s[low]} is not below {high} = {s[high]}",
                                    "the window needs low < high")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind,
                "params": {n: list(v) if isinstance(v, tuple) else v for n, v in self.params}}


def _check_fixed(kind: str, name: str, value: Any, where: str) -> None:
    if name in ("mag_ratios", "steps_computation_mask"):
        ok = isinstance(value, tuple) and len(value) > 0 and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok:
            raise ScheduleError(where, "is not a non-empty list of numbers",
                                "one value per step, as the runtime takes it")
    elif name == "steps_computation_policy" and value not in ("dynamic", "static"):
        raise ScheduleError(where, f"{value!r} is not 'dynamic' or 'static'", "cache-dit's two mask policies")
    elif name == "cache_identifiers" and (
            not isinstance(value, tuple) or not value or not all(isinstance(v, str) and v for v in value)):
        raise ScheduleError(where, "is not a non-empty list of module-name patterns", 'e.g. ["^blocks.*attn"]')


def policy_from_dict(data: Any) -> RuntimePolicy:
    if not isinstance(data, dict):
        raise ScheduleError("policy", f"expected an object, got {type(data).__name__}")
    unknown = set(data) - {"kind", "params"}
    if unknown:
        raise ScheduleError(f"policy.{sorted(unknown)[0]}", "is not a policy field", "known: kind, params")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ScheduleError("policy.params", f"expected an object of settings, got {type(params).__name__}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise ScheduleError("policy.kind", f"{kind!r} is not a string", f"use one of {POLICY_KINDS}")
    return RuntimePolicy(kind, tuple(params.items())).validate()
