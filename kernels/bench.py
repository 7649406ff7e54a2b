"""Benchmark of the kernels entry points the trainers call, Triton against the eager fallback and torch.compile of it.

    python kernels/bench.py                 # the full table, then the end-to-end section
    python kernels/bench.py --quick         # batch 8 and 64 of 4x64x64 only
    python kernels/bench.py --no-compile --no-e2e
    python kernels/bench.py --cpu-smoke     # checks this script on CPU (interpreter, tiny shapes); timings meaningless

Per op and mode: kernels.cfg_ddim_step / kernels.ddpo_clip_loss with backend="eager" (the fallback),
torch.compile of that fallback, and backend="triton"; GPU time per call (the median of
triton.testing.do_bench, L2 flushed between calls), speed-up, achieved GB/s counting the latent-sized
bytes as the README's Kernels section does (op 1 forward 20 B per element in fp32: 4 reads + 1 write; op 1 backward 16 B:
1 read + 3 writes; op 2 forward 16 B; op 2 backward 24 B; half that in bf16), and that bandwidth as a
share of the device-to-device copy bandwidth measured in the same run.

The inputs are those diffusion.cfg_unet hands the trainers. "halves": the two .chunk(2) views of one
[2B, ...] UNet output at guidance 7.5 (ordinary CFG; DDPO's training pass at mixed guidance gets the
same layout, index_select'ed into one [2B, ...] tensor first). "w=1": every sample at guidance exactly 1
(DiffExp's w_low on the noisiest steps), where cfg_unet runs only the conditional half and returns that
one [B, ...] tensor as both outputs. The backward modes differentiate with respect to that UNet output,
as the trainers' backward does, so their times include autograd gathering the two halves' gradients
into it; the GB/s column counts only the op's own bytes. fp32 rows are what the trainers pass (they
cast the UNet output to float32), bf16 rows what the sampler of diffusion.py passes in a bf16 pipeline.

The end-to-end section times DDPO's sampling loop (50 steps, DiffExp's w = 1 on the noisiest 20%) and
one DDPO training step (one shuffled step per sample, so mixed guidance) through diffusion.cfg_unet and
the trainers' float32 cast, with a full-size SD 1.5 UNet (random weights, built from its config; needs
diffusers), eager vs Triton. Without CUDA it prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python kernels/bench.py` from anywhere

# Bytes per latent element in float32; halved for bf16.
BYTES_FP32 = {
    "op1 fwd": 20,
    "op1 fwd+lp": 20,
    "op1 fwd+bwd": 20 + 16,
    "op2 fwd": 16,
    "op2 fwd+bwd": 16 + 24,
}
MODES = list(BYTES_FP32)
# What cfg_unet returns: two halves of one [2B, ...] output, or (every sample at w = 1) one tensor twice.
LAYOUTS = {"halves": 7.5, "w=1": 1.0}  # layout -> the guidance scale that produces it

# Stable Diffusion v1.5's UNet (unet/config.json on the hub), for the end-to-end section.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
TINY_UNET = dict(  # --cpu-smoke only
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------


class Timer:
    """Median milliseconds per call: triton.testing.do_bench on CUDA, perf_counter on CPU (smoke)."""

    def __init__(self, cuda: bool, reps: int = 100):
        self.cuda, self.reps = cuda, reps

    def __call__(self, fn) -> float:
        if self.cuda:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=self.reps, return_mode="median")
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth_gbs(timer: Timer, device) -> float:
    """Device-to-device copy bandwidth (read + write bytes) on a buffer far larger than L2."""
    n = (1 << 28) if timer.cuda else (1 << 20)  # 1 GiB of fp32 on the GPU
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------
# per-op cases
# ------------------------------------------------------------------------------------------------


def sd_schedule(device):
    from kernels import DDIMSchedule

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    return DDIMSchedule(torch.cat([ab, ab[:1]]).to(device), 1000 // 50, 1000, "epsilon")


def cfg_halves(out: torch.Tensor, shared: bool):
    """(out_u, out_c) as diffusion.cfg_unet returns them from the UNet output `out`."""
    return (out, out) if shared else out.chunk(2)


def make_inputs(batch, latent, dtype, device, layout):
    """One step's tensors as the trainers hold them: the UNet output `out` ([2B, ...], or [B, ...] for
    w=1), x_t, z, the per-sample coefficients, the guidance as the sampling loop passes it (one value
    expanded to [B]) and as the training pass does (gathered per sample), x_prev and its log-prob."""
    import kernels

    g = torch.Generator().manual_seed(0)
    shape = (batch, *latent)
    shared = layout == "w=1"

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    co = sd_schedule(device).coefficients((1 + 20 * torch.randint(0, 50, (batch,), generator=g)).to(device), 1.0)
    w = LAYOUTS[layout]
    inp = dict(
        shared=shared,
        out=rnd(*((batch if shared else 2 * batch), *latent)),
        x=rnd(*shape),
        z=rnd(*shape),
        co=co,
        w_step=torch.full((), w, device=device).expand(batch),
        w_train=torch.full((batch,), w, device=device),
    )
    u, c = cfg_halves(inp["out"], shared)
    inp["xp"], lp = kernels.cfg_ddim_step(u, c, inp["x"], inp["w_step"], co, inp["z"], True, backend="eager")
    inp["old"] = (lp + 1e-4 * torch.randn(batch, generator=g).to(device)).float()
    inp["adv"] = torch.randn(batch, generator=g).to(device)
    inp["g"] = rnd(*shape)  # incoming gradient of x_prev for op 1's backward
    return inp


def entry_fns(backend: str):
    """The trainers' entry points with a fixed backend, as functions of tensors only."""
    import kernels
    from kernels import DDIMCoefficients

    def op1(u, c, x, z, w, cx, ce, s):
        return kernels.cfg_ddim_step(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), noise=z, backend=backend)

    def op1_lp(u, c, x, z, w, cx, ce, s):
        co = DDIMCoefficients(cx, ce, s, 1.0)
        return kernels.cfg_ddim_step(u, c, x, w, co, noise=z, return_log_prob=True, backend=backend)

    def op2(u, c, x, xp, w, cx, ce, s, old, adv):
        co = DDIMCoefficients(cx, ce, s, 1.0)
        return kernels.ddpo_clip_loss(u, c, x, xp, w, co, old, adv, 1e-4, backend=backend)

    return op1, op1_lp, op2


