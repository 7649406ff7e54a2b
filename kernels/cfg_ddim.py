"""Op 1: classifier-free guidance combined with one DDIM step (and its DDPO log-probability).

See the README's The method. With sample clipping off (the SD default) the DDIM mean is affine in x_t and in the
guided model output, with per-sample scalars:

    eps    = out_u + w * (out_c - out_u)                       (CFG, w per sample)
    mean   = c_x * x_t + c_eps * eps
    x_prev = mean + sigma * z
    log_prob = mean_CHW( -(x_prev - mean)^2 / (2 sigma^2) ) - log(sigma) - 0.5 log(2 pi)

`DDIMSchedule.coefficients` computes (c_x, c_eps, sigma) for per-sample timesteps on the device
(v-prediction is folded into c_x, c_eps, since v -> eps is affine too). `FlowMatchSchedule.coefficients`
does the same for flow-matching models (SD3), whose Euler / SDE step is affine in (x_t, velocity): the
same kernels then serve them, with the velocity in place of eps. This file holds the eager PyTorch
reference, which is the CPU fallback and the oracle for the Triton kernel.
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
            raise ValueError(
                f"a DDPO log-prob needs eta > 0 (sigma = 0 makes it undefined), got eta={self.eta}: pass --eta 1.0"
            )


@dataclass
class DDIMSchedule:
    """The scheduler's alphas_cumprod moved to the device once, so that coefficients for any
    per-sample timesteps are gathered there: no host round-trip inside the denoising loop."""

    ab: torch.Tensor  # [T + 1] float64: alphas_cumprod, then final_alpha_cumprod at index T
    step: int  # T // N: prev_t = t - step
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    stochastic_eta = 1.0  # DDPO's default eta on DDIM (DDPM-like noise, the DDPO paper's)

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int, device=None) -> DDIMSchedule:
        cfg = scheduler.config
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported (epsilon or v_prediction)")
        if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
            raise ValueError(
                "DDIM with clip_sample or thresholding is not affine; set both to False in the scheduler config"
            )
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


class FlowCoefficients(DDIMCoefficients):
    """DDIMCoefficients of a flow-matching step: c_x, c_eps (the velocity's coefficient), sigma (the step's
    noise scale), eta (the noise level a)."""

    def require_stochastic(self):
        if not self.eta > 0:
            raise ValueError(
                f"a DDPO log-prob on a flow-matching model needs a noise level eta > 0 (eta = 0 is the deterministic "
                f"ODE step, whose log-prob is undefined), got eta={self.eta}: pass --eta 0.7 (Flow-GRPO's noise level)"
            )


@dataclass
class FlowMatchSchedule:
    """The sigma table of a flow-matching scheduler (SD3 / SD3.5) for N sampling steps, on the device, so
    that per-sample coefficients are gathered there.

    Latents move along x_sigma = (1 - sigma) x_0 + sigma eps and the model predicts the velocity
    v = eps - x_0. From sigma to the next sigma' (dt = sigma' - sigma < 0), with noise level a (Flow-GRPO's
    SDE, whose marginals are the ODE's):

        std  = a sqrt(sigma / (1 - s)),   s = sigma, except at sigma = 1 where s = the schedule's second sigma
        mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
        x'   = mean + std sqrt(-dt) z

    The mean is affine in (x, v), as DDIM's is in (x, eps), so the step is c_x x + c_eps v + sigma z with
    sigma = std sqrt(-dt), and op 1 / op 2 compute it and its log-prob unchanged. a = 0 is the Euler ODE
    step x' = x + dt v (FlowMatchEulerDiscreteScheduler.step).
    """

    timesteps: torch.Tensor  # [N] float64: the model timesteps sigma_i * T of the N steps, noisiest first
    sigmas: torch.Tensor  # [N + 1] float64: sigma_0 .. sigma_{N-1}, then the terminal 0
    num_train_timesteps: int
    stochastic_eta = 0.7  # DDPO's default noise level on a flow model (Flow-GRPO's)

    @classmethod
    def from_scheduler(
        cls, scheduler, num_inference_steps: int, device=None, sigmas=None, mu: float | None = None
    ) -> FlowMatchSchedule:
        """The table of `scheduler.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)` (shift applied),
        computed on a copy so the caller's scheduler keeps its state. `sigmas` and `mu` are what the pipeline
        passes (FLUX: sigmas linspace(1, 1/N, N) and the resolution's mu; see diffusion.timestep_arguments)."""
        cfg = scheduler.config
        if cfg.get("use_dynamic_shifting") and mu is None:
            raise ValueError(
                "a flow-matching scheduler with use_dynamic_shifting needs a resolution-dependent mu; "
                "pass mu (diffusion.timestep_arguments computes FLUX's) or set use_dynamic_shifting to False"
            )
        if cfg.get("stochastic_sampling") or cfg.get("invert_sigmas"):
            raise ValueError(
                "stochastic_sampling / invert_sigmas change the flow step; set them to False in the scheduler config"
            )
        sched = type(scheduler).from_config(cfg)
        sched.set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)
        return cls(
            sched.timesteps.to(device=device, dtype=torch.float64),
            sched.sigmas.to(device=device, dtype=torch.float64),
            cfg.num_train_timesteps,
        )

    def coefficients(self, timesteps: torch.Tensor, eta: float, dtype=torch.float32) -> FlowCoefficients:
        """c_x, c_eps (of the velocity), sigma for each sample's model timestep (a [B] tensor on the device,
        values of the scheduler's timesteps), eta = the noise level a. Each timestep is looked up in the
        table on the device (the nearest entry), so nothing is read back to the host."""
        t = timesteps.to(device=self.timesteps.device, dtype=torch.float64).reshape(-1)
        i = (t[:, None] - self.timesteps[None, :]).abs().argmin(1)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        dt = sigma_next - sigma
        s = torch.where(sigma == 1, self.sigmas[1], sigma)
        std = eta * torch.sqrt(sigma / (1 - s))
        c_x = 1 + std**2 * dt / (2 * sigma)
        c_v = (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        step_sigma = std * torch.sqrt(-dt)
        return FlowCoefficients(c_x.to(dtype), c_v.to(dtype), step_sigma.to(dtype), float(eta))


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


# ================================================================================================
# Triton kernels
#
# Layout: every latent-shaped tensor is seen as [B, N] rows, N = C*H*W, with each row contiguous
# and any batch stride. That covers the two .chunk(2) halves of the UNet's [2B, ...] output that
# diffusion.cfg_unet returns (views of one buffer: no copy) and ordinary contiguous tensors. A tensor
# whose rows are not contiguous (channels_last, an expanded gradient) is copied once by `_rows`.
# Grid: (blocks per row, B). Per-sample scalars are loaded once per program; a scalar stride of 0
# broadcasts one value (a single guidance scale) to the whole batch without materialising it.
# Arithmetic runs in float32 whatever the storage dtype (float64 for float64 inputs, which is what
# lets the tests gradcheck the kernels under TRITON_INTERPRET=1; on CUDA the dispatcher sends
# float64 to the eager reference in auto mode, as float64 is an oracle dtype, not a target).
# ================================================================================================

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install without triton: the eager reference still works
    triton = None

# Elements per program on a GPU: 2048 elements over 8 warps is 8 per thread, i.e. 128-bit loads
# for bf16 and two for fp32, and for SD latents (16384 elements per sample) 8 programs per sample.
GPU_BLOCK = 2048
GPU_WARPS = 8
# The interpreter costs ~ms per program instance whatever its size, so there one program per
# sample row (up to this many elements) is fastest.
INTERPRET_MAX_BLOCK = 1 << 16
# Tests set this to force several (and ragged) blocks per row under the interpreter.
BLOCK_OVERRIDE: int | None = None


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output buffer the kernels write is allocated here (the tests swap in a NaN-filled one
    so an element a kernel forgets to write cannot pass)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """t as [batch, N] with contiguous rows: a view whenever possible, a copy otherwise."""
    r = t.reshape(batch, -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    return r


def _per_sample_arg(v, batch: int, device, dtype=torch.float32):
    """A per-sample scalar as (tensor, stride): [B] tensors keep their stride; one-element tensors and
    Python numbers get stride 0 so one value serves the whole batch."""
    if not torch.is_tensor(v):
        v = torch.full((1,), float(v), dtype=dtype, device=device)  # a fill kernel: no host->device copy
    if v.device != torch.device(device):  # moving it here would hide a host-device copy in the loop
        raise ValueError(f"per-sample scalars must live on the latents' device ({device}), got one on {v.device}")
    v = v.reshape(-1)
    if v.numel() == 1:
        return v, 0
    if v.numel() != batch:
        raise ValueError(f"a per-sample scalar has {v.numel()} values for a batch of {batch}")
    return v, v.stride(0)


def compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _launch_params(kernel, n: int):
    """(BLOCK, num_warps) for rows of n elements."""
    if BLOCK_OVERRIDE is not None:
        return BLOCK_OVERRIDE, 4
    if is_interpreted(kernel):
        return min(triton.next_power_of_2(n), INTERPRET_MAX_BLOCK), 4
    return GPU_BLOCK, GPU_WARPS


def is_interpreted(kernel) -> bool:
    # TRITON_INTERPRET is read when @triton.jit runs, i.e. when this module is imported.
    return type(kernel).__name__ == "InterpretedFunction"


def check_triton_device(kernel, *tensors):
    if triton is None:
        raise RuntimeError("backend 'triton' needs the triton package; install it or use backend='eager'")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            "Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before `kernels` is first "
            "imported (it is read when the kernels are decorated); or use backend='eager'"
        )


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


if triton is not None:
    _HALF_LOG_2PI = tl.constexpr(LOG_SQRT_2PI)

    @triton.jit
    def gaussian_log_prob_from_se(se, n, sigma):
        """the per-sample log-prob (README, The method) from the row's sum of squared deviations `se` (n elements).
        Shared with op 2 (kernels/ddpo_loss.py) so both ops compute the same number the same way."""
        return -se / (2.0 * n * sigma * sigma) - tl.log(sigma) - _HALF_LOG_2PI

    @triton.jit
    def _cfg_ddim_fwd_kernel(
        u_ptr,
        c_ptr,
        x_ptr,
        z_ptr,
        out_ptr,
        part_ptr,
        cx_ptr,
        ceps_ptr,
        sigma_ptr,
        w_ptr,
        u_sb,
        c_sb,
        x_sb,
        z_sb,  # batch strides of the [B, N] row views, in elements
        cx_sb,
        ceps_sb,
        sigma_sb,
        w_sb,  # strides of the per-sample scalars (0: one value for all)
        N,
        HAS_NOISE: tl.constexpr,
        LOG_PROB: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """x_prev = c_x x_t + c_eps (u + w (c - u)) + sigma z for one BLOCK of one sample's row, and,
        for the log-prob, this block's partial sum of (x_prev - mean)^2."""
        blk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # int64: B * N may pass 2^31 for large batches
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N

        w = tl.load(w_ptr + b * w_sb).to(COMPUTE)
        c_x = tl.load(cx_ptr + b * cx_sb).to(COMPUTE)
        c_eps = tl.load(ceps_ptr + b * ceps_sb).to(COMPUTE)

        u = tl.load(u_ptr + b * u_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + b * c_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + b * x_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        mean = c_x * x + c_eps * (u + w * (c - u))
        if HAS_NOISE:
            sigma = tl.load(sigma_ptr + b * sigma_sb).to(COMPUTE)
            z = tl.load(z_ptr + b * z_sb + offs, mask=mask, other=0.0).to(COMPUTE)
            x_prev = mean + sigma * z
        else:
            x_prev = mean
        x_prev = x_prev.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * N + offs, x_prev, mask=mask)

        if LOG_PROB:
            # The log-prob is that of the x_prev actually stored (rounded to its dtype), because that
            # is what DDPO's training pass reads back: op 2 then recomputes exactly this number and
            # the first importance ratio is 1 (the consistency rule in the README's The method), in bf16 as well.
            d = tl.where(mask, x_prev.to(COMPUTE) - mean, 0.0)
            tl.store(part_ptr + b * tl.num_programs(0) + blk, tl.sum(d * d, axis=0))

    @triton.jit
    def _log_prob_finish_kernel(
        part_ptr,
        sigma_ptr,
        sigma_sb,
        lp_ptr,
        B,
        NB,
        N,
        COMPUTE: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
    ):
        """Second stage of the log-prob reduction: one program sums each sample's NB partials in a
        fixed order and applies the log-prob formula of the README's The method.

        Why two stages rather than atomics: the result is bitwise reproducible (float atomics add in
        whatever order blocks finish), so op 1 at sampling time and op 2 at training time reduce in the
        same order; no zero-initialised accumulator (one memset launch fewer); and no reliance on
        cross-program memory ordering for a "last block finishes" scheme. The cost is one tiny launch
        that reads B * NB floats (B * 8 for SD latents).
        """
        n = N * tl.full([], 1.0, COMPUTE)  # not N.to(): N == 1 is specialised to a constexpr
        cols = tl.arange(0, COLS)
        for start in range(0, B, ROWS):
            rows = start + tl.arange(0, ROWS)
            rmask = rows < B
            tile = tl.load(
                part_ptr + rows[:, None] * NB + cols[None, :],
                mask=rmask[:, None] & (cols[None, :] < NB),
                other=0.0,
            )
            se = tl.sum(tile.to(COMPUTE), axis=1)
            sigma = tl.load(sigma_ptr + rows * sigma_sb, mask=rmask, other=1.0).to(COMPUTE)
            tl.store(lp_ptr + rows, gaussian_log_prob_from_se(se, n, sigma), mask=rmask)

    @triton.jit
    def _cfg_ddim_bwd_kernel(
        g_ptr,
        gu_ptr,
        gc_ptr,
        gx_ptr,
        cx_ptr,
        ceps_ptr,
        w_ptr,
        g_sb,
        gu_sb,
        gc_sb,
        cx_sb,
        ceps_sb,
        w_sb,
        N,
        WRITE_UC: tl.constexpr,
        WRITE_X: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """The step is affine: with g = dL/dx_prev,
        dL/dx_t = c_x g,  dL/du = c_eps (1 - w) g,  dL/dc = c_eps w g.
        One read of g, up to three writes; no saved tensor."""
        blk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(g_ptr + b * g_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        if WRITE_UC:
            w = tl.load(w_ptr + b * w_sb).to(COMPUTE)
            g_eps = tl.load(ceps_ptr + b * ceps_sb).to(COMPUTE) * g
            tl.store(gu_ptr + b * gu_sb + offs, g_eps - w * g_eps, mask=mask)
            tl.store(gc_ptr + b * gc_sb + offs, w * g_eps, mask=mask)
        if WRITE_X:
            c_x = tl.load(cx_ptr + b * cx_sb).to(COMPUTE)
            tl.store(gx_ptr + b * N + offs, c_x * g, mask=mask)


def finish_rows_cols(batch: int, nb: int):
    """Tile of the second-stage kernels: all partials of a sample in one row, about 4096 per tile."""
    cols = triton.next_power_of_2(nb)
    rows = max(1, min(triton.next_power_of_2(batch), 4096 // cols))
    return rows, cols


def cfg_ddim_forward_triton(out_u, out_c, x_t, noise, guidance, c_x, c_eps, sigma, return_log_prob):
    """Launches op 1. Returns (x_prev, log_prob or None)."""
    batch = x_t.shape[0]
    check_triton_device(_cfg_ddim_fwd_kernel, out_u, out_c, x_t, noise)
    u, c = _rows(out_u, batch), _rows(out_c, batch)
    x = _rows(x_t, batch)
    z = _rows(noise, batch) if noise is not None else x  # x is a placeholder pointer, never read
    n = x.shape[1]
    cdt = compute_dtype(u, c, x, noise)
    out_dtype = torch.promote_types(torch.promote_types(u.dtype, c.dtype), x.dtype)
    if noise is not None:
        out_dtype = torch.promote_types(out_dtype, noise.dtype)
    dev = x.device
    (cx, cx_sb), (ce, ce_sb), (sg, sg_sb), (w, w_sb) = (
        _per_sample_arg(v, batch, dev, cdt) for v in (c_x, c_eps, sigma, guidance)
    )
    block, warps = _launch_params(_cfg_ddim_fwd_kernel, n)
    nb = triton.cdiv(n, block)
    x_prev = _empty(x_t.shape, out_dtype, dev)
    part = _empty((batch, nb), cdt, dev) if return_log_prob else x_prev  # placeholder when unused
    _cfg_ddim_fwd_kernel[(nb, batch)](
        u,
        c,
        x,
        z,
        x_prev,
        part,
        cx,
        ce,
        sg,
        w,
        u.stride(0),
        c.stride(0),
        x.stride(0),
        z.stride(0),
        cx_sb,
        ce_sb,
        sg_sb,
        w_sb,
        n,
        HAS_NOISE=noise is not None,
        LOG_PROB=return_log_prob,
        COMPUTE=_tl_dtype(cdt),
        BLOCK=block,
        num_warps=warps,
    )
    if not return_log_prob:
        return x_prev, None
    log_prob = _empty((batch,), cdt, dev)
    rows, cols = finish_rows_cols(batch, nb)
    _log_prob_finish_kernel[(1,)](part, sg, sg_sb, log_prob, batch, nb, n, COMPUTE=_tl_dtype(cdt), ROWS=rows, COLS=cols)
    return x_prev, log_prob


def cfg_ddim_backward_triton(grad_x_prev, out_u, out_c, x_t, guidance, c_x, c_eps, need_uc, need_x):
    """Gradients of op 1 wrt (out_u, out_c, x_t) from dL/dx_prev. Only the metadata of out_u/out_c/x_t
    is used."""
    batch = x_t.shape[0]
    g = _rows(grad_x_prev, batch)
    n = g.shape[1]
    cdt = compute_dtype(g)
    dev = g.device
    (cx, cx_sb), (ce, ce_sb), (w, w_sb) = (_per_sample_arg(v, batch, dev, cdt) for v in (c_x, c_eps, guidance))
    grad_u = grad_c = grad_x = None
    if need_uc:
        grad_u, grad_c = _empty(out_u.shape, out_u.dtype, dev), _empty(out_c.shape, out_c.dtype, dev)
        gu, gc = grad_u.view(batch, n), grad_c.view(batch, n)
    else:
        gu = gc = g  # placeholders, never written
    if need_x:
        grad_x = _empty(x_t.shape, x_t.dtype, dev)
    block, warps = _launch_params(_cfg_ddim_bwd_kernel, n)
    _cfg_ddim_bwd_kernel[(triton.cdiv(n, block), batch)](
        g,
        gu,
        gc,
        grad_x if need_x else g,
        cx,
        ce,
        w,
        g.stride(0),
        gu.stride(0),
        gc.stride(0),
        cx_sb,
        ce_sb,
        w_sb,
        n,
        WRITE_UC=need_uc,
        WRITE_X=need_x,
        COMPUTE=_tl_dtype(cdt),
        BLOCK=block,
        num_warps=warps,
    )
    return grad_u, grad_c, grad_x


@dataclass
class _Meta:
    """Shape and dtype of an input, all the backward needs of it."""

    shape: torch.Size
    dtype: torch.dtype


class CfgDdimStepFunction(torch.autograd.Function):
    """Op 1 on the Triton kernels: x_prev (and optionally the per-sample log-prob).

    forward(out_u, out_c, x_t, noise, guidance, c_x, c_eps, sigma, return_log_prob). out_u and out_c may
    be views of one buffer or one tensor passed twice (autograd adds their two gradients).

    Backward saves no tensor: the step is affine with per-sample coefficients. The log-prob
    is returned as non-differentiable, and that loses nothing: x_prev - mean = sigma z does not depend
    on x_t, out_u or out_c, so its gradient wrt them is identically zero (the coefficients and the
    noise are constants here). DDPO's differentiable log-prob is op 2's business.
    """

    @staticmethod
    def forward(ctx, out_u, out_c, x_t, noise, guidance, c_x, c_eps, sigma, return_log_prob):
        x_prev, log_prob = cfg_ddim_forward_triton(
            out_u, out_c, x_t, noise, guidance, c_x, c_eps, sigma, return_log_prob
        )
        ctx.set_materialize_grads(False)
        ctx.like = tuple(_Meta(t.shape, t.dtype) for t in (out_u, out_c, x_t))
        ctx.save_for_backward(guidance, c_x, c_eps)  # [B] (or one-element) tensors: nothing latent-sized
        if return_log_prob:
            ctx.mark_non_differentiable(log_prob)
            return x_prev, log_prob
        return x_prev

    @staticmethod
    def backward(ctx, grad_x_prev, *_):
        if grad_x_prev is None:
            return (None,) * 9
        guidance, c_x, c_eps = ctx.saved_tensors
        need_u, need_c, need_x = ctx.needs_input_grad[:3]
        like_u, like_c, like_x = ctx.like
        grad_u, grad_c, grad_x = cfg_ddim_backward_triton(
            grad_x_prev, like_u, like_c, like_x, guidance, c_x, c_eps, need_u or need_c, need_x
        )
        return (grad_u if need_u else None, grad_c if need_c else None, grad_x, None, None, None, None, None, None)
