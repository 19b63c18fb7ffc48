"""Noise schedules (α_t, σ_t at continuous model time t) and model-output conversion.

The unified sampler works in the exponential-integrator variables of DPM-Solver (Lu et al. 2022, §3):
x_t = α_t x_0 + σ_t ε, λ_t = log(α_t / σ_t). Any model whose forward process has this form can be sampled: DDPM
(variance preserving, discrete ᾱ) and rectified flow (α = 1 - σ, SD3 / Flux).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """Discrete DDPM ᾱ, extended to continuous t by linear interpolation of log(σ/α) (diffusers' `_sigma_to_t`
    inverse), so integer timesteps give exactly diffusers' values."""

    alphas_cumprod: np.ndarray  # float64 copy of the model's (float32) ᾱ, shape (T,)

    @staticmethod
    def linear(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> VPSchedule:
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        return VPSchedule(torch.cumprod(1.0 - betas, dim=0).double().numpy())

    @staticmethod
    def scaled_linear(
        num_train_timesteps: int = 1000, beta_start: float = 8.5e-4, beta_end: float = 0.012
    ) -> VPSchedule:
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        return VPSchedule(torch.cumprod(1.0 - betas, dim=0).double().numpy())

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @functools.cached_property
    def _log_ratio(self) -> np.ndarray:
        """log(σ/α) at the integer timesteps: the table both directions interpolate (+inf where ᾱ = 0)."""
        with np.errstate(divide="ignore"):
            return 0.5 * np.log((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    @functools.cached_property
    def zero_terminal_snr(self) -> bool:
        """ᾱ = 0 at the last training timestep (`rescale_betas_zero_snr`, CogVideoX's DDIM): pure noise there,
        λ = −∞, which only v- (or x0-) prediction can start from."""
        return bool(self.alphas_cumprod[-1] == 0.0)

    def _last_alpha(self, t: float) -> float | None:
        """With zero terminal SNR, α on the last interval (T − 2, T − 1], interpolated linearly down to α = 0:
        log(σ/α) is infinite at its end, so interpolating it would make the whole interval pure noise. None
        elsewhere (the log(σ/α) table applies)."""
        top = self.num_train_timesteps - 1
        if not self.zero_terminal_snr or t <= top - 1:
            return None
        return math.sqrt(float(self.alphas_cumprod[-2])) * max(top - t, 0.0)

    def sigma_ratio(self, t: float) -> float:
        """σ_t / α_t (diffusers' "sigma" for VP models); inf at a zero-SNR end."""
        alpha = self._last_alpha(t)
        if alpha is not None:
            return math.inf if alpha == 0.0 else math.sqrt(1.0 - alpha * alpha) / alpha
        log_ratio = self._log_ratio
        return float(np.exp(np.interp(t, np.arange(len(log_ratio)), log_ratio)))

    def diffusers_sigma(self, t: float | None) -> float:
        """A diffusers VP scheduler's `sigmas` entry at model time t (σ/α; 0 at the clean end t = None)."""
        return 0.0 if t is None else self.sigma_ratio(t)

    def time_at(self, sigma_ratio: float) -> float:
        """The model time whose σ/α is `sigma_ratio` (a diffusers VP scheduler's `sigmas` entry): the inverse of
        `diffusers_sigma`, diffusers' `_sigma_to_t` without its rounding."""
        log_ratio = self._log_ratio
        if self.zero_terminal_snr:
            top = self.num_train_timesteps - 1
            if math.isinf(sigma_ratio):
                return float(top)
            if sigma_ratio > math.exp(log_ratio[-2]):  # inside the last interval: invert `_last_alpha`
                alpha = 1.0 / math.sqrt(sigma_ratio * sigma_ratio + 1.0)
                return top - alpha / math.sqrt(float(self.alphas_cumprod[-2]))
            log_ratio = log_ratio[:-1]
        return float(np.interp(np.log(sigma_ratio), log_ratio, np.arange(len(log_ratio))))

    def alpha_sigma(self, t: float | None) -> tuple[float, float]:
        """(α_t, σ_t); t = None is the clean end point (σ = 0); (0, 1) at a zero-SNR end."""
        if t is None:
            return 1.0, 0.0
        alpha = self._last_alpha(t)
        if alpha is not None:
            return alpha, math.sqrt(1.0 - alpha * alpha)
        s = self.sigma_ratio(t)
        alpha = 1.0 / math.sqrt(s * s + 1.0)
        return alpha, s * alpha


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (SD3, Flux): x_t = (1 - σ) x_0 + σ ε with σ = t / T, optionally time-shifted."""

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def diffusers_sigma(self, t: float | None) -> float:
        """A diffusers flow scheduler's `sigmas` entry at model time t: the shifted σ (0 at t = None)."""
        return self.alpha_sigma(t)[1]

    def time_at(self, sigma: float) -> float:
        """The model time whose (shifted) σ is `sigma` (a diffusers flow scheduler's `sigmas` entry): the inverse of
        `diffusers_sigma`."""
        unshifted = sigma / (self.shift - (self.shift - 1.0) * sigma)
        return unshifted * self.num_train_timesteps

    def alpha_sigma(self, t: float | None) -> tuple[float, float]:
        if t is None:
            return 1.0, 0.0
        s = t / self.num_train_timesteps
        s = self.shift * s / (1.0 + (self.shift - 1.0) * s)
        return 1.0 - s, s


NoiseSchedule = VPSchedule | FlowSchedule


def log_snr(alpha: float, sigma: float) -> float:
    """λ = log(α/σ); +inf at σ = 0, −inf at α = 0 (rectified flow's pure-noise end, σ = 1, where FlowMatch Euler
    starts: the exponential-integrator steps take their limits there, e^{-(λ_t − λ_s)} = 0)."""
    if sigma == 0.0:
        return math.inf
    return -math.inf if alpha == 0.0 else math.log(alpha) - math.log(sigma)


def to_data_and_noise(
    output: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output of any parameterisation -> (x0 estimate, ε estimate) at the point (x, α, σ)."""
    if prediction_type == "epsilon":
        eps = output
        return (x - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        return output, (x - alpha * output) / sigma
    if prediction_type == "v_prediction":  # VP: v = α ε - σ x0
        return alpha * x - sigma * output, sigma * x + alpha * output
    if prediction_type == "flow_prediction":  # velocity v = ε - x0 with α = 1 - σ
        return x - sigma * output, x + alpha * output
    raise ValueError(f"prediction_type: unknown {prediction_type!r}; use one of {PREDICTION_TYPES}")
