"""Both fused ops (kernels/) against their eager reference computed in float64.

On a machine without CUDA the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set
below before anything imports `kernels`); with CUDA the same tests run on the GPU, plus half precision
and a no-host-sync check. Inputs are fresh random draws on every run (the seed is printed, so a
failure can be replayed with DIFFEXP_TEST_SEED=<seed>), and every buffer the kernels write is
NaN-filled first, so an element a kernel forgets to write fails the comparison.
"""

import os

import torch

if not torch.cuda.is_available():
    # Read when @triton.jit decorates the kernels, i.e. when `kernels` is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402

import kernels  # noqa: E402
from kernels import DDIMCoefficients, DDIMSchedule  # noqa: E402
from kernels import cfg_ddim as op1  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# float64 runs through Triton only under the interpreter (on CUDA it is not a target dtype).
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16] + ([] if CUDA else [torch.float64])
# Relative tolerance of a latent-sized output stored in each dtype, against float64.
OUT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Arithmetic runs in float32 for every dtype but float64.
ACC_TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}

requires_triton = pytest.mark.skipif(op1.triton is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def _triton_ready():
    if op1.triton is not None and not CUDA and not op1.is_interpreted(op1._cfg_ddim_fwd_kernel):
        pytest.fail("`kernels` was imported before TRITON_INTERPRET=1 was set: set it in tests/conftest.py")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output buffer starts NaN-filled."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(op1, "_empty", nan_empty)


@pytest.fixture
def gen():
    seed = int(os.environ.get("DIFFEXP_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"DIFFEXP_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def ragged_blocks(monkeypatch):
    """Several blocks per sample row, the last one partial (no row length here is a multiple of 128)."""
    monkeypatch.setattr(op1, "BLOCK_OVERRIDE", 128)


def sd_schedule(device=DEVICE, prediction_type="epsilon"):
    """SD 1.x's DDIM schedule for 50 steps (scaled-linear betas, final alpha = alphas_cumprod[0])."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    return DDIMSchedule(torch.cat([ab, ab[:1]]).to(device), 1000 // 50, 1000, prediction_type)


def randn(shape, gen, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=DEVICE, dtype=dtype)


def make_coeffs(batch, gen, dtype, eta=1.0, prediction_type="epsilon"):
    """Coefficients at random per-sample timesteps of the 50-step schedule, always including the
    first (t = 981) and the last (t = 1, smallest sigma) when the batch allows."""
    t = 1 + 20 * torch.randint(0, 50, (batch,), generator=gen)
    t[0] = 1
    t[-1] = 981 if batch > 1 else t[-1]
    coef_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return sd_schedule(prediction_type=prediction_type).coefficients(t.to(DEVICE), eta, dtype=coef_dtype)


def f64(t):
    return None if t is None else t.detach().to(torch.float64)


def coeffs64(co):
    return DDIMCoefficients(f64(co.c_x), f64(co.c_eps), f64(co.sigma), co.eta)


def guidance_for(batch, gen, per_sample, dtype):
    if not per_sample:
        return 7.5
    return (1.0 + 6.5 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(
        DEVICE, torch.float64 if dtype == torch.float64 else torch.float32
    )


def assert_close(actual, expected, tol, what):
    # Half-precision outputs whose values are subnormal (|x| < 6.1e-5 in fp16) carry an absolute
    # rounding error of up to half their fixed spacing, whatever the relative tolerance says.
    floor = (
        torch.finfo(actual.dtype).smallest_normal * torch.finfo(actual.dtype).eps
        if actual.dtype in (torch.float16, torch.bfloat16)
        else 0.0
    )
    actual, expected = f64(actual).cpu(), f64(expected).cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN (an unwritten element?)"
    scale = expected.abs().max().item() + 1e-30
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale + floor, (
        f"{what}: max abs error {err:.3g} > {tol:g} x max |expected| {scale:.3g} + {floor:.3g}"
    )


def step_inputs(shape, gen, dtype, out_dtype=None):
    """The UNet output [2B, ...] of an ordinary CFG call and the .chunk(2) halves diffusion.cfg_unet
    returns of it (views of one buffer), x_t and z."""
    batch = shape[0]
    model_out = randn((2 * batch, *shape[1:]), gen, out_dtype or dtype)
    return model_out, model_out[:batch], model_out[batch:], randn(shape, gen, dtype), randn(shape, gen, dtype)


def halves(model_out, shared):
    """(out_u, out_c) as diffusion.cfg_unet returns them from the UNet output: its two .chunk(2) views,
    or, where every sample's guidance is 1 and only the conditional half ran, the one tensor twice."""
    return (model_out, model_out) if shared else model_out.chunk(2)


def loss_inputs(shape, gen, dtype, ratios=None, clip_range=1e-4, shared=False, w=None):
    """A DDPO minibatch: x_prev drawn from the step's own distribution, the model moved a little since
    (so log-probs change), old log-probs chosen to give `ratios` (default: spread around the clip
    range, inside and outside) and advantages of both signs. shared: cfg_unet's w = 1 shortcut (one
    [B, ...] output as both halves; guidance 1 unless `w` says otherwise)."""
    batch = shape[0]
    co = make_coeffs(batch, gen, dtype)
    if w is None:
        w = (
            torch.ones(batch, device=DEVICE, dtype=f64(co.c_x).dtype)
            if shared
            else guidance_for(batch, gen, True, dtype)
        )
    model_out, _, _, x_t, z = step_inputs(shape, gen, dtype)
    if shared:
        model_out = model_out[:batch].clone()
    out_u, out_c = halves(model_out, shared)
    x_prev = kernels.cfg_ddim_step_reference(f64(out_u), f64(out_c), f64(x_t), f64(w), coeffs64(co), f64(z))
    model_out = (f64(model_out) + randn(model_out.shape, gen, torch.float64, 1e-3)).to(dtype)
    out_u, out_c = halves(model_out, shared)
    x_prev = x_prev.to(dtype)
    lp = kernels.ddim_log_prob_reference(f64(out_u), f64(out_c), f64(x_t), f64(x_prev), f64(w), coeffs64(co))
    if ratios is None:
        # |log r| in (0.2, 0.8) or (1.2, 4) clip ranges: inside and outside, never so close to the
        # boundary that float32 rounding could flip a sample's branch (its gradient is discontinuous).
        inside = torch.rand(batch, generator=gen) < 0.5
        mag = torch.where(
            inside, 0.2 + 0.6 * torch.rand(batch, generator=gen), 1.2 + 2.8 * torch.rand(batch, generator=gen)
        )
        sign = torch.where(torch.rand(batch, generator=gen) < 0.5, -1.0, 1.0)
        log_r = (clip_range * mag * sign).to(torch.float64)
    else:
        log_r = torch.log(torch.as_tensor(ratios, dtype=torch.float64))
    old = (lp - log_r.to(DEVICE)).to(torch.float32 if dtype != torch.float64 else dtype)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    adv = torch.where(torch.arange(batch) % 2 == 0, adv.abs(), -adv.abs()).to(DEVICE, old.dtype)
    return dict(
        model_out=model_out,
        shared=shared,
        out_u=out_u,
        out_c=out_c,
        x_t=x_t,
        x_prev=x_prev,
        w=w,
        co=co,
        old=old,
        adv=adv,
    )


# ------------------------------------------------------------------------------------------------
# Op 1: CFG + DDIM step
# ------------------------------------------------------------------------------------------------


@requires_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 17, 19), (1, 4, 17, 19), (5, 3, 7, 11)], ids=lambda s: "x".join(map(str, s)))
def test_step_values_and_grads(dtype, shape, gen, request):
    """x_prev, the log-prob and the gradients (of x_t and of the UNet output) for what cfg_unet returns:
    the .chunk(2) halves of one [2B, ...] output at per-sample guidance, and the w = 1 shortcut's one
    tensor passed twice at a scalar guidance of 1."""
    if shape[0] != 1:  # batch 1 runs with the default block: one per row under the interpreter
        request.getfixturevalue("ragged_blocks")
    batch = shape[0]
    co = make_coeffs(batch, gen, dtype)
    for shared in (False, True):
        model_out, _, _, x_t, z = step_inputs(shape, gen, dtype)
        if shared:
            model_out = model_out[:batch].clone()
        w = 1.0 if shared else guidance_for(batch, gen, True, dtype)
        leaves = [t.detach().requires_grad_() for t in (model_out, x_t)]
        x_prev, lp = kernels.cfg_ddim_step(*halves(leaves[0], shared), leaves[1], w, co, z, True, backend="triton")
        assert x_prev.dtype == dtype and x_prev.shape == x_t.shape
        assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lp.shape == (batch,)

        ref_leaves = [f64(t).requires_grad_() for t in leaves]
        ref_u, ref_c = halves(ref_leaves[0], shared)
        w64 = torch.as_tensor(w, dtype=torch.float64, device=DEVICE)
        ref_x_prev = kernels.cfg_ddim_step_reference(ref_u, ref_c, ref_leaves[-1], w64, coeffs64(co), f64(z))
        assert_close(x_prev, ref_x_prev, OUT_TOL[dtype], f"x_prev ({dtype}, shared={shared})")
        # The log-prob is that of the x_prev as stored (see the kernel): compare with the reference's
        # log-prob of that stored x_prev.
        ref_lp = kernels.ddim_log_prob_reference(f64(ref_u), f64(ref_c), f64(x_t), f64(x_prev), w64, coeffs64(co))
        assert_close(lp, ref_lp, ACC_TOL[dtype], f"log_prob ({dtype})")

        g = randn(x_t.shape, gen, dtype)
        grads = torch.autograd.grad(x_prev, leaves, g)
        ref_grads = torch.autograd.grad(ref_x_prev, ref_leaves, f64(g))
        for name, a, e in zip(("UNet output", "x_t"), grads, ref_grads):
            assert a.dtype == dtype and a.shape == e.shape
            assert_close(a, e, OUT_TOL[dtype], f"grad {name} ({dtype}, shared={shared})")


