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


def from_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)` for a hub id or a local directory, with a one-line error when
    the checkpoint is missing (offline, wrong id, wrong directory) instead of a library stack trace."""
    name = os.path.expanduser(str(name))
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
