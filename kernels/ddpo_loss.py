"""Op 2: DDPO's training-time log-prob of a stored step and the clipped PPO objective, fused.

README, The method (DDIM step, DDPO). For each sample b of a minibatch at one timestep (timesteps may differ per sample):

    mean_b  = c_x x_t + c_eps (out_u + w (out_c - out_u))
    lp_b    = mean_CHW( -(x_prev - mean_b)^2 / (2 sigma^2) ) - log(sigma) - 0.5 log(2 pi)
    r_b     = exp(lp_b - lp_old_b)
    loss    = mean_b max(-A_b r_b, -A_b clamp(r_b, 1 - eps, 1 + eps))
    approx_kl = 0.5 mean_b (lp_b - lp_old_b)^2,   clipfrac = mean_b (|r_b - 1| > eps)

Gradient (what the backward kernel writes): dloss/dlp_b = -A_b r_b / B where the unclipped term is the
max (ties only happen inside the clip range, where both terms are -A r with the same gradient), else 0;
dlp_b/dmean = (x_prev - mean) / (sigma^2 N), and mean is affine in out_u, out_c, x_t.

Everything is accumulated in float32 whatever the input dtype: eps = 1e-4 is below bf16's resolution
(2^-8 near 1), so a ratio computed in bf16 would be all noise. This file holds the eager reference (the
fallback and the test oracle), the Triton kernels and the autograd Function tying them.
"""

from __future__ import annotations

import torch

from . import cfg_ddim as _op1
from .cfg_ddim import DDIMCoefficients, ddim_log_prob_reference

triton = _op1.triton
if triton is not None:
    import triton.language as tl

    from .cfg_ddim import gaussian_log_prob_from_se


# ------------------------------------------------------------------------------------------------
# Eager reference
# ------------------------------------------------------------------------------------------------


def ppo_clip_loss_reference(log_prob, old_log_prob, advantages, clip_range: float):
    """The clipped objective (README, The method) on per-sample log-probs. Returns (loss, stats) with detached stats
    'log_prob', 'ratio' [B], 'approx_kl', 'clipfrac' (0-d tensors: no host sync)."""
    old_log_prob = old_log_prob.to(log_prob.dtype)
    advantages = advantages.to(log_prob.dtype)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "log_prob": log_prob.detach(),
        "ratio": ratio.detach(),
        "approx_kl": (0.5 * ((log_prob - old_log_prob) ** 2).mean()).detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).to(log_prob.dtype).mean().detach(),
    }
    return loss, stats


def ddpo_clip_loss_reference(
    out_u, out_c, x_t, x_prev, guidance, coeffs: DDIMCoefficients, old_log_prob, advantages, clip_range: float
):
    """Eager op 2: the log-prob of the stored x_prev under the current model, then the clipped loss."""
    log_prob = ddim_log_prob_reference(out_u, out_c, x_t, x_prev, guidance, coeffs)
    return ppo_clip_loss_reference(log_prob, old_log_prob, advantages, clip_range)


