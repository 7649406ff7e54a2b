"""Generate, evaluate and look at base or fine-tuned models.

    python sample.py generate --prompts unseen_animals --lora runs/alignprop/checkpoints/epoch_0099 --eval-rewards aesthetic,imagereward
    python sample.py explore --prompts unseen_animals --rewards pickscore,aesthetic --settings none diffexp cfg pw --sweep-w-low 0 3
    python sample.py plot runs/alignprop runs/alignprop-baseline --labels DiffExp AlignProp   # writes runs/eval_reward_mean_DiffExp_vs_AlignProp.png
    python sample.py gallery runs/alignprop          # writes runs/alignprop/gallery.html

`generate` saves every image, a grid and a CSV table of scores (one column per reward). `explore`
measures how much a sampling setting (no DiffExp, DiffExp, each part alone, sweeps of t_sw, w_low
and the prompt-weight range) explores before any training: reward spread, top rewards, how often a
sample beats the no-DiffExp 90th percentile, and within-prompt diversity, every setting from the
same starting noise. `plot` draws a run's reward against the cumulative number of samples (the
paper's x-axis). `gallery` writes a self-contained HTML page where a slider moves each held-out
prompt's fixed-seed image through the training epochs.

One result per output directory, as for the trainers: `generate` and `explore` refuse a directory that
holds another result (or files they did not write); --overwrite replaces their own earlier result.
`plot` and `gallery` of one run write inside it (plots/, gallery.html), where the run's --overwrite
removes them.
"""

from __future__ import annotations

import rundir  # first, and light: Ctrl-C while the rest imports (seconds) ends in one line, not a traceback

if __name__ == "__main__":
    rundir.on_ctrl_c(lambda: "interrupted while starting: nothing was written")

import base64
import csv
import html
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tyro.conf import Positional

from explore import DiffExpConfig


@dataclass
class SamplingDiffExp(DiffExpConfig):
    """DiffExp while generating (both parts off unless asked for)."""

    explore_frac: tyro.conf.Suppress[float] = 1.0  # a training schedule: generate samples as if exploring


@dataclass
class SettingBase(DiffExpConfig):
    """The values every --settings entry starts from (an entry's KEY=VALUE overrides them)."""

    cfg_schedule: tyro.conf.Suppress[bool] = True  # which parts are on is each setting's own choice
    prompt_weighting: tyro.conf.Suppress[bool] = True
    explore_frac: tyro.conf.Suppress[float] = 1.0


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_sampling_args(pretrained: str, vae: str | None, num_per_prompt: int, batch_size: int, num_steps: int, eta: float,
                        resolution: int | None, seed: int, min_per_prompt: int = 1):  # fmt: skip
    """One `error:` line (exit 2) for any count or value generate/explore cannot use, before loading."""
    if num_per_prompt < min_per_prompt:
        why = " (diversity and per-prompt statistics compare images of the same prompt)" if min_per_prompt > 1 else ""
        fail(f"--num-per-prompt must be >= {min_per_prompt}{why}, got {num_per_prompt}")
    if batch_size < 1:
        fail(f"--batch-size must be >= 1 (images generated at once), got {batch_size}")
    if num_steps < 1:
        fail(f"--num-steps must be >= 1 (denoising steps), got {num_steps}")
    if not 0.0 <= eta <= 1.0:
        from runs import ETA_RANGE

        fail(f"--eta must be in [0, 1] (0: deterministic sampling, 1: DDPM-like noise; {ETA_RANGE}), got {eta}")
    if seed < 0:
        fail(f"--seed must be >= 0, got {seed}")
    if resolution is not None:
        from diffusion import CheckpointError, inspect_pipeline, resolution_multiple

        try:
            family = inspect_pipeline(pretrained)
        except CheckpointError:
            family = None  # the checkpoint checks say what is wrong with it
        factor = resolution_multiple(pretrained, vae, family)[0]
        why = "the VAE's downsampling factor" + (", times 2 for FLUX's 2x2 latent patches" if family == "flux" else "")
        if resolution <= 0 or resolution % factor:
            fail(
                f"--resolution must be a positive multiple of {factor} ({why}), got {resolution}; "
                f"leave it out for the model's native size"
            )


def pick_dtype(mixed_precision: str, device: str) -> torch.dtype:
    """The weights' dtype; 'auto' is bf16 on CUDA and fp32 on the CPU (where bf16 is ~10x slower), said once."""
    from runs import resolve_mixed_precision

    resolved, note = resolve_mixed_precision(
        mixed_precision
    )  # the trainers' decision: 'auto' means the same everywhere
    if mixed_precision == "auto":
        bf16 = resolved == "bf16"
        where = (
            "bf16 (CUDA)"
            if bf16
            else "fp32 (no CUDA device with bf16)"
            if device == "cuda"
            else "fp32 (no CUDA device)"
        )
        print(f"--mixed-precision auto: {where}")
    elif resolved == "fp16" and device == "cpu":
        print(note, file=sys.stderr)
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[resolved]


def check_model_options(pretrained: str, cfg: DiffExpConfig, settings: list | None = None) -> DiffExpConfig:
    """DiffExp's options against the model family, read from the checkpoint before anything loads, as in the
    trainers (one `error:` line): --prompt-weight-pooled needs a pooled text embedding (not SD 1.x/2.x),
    --true-cfg needs FLUX.1, and a CFG schedule on FLUX.1-schnell (no guidance input) needs --true-cfg: `cfg`'s
    (generate) or, given explore's (label, config) `settings`, each setting's. Returns `cfg` with --w-high's
    family default filled in."""
    from diffusion import CheckpointError, has_guidance_input, inspect_pipeline
    from explore import check_guidance

    if cfg.prompt_weight_pooled and not cfg.prompt_weighting:
        fail(
            "--prompt-weight-pooled weights the pooled embedding as prompt weighting weights the word, and prompt "
            "weighting is off: pass --prompt-weighting too, or drop --prompt-weight-pooled"
        )
    try:
        family = inspect_pipeline(pretrained)
    except CheckpointError as e:
        fail(str(e))
    if cfg.prompt_weight_pooled and cfg.prompt_weighting and family == "sd":
        fail("--prompt-weight-pooled: SD 1.x/2.x has no pooled text embedding (SDXL, SD3 and FLUX do); drop the flag")
    guidance_input = has_guidance_input(pretrained) if family == "flux" else None
    try:
        for label, setting in settings if settings is not None else [(None, cfg)]:
            check_guidance(setting, family, guidance_input, label)
    except ValueError as e:
        fail(str(e))
    return cfg.for_family(family)


def note_unswitched_schedule(cfg, timesteps: torch.Tensor, scheduler, setting: str | None = None):
    """Say once (stderr) when a CFG schedule never switches at this many steps; the trainers' warning."""
    from explore import unswitched_schedule_warning

    warning = unswitched_schedule_warning(cfg, timesteps, scheduler, setting)
    if warning:
        print(warning, file=sys.stderr)


def note_repeated_prompts(prompt_list: list[str]):
    """Say when a prompt stands more than once: generate seeds image j of every prompt with --seed + j (the
    same noise across prompts, so prompts compare), so a repeated prompt gets the same images again."""
    repeats = len(prompt_list) - len(set(prompt_list))
    if repeats:
        print(
            f"note: --prompts: {repeats} of {len(prompt_list)} prompts repeat an earlier one and get the same images "
            f"(image j of a prompt is seeded --seed + j); for more images of a prompt use --num-per-prompt",
            file=sys.stderr,
        )