def eager_fns():
    """The eager fallback's body (the references), what torch.compile gets."""
    from kernels import DDIMCoefficients, cfg_ddim_step_reference, ddpo_clip_loss_reference

    def op1(u, c, x, z, w, cx, ce, s):
        return cfg_ddim_step_reference(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z)

    def op1_lp(u, c, x, z, w, cx, ce, s):
        return cfg_ddim_step_reference(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z, True)

    def op2(u, c, x, xp, w, cx, ce, s, old, adv):
        return ddpo_clip_loss_reference(u, c, x, xp, w, DDIMCoefficients(cx, ce, s, 1.0), old, adv, 1e-4)

    return op1, op1_lp, op2


def case(mode, fns, inp):
    """A zero-argument callable running `mode` with the implementation `fns` (op1, op1_lp, op2)."""
    op1, op1_lp, op2 = fns
    co, shared = inp["co"], inp["shared"]
    step = (inp["w_step"], co.c_x, co.c_eps, co.sigma)
    train = (inp["w_train"], co.c_x, co.c_eps, co.sigma)
    if mode in ("op1 fwd", "op1 fwd+lp"):  # sampling (DDPO with the log-prob)
        f = op1 if mode == "op1 fwd" else op1_lp

        def run():
            with torch.no_grad():
                return f(*cfg_halves(inp["out"], shared), inp["x"], inp["z"], *step)

        return run
    if mode == "op1 fwd+bwd":  # AlignProp: gradients of x_t and of the UNet output
        out, x = (inp[k].detach().requires_grad_() for k in ("out", "x"))

        def run():
            return torch.autograd.grad(op1(*cfg_halves(out, shared), x, inp["z"], *step), (out, x), inp["g"])

        return run
    if mode == "op2 fwd":

        def run():
            with torch.no_grad():
                return op2(*cfg_halves(inp["out"], shared), inp["x"], inp["xp"], *train, inp["old"], inp["adv"])

        return run
    if mode == "op2 fwd+bwd":  # DDPO: gradient of the UNet output
        out = inp["out"].detach().requires_grad_()

        def run():
            loss, _ = op2(*cfg_halves(out, shared), inp["x"], inp["xp"], *train, inp["old"], inp["adv"])
            return torch.autograd.grad(loss, out)

        return run
    raise ValueError(mode)


