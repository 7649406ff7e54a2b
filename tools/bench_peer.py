"""Side-by-side speed of our trainers and trl 0.23.1's DDPOTrainer / AlignPropTrainer (CPU, tiny model).

    pip install trl==0.23.1                     # not a project requirement: only this script needs it
    python bench_peer.py                        # 3 repeats x {32 px / 4 steps, 64 px / 10 steps} x {DDPO, AlignProp}
    python bench_peer.py --repeats 1 --sizes 32x4 --epochs 1     # a quick smoke run

One tiny SD pipeline (tools/tiny.py's make_tiny_sd) is saved to a temporary directory and both sides
load that same directory. Every measured run is its own subprocess (so thread pools and allocator
state never carry over), on the CPU, fp32, with `--threads` intra-op threads and OMP_WAIT_POLICY=PASSIVE.
The settings are matched: 2 batches of 4 samples per epoch, one optimizer step per epoch, CFG 5,
LoRA rank 4 / alpha 4 on to_q/to_k/to_v/to_out.0, the same prompts (prompts/simple_animals.txt), the
same reward on both sides (DDPO: JPEG size at quality 95 in kB, negated; AlignProp: mean brightness
of the image, differentiable). Our side runs with DiffExp off (--no-cfg-schedule
--no-prompt-weighting) and, in an extra row, with DiffExp at its defaults (exploring in every epoch).

Only the training loop is timed: each run trains `--warmup-epochs` + `--epochs` epochs and the first
`--warmup-epochs` are dropped. Ours: the per-epoch `sec_per_sample` of log.jsonl (sampling, reward,
advantages and training of one epoch; not the per-epoch image grid or checkpoint). trl: wall time of
each `trainer.step(epoch, global_step)` (sampling, reward and training of one epoch; checkpoints
switched off with a huge save_freq) divided by the epoch's samples. Runs are interleaved (trl, ours,
ours+DiffExp, then the reverse order in the next repeat, ...) and the table gives the minimum and the
median seconds per sample over all timed epochs of all repeats, and the ratio ours / trl.
The table is printed and written as markdown (--markdown).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent  # the project root
sys.path.insert(0, str(ROOT))  # `python tools/bench_peer.py` from anywhere imports the project's modules
TRL_VERSION = "0.23.1"
TRL_MISSING = f"error: bench_peer.py needs trl: pip install trl=={TRL_VERSION}"

# The matched settings (both sides).
BATCH = 4  # samples per batch (sampling and training)
BATCHES_PER_EPOCH = 2  # one optimizer step per epoch: gradients accumulate over both batches
GUIDANCE = 5.0
LORA_RANK = 4
LORA_ALPHA = 4.0
DDPO_LR, DDPO_ETA, DDPO_CLIP = 3e-4, 1.0, 1e-4  # trl's and our defaults
ALIGNPROP_LR, ALIGNPROP_ETA = 1e-3, 0.0  # eta: our AlignProp default (trl's is 1.0; both sides get 0 here)
PROMPTS = "simple_animals"
SEED = 0

SIDES = ("trl", "ours", "ours+diffexp", "ours+compile", "ours+diffexp+compile")
SIDE_LABEL = {
    "trl": f"trl {TRL_VERSION}",
    "ours": "ours, DiffExp off",
    "ours+diffexp": "ours, DiffExp on (defaults)",
    "ours+compile": "ours --compile, DiffExp off",
    "ours+diffexp+compile": "ours --compile, DiffExp on (defaults)",
}


@dataclass
class Args:
    repeats: int = 3
    """interleaved repeats of every (trainer, size, side) run"""
    sizes: tuple[str, ...] = ("32x4", "64x10")
    """image sizes and DDIM steps as PIXELSxSTEPS (the tiny model's native size is 32 px)"""
    trainers: tuple[Literal["ddpo", "alignprop"], ...] = ("ddpo", "alignprop")
    """which trainers to compare"""
    epochs: int = 2
    """timed epochs per run (after the warm-up epochs)"""
    warmup_epochs: int = 1
    """epochs trained first in every run and not timed (first-call allocation, lazy initialisation)"""
    diffexp: bool = True
    """also time our trainers with DiffExp at its defaults (CFG schedule + prompt weighting, exploring every epoch)"""
    compile: bool = False
    """also time our trainers with --compile (torch.compile of the UNet, inductor), DiffExp off and on; the compiling happens in the warm-up epoch(s), whose time is shown in the notes; first prints inductor's difference to eager on the tiny UNet"""
    threads: int = 2
    """intra-op threads of every run (torch.set_num_threads and OMP_NUM_THREADS)"""
    markdown: str = "runs/bench_peer.md"
    """write the table (and the settings) here as markdown"""
    keep_dir: str | None = None
    """keep the tiny model and every run's output and log in this directory (default: a temporary directory, deleted)"""
    run_timeout: float = 3600.0
    """seconds before a single run is killed and counted as failed"""


# ----------------------------------------------------------------------------------------------
# Rewards, the same numbers on both sides. Images: N x 3 x H x W floats in [0, 1].


def jpeg_kb(images):
    """JPEG size at quality 95 in kB (1000 bytes), as rewards.JpegReward computes it (ours uses that)."""
    import io

    import torch
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p).save(buf, format="JPEG", quality=95)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def brightness(images):
    """Mean pixel value per image: differentiable, and costs nothing next to the UNet."""
    return images.float().mean(dim=(1, 2, 3))


