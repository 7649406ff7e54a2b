"""AlignProp with DiffExp: fine-tune Stable Diffusion's LoRA weights by backpropagating a
differentiable reward through the sampling chain (Prabhudesai et al. 2023), exploring with DiffExp.

    python train_alignprop.py --reward pickscore --t-sw 0.8
    python train_alignprop.py --config toy                  # the offline toy world, minutes on a CPU
    accelerate launch --num_processes 8 train_alignprop.py --reward aesthetic

Per epoch (all in `main`, top to bottom): sample images with the DiffExp CFG schedule and randomly
weighted prompts (while exploring), decode them with the VAE, score them with the reward, and
backpropagate -reward into the LoRA weights through the last K denoising steps (truncated backprop;
the earlier steps run without a graph). The run's plumbing (checks, output directory, resume,
evaluation, logging, checkpoints) is runs.py.
"""

from __future__ import annotations

import rundir  # first, and light: Ctrl-C while the rest imports (seconds) ends in one line, not a traceback

if __name__ == "__main__":
    rundir.on_ctrl_c(lambda: "interrupted while starting: nothing was written")

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

import runs
from explore import DiffExpConfig


@dataclass
class Args:
    config: Literal["toy"] | None = None
    """a preset filling in a whole setting, any flag still overriding it: 'toy' = the shipped offline toy world (--pretrained toy, pickscore with the toy-scorer, toy_two_shapes / toy_unseen prompts, 10 steps, fp32, 30 epochs x 16 samples, output runs/toy-alignprop)"""
    num_epochs: int = 100
    """epochs: each samples --samples-per-epoch images and makes one optimizer step per --gradient-accumulation-steps batches"""
    samples_per_epoch: int = 64
    """images per epoch across all processes (paper: 64)"""
    batch_size: int = 4
    """images per process per forward/backward pass"""
    gradient_accumulation_steps: int = 16
    """batches accumulated per optimizer step (samples_per_epoch / (batch_size * processes) batches per epoch)"""
    num_steps: int = 50
    """DDIM denoising steps"""
    eta: float = 0.0
    """sampling noise in [0, 1]: DDIM's eta (0 = deterministic sampling), or on SD3 the SDE's noise level"""
    backprop_steps: int = 1
    """K: only the last K denoising steps carry gradient (truncated backprop)"""
    backprop_steps_random: bool = False
    """draw K ~ U{1..backprop_steps} once per trajectory instead of fixing it"""
    gradient_checkpointing: Literal["call", "blocks", "none"] = "call"
    """recompute activations in backward: 'call' each whole UNet call, 'blocks' each UNet block and VAE-decoder block (least memory: SDXL at 1024 px), 'none' store everything"""
    model: runs.ModelArgs = field(default_factory=runs.ModelArgs)
    """the base model, the reward (differentiable), the prompts, LoRA and precision"""
    optim: runs.OptimArgs = field(default_factory=lambda: runs.OptimArgs(lr=1e-3))
    """the optimizer (AdamW over the LoRA weights; paper: lr 1e-3)"""
    diffexp: DiffExpConfig = field(default_factory=DiffExpConfig)
    """DiffExp: exploration while sampling (--w-high by default the paper's 7.5 for AlignProp; 3.5 on FLUX.1)"""
    run: runs.RunArgs = field(default_factory=lambda: runs.RunArgs(output_dir="runs/alignprop"))
    """the run and its files"""


# `--config NAME`: a preset whose values become the defaults, each still overridable by its flag.
PRESETS = {"toy": runs.TOY_WORLD | dict(batch_size=8, output_dir="runs/toy-alignprop")}


def check_args(args: Args, world: int) -> Iterator[tuple[bool, str]]:
    """AlignProp's own argument checks, as (ok, error line) pairs, for `world` processes (runs.start
    makes the shared ones and prints the first failing line)."""
    batches = args.samples_per_epoch // max(args.batch_size * world, 1)
    # fmt: off
    yield args.samples_per_epoch >= 1, f"--samples-per-epoch must be >= 1 (images per epoch; paper: 64), got {args.samples_per_epoch}"
    yield args.batch_size >= 1, f"--batch-size must be >= 1 (images per forward/backward pass), got {args.batch_size}"
    yield 1 <= args.backprop_steps <= args.num_steps, f"--backprop-steps must be in [1, --num-steps={args.num_steps}], got {args.backprop_steps}"
    yield not args.backprop_steps_random or args.backprop_steps > 1, "--backprop-steps-random draws K from 1..--backprop-steps, which is 1: pass --backprop-steps K > 1, or drop --backprop-steps-random"
    yield 0 <= args.eta <= 1, f"--eta must be in [0, 1] (0: deterministic sampling; {runs.ETA_RANGE}), got {args.eta}"
    yield args.samples_per_epoch % (args.batch_size * world) == 0, f"--samples-per-epoch {args.samples_per_epoch} must be divisible by --batch-size {args.batch_size} x {world} processes"
    yield batches % args.gradient_accumulation_steps == 0, f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the {batches} batches per process per epoch (--samples-per-epoch / (--batch-size x processes))"
    # fmt: on


