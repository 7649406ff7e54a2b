"""DDPO with DiffExp: fine-tune Stable Diffusion's LoRA weights with a clipped policy gradient
(Black et al. 2024), exploring with DiffExp.

    python train_ddpo.py --reward aesthetic --t-sw 0.8
    accelerate launch --num_processes 8 train_ddpo.py --reward jpeg

Per epoch: sample trajectories with the DiffExp CFG schedule and randomly weighted prompts (while
exploring), storing for every step the latents, the log-prob, the guidance scale and the prompt
embeddings actually used; score the images (host-side rewards in a one-thread worker while the next batch samples);
turn rewards into advantages; then `inner_epochs` PPO passes over the trajectories, recomputing
each step's log-prob under exactly the conditions that sampled it (the README's consistency rule).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import torch
import tyro

from rewards import DEFAULT_MODELS, NAMES

REWARD_HELP = (
    f"reward to maximise: one of {', '.join(NAMES)}, custom:DIR (a train_reward.py model), or a weighted sum "
    f"such as 'hps:1,aesthetic:0.5' (non-differentiable rewards such as jpeg work here)"
)
REWARD_MODELS_HELP = (
    f"override reward checkpoints with a hub id or a local directory, KEY VALUE pairs, e.g. --reward-models aesthetic_model /ckpt/aesthetic; "
    f"keys: {', '.join(DEFAULT_MODELS)} (and custom_mode, custom_target for custom:DIR)"
)

# `--config NAME`: a named preset whose values become the defaults, each still overridable by its flag.
PRESETS = {
    # The shipped offline toy world (README): 32 px shapes, the toy-scorer CLIP as a PickScore-style
    # reward, two-shape training prompts, unseen shape-colour combinations held out; ~3-6 min on a CPU.
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
        sample_batch_size=8,
        train_batch_size=8,
        gradient_accumulation_steps=2,
        eval_every=5,
        eval_num=16,
        output_dir="runs/toy-ddpo",
    ),
}


@dataclass
class Args:
    config: Literal["toy"] | None = None
    """a preset filling in a whole setting, any flag still overriding it: 'toy' = the shipped offline toy world
    (--pretrained toy, pickscore with the toy-scorer, toy_two_shapes / toy_unseen prompts, 10 steps, fp32,
    30 epochs x 16 samples, output runs/toy-ddpo)"""

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
    w_high: float = 5.0
    """ordinary guidance scale (paper: 5.0 for DDPO)"""
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
    eta: float = 1.0
    """DDIM eta; must be > 0 (the policy needs a density)"""
    resolution: int | None = None
    """image size in pixels, a multiple of the VAE's downsampling factor (8 for SD; default: the model's native size, 512 for SD 1.5)"""
    samples_per_epoch: int = 64
    """trajectories per epoch across all processes (paper: 64)"""
    sample_batch_size: int = 8
    """trajectories sampled at once per process"""

    # --- PPO ---
    num_epochs: int = 100
    """number of epochs (one epoch = sampling samples_per_epoch trajectories, then --inner-epochs PPO passes over them)"""
    train_batch_size: int = 4
    """trajectories per training forward/backward pass per process"""
    gradient_accumulation_steps: int = 4
    """training batches per optimizer step (each already accumulates over its timesteps)"""
    inner_epochs: int = 1
    """PPO passes over each epoch's trajectories"""
    timestep_fraction: float = 1.0
    """fraction of the denoising steps trained on, a random subset per trajectory"""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon (paper: 1e-4)"""
    adv_clip_max: float = 5.0
    """advantages are clipped to [-adv_clip_max, adv_clip_max]"""
    per_prompt_stat_tracking: bool = True
    """normalise rewards per prompt with a running buffer (else by the batch)"""
    stat_buffer_size: int = 32
    """rewards kept per prompt for its mean/std"""
    stat_min_count: int = 16
    """below this many rewards for a prompt, normalise by the batch's mean/std (at most --stat-buffer-size)"""
    lr: float = 3e-4
    """AdamW learning rate (paper: 3e-4; 0 trains nothing: a dry run)"""
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
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """precision of the frozen weights and of autocast (LoRA weights and log-probs stay fp32); auto: bf16 on CUDA, no (fp32) on CPU"""
    kernels: Literal["auto", "triton", "eager"] = "auto"
    """step / loss implementation: Triton on CUDA (auto), or the eager PyTorch reference"""
    compile: bool = False
    """torch.compile the UNet (inductor; forward and backward, LoRA included): on a 2-core CPU 0-18% less time per sample once compiled (bench_peer.py), after ~1.5 min of compiling in the first epoch; not measured on a GPU; results equal eager to float tolerance"""

    # --- the run and its files ---
    seed: int = 0
    """seed of the LoRA initialisation, the prompts drawn, the noise and the evaluation's fixed noise"""
    output_dir: str = "runs/ddpo"
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
    """number of held-out prompts evaluated, the first N of --eval-prompts (fixed seeds, w_high, no DiffExp, eta 0; at most the set's size)"""
    track: bool = False
    """log to Weights & Biases (plain JSON-lines logs are always written)"""
    wandb_project: str = "diffexp"
    """Weights & Biases project of --track"""