SEEN = {"image_sizes": set(), "rewards": []}  # what the reward saw in this run (checked by the parent)


def seen(images, scores):
    SEEN["image_sizes"].add(tuple(images.shape[-2:]))
    SEEN["rewards"].append(float(scores.detach().float().mean()))


# ----------------------------------------------------------------------------------------------
# The runs (in a subprocess each: `python bench_peer.py _worker SPEC.json`).


def parse_size(text: str) -> tuple[int, int]:
    try:
        res, steps = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--sizes: '{text}' is not PIXELSxSTEPS (e.g. 32x4)") from None
    if res < 8 or res % 8 or steps < 1:
        raise ValueError(f"--sizes: '{text}': pixels must be a multiple of 8 (>= 8) and steps >= 1")
    return res, steps


def our_argv(spec: dict) -> list[str]:
    """The command line of our trainer for this run (the flags a user would type)."""
    common = [
        "--pretrained",
        spec["pretrained"],
        "--resolution",
        spec["res"],
        "--num-steps",
        spec["steps"],
        "--num-epochs",
        spec["num_epochs"],
        "--samples-per-epoch",
        BATCH * BATCHES_PER_EPOCH,
        "--gradient-accumulation-steps",
        BATCHES_PER_EPOCH,
        "--mixed-precision",
        "no",
        "--lora-rank",
        LORA_RANK,
        "--lora-alpha",
        LORA_ALPHA,
        "--w-high",
        GUIDANCE,
        "--prompts",
        PROMPTS,
        "--eval-every",
        0,
        "--save-every",
        10**6,
        "--seed",
        SEED,
        "--output-dir",
        spec["out"],
    ]
    if "diffexp" in spec["side"]:
        # DiffExp's own defaults (t_sw, w_low, prompt-weight range, stopwords); exploring in every epoch,
        # since with --explore-frac 0.75 the last quarter of a short run would not explore.
        common += ["--explore-frac", 1.0]
    else:
        common += ["--no-cfg-schedule", "--no-prompt-weighting"]
    if "compile" in spec["side"]:
        common += ["--compile"]
    if spec["trainer"] == "ddpo":
        specific = [
            "--reward",
            "jpeg",
            "--sample-batch-size",
            BATCH,
            "--train-batch-size",
            BATCH,
            "--eta",
            DDPO_ETA,
            "--lr",
            DDPO_LR,
            "--clip-range",
            DDPO_CLIP,
            "--inner-epochs",
            1,
            "--timestep-fraction",
            1.0,
            "--no-per-prompt-stat-tracking",
        ]
    else:
        # --reward aesthetic only passes the differentiability check: rewards.load_reward is replaced
        # by the brightness reward in run_ours, as the tests do. Gradient checkpointing stays at its
        # default (each UNet call that carries gradient is recomputed in backward, as trl does).
        specific = [
            "--reward",
            "aesthetic",
            "--batch-size",
            BATCH,
            "--eta",
            ALIGNPROP_ETA,
            "--lr",
            ALIGNPROP_LR,
            "--backprop-steps",
            1,
        ]
    return [str(a) for a in common + specific]