def compiled_fns():
    """torch.compile of the eager fallback; dynamic shapes, so one compile serves every batch and
    latent size of a dtype (the caller resets dynamo between dtypes)."""
    return tuple(torch.compile(f, dynamic=True) for f in eager_fns())


def op_table(args, timer: Timer, device, copy_gbs: float):
    batches = [8, 64] if args.quick else [1, 8, 64]
    latents = [(4, 64, 64)] if args.quick else [(4, 64, 64), (4, 128, 128)]
    dtypes = [torch.float32, torch.bfloat16]
    if args.cpu_smoke:
        batches, latents = [1, 2], [(4, 5, 7)]
    header = (
        "| op | inputs | batch | latent | dtype | eager ms | compile ms | Triton ms | vs eager | vs compile | GB/s "
        "| % copy BW |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    eager, triton_ = entry_fns("eager"), entry_fns("triton")
    results = {}
    for dtype in dtypes:
        compiled = None
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = compiled_fns()
        for mode in MODES:
            for layout in LAYOUTS:
                for latent in latents:
                    for batch in batches:
                        inp = make_inputs(batch, latent, dtype, device, layout)
                        eager_ms = timer(case(mode, eager, inp))
                        compile_ms = float("nan")
                        if compiled is not None:
                            try:
                                compile_ms = timer(case(mode, compiled, inp))
                            except Exception as e:  # a compile failure must not cost the rest of the table
                                print(
                                    f"<!-- torch.compile failed for {mode} {dtype}: {type(e).__name__}: "
                                    f"{str(e)[:200]} -->"
                                )
                                compiled = None
                        triton_ms = timer(case(mode, triton_, inp))
                        n = batch * latent[0] * latent[1] * latent[2]
                        gbs = BYTES_FP32[mode] * (torch.finfo(dtype).bits / 32) * n / (triton_ms * 1e-3) / 1e9
                        dt = "fp32" if dtype == torch.float32 else "bf16"
                        results[(mode, layout, batch, latent, dt)] = dict(
                            eager=eager_ms, compile=compile_ms, triton=triton_ms, gbs=gbs
                        )
                        print(
                            f"| {mode} | {layout} | {batch} | {'x'.join(map(str, latent))} | {dt} | {eager_ms:.4f} | "
                            f"{compile_ms:.4f} | {triton_ms:.4f} | {eager_ms / triton_ms:.1f}x | "
                            f"{compile_ms / triton_ms:.1f}x | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% |",
                            flush=True,
                        )
                        del inp
    return results


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def end_to_end(args, device, cuda: bool):
    """Seconds per step of DDPO's sampling loop and of a DDPO training step, eager vs Triton, and the
    share of each step spent outside the UNet. Returns {name: (eager s, Triton s)} or None."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        print("\nEnd to end: skipped (diffusers is not importable here).")
        return None
    import kernels
    from diffusion import Conditioning, cfg_unet

    smoke = args.cpu_smoke
    config = TINY_UNET if smoke else SD15_UNET
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 2 if smoke else args.e2e_batch
    size = config["sample_size"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a full-size UNet's init is slow on a CPU
        unet = UNet2DConditionModel(**config).to(dtype)  # random weights: the timing does not care
    dim = config["cross_attention_dim"]
    cond = Conditioning(torch.randn(batch, 77, dim, device=device, dtype=dtype))
    negative = Conditioning(torch.randn(1, 77, dim, device=device, dtype=dtype))  # cfg_unet expands it
    schedule = sd_schedule(device)
    all_t = 1 + 20 * torch.arange(49, -1, -1)  # SD's 50 DDIM timesteps, noisiest first
    timesteps_host = all_t[[0, 25, 49]] if smoke else all_t  # smoke: one w = 1 step, two at 7.5
    steps = len(timesteps_host)
    # DiffExp's dynamic CFG: w_low = 1 on the noisiest 20% of steps (t >= 0.8 T), w_high after.
    guidance_host = torch.where(timesteps_host >= 800, 1.0, 7.5)
    timesteps, guidance = timesteps_host.to(device), guidance_host.to(device)
    coeffs = [schedule.coefficients(t.expand(batch), 1.0) for t in timesteps]
    x0 = torch.randn(batch, 4, size, size, device=device)
    noise = [torch.randn_like(x0) for _ in range(steps)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def unet_eps(x, t, w_host):
        """The trainers' unet_eps: one cfg_unet call (the conditional half only where every sample is at
        w = 1), its outputs cast to float32."""
        out_u, out_c = cfg_unet(unet, x.to(dtype), t, cond, negative, w_host)
        return out_u.float(), out_c.float()

    def sample(backend):
        """DDPO's sampling loop (eta = 1, log-probs kept): seconds per step, the median of 3 loops."""
        return statistics.median(sample_once(backend) for _ in range(1 if smoke else 3))

    def sample_once(backend):
        sync()
        t0 = time.perf_counter()
        x, lps = x0, []
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                out_u, out_c = unet_eps(x, t, float(guidance_host[i]))
                if backend is None:  # the UNet (and the cast) alone
                    continue
                x, lp = kernels.cfg_ddim_step(
                    out_u,
                    out_c,
                    x,
                    guidance[i].expand(batch),
                    coeffs[i],
                    noise=noise[i],
                    return_log_prob=True,
                    backend=backend,
                )
                lps.append(lp)
        sync()
        return (time.perf_counter() - t0) / steps

    # DDPO training step: UNet forward with grad at one shuffled step per sample (so timesteps and
    # guidance differ within the batch: cfg_unet's index_select path), loss, backward. The attention
    # projections stand in for LoRA's trainable parameters (the backward still crosses the whole UNet).
    for name, p in unet.named_parameters():
        p.requires_grad_(any(k in name for k in ("to_q", "to_k", "to_v", "to_out")))
    pick = torch.randint(0, steps, (batch,), generator=torch.Generator().manual_seed(0))
    pick[0], pick[-1] = 0, steps - 1  # at least one sample at w = 1 and one at 7.5 (batch >= 2)
    w_train_host = guidance_host[pick]
    t_train, w_train = timesteps_host[pick].to(device), w_train_host.to(device)
    co_train = schedule.coefficients(t_train, 1.0)
    x_t = torch.randn_like(x0)
    with torch.no_grad():
        out_u0, out_c0 = unet_eps(x_t, t_train, w_train_host)
        x_prev, old = kernels.cfg_ddim_step(
            out_u0, out_c0, x_t, w_train, co_train, noise=torch.randn_like(x_t), return_log_prob=True, backend="eager"
        )
    adv = torch.randn(batch, device=device)
    grad_out = (torch.randn_like(out_u0), torch.randn_like(out_c0))

    def train(backend, reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            out_u, out_c = unet_eps(x_t, t_train, w_train_host)
            if backend is None:  # the UNet alone, with stand-in gradients
                torch.autograd.backward((out_u, out_c), grad_out)
            else:
                loss, _ = kernels.ddpo_clip_loss(
                    out_u, out_c, x_t, x_prev, w_train, co_train, old, adv, 1e-4, backend=backend
                )
                loss.backward()
            unet.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) / reps

    reps = 1 if smoke else 10
    for fn, a in ((sample, None), (sample, "eager"), (sample, "triton"), (train, None)):  # warm-up / compile
        fn(a) if fn is sample else fn(a, 1)
    res = {
        "sampling step": (sample("eager"), sample("triton"), sample(None)),
        "DDPO train step": (train("eager", reps), train("triton", reps), train(None, reps)),
    }
    print(
        f"\nEnd to end: SD 1.5 UNet ({'tiny config' if smoke else 'full size'}, random weights, {dtype}), "
        f"batch {batch}, latents 4x{size}x{size}, CFG through diffusion.cfg_unet with DiffExp's w = 1 on steps "
        f"t >= 800 ({int((guidance_host == 1).sum())} of {steps}) and the trainers' float32 cast; ms per step "
        f"(sampling: median of {1 if smoke else 3} loop(s) of {steps} steps; training: mean of {reps} step(s) "
        f"at mixed guidance)."
    )
    print("| loop | eager ms | Triton ms | UNet-only ms | Triton/eager | outside UNet, eager | outside UNet, Triton |")
    print("|---|---|---|---|---|---|---|")
    for name, (e, f, u) in res.items():
        print(
            f"| {name} | {1e3 * e:.2f} | {1e3 * f:.2f} | {1e3 * u:.2f} | {f / e:.3f} | {100 * max(e - u, 0) / e:.1f}% | {100 * max(f - u, 0) / f:.1f}% |"
        )
    return {k: v[:2] for k, v in res.items()}


