"""The per-step math of both trainers, fused, and the dispatcher they call.

    from kernels import cfg_ddim_step, ddpo_clip_loss, schedule_for

    schedule = schedule_for(pipe.scheduler, num_steps, device)      # DDIM (SD, SDXL) or flow matching (SD3, FLUX)
    coeffs = schedule.coefficients(timesteps, eta)                  # per-sample, on the device
    x_prev = cfg_ddim_step(out_u, out_c, x_t, w, coeffs, noise=z)   # AlignProp / sampling
    x_prev, lp = cfg_ddim_step(out_u, out_c, x_t, w, coeffs, noise=z, return_log_prob=True)  # DDPO sampling
    loss, stats = ddpo_clip_loss(out_u, out_c, x_t, x_prev, w, coeffs, lp_old, adv, clip_range)  # DDPO training

out_u and out_c are what diffusion.cfg_unet returns: the two .chunk(2) halves of the UNet's [2B, ...]
output (views; the kernels read them in place, whatever their batch stride), or, where every sample's
guidance is exactly 1 or the model is guidance-distilled (FLUX without true CFG: one call, the scale an input
of the model), one tensor passed as both (autograd then sums the two halves' gradients).

For a flow-matching model (SD3, FLUX) out_u / out_c are the predicted velocities and eta is the noise level of
the stochastic step (0: the Euler ODE step); the ops are the same, only the coefficients differ.

backend: None reads the environment variable DIFFEXP_KERNELS ("auto" by default, "triton", "eager").
"auto" runs the Triton kernels on CUDA tensors (float32/bf16/fp16) when triton imports, and the eager
PyTorch reference otherwise (CPU, float64, no triton). "triton" on CPU tensors needs TRITON_INTERPRET=1
set before this package is imported (the tests do that). Nothing here synchronises with the device.
"""

from __future__ import annotations

import os

import torch

from .cfg_ddim import (
    CfgDdimStepFunction,
    DDIMCoefficients,
    DDIMSchedule,
    FlowCoefficients,
    FlowMatchSchedule,
    cfg_ddim_step_reference,
    ddim_log_prob_reference,
    triton,
)
from .ddpo_loss import DdpoClipLossFunction, ddpo_clip_loss_reference, ppo_clip_loss_reference

__all__ = [
    "DDIMSchedule",
    "DDIMCoefficients",
    "FlowMatchSchedule",
    "FlowCoefficients",
    "schedule_for",
    "is_flow_matching",
    "cfg_ddim_step",
    "ddpo_clip_loss",
    "resolve_backend",
    "cfg_ddim_step_reference",
    "ddim_log_prob_reference",
    "ddpo_clip_loss_reference",
    "ppo_clip_loss_reference",
]

BACKENDS = ("auto", "triton", "eager")