def load_models(pretrained: str, vae: str | None, lora: str | None, reward_names: list[str], reward_models: dict | None,
                mixed_precision: str):  # fmt: skip
    """(pipe, {reward name: scorer}, device) for generate and explore: every checkpoint (pipeline,
    --vae, each reward) is checked before any is loaded, as in the trainers; one error line on failure."""
    import rewards
    from diffusion import CheckpointError, check_checkpoints, load_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(mixed_precision, device)
    try:
        for note in check_checkpoints(needed_checkpoints(pretrained, vae, reward_names, reward_models)):
            print(note, file=sys.stderr)
        pipe = load_pipeline(pretrained, device, dtype, vae=vae)
        if lora is not None:
            load_lora(pipe, lora)
        scorers = {
            name: rewards.load_reward(name, device=device, dtype=dtype, **(reward_models or {}))
            for name in reward_names
        }
    except (CheckpointError, ValueError) as e:
        fail(str(e))
    return pipe, scorers, device


def needed_checkpoints(pretrained, vae, reward_names, reward_models) -> list:
    import rewards

    needed = [("--pretrained", pretrained, ("model_index.json",))] + ([("--vae", vae, ("config.json",))] if vae else [])
    for name in reward_names:
        needed += rewards.checkpoints_needed(name, **(reward_models or {}))
    return needed


def load_lora(pipe, lora: str):
    """A trainer's LoRA checkpoint into `pipe`, as its pipeline's loader reads it. A transformer-only LoRA
    (SD3's and FLUX's: every key 'transformer.') goes straight into the transformer: the pipeline's load_lora_weights
    also looks for text-encoder keys and prints, twice, that it found none."""
    from safetensors import safe_open

    path = Path(lora) / "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
    if keys and all(k.startswith("transformer.") for k in keys) and hasattr(pipe, "transformer"):
        # What SD3's and FLUX's load_lora_weights do for the transformer, without the text-encoder lookups.
        state_dict, metadata = pipe.lora_state_dict(lora, return_lora_metadata=True)
        pipe.transformer.load_lora_adapter(state_dict, network_alphas=None, metadata=metadata, _pipeline=pipe)
    else:
        pipe.load_lora_weights(lora)


def base_for(pretrained: str | None, lora: str | None) -> str:
    """--pretrained, or without it the base a trainer's --lora was trained on (said in a note), else SD 1.5."""
    from diffusion import DEFAULT_PRETRAINED

    if pretrained is not None:
        return pretrained
    found = rundir.recorded_base(lora) if lora is not None else None
    if found is None:
        return DEFAULT_PRETRAINED
    print(f"note: --pretrained: {found[0]}, the base --lora was trained on (from {found[1]})", file=sys.stderr)
    return found[0]


def check_lora(lora: str, pretrained: str):
    """--lora must be a trainer's checkpoint made on a base of --pretrained's family: a LoRA of another
    family matches none of its layers (diffusers then generates the base model's images without a word)."""
    from safetensors import safe_open

    from diffusion import CheckpointError, inspect_pipeline

    path = Path(lora) / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        fail(f"--lora {lora}: no pytorch_lora_weights.safetensors there (pass a checkpoints/epoch_NNNN directory)")
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
        family = inspect_pipeline(pretrained)
    except CheckpointError as e:
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - a file safetensors cannot read, whatever the reason
        fail(f"--lora {lora}: {path.name} is unreadable ({type(e).__name__}); pass a checkpoints/epoch_NNNN directory")
    ckpt = Path(lora).parent if Path(lora).name == "ema" else Path(lora)
    trained_on = rundir.checkpoint_record(ckpt).get("family")  # what the trainer recorded, else its run
    if trained_on is None and ckpt.parent.name == "checkpoints":
        trained_on = (rundir.run_identity(ckpt.parent.parent) or {}).get("family")
    if trained_on is None and keys:  # a LoRA from elsewhere: its keys say which denoiser it adapts
        prefixes = {k.split(".", 1)[0] for k in keys}
        trained_on = (
            {"transformer": "a transformer (SD3 or FLUX.1)", "unet": "a UNet (SD 1.x/2.x or SDXL)"}.get(prefixes.pop())
            if len(prefixes) == 1
            else None
        )
    fits = (
        trained_on in (None, family)
        or family == "unknown"
        or (trained_on.startswith("a UNet") and family in ("sd", "sdxl"))
        or (trained_on.startswith("a transformer") and family in ("sd3", "flux"))
    )
    if not fits:
        names = rundir.FAMILY_NAMES
        fail(
            f"--lora {lora} was trained on {names.get(trained_on, trained_on)}, but --pretrained {pretrained} is "
            f"{names.get(family, family)}: its layers would match nothing; pass the base it was trained on as --pretrained"
        )


def check_inputs(pretrained, vae, lora, prompts, reward_names, reward_models, flag: str, prompt: str | None,
                 prompt_set: str) -> None:  # fmt: skip
    """Every input generate/explore read, checked before anything loads or is written: the LoRA file and its
    base, each reward's name and checkpoint, and the prompts (from --prompt, else --prompts) against what each
    reward reads."""
    import rewards
    from diffusion import CheckpointError, check_checkpoints

    try:
        for name in reward_names:
            rewards.parse_reward_spec(name, flag)
            if prompt:
                rewards.check_prompts(name, prompts, "--prompt", **(reward_models or {}))
            else:
                rewards.check_prompts(name, prompts, "--prompts", prompt_set, **(reward_models or {}))
        check_checkpoints(needed_checkpoints(pretrained, vae, reward_names, reward_models))
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    if lora is not None:
        check_lora(lora, pretrained)


def claim_output(output_dir: str, kind: str, overwrite: bool):
    """Hold --output-dir for this result (rundir.claim); one error line if it may not take it."""
    try:
        return rundir.claim(output_dir, kind, overwrite)
    except ValueError as e:
        fail(str(e))


def prompt_list_of(prompt: str | None, prompts: str, max_prompts: int | None) -> list[str]:
    """The prompts generate/explore use: --prompt alone, or the first --max-prompts of --prompts."""
    from diffusion import load_prompts

    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt '': give a prompt, or leave --prompt out to use --prompts")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"--max-prompts must be >= 1, got {max_prompts}")
    return ([prompt] if prompt is not None else load_prompts(prompts, "--prompts"))[:max_prompts]