# ------------------------------------------------------------------------------------------------


def check_targets(results, e2e, copy_gbs):
    print("\nTargets:")

    def line(ok, text):
        print(f"  [{'met' if ok else 'NOT met'}] {text}")

    for dt in ("fp32", "bf16"):
        for layout in LAYOUTS:
            at = f"4x64x64 {dt}, {layout}"
            for mode in ("op1 fwd", "op1 fwd+lp"):
                r = results.get((mode, layout, 8, (4, 64, 64), dt))
                if r:
                    s = r["eager"] / r["triton"]
                    line(s >= 10, f"{mode} >= 10x eager at batch 8, {at}: {s:.1f}x")
            for mode in ("op1 fwd", "op1 fwd+lp"):
                r = results.get((mode, layout, 64, (4, 64, 64), dt))
                if r:
                    p = r["gbs"] / copy_gbs
                    line(
                        p >= 0.7,
                        f"{mode} >= 70% of copy bandwidth at batch 64, {at}: {100 * p:.0f}% ({r['gbs']:.0f} of {copy_gbs:.0f} GB/s)",
                    )
            r = results.get(("op2 fwd+bwd", layout, 8, (4, 64, 64), dt))
            if r:
                s = r["eager"] / r["triton"]
                line(s >= 5, f"op2 fwd+bwd >= 5x eager at batch 8, {at}: {s:.1f}x")
    if e2e:
        for name, (e, f) in e2e.items():
            line(
                f <= 1.01 * e,
                f"end to end {name} no slower than eager (1% timing noise allowed): Triton/eager = {f / e:.3f}",
            )
    else:
        print("  [not measured] end to end (diffusers missing or --no-e2e)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 and 64 of 4x64x64 only")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end section")
    ap.add_argument("--e2e-batch", type=int, default=8)
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="run the script's code on CPU through TRITON_INTERPRET (tiny shapes; timings meaningless)",
    )
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print(
            "kernels/bench.py: no CUDA device on this machine, so there is nothing to measure; run it on a GPU. "
            "(The correctness tests run on CPU: python -m pytest tests/test_kernels.py)"
        )
        return 0
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before `kernels` (and so triton.jit) is imported
        args.no_compile = True  # inductor on CPU needs a C++ toolchain and minutes; not what is measured
    import triton

    import kernels

    if kernels.cfg_ddim.triton is None:
        print("kernels/bench.py: triton does not import here; nothing to compare.")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    timer = Timer(cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke run: Triton interpreter, timings meaningless)"
    print(
        f"# DiffExp kernels benchmark: {name}, {datetime.date.today().isoformat()}, "
        f"torch {torch.__version__}, triton {triton.__version__}"
    )
    copy_gbs = copy_bandwidth_gbs(timer, device)
    print(
        f"device copy bandwidth (read + write, {'4 MiB' if args.cpu_smoke else '1 GiB'} fp32 copy_): "
        f"{copy_gbs:.0f} GB/s\n"
    )
    results = op_table(args, timer, device, copy_gbs)
    e2e = None if args.no_e2e else end_to_end(args, device, cuda)
    check_targets(results, e2e, copy_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