def trl_config_fields(spec: dict) -> dict:
    """The trl config fields set for this run (everything else at trl's defaults)."""
    fields = dict(
        num_epochs=spec["num_epochs"],
        save_freq=10**9,
        mixed_precision="no",
        seed=SEED,
        sample_num_steps=spec["steps"],
        sample_guidance_scale=GUIDANCE,
        train_batch_size=BATCH,
        train_max_grad_norm=1.0,
    )
    if spec["trainer"] == "ddpo":
        fields |= dict(
            sample_eta=DDPO_ETA,
            sample_batch_size=BATCH,
            sample_num_batches_per_epoch=BATCHES_PER_EPOCH,
            train_gradient_accumulation_steps=BATCHES_PER_EPOCH,
            train_learning_rate=DDPO_LR,
            train_clip_range=DDPO_CLIP,
            train_num_inner_epochs=1,
            train_timestep_fraction=1.0,
            train_cfg=True,
            per_prompt_stat_tracking=False,
            async_reward_computation=False,
        )
    else:
        fields |= dict(
            sample_eta=ALIGNPROP_ETA,
            train_gradient_accumulation_steps=BATCHES_PER_EPOCH,
            train_learning_rate=ALIGNPROP_LR,
            truncated_backprop_rand=False,
            truncated_backprop_timestep=spec["steps"] - 1,  # gradient through the last step only
        )
    return fields