def main(args: Args):
    run = runs.start(args, "alignprop", check_args, differentiable_reward=True)  # checked, held, loaded, resumed
    if run is None:
        return  # --resume of a finished run
    from torch.utils.checkpoint import checkpoint

    from diffusion import decode, seeded
    from explore import backprop_note, diffexp_conditioning, is_exploring
    from kernels import cfg_ddim_step

    pipe, reward_fn, unet = run.pipe, run.reward_fn, run.unet  # the frozen base model, the differentiable reward
    T, device, diffexp = pipe.scheduler.config.num_train_timesteps, run.device, args.diffexp
    params, optimizer = run.params, run.optimizer  # the LoRA weights are all that trains
    if args.gradient_checkpointing == "blocks":  # diffusers checkpoints per block whenever grad is on
        unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()

    timesteps_host, timesteps, schedule = run.timesteps_host, run.timesteps, run.schedule  # DDIM's or the flow's
    if note := backprop_note(diffexp, timesteps_host, pipe.scheduler, args.backprop_steps, args.backprop_steps_random):
        run.accelerator.print(note)  # the schedule then changes what is sampled, not the path the gradient takes
    text = run.text  # prompts -> conditioning; .negative is CFG's, .empty DiffExp's e_empty
    B, batches_per_epoch = args.batch_size, args.samples_per_epoch // (args.batch_size * run.world)
    latent_size = run.resolution // pipe.vae_scale_factor
    latent_shape = (B, pipe.vae.config.latent_channels, latent_size, latent_size)  # FLUX packs in denoise
    step_coeffs = [schedule.coefficients(t.expand(B), args.eta) for t in timesteps]  # computed once, on the device

    model_outputs = run.guided(unet)  # (x, t, cond, w) -> CFG's two halves of one denoiser call

    for epoch in run.epochs():
        exploring = is_exploring(epoch, args.num_epochs, diffexp.explore_frac)
        scores_seen, components_seen, losses, grad_norms, weights_used = [], {}, [], [], []
        for batch in range(batches_per_epoch):
            # --- sampling, with a graph through the last K steps only (truncated backprop) -------------
            g = seeded(args.run.seed, epoch, run.rank, batch)
            prompts = [run.prompts[i] for i in torch.randint(len(run.prompts), (B,), generator=g).tolist()]
            # DiffExp's word and weight, and K, come from streams of their own, so every arm of a seed
            # (DiffExp on or off, any K) samples from the same x_T and step noise: comparisons pair by seed.
            cond, guidance_host, weights = diffexp_conditioning(
                diffexp, exploring, prompts, text.encode(prompts), text, timesteps_host, T,
                seeded(args.run.seed, epoch, run.rank, batch, 1),
            )  # fmt: skip
            guidance = guidance_host.to(device)
            K = int(torch.randint(1, args.backprop_steps + 1, (1,), generator=seeded(args.run.seed, epoch, run.rank, batch, 2))) if args.backprop_steps_random else args.backprop_steps  # fmt: skip
            x = torch.randn(latent_shape, generator=g).to(device)
            noise = [torch.randn(latent_shape, generator=g).to(device) if args.eta > 0 else None for _ in timesteps]
            for i, t in enumerate(timesteps):
                with_grad = i >= args.num_steps - K
                with torch.set_grad_enabled(with_grad):
                    w = float(guidance_host[i])
                    if with_grad and args.gradient_checkpointing == "call":  # recompute the whole call in backward
                        out_u, out_c = checkpoint(model_outputs, x, t, cond, w, use_reentrant=False)
                    else:
                        out_u, out_c = model_outputs(x, t, cond, w)
                    x = cfg_ddim_step(out_u, out_c, x, guidance[i].expand(B), step_coeffs[i], noise=noise[i], backend=args.model.kernels)  # fmt: skip

            # --- reward and its gradient ------------------------------------------------------------------
            with run.accelerator.autocast():
                images = decode(pipe, x.to(run.weight_dtype))
                scores, components = reward_fn(images, prompts)
            loss = -scores.float().mean()
            run.accelerator.backward(loss / args.gradient_accumulation_steps)

            # --- update --------------------------------------------------------------------------------
            if (batch + 1) % args.gradient_accumulation_steps == 0:
                grad_norms.append(run.reduce_and_clip(params))  # averaged across processes, clipped
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run.update_ema()  # --ema-decay

            scores_seen.append(scores.detach().float())
            for k, v in components.items():
                components_seen.setdefault(k, []).append(v.detach().float())
            losses.append(loss.detach())
            weights_used += [w.record() for w in weights]
            run.keep_for_grid(images, prompts, batches_per_epoch)

        # --- log, evaluate, checkpoint -------------------------------------------------------------------
        rewards = run.accelerator.gather(torch.cat(scores_seen))  # every process's samples
        components = {k: run.accelerator.gather(torch.cat(v)) for k, v in components_seen.items()}
        record = {"loss": torch.stack(losses).mean().item(), "grad_norm": torch.stack(grad_norms).mean().item()}
        run.end_epoch(epoch, rewards, record, show=("loss", "grad_norm"), components=components, prompt_weights=weights_used)  # fmt: skip


cli = functools.partial(runs.cli, Args, PRESETS, trainer="alignprop")  # cli() reads sys.argv, cli(argv) a list


if __name__ == "__main__":
    main(cli())  # Ctrl-C: one line saying where it stopped and how to resume (runs.Run.interrupted_line)
