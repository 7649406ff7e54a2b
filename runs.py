"""A training run's plumbing, shared by train_ddpo.py and train_alignprop.py: the options both trainers
take, the checks made before any model loads, the output directory (one run per directory, held by one
process), the accelerator, resume, held-out evaluation, the epoch tail (log line, sample grid,
evaluation cadence, checkpoint) and the gradient all-reduce. The algorithms themselves (sampling, reward,
loss, update) stay in the trainer files; this module is what they call before and after them:

    run = runs.start(args, "ddpo", check_args)      # every argument checked, --output-dir held, nothing loaded yet
    pipe, reward_fn = run.load_models()             # the frozen base model and the reward (and run.text)
    params, optimizer = run.add_lora(unet)          # unet = diffusion.denoiser(pipe): LoRA weights and AdamW
    state = run.resume(unet, optimizer)             # {} for a new run
    timesteps_host, timesteps, schedule = run.sampling_steps(num_steps)
    model_outputs = run.guided(unet)                # CFG's two halves of one denoiser call
    for epoch in run.epochs():
        ...                                         # sample, score, loss, update
        grad_norm = run.reduce_and_clip(params)     # before optimizer.step(); run.update_ema() after
        run.end_epoch(epoch, rewards, record, ...)  # log, grid, evaluation, checkpoint

Files of a run (--output-dir): run.json (which trainer and model family made it), args.json (its current
arguments), args.jsonl (every invocation), log.jsonl (one JSON line per epoch, evaluation before training
as epoch -1), images/epoch_NNNN.png, eval/initial and eval/epoch_NNNN, checkpoints/epoch_NNNN, and
what sample.py derives from it (gallery.html, plots/). `.lock` exists while a process holds it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import itertools
import json
import math
import os
import resource
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro

import sharding
from rewards import DEFAULT_MODELS, NAMES

# ---------------------------------------------------------------------------------------------
# The options both trainers take. Each group is its own section of --help; the flags keep flat names
# (--pretrained, --lr, --output-dir, ...) and args.json stores them flat, as before the groups existed.


@dataclass
class ModelArgs:
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local directory of a Stable Diffusion 1.x/2.x, SDXL base, SD3/SD3.5 or FLUX.1-dev/-schnell checkpoint (diffusers layout); 'toy': the shipped toy world"""
    vae: str | None = None
    """replace the pipeline's VAE (hub id or directory), e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16"""
    reward: Annotated[
        str,
        tyro.conf.arg(
            help=f"reward to maximise: one of {', '.join(NAMES)}, custom:DIR (a train_reward.py model), or a weighted sum "
            f"such as 'hps:1,aesthetic:0.5'; train_alignprop.py needs a differentiable one (jpeg: train_ddpo.py only)"
        ),
    ] = "aesthetic"
    reward_models: Annotated[
        dict[str, str],
        tyro.conf.arg(
            help=f"override reward checkpoints with a hub id or a local directory, KEY VALUE pairs, e.g. --reward-models "
            f"aesthetic_model /ckpt/aesthetic; keys: {', '.join(DEFAULT_MODELS)} (and custom_mode, custom_target for custom:DIR)"
        ),
    ] = field(default_factory=dict)
    prompts: str = "simple_animals"
    """training prompts: a built-in set in prompts/ (without .txt), a text file (one prompt a line, '#' starts a comment line) or FILE.csv:COLUMN"""
    eval_prompts: str = "unseen_animals"
    """held-out prompts evaluated with fixed seeds every --eval-every epochs"""
    resolution: int | None = None
    """image size in pixels, a multiple of the VAE's downsampling factor (8 for SD); None: the model's native size (512 for SD 1.5)"""
    lora_rank: int = 4
    """LoRA rank r of the adapters on the denoiser's attention projections (to_q/k/v/out)"""
    lora_alpha: float = 4.0
    """LoRA alpha: the adapters' output is scaled by alpha / rank"""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """precision of the frozen weights and of autocast (LoRA weights, log-probs and reward preprocessing stay fp32); auto: bf16 on CUDA, no (fp32) elsewhere"""
    kernels: Literal["auto", "triton", "eager"] = "auto"
    """per-step math (CFG + step, DDPO's loss): the Triton kernels on CUDA (auto), or the eager PyTorch reference"""
    compile: bool = False
    """torch.compile the denoiser (inductor; forward and backward, LoRA included); the first epoch pays the compile time"""
    fsdp: bool = False
    """shard the frozen denoiser and its LoRA across the launch's processes (PyTorch FSDP2), for a model that does not fit one GPU; needs several processes (torchrun / accelerate launch); see docs/scaling.md"""
    cache_text: bool = False
    """encode every training and evaluation prompt once at the start, then move the text encoders off the device (their memory freed: T5-XXL's 9.5 GB in bf16)"""


@dataclass
class OptimArgs:
    lr: float = 1e-3
    """AdamW learning rate (0 trains nothing: a dry run)"""
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
    ema_decay: float = 0.0
    """keep an exponential moving average of the LoRA weights, ema = d * ema + (1 - d) * weights every --ema-every optimizer steps, and evaluate (--eval-every) with it; saved in each checkpoint (its LoRA in epoch_NNNN/ema/); 0: off"""
    ema_every: int = 1
    """optimizer steps between EMA updates (with --ema-decay)"""


@dataclass
class RunArgs:
    seed: int = 0
    """seed of the LoRA initialisation, the prompts drawn, the noise and the evaluation's fixed noise"""
    output_dir: str = "runs/run"
    """the run's directory (one run per directory): args.json, log.jsonl, images/, eval/, checkpoints/"""
    resume: bool = False
    """continue the run in --output-dir from its last checkpoint, with the same arguments (a run that stopped before its first checkpoint restarts from scratch)"""
    overwrite: bool = False
    """delete the run in --output-dir (everything it wrote, and what sample.py derived from it) and start a new one there"""
    allow_changed_args: bool = False
    """with --resume: accept arguments that differ from the run's (recorded in args.jsonl)"""
    save_every: int = 1
    """write a checkpoint every N epochs (and after the last)"""
    keep_checkpoints: int = 3
    """keep the last N checkpoints (0 keeps all)"""
    eval_every: int = 5
    """evaluate on --eval-prompts every N epochs, before training and after the last epoch (0 disables)"""
    eval_num: int = 8
    """held-out prompts evaluated: the first N of --eval-prompts (fixed seeds, w_high, no DiffExp, deterministic sampling)"""
    track: bool = False
    """also log to Weights & Biases (the JSON-lines logs are always written)"""
    wandb_project: str = "diffexp"
    """Weights & Biases project of --track"""


GROUPS = ("model", "optim", "diffexp", "run")  # the nested option groups of a trainer's Args


def flat_args(args) -> dict:
    """A trainer's arguments as one flat {name: value} dict (groups merged): what args.json holds."""
    out = {}
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        out |= flat_args(value) if dataclasses.is_dataclass(value) else {f.name: value}
    return out


def replace_flat(args, **values):
    """A copy of `args` with flat-named values put into whichever group holds each name."""
    args = dataclasses.replace(args)
    for name in GROUPS:
        if hasattr(args, name):
            setattr(args, name, dataclasses.replace(getattr(args, name)))
    for key, value in values.items():
        holder = next((getattr(args, g) for g in GROUPS if hasattr(getattr(args, g, None), key)), args)
        if not hasattr(holder, key):
            raise ValueError(f"unknown argument '{key}'")
        setattr(holder, key, value)
    return args


