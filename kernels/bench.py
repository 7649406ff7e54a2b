"""Benchmark of the fused kernels against the eager reference and torch.compile of it.

    python kernels/bench.py                 # the full table, then the end-to-end section
    python kernels/bench.py --quick         # batch 8 and 64 of 4x64x64 only
    python kernels/bench.py --no-compile --no-e2e
    python kernels/bench.py --cpu-smoke     # checks this script on CPU (interpreter, tiny shapes); timings meaningless

Per op and mode: eager ms, torch.compile(eager) ms, Triton ms (GPU time per call: the median of
triton.testing.do_bench, L2 flushed between calls), speed-up, achieved GB/s counting the latent-sized
bytes as the README's Kernels section does (op 1 forward 20 B per element in fp32: 4 reads + 1 write; op 1 backward 16 B:
1 read + 3 writes; op 2 forward 16 B; op 2 backward 24 B; half that in bf16), and that bandwidth as a
share of the device-to-device copy bandwidth measured in the same run. The end-to-end section times a
50-step CFG sampling loop and one DDPO training step with a full-size SD 1.5 UNet (random weights, built
from its config; needs diffusers) eager vs fused. Without CUDA it prints a message and exits 0.
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
    n = (1 << 28) if timer.cuda else (1 << 22)  # 1 GiB of fp32 on the GPU
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


def make_inputs(batch, latent, dtype, device):
    import kernels

    g = torch.Generator().manual_seed(0)
    shape = (batch, *latent)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    co = sd_schedule(device).coefficients((1 + 20 * torch.randint(0, 50, (batch,), generator=g)).to(device), 1.0)
    inp = dict(
        u=rnd(*shape), c=rnd(*shape), x=rnd(*shape), z=rnd(*shape), co=co, w=torch.full((batch,), 7.5, device=device)
    )
    inp["xp"], lp = kernels.cfg_ddim_step(inp["u"], inp["c"], inp["x"], inp["w"], co, inp["z"], True, backend="eager")
    inp["old"] = (lp + 1e-4 * torch.randn(batch, generator=g).to(device)).float()
    inp["adv"] = torch.randn(batch, generator=g).to(device)
    inp["g"] = rnd(*shape)  # incoming gradient of x_prev for op 1's backward
    return inp


def eager_fns():
    """The eager references as functions of tensors only (what torch.compile gets)."""
    from kernels import DDIMCoefficients, cfg_ddim_step_reference, ddpo_clip_loss_reference

    def op1(u, c, x, z, w, cx, ce, s):
        return cfg_ddim_step_reference(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z)

    def op1_lp(u, c, x, z, w, cx, ce, s):
        return cfg_ddim_step_reference(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z, True)

    def op2(u, c, x, xp, w, cx, ce, s, old, adv):
        return ddpo_clip_loss_reference(u, c, x, xp, w, DDIMCoefficients(cx, ce, s, 1.0), old, adv, 1e-4)

    return op1, op1_lp, op2


def triton_fns():
    import kernels
    from kernels import DDIMCoefficients

    def op1(u, c, x, z, w, cx, ce, s):
        return kernels.cfg_ddim_step(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z, backend="triton")

    def op1_lp(u, c, x, z, w, cx, ce, s):
        return kernels.cfg_ddim_step(u, c, x, w, DDIMCoefficients(cx, ce, s, 1.0), z, True, backend="triton")

    def op2(u, c, x, xp, w, cx, ce, s, old, adv):
        return kernels.ddpo_clip_loss(
            u, c, x, xp, w, DDIMCoefficients(cx, ce, s, 1.0), old, adv, 1e-4, backend="triton"
        )

    return op1, op1_lp, op2


def case(mode, fns, inp):
    """A zero-argument callable running `mode` with the implementation `fns` (op1, op1_lp, op2)."""
    op1, op1_lp, op2 = fns
    co = inp["co"]
    scal = (inp["w"], co.c_x, co.c_eps, co.sigma)
    if mode in ("op1 fwd", "op1 fwd+lp"):
        f = op1 if mode == "op1 fwd" else op1_lp

        def run():
            with torch.no_grad():
                return f(inp["u"], inp["c"], inp["x"], inp["z"], *scal)

        return run
    if mode == "op1 fwd+bwd":  # AlignProp: gradients of x_t, out_u, out_c
        leaves = [inp[k].detach().requires_grad_() for k in ("u", "c", "x")]

        def run():
            return torch.autograd.grad(op1(*leaves, inp["z"], *scal), leaves, inp["g"])

        return run
    if mode == "op2 fwd":

        def run():
            with torch.no_grad():
                return op2(inp["u"], inp["c"], inp["x"], inp["xp"], *scal, inp["old"], inp["adv"])

        return run
    if mode == "op2 fwd+bwd":  # DDPO: gradients of out_u, out_c
        leaves = [inp[k].detach().requires_grad_() for k in ("u", "c")]

        def run():
            loss, _ = op2(*leaves, inp["x"], inp["xp"], *scal, inp["old"], inp["adv"])
            return torch.autograd.grad(loss, leaves)

        return run
    raise ValueError(mode)


def compiled_fns():
    """torch.compile of the eager references; dynamic shapes, so one compile serves every batch and
    latent size of a dtype (the caller resets dynamo between dtypes)."""
    return tuple(torch.compile(f, dynamic=True) for f in eager_fns())


def op_table(args, timer: Timer, device, copy_gbs: float):
    batches = [8, 64] if args.quick else [1, 8, 64]
    latents = [(4, 64, 64)] if args.quick else [(4, 64, 64), (4, 128, 128)]
    dtypes = [torch.float32, torch.bfloat16]
    if args.cpu_smoke:
        batches, latents, dtypes = [1, 3], [(4, 9, 13)], [torch.float32, torch.bfloat16]
    header = (
        "| op | batch | latent | dtype | eager ms | compile ms | Triton ms | vs eager | vs compile | GB/s | % copy BW |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = {}
    for dtype in dtypes:
        compiled = None
        if not args.no_compile:
            torch._dynamo.reset()
            compiled = compiled_fns()
        for mode in MODES:
            for latent in latents:
                for batch in batches:
                    inp = make_inputs(batch, latent, dtype, device)
                    eager_ms = timer(case(mode, eager_fns(), inp))
                    compile_ms = float("nan")
                    if compiled is not None:
                        try:
                            compile_ms = timer(case(mode, compiled, inp))
                        except Exception as e:  # a compile failure must not cost the rest of the table
                            print(
                                f"<!-- torch.compile failed for {mode} {dtype}: {type(e).__name__}: {str(e)[:200]} -->"
                            )
                            compiled = None
                    triton_ms = timer(case(mode, triton_fns(), inp))
                    n = batch * latent[0] * latent[1] * latent[2]
                    gbs = BYTES_FP32[mode] * (torch.finfo(dtype).bits / 32) * n / (triton_ms * 1e-3) / 1e9
                    dt = "fp32" if dtype == torch.float32 else "bf16"
                    results[(mode, batch, latent, dt)] = dict(
                        eager=eager_ms, compile=compile_ms, triton=triton_ms, gbs=gbs
                    )
                    print(
                        f"| {mode} | {batch} | {'x'.join(map(str, latent))} | {dt} | {eager_ms:.4f} | {compile_ms:.4f} | "
                        f"{triton_ms:.4f} | {eager_ms / triton_ms:.1f}x | {compile_ms / triton_ms:.1f}x | {gbs:.0f} | "
                        f"{100 * gbs / copy_gbs:.0f}% |",
                        flush=True,
                    )
                    del inp
    return results


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------


def end_to_end(args, device, cuda: bool):
    """Seconds per step of a CFG sampling loop and of a DDPO training step, eager vs fused, and the
    share of each step spent outside the UNet. Returns {name: (eager s, fused s)} or None."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        print("\nEnd to end: skipped (diffusers is not importable here).")
        return None
    import kernels

    smoke = args.cpu_smoke
    config = TINY_UNET if smoke else SD15_UNET
    dtype = torch.bfloat16 if cuda else torch.float32
    batch = 1 if smoke else args.e2e_batch
    steps = 3 if smoke else 50
    size = config["sample_size"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: a full-size UNet's init is slow on a CPU
        unet = UNet2DConditionModel(**config).to(dtype)  # random weights: the timing does not care
    embeds = torch.randn(2 * batch, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    schedule = sd_schedule(device)
    timesteps = (1 + 20 * torch.arange(49, -1, -1))[:steps].to(device)
    coeffs = [schedule.coefficients(t.expand(batch), 1.0) for t in timesteps]
    # DiffExp's dynamic CFG: w_low for the noisiest 20% of steps.
    guidance = [torch.where(t >= 800, 1.0, 7.5).expand(batch).to(device) for t in timesteps]
    x0 = torch.randn(batch, 4, size, size, device=device)
    noise = [torch.randn_like(x0) for _ in range(steps)]

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def sample(backend):
        """DDPO's sampling loop (eta = 1, log-probs kept): seconds per step, the median of 3 loops."""
        return statistics.median(sample_once(backend) for _ in range(1 if smoke else 3))

    def sample_once(backend):
        sync()
        t0 = time.perf_counter()
        x, lps = x0, []
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                out = unet(torch.cat([x, x]).to(dtype), t.expand(2 * batch), embeds).sample
                if backend is None:  # the UNet alone
                    continue
                x, lp = kernels.cfg_ddim_step_stacked(
                    out.float() if backend == "eager" else out,
                    x,
                    guidance[i],
                    coeffs[i],
                    noise[i],
                    True,
                    backend=backend,
                )
                lps.append(lp)
        sync()
        return (time.perf_counter() - t0) / steps

    # DDPO training step at one timestep: UNet forward with grad, loss, backward. The attention
    # projections stand in for LoRA's trainable parameters (the backward still crosses the whole UNet).
    for name, p in unet.named_parameters():
        p.requires_grad_(any(k in name for k in ("to_q", "to_k", "to_v", "to_out")))
    t_train = timesteps[len(timesteps) // 2].expand(batch)
    co_train = schedule.coefficients(t_train, 1.0)
    w_train = torch.full((batch,), 7.5, device=device)
    x_t = torch.randn_like(x0)
    with torch.no_grad():
        out0 = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t_train, t_train]), embeds).sample
        x_prev, old = kernels.cfg_ddim_step_stacked(
            out0.float(), x_t, w_train, co_train, torch.randn_like(x_t), True, backend="eager"
        )
    adv = torch.randn(batch, device=device)
    grad_out = torch.randn_like(out0)

    def train(backend, reps):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            out = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t_train, t_train]), embeds).sample
            if backend is None:  # the UNet alone, with a stand-in gradient
                out.backward(grad_out)
            else:
                loss, _ = kernels.ddpo_clip_loss_stacked(
                    out.float() if backend == "eager" else out,
                    x_t,
                    x_prev,
                    w_train,
                    co_train,
                    old,
                    adv,
                    1e-4,
                    backend=backend,
                )
                loss.backward()
            unet.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) / reps

    fused = "triton"
    reps = 1 if smoke else 10
    for fn, a in ((sample, None), (sample, "eager"), (sample, fused), (train, None)):  # warm-up / compile
        fn(a) if fn is sample else fn(a, 1)
    res = {
        "sampling step": (sample("eager"), sample(fused), sample(None)),
        "DDPO train step": (train("eager", reps), train(fused, reps), train(None, reps)),
    }
    print(
        f"\nEnd to end: SD 1.5 UNet ({'tiny config' if smoke else 'full size'}, random weights, {dtype}), batch {batch}, "
        f"latents 4x{size}x{size}, CFG on a stacked 2B call; ms per step (sampling: median of 3 loops of {steps} steps; training: mean of {reps} steps)."
    )
    print("| loop | eager ms | fused ms | UNet-only ms | fused/eager | outside UNet, eager | outside UNet, fused |")
    print("|---|---|---|---|---|---|---|")
    for name, (e, f, u) in res.items():
        print(
            f"| {name} | {1e3 * e:.2f} | {1e3 * f:.2f} | {1e3 * u:.2f} | {f / e:.3f} | {100 * max(e - u, 0) / e:.1f}% | {100 * max(f - u, 0) / f:.1f}% |"
        )
    print(
        "(the eager loop also pays the bf16 -> fp32 copy of the UNet output that its reference needs; "
        "the fused one reads bf16 directly)"
    )
    return {k: v[:2] for k, v in res.items()}