def run_ours(spec: dict) -> dict:
    import importlib

    import torch

    import rewards

    load_reward = rewards.load_reward

    def load_checked(spec_, device="cpu", dtype=torch.float32, **models):
        """Our reward (DDPO: --reward jpeg itself; AlignProp: brightness), noting what it was given."""
        inner = load_reward(spec_, device=device, dtype=dtype, **models) if spec["trainer"] == "ddpo" else None

        def score(images, prompts):
            if inner is not None:
                scores, components = inner(images, prompts)
            else:
                scores = brightness(images)
                components = {"brightness": scores.detach()}
            seen(images, scores)
            return scores, components

        return score

    rewards.load_reward = load_checked
    if (
        spec["trainer"] == "alignprop"
    ):  # the brightness reward needs no checkpoint: skip the up-front check of aesthetic's
        rewards.checkpoints_needed = lambda *args, **kwargs: []
    trainer = importlib.import_module(f"train_{spec['trainer']}")
    trainer.main(trainer.cli(our_argv(spec)))  # the trainer's own command line, as a user types it
    log = [json.loads(line) for line in (Path(spec["out"]) / "log.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in log if r.get("epoch", -1) >= 0]
    if len(epochs) != spec["num_epochs"]:
        raise RuntimeError(f"log.jsonl has {len(epochs)} epochs, expected {spec['num_epochs']}")
    timed = epochs[spec["warmup"] :]
    return {
        "sec_per_sample": [r["sec_per_sample"] for r in timed],
        "warmup_sec_per_sample": [r["sec_per_sample"] for r in epochs[: spec["warmup"]]],
        "samples_per_epoch": [r["samples"] - p["samples"] for p, r in zip([{"samples": 0}] + epochs, epochs)][
            spec["warmup"] :
        ],
        "exploring": [r["exploring"] for r in timed],
        "w_low_share": [r["w_low_share"] for r in timed],
    }


def run_trl(spec: dict) -> dict:
    import random

    from accelerate import PartialState
    from trl import AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from diffusion import load_prompts

    res = spec["res"]

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        """trl's default pipeline; the trainers never pass a size, so it is given here (else unet size x vae factor)."""

        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **{"height": res, "width": res, **kwargs})

        def rgb_with_grad(self, *args, **kwargs):
            return super().rgb_with_grad(*args, **{"height": res, "width": res, **kwargs})

    PartialState()  # trl's pipeline logs through accelerate's logger, which needs the state to exist
    pipe = Pipeline(spec["pretrained"], use_lora=True)
    prompts, rng = load_prompts(PROMPTS), random.Random(SEED)

    def prompt_fn():
        return rng.choice(prompts), {}

    fields = trl_config_fields(spec)
    if spec["trainer"] == "ddpo":

        def reward_fn(images, prompts_, metadata):
            scores = -jpeg_kb(images)
            seen(images, scores)
            return scores, {}

        trainer = DDPOTrainer(DDPOConfig(**fields), reward_fn, prompt_fn, pipe)
    else:

        def reward_fn(images, prompts_, metadata):
            scores = brightness(images)
            seen(images, scores)
            return scores, {}

        trainer = AlignPropTrainer(AlignPropConfig(**fields), reward_fn, prompt_fn, pipe)
    trainer.sd_pipeline.set_progress_bar_config(disable=True)  # no per-step progress bar on stderr
    samples = BATCH * BATCHES_PER_EPOCH
    seconds, global_step = [], 0
    for epoch in range(spec["num_epochs"]):
        t0 = time.perf_counter()
        global_step = trainer.step(epoch, global_step)
        seconds.append(time.perf_counter() - t0)
    if global_step != spec["num_epochs"]:  # trl counts optimizer steps
        raise RuntimeError(
            f"trl made {global_step} optimizer steps in {spec['num_epochs']} epochs, expected one per epoch"
        )
    timed = seconds[spec["warmup"] :]
    return {"sec_per_sample": [s / samples for s in timed], "samples_per_epoch": [samples] * len(timed)}


def worker(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    sys.path[:0] = [str(ROOT)]
    import torch

    torch.set_num_threads(spec["threads"])
    result = run_trl(spec) if spec["side"] == "trl" else run_ours(spec)
    result["threads"] = torch.get_num_threads()
    result["image_sizes"] = sorted(SEEN["image_sizes"])
    result["reward_mean"] = statistics.mean(SEEN["rewards"]) if SEEN["rewards"] else None
    Path(spec["result"]).write_text(json.dumps(result))


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        OMP_WAIT_POLICY="PASSIVE",
        CUDA_VISIBLE_DEVICES="",  # the CPU on both sides, even on a machine with a GPU
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONWARNINGS="ignore::DeprecationWarning",  # trl's "DDPOTrainer is deprecated" on every run
    )
    return env


def run_one(
    args: Args, work: Path, pretrained: Path, trainer: str, res: int, steps: int, side: str, repeat: int
) -> dict:
    run_dir = work / "runs" / f"{trainer}_{res}x{steps}_{side}_r{repeat}"
    run_dir.mkdir(parents=True)
    spec = dict(
        side=side,
        trainer=trainer,
        res=res,
        steps=steps,
        num_epochs=args.warmup_epochs + args.epochs,
        warmup=args.warmup_epochs,
        threads=args.threads,
        pretrained=str(pretrained),
        out=str(run_dir / "out"),
        result=str(run_dir / "result.json"),
    )
    (run_dir / "spec.json").write_text(json.dumps(spec))
    t0 = time.time()
    with open(run_dir / "output.txt", "w") as out:
        try:
            proc = subprocess.run(
                [sys.executable, str(ROOT / "tools" / "bench_peer.py"), "_worker", str(run_dir / "spec.json")],
                cwd=run_dir,
                env=child_env(args.threads),
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=args.run_timeout,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not (run_dir / "result.json").is_file():
        tail = (run_dir / "output.txt").read_text(errors="replace").strip().splitlines()[-15:]
        return {"failed": f"exit {rc}", "tail": tail, "wall": time.time() - t0}
    result = json.loads((run_dir / "result.json").read_text()) | {"wall": time.time() - t0}
    if result["image_sizes"] != [[res, res]] or result["threads"] != args.threads:
        return {
            "failed": f"the reward saw images of {result['image_sizes']} (expected {res} x {res}), "
            f"{result['threads']} threads (expected {args.threads})",
            "tail": [],
            "wall": result["wall"],
        }
    return result


# ----------------------------------------------------------------------------------------------
# The table.


def summarise(results: dict, args: Args, sizes) -> list[dict]:
    rows = []
    for res, steps in sizes:
        for trainer in args.trainers:
            per_side = {}
            for side in sides(args):
                runs = results.get((trainer, res, steps, side), [])
                ok = [r for r in runs if "failed" not in r]
                values = [v for r in ok for v in r["sec_per_sample"]]
                per_side[side] = dict(
                    trainer=trainer,
                    size=f"{res} px / {steps} steps",
                    side=side,
                    runs=len(ok),
                    failed=len(runs) - len(ok),
                    epochs=len(values),
                    min=min(values) if values else None,
                    median=statistics.median(values) if values else None,
                    note=note(ok, side, trainer),
                )
            ref = per_side["trl"]
            for side, row in per_side.items():
                for key in ("min", "median"):
                    ok = side != "trl" and row[key] is not None and ref[key]
                    row[f"ratio_{key}"] = row[key] / ref[key] if ok else None
                rows.append(row)
    return rows


def note(runs: list[dict], side: str, trainer: str) -> str:
    notes = []
    if "diffexp" in side and runs:
        exploring = all(all(r.get("exploring", [])) for r in runs)
        share = statistics.mean(v for r in runs for v in r.get("w_low_share", [0.0]))
        notes.append(
            f"exploring every timed epoch: {'yes' if exploring else 'NO'}; share of steps at w_low {share:.2f}"
        )
    if "compile" in side and runs:
        first = [r["warmup_sec_per_sample"][0] for r in runs if r.get("warmup_sec_per_sample")]
        if first:
            notes.append(f"first (warm-up) epoch, compiling: {min(first):.2f}-{max(first):.2f} s/sample")
    return "; ".join(notes)


def fmt(v, spec=".4f"):
    return "—" if v is None else format(v, spec)


def table(rows: list[dict]) -> list[str]:
    head = [
        "trainer",
        "size",
        "side",
        "runs",
        "timed epochs",
        "s/sample min",
        "s/sample median",
        "ours/trl min",
        "ours/trl median",
        "notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        runs = f"{r['runs']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["trainer"],
                    r["size"],
                    SIDE_LABEL[r["side"]],
                    runs,
                    str(r["epochs"]),
                    fmt(r["min"]),
                    fmt(r["median"]),
                    fmt(r["ratio_min"], ".2f"),
                    fmt(r["ratio_median"], ".2f"),
                    r["note"],
                ]
            )
            + " |"
        )
    return lines


def settings_markdown(args: Args, sizes) -> list[str]:
    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "trl"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a version we cannot read is only left out of the report
            pass
    res, steps = sizes[0]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible "
        f"({', '.join(f'{k} {v}' for k, v in versions.items())}). CPU, fp32, {args.threads} intra-op threads, OMP_WAIT_POLICY=PASSIVE, "
        f"one subprocess per run; {args.repeats} interleaved repeat(s), {args.warmup_epochs} warm-up + {args.epochs} timed epoch(s) per run; "
        f"min and median over all timed epochs. Seconds per generated sample (one epoch = {BATCHES_PER_EPOCH} batches of {BATCH}).",
        "",
        "Our side (example for the first size; `<tmp>` is the run directory):",
        "",
    ]
    for trainer in args.trainers:
        spec = dict(
            side="ours",
            trainer=trainer,
            res=res,
            steps=steps,
            num_epochs=args.warmup_epochs + args.epochs,
            pretrained="<tiny-sd>",
            out="<tmp>",
        )
        reward = (
            " (rewards.load_reward replaced by mean brightness, in-process as the tests do)"
            if trainer == "alignprop"
            else ""
        )
        lines += [
            f"- `train_{trainer}.py {' '.join(our_argv(spec))}`{reward}; the DiffExp row drops "
            "`--no-cfg-schedule --no-prompt-weighting` and adds `--explore-frac 1.0`"
            + ("; the --compile rows add `--compile`" if args.compile else "")
        ]
    lines += [
        "",
        f"trl {TRL_VERSION} side (config fields set; the rest at trl's defaults; `DefaultDDPOStableDiffusionPipeline(dir, use_lora=True)` "
        "with height = width = the size passed to its sampling calls):",
        "",
    ]
    for trainer in args.trainers:
        spec = dict(trainer=trainer, steps=steps, num_epochs=args.warmup_epochs + args.epochs)
        cls = "DDPOConfig" if trainer == "ddpo" else "AlignPropConfig"
        lines += [f"- `{cls}({', '.join(f'{k}={v!r}' for k, v in trl_config_fields(spec).items())})`"]
    return lines