def parse_args_with_presets(cls, presets: dict[str, dict], argv: list[str] | None = None):
    """tyro.cli(cls) with flat flag names, where `--config NAME` makes a preset's values the defaults:
    every other flag still overrides them one by one, and --help shows them (a dict flag's KEY VALUE
    pairs override the preset's entries key by key). ValueError for an unknown preset."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = None
    for i, a in enumerate(argv):
        if a == "--config":
            name = argv[i + 1] if i + 1 < len(argv) else ""
        elif a.startswith("--config="):
            name = a.split("=", 1)[1]
    if name is not None and name not in presets:
        raise ValueError(f"--config: unknown preset '{name}'; known: {', '.join(presets)}")
    preset = presets[name] if name else {}
    # A dict field (--reward-models) with a non-empty default would change tyro's flag for it
    # (--reward-models.KEY VALUE), so the preset's dict entries are merged in after parsing.
    dicts = {k: v for k, v in preset.items() if isinstance(v, dict)}
    default = replace_flat(cls(), config=name, **{k: v for k, v in preset.items() if k not in dicts})
    args = tyro.cli(cls, args=argv, default=default, config=(tyro.conf.OmitArgPrefixes,))
    flat = flat_args(args)
    return replace_flat(args, **{k: {**v, **flat[k]} for k, v in dicts.items()})


def cli(cls, presets: dict[str, dict], argv: list[str] | None = None):
    """A trainer's command line (sys.argv by default) with `--config NAME` presets; one error line for an unknown preset."""
    try:
        return parse_args_with_presets(cls, presets, argv)
    except ValueError as e:
        fail(str(e))


# The shipped offline toy world (--config toy): 32 px shapes, the toy-scorer CLIP as a PickScore-style reward,
# two-shape training prompts, unseen shape-colour combinations held out; a few minutes on a CPU. Each trainer
# adds its batch sizes and output directory.
TOY_WORLD = dict(
    pretrained="toy", reward="pickscore", reward_models={"pickscore_model": "toy-scorer", "pickscore_processor": "toy-scorer"},
    prompts="toy_two_shapes", eval_prompts="toy_unseen", num_steps=10, mixed_precision="no", num_epochs=30,
    samples_per_epoch=16, gradient_accumulation_steps=2, eval_every=5, eval_num=16,
)  # fmt: skip


def fail(msg: str):
    """The one line a wrong invocation gets (exit 2)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def shared_checks(args) -> Iterator[tuple[bool, str]]:
    """(ok, error line) for the options of the shared groups."""
    m, o, r = args.model, args.optim, args.run
    # fmt: off
    yield args.num_epochs >= 1, f"--num-epochs must be >= 1, got {args.num_epochs}"
    yield args.num_steps >= 1, f"--num-steps must be >= 1 (denoising steps; paper: 50), got {args.num_steps}"
    yield args.gradient_accumulation_steps >= 1, f"--gradient-accumulation-steps must be >= 1, got {args.gradient_accumulation_steps}"
    yield m.lora_rank >= 1, f"--lora-rank must be >= 1, got {m.lora_rank}"
    yield m.lora_alpha > 0, f"--lora-alpha must be > 0 (the LoRA output is scaled by alpha / rank), got {m.lora_alpha}"
    yield m.resolution is None or m.resolution > 0, f"--resolution must be a positive number of pixels, got {m.resolution}"
    yield math.isfinite(o.lr) and o.lr >= 0, f"--lr must be a number >= 0, got {o.lr}"
    yield 0 <= o.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1), got {o.adam_beta1}"
    yield 0 <= o.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1), got {o.adam_beta2}"
    yield o.adam_weight_decay >= 0, f"--adam-weight-decay must be >= 0, got {o.adam_weight_decay}"
    yield o.adam_epsilon > 0, f"--adam-epsilon must be > 0, got {o.adam_epsilon}"
    yield o.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (0 disables clipping), got {o.max_grad_norm}"
    yield math.isfinite(o.ema_decay) and 0 <= o.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 turns the EMA off; e.g. 0.99), got {o.ema_decay}"
    yield o.ema_every >= 1, f"--ema-every must be >= 1 (optimizer steps between EMA updates), got {o.ema_every}"
    yield o.ema_every == 1 or o.ema_decay > 0, f"--ema-every {o.ema_every} does nothing without --ema-decay: pass --ema-decay (e.g. 0.99) or drop --ema-every"
    yield r.save_every >= 1, f"--save-every must be >= 1 (a checkpoint every N epochs; the last epoch is always saved), got {r.save_every}"
    yield r.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0 (0 keeps all), got {r.keep_checkpoints}"
    yield r.eval_every >= 0, f"--eval-every must be >= 0 (0 turns evaluation off), got {r.eval_every}"
    yield r.eval_num >= 1, f"--eval-num must be >= 1 (to turn evaluation off pass --eval-every 0), got {r.eval_num}"
    # fmt: on


# ---------------------------------------------------------------------------------------------
# Starting a run: everything checked, the directory held, the accelerator up; no model loaded.


def start(args, trainer: str, check_args, differentiable_reward: bool = False) -> Run | None:
    """Check every argument and the output directory, hold --output-dir, start the accelerator.

    `check_args(args, world)` gives the trainer's own (ok, error line) pairs for `world` processes; it is
    called with the WORLD_SIZE the launcher set before anything starts, and again with the accelerator's.
    Any failure is one `error:` line (exit 2) before a model is loaded. Returns None when --resume finds the
    run already finished (nothing to do)."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))  # what torchrun / accelerate launch asked for
    prompts, eval_prompts, plan, family, notes = preflight(args, trainer, check_args, env_world, differentiable_reward)
    r = args.run
    if plan.finished:
        print(
            f"nothing to do: the run in {r.output_dir} has finished (its checkpoint {plan.checkpoint.name} is the last of "
            f"--num-epochs {args.num_epochs}); to train on, pass a larger --num-epochs (and --allow-changed-args if that "
            f"moves DiffExp's exploration window)"
        )
        return None
    if int(os.environ.get("RANK", "0")) == 0:  # one holder per run, however many processes
        try:
            notes += hold(r.output_dir, trainer)
        except ValueError as e:
            fail(str(e))

    from accelerate import Accelerator

    # cpu=True lets several CPU processes (torchrun, accelerate launch) form a gloo group when there is no GPU.
    accelerator = Accelerator(mixed_precision=args.model.mixed_precision, cpu=not torch.cuda.is_available())
    asked = max(env_world, launcher_processes() or 1)
    if asked > 1 and accelerator.num_processes == 1:
        notes.append(
            f"note: {asked} processes were asked for but this is the only one (accelerate launch --num_processes N starts one "
            f"process on a machine without GPUs): training as one process; for N CPU processes launch with accelerate launch "
            f"--multi_gpu --num_processes {asked} ... or python -m torch.distributed.run --nproc_per_node {asked} ..."
        )
    for ok, msg in itertools.chain(
        sharding.checks(args, accelerator.num_processes), check_args(args, accelerator.num_processes)
    ):
        if not ok:
            fail(msg)
    run = Run(args, trainer, prompts, eval_prompts, plan, family)
    run.accelerator, run.device = accelerator, accelerator.device
    run.world, run.rank = accelerator.num_processes, accelerator.process_index
    run.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.model.mixed_precision]
    accelerator.wait_for_everyone()  # every process has read --output-dir before anything in it is deleted
    deleted = prepare_run_dir(r.output_dir, plan) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    notes += run_dir_notes(r.output_dir, plan, deleted)
    if args.optim.lr == 0:
        notes.append("note: --lr 0: the LoRA weights will not change (a dry run)")
    for line in notes:
        accelerator.print(line)
    global _current
    _current = run
    return run


