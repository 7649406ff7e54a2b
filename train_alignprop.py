"""AlignProp with DiffExp: fine-tune Stable Diffusion's LoRA weights by backpropagating a
differentiable reward through the sampling chain (Prabhudesai et al. 2023), exploring with DiffExp.

    python train_alignprop.py --reward pickscore --t-sw 0.8
    accelerate launch --num_processes 8 train_alignprop.py --reward aesthetic

Per epoch: sample images with the DiffExp CFG schedule and randomly weighted prompts (while
exploring), decode them with the VAE, score them with the reward, and backpropagate -reward into
the LoRA weights through the last K denoising steps (truncated backprop; the earlier steps run
without a graph). The math is in the README's "The method" section.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import tyro

from rewards import DEFAULT_MODELS, NAMES

REWARD_HELP = (
    f"reward to maximise: one of {', '.join(NAMES)}, custom:DIR (a train_reward.py model), or a weighted sum "
    f"such as 'hps:1,aesthetic:0.5'; differentiable rewards only (jpeg: use train_ddpo.py)"
)
REWARD_MODELS_HELP = (
    f"override reward checkpoints with a hub id or a local directory, KEY VALUE pairs, e.g. --reward-models pickscore_model /ckpt/pickscore; "
    f"keys: {', '.join(DEFAULT_MODELS)} (and custom_mode, custom_target for custom:DIR)"
)

# `--config NAME`: a named preset whose values become the defaults, each still overridable by its flag.
PRESETS = {
    # The shipped offline toy world (README): 32 px shapes, the toy-scorer CLIP as a PickScore-style
    # reward, two-shape training prompts, unseen shape-colour combinations held out; ~2-5 min on a CPU.
    "toy": dict(
        pretrained="toy",
        reward="pickscore",
        reward_models={"pickscore_model": "toy-scorer", "pickscore_processor": "toy-scorer"},
        prompts="toy_two_shapes",
        eval_prompts="toy_unseen",
        num_steps=10,
        mixed_precision="no",
        num_epochs=30,
        samples_per_epoch=16,
        batch_size=8,
        gradient_accumulation_steps=2,
        eval_every=5,
        eval_num=16,
        output_dir="runs/toy-alignprop",
    ),
}


@dataclass
class Args:
    config: Literal["toy"] | None = None
    """a preset filling in a whole setting, any flag still overriding it: 'toy' = the shipped offline toy world
    (--pretrained toy, pickscore with the toy-scorer, toy_two_shapes / toy_unseen prompts, 10 steps, fp32,
    30 epochs x 16 samples, output runs/toy-alignprop)"""

    # --- model and reward ---
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local directory of a Stable Diffusion 1.x/2.x or SDXL base checkpoint (diffusers layout); 'toy': the shipped toy world"""
    vae: str | None = None
    """replace the pipeline's VAE (hub id or directory), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16"""
    reward: Annotated[str, tyro.conf.arg(help=REWARD_HELP)] = "aesthetic"
    reward_models: Annotated[dict[str, str], tyro.conf.arg(help=REWARD_MODELS_HELP)] = field(default_factory=dict)
    prompts: str = "simple_animals"
    """training prompts: a built-in set in prompts/ (without .txt) or a text file, one prompt a line"""
    eval_prompts: str = "unseen_animals"
    """held-out prompts evaluated with fixed seeds every --eval-every epochs"""

    # --- DiffExp ---
    cfg_schedule: bool = True
    """DiffExp (a): low guidance scale w_low on the noisy steps t >= t_sw*T, w_high after"""
    prompt_weighting: bool = True
    """DiffExp (b): emphasise one random word of each prompt by a random weight"""
    t_sw: float = 0.8
    """switch point in [0, 1]: the first ~(1 - t_sw) of the steps use w_low"""
    w_low: float = 1.0
    """guidance scale of the noisy steps (extremely low)"""
    w_high: float = 7.5
    """ordinary guidance scale (paper: 7.5 for AlignProp)"""
    prompt_weight_range: tuple[float, float] = (1.0, 2.0)
    """the chosen word's weight w ~ U(w_min, w_max)"""
    exclude_stopwords: bool = True
    """never emphasise function words ('a', 'the', 'of', ...)"""
    explore_frac: float = 0.75
    """use DiffExp for the first explore_frac of the epochs, then plain sampling"""
    prompt_weight_pooled: bool = False
    """SDXL: also blend the pooled text embedding with the chosen word's weight (default: token states only)"""

    # --- sampling ---
    num_steps: int = 50
    """DDIM denoising steps"""
    eta: float = 0.0
    """DDIM eta (0 = deterministic sampling)"""
    resolution: int | None = None
    """image size in pixels, a multiple of the VAE's downsampling factor (8 for SD; default: the model's native size, 512 for SD 1.5)"""

    # --- optimisation ---
    num_epochs: int = 100
    """number of epochs (one epoch = samples_per_epoch images, gradient averaged over them)"""
    samples_per_epoch: int = 64
    """images per epoch across all processes (paper: 64)"""
    batch_size: int = 4
    """images per process per forward/backward pass"""
    gradient_accumulation_steps: int = 16
    """batches accumulated per optimizer step (samples_per_epoch / (batch_size * processes) batches per epoch)"""
    lr: float = 1e-3
    """AdamW learning rate (paper: 1e-3; 0 trains nothing: a dry run)"""
    adam_beta1: float = 0.9
    """AdamW beta1 (first-moment decay), in [0, 1)"""
    adam_beta2: float = 0.999
    """AdamW beta2 (second-moment decay), in [0, 1)"""
    adam_weight_decay: float = 1e-4
    """AdamW decoupled weight decay of the LoRA weights (>= 0)"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon (> 0)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    lora_rank: int = 4
    """LoRA rank r of the adapters on the UNet's attention projections (to_q/k/v/out)"""
    lora_alpha: float = 4.0
    """LoRA alpha: the adapters' output is scaled by alpha / rank"""
    backprop_steps: int = 1
    """K: only the last K denoising steps carry gradient (truncated backprop)"""
    backprop_steps_random: bool = False
    """draw K ~ U{1..backprop_steps} once per trajectory instead of fixing it"""
    gradient_checkpointing: Literal["call", "blocks", "none"] = "call"
    """recompute activations in backward: 'call' each whole UNet call, 'blocks' each UNet block and VAE-decoder block (least memory: SDXL at 1024 px), 'none' store everything"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """precision of the frozen weights and of autocast (LoRA weights stay fp32); auto: bf16 on CUDA, no (fp32) on CPU"""
    kernels: Literal["auto", "triton", "eager"] = "auto"
    """CFG+DDIM step implementation: Triton on CUDA (auto), or the eager PyTorch reference"""
    compile: bool = False
    """torch.compile the UNet (inductor; forward and backward, LoRA included): on a 2-core CPU 0-18% less time per sample once compiled (bench_peer.py), after ~1.5 min of compiling in the first epoch; not measured on a GPU; results equal eager to float tolerance"""

    # --- the run and its files ---
    seed: int = 0
    """seed of the LoRA initialisation, the prompts drawn, the noise and the evaluation's fixed noise"""
    output_dir: str = "runs/alignprop"
    """where the run's files go: args.json, args.jsonl, log.jsonl, images/, eval/, checkpoints/ (one run per directory)"""
    resume: bool = False
    """continue the run in --output-dir from its last checkpoint (with the same arguments; a run that stopped before its first checkpoint restarts from scratch)"""
    overwrite: bool = False
    """delete the run already in --output-dir (its checkpoints, logs, images and evaluations) and start a new one there"""
    allow_changed_args: bool = False
    """with --resume: accept arguments that differ from the run's (they are recorded in args.jsonl)"""
    save_every: int = 1
    """write a checkpoint every N epochs (and after the last)"""
    keep_checkpoints: int = 3
    """keep the last N checkpoints (0 keeps all)"""
    eval_every: int = 5
    """evaluate on --eval-prompts every N epochs (and before training and after the last epoch; 0 disables)"""
    eval_num: int = 8
    """number of held-out prompts evaluated, the first N of --eval-prompts (fixed seeds, w_high, no DiffExp; at most the set's size)"""
    track: bool = False
    """log to Weights & Biases (plain JSON-lines logs are always written)"""
    wandb_project: str = "diffexp"
    """Weights & Biases project of --track"""