COMPILE_DIFFERENCE = (
    "The --compile rows only: our UNet runs compiled by torch.compile (inductor) in place; the warm-up epoch "
    "compiles (its time is in the notes, not in the table). trl 0.23.1 has no such option; a user could compile "
    "trl's pipeline.unet by hand, which this benchmark does not do."
)

DIFFERENCES = [
    "DDPO, the same work on both sides per epoch: per sample batch (2) the S sampling steps each call the UNet once "
    "on the doubled (unconditional + conditional) batch of 8, and the training pass makes S such calls with backward; "
    "2 VAE decodes, 2 text-encoder calls, 1 optimizer step. trl scores the rewards after all sampling, in the main "
    "thread (async_reward_computation off, its default); ours scores each batch (JPEG, a host-side reward) in a one-thread worker while the "
    "next batch samples.",
    "AlignProp, the same number of UNet calls (S per batch, the last one recomputed in backward by checkpointing), "
    "but trl runs every step with autograd on through torch.utils.checkpoint and detaches the first S-1 outputs, "
    "where ours runs them under no_grad; at eta 0 trl still draws a noise tensor and computes an (unused, NaN) "
    "log-prob at every step. The losses differ by a constant (trl: 10 - mean reward; ours: -mean reward).",
    "The DiffExp row only: the steps at w_low = 1 (t >= 0.8 T: none of 4 steps, 2 of 10) need only the conditional "
    "half of the CFG batch, and our trainers may skip the other half; the prompt weighting adds a word choice and an "
    "embedding blend per sample. trl has no DiffExp: that row's ratio is against plain trl.",
]