def preflight(args, trainer: str, check_args, world: int, differentiable_reward: bool):
    """Everything checked before anything is held or loaded: the arguments (shared and the trainer's), the
    reward, the prompt sets and what the reward can read of them, the precision, every checkpoint, the
    model family, the output directory's plan, the resolution. One `error:` line on the first problem.
    Returns (prompts, eval_prompts, plan, family, notes to print)."""
    import rewards
    from diffusion import (
        CheckpointError,
        check_checkpoints,
        has_guidance_input,
        inspect_pipeline,
        load_prompts,
        resolution_multiple,
    )
    from explore import check_guidance

    m, r = args.model, args.run
    for ok, msg in itertools.chain(shared_checks(args), sharding.checks(args, world), check_args(args, world)):
        if not ok:
            fail(msg)
    notes = []
    try:
        args.diffexp.validate()
        (rewards.require_differentiable if differentiable_reward else rewards.parse_reward_spec)(m.reward)
        unknown = set(m.reward_models) - set(rewards.DEFAULT_MODELS) - {"custom_mode", "custom_target"}
        if unknown:
            raise ValueError(
                f"--reward-models: unknown key(s) {sorted(unknown)}; known: {', '.join(rewards.DEFAULT_MODELS)}"
            )
        prompts = load_prompts(m.prompts, "--prompts")
        eval_prompts = load_prompts(m.eval_prompts, "--eval-prompts") if r.eval_every > 0 else []
        if len(eval_prompts) < r.eval_num and eval_prompts:
            notes.append(
                f"note: --eval-num {r.eval_num} is more than the {len(eval_prompts)} prompts of --eval-prompts "
                f"{m.eval_prompts}: evaluating all {len(eval_prompts)}"
            )
        eval_prompts = eval_prompts[: r.eval_num]
        for flag, found, source in (
            ("--prompts", prompts, m.prompts),
            ("--eval-prompts", eval_prompts, m.eval_prompts),
        ):
            rewards.check_prompts(m.reward, found, flag, source, **m.reward_models)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    m.mixed_precision, precision_note = resolve_mixed_precision(m.mixed_precision)
    try:
        needed = [("--pretrained", m.pretrained, ("model_index.json",))]
        needed += [("--vae", m.vae, ("config.json",))] if m.vae else []
        notes += check_checkpoints(needed + rewards.checkpoints_needed(m.reward, **m.reward_models))
        family = inspect_pipeline(m.pretrained)
        if family == "sd" and args.diffexp.prompt_weight_pooled and args.diffexp.prompt_weighting:
            raise ValueError(
                "--prompt-weight-pooled: SD 1.x/2.x has no pooled text embedding (SDXL, SD3 and FLUX do); drop the flag"
            )
        check_guidance(args.diffexp, family, has_guidance_input(m.pretrained) if family == "flux" else None)
        args.diffexp = args.diffexp.for_family(family, trainer)  # --w-high None: the family's default, recorded
        plan = check_run_dir(args, trainer, family)
        factor, source = resolution_multiple(m.pretrained, m.vae, family)
        if m.resolution is not None and m.resolution % factor:
            raise ValueError(
                f"--resolution {m.resolution} is not a multiple of {factor}, the VAE's downsampling factor ({source}): "
                f"try {max(factor, m.resolution // factor * factor)}"
            )
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    if m.compile:
        from diffusion import compile_problem

        if problem := compile_problem():
            fail(problem)
    if r.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track logs to Weights & Biases: pip install wandb (or drop --track for plain logs)")
    return prompts, eval_prompts, plan, family, [precision_note, *notes]


def launcher_processes() -> int | None:
    """The --num_processes given to the `accelerate launch` that started this process, read from the
    parent's command line (Linux), or None: accelerate itself does not pass it on when it starts one."""
    try:
        argv = [
            a.decode(errors="replace") for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a
        ]
    except OSError:
        return None
    launcher = next(
        (i for i, a in enumerate(argv[:4]) if a == "launch" or a.endswith("accelerate.commands.launch")), None
    )
    if launcher is None or not any("accelerate" in a for a in argv[: launcher + 1]):
        return None
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith(("--num_processes=", "--num-processes=")) else None
        if a in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def resolve_mixed_precision(value: str) -> tuple[str, str]:
    """('no' | 'fp16' | 'bf16', a one-line note) for --mixed-precision, where 'auto' is bf16 on a CUDA
    device that supports it and float32 ('no') elsewhere (bf16 on a CPU is several times slower)."""
    if value != "auto":
        return value, f"mixed precision: {value}"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "mixed precision: bf16 (--mixed-precision auto: CUDA)"
    return "no", (
        "mixed precision: no, float32 (--mixed-precision auto: no CUDA device with bf16; pass --mixed-precision bf16 to force it)"
    )


GRID_IMAGES = 16  # training samples shown per epoch in images/epoch_NNNN.png