GRID_IMAGES = 16  # training samples shown per epoch in images/epoch_NNNN.png


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


class PerPromptStatTracker:
    """Advantages (r - mean) / std with statistics per prompt string (DDPO): a prompt's own running
    buffer once it holds `min_count` rewards, the whole batch's statistics before that."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, {}

    def __call__(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # unique, in order
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            ref = np.array(buf) if len(buf) >= self.min_count else rewards
            advantages[idx] = (rewards[idx] - ref.mean()) / (ref.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.buffers.items()}

    def load_state_dict(self, state: dict):
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


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
            f"--samples-per-epoch must be >= 1 (trajectories per epoch; paper: 64), got {args.samples_per_epoch}",
        ),
        (
            args.sample_batch_size >= 1,
            f"--sample-batch-size must be >= 1 (trajectories sampled at once), got {args.sample_batch_size}",
        ),
        (
            args.train_batch_size >= 1,
            f"--train-batch-size must be >= 1 (trajectories per training pass), got {args.train_batch_size}",
        ),
        (
            args.gradient_accumulation_steps >= 1,
            f"--gradient-accumulation-steps must be >= 1, got {args.gradient_accumulation_steps}",
        ),
        (args.num_steps >= 1, f"--num-steps must be >= 1 (DDIM denoising steps; paper: 50), got {args.num_steps}"),
        (
            args.eta > 0,
            f"--eta must be > 0 for DDPO (eta = 0 gives sigma = 0 and no log-prob), got {args.eta}; the DDPO default is 1.0",
        ),
        (
            args.inner_epochs >= 1,
            f"--inner-epochs must be >= 1 (PPO passes over each epoch's trajectories), got {args.inner_epochs}",
        ),
        (0 < args.timestep_fraction <= 1, f"--timestep-fraction must be in (0, 1], got {args.timestep_fraction}"),
        (args.clip_range > 0, f"--clip-range must be > 0, got {args.clip_range} (paper: 1e-4)"),
        (
            args.adv_clip_max > 0,
            f"--adv-clip-max must be > 0 (advantages are clipped to [-max, max]), got {args.adv_clip_max}",
        ),
        (
            args.stat_buffer_size >= 1,
            f"--stat-buffer-size must be >= 1 (rewards kept per prompt), got {args.stat_buffer_size}",
        ),
        (args.stat_min_count >= 1, f"--stat-min-count must be >= 1, got {args.stat_min_count}"),
        (
            not args.per_prompt_stat_tracking or args.stat_min_count <= args.stat_buffer_size,
            f"--stat-min-count {args.stat_min_count} is more than --stat-buffer-size {args.stat_buffer_size} holds, so per-prompt statistics "
            f"would never be used: lower --stat-min-count or raise --stat-buffer-size",
        ),
        (math.isfinite(args.lr) and args.lr >= 0, f"--lr must be a number >= 0 (paper: 3e-4), got {args.lr}"),
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
        rewards.parse_reward_spec(args.reward)
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
        """The batch sizes divide an epoch's trajectories for `world` processes."""
        if args.samples_per_epoch % (args.sample_batch_size * world):
            fail(
                f"--samples-per-epoch {args.samples_per_epoch} must be divisible by --sample-batch-size {args.sample_batch_size} x {world} processes"
            )
        if (args.samples_per_epoch // world) % args.train_batch_size:
            fail(
                f"--train-batch-size {args.train_batch_size} must divide the {args.samples_per_epoch // world} trajectories per process per epoch"
            )
        if (args.samples_per_epoch // world // args.train_batch_size) % args.gradient_accumulation_steps:
            fail(
                f"--gradient-accumulation-steps {args.gradient_accumulation_steps} must divide the "
                f"{args.samples_per_epoch // world // args.train_batch_size} training batches per epoch"
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
    from accelerate.utils import gather_object

    from diffusion import prepare_run_dir, run_dir_notes

    # cpu=True lets several CPU processes (torchrun, accelerate launch) form a gloo group when there is no GPU.
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batches(world)
    samples_per_process = args.samples_per_epoch // world
    train_batches = samples_per_process // args.train_batch_size
    accelerator.wait_for_everyone()  # every process has read --output-dir (check_run_dir) before anything in it is deleted
    deleted = prepare_run_dir(args.output_dir, plan) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    notes += run_dir_notes(args.output_dir, plan, deleted)
    if args.lr == 0:
        notes.append("note: --lr 0: the LoRA weights will not change (a dry run)")
    for line in [precision_note, *notes]:
        accelerator.print(line)

    # --- setup ---------------------------------------------------------------------------------------
    from tqdm import tqdm

    from diffusion import (
        Conditioning,
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
    from kernels import DDIMSchedule, cfg_ddim_step, ddpo_clip_loss

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
    optimizer = accelerator.prepare(optimizer)  # loss scaling for fp16; gradients are averaged by hand below

    pipe.scheduler.set_timesteps(args.num_steps)
    timesteps_host = pipe.scheduler.timesteps  # T-1 ... 0: noise to image; the guidance schedule is built on the host
    timesteps = timesteps_host.to(device)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps, device)
    sample_coeffs = [schedule.coefficients(t.expand(args.sample_batch_size), args.eta) for t in timesteps]
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor
    latent_shape = (
        args.sample_batch_size,
        unet.config.in_channels,
        resolution // pipe.vae_scale_factor,
        resolution // pipe.vae_scale_factor,
    )
    num_train_steps = max(1, int(args.num_steps * args.timestep_fraction))
    w_low_share = (pipe.scheduler.timesteps >= args.t_sw * T).float().mean().item()
    if diffexp.cfg_schedule and args.explore_frac > 0 and args.w_low != args.w_high and w_low_share in (0.0, 1.0):
        accelerator.print(cfg_switch_warning(timesteps_host, T, args.t_sw), file=sys.stderr)
    text = TextConditioner(pipe, resolution)  # prompts -> conditioning; .negative is CFG's, .empty DiffExp's e_empty
    tracker = PerPromptStatTracker(args.stat_buffer_size, args.stat_min_count)
    log = RunLog(
        args.output_dir,
        args,
        args.track,
        args.wandb_project,
        enabled=accelerator.is_main_process,
        invocation=plan.record(),
    )
    # A reward that works on the host (JPEG encoding) is scored in a thread while the next batch samples.
    # That thread gets one intra-op thread: its first torch op would otherwise start a second full
    # OpenMP team, and two teams on the same cores slow the UNet far more than the overlap gains.
    # Rewards that run on the device gain little from a thread and run inline.
    host_reward = all(name.startswith("jpeg") for name, _ in rewards.parse_reward_spec(args.reward))
    reward_worker = (
        ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,)) if host_reward else None
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
        tracker.load_state_dict(state["stat_tracker"])
        start_epoch, samples_seen = state["epoch"] + 1, state["samples_seen"]
        log.truncate_after(state["epoch"])
        accelerator.print(f"resumed from {ckpt} (epoch {state['epoch']}, {samples_seen} samples)")

    def unet_eps(x, t, cond, w):
        """Unconditional and conditional outputs in one UNet call; t is a scalar or one timestep per
        sample, `w` each sample's guidance as host numbers (a sample at exactly 1 or 0 gets only the
        half it needs; sampling and training take the same shortcut, so the ratio stays 1)."""
        with accelerator.autocast():
            out_u, out_c = cfg_unet(unet, x.to(weight_dtype), t, cond, text.negative, w)
        return out_u.float(), out_c.float()

    def score(images, batch_prompts):
        with torch.no_grad(), accelerator.autocast():
            scores, components = reward_fn(images, batch_prompts)
        return scores.float(), {k: v.float() for k, v in components.items()}

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

        # --- sampling: store everything the training pass must reproduce ----------------------------
        trajectories, pending, records, grid_images = (
            [],
            [],
            [],
            [],
        )  # grid: up to GRID_IMAGES samples, spread over the batches
        sample_batches = samples_per_process // args.sample_batch_size
        for batch in range(sample_batches):
            g = seeded(args.seed, epoch, rank, batch)
            batch_prompts = [
                prompts[i] for i in torch.randint(len(prompts), (args.sample_batch_size,), generator=g).tolist()
            ]
            cond, guidance_host, weights = diffexp_conditioning(
                diffexp, exploring, batch_prompts, text.encode(batch_prompts), text, timesteps_host, T, g
            )
            guidance = guidance_host.to(device)
            # x_T and every step's noise in one draw (the same numbers as drawing them one at a time) and
            # one copy, so the denoising loop has no host-device transfer; the CPU generator keeps
            # samples identical on every device.
            noise = torch.randn((args.num_steps + 1, *latent_shape), generator=g).to(device)
            x = noise[0]
            latents, log_probs = [x], []
            with torch.no_grad():
                for i, t in enumerate(timesteps):
                    out_u, out_c = unet_eps(x, t, cond, float(guidance_host[i]))
                    z = noise[i + 1]
                    w = guidance[i].expand(args.sample_batch_size)
                    x, log_prob = cfg_ddim_step(
                        out_u, out_c, x, w, sample_coeffs[i], noise=z, return_log_prob=True, backend=args.kernels
                    )
                    latents.append(x)
                    log_probs.append(log_prob)
                images = decode(pipe, x.to(weight_dtype))
            pending.append(
                reward_worker.submit(score, images, batch_prompts) if reward_worker else score(images, batch_prompts)
            )
            trajectories.append(
                {
                    "latents": torch.stack(latents, 1),  # [B, N+1, C, H, W]: x_T ... x_0
                    "log_probs": torch.stack(log_probs, 1),  # [B, N]
                    "timesteps": timesteps.expand(args.sample_batch_size, -1),  # [B, N]
                    "guidance": guidance.expand(args.sample_batch_size, -1),  # [B, N]: the scale each step used
                    "guidance_host": guidance_host.expand(args.sample_batch_size, -1),  # the same, on the host (CPU)
                    "cond": cond,  # the (weighted) embeddings, and on SDXL the pooled embedding and time ids, as used
                }
            )
            records += [r.record() for r in weights]
            grid_images.append(
                (images[: -(-GRID_IMAGES // sample_batches)].float().clamp(0, 1) * 255).round().to(torch.uint8)
            )

        local_prompts = [r["prompt"] for r in records]
        results = [f.result() if reward_worker else f for f in pending]
        local_rewards = torch.cat([r[0] for r in results])
        components = {k: accelerator.gather(torch.cat([r[1][k] for r in results])) for k in results[0][1]}
        traj = {
            k: (Conditioning.cat if k == "cond" else torch.cat)([b[k] for b in trajectories]) for k in trajectories[0]
        }

        # --- advantages from every process's rewards -------------------------------------------------
        all_rewards = accelerator.gather(local_rewards)
        all_prompts = gather_object(local_prompts) if world > 1 else local_prompts
        rewards_np = all_rewards.cpu().numpy()
        if args.per_prompt_stat_tracking:
            advantages = tracker(all_prompts, rewards_np)
        else:
            advantages = (rewards_np - rewards_np.mean()) / (rewards_np.std() + 1e-6)
        advantages = torch.as_tensor(advantages, dtype=torch.float32).clamp(-args.adv_clip_max, args.adv_clip_max)
        traj["advantages"] = advantages.reshape(world, -1)[rank].to(device)  # this process's samples
        samples_seen += len(all_rewards)

        # --- PPO passes: recompute each selected step's log-prob under the sampling conditions -------
        stats = {
            "approx_kl": [],
            "clipfrac": [],
            "ratio_min": [],
            "ratio_max": [],
            "ratio_mean": [],
            "loss": [],
            "grad_norm": [],
        }
        for inner in range(args.inner_epochs):
            g = seeded(args.seed, epoch, rank, 10**4 + inner)
            perm = torch.randperm(samples_per_process, generator=g)
            step_perm = torch.stack([torch.randperm(args.num_steps, generator=g) for _ in range(samples_per_process)])[
                :, :num_train_steps
            ]
            perm_host, step_perm_host = perm, step_perm  # which guidance each row has is read on the host
            perm, step_perm = perm.to(device), step_perm.to(device)  # copied once per pass, not per step
            for tb in range(train_batches):
                idx = perm[tb * args.train_batch_size : (tb + 1) * args.train_batch_size]
                idx_host = perm_host[tb * args.train_batch_size : (tb + 1) * args.train_batch_size]
                b = {k: v[idx_host if k == "guidance_host" else idx] for k, v in traj.items()}
                for j in range(num_train_steps):
                    s = step_perm[idx, j]  # one denoising step per trajectory, shuffled
                    s_host = step_perm_host[idx_host, j]
                    rows = torch.arange(len(idx), device=device)
                    x_t, x_prev = b["latents"][rows, s], b["latents"][rows, s + 1]
                    t = b["timesteps"][rows, s]
                    coeffs = schedule.coefficients(t, args.eta)
                    out_u, out_c = unet_eps(x_t, t, b["cond"], b["guidance_host"][torch.arange(len(idx_host)), s_host])
                    loss, st = ddpo_clip_loss(
                        out_u,
                        out_c,
                        x_t,
                        x_prev,
                        b["guidance"][rows, s],
                        coeffs,
                        b["log_probs"][rows, s],
                        b["advantages"],
                        args.clip_range,
                        backend=args.kernels,
                    )
                    accelerator.backward(loss / (num_train_steps * args.gradient_accumulation_steps))
                    stats["loss"].append(loss.detach())
                    stats["approx_kl"].append(st["approx_kl"])
                    stats["clipfrac"].append(st["clipfrac"])
                    stats["ratio_min"].append(st["ratio"].min())
                    stats["ratio_max"].append(st["ratio"].max())
                    stats["ratio_mean"].append(st["ratio"].mean())
                if (tb + 1) % args.gradient_accumulation_steps == 0:
                    if world > 1:  # average LoRA gradients across processes (the UNet is not DDP-wrapped)
                        flat = accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
                        torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
                    stats["grad_norm"].append(
                        accelerator.clip_grad_norm_(
                            params, args.max_grad_norm if args.max_grad_norm > 0 else float("inf")
                        )
                    )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        # --- log ----------------------------------------------------------------------------------------
        elapsed = time.time() - t0
        st = {k: torch.stack([v.float() for v in vals]) for k, vals in stats.items()}
        record = {
            "epoch": epoch,
            "samples": samples_seen,
            "reward_mean": all_rewards.mean().item(),
            "reward_std": all_rewards.std().item() if len(all_rewards) > 1 else 0.0,
            **{f"reward/{k}": v.mean().item() for k, v in components.items()},
            "advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0,
            "advantage_min": advantages.min().item(),
            "advantage_max": advantages.max().item(),
            "loss": st["loss"].mean().item(),
            "approx_kl": st["approx_kl"].mean().item(),
            "clipfrac": st["clipfrac"].mean().item(),
            "ratio_mean": st["ratio_mean"].mean().item(),
            "ratio_min": st["ratio_min"].min().item(),
            "ratio_max": st["ratio_max"].max().item(),
            "grad_norm": st["grad_norm"].mean().item(),
            "exploring": exploring,
            "w_low_share": w_low_share if exploring and diffexp.cfg_schedule else 0.0,
            "prompt_weights": records[:8],
            "seconds": elapsed,
            "sec_per_sample": elapsed / len(all_rewards),
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
            per_batch = -(-GRID_IMAGES // sample_batches)
            grid_prompts = [
                p for k in range(sample_batches) for p in local_prompts[k * args.sample_batch_size :][:per_batch]
            ]
            save_sample_grid(torch.cat(grid_images)[:GRID_IMAGES], grid_prompts[:GRID_IMAGES], grid)
            images_logged["samples"] = grid
        last = epoch == args.num_epochs - 1
        if args.eval_every > 0 and ((epoch + 1) % args.eval_every == 0 or last):
            record |= evaluate(f"epoch_{epoch:04d}")
        log.log(record, images_logged)
        held_out = f"eval {record['eval_reward_mean']:.4f} " if "eval_reward_mean" in record else ""
        accelerator.print(
            f"epoch {epoch} samples {samples_seen} reward {record['reward_mean']:.4f}±{record['reward_std']:.4f} {held_out}"
            f"kl {record['approx_kl']:.2e} clipfrac {record['clipfrac']:.3f} ratio [{record['ratio_min']:.4f}, {record['ratio_max']:.4f}] "
            f"exploring {exploring} {record['sec_per_sample']:.3f} s/sample peak {record['peak_mem_mb']:.0f} MiB"
        )

        if (epoch + 1) % args.save_every == 0 or last:
            if accelerator.is_main_process:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "samples_seen": samples_seen,
                    "stat_tracker": tracker.state_dict(),
                }
                save_checkpoint(args.output_dir, epoch, unet, state, args.keep_checkpoints)
            accelerator.wait_for_everyone()

    if reward_worker is not None:
        reward_worker.shutdown()
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