def sides(args: Args) -> tuple[str, ...]:
    return tuple(s for s in SIDES if (args.diffexp or "diffexp" not in s) and (args.compile or "compile" not in s))


def compiled_vs_eager(pretrained: Path, threads: int) -> str:
    """One UNet forward + backward at 64 px (batch 8, the CFG batch), eager and compiled as --compile
    does (diffusion.compile_unet, inductor), from the same LoRA weights: the largest differences of
    the output and of the LoRA gradients, relative to the largest eager value. In a subprocess, like the runs."""
    code = f"""
import json, sys, torch
sys.path[:0] = [{str(ROOT)!r}]
torch.set_num_threads({threads})
from diffusers import UNet2DConditionModel
from diffusion import add_lora, compile_unet
def run(compiled):
    unet = UNet2DConditionModel.from_pretrained({str(pretrained / "unet")!r})
    torch.manual_seed(0)
    params = add_lora(unet, {LORA_RANK}, {LORA_ALPHA})
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # lora_B starts at zero: give every adapter a non-zero effect
    if compiled:
        compile_unet(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, unet.config.in_channels, 32, 32, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    e = torch.randn(8, 77, unet.config.cross_attention_dim, generator=g)
    out = unet(x, t, e).sample
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    return out.detach(), [p.grad for p in params]
(a, ga), (b, gb) = run(False), run(True)
rel = lambda u, v: ((u - v).abs().max() / u.abs().max()).item()
print(json.dumps(dict(out=rel(a, b), grad=max(rel(u, v) for u, v in zip(ga, gb)))))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        return "FAILED: " + " | ".join(proc.stderr.strip().splitlines()[-3:])
    d = json.loads(proc.stdout.strip().splitlines()[-1])
    return f"largest difference of the output {d['out']:.1e} and of the LoRA gradients {d['grad']:.1e}, relative to the largest eager value"


def check_trl():
    """Exit 2 with one line unless trl with DDPOTrainer and AlignPropTrainer imports (installs nothing)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        print(TRL_MISSING, file=sys.stderr)
        sys.exit(2)
    try:
        from trl import AlignPropTrainer, DDPOTrainer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a newer trl without them, or a broken install
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(
            f"{TRL_MISSING} (trl {getattr(trl, '__version__', '?')} has no usable DDPOTrainer/AlignPropTrainer: {first})",
            file=sys.stderr,
        )
        sys.exit(2)