def generate(
    pretrained: str | None = None,
    lora: str | None = None,
    vae: str | None = None,
    prompts: str = "unseen_animals",
    prompt: str | None = None,
    max_prompts: int | None = None,
    num_per_prompt: int = 1,
    seed: int = 0,
    num_steps: int = 50,
    diffexp: SamplingDiffExp = SamplingDiffExp(cfg_schedule=False, prompt_weighting=False),
    eta: float = 0.0,
    resolution: int | None = None,
    eval_rewards: str = "",
    reward_models: dict[str, str] | None = None,
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto",
    batch_size: int = 8,
    output_dir: str = "samples",
    overwrite: bool = False,
):
    """Generate images for a prompt set (or one --prompt), optionally with a LoRA checkpoint and DiffExp.

    Args:
        pretrained: hub id or local directory of the base model (SD 1.x/2.x, SDXL base, SD3 or FLUX.1; `toy` for the toy world);
            default: the base --lora was trained on (its checkpoint says), else stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: a checkpoint directory written by the trainers (loaded with diffusers' LoRA loader).
        vae: replace the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16).
        prompts: built-in prompt set name or a text file, one prompt a line.
        prompt: a single prompt instead of --prompts.
        max_prompts: use only the first N prompts of --prompts.
        num_per_prompt: images per prompt (seeds seed, seed+1, ...).
        seed: first seed (>= 0); image (prompt i, j) uses its own generator seeded seed + j for x_T and the
            step noise, and another one for DiffExp's word and weight, so results do not depend on
            batching and DiffExp's draws never shift the noise (with the same seed, --prompt-weighting
            changes the conditioning only).
        num_steps: denoising steps.
        diffexp: DiffExp while sampling (--cfg-schedule, --prompt-weighting; off by default).
        eta: DDIM eta, in [0, 1] (on SD3 and FLUX: the flow SDE's noise level, in the same range).
        resolution: image size, a multiple of the VAE's factor (8 for SD/SDXL); None: the model's native size.
        eval_rewards: comma-separated rewards, each scored separately, e.g. 'aesthetic,imagereward'.
        reward_models: reward checkpoint overrides (keys of rewards.DEFAULT_MODELS).
        mixed_precision: weights' precision; auto: bf16 on CUDA, fp32 on the CPU.
        batch_size: images scored at once.
        output_dir: where images, grid.png and scores.csv go (one result per directory).
        overwrite: replace the earlier generate/explore result in --output-dir.
    """
    from diffusion import TextConditioner, sampling_schedule, seeded
    from diffusion import generate as generate_images
    from explore import diffexp_conditioning

    reward_names = [r.strip() for r in eval_rewards.split(",") if r.strip()]
    pretrained = base_for(pretrained, lora)
    check_sampling_args(pretrained, vae, num_per_prompt, batch_size, num_steps, eta, resolution, seed)
    try:
        diffexp.validate()
        prompt_list = prompt_list_of(prompt, prompts, max_prompts)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    diffexp = check_model_options(pretrained, diffexp)
    check_inputs(pretrained, vae, lora, prompt_list, reward_names, reward_models, "--eval-rewards", prompt, prompts)
    note_repeated_prompts(prompt_list)
    held = claim_output(output_dir, "sample.py generate", overwrite)
    out, total = held.path, len(prompt_list) * num_per_prompt
    rundir.on_ctrl_c(
        lambda: (
            f"interrupted: sample.py generate wrote {len(list(out.glob('[0-9]*.png')))} of {total} images to "
            f"{out}, marked unfinished; run it again with --overwrite to replace them"
        )
    )
    pipe, scorers, _ = load_models(pretrained, vae, lora, reward_names, reward_models, mixed_precision)

    from torchvision.utils import save_image
    from tqdm import tqdm

    T = pipe.scheduler.config.num_train_timesteps
    timesteps, _ = sampling_schedule(pipe, num_steps, resolution)  # on the host: the guidance schedule is read there
    note_unswitched_schedule(diffexp, timesteps, pipe.scheduler)
    text = TextConditioner(pipe, resolution, true_cfg=diffexp.true_cfg)
    exploring = diffexp.cfg_schedule or diffexp.prompt_weighting
    jobs = [(p, seed + j) for p in prompt_list for j in range(num_per_prompt)]
    rows, all_images = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not sys.stderr.isatty()):
        batch = jobs[start : start + batch_size]
        images = []
        for p, s in batch:  # one generator per image: the same seed gives the same image at any batch size
            g = torch.Generator().manual_seed(s)  # x_T and the step noise
            choices = seeded(s, 1)  # DiffExp's word and weight: drawn apart, so they never shift the noise
            cond, guidance, weights = diffexp_conditioning(
                diffexp, exploring, [p], text.encode([p]), text, timesteps, T, choices
            )
            images.append(generate_images(pipe, cond, guidance, num_steps, g, eta, resolution, negative=text.negative))
            rows.append(
                {
                    "index": len(rows),
                    "prompt": p,
                    "seed": s,
                    "word": weights[0].word or "",
                    "weight": round(weights[0].weight, 3),
                }
            )
        images = torch.cat(images)
        for name, scorer in scorers.items():
            with torch.no_grad():
                scores, _ = scorer(images, [p for p, _ in batch])
            for row, v in zip(rows[start:], scores.tolist()):
                row[name] = v
        for row, image in zip(rows[start:], images):
            save_image(image, out / f"{row['index']:04d}.png")
        all_images.append(images.cpu())
    grid = torch.cat(all_images)
    save_image(grid, out / "grid.png", nrow=max(1, math.ceil(math.sqrt(len(grid)))))
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name in reward_names:
        vals = torch.tensor([r[name] for r in rows])
        print(f"{name}: mean {vals.mean():.4f} std {vals.std() if len(vals) > 1 else 0:.4f} over {len(vals)} images")
    rundir.finish(held)  # the result is complete: marked so, and the directory is no longer in use
    print(f"wrote {len(rows)} images, grid.png and scores.csv to {out}")


# ---------------------------------------------------------------------------------------------
# explore: how much a sampling setting explores, measured before any training.

# A setting is BASE or BASE:KEY=VALUE,...; BASE says which DiffExp parts are on.
SETTING_BASES = {"none": (False, False), "diffexp": (True, True), "cfg": (True, False), "pw": (False, True)}
# Each key and the part it belongs to (None: both, and also no DiffExp).
SETTING_KEYS = {"t_sw": "cfg", "w_low": "cfg", "w_high": None, "range": "pw"}
SETTING_SYNTAX = (
    "a setting is none, diffexp, cfg or pw, optionally followed by :KEY=VALUE,... with KEY t_sw, w_low, w_high "
    "or range=LO:HI (e.g. 'cfg:w_low=0', 'pw:range=1:3', 'diffexp:t_sw=0.7,w_low=0'; a bare 't_sw=0.7' means diffexp:t_sw=0.7)"
)