@requires_triton
def test_step_mixed_dtypes_and_strides(gen, ragged_blocks):
    """A half-precision UNet output with float32 latents, and inputs that are not plain contiguous:
    a batch-strided view (read in place) and channels_last (copied to rows once)."""
    shape = (3, 4, 9, 13)
    co = make_coeffs(3, gen, torch.float32)
    w = guidance_for(3, gen, True, torch.float32)
    _, out_u, out_c, x_t, z = step_inputs(shape, gen, torch.float32, out_dtype=torch.float16)
    x_big = randn((6, *shape[1:]), gen)
    x_strided = x_big[::2]  # batch stride 2 N
    z_cl = z.to(memory_format=torch.channels_last)
    x_prev = kernels.cfg_ddim_step(out_u, out_c, x_strided, w, co, z_cl, backend="triton")
    assert x_prev.dtype == torch.float32
    ref = kernels.cfg_ddim_step_reference(f64(out_u), f64(out_c), f64(x_strided), f64(w), coeffs64(co), f64(z))
    assert_close(x_prev, ref, OUT_TOL[torch.float32], "x_prev, mixed dtypes and strides")


@requires_triton
def test_step_deterministic_and_eta0(gen):
    """noise=None gives the mean (the eta = 0 step AlignProp samples with); its gradient too."""
    shape = (2, 4, 8, 8)
    co = make_coeffs(2, gen, torch.float32, eta=0.0)
    _, out_u, out_c, x_t, _ = step_inputs(shape, gen, torch.float32)
    x_t.requires_grad_()
    x_prev = kernels.cfg_ddim_step(out_u, out_c, x_t, 5.0, co, backend="triton")
    ref = kernels.cfg_ddim_step_reference(
        f64(out_u), f64(out_c), f64(x_t).requires_grad_(), torch.tensor(5.0, dtype=torch.float64), coeffs64(co)
    )
    assert_close(x_prev, ref, OUT_TOL[torch.float32], "deterministic x_prev")
    (gx,) = torch.autograd.grad(x_prev.sum(), x_t)  # an expanded (stride-0) incoming gradient
    assert_close(gx, co.c_x.reshape(-1, 1, 1, 1).expand(shape), 1e-6, "grad x_t of the mean")


