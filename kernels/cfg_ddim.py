"""Op 1: classifier-free guidance combined with one DDIM step (and its DDPO log-probability).

SPEC §2. With sample clipping off (the SD default) the DDIM mean is affine in x_t and in the
guided model output, with per-sample scalars:

    eps    = out_u + w * (out_c - out_u)                       (CFG, w per sample)
    mean   = c_x * x_t + c_eps * eps
    x_prev = mean + sigma * z
    log_prob = mean_CHW( -(x_prev - mean)^2 / (2 sigma^2) ) - log(sigma) - 0.5 log(2 pi)

`DDIMSchedule.coefficients` computes (c_x, c_eps, sigma) for per-sample timesteps on the device
(v-prediction is folded into c_x, c_eps, since v -> eps is affine too). This file holds the eager
PyTorch reference, which is the CPU fallback and the oracle for the Triton kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMCoefficients:
    """Per-sample DDIM scalars, each a [B] tensor on the latents' device."""

    c_x: torch.Tensor
    c_eps: torch.Tensor
    sigma: torch.Tensor
    eta: float  # kept so a log-prob request with eta <= 0 is refused without reading the device

    def require_stochastic(self):
        if not self.eta > 0:
            raise ValueError(f"a DDPO log-prob needs eta > 0 (sigma = 0 makes it undefined), got eta={self.eta}: pass --eta 1.0")


@dataclass
class DDIMSchedule:
    """The scheduler's alphas_cumprod moved to the device once, so that coefficients for any
    per-sample timesteps are gathered there: no host round-trip inside the denoising loop."""

    ab: torch.Tensor  # [T + 1] float64: alphas_cumprod, then final_alpha_cumprod at index T
    step: int  # T // N: prev_t = t - step
    num_train_timesteps: int
    prediction_type: str = "epsilon"

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, device=None) -> "DDIMSchedule":
        cfg = scheduler.config
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported (epsilon or v_prediction)")
        if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
            raise ValueError("DDIM with clip_sample or thresholding is not affine; set both to False in the scheduler config")
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64).reshape(1)
        ab = torch.cat([scheduler.alphas_cumprod.to(torch.float64), final]).to(device)
        T = cfg.num_train_timesteps
        return cls(ab, T // num_inference_steps, T, cfg.prediction_type)

    def coefficients(self, timesteps: torch.Tensor, eta: float, dtype=torch.float32) -> DDIMCoefficients:
        """c_x, c_eps, sigma for each sample's timestep (a [B] integer tensor on the device)."""
        t = timesteps.to(device=self.ab.device, dtype=torch.long)
        prev_t = t - self.step
        ab_t = self.ab[t]
        ab_prev = self.ab[torch.where(prev_t >= 0, prev_t, torch.full_like(prev_t, self.num_train_timesteps))]
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        c_x = torch.sqrt(ab_prev / ab_t)
        c_eps = torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0)) - torch.sqrt(ab_prev * (1 - ab_t) / ab_t)
        if self.prediction_type == "v_prediction":
            # eps = sqrt(ab_t) * v + sqrt(1 - ab_t) * x_t, substituted into the affine mean.
            c_x = c_x + c_eps * torch.sqrt(1 - ab_t)
            c_eps = c_eps * torch.sqrt(ab_t)
        return DDIMCoefficients(c_x.to(dtype), c_eps.to(dtype), sigma.to(dtype), float(eta))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def ddim_mean(out_u, out_c, x_t, guidance, coeffs: DDIMCoefficients) -> torch.Tensor:
    """The DDIM mean of x_prev given the unconditional and conditional model outputs."""
    eps = out_u + _per_sample(guidance, out_u) * (out_c - out_u)
    return _per_sample(coeffs.c_x, x_t) * x_t + _per_sample(coeffs.c_eps, x_t) * eps


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(x_prev; mean, sigma^2 I), averaged (not summed) over C*H*W, in float32."""
    sigma32 = sigma.to(torch.float32) if x_prev.dtype != torch.float64 else sigma
    diff = (x_prev - mean).to(sigma32.dtype)
    se = (diff**2).flatten(1).mean(1)
    return -se / (2 * sigma32**2) - torch.log(sigma32) - LOG_SQRT_2PI


def cfg_ddim_step_reference(
    out_u, out_c, x_t, guidance, coeffs: DDIMCoefficients, noise=None, return_log_prob: bool = False
):
    """Eager CFG + DDIM step. Returns x_prev, or (x_prev, log_prob [B]) when asked.

    noise=None is the deterministic step (eta = 0 or the mean only); a log-prob needs noise and
    sigma > 0.
    """
    if return_log_prob:
        coeffs.require_stochastic()
        if noise is None:
            raise ValueError("a log-prob needs the step's noise z: pass noise")
    mean = ddim_mean(out_u, out_c, x_t, guidance, coeffs)
    if noise is None:
        return mean
    x_prev = mean + _per_sample(coeffs.sigma, x_t) * noise
    if not return_log_prob:
        return x_prev
    return x_prev, gaussian_log_prob(x_prev, mean, coeffs.sigma)


def ddim_log_prob_reference(out_u, out_c, x_t, x_prev, guidance, coeffs: DDIMCoefficients) -> torch.Tensor:
    """DDPO's training-time recomputation: the log-prob of a stored x_prev under the current model."""
    coeffs.require_stochastic()
    return gaussian_log_prob(x_prev, ddim_mean(out_u, out_c, x_t, guidance, coeffs), coeffs.sigma)
