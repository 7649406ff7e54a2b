"""A training run's plumbing, shared by train_ddpo.py and train_alignprop.py: the options both trainers
take, the checks made before any model loads, the accelerator, the models and the LoRA weights, resume,
held-out evaluation, the epoch tail (log line, sample grid, evaluation cadence, checkpoint) and the
gradient all-reduce. The algorithms themselves (sampling, reward, loss, update) stay in the trainer files;
this module is what they call before and after them:

    run = runs.start(args, "ddpo", check_args)      # checked, --output-dir held, models loaded, LoRA made, resumed
    pipe, unet, params, optimizer = run.pipe, run.unet, run.params, run.optimizer   # a Run is complete when made
    model_outputs = run.guided(unet)                # CFG's two halves of one denoiser call
    for epoch in run.epochs():
        ...                                         # sample, score, loss, update
        grad_norm = run.reduce_and_clip(params)     # before optimizer.step(); run.update_ema() after
        run.end_epoch(epoch, rewards, record, ...)  # log, grid, evaluation, checkpoint

The run directory's rules (held by one process, one run per directory, the plan for --resume and
--overwrite, the log, the checkpoints and what they record, the sample grid) are rundir.py's. Files of a
run (--output-dir): run.json (which trainer and model family made it), args.json (its current arguments),
args.jsonl (every invocation), log.jsonl (one JSON line per epoch, evaluation before training as epoch
-1), images/epoch_NNNN.png, eval/initial and eval/epoch_NNNN, checkpoints/epoch_NNNN, and what sample.py
derives from it (gallery.html, plots/). `.lock` exists while a process holds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

import rundir
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


def parse_args_with_presets(cls, presets: dict[str, dict], argv: list[str] | None = None, recorded: dict | None = None):
    """tyro.cli(cls) with flat flag names, where `--config NAME` makes a preset's values the defaults:
    every other flag still overrides them one by one, and --help shows them (a dict flag's KEY VALUE
    pairs override the preset's entries key by key). `recorded`: a run's arguments (its args.json), the
    defaults above the preset's (--resume). ValueError for an unknown preset."""
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
    if recorded:  # what the run was started with, where this command line does not say otherwise
        fields = flat_args(cls())
        skip = {"output_dir", "resume", "overwrite", "allow_changed_args"} | ({"config"} if name else set())
        for key, value in recorded.items():
            if key in fields and key not in skip:  # a flag this version no longer has is left out
                as_tuple = isinstance(fields[key], tuple) and isinstance(value, list)  # JSON has no tuples
                preset = preset | {key: tuple(value) if as_tuple else value}
        name = preset.pop("config", name)
    # A dict field (--reward-models) with a non-empty default would change tyro's flag for it
    # (--reward-models.KEY VALUE), so the preset's dict entries are merged in after parsing.
    dicts = {k: v for k, v in preset.items() if isinstance(v, dict)}
    default = replace_flat(cls(), config=name, **{k: v for k, v in preset.items() if k not in dicts})
    args = tyro.cli(cls, args=argv, default=default, config=(tyro.conf.OmitArgPrefixes,))
    flat = flat_args(args)
    return replace_flat(args, **{k: {**v, **flat[k]} for k, v in dicts.items()})


def cli(cls, presets: dict[str, dict], argv: list[str] | None = None, trainer: str | None = None):
    """A trainer's command line (sys.argv by default) with `--config NAME` presets; with --resume of a run of
    this `trainer`, the flags not given take the run's values (its args.json: the base model, the preset, ...),
    not the defaults. One error line for an unknown preset."""
    try:
        args = parse_args_with_presets(cls, presets, argv)
        ours = args.run.resume and (rundir.run_identity(Path(args.run.output_dir)) or {}).get("trainer") == trainer
        recorded = rundir.recorded_args(args.run.output_dir) if ours else {}
        return parse_args_with_presets(cls, presets, argv, recorded) if recorded else args
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


# --eta's range, the same in both trainers and sample.py. DDIM: the step's coefficient sqrt(1 - ab_prev - sigma^2)
# is real only for eta <= 1 (above, it would be clamped: another sampler). SD3: the flow SDE's noise level a
# (std = a sqrt(sigma / (1 - sigma)); Flow-GRPO uses 0.7): any a >= 0 keeps the ODE's marginals, and the project
# keeps it to [0, 1] too, what has been used with these models (larger levels are untested here).
ETA_RANGE = "above 1 DDIM's coefficient sqrt(1 - ab_prev - sigma^2) is not real; on SD3 eta is the SDE noise level, kept to the same range"


def fail(msg: str):
    """The one line a wrong invocation gets (exit 2)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def shared_checks(args) -> Iterator[tuple[bool, str]]:
    """(ok, error line) for the options of the shared groups."""
    m, o, r, d = args.model, args.optim, args.run, args.diffexp
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
    yield not d.prompt_weight_pooled or d.prompt_weighting, "--prompt-weight-pooled weights the pooled embedding as prompt weighting weights the word, and --no-prompt-weighting turns that off: drop one of the two"
    # fmt: on


# ---------------------------------------------------------------------------------------------
# Starting a run: everything checked, the directory held, then the run made whole (models, LoRA, resume).


def start(args, trainer: str, check_args, differentiable_reward: bool = False) -> Run | None:
    """Check every argument and the output directory, hold --output-dir, start the accelerator, then make
    the Run: models loaded, LoRA and optimizer made, the checkpoint restored, the sampling steps set.

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
    held = None
    if int(os.environ.get("RANK", "0")) == 0:  # one holder per run, however many processes
        try:
            held = rundir.hold(r.output_dir, trainer)
        except ValueError as e:
            fail(str(e))
        notes += held.notes

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
    accelerator.wait_for_everyone()  # every process has read --output-dir before anything in it is deleted
    deleted = rundir.prepare_run_dir(r.output_dir, plan) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    notes += rundir.run_dir_notes(r.output_dir, plan, deleted)
    if args.optim.lr == 0:
        notes.append("note: --lr 0: the LoRA weights will not change (a dry run)")
    for line in notes:
        accelerator.print(line)
    return Run(args, trainer, family, accelerator, held, prompts, eval_prompts, plan)


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
        plan = rundir.plan_run(rundir.jsonable(flat_args(args)), trainer, family)
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
    if value == "fp16" and not torch.cuda.is_available():  # diffusers' own warning says it "will fail": it works
        return value, "mixed precision: fp16 on a CPU (it works, slowly: float32 or bf16 are faster here)"
    if value != "auto":
        return value, f"mixed precision: {value}"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "mixed precision: bf16 (--mixed-precision auto: CUDA)"
    return "no", (
        "mixed precision: no, float32 (--mixed-precision auto: no CUDA device with bf16; pass --mixed-precision bf16 to force it)"
    )


GRID_IMAGES = 16  # training samples shown per epoch in images/epoch_NNNN.png


class Run:
    """One training run as its trainer sees it, complete when made (by `start`): nothing of it depends on
    the order its methods are called in. Attributes, made in this order, each step reading what the ones
    before it made:

      args, trainer, family, prompts, eval_prompts, plan, dir   what start() checked and decided
      accelerator, device, world, rank, weight_dtype            the processes and the precision
      pipe, reward_fn, text, resolution                         1. the frozen base model and the reward
      log                                                       2. the run's files (once the models loaded)
      unet, params, optimizer, ema, sharded                     3. LoRA adapters on the denoiser (--fsdp: sharded), AdamW, the EMA
      state, start_epoch, samples_seen                          4. the checkpoint restored (--resume; {} and 0 for a new run)
      timesteps_host, timesteps, schedule, w_low_share          5. the sampling steps, noise to image
    """

    def __init__(self, args, trainer: str, family: str, accelerator, held, prompts, eval_prompts, plan):
        self.args, self.trainer, self.family, self.plan = args, trainer, family, plan
        self.prompts, self.eval_prompts, self.dir, self.held = prompts, eval_prompts, Path(args.run.output_dir), held
        self.accelerator, self.device = accelerator, accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        self.weight_dtype = dtypes[args.model.mixed_precision]
        self.epoch = None  # the epoch in progress (what Ctrl-C reports)
        self.sharded: list[int] | None = None  # --fsdp: the parameter values each process holds (_add_lora)
        self.log = None  # until the models loaded, nothing was written (what Ctrl-C reports)
        rundir.on_ctrl_c(self.interrupted_line)
        self.pipe, self.reward_fn, self.text, self.resolution = self._load_models()
        self.log = rundir.RunLog(self.dir, accelerator.is_main_process).start(
            flat_args(args), {"trainer": trainer, "family": family}, plan.record()
        )
        # what each checkpoint records: who wrote it, on which base model
        self.base = rundir.base_record(trainer, family, args.model.pretrained, args.model.vae)
        from diffusion import denoiser

        self.unet = denoiser(self.pipe)
        self.params, self.optimizer, self.ema = self._add_lora(self.unet)
        self.state = self._resume()
        self.start_epoch = self.state["epoch"] + 1 if self.state else 0
        self.samples_seen = self.state.get("samples_seen", 0)
        self.timesteps_host, self.timesteps, self.schedule, self.w_low_share = self._sampling_steps(args.num_steps)
        self._grid: list = []
        self._t0 = 0.0

    def _load_models(self):
        """The frozen base pipeline on the device and the reward (one error line if either cannot load), the
        TextConditioner that turns prompts into the model's conditioning, and the image size."""
        import rewards
        from diffusion import CheckpointError, TextConditioner, load_pipeline, native_resolution
        from explore import prompt_notes

        m = self.args.model
        try:
            # --fsdp: the denoiser stays on the CPU until _add_lora shards it onto the device
            pipe = load_pipeline(m.pretrained, "cpu" if m.fsdp else self.device, self.weight_dtype, vae=m.vae)
            if m.fsdp:
                sharding.place(pipe, self.device)
            reward_fn = rewards.load_reward(m.reward, device=self.device, dtype=self.weight_dtype, **m.reward_models)
        except (CheckpointError, ValueError) as e:
            fail(str(e))
        resolution = m.resolution or native_resolution(pipe)
        # prompts -> conditioning (the trainers' one text path); .negative is CFG's (None: FLUX's distilled
        # guidance, no unconditional branch), .empty DiffExp's e_empty
        text = TextConditioner(pipe, resolution, true_cfg=self.args.diffexp.true_cfg)
        if m.cache_text:  # every prompt encoded now, then the text encoders leave the device
            text = sharding.CachedText(text, ["", *self.prompts, *self.eval_prompts])
        plain = replace(self.args.diffexp, prompt_weighting=False)  # evaluation never weights a prompt
        notes = prompt_notes(self.prompts, text, self.args.diffexp)
        for line in notes + prompt_notes(self.eval_prompts, text, plain, "--eval-prompts"):
            self.accelerator.print(line)
        return pipe, reward_fn, text, resolution

    def _add_lora(self, unet):
        """LoRA adapters on `unet` (the same initialisation on every process), AdamW over them, and the EMA
        of --ema-decay (None without)."""
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
        ema = EMA(params, o.ema_decay, o.ema_every) if o.ema_decay > 0 else None
        return params, self.accelerator.prepare(optimizer), ema

    def _resume(self) -> dict:
        """For --resume: the checkpoint's LoRA weights, optimizer and RNG state restored, the log cut back
        to it (saying what it lost); returns the training state (the trainer restores its own extras from
        it). {} for a new run."""
        from diffusion import CheckpointError

        if self.plan.mode != "resume":
            return {}
        try:
            state = rundir.load_checkpoint(self.plan.checkpoint, self.unet)
        except CheckpointError as e:
            fail(str(e))
        self.optimizer.load_state_dict(state["optimizer"])
        sharding.shard_optimizer_state(self.optimizer)  # --fsdp: the checkpoint holds whole moments
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), self.accelerator.print)
        torch.set_rng_state(state["torch_rng"])
        for note in self.log.truncate_after(state["epoch"]):
            self.accelerator.print(note)
        self.accelerator.print(
            f"resumed from {self.plan.checkpoint} (epoch {state['epoch']}, {state['samples_seen']} samples)"
        )
        return state

    def _sampling_steps(self, num_steps: int):
        """(timesteps on the host, the same on the device, the schedule that gives every step's coefficients,
        the share of steps at w_low while exploring): noise to image, DDIM's or (SD3, FLUX at the run's
        resolution) the flow's. Says once which steps run at w_low while exploring."""
        from diffusion import sampling_schedule
        from explore import schedule_note

        # guidance is decided on the host, so choosing rows never syncs
        host, schedule = sampling_schedule(self.pipe, num_steps, self.resolution, self.device)
        w_low_share = schedule_note(self.args.diffexp, host, self.pipe.scheduler, self.accelerator.print)
        return host, host.to(self.device), schedule, w_low_share

    def interrupted_line(self) -> str:
        """What Ctrl-C prints: where the run stopped, its last checkpoint and the command that resumes it
        (the same command with --resume, and without --overwrite, which would delete the run)."""
        if self.log is None:
            return "interrupted before the run started: nothing was written"
        last = rundir.latest_checkpoint(self.dir)
        argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")] + ["--resume"]
        where = f"in epoch {self.epoch}" if self.epoch is not None else "before the first epoch"
        saved = f"last checkpoint {last}" if last else "no checkpoint yet (--resume restarts it from scratch)"
        return f"interrupted {where}: {saved}; continue with: python {shlex.join([sys.argv[0], *argv])}"

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

    def epochs(self):
        """The epochs left to train, from the resumed one on, with a progress bar when the console is a
        terminal; evaluates first when the run is new (eval/initial, the log's epoch -1), so the console shows
        the held-out reward before training. --output-dir stays held until the last epoch is saved."""
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
            disable=not (self.accelerator.is_local_main_process and sys.stderr.isatty()),  # a log file reads as lines
        )
        for epoch in bar:
            self.epoch, self._t0, self._grid = epoch, time.time(), []
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            yield epoch
        bar.close()
        self.epoch = None
        # Every process past its last collective before any tears the group down (a 2-process CPU run's second
        # process once aborted in teardown, 'terminate called without an active exception'; cause not found).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            last = rundir.latest_checkpoint(self.dir)
            print(
                f"done: {self.dir} holds the run (log.jsonl, images/, eval/); last checkpoint {last}; "
                f"see it with: python sample.py gallery {self.dir}"
            )
        if self.held is not None:
            self.held.release()

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

    def update_ema(self):
        """Call after each optimizer step: counts it and updates the EMA when due (nothing without --ema-decay)."""
        if self.ema is not None:
            self.ema.update()

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
            images["samples"] = rundir.save_sample_grid(
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
                rundir.save_checkpoint(self.dir, epoch, self.unet, full | {"samples_seen": self.samples_seen} | (state or {}),
                                       r.keep_checkpoints, ema=self.ema, record=self.base, lora=lora)  # fmt: skip
            acc.wait_for_everyone()
        return record


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