class Run:
    """One training run as its trainer sees it (made by `start`). Attributes: args, trainer ('ddpo' or
    'alignprop'), accelerator, device, weight_dtype, world, rank, prompts, eval_prompts, dir, log,
    start_epoch, samples_seen; after load_models: pipe, reward_fn."""

    def __init__(self, args, trainer: str, prompts, eval_prompts, plan, family: str):
        self.args, self.trainer, self.prompts, self.eval_prompts = args, trainer, prompts, eval_prompts
        self.plan, self.family, self.dir = plan, family, Path(args.run.output_dir)
        self.start_epoch, self.samples_seen, self.log = 0, 0, None
        self.pipe = self.reward_fn = None
        self.ema: EMA | None = None  # --ema-decay: made by add_lora
        self.sharded: list[int] | None = None  # --fsdp: the parameter values each process holds (add_lora)
        self._grid: list = []
        self._t0 = 0.0
        self.epoch = None  # the epoch in progress (what Ctrl-C reports)

    def load_models(self):
        """The frozen base pipeline on the device and the reward (one error line if either cannot load);
        also `run.text`, the TextConditioner that turns prompts into the model's conditioning."""
        import rewards
        from diffusion import CheckpointError, TextConditioner, load_pipeline, native_resolution
        from explore import prompt_notes

        m = self.args.model
        try:
            # --fsdp: the denoiser stays on the CPU until add_lora shards it onto the device
            self.pipe = load_pipeline(m.pretrained, "cpu" if m.fsdp else self.device, self.weight_dtype, vae=m.vae)
            if m.fsdp:
                sharding.place(self.pipe, self.device)
            self.reward_fn = rewards.load_reward(
                m.reward, device=self.device, dtype=self.weight_dtype, **m.reward_models
            )
        except (CheckpointError, ValueError) as e:
            fail(str(e))
        self.resolution = m.resolution or native_resolution(self.pipe)
        self.log = RunLog(self, self.args)
        # prompts -> conditioning (the trainers' one text path); .negative is CFG's (None: FLUX's distilled
        # guidance, no unconditional branch), .empty DiffExp's e_empty
        self.text = TextConditioner(self.pipe, self.resolution, true_cfg=self.args.diffexp.true_cfg)
        if m.cache_text:  # every prompt encoded now, then the text encoders leave the device
            self.text = sharding.CachedText(self.text, ["", *self.prompts, *self.eval_prompts])
        plain = replace(self.args.diffexp, prompt_weighting=False)  # evaluation never weights a prompt
        notes = prompt_notes(self.prompts, self.text, self.args.diffexp)
        for line in notes + prompt_notes(self.eval_prompts, self.text, plain, "--eval-prompts"):
            self.accelerator.print(line)
        return self.pipe, self.reward_fn

    def sampling_steps(self, num_steps: int):
        """(timesteps on the host, the same on the device, the schedule that gives every step's coefficients):
        noise to image, DDIM's or (SD3, FLUX at the run's resolution) the flow's. Says once which steps run at
        w_low while exploring."""
        from diffusion import sampling_schedule
        from explore import schedule_note

        # guidance is decided on the host, so choosing rows never syncs
        host, schedule = sampling_schedule(self.pipe, num_steps, self.resolution, self.device)
        self.w_low_share = schedule_note(self.args.diffexp, host, self.pipe.scheduler, self.accelerator.print)
        return host, host.to(self.device), schedule

    def guided(self, unet):
        """model_outputs(x, t, cond, w) -> (out_u, out_c), float32: the unconditional and conditional outputs
        of one denoiser call under the run's autocast (only the half a scale of exactly 1 or 0 needs: `w` holds
        host numbers, so sampling and DDPO's training pass take the same shortcut)."""
        from diffusion import cfg_unet

        def model_outputs(x, t, cond, w):
            with self.accelerator.autocast():
                out_u, out_c = cfg_unet(unet, x.to(self.weight_dtype), t, cond, self.text.negative, w)
            return out_u.float(), out_c.float()

        return model_outputs

    def add_lora(self, unet):
        """LoRA adapters on `unet` (the same initialisation on every process) and AdamW over them."""
        from diffusion import add_lora, compile_unet

        m, o = self.args.model, self.args.optim
        torch.manual_seed(self.args.run.seed)
        params = add_lora(unet, m.lora_rank, m.lora_alpha)
        if m.fsdp:  # the weights become this process's shards: the parameters to train are the new ones
            self.sharded = sharding.shard(unet, self.device)
            params = [p for p in unet.parameters() if p.requires_grad]
            self.accelerator.print(
                f"--fsdp: the denoiser's {sum(p.numel() for p in unet.parameters()):,} parameter values sharded over "
                f"{self.world} processes, each holding {', '.join(f'{n:,}' for n in self.sharded)}"
            )
        if m.compile:
            compile_unet(unet)  # in place, after the adapters exist, so they are compiled too
        optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon
        )
        # Loss scaling for fp16. The denoiser is not DDP-wrapped (it is called several times per backward):
        # reduce_and_clip averages the LoRA gradients across processes instead.
        self.params, self.optimizer = params, self.accelerator.prepare(optimizer)
        self.unet = unet
        self.ema = EMA(params, o.ema_decay, o.ema_every) if o.ema_decay > 0 else None
        return params, self.optimizer

    def resume(self, unet, optimizer) -> dict:
        """For --resume: the checkpoint's LoRA weights, optimizer and RNG state restored, the log cut back
        to it; returns the training state (the trainer restores its own extras from it). {} for a new run."""
        from diffusion import CheckpointError

        if self.plan.mode != "resume":
            return {}
        try:
            state = load_checkpoint(self.plan.checkpoint, unet)
        except CheckpointError as e:
            fail(str(e))
        optimizer.load_state_dict(state["optimizer"])
        sharding.shard_optimizer_state(optimizer)  # --fsdp: the checkpoint holds whole moments
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), self.accelerator.print)
        torch.set_rng_state(state["torch_rng"])
        self.start_epoch, self.samples_seen = state["epoch"] + 1, state["samples_seen"]
        self.log.truncate_after(state["epoch"])
        self.accelerator.print(
            f"resumed from {self.plan.checkpoint} (epoch {state['epoch']}, {self.samples_seen} samples)"
        )
        return state

    def epochs(self):
        """The epochs left to train, from the resumed one on, with a progress bar; evaluates first when the
        run is new (eval/initial, the log's epoch -1), so the console shows the held-out reward before training."""
        from tqdm import tqdm

        if self.start_epoch == 0:
            record = {"epoch": -1, "samples": 0} | self.evaluate("initial")
            self.log.log(record)
            if "eval_reward_mean" in record:
                self.accelerator.print(
                    f"before training: held-out reward {record['eval_reward_mean']:.4f} ({len(self.eval_prompts)} prompts)"
                )
        bar = tqdm(
            range(self.start_epoch, self.args.num_epochs),
            desc="epochs",
            disable=not self.accelerator.is_local_main_process,
        )
        for epoch in bar:
            self.epoch, self._t0, self._grid = epoch, time.time(), []
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            yield epoch
        bar.close()
        self.epoch = None
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            last = latest_checkpoint(self.dir)
            print(
                f"done: {self.dir} holds the run (log.jsonl, images/, eval/); last checkpoint {last}; "
                f"see it with: python sample.py gallery {self.dir}"
            )
        release()

    def keep_for_grid(self, images: torch.Tensor, prompts: list[str], batches_per_epoch: int):
        """Keep some of a batch's samples (uint8) for the epoch's grid: up to GRID_IMAGES, spread over the batches."""
        keep = -(-GRID_IMAGES // batches_per_epoch)
        pixels = (images[:keep].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        self._grid += list(zip(pixels, prompts[:keep]))

    def reduce_and_clip(self, params) -> torch.Tensor:
        """Average the LoRA gradients across processes (the denoiser is not DDP-wrapped; with --fsdp, FSDP has
        reduce-scattered them in backward), then clip them by global norm (--max-grad-norm; 0: no clipping).
        Returns the norm before clipping."""
        if self.world > 1 and not self.sharded:
            flat = self.accelerator.reduce(torch.cat([p.grad.flatten() for p in params]), reduction="mean")
            torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])
        max_norm = self.args.optim.max_grad_norm
        return sharding.gathered(self.accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))

    def evaluate(self, name: str) -> dict:
        """Held-out evaluation into eval/NAME ('initial' before training, epoch_NNNN after epoch NNNN, the
        number of that epoch's checkpoint), on the main process (with --fsdp on every process, which all take
        part in each denoiser call; the main one writes); {} when evaluation is off."""
        from diffusion import seeded

        main = self.accelerator.is_main_process
        if not self.eval_prompts or not (main or self.sharded):
            return {}
        with self.ema.swapped() if self.ema else contextlib.nullcontext(), self.accelerator.autocast():
            return evaluate_held_out(
                self.pipe, self.reward_fn, self.eval_prompts, self.dir / "eval" / name if main else None,
                self.args.num_steps, self.args.diffexp.w_high, seeded(self.args.run.seed, 10**6), self.resolution,
                self.args.model.kernels, text=self.text,
            )  # fmt: skip

    def end_epoch(self, epoch: int, rewards: torch.Tensor, record: dict, show: tuple[str, ...], components=None,
                   prompt_weights=(), state: dict | None = None):  # fmt: skip
        """Everything after an epoch's update: the log record (the trainer's `record` plus the rewards of
        every process's samples, time and memory), the sample grid, the evaluation when it is due, the
        console line (with the `show` keys of the record), and the checkpoint when it is due (the
        optimizer, RNG, epoch and sample count, plus the trainer's `state`)."""
        from accelerate.utils import gather_object

        from explore import is_exploring

        acc, r, diffexp = self.accelerator, self.args.run, self.args.diffexp
        exploring = is_exploring(epoch, self.args.num_epochs, diffexp.explore_frac)
        self.samples_seen += len(rewards)
        elapsed = time.time() - self._t0
        weights = gather_object(list(prompt_weights)) if self.world > 1 else list(prompt_weights)
        record = {
            "epoch": epoch,
            "samples": self.samples_seen,
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **{f"reward/{k}": v.mean().item() for k, v in (components or {}).items()},
            **record,
            "exploring": exploring,
            "w_low_share": self.w_low_share if exploring and diffexp.cfg_schedule else 0.0,
            "prompt_weights": weights,  # every sample's DiffExp word and weight
            "seconds": elapsed,
            "sec_per_sample": elapsed / len(rewards),
            **peak_memory(),
        }
        if self.sharded:  # --fsdp: the parameter values each process holds (measured when sharding)
            record["fsdp_params_per_process"] = self.sharded
        elif self.world > 1:  # processes must hold identical LoRA weights: how far apart they are (0 when in sync)
            flat = torch.cat([p.detach().flatten() for p in self.params])
            record["lora_sync_error"] = (acc.reduce(flat, "max") + acc.reduce(-flat, "max")).max().item()
        images = {}
        if acc.is_main_process and self._grid:
            pixels, prompts = zip(*self._grid[:GRID_IMAGES])
            images["samples"] = save_sample_grid(
                torch.stack(pixels), list(prompts), self.dir / "images" / f"epoch_{epoch:04d}.png"
            )
        last = epoch == self.args.num_epochs - 1
        if r.eval_every > 0 and ((epoch + 1) % r.eval_every == 0 or last):
            record |= self.evaluate(f"epoch_{epoch:04d}")
        self.log.log(record, images)
        held_out = f" eval {record['eval_reward_mean']:.4f}" if "eval_reward_mean" in record else ""
        shown = "".join(f" {k} {record[k]:.4g}" for k in show if k in record)
        mem = " ".join(
            f"peak {k.split('_')[1].upper()} {v:.0f} MiB" for k, v in record.items() if k.startswith("peak_")
        )
        if acc.is_main_process:  # tqdm.write: the line never lands on the progress bar's line
            from tqdm import tqdm

            tqdm.write(
                f"epoch {epoch} samples {self.samples_seen} reward {record['reward_mean']:.4f}±{record['reward_std']:.4f}"
                f"{held_out}{shown} exploring {record.get('exploring')} {record['sec_per_sample']:.3f} s/sample {mem}"
            )
        if (epoch + 1) % r.save_every == 0 or last:
            # every process: a sharded (--fsdp) run's LoRA, EMA and optimizer state are gathered whole, together
            full = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "epoch": epoch}
            full |= {"ema": self.ema.state_dict()} if self.ema else {}
            full, lora = sharding.gathered(full), sharding.gathered_lora(self.unet, self.ema)
            if acc.is_main_process:
                save_checkpoint(
                    self.dir,
                    epoch,
                    self.unet,
                    full | {"samples_seen": self.samples_seen} | (state or {}),
                    r.keep_checkpoints,
                    ema=self.ema,
                    lora=lora,
                )
            acc.wait_for_everyone()
        return record

    def update_ema(self):
        """Call after each optimizer step: counts it and updates the EMA when due (nothing without --ema-decay)."""
        if self.ema is not None:
            self.ema.update()