def main(args: Args):
    try:
        sizes = [parse_size(s) for s in args.sizes]
        if args.repeats < 1 or args.epochs < 1 or args.warmup_epochs < 0 or args.threads < 1 or not args.trainers:
            raise ValueError(
                "--repeats, --epochs and --threads must be >= 1, --warmup-epochs >= 0, and --trainers not empty"
            )
        if args.compile and args.warmup_epochs < 1:
            raise ValueError(
                "--compile needs --warmup-epochs >= 1: the first epoch compiles the UNet and must not be timed"
            )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os.environ.update(
        OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"
    )
    check_trl()

    tmp = None
    if args.keep_dir:
        work = Path(args.keep_dir).resolve()
        if work.exists() and any(work.iterdir()):
            print(f"error: --keep-dir {work} is not empty; give a new or empty directory", file=sys.stderr)
            sys.exit(2)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_peer_")
        work = Path(tmp.name)
    try:
        import torch

        torch.set_num_threads(args.threads)
        sys.path[:0] = [str(ROOT)]
        from tools.tiny import make_tiny_sd

        pretrained = make_tiny_sd(work / "tiny-sd")
        if args.compile:
            check = compiled_vs_eager(pretrained, args.threads)
            print(f"inductor against eager on the tiny UNet: {check}", flush=True)
        results: dict[tuple, list[dict]] = {}
        total = args.repeats * len(sizes) * len(args.trainers) * len(sides(args))
        done = 0
        for repeat in range(args.repeats):
            order = sides(args) if repeat % 2 == 0 else tuple(reversed(sides(args)))
            for res, steps in sizes:
                for trainer in args.trainers:
                    for side in order:
                        r = run_one(args, work, pretrained, trainer, res, steps, side, repeat)
                        results.setdefault((trainer, res, steps, side), []).append(r)
                        done += 1
                        head = f"[{done}/{total}] repeat {repeat + 1} {trainer} {res}px/{steps} steps {side}:"
                        if "failed" in r:
                            print(
                                f"{head} FAILED ({r['failed']}, {r['wall']:.0f} s)\n    " + "\n    ".join(r["tail"]),
                                flush=True,
                            )
                        else:
                            print(
                                f"{head} s/sample {' '.join(f'{v:.4f}' for v in r['sec_per_sample'])} "
                                f"(mean reward {r['reward_mean']:.4f}, {r['threads']} threads, run {r['wall']:.0f} s)",
                                flush=True,
                            )
        rows = summarise(results, args, sizes)
        lines = table(rows)
        print("\n" + "\n".join(lines))
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        notes = ["What the two sides do differently (S = denoising steps):", "", *[f"- {d}" for d in DIFFERENCES]]
        if args.compile:
            notes += [
                f"- {COMPILE_DIFFERENCE}",
                "",
                f"Inductor against eager on the tiny UNet (LoRA r{LORA_RANK}, fp32): {check}",
            ]
        md.write_text(
            "\n".join(
                [
                    "# bench_peer: our trainers vs trl " + TRL_VERSION,
                    "",
                    *settings_markdown(args, sizes),
                    "",
                    *lines,
                    "",
                    *notes,
                    "",
                ]
            )
        )
        print(f"\nwrote {md}" + (f"; runs kept in {work}" if args.keep_dir else ""))
        failed = sum(r["failed"] for r in rows)
        if failed:
            print(f"error: {failed} run(s) failed (their output is above)", file=sys.stderr)
            sys.exit(1)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    if sys.argv[1:2] == ["_worker"]:
        worker(sys.argv[2])
    else:
        import tyro

        main(
            tyro.cli(
                Args,
                description=__doc__.split("\n\nOne tiny")[0]
                + "\n\nWhat is matched and what is timed: the docstring of bench_peer.py.",
            )
        )