# ------------------------------------------------------------------------------------------------
# Triton kernels (layout and conventions as in kernels/cfg_ddim.py)
# ------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _ddpo_se_kernel(
        u_ptr,
        c_ptr,
        x_ptr,
        xp_ptr,
        part_ptr,
        cx_ptr,
        ceps_ptr,
        w_ptr,
        u_sb,
        c_sb,
        x_sb,
        xp_sb,
        cx_sb,
        ceps_sb,
        w_sb,
        N,
        COMPUTE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Stage 1: each program's partial sum of (x_prev - mean)^2 over one BLOCK of a sample's row.
        The mean is computed by the same expression as op 1's kernel, so that a stored step's log-prob
        is reproduced exactly."""
        blk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        w = tl.load(w_ptr + b * w_sb).to(COMPUTE)
        c_x = tl.load(cx_ptr + b * cx_sb).to(COMPUTE)
        c_eps = tl.load(ceps_ptr + b * ceps_sb).to(COMPUTE)
        u = tl.load(u_ptr + b * u_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + b * c_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + b * x_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        xp = tl.load(xp_ptr + b * xp_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        mean = c_x * x + c_eps * (u + w * (c - u))
        d = tl.where(mask, xp - mean, 0.0)
        tl.store(part_ptr + b * tl.num_programs(0) + blk, tl.sum(d * d, axis=0))

    @triton.jit
    def _ddpo_clip_finish_kernel(
        part_ptr,
        sigma_ptr,
        old_ptr,
        adv_ptr,
        lp_ptr,
        ratio_ptr,
        dlp_ptr,
        loss_ptr,
        kl_ptr,
        clipfrac_ptr,
        sigma_sb,
        old_sb,
        adv_sb,
        B,
        NB,
        N,
        clip_range,
        COMPUTE: tl.constexpr,
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
    ):
        """Stage 2, one program: per-sample log-prob, ratio and dloss/dlp, and the batch means.

        A single program walks the batch in a fixed order, so the loss and the statistics are
        deterministic and need no atomics or zeroed accumulators (B is at most a few hundred; the
        partials are B * 8 floats for SD latents)."""
        n = N * tl.full([], 1.0, COMPUTE)  # not N.to(): N == 1 is specialised to a constexpr
        # clip_range arrives as a float32 scalar: form the bounds in COMPUTE (1 - eps rounded to
        # float32 would be off by up to 3e-8, which the float64 tests would see).
        one = tl.full([], 1.0, COMPUTE)
        lo = one - clip_range
        hi = one + clip_range
        cols = tl.arange(0, COLS)
        loss_acc = tl.zeros([ROWS], dtype=COMPUTE)
        kl_acc = tl.zeros([ROWS], dtype=COMPUTE)
        clip_acc = tl.zeros([ROWS], dtype=COMPUTE)
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
            lp = gaussian_log_prob_from_se(se, n, sigma)
            old = tl.load(old_ptr + rows * old_sb, mask=rmask, other=0.0).to(COMPUTE)
            adv = tl.load(adv_ptr + rows * adv_sb, mask=rmask, other=0.0).to(COMPUTE)
            delta = tl.where(rmask, lp - old, 0.0)
            ratio = tl.exp(delta)
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
            # Gradient flows through the ratio only where the unclipped term is the max; where the
            # clipped term wins, the ratio sits outside [lo, hi] and clamp's gradient is 0.
            dlp = tl.where(unclipped >= clipped, unclipped, 0.0) / B
            tl.store(lp_ptr + rows, lp, mask=rmask)
            tl.store(ratio_ptr + rows, ratio, mask=rmask)
            tl.store(dlp_ptr + rows, dlp, mask=rmask)
            loss_acc += tl.where(rmask, tl.maximum(unclipped, clipped), 0.0)
            kl_acc += delta * delta
            clip_acc += tl.where(rmask & (tl.abs(ratio - 1.0) > clip_range), 1.0, 0.0)
        tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / B)
        tl.store(kl_ptr, 0.5 * tl.sum(kl_acc, axis=0) / B)
        tl.store(clipfrac_ptr, tl.sum(clip_acc, axis=0) / B)

    @triton.jit
    def _ddpo_clip_bwd_kernel(
        gloss_ptr,
        dlp_ptr,
        u_ptr,
        c_ptr,
        x_ptr,
        xp_ptr,
        gu_ptr,
        gc_ptr,
        gx_ptr,
        gxp_ptr,
        cx_ptr,
        ceps_ptr,
        sigma_ptr,
        w_ptr,
        u_sb,
        c_sb,
        x_sb,
        xp_sb,
        gu_sb,
        gc_sb,
        cx_sb,
        ceps_sb,
        sigma_sb,
        w_sb,
        N,
        WRITE_UC: tl.constexpr,
        WRITE_X: tl.constexpr,
        WRITE_XP: tl.constexpr,
        COMPUTE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """With k_b = dL/dloss * dloss/dlp_b / (sigma^2 N) and d = x_prev - mean (recomputed, not saved):
        dL/dmean = k d;  dL/du = c_eps (1 - w) k d,  dL/dc = c_eps w k d,  dL/dx_t = c_x k d,
        dL/dx_prev = -k d. Reads 4 latent tensors, writes 2 (4 when x_t, x_prev need gradients)."""
        blk = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        w = tl.load(w_ptr + b * w_sb).to(COMPUTE)
        c_x = tl.load(cx_ptr + b * cx_sb).to(COMPUTE)
        c_eps = tl.load(ceps_ptr + b * ceps_sb).to(COMPUTE)
        sigma = tl.load(sigma_ptr + b * sigma_sb).to(COMPUTE)
        # The loss's incoming gradient is read on the device: no .item(), no host sync.
        k = tl.load(gloss_ptr).to(COMPUTE) * tl.load(dlp_ptr + b).to(COMPUTE) / (sigma * sigma * N)
        u = tl.load(u_ptr + b * u_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        c = tl.load(c_ptr + b * c_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + b * x_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        xp = tl.load(xp_ptr + b * xp_sb + offs, mask=mask, other=0.0).to(COMPUTE)
        g_mean = k * (xp - c_x * x - c_eps * (u + w * (c - u)))
        if WRITE_UC:
            g_eps = c_eps * g_mean
            tl.store(gu_ptr + b * gu_sb + offs, g_eps - w * g_eps, mask=mask)
            tl.store(gc_ptr + b * gc_sb + offs, w * g_eps, mask=mask)
        if WRITE_X:
            tl.store(gx_ptr + b * N + offs, c_x * g_mean, mask=mask)
        if WRITE_XP:
            tl.store(gxp_ptr + b * N + offs, -g_mean, mask=mask)


def ddpo_forward_triton(out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, old_log_prob, advantages, clip_range):
    """Launches op 2's forward. Returns (loss, log_prob, ratio, dloss_dlp, approx_kl, clipfrac);
    dloss_dlp [B] is for the backward."""
    batch = x_t.shape[0]
    _op1.check_triton_device(_ddpo_se_kernel, out_u, out_c, x_t, x_prev)
    u, c = _op1._rows(out_u, batch), _op1._rows(out_c, batch)
    x, xp = _op1._rows(x_t, batch), _op1._rows(x_prev, batch)
    n = x.shape[1]
    cdt = _op1.compute_dtype(u, c, x, xp)
    dev = x.device
    (cx, cx_sb), (ce, ce_sb), (sg, sg_sb), (w, w_sb), (old, old_sb), (adv, adv_sb) = (
        _op1._per_sample_arg(v, batch, dev, cdt) for v in (c_x, c_eps, sigma, guidance, old_log_prob, advantages)
    )
    block, warps = _op1._launch_params(_ddpo_se_kernel, n)
    nb = triton.cdiv(n, block)
    part = _op1._empty((batch, nb), cdt, dev)
    _ddpo_se_kernel[(nb, batch)](
        u,
        c,
        x,
        xp,
        part,
        cx,
        ce,
        w,
        u.stride(0),
        c.stride(0),
        x.stride(0),
        xp.stride(0),
        cx_sb,
        ce_sb,
        w_sb,
        n,
        COMPUTE=_op1._tl_dtype(cdt),
        BLOCK=block,
        num_warps=warps,
    )
    log_prob, ratio, dlp = (_op1._empty((batch,), cdt, dev) for _ in range(3))
    loss, approx_kl, clipfrac = (_op1._empty((), cdt, dev) for _ in range(3))
    rows, cols = _op1.finish_rows_cols(batch, nb)
    _ddpo_clip_finish_kernel[(1,)](
        part,
        sg,
        old,
        adv,
        log_prob,
        ratio,
        dlp,
        loss,
        approx_kl,
        clipfrac,
        sg_sb,
        old_sb,
        adv_sb,
        batch,
        nb,
        n,
        float(clip_range),
        COMPUTE=_op1._tl_dtype(cdt),
        ROWS=rows,
        COLS=cols,
    )
    return loss, log_prob, ratio, dlp, approx_kl, clipfrac


def ddpo_backward_triton(
    grad_loss, dlp, out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, need_uc, need_x, need_xp
):
    """(grad_u, grad_c, grad_x_t, grad_x_prev) of op 2."""
    batch = x_t.shape[0]
    u, c = _op1._rows(out_u, batch), _op1._rows(out_c, batch)
    x, xp = _op1._rows(x_t, batch), _op1._rows(x_prev, batch)
    n = x.shape[1]
    cdt = _op1.compute_dtype(u, c, x, xp)
    dev = x.device
    (cx, cx_sb), (ce, ce_sb), (sg, sg_sb), (w, w_sb) = (
        _op1._per_sample_arg(v, batch, dev, cdt) for v in (c_x, c_eps, sigma, guidance)
    )
    grad_u = grad_c = grad_x = grad_xp = None
    if need_uc:
        grad_u, grad_c = _op1._empty(out_u.shape, out_u.dtype, dev), _op1._empty(out_c.shape, out_c.dtype, dev)
        gu, gc = grad_u.view(batch, n), grad_c.view(batch, n)
    else:
        gu = gc = x  # placeholders, never written
    if need_x:
        grad_x = _op1._empty(x_t.shape, x_t.dtype, dev)
    if need_xp:
        grad_xp = _op1._empty(x_prev.shape, x_prev.dtype, dev)
    block, warps = _op1._launch_params(_ddpo_clip_bwd_kernel, n)
    _ddpo_clip_bwd_kernel[(triton.cdiv(n, block), batch)](
        grad_loss,
        dlp,
        u,
        c,
        x,
        xp,
        gu,
        gc,
        grad_x if need_x else x,
        grad_xp if need_xp else x,
        cx,
        ce,
        sg,
        w,
        u.stride(0),
        c.stride(0),
        x.stride(0),
        xp.stride(0),
        gu.stride(0),
        gc.stride(0),
        cx_sb,
        ce_sb,
        sg_sb,
        w_sb,
        n,
        WRITE_UC=need_uc,
        WRITE_X=need_x,
        WRITE_XP=need_xp,
        COMPUTE=_op1._tl_dtype(cdt),
        BLOCK=block,
        num_warps=warps,
    )
    return grad_u, grad_c, grad_x, grad_xp


class DdpoClipLossFunction(torch.autograd.Function):
    """Op 2 on the Triton kernels.

    forward(out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, old_log_prob, advantages, clip_range)
    -> (loss, log_prob, ratio, approx_kl, clipfrac); only the loss is differentiable. out_u and out_c
    may be views of one buffer or one tensor passed twice (autograd adds their two gradients).

    Saved for backward: the four latent-sized inputs (references to tensors the caller holds anyway:
    the UNet outputs live in the graph already, x_t and x_prev in the rollout buffer; no copy) and
    dloss/dlp [B]; the deviation x_prev - mean is recomputed rather than stored, which costs one
    extra read of the inputs but no latent-sized buffer. Gradients reach out_u, out_c and, if they
    require it, x_t and x_prev; coefficients, guidance, old log-probs and advantages are constants.
    """

    @staticmethod
    def forward(ctx, out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, old_log_prob, advantages, clip_range):
        loss, log_prob, ratio, dlp, approx_kl, clipfrac = ddpo_forward_triton(
            out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, old_log_prob, advantages, clip_range
        )
        ctx.save_for_backward(out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, dlp)
        ctx.mark_non_differentiable(log_prob, ratio, approx_kl, clipfrac)
        ctx.set_materialize_grads(False)
        return loss, log_prob, ratio, approx_kl, clipfrac

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if grad_loss is None:
            return (None,) * 11
        out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, dlp = ctx.saved_tensors
        need_u, need_c, need_x, need_xp = ctx.needs_input_grad[:4]
        grad_u, grad_c, grad_x, grad_xp = ddpo_backward_triton(
            grad_loss, dlp, out_u, out_c, x_t, x_prev, guidance, c_x, c_eps, sigma, need_u or need_c, need_x, need_xp
        )
        return (grad_u if need_u else None, grad_c if need_c else None, grad_x, grad_xp) + (None,) * 7
