"""Loading Stable Diffusion and prompt sets: the one code path for hub ids and local directories.

Shared by train_ddpo.py, train_alignprop.py, sample.py and train_reward.py. The tests build tiny
random-initialised models, save them in the hub layout and load them through these same functions.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PRETRAINED = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class CheckpointError(RuntimeError):
    """A model could not be found or read; the message says what is missing and how to get it."""


def _looks_like_path(name: str) -> bool:
    # A hub id is "owner/name"; anything absolute, relative-dotted or deeper is meant as a directory.
    return name.startswith((".", "/", "~")) or name.count("/") > 1


# Short names for the checkpoints shipped in this repository (built by toy.py), accepted wherever a
# hub id or directory is: `--pretrained toy`, `--reward-models pickscore_model toy-scorer ...`.
MODELS_DIR = Path(__file__).resolve().parent / "models"
ALIASES = {"toy": MODELS_DIR / "toy", "toy-scorer": MODELS_DIR / "toy-scorer"}


def from_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)` for a hub id or a local directory, with a one-line error when
    the checkpoint is missing (offline, wrong id, wrong directory) instead of a library stack trace."""
    name = os.path.expanduser(str(ALIASES.get(str(name), name)))
    if _looks_like_path(name) and not os.path.exists(name):
        raise CheckpointError(f"{what}: local directory '{name}' does not exist")
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # hub errors (offline, 404, bad id) are OSError/ValueError subclasses
        if os.path.isdir(name):
            raise CheckpointError(f"{what}: '{name}' is not a complete checkpoint directory ({str(e).splitlines()[0]})") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise CheckpointError(
            f"{what}: cannot load '{name}': it is not in the local Hugging Face cache"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and the hub could not provide it'}. "
            f"Download it on a machine with internet (`hf download {name}`) and pass its local directory, "
            f"or unset HF_HUB_OFFLINE. ({type(e).__name__})"
        ) from None


def load_pipeline(pretrained: str = DEFAULT_PRETRAINED, device="cpu", dtype=torch.float32):
    """A StableDiffusionPipeline (SD 1.x / 2.x) with a DDIM scheduler, frozen, on `device`.

    `pretrained` is a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or a directory in
    the same layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = from_pretrained(
        StableDiffusionPipeline, pretrained, "--pretrained", dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Text-encoder outputs [B, 77, D] of `prompts` (padded/truncated to the tokenizer's max length)."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def load_prompts(name_or_path: str, flag: str = "--prompts") -> list[str]:
    """A built-in prompt set (a file name in prompts/, without .txt) or any text file, one prompt a line."""
    builtin = PROMPTS_DIR / f"{name_or_path}.txt"
    path = builtin if builtin.is_file() else Path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.txt")))
        raise FileNotFoundError(f"{flag} '{name_or_path}' is neither a built-in prompt set ({known}) nor a file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{flag} file '{path}' has no prompts: write one prompt per line")
    return prompts


def build_clip_tokenizer(out_dir: str | Path):
    """Write and load the real CLIP BPE tokenizer from the vocabulary open_clip ships (SPEC §10).

    vocab.json: 256 byte symbols, the same with '</w>', one entry per merge, then the two special
    tokens; merges.txt: '#version: 0.2' then the first 48894 merges. Gives open_clip's token ids.
    """
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Generation without gradients (evaluation, sample.py, reward-data generation). The trainers own
# their sampling loops, since AlignProp keeps a graph and DDPO stores a trajectory.


@torch.no_grad()
def generate(
    pipe,
    prompt_embeds: torch.Tensor,
    guidance: torch.Tensor,
    num_steps: int,
    generator: torch.Generator,
    eta: float = 0.0,
    resolution: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Images in [0, 1] from prompt embeddings [B, L, D] with per-step guidance [num_steps].

    Noise comes from a CPU `generator`, so a seed gives the same images on any device.
    """
    from kernels import DDIMSchedule, cfg_ddim_step

    device, B = prompt_embeds.device, prompt_embeds.shape[0]
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent = resolution // pipe.vae_scale_factor
    uncond = encode_prompts(pipe, [""]).expand(B, -1, -1).to(prompt_embeds.dtype)
    pipe.scheduler.set_timesteps(num_steps)
    timesteps = pipe.scheduler.timesteps.to(device)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, num_steps, device)
    x = torch.randn(B, pipe.unet.config.in_channels, latent, latent, generator=generator).to(device, prompt_embeds.dtype)
    for i, t in enumerate(timesteps):
        out_u, out_c = pipe.unet(torch.cat([x, x]), t, torch.cat([uncond, prompt_embeds])).sample.chunk(2)
        coeffs = schedule.coefficients(t.expand(B), eta)
        z = torch.randn(x.shape, generator=generator).to(device, x.dtype) if eta > 0 else None
        x = cfg_ddim_step(out_u, out_c, x, guidance[i].expand(B), coeffs, noise=z, backend=backend)
    return decode(pipe, x)


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, rank, batch, ...): resuming redraws the same numbers."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