def test_step_log_prob_refusals(gen):
    shape = (2, 4, 8, 8)
    _, out_u, out_c, x_t, z = step_inputs(shape, gen, torch.float32)
    for backend in ("eager",) + (("triton",) if op1.triton is not None else ()):
        with pytest.raises(ValueError, match="eta"):
            kernels.cfg_ddim_step(
                out_u, out_c, x_t, 5.0, make_coeffs(2, gen, torch.float32, eta=0.0), z, True, backend=backend
            )
        with pytest.raises(ValueError, match="noise"):
            kernels.cfg_ddim_step(
                out_u, out_c, x_t, 5.0, make_coeffs(2, gen, torch.float32), None, True, backend=backend
            )
        with pytest.raises(ValueError, match="shape"):
            kernels.cfg_ddim_step(out_u, out_c[:1], x_t, 5.0, make_coeffs(2, gen, torch.float32), backend=backend)
        with pytest.raises(ValueError, match="eta"):
            kernels.ddpo_clip_loss(
                out_u,
                out_c,
                x_t,
                z,
                5.0,
                make_coeffs(2, gen, torch.float32, eta=0.0),
                torch.zeros(2),
                torch.ones(2),
                1e-4,
                backend=backend,
            )


@requires_triton
@pytest.mark.skipif(CUDA, reason="float64 through Triton is checked under the interpreter only")
def test_step_gradcheck_triton():
    gen = torch.Generator().manual_seed(0)
    co = make_coeffs(2, gen, torch.float64)
    w = guidance_for(2, gen, True, torch.float64)
    model_out, out_u, out_c, x_t, z = step_inputs((2, 2, 3, 5), gen, torch.float64)
    u, c, x = (t.detach().requires_grad_() for t in (out_u, out_c, x_t))
    assert torch.autograd.gradcheck(
        lambda u, c, x: kernels.cfg_ddim_step(u, c, x, w, co, z, backend="triton"), (u, c, x)
    )
    # One tensor as both halves (cfg_unet's w = 1 shortcut), here at guidance != 1 so that both
    # halves' gradients are non-zero and must be added.
    assert torch.autograd.gradcheck(lambda c, x: kernels.cfg_ddim_step(c, c, x, w, co, z, backend="triton"), (c, x))