def is_flow_matching(scheduler) -> bool:
    """Whether a diffusers scheduler is a flow-matching one (SD3 / SD3.5), whose model timesteps are
    sigma * num_train_timesteps and whose model predicts a velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def schedule_for(
    scheduler, num_inference_steps: int, device=None, **set_timesteps_kwargs
) -> DDIMSchedule | FlowMatchSchedule:
    """The schedule whose `coefficients(timesteps, eta)` the ops take, for the pipeline's scheduler:
    DDIM's for SD / SDXL (load_pipeline gives them a DDIMScheduler), the flow-matching table for SD3 and
    FLUX (whose pipeline also passes sigmas and mu to set_timesteps: give them as keyword arguments)."""
    if is_flow_matching(scheduler):
        return FlowMatchSchedule.from_scheduler(scheduler, num_inference_steps, device, **set_timesteps_kwargs)
    return DDIMSchedule.from_scheduler(scheduler, num_inference_steps, device)


def resolve_backend(backend: str | None, like: torch.Tensor) -> str:
    """'triton' or 'eager' for tensors like `like`, from the argument or DIFFEXP_KERNELS."""
    choice = (backend or os.environ.get("DIFFEXP_KERNELS") or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r} (argument or DIFFEXP_KERNELS)")
    if choice == "auto":
        fast = like.is_cuda and triton is not None and like.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return "triton" if fast else "eager"
    if choice == "triton" and triton is None:
        raise RuntimeError("kernel backend 'triton' was asked for but triton does not import; use 'eager' or 'auto'")
    return choice


def _guidance_tensor(guidance, like: torch.Tensor) -> torch.Tensor:
    """The guidance scale as a tensor: a [B] (or one-element) tensor as given, which must already be
    on the latents' device (a copy here would be a hidden host-device transfer every step), a number
    as a one-element tensor made there by a fill kernel."""
    if torch.is_tensor(guidance):
        return guidance
    return torch.full(
        (1,), float(guidance), dtype=torch.float64 if like.dtype == torch.float64 else torch.float32, device=like.device
    )


def _check_shapes(x_t, **tensors):
    for name, t in tensors.items():
        if t is not None and t.shape != x_t.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, x_t has {tuple(x_t.shape)}")


def _check_log_prob_request(coeffs: DDIMCoefficients, noise):
    coeffs.require_stochastic()  # eta <= 0: sigma = 0 and the log-prob is undefined
    if noise is None:
        raise ValueError("a log-prob needs the step's noise z: pass noise")


def cfg_ddim_step(
    out_u, out_c, x_t, guidance, coeffs: DDIMCoefficients, noise=None, return_log_prob=False, backend=None
):
    """CFG + DDIM step (README, The method): x_prev, or (x_prev, log_prob [B]) when return_log_prob.

    out_u, out_c: the UNet's unconditional / conditional outputs (epsilon or v, as the schedule says);
    guidance: a number or a per-sample [B] tensor; noise: z, or None for the deterministic step (the
    mean; no log-prob then). Differentiable wrt x_t, out_u and out_c.
    """
    _check_shapes(x_t, out_u=out_u, out_c=out_c, noise=noise)
    if return_log_prob:
        _check_log_prob_request(coeffs, noise)
    w = _guidance_tensor(guidance, x_t)
    if resolve_backend(backend, x_t) == "eager":
        return cfg_ddim_step_reference(out_u, out_c, x_t, w, coeffs, noise, return_log_prob)
    return CfgDdimStepFunction.apply(
        out_u, out_c, x_t, noise, w, coeffs.c_x, coeffs.c_eps, coeffs.sigma, return_log_prob
    )


def _stats(log_prob, ratio, approx_kl, clipfrac):
    return {"log_prob": log_prob, "ratio": ratio, "approx_kl": approx_kl, "clipfrac": clipfrac}


def ddpo_clip_loss(
    out_u,
    out_c,
    x_t,
    x_prev,
    guidance,
    coeffs: DDIMCoefficients,
    old_log_prob,
    advantages,
    clip_range: float,
    backend=None,
):
    """DDPO's clipped PPO loss for one timestep of a minibatch (README, The method), log-prob recomputed from the
    stored x_t -> x_prev step. Returns (loss, stats) with detached 'log_prob' [B], 'ratio' [B],
    'approx_kl', 'clipfrac' (0-d tensors on the device: read them when logging, not in the loop)."""
    _check_shapes(x_t, out_u=out_u, out_c=out_c, x_prev=x_prev)
    coeffs.require_stochastic()
    w = _guidance_tensor(guidance, x_t)
    if resolve_backend(backend, x_t) == "eager":
        return ddpo_clip_loss_reference(out_u, out_c, x_t, x_prev, w, coeffs, old_log_prob, advantages, clip_range)
    loss, *stats = DdpoClipLossFunction.apply(
        out_u, out_c, x_t, x_prev, w, coeffs.c_x, coeffs.c_eps, coeffs.sigma, old_log_prob, advantages, clip_range
    )
    return loss, _stats(*stats)