# ------------------------------------------------------------------------------------------------


def check_targets(results, e2e, copy_gbs):
    print("\nTargets:")

    def line(ok, text):
        print(f"  [{'met' if ok else 'NOT met'}] {text}")

    for dt in ("fp32", "bf16"):
        for mode in ("op1 fwd", "op1 fwd+lp"):
            r = results.get((mode, 8, (4, 64, 64), dt))
            if r:
                s = r["eager"] / r["triton"]
                line(s >= 10, f"{mode} >= 10x eager at batch 8, 4x64x64 {dt}: {s:.1f}x")
        for mode in ("op1 fwd", "op1 fwd+lp"):
            r = results.get((mode, 64, (4, 64, 64), dt))
            if r:
                p = r["gbs"] / copy_gbs
                line(
                    p >= 0.7,
                    f"{mode} >= 70% of copy bandwidth at batch 64, 4x64x64 {dt}: {100 * p:.0f}% ({r['gbs']:.0f} of {copy_gbs:.0f} GB/s)",
                )
        r = results.get(("op2 fwd+bwd", 8, (4, 64, 64), dt))
        if r:
            s = r["eager"] / r["triton"]
            line(s >= 5, f"op2 fwd+bwd >= 5x eager at batch 8, 4x64x64 {dt}: {s:.1f}x")
    if e2e:
        for name, (e, f) in e2e.items():
            line(
                f <= 1.01 * e,
                f"end to end {name} no slower than eager (1% timing noise allowed): fused/eager = {f / e:.3f}",
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
    print(f"device copy bandwidth (read + write, 1 GiB fp32 copy_): {copy_gbs:.0f} GB/s\n")
    results = op_table(args, timer, device, copy_gbs)
    e2e = None if args.no_e2e else end_to_end(args, device, cuda)
    check_targets(results, e2e, copy_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
