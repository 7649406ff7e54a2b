"""Generate, evaluate and look at base or fine-tuned models.

    python sample.py generate --prompts unseen_animals --lora runs/alignprop/checkpoints/epoch_0099 --eval-rewards aesthetic,imagereward
    python sample.py plot runs/alignprop runs/alignprop-baseline --labels DiffExp AlignProp
    python sample.py gallery runs/alignprop          # writes runs/alignprop/gallery.html

`generate` saves every image, a grid and a CSV table of scores (one column per reward). `plot`
draws reward against the cumulative number of samples (the paper's x-axis) for one or more runs.
`gallery` writes a self-contained HTML page where a slider moves each held-out prompt's fixed-seed
image through the training epochs.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import sys
from pathlib import Path
from typing import Literal

import torch
import tyro
from tyro.conf import Positional


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def generate(
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
    lora: str | None = None,
    vae: str | None = None,
    prompts: str = "unseen_animals",
    prompt: str | None = None,
    num_per_prompt: int = 1,
    seed: int = 0,
    num_steps: int = 50,
    w_high: float = 7.5,
    cfg_schedule: bool = False,
    prompt_weighting: bool = False,
    t_sw: float = 0.8,
    w_low: float = 1.0,
    prompt_weight_range: tuple[float, float] = (1.0, 2.0),
    eta: float = 0.0,
    resolution: int | None = None,
    eval_rewards: str = "",
    reward_models: dict[str, str] | None = None,
    mixed_precision: Literal["no", "fp16", "bf16"] = "no",
    batch_size: int = 8,
    output_dir: str = "samples",
):
    """Generate images for a prompt set (or one --prompt), optionally with a LoRA checkpoint and DiffExp.

    Args:
        pretrained: hub id or local directory of the base model (SD 1.x/2.x or SDXL base).
        vae: replace the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix for SDXL under fp16).
        lora: a checkpoint directory written by the trainers (loaded with diffusers' load_lora_weights).
        prompts: built-in prompt set name or a text file, one prompt a line.
        prompt: a single prompt instead of --prompts.
        num_per_prompt: images per prompt (seeds seed, seed+1, ...).
        seed: first seed; image (prompt i, j) uses its own generator, so results do not depend on batching.
        num_steps: DDIM steps.
        w_high: guidance scale (after the switch when --cfg-schedule).
        cfg_schedule: sample with DiffExp's dynamic CFG schedule (w_low for t >= t_sw*T).
        prompt_weighting: sample with DiffExp's random prompt weighting.
        t_sw: DiffExp switch point in [0, 1].
        w_low: DiffExp low guidance scale.
        prompt_weight_range: DiffExp prompt-weight range.
        eta: DDIM eta.
        resolution: image size (default: the model's native size).
        eval_rewards: comma-separated rewards, each scored separately, e.g. 'aesthetic,imagereward'.
        reward_models: reward checkpoint overrides (keys of rewards.DEFAULT_MODELS).
        mixed_precision: weights' precision.
        batch_size: images generated at once.
        output_dir: where images, grid.png and scores.csv go.
    """
    import rewards
    from diffusion import CheckpointError, TextConditioner, generate as generate_images, load_pipeline, load_prompts
    from explore import DiffExpConfig, diffexp_conditioning

    diffexp = DiffExpConfig(cfg_schedule, prompt_weighting, t_sw, w_low, w_high, tuple(prompt_weight_range))
    reward_names = [r.strip() for r in eval_rewards.split(",") if r.strip()]
    try:
        diffexp.validate()
        prompt_list = [prompt] if prompt else load_prompts(prompts, "--prompts")
        for name in reward_names:
            rewards.parse_reward_spec(name, "--eval-rewards")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if lora is not None and not (Path(lora) / "pytorch_lora_weights.safetensors").is_file():
        fail(f"--lora {lora}: no pytorch_lora_weights.safetensors there (pass a checkpoints/epoch_NNNN directory)")

    from torchvision.utils import save_image
    from tqdm import tqdm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    try:
        pipe = load_pipeline(pretrained, device, dtype, vae=vae)
        if lora is not None:
            pipe.load_lora_weights(lora)
        scorers = {name: rewards.load_reward(name, device=device, dtype=dtype, **(reward_models or {})) for name in reward_names}
    except (CheckpointError, ValueError) as e:
        fail(str(e))

    jobs = [(p, seed + j) for p in prompt_list for j in range(num_per_prompt)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    T = pipe.scheduler.config.num_train_timesteps
    pipe.scheduler.set_timesteps(num_steps)
    timesteps = pipe.scheduler.timesteps  # on the host: the guidance schedule is read there
    text = TextConditioner(pipe, resolution)
    rows, all_images = [], []
    for start in tqdm(range(0, len(jobs), batch_size), desc="generating"):
        batch = jobs[start : start + batch_size]
        batch_prompts = [p for p, _ in batch]
        images = []
        for p, s in batch:  # one generator per image: the same seed gives the same image at any batch size
            g = torch.Generator().manual_seed(s)
            cond, guidance, weights = diffexp_conditioning(diffexp, cfg_schedule or prompt_weighting, [p], text.encode([p]), text, timesteps, T, g)
            images.append(generate_images(pipe, cond, guidance, num_steps, g, eta, resolution, negative=text.negative))
            rows.append({"index": len(rows), "prompt": p, "seed": s, "word": weights[0].word or "", "weight": round(weights[0].weight, 3)})
        images = torch.cat(images)
        for name, scorer in scorers.items():
            with torch.no_grad():
                scores, _ = scorer(images, batch_prompts)
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
    print(f"wrote {len(rows)} images, grid.png and scores.csv to {out}")


def _read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    if not path.is_file():
        fail(f"{run}: no log.jsonl (pass a training run's --output-dir)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(runs: Positional[list[str]], labels: list[str] | None = None, output: str = "reward_curve.png", key: str = "reward_mean"):
    """Reward against cumulative samples for one or several runs on one plot (e.g. DiffExp vs baseline).

    Args:
        runs: training output directories (each holds log.jsonl).
        labels: a legend label per run (default: the directory names).
        output: the PNG to write.
        key: the logged quantity on the y axis (reward_mean, eval_reward_mean, reward/NAME, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        fail(f"--labels: {len(labels)} labels for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, label in zip(runs, labels):
        points = [(r["samples"], r[key]) for r in _read_log(Path(run)) if key in r]
        if not points:
            fail(f"{run}: the log has no '{key}' entries")
        ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("number of samples")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(f"wrote {output}")


def gallery(run: Positional[str], output: str | None = None):
    """A self-contained HTML page: for each held-out prompt, a slider through the training epochs.

    Args:
        run: a training output directory with eval/epoch_NNNN/ folders (written every --eval-every epochs).
        output: the HTML file (default: RUN/gallery.html).
    """
    run_dir = Path(run)
    epochs = sorted((run_dir / "eval").glob("epoch_*"))
    if not epochs:
        fail(f"{run}: no eval/epoch_* folders (train with --eval-every > 0)")
    meta = [json.loads((e / "prompts.json").read_text()) for e in epochs]
    prompts = meta[0]["prompts"]

    def data_uri(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    blocks = []
    for i, prompt in enumerate(prompts):
        frames = [data_uri(e / f"{i:03d}.png") for e in epochs]
        captions = [f"epoch {int(e.name.split('_')[1])}: reward {m['reward'][i]:.4f}" for e, m in zip(epochs, meta)]
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
</head><body><h2>{html.escape(run_dir.name)}: held-out prompts, fixed seeds, across training</h2>{''.join(blocks)}</body></html>"""
    output = Path(output) if output else run_dir / "gallery.html"
    output.write_text(page)
    print(f"wrote {output} ({len(prompts)} prompts x {len(epochs)} epochs)")


if __name__ == "__main__":
    tyro.extras.subcommand_cli_from_dict({"generate": generate, "plot": plot, "gallery": gallery})