# ---------------------------------------------------------------------------------------------
# An exponential moving average of the LoRA weights (--ema-decay), for evaluation.


class EMA:
    """ema = d * ema + (1 - d) * weights after every `every`-th optimizer step, starting from the weights
    training starts with (no bias correction: those are the LoRA's initial weights, i.e. the base model).
    Averaging over the last ~1/(1 - d) updates smooths the step-to-step noise of the updates, so the
    held-out evaluation sees a steadier model than the last update alone. Kept in float32 beside the
    weights; every process holds the same copy (the weights are in sync), the main one evaluates with it."""

    def __init__(self, params: list[torch.Tensor], decay: float, every: int = 1):
        self.params, self.decay, self.every, self.steps = list(params), decay, every, 0
        self.weights = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        self.steps += 1
        if self.steps % self.every == 0:
            for e, p in zip(self.weights, self.params):
                e.mul_(self.decay).add_(p.detach().float(), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """The EMA weights in the model for the duration (evaluation), the trained ones back after, exactly."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.weights):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def state_dict(self) -> dict:
        return {"weights": [e.cpu() for e in self.weights], "steps": self.steps}

    def load_state_dict(self, state: dict | None, say=print):
        """Restore a checkpoint's EMA; a checkpoint without one (the EMA switched on at --resume) starts it
        from the resumed weights, and says so."""
        if state is None:
            self.weights = [p.detach().float().clone() for p in self.params]
            say("note: --ema-decay: the checkpoint holds no EMA (it was off): starting it from the resumed weights")
            return
        if [e.shape for e in state["weights"]] != [p.shape for p in self.params]:
            fail("--resume: the checkpoint's EMA does not match this model's LoRA layout (check --lora-rank)")
        self.weights = [
            sharding.shard_like(e.to(p.device, torch.float32), p).clone() for e, p in zip(state["weights"], self.params)
        ]
        self.steps = state["steps"]


def peak_memory() -> dict:
    """The epoch's peak memory, under a key that says which: the CUDA allocator's peak since the epoch
    began (peak_cuda_mb), or on a CPU the process's peak resident size since it started (peak_rss_mb,
    usually the model-loading peak: the OS keeps no per-epoch peak)."""
    if torch.cuda.is_available():
        return {"peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20}


# ---------------------------------------------------------------------------------------------
# Held-out evaluation (both trainers, the same noise every time).


@torch.no_grad()
def evaluate_held_out(
    pipe, reward_fn, prompts, out_dir, num_steps, w_high, generator, resolution=None, backend=None, text=None
) -> dict:
    """Held-out prompts, fixed seeds, constant w_high, no DiffExp, eta = 0: the same noise every
    time, so successive evaluations show what training changed. Saves NNN.png + prompts.json in
    `out_dir` (what sample.py's gallery reads; None: nothing saved) and returns the mean rewards for the
    log. `text`: the run's TextConditioner (its guidance mode; default: the pipeline's)."""
    from torchvision.utils import save_image

    from diffusion import TextConditioner, generate

    text = text if text is not None else TextConditioner(pipe, resolution)
    cond = text.encode(prompts)
    guidance = torch.full((num_steps,), float(w_high))
    images = generate(pipe, cond, guidance, num_steps, generator, 0.0, resolution, backend, negative=text.negative)
    scores, components = reward_fn(images, prompts)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            save_image(image, out_dir / f"{i:03d}.png")
        (out_dir / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "reward": scores.float().tolist()}))
    return {"eval_reward_mean": scores.float().mean().item()} | {
        f"eval_reward/{k}": v.float().mean().item() for k, v in components.items()
    }


# ---------------------------------------------------------------------------------------------
# Holding a directory: one process at a time, from before anything loads until it exits.

_held: dict = {}  # the directory this process holds: {"path", "fd", "created"}
_current: Run | None = None  # the run in progress (what Ctrl-C reports)


def hold(output_dir: str | Path, owner: str) -> list[str]:
    """Hold `output_dir` for this process (creating it if needed) with an exclusive lock on its .lock
    file, released when the process ends however it ends (the kernel drops the lock of a killed
    process). ValueError in one line naming the holder when another live process holds it; a .lock
    left by a dead process is taken over, said in the returned note. A directory this call created is
    removed again if the process exits before writing anything else into it."""
    import fcntl

    out = Path(output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    notes = []
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(path)
            os.close(fd)
            raise ValueError(
                f"--output-dir {out} is in use by process {holder.get('pid', '?')} ({holder.get('owner', 'another process')}, "
                f"started {holder.get('started', '?')}): wait for it to finish, or choose another --output-dir"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a .lock file its previous holder deleted between our open and our lock
            break
        os.close(fd)
    stale = _read_lock(path)
    if stale.get("pid") and stale.get("pid") != os.getpid():
        notes.append(
            f"note: {out} was held by process {stale['pid']} ({stale.get('owner', '?')}), which is no longer running: taken over"
        )
    info = {"pid": os.getpid(), "owner": owner, "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "argv": sys.argv}  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _held.update(path=out, fd=fd, created=created)
    atexit.register(release)
    return notes


RESULT_MARK = ".result.json"  # what sample.py wrote into a directory it owns


def claim_result(output_dir: str | Path, kind: str, overwrite: bool) -> Path:
    """Own `output_dir` for one result of `kind` (e.g. 'sample.py generate'), before anything loads: held
    like a run's directory, refused (ValueError, one line) when it holds a training run, files this
    project did not write, or another result (unless `overwrite`: then everything that result wrote is
    deleted first, so nothing of it stays beside the new one). Returns the directory."""
    import shutil

    out = Path(output_dir)
    hold(out, kind)
    entries = sorted(p for p in out.iterdir() if p.name != ".lock")
    if entries:
        mark = _read_lock(out / RESULT_MARK)
        problem = None
        if any((out / n).exists() for n in ("run.json", "args.json", "log.jsonl", "checkpoints")):
            problem = (
                f"--output-dir {out} holds a training run: choose another --output-dir (a run's directory is its own)"
            )
        elif not mark:
            shown = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
            problem = f"--output-dir {out} holds files that sample.py did not write ({shown}): choose an empty or new --output-dir"
        elif not overwrite:
            problem = (
                f"--output-dir {out} already holds a {mark.get('kind', 'sample.py')} result (written {mark.get('time', '?')}): "
                f"choose another --output-dir, or pass --overwrite to replace it"
            )
        if problem:
            release()
            raise ValueError(problem)
        for path in entries:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        print(
            f"note: --overwrite: deleted the earlier {mark.get('kind', 'sample.py')} result in {out}", file=sys.stderr
        )
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    (out / RESULT_MARK).write_text(json.dumps({"kind": kind, "time": now, "argv": sys.argv}))
    return out


def _read_lock(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def release():
    """Let go of the held directory: its .lock is deleted, and the directory too if this process created
    it and left nothing else in it (a run that never started leaves nothing behind)."""
    if not _held:
        return
    out, fd, created = _held.pop("path"), _held.pop("fd"), _held.pop("created")
    with contextlib.suppress(OSError):
        (out / ".lock").unlink()
    os.close(fd)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty


@contextlib.contextmanager
def interruptible():
    """Ctrl-C ends a trainer with one line (where it stopped, its last checkpoint, the command that
    resumes) and exit code 130, instead of a traceback. What was saved stays consistent: checkpoints
    are written under a temporary name and renamed into place."""
    try:
        yield
    except KeyboardInterrupt:
        run = _current
        if run is None or run.log is None:
            print("interrupted before the run started: nothing was written", file=sys.stderr)
        else:
            last = latest_checkpoint(run.dir)
            argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")] + ["--resume"]
            where = f"in epoch {run.epoch}" if run.epoch is not None else "before the first epoch"
            saved = f"last checkpoint {last}" if last else "no checkpoint yet (--resume restarts it from scratch)"
            print(
                f"interrupted {where}: {saved}; continue with: python {shlex.join([sys.argv[0], *argv])}",
                file=sys.stderr,
            )
        release()
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# The output directory: one run per directory, never two mixed, nothing computed deleted unasked.

RUN_OUTPUTS = (
    "checkpoints",
    "log.jsonl",
    "eval",
    "images",
    "gallery.html",
    "plots",
)  # what a run computed or was derived from it
ARGS_FILES = ("run.json", "args.json", "args.jsonl")
# Arguments that can change on --resume without changing what the run is (when it evaluates, saves,
# logs, how it computes the same numbers). Every other argument differing from the run's is refused,
# except --num-epochs when DiffExp's exploration window stays where it was (see _same_exploration).
HARMLESS_ARGS = frozenset({
    "output_dir", "resume", "overwrite", "allow_changed_args", "config", "eval_every", "save_every", "keep_checkpoints",
    "track", "wandb_project", "kernels", "gradient_checkpointing", "compile", "fsdp", "cache_text",
})  # fmt: skip
TRAINER_NAMES = {"ddpo": "a DDPO run (train_ddpo.py)", "alignprop": "an AlignProp run (train_alignprop.py)"}
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "FLUX.1", "unknown": "an unidentified model"}


@dataclass
class RunPlan:
    """What a trainer does with --output-dir (decided by check_run_dir before anything is loaded):
    'new' (empty or no directory), 'overwrite' (delete the old run's files first), 'restart' (--resume of
    a run that stopped before its first checkpoint: clear its partial files, start at epoch 0) or
    'resume' (continue from `checkpoint`). `changed`: argument -> [run's value, new value] accepted
    with --allow-changed-args; `finished`: a resumed run already holds its last epoch."""

    mode: str
    checkpoint: Path | None = None
    changed: dict | None = None
    found: tuple[str, ...] = ()
    finished: bool = False

    def record(self) -> dict:
        return {"mode": self.mode, "from_checkpoint": self.checkpoint.name if self.checkpoint else None} | (
            {"changed": self.changed} if self.changed else {}
        )


def run_identity(out: Path) -> dict | None:
    """{'trainer', 'family'} of the run in `out`: its run.json, or for a run written before run.json
    existed, the trainer told by its args.json (DDPO has --train-batch-size, AlignProp --backprop-steps)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((out / "run.json").read_text())
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((out / "args.json").read_text())
        trainer = "ddpo" if "train_batch_size" in old else "alignprop" if "backprop_steps" in old else None
        return {"trainer": trainer, "family": None} if trainer else None
    return None


def _flag_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def check_run_dir(args, trainer: str | None = None, family: str | None = None) -> RunPlan:
    """Decide what to do with --output-dir given --resume / --overwrite / --allow-changed-args, reading
    only; a ValueError (one line, naming the flags and the fix) when the directory holds another run (or
    another trainer's, which nothing continues), when --resume has nothing to resume, or when --resume's
    arguments differ from the run's (args.json) in anything but HARMLESS_ARGS."""
    r = args.run
    out = Path(r.output_dir)
    if r.resume and r.overwrite:
        raise ValueError(
            "--resume and --overwrite contradict each other: --resume continues the run in --output-dir, --overwrite deletes it; pass one"
        )
    found = tuple(n + ("/" if (out / n).is_dir() else "") for n in RUN_OUTPUTS if (out / n).exists())
    if found == ("checkpoints/",) and not any((out / "checkpoints").iterdir()):
        found = ()  # an empty checkpoints/ (a run stopped while writing its first checkpoint leaves .tmp_*)
    ckpt = latest_checkpoint(out)
    if r.overwrite:
        return RunPlan("overwrite", found=found)
    identity = run_identity(out)
    if r.resume and identity and trainer and identity.get("trainer") not in (None, trainer):
        what = TRAINER_NAMES.get(identity["trainer"], identity["trainer"])
        on = f" on {FAMILY_NAMES.get(identity['family'], identity['family'])}" if identity.get("family") else ""
        raise ValueError(
            f"--resume: --output-dir {out} holds {what}{on}, which only its own trainer continues: resume it with "
            f"train_{identity['trainer']}.py, or choose another --output-dir"
        )
    if not r.resume:
        if ckpt is not None:
            raise ValueError(
                f"--output-dir {out} already holds a run (checkpoints up to {ckpt.name}): pass --resume to continue it, "
                f"choose another --output-dir, or pass --overwrite to delete its files and start again"
            )
        if found:
            raise ValueError(
                f"--output-dir {out} already holds a run that stopped before its first checkpoint ({', '.join(found)}): pass --resume "
                f"to restart it there from scratch, choose another --output-dir, or pass --overwrite to delete its files"
            )
        return RunPlan("new")
    if ckpt is None:
        if not found:
            raise ValueError(
                f"--resume: --output-dir {out} holds no run to resume (no checkpoints/, log.jsonl, eval/ or images/); drop --resume to start one there"
            )
        return RunPlan("restart", found=found)
    _check_checkpoint_files(ckpt)
    if identity and family and identity.get("family") not in (None, family):
        raise ValueError(
            f"--resume: --output-dir {out} holds a run on {FAMILY_NAMES.get(identity['family'], identity['family'])}, "
            f"but --pretrained {args.model.pretrained} is {FAMILY_NAMES.get(family, family)}: resume it with its own --pretrained"
        )
    changed = {}
    recorded = out / "args.json"
    if recorded.is_file():
        try:
            old = json.loads(recorded.read_text())
        except ValueError:
            raise ValueError(
                f"--resume: {recorded} is not valid JSON; restore it, or pass --overwrite to start the run again"
            ) from None
        new = _jsonable(flat_args(args))
        changed = {k: [old[k], v] for k, v in new.items() if k not in HARMLESS_ARGS and k in old and old[k] != v}
        if "num_epochs" in changed and _same_exploration(old, new):
            del changed["num_epochs"]  # only the run's length changes: extending or shortening it is harmless
    if changed and not r.allow_changed_args:
        listed = ", ".join(
            f"--{k.replace('_', '-')} {_flag_value(a)} -> {_flag_value(b)}" for k, (a, b) in changed.items()
        )
        raise ValueError(
            f"--resume: these arguments differ from the run's ({recorded}): {listed}; rerun with the run's values, "
            f"or pass --allow-changed-args to continue it with the new ones"
        )
    epoch = int(ckpt.name.split("_", 1)[1])
    return RunPlan("resume", ckpt, changed, found, finished=epoch >= args.num_epochs - 1)


def _check_checkpoint_files(ckpt: Path):
    """The newest checkpoint must hold readable weights and state before anything loads: a deleted or
    truncated file is found here, not after minutes of loading (or mistaken for a finished run)."""
    for name in ("pytorch_lora_weights.safetensors", "training_state.pt"):
        path = ckpt / name
        ok = path.is_file() and path.stat().st_size > 8
        if ok and name.endswith(".safetensors"):
            size = path.stat().st_size
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                try:
                    header = json.loads(f.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    ok = 8 + n + end == size
                except (ValueError, KeyError, TypeError):
                    ok = False
        if not ok:
            raise ValueError(
                f"--resume: checkpoint {ckpt} is incomplete ({name} is {'missing' if not path.is_file() else 'truncated'}); "
                f"delete {ckpt} to resume from the checkpoint before it"
            )


def _same_exploration(old: dict, new: dict) -> bool:
    """--num-epochs changes what a run is only through DiffExp's exploration window (the first
    explore_frac of the epochs): True when every epoch both runs have explores (or not) alike."""
    frac = new.get("explore_frac")
    if frac is None or old.get("explore_frac") != frac:
        return False
    a, b = int(old["num_epochs"]), int(new["num_epochs"])
    return all((e < frac * a) == (e < frac * b) for e in range(min(a, b)))


def prepare_run_dir(output_dir: str | Path, plan: RunPlan) -> list[str]:
    """Carry out a RunPlan's deletions (main process only): 'overwrite' deletes the old run's files
    (RUN_OUTPUTS and its identity and argument history), 'restart' its partial outputs (the history is
    kept and the new invocation appended). Files the trainers did not write are left alone. Returns what
    was deleted."""
    import shutil

    out = Path(output_dir)
    names = (
        RUN_OUTPUTS + (ARGS_FILES if plan.mode == "overwrite" else ()) if plan.mode in ("overwrite", "restart") else ()
    )
    deleted = []
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        deleted.append(name)
    return deleted


def run_dir_notes(output_dir: str | Path, plan: RunPlan, deleted: list[str]) -> list[str]:
    """The lines a trainer prints about what it did to --output-dir (restart, overwrite, accepted changes)."""
    notes = []
    if plan.mode == "restart":
        notes.append(
            f"note: --resume: {output_dir} holds a run that stopped before its first checkpoint: restarting it from epoch 0 (deleted {', '.join(deleted)})"
        )
    elif plan.mode == "overwrite" and deleted:
        notes.append(f"note: --overwrite: deleted the previous run's files in {output_dir} ({', '.join(deleted)})")
    if plan.changed:
        notes.append(
            "note: --allow-changed-args: continuing with "
            + ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in plan.changed.items())
        )
    return notes


# ---------------------------------------------------------------------------------------------
# Logs: one JSON line per epoch (plain files always; Weights & Biases with --track).


class RunLog:
    """A run's files: run.json (which trainer and model family), args.json (the run's current arguments),
    args.jsonl (every invocation's arguments, appended: the history of the run), log.jsonl (one JSON line
    per epoch); Weights & Biases with --track. Written by the main process only."""

    def __init__(self, run: Run | str | Path, args=None):
        if isinstance(run, Run):
            self.dir, self.enabled, self.wandb = run.dir, run.accelerator.is_main_process, None
        else:
            self.dir, self.enabled, self.wandb = Path(run), True, None
        if not self.enabled or args is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        current = _jsonable(flat_args(args))
        if isinstance(run, Run):
            (self.dir / "run.json").write_text(json.dumps({"trainer": run.trainer, "family": run.family}))
        (self.dir / "args.json").write_text(json.dumps(current, indent=2))
        entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv[1:]}
        invocation = run.plan.record() if isinstance(run, Run) else {}
        with open(self.dir / "args.jsonl", "a") as f:
            f.write(json.dumps(entry | _jsonable(invocation) | {"args": current}) + "\n")
        if current.get("track"):
            import wandb

            self.wandb = wandb.init(project=current.get("wandb_project"), config=current, dir=str(self.dir))

    def log(self, record: dict, images: dict | None = None):
        if not self.enabled:
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self.wandb is not None:
            import wandb

            extra = {k: wandb.Image(str(v)) for k, v in (images or {}).items()}
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            self.wandb.log(numbers | extra, step=record.get("samples"))

    def truncate_after(self, epoch: int):
        """On resume, drop what epochs after the checkpoint wrote (log lines, eval/ and images/ of those
        epochs): they will be redone."""
        import shutil

        path = self.dir / "log.jsonl"
        if not self.enabled:
            return
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and _log_epoch(ln) <= epoch]
            path.write_text("".join(ln + "\n" for ln in lines))
        for old in [*(self.dir / "eval").glob("epoch_*"), *(self.dir / "images").glob("epoch_*.png")]:
            try:
                later = int(old.name.split("_", 1)[1].split(".")[0]) > epoch
            except ValueError:
                continue
            if later:
                shutil.rmtree(old) if old.is_dir() else old.unlink()