@torch.no_grad()
def evaluate_held_out(pipe, reward_fn, prompts, out_dir, num_steps, w_high, generator, resolution=None, backend=None) -> dict:
    """Held-out prompts, fixed seeds, constant w_high, no DiffExp, eta = 0: the same noise every
    time, so successive evaluations show what training changed. Saves NNN.png + prompts.json in
    `out_dir` (what sample.py's gallery reads) and returns the mean rewards for the log."""
    from torchvision.utils import save_image

    embeds = encode_prompts(pipe, prompts)
    guidance = torch.full((num_steps,), float(w_high), device=embeds.device)
    images = generate(pipe, embeds, guidance, num_steps, generator, 0.0, resolution, backend)
    scores, components = reward_fn(images, prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"{i:03d}.png")
    (out_dir / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "reward": scores.float().tolist()}))
    return {"eval_reward_mean": scores.float().mean().item()} | {f"eval_reward/{k}": v.float().mean().item() for k, v in components.items()}


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (differentiable)."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# LoRA and checkpoints (both trainers). A checkpoint is a directory written under a temporary
# name and renamed into place, so a crash mid-write never leaves a half checkpoint behind.


def add_lora(unet, rank: int, alpha: float):
    """LoRA adapters on the UNet's attention projections; returns the trainable parameters (fp32)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # train the adapters in fp32 even when the frozen weights are half
    return params


def lora_state_dict(unet) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_checkpoint(output_dir: str | Path, epoch: int, unet, state: dict, keep: int = 3) -> Path:
    """Write checkpoints/epoch_NNNN/ (diffusers LoRA weights + training state) atomically."""
    import shutil

    from diffusers import StableDiffusionPipeline

    ckpt_root = Path(output_dir) / "checkpoints"
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = ckpt_root / f".tmp_epoch_{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()  # so load_lora_weights rebuilds rank *and* alpha
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=weights, unet_lora_adapter_metadata=metadata)
    torch.save(state, tmp / "training_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(ckpt_root.glob("epoch_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = sorted((Path(output_dir) / "checkpoints").glob("epoch_*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, unet) -> dict:
    """Load LoRA weights into `unet` (which already has adapters) and return the training state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(ckpt / "pytorch_lora_weights.safetensors")
        state = torch.load(ckpt / "training_state.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing to the user
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' is unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete that directory to resume from the one before it"
        ) from None
    from diffusers.utils import convert_unet_state_dict_to_peft

    peft_weights = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in weights.items()})
    incompatible = set_peft_model_state_dict(unet, peft_weights)
    if getattr(incompatible, "unexpected_keys", None):
        raise CheckpointError(f"--resume: checkpoint '{ckpt}' does not match this model's LoRA layout (check --lora-rank and --pretrained)")
    return state


# ---------------------------------------------------------------------------------------------
# Logs: one JSON line per epoch (plain files always; Weights & Biases with --track).


class RunLog:
    def __init__(self, output_dir: str | Path, args, track: bool = False, project: str = "diffexp", enabled: bool = True):
        self.dir, self.enabled, self.wandb = Path(output_dir), enabled, None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "args.json").write_text(json.dumps(_jsonable(vars(args)), indent=2))
        if track:
            import wandb

            self.wandb = wandb.init(project=project, config=_jsonable(vars(args)), dir=str(self.dir))

    def log(self, record: dict, images: dict | None = None):
        if not self.enabled:
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self.wandb is not None:
            import wandb

            extra = {k: wandb.Image(str(v)) for k, v in (images or {}).items()}
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))} | extra, step=record.get("samples"))

    def truncate_after(self, epoch: int):
        """On resume, drop log lines of epochs after the checkpoint (they will be redone)."""
        path = self.dir / "log.jsonl"
        if self.enabled and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("epoch", -1) <= epoch]
            path.write_text("".join(ln + "\n" for ln in lines))


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