def explore(
    pretrained: str | None = None,
    lora: str | None = None,
    vae: str | None = None,
    prompts: str = "unseen_animals",
    prompt: str | None = None,
    max_prompts: int | None = None,
    rewards: str = "",
    reward_models: dict[str, str] | None = None,
    settings: tuple[str, ...] = ("none", "diffexp", "cfg", "pw"),
    sweep_t_sw: tuple[float, ...] = (),
    sweep_w_low: tuple[float, ...] = (),
    sweep_weight_range: tuple[str, ...] = (),
    base: SettingBase = SettingBase(),
    num_per_prompt: int = 8,
    seed: int = 0,
    num_steps: int = 50,
    eta: float = 0.0,
    resolution: int | None = None,
    top_frac: float = 0.1,
    threshold: float | None = None,
    threshold_quantile: float = 0.9,
    success_threshold: float | None = None,
    grid_prompts: int = 4,
    grid_images: int = 8,
    save_images: bool = False,
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto",
    batch_size: int = 8,
    output_dir: str = "runs/explore",
    overwrite: bool = False,
):
    """Measure how much each sampling setting explores, before training: N images per prompt per
    setting, every setting from the same starting noise, scored by one or more rewards.

    Settings (--settings, any number, in the order given; the first 'none' is the reference):
      none                   no DiffExp: constant guidance w_high
      diffexp                both parts: the CFG schedule (w_low on the noisy steps) and random prompt weighting
      cfg                    the CFG schedule only
      pw                     prompt weighting only
      BASE:KEY=VALUE,...     one of those with other values; KEY is t_sw, w_low, w_high or range=LO:HI,
                             e.g. 'cfg:w_low=0', 'pw:range=1:3', 'diffexp:t_sw=0.7,w_low=0', 'none:w_high=5'
                             (a bare 't_sw=0.7' means diffexp:t_sw=0.7). Unset keys take --t-sw, --w-low,
                             --w-high, --prompt-weight-range. A key the setting does not use (e.g.
                             'pw:t_sw=0.7') is an error.

    Sweeps add one setting per value, each part alone so a difference is that part's:
      --sweep-t-sw 0.6 0.7 0.9 adds cfg:t_sw=0.6 ...; --sweep-w-low 0 3 adds cfg:w_low=0 ...;
      --sweep-weight-range 1:1.5 1:3 adds pw:range=1:1.5 .... A setting equal to an earlier one is run once.

    Same starting noise: the prompts' images are cut into batches of --batch-size in one fixed order
    (prompt by prompt, index by index), the same for every setting, and batch b's x_T and step noise
    come from one generator seeded by (--seed, b) alone; DiffExp's word and weight for (prompt p,
    index n) come from a separate generator seeded by (--seed, p, n). So image (p, n) starts from the
    same noise in every setting (and in every run with the same --seed and --batch-size), a setting
    differs from 'none' only through its guidance schedule and conditioning, and a weight-range sweep
    reuses the same word and the same uniform draw (w = LO + (HI - LO) u).

    Outputs in --output-dir: explore.md (the tables), explore.csv (one row per image: setting, prompt,
    index, chosen word and weight, every reward), explore.json (the statistics), explore.png (the
    first reward's distribution per setting, and diversity against mean reward), grids/NN_SETTING.png
    (the first --grid-prompts prompts, one row each, the same noise in every setting's grid),
    grids/compare_pPPP.png (one prompt, one row per setting, labelled, the prompt written above) and,
    with --save-images, images/NN_SETTING/pPPP_NN.png.

    Statistics (per setting; see explore_stats): reward mean and std; the within-prompt std; the mean
    of the top --top-frac of each prompt's samples; the fraction of samples above their prompt's
    threshold (default: the reference setting's --threshold-quantile of that prompt; --threshold
    fixes one); the mean paired difference from the reference (same noise) with its standard error;
    within-prompt diversity, the mean pairwise cosine distance of image embeddings from the first
    reward with an image tower (aesthetic, pickscore, hps, imagereward, a CLIP custom reward), else of
    the images downsampled to 32x32 pixels; with --success-threshold, the per-prompt success rate of
    the first reward (reward >= threshold) and the fraction of prompts with at least one success.

    Args:
        pretrained: hub id or local directory of the base model (SD 1.x/2.x, SDXL base, SD3 or FLUX.1; `toy` for the toy world);
            default: the base --lora was trained on (its checkpoint says), else stable-diffusion-v1-5/stable-diffusion-v1-5.
        lora: a checkpoint directory written by the trainers (measure a fine-tuned model's exploration).
        vae: replace the pipeline's VAE.
        prompts: built-in prompt set name or a file (one prompt a line, '#' starts a comment line).
        prompt: a single prompt instead of --prompts.
        max_prompts: use only the first N prompts of --prompts.
        rewards: comma-separated rewards, each scored separately; the first is the one the threshold,
            success rate and plot use (e.g. 'pickscore,aesthetic'; toy world: 'pickscore' with
            --reward-models pickscore_model toy-scorer pickscore_processor toy-scorer).
        reward_models: reward checkpoint overrides (keys of rewards.DEFAULT_MODELS).
        settings: the sampling settings to compare (syntax above).
        sweep_t_sw: add cfg:t_sw=X for each X.
        sweep_w_low: add cfg:w_low=X for each X.
        sweep_weight_range: add pw:range=LO:HI for each LO:HI.
        base: the values of t_sw, w_low, w_high and the weight range a setting starts from.
        num_per_prompt: images per prompt per setting (>= 2; 8 or more for the percentiles to mean much).
        seed: seeds every generator (>= 0).
        num_steps: denoising steps.
        eta: DDIM eta, in [0, 1].
        resolution: image size, a multiple of the VAE's factor; None: the model's native size.
        top_frac: the fraction of each prompt's samples the top mean is over.
        threshold: a fixed threshold on the first reward (default: per prompt, the reference setting's --threshold-quantile).
        threshold_quantile: the quantile of the reference setting's samples of a prompt used as its threshold.
        success_threshold: a reward value that means success for the first reward (e.g. 0.5 for a probability).
        grid_prompts: how many prompts (the first ones) the image grids show.
        grid_images: at most this many images per prompt in the grids.
        save_images: also save every image under images/.
        mixed_precision: weights' precision; auto: bf16 on CUDA, fp32 on the CPU.
        batch_size: images generated at once (part of what fixes the noise, with --seed).
        output_dir: where the outputs go (one result per directory).
        overwrite: replace the earlier explore/generate result in --output-dir.
    """
    import rewards as rewards_lib
    from diffusion import denoiser

    # Everything is checked before any model loads or anything is written.
    pretrained = base_for(pretrained, lora)
    check_sampling_args(pretrained, vae, num_per_prompt, batch_size, num_steps, eta, resolution, seed, min_per_prompt=2)
    for ok, msg in [
        (0.0 < top_frac <= 1.0, f"--top-frac must be in (0, 1] (the fraction of each prompt's samples the top mean is over), got {top_frac}"),
        (0.0 <= threshold_quantile <= 1.0, f"--threshold-quantile must be in [0, 1], got {threshold_quantile}"),
        (threshold is None or math.isfinite(threshold), f"--threshold must be a finite number, got {threshold}"),
        (success_threshold is None or math.isfinite(success_threshold), f"--success-threshold must be a finite number, got {success_threshold}"),
        (grid_prompts >= 0 and grid_images >= 1, f"--grid-prompts must be >= 0 and --grid-images >= 1, got {grid_prompts} and {grid_images}"),
    ]:  # fmt: skip
        if not ok:
            fail(msg)
    reward_names = [r.strip() for r in rewards.split(",") if r.strip()]
    if not reward_names:
        fail(
            f"--rewards: give at least one reward, e.g. --rewards pickscore,aesthetic ({', '.join(rewards_lib.NAMES)}, custom:DIR)"
        )
    try:
        base.validate()
    except ValueError as e:
        fail(str(e))
    base = check_model_options(pretrained, base, settings=[])  # --w-high None: the family's default
    try:
        chosen = explore_settings(settings, sweep_t_sw, sweep_w_low, sweep_weight_range, base)
        prompt_list = prompt_list_of(prompt, prompts, max_prompts)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    check_model_options(pretrained, base, settings=chosen)
    check_inputs(pretrained, vae, lora, prompt_list, reward_names, reward_models, "--rewards", prompt, prompts)
    held = claim_output(output_dir, "sample.py explore", overwrite)
    out = held.path
    rundir.on_ctrl_c(
        lambda: (
            f"interrupted: sample.py explore stopped before its tables; {out} is marked unfinished: run it again with --overwrite"
        )
    )
    pipe, scorers, device = load_models(pretrained, vae, lora, reward_names, reward_models, mixed_precision)
    sizes = dict(
        num_per_prompt=num_per_prompt, grid_prompts=grid_prompts, grid_images=grid_images, batch_size=batch_size
    )
    print(f"explore: {len(prompt_list)} prompts x {num_per_prompt} images x {len(chosen)} settings = "
          f"{len(prompt_list) * num_per_prompt * len(chosen)} images, {num_steps} steps, batches of {batch_size}, on {device}")  # fmt: skip
    result = explore_sample(
        pipe, scorers, chosen, prompt_list, seed, num_steps, eta, resolution, out if save_images else None, **sizes
    )
    meta = {"pretrained": pretrained, "lora": lora, "prompts": prompt if prompt is not None else prompts, "num_prompts": len(prompt_list),
            "num_per_prompt": num_per_prompt, "num_steps": num_steps, "eta": eta, "resolution": result["resolution"], "seed": seed,
            "batch_size": batch_size, "device": device, "dtype": str(denoiser(pipe).dtype).removeprefix("torch."),
            "rewards": reward_names, "embedding": result["embedding"], "top_frac": top_frac, "threshold": threshold,
            "threshold_quantile": threshold_quantile, "success_threshold": success_threshold}  # fmt: skip
    result["stats"] = {
        name: explore_stats(result["scores"][name], result["embeddings"] if i == 0 else None, top_frac=top_frac,
                            threshold=threshold if i == 0 else None, quantile=threshold_quantile,
                            success_threshold=success_threshold if i == 0 else None)
        for i, name in enumerate(reward_names)
    }  # fmt: skip
    explore_write(out, meta, chosen, prompt_list, result, pipe.scheduler)
    rundir.finish(held)  # the result is complete: marked so, and the directory is no longer in use
    return result