def test_step_gradcheck_eager():
    gen = torch.Generator().manual_seed(1)
    co = make_coeffs(2, gen, torch.float64)
    w = guidance_for(2, gen, True, torch.float64)
    model_out, out_u, out_c, x_t, z = step_inputs((2, 2, 3, 5), gen, torch.float64)
    u, c, x = (t.detach().requires_grad_() for t in (out_u, out_c, x_t))
    assert torch.autograd.gradcheck(
        lambda u, c, x: kernels.cfg_ddim_step(u, c, x, w, co, z, backend="eager"), (u, c, x)
    )


@requires_triton
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_diffusers(prediction_type, gen):
    """README, The method: x_prev equals DDIMScheduler.step(..., eta, variance_noise=z), first to last step."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )
    sched.set_timesteps(50)
    schedule = DDIMSchedule.from_scheduler(sched, 50, DEVICE)
    shape = (2, 4, 8, 8)
    for t in (sched.timesteps[0], sched.timesteps[25], sched.timesteps[-1]):
        _, out_u, out_c, x_t, z = step_inputs(shape, gen, torch.float32)
        co = schedule.coefficients(torch.full((2,), int(t), device=DEVICE), eta=1.0)
        x_prev = kernels.cfg_ddim_step(out_u, out_c, x_t, 7.5, co, z, backend="triton")
        eps = out_u + 7.5 * (out_c - out_u)
        expected = sched.step(eps.cpu(), t, x_t.cpu(), eta=1.0, variance_noise=z.cpu()).prev_sample
        assert_close(x_prev, expected, 2e-5, f"x_prev vs diffusers at t={int(t)} ({prediction_type})")


@requires_triton
def test_cfg_halves_are_read_in_place(gen):
    """The .chunk(2) halves of the UNet output reach the kernels as row views of it, not copies."""
    model_out = randn((6, 4, 5, 7), gen)
    u, c = (op1._rows(h, 3) for h in model_out.chunk(2))
    assert u.data_ptr() == model_out.data_ptr()
    assert c.data_ptr() == model_out.data_ptr() + 3 * 4 * 5 * 7 * model_out.element_size()


# ------------------------------------------------------------------------------------------------
# Op 2: DDPO log-prob + clipped objective
# ------------------------------------------------------------------------------------------------


def _ref_loss(inp, clip_range, leaves):
    """The float64 reference on float64 copies of `leaves` (the UNet output, or its two halves),
    returning (loss, stats, ref leaves)."""
    ref_leaves = [f64(t).requires_grad_() for t in leaves]
    ref_u, ref_c = halves(ref_leaves[0], inp["shared"]) if len(leaves) == 1 else ref_leaves
    loss, stats = kernels.ddpo_clip_loss_reference(
        ref_u,
        ref_c,
        f64(inp["x_t"]),
        f64(inp["x_prev"]),
        f64(inp["w"]),
        coeffs64(inp["co"]),
        f64(inp["old"]),
        f64(inp["adv"]),
        clip_range,
    )
    return loss, stats, ref_leaves


def _triton_loss(inp, clip_range, leaves):
    out_u, out_c = halves(leaves[0], inp["shared"]) if len(leaves) == 1 else leaves
    return kernels.ddpo_clip_loss(
        out_u,
        out_c,
        inp["x_t"],
        inp["x_prev"],
        inp["w"],
        inp["co"],
        inp["old"],
        inp["adv"],
        clip_range,
        backend="triton",
    )


@requires_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 4, 17, 19), (1, 4, 17, 19), (5, 3, 7, 11)], ids=lambda s: "x".join(map(str, s)))
def test_loss_values_and_grads(dtype, shape, gen, request):
    if shape[0] != 1:  # batch 1 runs with the default block: one per row under the interpreter
        request.getfixturevalue("ragged_blocks")
    """The loss, its statistics and the gradient of the UNet output, for the .chunk(2) halves of one
    [2B, ...] output at per-sample guidance and for the w = 1 shortcut's one tensor passed twice."""
    clip_range = 1e-4
    for shared in (False, True):
        inp = loss_inputs(shape, gen, dtype, clip_range=clip_range, shared=shared)
        leaves = [inp["model_out"].detach().requires_grad_()]
        loss, stats = _triton_loss(inp, clip_range, leaves)
        ref_loss, ref_stats, ref_leaves = _ref_loss(inp, clip_range, leaves)
        assert loss.shape == () and loss.requires_grad
        assert set(stats) == {"log_prob", "ratio", "approx_kl", "clipfrac"}
        assert all(not s.requires_grad for s in stats.values())
        tol = ACC_TOL[dtype]
        assert_close(stats["log_prob"], ref_stats["log_prob"], tol, "log_prob")
        assert_close(stats["ratio"], ref_stats["ratio"], tol, "ratio")
        assert_close(loss, ref_loss, 10 * tol, f"loss ({dtype}, shared={shared})")
        # approx_kl is a mean of squared log-prob differences (~1e-8 here): compare its root, the RMS
        # difference, against the log-prob's own error.
        rms, ref_rms = (torch.sqrt(2 * f64(k)).item() for k in (stats["approx_kl"], ref_stats["approx_kl"]))
        assert abs(rms - ref_rms) <= tol * ref_stats["log_prob"].abs().max().item(), "approx_kl"
        assert_close(stats["clipfrac"], ref_stats["clipfrac"], 1e-6, "clipfrac")
        grads = torch.autograd.grad(loss, leaves)
        ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
        for a, e in zip(grads, ref_grads):
            assert a.dtype == dtype and a.shape == e.shape
            assert_close(a, e, max(OUT_TOL[dtype], 10 * tol), f"loss grad ({dtype}, shared={shared})")