def _log_epoch(line: str) -> float:
    """A log line's epoch; a torn line (the run was killed while writing it) counts as after every epoch."""
    try:
        return json.loads(line).get("epoch", -1)
    except ValueError:
        return float("inf")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ---------------------------------------------------------------------------------------------
# LoRA checkpoints. A checkpoint is a directory written under a temporary name and renamed into
# place, so a crash mid-write never leaves a half checkpoint behind.


def save_checkpoint(
    output_dir: str | Path, epoch: int, unet, state: dict, keep: int = 3, ema: EMA | None = None, lora=None
) -> Path:
    """Write checkpoints/epoch_NNNN/ (diffusers LoRA weights + training state) atomically, with the
    permissions of every other output (the umask's), and byte-identical for identical training; keep
    the last `keep` checkpoints (0: keep all). With an EMA (--ema-decay), its weights also go to
    epoch_NNNN/ema/ in the same LoRA format, so `sample.py --lora .../epoch_NNNN/ema` and diffusers'
    load_lora_weights use them (resume reads the EMA from training_state.pt). `lora`: (weights, EMA
    weights) gathered from a sharded denoiser (sharding.gathered_lora), written instead of `unet`'s."""
    import shutil

    from diffusion import save_lora_weights

    weights, ema_weights = lora or (None, None)

    ckpt_root = Path(output_dir) / "checkpoints"
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = ckpt_root / f".tmp_epoch_{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora_weights(unet, tmp, weights)  # diffusers' LoRA format: the pipeline's load_lora_weights reads it
    _canonical_safetensors_header(tmp / "pytorch_lora_weights.safetensors")
    if ema is not None:
        with ema.swapped() if lora is None else contextlib.nullcontext():
            save_lora_weights(unet, tmp / "ema", ema_weights)
        _canonical_safetensors_header(tmp / "ema" / "pytorch_lora_weights.safetensors")
    torch.save(state, tmp / "training_state.pt")
    mode = 0o666 & ~_umask()  # safetensors writes 0600 (a private temp file renamed into place)
    for f in tmp.rglob("*"):
        os.chmod(f, 0o777 & ~_umask() if f.is_dir() else mode)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _canonical_safetensors_header(path: Path):
    """Rewrite a .safetensors file's JSON header with the metadata keys sorted and the tensors in the
    order of their data: safetensors writes the metadata map in the (per-process random) order of a
    hash map, so two identical runs would otherwise write different bytes. The tensor data is untouched."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    tensors = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    canonical = ({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}) | dict(tensors)
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (
        -len(text) % 8
    )  # the data starts 8-byte aligned, the header padded with spaces (as safetensors does)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (by epoch number, not by name)."""
    found = []
    for path in (Path(output_dir) / "checkpoints").glob("epoch_*"):
        try:
            found.append((int(path.name.split("_", 1)[1]), path))
        except ValueError:
            continue
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, unet) -> dict:
    """Load LoRA weights into `unet` (which already has adapters) and return the training state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from diffusion import CheckpointError, lora_weights_to_peft

    try:
        weights = load_file(ckpt / "pytorch_lora_weights.safetensors")
        state = torch.load(ckpt / "training_state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing to the user
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete that directory to resume from the one before it"
        ) from None
    peft_weights = lora_weights_to_peft(weights)
    incompatible = set_peft_model_state_dict(unet, peft_weights)
    if getattr(incompatible, "unexpected_keys", None):
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' does not match this model's LoRA layout (check --lora-rank and --pretrained)"
        )
    return state


# ---------------------------------------------------------------------------------------------
# The per-epoch sample grid.


def save_sample_grid(images: torch.Tensor, prompts: list[str], path: str | Path, columns: int | None = None,
                     tile: tuple[int, int] = (128, 256)):  # fmt: skip
    """A PNG grid of `images` (N x 3 x H x W, uint8 or floats in [0, 1]) with each prompt written under
    its image. Tiles are scaled to between tile[0] and tile[1] pixels (small images by a whole factor,
    nearest neighbour, so pixels stay sharp)."""
    from PIL import Image, ImageDraw, ImageFont

    images = images.detach().cpu()
    if images.is_floating_point():
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = images.shape
    scale = max(1, -(-tile[0] // max(h, w))) if max(h, w) < tile[0] else min(1.0, tile[1] / max(h, w))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    font = ImageFont.load_default()
    line_h = int(font.getbbox("Ag")[3]) + 2
    caption_h = 2 * line_h + 4
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = Image.new("RGB", (columns * (tw + 4) + 4, rows * (th + caption_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = 4 + (i % columns) * (tw + 4), 4 + (i // columns) * (th + caption_h + 4)
        img = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        img = img.resize((tw, th), Image.NEAREST if scale >= 1 else Image.LANCZOS)
        grid.paste(img, (x, y))
        for k, line in enumerate(_wrap(draw, str(prompts[i]) if i < len(prompts) else "", font, tw)[:2]):
            draw.text((x, y + th + 2 + k * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _wrap(draw, text: str, font, width: int, max_lines: int = 2) -> list[str]:
    """`text` in at most `max_lines` lines no wider than `width` pixels (cut with '...' where it does not fit)."""
    words, lines = text.split(), []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] += " " + " ".join(words)
    for i, line in enumerate(lines):
        if draw.textlength(line, font=font) > width:
            while line and draw.textlength(line + "...", font=font) > width:
                line = line[:-1]
            lines[i] = line + "..."
    return lines