def explore_settings(settings, sweep_t_sw, sweep_w_low, sweep_weight_range, base: DiffExpConfig) -> list:
    """[(label, DiffExpConfig)] of --settings and the sweeps, a setting equal to an earlier one run once (said)."""
    specs = [(s, "--settings") for s in settings]
    specs += [(f"cfg:t_sw={v:g}", "--sweep-t-sw") for v in sweep_t_sw]
    specs += [(f"cfg:w_low={v:g}", "--sweep-w-low") for v in sweep_w_low]
    specs += [(f"pw:range={r.strip()}", "--sweep-weight-range") for r in sweep_weight_range]
    if not specs:
        raise ValueError("--settings: give at least one setting, e.g. --settings none diffexp cfg pw")
    chosen, keys = [], {}
    for text, flag in specs:
        label, cfg = parse_setting(text, base, flag)
        key = _setting_key(cfg)
        if key in keys:
            print(
                f"note: setting '{label}' samples as '{keys[key]}' does: measured once, as '{keys[key]}'",
                file=sys.stderr,
            )
            continue
        keys[key] = label
        chosen.append((label, cfg))
    return chosen


def explore_sample(pipe, scorers, chosen, prompt_list, seed, num_steps, eta, resolution, images_dir, num_per_prompt,
                   grid_prompts, grid_images, batch_size) -> dict:  # fmt: skip
    """Every setting's images, from the same noise per (prompt, index): their scores, embeddings, the
    grid cells and DiffExp's choices. `images_dir`: also save every image under it (or None)."""
    from torchvision.utils import save_image
    from tqdm import tqdm

    from diffusion import Conditioning, TextConditioner, sampling_schedule, seeded
    from diffusion import generate as generate_images
    from explore import diffexp_conditioning

    embed, embed_what = image_tower(scorers)
    T = pipe.scheduler.config.num_train_timesteps
    timesteps, _ = sampling_schedule(pipe, num_steps, resolution)  # on the host: the guidance schedule is read there
    for label, cfg in chosen:
        note_unswitched_schedule(cfg, timesteps, pipe.scheduler, setting=label)
    text = TextConditioner(pipe, resolution, true_cfg=chosen[0][1].true_cfg)  # --true-cfg: every setting's
    P, N = len(prompt_list), num_per_prompt
    G, C = min(grid_prompts, P), min(grid_images, N)
    jobs = [(p, n) for p in range(P) for n in range(N)]
    batches = [jobs[k : k + batch_size] for k in range(0, len(jobs), batch_size)]
    scores = {name: {label: torch.full((P, N), float("nan")) for label, _ in chosen} for name in scorers}
    embeddings: dict[str, torch.Tensor] = {}
    grids = {label: [[None] * C for _ in range(G)] for label, _ in chosen}
    choices: dict[str, dict] = {label: {} for label, _ in chosen}
    bar = tqdm(total=len(batches) * len(chosen), desc="explore", unit="batch", disable=not sys.stderr.isatty())
    for b, batch in enumerate(batches):
        batch_prompts = [prompt_list[p] for p, _ in batch]
        cond = text.encode(batch_prompts)
        for s_idx, (label, cfg) in enumerate(chosen):
            exploring, conds, guidance = cfg.cfg_schedule or cfg.prompt_weighting, [], None
            for k, (p, n) in enumerate(batch):  # DiffExp's draws: their own generator per (prompt, index)
                c, guidance, w = diffexp_conditioning(
                    cfg, exploring, [prompt_list[p]], cond[k : k + 1], text, timesteps, T, seeded(seed, 1, p, n)
                )
                conds.append(c)
                choices[label][(p, n)] = w[0]
            noise = seeded(seed, 0, b)  # x_T and step noise: the batch's own generator, the same in every setting
            images = generate_images(
                pipe, Conditioning.cat(conds), guidance, num_steps, noise, eta, resolution, negative=text.negative
            )
            with torch.no_grad():
                for name, scorer in scorers.items():
                    values, _ = scorer(images, batch_prompts)
                    for (p, n), v in zip(batch, values.float().cpu()):
                        scores[name][label][p, n] = v
                e = embed(images).cpu()
            embeddings.setdefault(label, torch.zeros(P, N, e.shape[-1]))
            pixels = (_grid_size(images.float()).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            for (p, n), row, image in zip(batch, e, pixels):
                embeddings[label][p, n] = row
                if p < G and n < C:
                    grids[label][p][n] = image
            if images_dir is not None:
                folder = images_dir / "images" / f"{s_idx:02d}_{_slug(label)}"
                folder.mkdir(parents=True, exist_ok=True)
                for (p, n), image in zip(batch, images):
                    save_image(image.float(), folder / f"p{p:03d}_{n:02d}.png")
            bar.update(1)
    bar.close()
    labels = [label for label, _ in chosen]
    return {"settings": labels, "scores": scores, "embeddings": embeddings, "embedding": embed_what, "choices": choices,
            "grids": {label: torch.stack([torch.stack(row) for row in grids[label]]) if G else None for label in labels},
            "resolution": text.resolution, "timesteps": timesteps}  # fmt: skip


def explore_write(out: Path, meta: dict, chosen, prompt_list, result: dict, scheduler):
    """explore.csv, explore.json, explore.md, explore.png and grids/ from explore_sample's result."""
    from torchvision.utils import make_grid, save_image

    from explore import low_guidance_steps

    labels, scores, choices, reward_names = result["settings"], result["scores"], result["choices"], meta["rewards"]
    P, N = meta["num_prompts"], meta["num_per_prompt"]
    with open(out / "explore.csv", "w", newline="") as f:  # one row per image
        writer = csv.writer(f)
        writer.writerow(["setting", "prompt_index", "prompt", "index", "word", "weight", *reward_names])
        for label in labels:
            for p in range(P):
                for n in range(N):
                    w = choices[label][(p, n)]
                    weighted = w.word is not None
                    writer.writerow([label, p, prompt_list[p], n, w.word or "", round(w.weight, 4) if weighted else "",
                                     *(f"{scores[name][label][p, n].item():.6g}" for name in reward_names)])  # fmt: skip
    settings_info = [
        {"setting": label, "cfg_schedule": cfg.cfg_schedule, "prompt_weighting": cfg.prompt_weighting, "t_sw": cfg.t_sw,
         "w_low": cfg.w_low, "w_high": cfg.w_high, "weight_range": list(cfg.prompt_weight_range),
         "steps_at_w_low": int(low_guidance_steps(result["timesteps"], scheduler, cfg.t_sw).sum()) if cfg.cfg_schedule else 0}
        for label, cfg in chosen
    ]  # fmt: skip
    stats = result["stats"]
    (out / "explore.json").write_text(json.dumps({"meta": meta, "settings": settings_info, "stats": stats}, indent=1))
    (out / "explore.md").write_text(_explore_markdown(meta, settings_info, stats, prompt_list))
    _explore_plot(out / "explore.png", labels, scores[reward_names[0]], stats[reward_names[0]], reward_names[0])
    grids = result["grids"]
    if grids[labels[0]] is not None:
        (out / "grids").mkdir(exist_ok=True)
        for s_idx, label in enumerate(labels):
            cells = grids[label].flatten(0, 1)
            save_image(make_grid(cells.float() / 255, nrow=grids[label].shape[1], padding=2, pad_value=1.0),
                       out / "grids" / f"{s_idx:02d}_{_slug(label)}.png")  # fmt: skip
        for p in range(grids[labels[0]].shape[0]):
            rows = [grids[label][p] for label in labels]
            _labelled_rows(rows, labels, out / "grids" / f"compare_p{p:03d}.png", title=f"prompt {p}: {prompt_list[p]}")
    print("## " + (out / "explore.md").read_text().split("\n## ")[2].strip())  # the first reward's table
    print(f"wrote explore.md, explore.csv, explore.json, explore.png and grids/ to {out}")


def parse_setting(text: str, base: DiffExpConfig, flag: str = "--settings"):
    """'cfg:w_low=0' -> (label, DiffExpConfig); unset keys take `base`'s values (--t-sw, ...).

    Raises a one-line ValueError naming `flag` and the setting for an unknown base or key, a value that
    is not a number, a key that does nothing in that setting (t_sw/w_low without the CFG schedule,
    range without prompt weighting) or a value out of range.
    """
    import dataclasses

    label = text.strip()
    head, _, rest = label.partition(":")
    if head.strip() in SETTING_BASES:
        kind, overrides = head.strip(), rest
    elif "=" in head:
        kind, overrides = "diffexp", label
    else:
        raise ValueError(f"{flag} '{label}': unknown setting '{head.strip()}'; {SETTING_SYNTAX}")
    cfg_on, pw_on = SETTING_BASES[kind]
    values: dict = {
        "t_sw": base.t_sw,
        "w_low": base.w_low,
        "w_high": base.w_high,
        "range": tuple(base.prompt_weight_range),
    }
    seen = set()
    for item in (part.strip() for part in overrides.split(",")):
        if not item:
            if overrides.strip():
                raise ValueError(f"{flag} '{label}': an empty KEY=VALUE (a stray comma); {SETTING_SYNTAX}")
            continue
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        key = "range" if key in ("weight_range", "prompt_weight_range") else key
        if not eq or key not in SETTING_KEYS:
            raise ValueError(
                f"{flag} '{label}': '{item}' is not KEY=VALUE with KEY one of t_sw, w_low, w_high, range; {SETTING_SYNTAX}"
            )
        if key in seen:
            raise ValueError(f"{flag} '{label}': {key} is given twice")
        seen.add(key)
        part = SETTING_KEYS[key]
        if (part == "cfg" and not cfg_on) or (part == "pw" and not pw_on):
            what, use = (
                ("the CFG schedule", "cfg or diffexp") if part == "cfg" else ("prompt weighting", "pw or diffexp")
            )
            raise ValueError(
                f"{flag} '{label}': {key} does nothing without {what}, which {kind} leaves off; use {use}, e.g. '{use.split()[0]}:{item}'"
            )
        try:
            if key == "range":
                lo, sep, hi = value.partition(":")
                if not sep:
                    raise ValueError
                parsed = (float(lo), float(hi))
            else:
                parsed = float(value)
        except ValueError:
            need = "two numbers LO:HI (e.g. range=1:3)" if key == "range" else "a number"
            raise ValueError(f"{flag} '{label}': {key} needs {need}, got '{value.strip()}'") from None
        if not all(math.isfinite(v) for v in (parsed if key == "range" else (parsed,))):
            raise ValueError(f"{flag} '{label}': {key} must be finite, got '{value.strip()}'")
        values[key] = parsed
    cfg = dataclasses.replace(base, cfg_schedule=cfg_on, prompt_weighting=pw_on, t_sw=values["t_sw"], w_low=values["w_low"],
                              w_high=values["w_high"], prompt_weight_range=values["range"], explore_frac=1.0)  # fmt: skip
    try:
        cfg.validate()
    except ValueError as e:
        msg = (
            str(e)
            .replace("--t-sw", "t_sw")
            .replace("--w-low and --w-high", "w_low and w_high")
            .replace("--prompt-weight-range", "range")
        )
        raise ValueError(f"{flag} '{label}': {msg}") from None
    return label, DiffExpConfig(**{f: getattr(cfg, f) for f in DiffExpConfig.__dataclass_fields__})


def _setting_key(cfg) -> tuple:
    """What makes two settings sample the same way (values of switched-off parts do not count)."""
    return (
        cfg.cfg_schedule,
        cfg.prompt_weighting,
        (cfg.t_sw, cfg.w_low) if cfg.cfg_schedule else None,
        cfg.w_high,
        tuple(cfg.prompt_weight_range) if cfg.prompt_weighting else None,
    )


def image_tower(scorers: dict):
    """(embed, description): the image tower of the first reward (in --rewards order) that has one,
    as a function images [N, 3, H, W] in [0, 1] -> embeddings [N, D] with that reward's own
    preprocessing: aesthetic's CLIP, PickScore's CLIP, HPS's open_clip image encoder, ImageReward's
    BLIP ViT (pooled), a custom reward's CLIP backbone. Otherwise (jpeg, a CNN custom reward, the toy
    detector): the fallback, the images area-downsampled to 32 x 32 and scaled to [-1, 1], flattened.
    """
    import torch.nn.functional as F

    import rewards

    def feats(out):
        return out if torch.is_tensor(out) else out.pooler_output

    for reward in scorers.values():
        for part, _, module in reward.parts:
            embed = None
            if isinstance(module, rewards.AestheticReward):
                embed = lambda x, dt, m=module: feats(
                    m.clip.get_image_features(
                        pixel_values=rewards.clip_preprocess(
                            x, m.size, rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD, dt
                        )
                    )
                )  # noqa: E731
                what = "its CLIP image embedding"
            elif isinstance(module, rewards.PickScoreReward):
                embed = lambda x, dt, m=module: feats(
                    m.model.get_image_features(pixel_values=rewards.clip_preprocess(x, m.size, m.mean, m.std, dt))
                )  # noqa: E731
                what = "its CLIP image embedding"
            elif isinstance(module, rewards.HPSReward):
                embed = lambda x, dt, m=module: m.model.encode_image(
                    rewards.hps_preprocess(x, m.size, m.mean, m.std, dt)
                )  # noqa: E731
                what = "its open_clip image embedding"
            elif isinstance(module, rewards.ImageRewardReward):
                embed = lambda x, dt, m=module: (
                    m.vision(
                        pixel_values=rewards.clip_preprocess(
                            x, m.size, rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD, dt
                        )
                    ).pooler_output
                )  # noqa: E731
                what = "its BLIP ViT pooled output"
            elif isinstance(module, rewards.CustomReward) and isinstance(module.net, rewards.ClipHead):
                embed = lambda x, dt, m=module: feats(
                    m.net.clip.get_image_features(pixel_values=rewards.custom_preprocess(x, m.config, dt))
                )  # noqa: E731
                what = "its CLIP backbone's image embedding"
            if embed is not None:

                def run(images, m=module, embed=embed):
                    p = next(m.parameters())  # preprocessing runs in float32 and casts once to the weights' dtype
                    return embed(images.to(device=p.device, dtype=torch.float32), p.dtype).float()

                return run, f"image tower of reward `{part}` ({what})"

    def pixels(images):
        return (F.interpolate(images.float(), size=(32, 32), mode="area") * 2 - 1).flatten(1)

    return pixels, "pixels (no reward has an image tower): images area-downsampled to 32x32, scaled to [-1, 1]"


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """embeddings [P, N, D] (N images of each of P prompts) -> the mean over prompts and over the
    N(N-1)/2 pairs of a prompt's images of 1 - cos(e_a, e_b). 0: all alike; 1: orthogonal on average."""
    P, N, _ = embeddings.shape
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    cos = e @ e.transpose(1, 2)
    iu = torch.triu_indices(N, N, 1)
    return (1 - cos[:, iu[0], iu[1]]).mean().item()


def explore_stats(
    scores: dict[str, torch.Tensor],
    embeddings: dict[str, torch.Tensor] | None = None,
    reference: str | None = None,
    top_frac: float = 0.1,
    threshold: float | None = None,
    quantile: float = 0.9,
    success_threshold: float | None = None,
) -> dict:
    """The explore table from numbers alone (a pure function, tested on hand-made scores).

    scores: {setting: [P, N]}: the reward of image n of prompt p; entry [p, n] of every setting was
    drawn from the same starting noise. embeddings: {setting: [P, N, D]} (optional). reference: the
    setting the threshold and the paired differences refer to (default 'none' if present, else the
    first). Per setting:
      mean, std             over all P*N samples (std: sample standard deviation, n - 1);
      std_within            the std over a prompt's N samples, averaged over prompts;
      top_mean              per prompt the mean of its top k = max(1, ceil(top_frac * N)) samples, averaged over prompts;
      above                 the fraction of samples above their prompt's threshold: `threshold` if
                            given, else the `quantile` (linear interpolation) of the reference's N samples of that prompt;
      delta, delta_se       the mean of (sample - the reference's sample from the same noise) and its
                            standard error over the P*N pairs;
      diversity             mean_pairwise_cosine_distance of the embeddings;
      success, solved,      with success_threshold s: the fraction of a prompt's samples with reward >= s
      success_per_prompt    (averaged over prompts; per prompt), and the fraction of prompts with at least one.
    Returns {"reference", "thresholds" (one per prompt), "top_k", "settings": {setting: {...}}}.
    """
    labels = list(scores)
    ref = reference if reference is not None else ("none" if "none" in scores else labels[0])
    ref_scores = scores[ref].double()
    P, N = ref_scores.shape
    if threshold is None:
        tau = torch.quantile(ref_scores, quantile, dim=1, keepdim=True)
    else:
        tau = torch.full((P, 1), float(threshold), dtype=torch.float64)
    k = max(1, math.ceil(top_frac * N - 1e-9))
    out = {}
    for label in labels:
        s = scores[label].double()
        if s.shape != (P, N):
            raise ValueError(
                f"explore_stats: setting {label} has scores of shape {tuple(s.shape)}, the reference {ref} {(P, N)}"
            )
        d = (s - ref_scores).flatten()
        row = {
            "n": s.numel(),
            "mean": s.mean().item(),
            "std": s.flatten().std().item() if s.numel() > 1 else 0.0,
            "std_within": s.std(dim=1).mean().item() if N > 1 else 0.0,
            "top_mean": s.topk(k, dim=1).values.mean().item(),
            "above": (s > tau).double().mean().item(),
            "delta": d.mean().item(),
            "delta_se": (d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0,
        }
        if embeddings is not None and label in embeddings:
            row["diversity"] = mean_pairwise_cosine_distance(embeddings[label])
        if success_threshold is not None:
            per_prompt = (s >= success_threshold).double().mean(dim=1)
            row |= {
                "success": per_prompt.mean().item(),
                "solved": (per_prompt > 0).double().mean().item(),
                "success_per_prompt": per_prompt.tolist(),
            }
        out[label] = row
    return {"reference": ref, "thresholds": tau.squeeze(1).tolist(), "top_k": k, "settings": out}


def _grid_size(images: torch.Tensor) -> torch.Tensor:
    """Images as the grids show them: small ones (the toy world's 32 px) enlarged by a whole factor
    to at least 96 px (nearest, so pixels stay visible), large ones reduced to 256 px."""
    import torch.nn.functional as F

    size = images.shape[-1]
    if size < 96:
        return F.interpolate(images, scale_factor=math.ceil(96 / size), mode="nearest")
    if size > 256:
        return F.interpolate(images, size=(256 * images.shape[-2] // size, 256), mode="area")
    return images


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "setting"


def _labelled_rows(rows: list[torch.Tensor], labels: list[str], path: Path, title: str = ""):
    """Save rows of images (each [C, 3, H, W] uint8) one under the other, each with its label on the left,
    and `title` (the prompt) written above them."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    strips = [make_grid(r, nrow=len(r), padding=2, pad_value=255).permute(1, 2, 0).numpy() for r in rows]
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(8 + int(measure.textlength(label, font=font)) for label in labels)
    height, width = strips[0].shape[0], strips[0].shape[1]
    top = 18 if title else 0
    canvas = Image.new(
        "RGB", (max(margin + width, 8 + int(measure.textlength(title, font=font))), top + height * len(rows)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black", font=font)
    for i, (strip, label) in enumerate(zip(strips, labels)):
        canvas.paste(Image.fromarray(strip), (margin, top + i * height))
        draw.text((4, top + i * height + height // 2 - 6), label, fill="black", font=font)
    canvas.save(path)


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.4g}"


def _explore_markdown(meta: dict, settings_info: list[dict], stats: dict, prompt_list: list[str]) -> str:
    import datetime

    first = meta["rewards"][0]
    top_pct = f"{meta['top_frac'] * 100:g}%"
    lines = [
        f"# Exploration of {meta['pretrained']}" + (f" + LoRA {meta['lora']}" if meta["lora"] else ""),
        "",
        f"{datetime.date.today().isoformat()}, {meta['device']} ({meta['dtype']}). Prompts: {meta['prompts']} ({meta['num_prompts']}), "
        f"{meta['num_per_prompt']} images per prompt per setting, {meta['num_steps']} DDIM steps, eta {meta['eta']:g}, "
        f"{meta['resolution']} px, seed {meta['seed']}, batches of {meta['batch_size']}. Image n of a prompt starts from the same "
        f"noise in every setting, so the settings differ only by guidance schedule and conditioning.",
        "",
        "## Settings",
        "",
        "| setting | CFG schedule | prompt weighting | t_sw | w_low | w_high | weight range | steps at w_low |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in settings_info:
        cfg_on, pw_on = s["cfg_schedule"], s["prompt_weighting"]
        lo, hi = s["weight_range"]
        cells = [
            s["setting"], "on" if cfg_on else "off", "on" if pw_on else "off",
            f"{s['t_sw']:g}" if cfg_on else "—", f"{s['w_low']:g}" if cfg_on else "—", f"{s['w_high']:g}",
            f"U({lo:g}, {hi:g})" if pw_on else "—", f"{s['steps_at_w_low']} of {meta['num_steps']}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for i, name in enumerate(meta["rewards"]):
        st = stats[name]
        ref = st["reference"]
        fixed = i == 0 and meta["threshold"] is not None
        thr = f"> {meta['threshold']:g}" if fixed else f"> {ref}'s p{meta['threshold_quantile'] * 100:g}"
        lines += ["", f"## {name}" + (" (first reward)" if i == 0 else ""), ""]
        if i == 0:
            threshold_text = (
                f"the fixed value {meta['threshold']:g}" if fixed
                else f"per prompt, the {meta['threshold_quantile'] * 100:g}th percentile of {ref}'s samples of that prompt"
            )  # fmt: skip
            success_text = (
                f" Success: {name} ≥ {meta['success_threshold']:g}; 'prompts solved' is the share of prompts with at least one success."
                if meta["success_threshold"] is not None else ""
            )  # fmt: skip
            lines += [
                f"Threshold: {threshold_text}. Top {top_pct}: per prompt the mean of its best {st['top_k']} of {meta['num_per_prompt']}. "
                f"Diversity: mean pairwise cosine distance (1 − cos) between the embeddings of a prompt's images, from the {meta['embedding']}."
                + success_text,
                "",
            ]
        header = [
            "setting",
            "mean",
            "std",
            "std within prompt",
            f"top {top_pct} per prompt",
            thr,
            f"mean − {ref} (same noise, ± s.e.)",
        ]
        if i == 0:
            header.append("diversity")
            if meta["success_threshold"] is not None:
                header += [f"success (≥ {meta['success_threshold']:g})", "prompts solved"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, r in st["settings"].items():
            cells = [label, _fmt(r["mean"]), _fmt(r["std"]), _fmt(r["std_within"]), _fmt(r["top_mean"]), f"{r['above'] * 100:.1f}%",
                     "—" if label == ref else f"{r['delta']:+.4g} ± {r['delta_se']:.2g}"]  # fmt: skip
            if i == 0:
                cells.append(_fmt(r.get("diversity", float("nan"))))
                if meta["success_threshold"] is not None:
                    cells += [f"{r['success'] * 100:.1f}%", f"{r['solved'] * 100:.1f}%"]
            lines.append("| " + " | ".join(cells) + " |")
    if meta["success_threshold"] is not None:
        st = stats[first]["settings"]
        labels = list(st)
        lines += ["", f"## Success rate per prompt ({first} ≥ {meta['success_threshold']:g})", "",
                  "| prompt | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]  # fmt: skip
        for p, text in enumerate(prompt_list):
            lines.append(
                f"| {text.replace('|', '/')} | "
                + " | ".join(f"{st[label]['success_per_prompt'][p] * 100:.1f}%" for label in labels)
                + " |"
            )
    lines += [
        "",
        "How to read it: a setting explores usefully when it finds good samples more often than the reference "
        f"(higher '{'top ' + top_pct}' and '> threshold', more successes, more prompts solved) without giving up much mean "
        "reward, and shows more diversity. 'mean − reference' is paired by starting noise, so it is much more precise than "
        "comparing the means. grids/ shows the first prompts' images, the same noise in every setting.",
        "",
    ]
    return "\n".join(lines)


def _explore_plot(path: Path, labels: list[str], scores: dict[str, torch.Tensor], stats: dict, reward_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 4 + 0.7 * len(labels)), 4.5))
    ax1.boxplot([scores[label].flatten().numpy() for label in labels], showmeans=True)
    ax1.set_xticks(range(1, len(labels) + 1), labels, rotation=45, ha="right", fontsize=8)
    ax1.set_ylabel(reward_name)
    ax1.set_title("reward per setting (all samples; triangle: mean)", fontsize=9)
    ax1.grid(alpha=0.3, axis="y")
    rows = stats["settings"]
    xs = [rows[label].get("diversity", float("nan")) for label in labels]
    ys = [rows[label]["mean"] for label in labels]
    ax2.scatter(xs, ys)
    for x, y, label in zip(xs, ys, labels):
        ax2.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("within-prompt diversity (mean pairwise cosine distance)")
    ax2.set_ylabel(f"mean {reward_name}")
    ax2.set_title("diversity against mean reward", fontsize=9)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_log(run: Path) -> list[dict]:
    if not run.is_dir():
        fail(f"{run}: no such directory (pass a training run's --output-dir)")
    path = run / "log.jsonl"
    if not path.is_file():
        fail(f"{run}: no log.jsonl (pass a training run's --output-dir)")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                fail(f"{path}: line {i} is not JSON ({e}); was the run killed while writing? delete that line")
    return records


def default_plot_path(runs: list[str], labels: list[str], key: str) -> Path:
    """Where `plot` writes without --output: next to the runs, never the current directory.
    One run: RUN/plots/KEY.png (inside the run, where its --overwrite removes it). Several: their closest common directory (e.g. runs/ for runs/a and
    runs/b; the first run's directory when they share none but the filesystem root), named
    KEY_LABEL1_vs_LABEL2....png, so different comparisons do not overwrite each other."""
    import os
    import re

    slug = lambda t: re.sub(r"[^A-Za-z0-9._=-]+", "-", t).strip("-")[:40] or "run"  # noqa: E731
    dirs = [Path(r).resolve() for r in runs]
    if len(dirs) == 1:
        return Path(runs[0]) / "plots" / f"{slug(key)}.png"
    common = Path(os.path.commonpath(dirs))
    if common == Path(common.anchor):
        common = dirs[0]
    name = f"{slug(key)}_{'_vs_'.join(slug(label) for label in labels)}"[:200].rstrip("_")
    return common / f"{name}.png"


KEY_NAMES = {
    "eval_reward_mean": "held-out reward (fixed seeds, no DiffExp)",
    "reward_mean": "training reward (the epoch's samples)",
}


def plot(
    runs: Positional[list[str]], labels: list[str] | None = None, output: str | None = None, key: str | None = None
):
    """Reward against cumulative samples for one or several runs on one plot (e.g. DiffExp vs baseline).

    Args:
        runs: training output directories (each holds log.jsonl), one or more.
        labels: a legend label per run (default: the directory names).
        output: the PNG to write (default: RUN/plots/KEY.png for one run; for several,
            KEY_LABEL1_vs_LABEL2.png in their closest common directory, e.g. runs/).
        key: the logged quantity on the y axis (default: eval_reward_mean, the held-out reward, when every
            run has it, else reward_mean, the training samples' reward; or reward/NAME, eval_reward/NAME, ...).
    """
    if not runs:
        fail(
            "plot: give one or more training run directories, e.g. `sample.py plot runs/alignprop runs/baseline --labels DiffExp AlignProp`"
        )
    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        fail(f"--labels: {len(labels)} labels for {len(runs)} runs")
    logs = [_read_log(Path(run)) for run in runs]  # every run is checked before anything is drawn or written
    if key is None:
        key = "eval_reward_mean" if all(any("eval_reward_mean" in r for r in log) for log in logs) else "reward_mean"
    curves = []
    for run, records in zip(runs, logs):
        points = [(r["samples"], r[key]) for r in records if key in r and "samples" in r]
        if not points:
            known = sorted(
                {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            )
            fail(f"--key {key}: the log of {run} has no '{key}' entries; it has {', '.join(known) or 'no numbers'}")
        curves.append(points)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for points, label in zip(curves, labels):
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    what = KEY_NAMES.get(key, key)
    ax.set_xlabel("samples seen in training")
    ax.set_ylabel(what)
    ax.set_title(f"{what} during training" + (f": {labels[0]}" if len(runs) == 1 else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output) if output else default_plot_path(runs, labels, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def gallery(run: Positional[str], output: str | None = None):
    """A self-contained HTML page: for each held-out prompt, a slider through the training epochs.

    Args:
        run: a training output directory with eval/initial/ and eval/epoch_NNNN/ folders (written every --eval-every epochs).
        output: the HTML file (default: RUN/gallery.html).
    """
    run_dir = Path(run)
    if not run_dir.is_dir():
        fail(f"{run}: no such directory (pass a training run's --output-dir)")

    def number(folder: Path) -> int | None:
        try:
            return int(folder.name.split("_", 1)[1])
        except (IndexError, ValueError):
            return None

    # eval/initial (before training), then eval/epoch_NNNN after epoch NNNN, in epoch order
    numbered = sorted((e for e in (run_dir / "eval").glob("epoch_*") if number(e) is not None), key=number)
    epochs = [e for e in [run_dir / "eval" / "initial"] if (e / "prompts.json").is_file()] + numbered
    if not epochs:
        fail(f"{run}: no eval/initial or eval/epoch_* folders (train with --eval-every > 0)")
    meta = [json.loads((e / "prompts.json").read_text()) for e in epochs]
    prompts = meta[0]["prompts"]

    def data_uri(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    blocks = []
    for i, prompt in enumerate(prompts):
        frames = [data_uri(e / f"{i:03d}.png") for e in epochs]
        captions = [
            f"{'before training' if number(e) is None else f'epoch {number(e)}'}: reward {m['reward'][i]:.4f}"
            for e, m in zip(epochs, meta)
        ]
        blocks.append(
            f'<div class="p"><h3>{html.escape(prompt)}</h3><img id="img{i}" src="{frames[-1]}">'
            f'<input type="range" min="0" max="{len(frames) - 1}" value="{len(frames) - 1}" oninput="show({i}, this.value)">'
            f'<div id="cap{i}">{html.escape(captions[-1])}</div></div>'
            f"<script>frames[{i}] = {json.dumps(frames)}; captions[{i}] = {json.dumps(captions)};</script>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(run_dir.name)}: training gallery</title>
<style>body{{font-family:sans-serif}} .p{{display:inline-block;margin:8px;text-align:center}} img{{width:256px;image-rendering:pixelated;display:block}} input{{width:256px}}</style>
<script>const frames = {{}}, captions = {{}};
function show(i, k) {{ document.getElementById('img' + i).src = frames[i][k]; document.getElementById('cap' + i).textContent = captions[i][k]; }}</script>
</head><body><h2>{html.escape(run_dir.name)}: held-out prompts, fixed seeds, across training</h2>{"".join(blocks)}</body></html>"""
    output = Path(output) if output else run_dir / "gallery.html"
    output.write_text(page)
    print(f"wrote {output} ({len(prompts)} prompts x {len(epochs)} epochs)")


def main(argv: list[str] | None = None):
    """The command line (`argv`: the arguments after the script name; default sys.argv)."""
    commands = {"generate": generate, "explore": explore, "plot": plot, "gallery": gallery}
    return tyro.extras.subcommand_cli_from_dict(commands, args=argv, config=(tyro.conf.OmitArgPrefixes,))


if __name__ == "__main__":
    main()