@requires_triton
def test_loss_clipping_branches(gen, ragged_blocks):
    """Ratios inside and outside the clip range, above and below, with both advantage signs: the
    loss, the per-sample gradients (exactly zero where the clipped term wins) and clipfrac."""
    clip_range = 0.05
    ratios = [0.5, 0.5, 0.99, 0.99, 1.01, 1.01, 1.5, 1.5]
    inp = loss_inputs((8, 3, 7, 11), gen, torch.float32, ratios=ratios, clip_range=clip_range)
    adv = inp["adv"]  # alternating signs: + - + - ...
    leaves = [inp["out_u"].detach().requires_grad_(), inp["out_c"].detach().requires_grad_()]
    loss, stats = _triton_loss(inp, clip_range, leaves)
    ref_loss, ref_stats, ref_leaves = _ref_loss(inp, clip_range, leaves)
    assert_close(stats["ratio"], torch.tensor(ratios, dtype=torch.float64), 1e-5, "ratios as constructed")
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert stats["clipfrac"].item() == pytest.approx(0.5) == ref_stats["clipfrac"].item()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, 1e-5, "grad")
    # The clipped term wins (no gradient) for r < 1 - eps with A < 0 and for r > 1 + eps with A > 0.
    r, a = torch.tensor(ratios), adv.cpu()
    clipped_wins = ((r < 1 - clip_range) & (a < 0)) | ((r > 1 + clip_range) & (a > 0))
    assert clipped_wins.tolist() == [False, True, False, False, False, False, True, False]
    per_sample = grads[1].flatten(1).abs().amax(1).cpu()
    assert (per_sample[clipped_wins] == 0).all() and (per_sample[~clipped_wins] > 0).all()


