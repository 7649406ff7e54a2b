"""The reference DDIM step (kernels/cfg_ddim.py) against diffusers' DDIMScheduler and float64 math."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from kernels.cfg_ddim import DDIMSchedule, cfg_ddim_step_reference, ddim_log_prob_reference
from tools.tiny import SD_SCHEDULER_CONFIG

N_STEPS = 50


def make_scheduler(prediction_type="epsilon"):
    sched = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    sched.set_timesteps(N_STEPS)
    return sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_matches_diffusers_with_mixed_timesteps(prediction_type, eta, dtype):
    sched = make_scheduler(prediction_type)
    ts = sched.timesteps
    assert ts[0] == 981 and ts[-1] == 1  # SD's leading spacing with steps_offset=1
    # First, a middle and the last timestep (the last uses final_alpha_cumprod), mixed per sample.
    timesteps = torch.tensor([ts[0], ts[N_STEPS // 2], ts[-1], ts[-1], ts[0]])
    B = len(timesteps)
    g = torch.Generator().manual_seed(1)
    x_t, out_u, out_c, z = (torch.randn(B, 4, 8, 8, generator=g, dtype=dtype) for _ in range(4))
    guidance = torch.tensor([7.5, 1.0, 5.0, 0.0, 3.0], dtype=dtype)

    schedule = DDIMSchedule.from_scheduler(sched, N_STEPS)
    coeffs = schedule.coefficients(timesteps, eta, dtype=dtype)
    ours = cfg_ddim_step_reference(out_u, out_c, x_t, guidance, coeffs, noise=z if eta > 0 else None)

    for b in range(B):
        model_out = out_u[b : b + 1] + guidance[b] * (out_c[b : b + 1] - out_u[b : b + 1])
        ref = sched.step(model_out, int(timesteps[b]), x_t[b : b + 1], eta=eta, variance_noise=z[b : b + 1]).prev_sample
        # diffusers computes its scalars from float32 alphas_cumprod in float32 even for float64
        # latents, so float32 precision of the coefficients bounds the agreement in both dtypes.
        torch.testing.assert_close(ours[b : b + 1], ref.to(dtype), atol=1e-5, rtol=1e-5)


def test_last_step_uses_final_alpha_cumprod():
    sched = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(sched, N_STEPS)
    c = schedule.coefficients(torch.tensor([1]), eta=0.0, dtype=torch.float64)
    ab_t, ab_prev = float(sched.alphas_cumprod[1]), float(sched.final_alpha_cumprod)
    assert ab_prev == float(sched.alphas_cumprod[0])  # set_alpha_to_one=False
    assert c.c_x.item() == pytest.approx(math.sqrt(ab_prev / ab_t), rel=1e-6)


def test_log_prob_matches_independent_float64_density():
    sched = make_scheduler()
    schedule = DDIMSchedule.from_scheduler(sched, N_STEPS)
    timesteps = torch.tensor([981, 501, 21])
    g = torch.Generator().manual_seed(2)
    x_t, out_u, out_c, z = (torch.randn(3, 4, 6, 5, generator=g) for _ in range(4))
    guidance = torch.tensor([5.0, 1.0, 5.0])
    coeffs = schedule.coefficients(timesteps, eta=1.0)
    x_prev, log_prob = cfg_ddim_step_reference(out_u, out_c, x_t, guidance, coeffs, noise=z, return_log_prob=True)
    assert log_prob.shape == (3,) and log_prob.dtype == torch.float32

    # Independent float64 computation from alphas_cumprod, straight from README, The method.
    for b, t in enumerate(timesteps.tolist()):
        ab_t = sched.alphas_cumprod[t].double()
        ab_prev = (
            sched.alphas_cumprod[t - 20].double()
            if t - 20 >= 0
            else torch.tensor(float(sched.final_alpha_cumprod)).double()
        )
        eps = out_u[b].double() + guidance[b].double() * (out_c[b].double() - out_u[b].double())
        x0 = (x_t[b].double() - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        sigma = ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
        mean = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps
        density = torch.distributions.Normal(mean, sigma).log_prob(x_prev[b].double())
        assert log_prob[b].item() == pytest.approx(density.mean().item(), rel=1e-5, abs=1e-5)
        # Recomputing the log-prob of the stored x_prev gives the same number.
    again = ddim_log_prob_reference(out_u, out_c, x_t, x_prev, guidance, coeffs)
    torch.testing.assert_close(again, log_prob)


def test_log_prob_rejects_eta_zero():
    schedule = DDIMSchedule.from_scheduler(make_scheduler(), N_STEPS)
    coeffs = schedule.coefficients(torch.tensor([981]), eta=0.0)
    x = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match=r"eta > 0.*--eta"):
        cfg_ddim_step_reference(x, x, x, torch.tensor([5.0]), coeffs, noise=x, return_log_prob=True)
    with pytest.raises(ValueError, match=r"eta > 0"):
        ddim_log_prob_reference(x, x, x, x, torch.tensor([5.0]), coeffs)


def test_clip_sample_scheduler_is_refused():
    sched = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "clip_sample": True})
    with pytest.raises(ValueError, match="clip_sample"):
        DDIMSchedule.from_scheduler(sched, N_STEPS)