GRID_IMAGES = 16  # training samples shown per epoch in images/epoch_NNNN.png


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(args: Args):
    # --- check everything that can be checked before any model is loaded --------------------------
    import rewards
    from diffusion import (
        CheckpointError,
        check_checkpoints,
        check_run_dir,
        compile_problem,
        load_prompts,
        resolve_mixed_precision,
        vae_downsampling,
    )
    from explore import DiffExpConfig

    for ok, msg in [
        (args.num_epochs >= 1, f"--num-epochs must be >= 1, got {args.num_epochs}"),
        (
            args.samples_per_epoch >= 1,
            f"--samples-per-epoch must be >= 1 (images per epoch; paper: 64), got {args.samples_per_epoch}",
        ),
        (args.batch_size >= 1, f"--batch-size must be >= 1 (images per forward/backward pass), got {args.batch_size}"),
        (
            args.gradient_accumulation_steps >= 1,
            f"--gradient-accumulation-steps must be >= 1, got {args.gradient_accumulation_steps}",
        ),
        (args.num_steps >= 1, f"--num-steps must be >= 1 (DDIM denoising steps; paper: 50), got {args.num_steps}"),
        (
            1 <= args.backprop_steps <= args.num_steps,
            f"--backprop-steps must be in [1, --num-steps={args.num_steps}], got {args.backprop_steps}",
        ),
        (args.eta >= 0, f"--eta must be >= 0, got {args.eta}"),
        (math.isfinite(args.lr) and args.lr >= 0, f"--lr must be a number >= 0 (paper: 1e-3), got {args.lr}"),
        (0 <= args.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1), got {args.adam_beta1}"),
        (0 <= args.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1), got {args.adam_beta2}"),
        (args.adam_weight_decay >= 0, f"--adam-weight-decay must be >= 0, got {args.adam_weight_decay}"),
        (args.adam_epsilon > 0, f"--adam-epsilon must be > 0, got {args.adam_epsilon}"),
        (args.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 disables clipping), got {args.max_grad_norm}"),
        (args.lora_rank >= 1, f"--lora-rank must be >= 1, got {args.lora_rank}"),
        (
            args.lora_alpha > 0,
            f"--lora-alpha must be > 0 (the LoRA output is scaled by alpha / rank), got {args.lora_alpha}",
        ),
        (
            args.resolution is None or args.resolution > 0,
            f"--resolution must be a positive number of pixels, got {args.resolution}",
        ),
        (
            args.save_every >= 1,
            f"--save-every must be >= 1 (a checkpoint every N epochs; the last epoch is always saved), got {args.save_every}",
        ),
        (args.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0 (0 keeps all), got {args.keep_checkpoints}"),
        (args.eval_every >= 0, f"--eval-every must be >= 0 (0 turns evaluation off), got {args.eval_every}"),
        (
            args.eval_num >= 1,
            f"--eval-num must be >= 1 (to turn evaluation off pass --eval-every 0), got {args.eval_num}",
        ),
    ]:
        if not ok:
            fail(msg)
    diffexp = DiffExpConfig(
        args.cfg_schedule,
        args.prompt_weighting,
        args.t_sw,
        args.w_low,
        args.w_high,
        tuple(args.prompt_weight_range),
        args.exclude_stopwords,
        args.explore_frac,
        args.prompt_weight_pooled,
    )
    notes = []
    try:
        diffexp.validate()
        rewards.require_differentiable(args.reward)
        prompts = load_prompts(args.prompts, "--prompts")
        eval_prompts = load_prompts(args.eval_prompts, "--eval-prompts") if args.eval_every > 0 else []
        if len(eval_prompts) < args.eval_num and eval_prompts:
            notes.append(
                f"note: --eval-num {args.eval_num} is more than the {len(eval_prompts)} prompts of --eval-prompts {args.eval_prompts}: evaluating all {len(eval_prompts)}"
            )
        eval_prompts = eval_prompts[: args.eval_num]
        unknown = set(args.reward_models) - set(rewards.DEFAULT_MODELS) - {"custom_mode", "custom_target"}
        if unknown:
            raise ValueError(
                f"--reward-models: unknown key(s) {sorted(unknown)}; known: {', '.join(rewards.DEFAULT_MODELS)}"
            )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))

    def check_batches(world: int):
        """The batch size and the accumulation divide an epoch's images for `world` processes."""
        if args.samples_per_epoch % (args.batch_size * world):
            fail(
                f"--samples-per-epoch {args.samples_per_epoch} must be divisible by --batch-size {args.batch_size} x {world} processes"
            )
        if (args.samples_per_epoch // (args.batch_size * world)) % args.gradient_accumulation_steps:
            fail(
                f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the {args.samples_per_epoch // (args.batch_size * world)} "
                f"batches per process per epoch (--samples-per-epoch / (--batch-size x processes))"
            )

    check_batches(
        int(os.environ.get("WORLD_SIZE", "1"))
    )  # what accelerate will find (torchrun / accelerate launch set it)
    args.mixed_precision, precision_note = resolve_mixed_precision(args.mixed_precision)
    try:
        plan = check_run_dir(args)  # one run per --output-dir: refuse to mix two, or to lose one
        factor, source = vae_downsampling(args.pretrained, args.vae)
        if args.resolution is not None and args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of {factor}, the VAE's downsampling factor ({source}): try {max(factor, args.resolution // factor * factor)}"
            )
        needed = [("--pretrained", args.pretrained, ("model_index.json",))] + (
            [("--vae", args.vae, ("config.json",))] if args.vae else []
        )
        notes += check_checkpoints(needed + rewards.checkpoints_needed(args.reward, **args.reward_models))
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    if args.compile and (problem := compile_problem()):
        fail(problem)
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track logs to Weights & Biases: pip install wandb (or drop --track for plain logs)")
    if plan.finished:
        print(
            f"nothing to do: the run in {args.output_dir} has finished (its checkpoint {plan.checkpoint.name} is the last of --num-epochs "
            f"{args.num_epochs}); to train on, pass a larger --num-epochs (and --allow-changed-args if that moves DiffExp's exploration window)"
        )
        return

    from accelerate import Accelerator

    from diffusion import prepare_run_dir, run_dir_notes

    # cpu=True lets several CPU processes (torchrun, accelerate launch) form a gloo group when there is no GPU.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batches(world)
    batches_per_epoch = args.samples_per_epoch // (args.batch_size * world)
    accelerator.wait_for_everyone()  # every process has read --output-dir (check_run_dir) before anything in it is deleted
    deleted = prepare_run_dir(args.output_dir, plan) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    notes += run_dir_notes(args.output_dir, plan, deleted)
    if args.lr == 0:
        notes.append("note: --lr 0: the LoRA weights will not change (a dry run)")
    for line in [precision_note, *notes]:
        accelerator.print(line)

    # --- setup ---------------------------------------------------------------------------------------
    from torch.utils.checkpoint import checkpoint
    from tqdm import tqdm

    from diffusion import (
        RunLog,
        TextConditioner,
        add_lora,
        cfg_switch_warning,
        cfg_unet,
        compile_unet,
        decode,
        evaluate_held_out,
        load_checkpoint,
        load_pipeline,
        save_checkpoint,
        save_sample_grid,
        seeded,
    )
    from explore import diffexp_conditioning, is_exploring
    from kernels import DDIMSchedule, cfg_ddim_step

    device = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    try:
        pipe = load_pipeline(args.pretrained, device, weight_dtype, vae=args.vae)
        reward_fn = rewards.load_reward(args.reward, device=device, dtype=weight_dtype, **args.reward_models)
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    unet, T = pipe.unet, pipe.scheduler.config.num_train_timesteps
    torch.manual_seed(args.seed)  # identical LoRA initialisation on every process
    params = add_lora(unet, args.lora_rank, args.lora_alpha)
    if args.compile:
        compile_unet(unet)  # in place, after the adapters exist, so they are compiled too
    optimizer = torch.optim.AdamW(
        params,
        lr=args.lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    optimizer = accelerator.prepare(optimizer)  # loss scaling for fp16; the UNet itself is not wrapped (see below)

    pipe.scheduler.set_timesteps(args.num_steps)
    timesteps_host = pipe.scheduler.timesteps  # T-1 ... 0: noise to image; the guidance schedule is built on the host
    timesteps = timesteps_host.to(device)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps, device)
    step_coeffs = [
        schedule.coefficients(t.expand(args.batch_size), args.eta) for t in timesteps
    ]  # computed once, on device
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    latent_shape = (
        args.batch_size,
        unet.config.in_channels,
        resolution // pipe.vae_scale_factor,
        resolution // pipe.vae_scale_factor,
    )
    w_low_share = (pipe.scheduler.timesteps >= args.t_sw * T).float().mean().item()  # steps at w_low while exploring
    if diffexp.cfg_schedule and args.explore_frac > 0 and args.w_low != args.w_high and w_low_share in (0.0, 1.0):
        accelerator.print(cfg_switch_warning(timesteps_host, T, args.t_sw), file=sys.stderr)
    text = TextConditioner(pipe, resolution)  # prompts -> conditioning; .negative is CFG's, .empty DiffExp's e_empty
    if args.gradient_checkpointing == "blocks":  # diffusers checkpoints per block whenever grad is on, frozen or not
        unet.enable_gradient_checkpointing()
        pipe.vae.enable_gradient_checkpointing()
    log = RunLog(
        args.output_dir,
        args,
        args.track,
        args.wandb_project,
        enabled=accelerator.is_main_process,
        invocation=plan.record(),
    )

    start_epoch, samples_seen = 0, 0
    if plan.mode == "resume":
        ckpt = plan.checkpoint
        try:
            state = load_checkpoint(ckpt, unet)
        except CheckpointError as e:
            fail(str(e))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, samples_seen = state["epoch"] + 1, state["samples_seen"]
        log.truncate_after(state["epoch"])
        accelerator.print(f"resumed from {ckpt} (epoch {state['epoch']}, {samples_seen} samples)")

    def unet_eps(x, t, cond, w):
        """Unconditional and conditional model outputs in one UNet call (only the half a scale of
        exactly 1 or 0 needs: `w` is the step's guidance as a host number)."""
        with accelerator.autocast():
            out_u, out_c = cfg_unet(unet, x.to(weight_dtype), t, cond, text.negative, w)
        return out_u.float(), out_c.float()

    def evaluate(name: str):
        """Held-out evaluation into eval/NAME: 'initial' before training, epoch_NNNN after epoch NNNN
        (the same number as that epoch's checkpoint)."""
        if not eval_prompts or not accelerator.is_main_process:
            return {}
        with accelerator.autocast():
            return evaluate_held_out(
                pipe,
                reward_fn,
                eval_prompts,
                log.dir / "eval" / name,
                args.num_steps,
                args.w_high,
                seeded(args.seed, 10**6),
                resolution,
                args.kernels,
            )

    if start_epoch == 0:
        log.log({"epoch": -1, "samples": 0} | evaluate("initial"))

    # --- training loop -------------------------------------------------------------------------------
    for epoch in tqdm(
        range(start_epoch, args.num_epochs), desc="epochs", disable=not accelerator.is_local_main_process
    ):
        t0 = time.time()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        exploring = is_exploring(epoch, args.num_epochs, args.explore_frac)
        epoch_scores, epoch_components, losses, grad_norms, records = [], {}, [], [], []
        grid_images, grid_prompts = [], []  # up to GRID_IMAGES of the epoch's samples, spread over its batches

        for batch in range(batches_per_epoch):
            g = seeded(args.seed, epoch, rank, batch)
            batch_prompts = [prompts[i] for i in torch.randint(len(prompts), (args.batch_size,), generator=g).tolist()]
            cond, guidance_host, weights = diffexp_conditioning(
                diffexp, exploring, batch_prompts, text.encode(batch_prompts), text, timesteps_host, T, g
            )
            guidance = guidance_host.to(device)
            K = (
                int(torch.randint(1, args.backprop_steps + 1, (1,), generator=g))
                if args.backprop_steps_random
                else args.backprop_steps
            )
            x = torch.randn(latent_shape, generator=g).to(device)
            noise = [torch.randn(latent_shape, generator=g).to(device) if args.eta > 0 else None for _ in timesteps]

            # Denoise: the first N-K steps without a graph, the last K with one (truncated backprop).
            for i, t in enumerate(timesteps):
                with_grad = i >= args.num_steps - K
                with torch.set_grad_enabled(with_grad):
                    w_host = float(guidance_host[i])
                    if with_grad and args.gradient_checkpointing == "call":
                        out_u, out_c = checkpoint(unet_eps, x, t, cond, w_host, use_reentrant=False)
                    else:
                        out_u, out_c = unet_eps(x, t, cond, w_host)
                    w = guidance[i].expand(args.batch_size)
                    x = cfg_ddim_step(out_u, out_c, x, w, step_coeffs[i], noise=noise[i], backend=args.kernels)

            with accelerator.autocast():
                images = decode(pipe, x.to(weight_dtype))
                scores, components = reward_fn(images, batch_prompts)
            loss = -scores.float().mean()
            accelerator.backward(loss / args.gradient_accumulation_steps)

            if (batch + 1) % args.gradient_accumulation_steps == 0:
                # The UNet is called K times per backward, which DDP does not allow, so the LoRA
                # gradients are averaged across processes here, once per optimizer step.
                if world > 1:
                    flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
                    torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
                grad_norms.append(
                    accelerator.clip_grad_norm_(params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf"))
                )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            epoch_scores.append(scores.detach().float())
            for k, v in components.items():
                epoch_components.setdefault(k, []).append(v.detach().float())
            losses.append(loss.detach())
            records += [r.record() for r in weights]
            keep = -(-GRID_IMAGES // batches_per_epoch)
            grid_images.append((images[:keep].detach().float().clamp(0, 1) * 255).round().to(torch.uint8))
            grid_prompts += batch_prompts[:keep]

        # --- log ----------------------------------------------------------------------------------------
        scores = accelerator.gather(torch.cat(epoch_scores))  # every process's samples
        components = {k: accelerator.gather(torch.cat(v)) for k, v in epoch_components.items()}
        samples_seen += len(scores)
        elapsed = time.time() - t0
        record = {
            "epoch": epoch,
            "samples": samples_seen,
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
            **{f"reward/{k}": v.mean().item() for k, v in components.items()},
            "loss": torch.stack(losses).mean().item(),
            "grad_norm": torch.stack(grad_norms).mean().item(),
            "exploring": exploring,
            "w_low_share": w_low_share if exploring and diffexp.cfg_schedule else 0.0,
            "prompt_weights": records[:8],
            "seconds": elapsed,
            "sec_per_sample": elapsed / len(scores),
            "peak_mem_mb": (
                torch.cuda.max_memory_allocated()
                if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            )
            / 2**20,
        }
        if world > 1:  # processes must hold identical LoRA weights; log how far apart they are (0 when in sync)
            flat = torch.cat([p.detach().flatten() for p in params])
            record["lora_sync_error"] = (
                (accelerator.reduce(flat, "max") + accelerator.reduce(-flat, "max")).max().item()
            )  # max - min
        images_logged = {}
        if accelerator.is_main_process:
            grid = log.dir / "images" / f"epoch_{epoch:04d}.png"
            save_sample_grid(torch.cat(grid_images)[:GRID_IMAGES], grid_prompts[:GRID_IMAGES], grid)
            images_logged["samples"] = grid
        last = epoch == args.num_epochs - 1
        if args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or last):
            record |= evaluate(f"epoch_{epoch:04d}")
        log.log(record, images_logged)
        held_out = f"eval {record['eval_reward_mean']:.4f} " if "eval_reward_mean" in record else ""
        accelerator.print(
            f"epoch {epoch} samples {samples_seen} reward {record['reward_mean']:.4f}±{record['reward_std']:.4f} {held_out}"
            f"loss {record['loss']:.4f} grad_norm {record['grad_norm']:.3g} exploring {exploring} "
            f"{record['sec_per_sample']:.3f} s/sample peak {record['peak_mem_mb']:.0f} MiB"
        )

        if (epoch + 1) % args.save_every == 0 or last:
            if accelerator.is_main_process:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "samples_seen": samples_seen,
                }
                save_checkpoint(args.output_dir, epoch, unet, state, args.keep_checkpoints)
            accelerator.wait_for_everyone()

    accelerator.end_training()


def cli(argv: list[str] | None = None) -> Args:
    """The command line (sys.argv by default), with `--config NAME` presets."""
    from diffusion import parse_args_with_presets

    try:
        return parse_args_with_presets(Args, PRESETS, argv)
    except ValueError as e:
        fail(str(e))


if __name__ == "__main__":
    main(cli())