# The hand-computed case: eps = 0.2,
#   r   = 1.5   0.5   1.1   0.7   0.5   1.5
#   A   = 1     -1    2     -2    1     -2
#   -A r        = -1.5  0.5  -2.2  1.4  -0.5  3.0
#   -A clip(r)  = -1.2  0.8  -2.2  1.6  -0.8  2.4
#   max         = -1.2  0.8  -2.2  1.6  -0.5  3.0   -> loss = 1.5 / 6 = 0.25
#   dloss/dlp   =  0    0    -2.2/6  0  -0.5/6  3.0/6   (-A r / B where the unclipped term wins)
#   clipfrac = 5/6 (all but 1.1);  approx_kl = 0.5 mean(log(r)^2)
HAND_R = [1.5, 0.5, 1.1, 0.7, 0.5, 1.5]
HAND_A = [1.0, -1.0, 2.0, -2.0, 1.0, -2.0]
HAND_LOSS = 0.25
HAND_DLP = [0.0, 0.0, -2.2 / 6, 0.0, -0.5 / 6, 0.5]
HAND_CLIPFRAC = 5 / 6
HAND_KL = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2 + math.log(0.7) ** 2) / 6


def test_clipped_objective_by_hand():
    lp = torch.log(torch.tensor(HAND_R, dtype=torch.float64)).requires_grad_()
    loss, stats = kernels.ppo_clip_loss_reference(
        lp, torch.zeros(6, dtype=torch.float64), torch.tensor(HAND_A, dtype=torch.float64), 0.2
    )
    assert loss.item() == pytest.approx(HAND_LOSS, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(HAND_CLIPFRAC, abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(HAND_KL, abs=1e-12)
    (g,) = torch.autograd.grad(loss, lp)
    assert g.tolist() == pytest.approx(HAND_DLP, abs=1e-12)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32] + ([] if CUDA else [torch.float64]), ids=str)
def test_clipped_objective_by_hand_triton(dtype):
    """The same case through the fused kernel, built so the log-prob is known in closed form:
    out_u = out_c = x_t = 0 makes the mean 0, and x_prev = sigma z with z = +-1 makes
    mean_CHW((x_prev - mean)^2) / sigma^2 = 1, so lp = -0.5 - log(sigma) - 0.5 log(2 pi) exactly.
    Then dL/dout_c = dloss/dlp * c_eps * w * z / (sigma N)."""
    B, shape = 6, (6, 3, 5, 7)
    n = 3 * 5 * 7
    gen = torch.Generator().manual_seed(2)
    co = make_coeffs(B, gen, dtype)
    sigma = f64(co.sigma)
    z = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0).to(DEVICE, torch.float64)
    x_prev = (sigma.reshape(-1, 1, 1, 1) * z).to(dtype)
    sigma_eff = x_prev.to(torch.float64).flatten(1).pow(2).mean(1).sqrt()  # sigma after rounding x_prev
    lp = -0.5 * (sigma_eff / sigma) ** 2 - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    old = (lp - torch.log(torch.tensor(HAND_R, dtype=torch.float64, device=DEVICE))).to(dtype)
    zeros = torch.zeros(shape, dtype=dtype, device=DEVICE)
    u, c = zeros.clone().requires_grad_(), zeros.clone().requires_grad_()
    w = 3.0
    loss, stats = kernels.ddpo_clip_loss(
        u, c, zeros, x_prev, w, co, old, torch.tensor(HAND_A, device=DEVICE, dtype=dtype), 0.2, backend="triton"
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert loss.item() == pytest.approx(HAND_LOSS, abs=tol)
    assert stats["clipfrac"].item() == pytest.approx(HAND_CLIPFRAC, abs=tol)
    assert stats["approx_kl"].item() == pytest.approx(HAND_KL, abs=tol)
    assert stats["ratio"].tolist() == pytest.approx(HAND_R, abs=tol)
    (gc,) = torch.autograd.grad(loss, c)
    dlp = torch.tensor(HAND_DLP, dtype=torch.float64, device=DEVICE).reshape(-1, 1, 1, 1)
    expected = dlp * f64(co.c_eps).reshape(-1, 1, 1, 1) * w * f64(x_prev) / (sigma.reshape(-1, 1, 1, 1) ** 2 * n)
    assert_close(gc, expected, 10 * tol, "hand-computed gradient")


@requires_triton
@pytest.mark.skipif(CUDA, reason="float64 through Triton is checked under the interpreter only")
def test_loss_gradcheck_triton():
    """gradcheck of the fused loss wrt out_u, out_c, x_t and x_prev, with ratios clear of the kinks."""
    gen = torch.Generator().manual_seed(3)
    # Advantages alternate +, -, +: r = 0.8 takes the unclipped branch, 1.03 is inside the range and
    # 1.3 the clipped branch (zero gradient). Small rows: each gradcheck evaluation is two launches.
    inp = loss_inputs((3, 1, 2, 2), gen, torch.float64, ratios=[0.8, 1.03, 1.3], clip_range=0.1)
    co, w, old, adv = inp["co"], inp["w"], inp["old"], inp["adv"]

    def f(u, c, x, xp):
        return kernels.ddpo_clip_loss(u, c, x, xp, w, co, old, adv, 0.1, backend="triton")[0]

    args = tuple(inp[k].detach().requires_grad_() for k in ("out_u", "out_c", "x_t", "x_prev"))
    assert torch.autograd.gradcheck(f, args)

    # One tensor as both halves (cfg_unet's w = 1 shortcut), at guidance != 1 so both gradients count.
    inp = loss_inputs((3, 1, 2, 2), gen, torch.float64, ratios=[0.8, 1.03, 1.3], clip_range=0.1, shared=True, w=w)
    co, old, adv = inp["co"], inp["old"], inp["adv"]

    def g(m, x):
        return kernels.ddpo_clip_loss(m, m, x, inp["x_prev"], w, co, old, adv, 0.1, backend="triton")[0]

    args = (inp["model_out"].detach().requires_grad_(), inp["x_t"].detach().requires_grad_())
    assert torch.autograd.gradcheck(g, args)


def test_loss_gradcheck_eager():
    gen = torch.Generator().manual_seed(4)
    inp = loss_inputs((4, 2, 3, 5), gen, torch.float64, ratios=[0.8, 0.98, 1.03, 1.3], clip_range=0.1)

    def f(u, c):
        return kernels.ddpo_clip_loss(
            u, c, inp["x_t"], inp["x_prev"], inp["w"], inp["co"], inp["old"], inp["adv"], 0.1, backend="eager"
        )[0]

    assert torch.autograd.gradcheck(f, (inp["out_u"].detach().requires_grad_(), inp["out_c"].detach().requires_grad_()))


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sampling_and_training_log_probs_agree(dtype, gen):
    """The consistency rule (README, The method) at the kernel level: op 2 on the step op 1 just took, with the
    same model outputs, gives ratio 1 and loss -mean(A), bf16 included."""
    shape = (3, 4, 9, 13)
    co = make_coeffs(3, gen, dtype)
    w = guidance_for(3, gen, True, dtype)
    _, out_u, out_c, x_t, z = step_inputs(shape, gen, dtype)
    x_prev, lp = kernels.cfg_ddim_step(out_u, out_c, x_t, w, co, z, True, backend="triton")
    adv = torch.randn(3, generator=gen).to(DEVICE)
    loss, stats = kernels.ddpo_clip_loss(out_u, out_c, x_t, x_prev, w, co, lp, adv, 1e-4, backend="triton")
    assert_close(stats["log_prob"], lp, 1e-6, "recomputed log-prob")
    assert (stats["ratio"] - 1).abs().max().item() < 1e-6
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0


# ------------------------------------------------------------------------------------------------
# Dispatcher
# ------------------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch, gen):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("DIFFEXP_KERNELS", raising=False)
    assert kernels.resolve_backend(None, x) == "eager"  # auto on CPU
    assert kernels.resolve_backend("eager", x) == "eager"
    monkeypatch.setenv("DIFFEXP_KERNELS", "eager")
    assert kernels.resolve_backend(None, x) == "eager"
    assert kernels.resolve_backend("auto", x) == "eager"
    if op1.triton is not None:
        monkeypatch.setenv("DIFFEXP_KERNELS", "triton")
        assert kernels.resolve_backend(None, x) == "triton"
        if CUDA:
            assert kernels.resolve_backend("auto", x.cuda()) == "triton"
            assert kernels.resolve_backend("auto", x.cuda().double()) == "eager"
    monkeypatch.setenv("DIFFEXP_KERNELS", "fast")
    with pytest.raises(ValueError, match="DIFFEXP_KERNELS"):
        kernels.resolve_backend(None, x)
    # The eager path is the reference itself.
    monkeypatch.setenv("DIFFEXP_KERNELS", "eager")
    co = make_coeffs(2, gen, torch.float32)
    _, u, c, x_t, z = step_inputs((2, 4, 5, 6), gen, torch.float32)
    w = torch.tensor([2.0, 6.0], device=DEVICE)
    a = kernels.cfg_ddim_step(u, c, x_t, w, co, z, True)
    b = kernels.cfg_ddim_step_reference(u, c, x_t, w, co, z, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_no_host_sync_in_loop():
    """A multi-step DDPO-style loop (sampling with log-probs, then loss forward and backward) under
    torch.cuda.set_sync_debug_mode('error'): any host-device sync raises."""
    gen = torch.Generator().manual_seed(5)
    shape = (4, 4, 64, 64)
    schedule = sd_schedule()
    model_out = randn((8, 4, 64, 64), gen).requires_grad_()
    x = randn(shape, gen)
    adv = randn((4,), gen)
    t_all = (1 + 20 * torch.arange(49, -1, -1)).to(DEVICE)
    # Warm up (compiles the kernels) outside the checked region.
    co = schedule.coefficients(t_all[:1].expand(4), 1.0)
    u, c = model_out.detach().chunk(2)
    x1, lp = kernels.cfg_ddim_step(u, c, x, 7.5, co, torch.randn_like(x), True, backend="triton")
    kernels.ddpo_clip_loss(*model_out.chunk(2), x, x1, 7.5, co, lp, adv, 1e-4, backend="triton")[0].backward()
    kernels.cfg_ddim_step(*model_out.chunk(2), x, 7.5, co, torch.randn_like(x), backend="triton").sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(5):
            co = schedule.coefficients(t_all[i].expand(4), 1.0)
            w = torch.where(t_all[i] >= 800, 1.0, 7.5).expand(4)  # DiffExp's dynamic CFG, on the device
            x_next, lp = kernels.cfg_ddim_step(
                *model_out.detach().chunk(2), x, w, co, torch.randn_like(x), True, backend="triton"
            )
            loss, stats = kernels.ddpo_clip_loss(*model_out.chunk(2), x, x_next, w, co, lp, adv, 1e-4, backend="triton")
            loss.backward()
            x_step = kernels.cfg_ddim_step(*model_out.chunk(2), x, w, co, torch.randn_like(x), backend="triton")
            x_step.sum().backward()
            x = x_next
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------------
# Benchmark script
# ------------------------------------------------------------------------------------------------


@requires_triton
def test_bench_cpu_smoke_prints_the_table():
    """`kernels/bench.py --cpu-smoke` runs the benchmark's own code on tiny shapes (Triton through the
    interpreter) to the end: a row per op mode, input layout (cfg_unet's CFG halves, its w = 1 tensor
    passed twice), batch and dtype with a time for each backend, the end-to-end loops and the targets."""
    from conftest import run_script

    out = run_script("kernels/bench.py", "--cpu-smoke", "--no-compile", timeout=300).stdout
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    modes = ("op1 fwd", "op1 fwd+lp", "op1 fwd+bwd", "op2 fwd", "op2 fwd+bwd")
    rows = {(r[0], r[1], r[2], r[4]): r for r in cells if r[0] in modes}
    expected = {(m, i, b, d) for m in modes for i in ("halves", "w=1") for b in ("1", "2") for d in ("fp32", "bf16")}
    assert set(rows) == expected, out
    for r in rows.values():
        eager_ms, triton_ms = float(r[5]), float(r[7])
        assert eager_ms > 0 and triton_ms > 0, r
    loops = {r[0]: r for r in cells if r[0] in ("sampling step", "DDPO train step")}
    assert set(loops) == {"sampling step", "DDPO train step"}, out
    assert all(float(v) > 0 for r in loops.values() for v in r[1:4]), out
    assert "\nTargets:" in out
