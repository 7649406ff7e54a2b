"""Loading Stable Diffusion and prompt sets: the one code path for hub ids and local directories.

Shared by train_ddpo.py, train_alignprop.py, sample.py and train_reward.py. The tests build tiny
random-initialised models, save them in the hub layout and load them through these same functions.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import sys
from dataclasses import dataclass
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
ALIASES = {"toy": MODELS_DIR / "toy", "toy-scorer": MODELS_DIR / "toy-scorer", "toy-hidden": MODELS_DIR / "toy-hidden"}


def from_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)` for a hub id or a local directory, with a one-line error when
    the checkpoint is missing (offline, wrong id, wrong directory) instead of a library stack trace."""
    name = os.path.expanduser(str(ALIASES.get(str(name), name)))
    if _looks_like_path(name) and not os.path.exists(name):
        raise CheckpointError(f"{what}: local directory '{name}' does not exist")
    try:
        with _quiet_hub_fallback():
            return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # hub errors (offline, 404, bad id) are OSError/ValueError subclasses
        if os.path.isdir(name):
            raise CheckpointError(
                f"{what}: '{name}' is not a complete checkpoint directory ({str(e).splitlines()[0]})"
            ) from None
        offline = hub_offline()
        raise CheckpointError(
            f"{what}: cannot load '{name}': it is not in the local Hugging Face cache"
            f"{' and HF_HUB_OFFLINE is set' if offline else ' and the hub could not provide it'}. "
            f"Download it on a machine with internet (`hf download {name}`) and pass its local directory"
            f"{', or unset HF_HUB_OFFLINE' if offline else ''}. ({type(e).__name__})"
        ) from None


@contextlib.contextmanager
def _quiet_hub_fallback():
    """Drop diffusers' "Couldn't connect to the Hub ... Will try to load from local cache" warning while
    loading: the checkpoints were checked beforehand (check_checkpoints), so it says nothing new, and it
    must not come before a one-line error."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record):
            return not str(record.getMessage()).startswith("Couldn't connect to the Hub")

    handlers = [h for name in ("diffusers", "") for h in logging.getLogger(name).handlers]
    drop = Drop()
    for h in handlers:
        h.addFilter(drop)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(drop)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, or check_checkpoints switched to offline mode."""
    env = any(
        os.environ.get(k, "").strip().lower() in ("1", "on", "yes", "true")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    constants = sys.modules.get("huggingface_hub.constants")
    return env or bool(constants is not None and constants.HF_HUB_OFFLINE)


def _hub_probe(url: str, timeout: float = 5.0):
    """(HTTP status or None, reason) of one HEAD request, no retries: how the hub answers, fast."""
    import urllib.error
    import urllib.request

    from huggingface_hub.utils import build_hf_headers

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # a redirect (to the file's storage) already says the file is there

    try:
        request = urllib.request.Request(url, method="HEAD", headers=build_hf_headers())
        with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as response:
            return response.status, ""
    except urllib.error.HTTPError as e:
        return e.code, ""
    except Exception as e:  # noqa: BLE001 - DNS failure, refused, timeout, proxy: all mean "cannot reach it"
        reason = getattr(e, "reason", e)
        return None, f"{type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else 'no answer'}"


def _in_hf_cache(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo, filename)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        return None
    return path if isinstance(path, str) else None


def check_checkpoints(needed: list[tuple[str, str, tuple[str, ...]]]) -> list[str]:
    """Check, before any model is loaded, that every checkpoint a run needs can be had.

    `needed`: (flag, name, files) per checkpoint: `name` a local directory or file, a short name of
    ALIASES, or a hub id, and `files` the file names of which at least one must be there (a hub id is
    checked in the local Hugging Face cache; empty: the directory or id alone). Raises CheckpointError
    in one line naming the flag and the fix for the first one missing. When HF_HUB_OFFLINE is not set
    and a hub id is needed, the hub is asked once (one HEAD request, 5 s timeout, no retries): if it
    cannot be reached, the process switches to offline mode, so the loaders do not spend a minute
    retrying; a hub file that is not cached then fails here at once. Returns notes to print."""
    from huggingface_hub import constants

    notes, reachable = [], None
    for flag, name, files in needed:
        name = os.path.expanduser(str(ALIASES.get(str(name), name)))
        if os.path.exists(name) or _looks_like_path(name):
            if not os.path.exists(name):
                raise CheckpointError(
                    f"{flag}: local directory '{name}' does not exist (pass an existing directory or a hub id)"
                )
            if files and os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in files):
                raise CheckpointError(
                    f"{flag}: '{name}' is not a complete checkpoint directory (no {' or '.join(files)} in it)"
                )
            continue
        if any(_in_hf_cache(name, f) for f in files or ("config.json", "model_index.json")):
            if not hub_offline() and reachable is None:
                status, reason = _hub_probe(constants.ENDPOINT)
                reachable = status is not None
                if not reachable:
                    _go_offline()
                    notes.append(
                        f"note: the Hugging Face hub cannot be reached ({reason}): loading from the local cache only (set HF_HUB_OFFLINE=1 to skip this check)"
                    )
            continue
        fix = f"download it on a machine with internet (`hf download {name}`) and pass its local directory with {flag} DIR"
        if hub_offline():
            raise CheckpointError(
                f"{flag}: '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: {fix}, or unset HF_HUB_OFFLINE to download it here"
            )
        status, reason = _hub_probe(f"{constants.ENDPOINT}/{name}/resolve/main/{(files or ('config.json',))[0]}")
        if status is None:
            _go_offline()
            raise CheckpointError(
                f"{flag}: '{name}' is not in the local Hugging Face cache and the hub cannot be reached ({reason}): {fix}"
            )
        if status in (401, 403, 404):
            what = "needs a login (run `hf auth login`) or " if status != 404 else ""
            raise CheckpointError(
                f"{flag}: the hub has no '{(files or ('config.json',))[0]}' in '{name}' (HTTP {status}): the id is wrong or the repository {what}is missing; "
                f"check the id, or pass a local directory with {flag} DIR"
            )
        reachable = True  # the loader downloads it
    return notes


def _go_offline():
    """Offline mode for the rest of this process (the hub libraries read it when they call the hub)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True


def vae_downsampling(pretrained: str, vae: str | None = None) -> tuple[int, str]:
    """(factor, where it was read) of the VAE a run will use: 2 ** (len(block_out_channels) - 1) from
    its config.json in a local directory or the Hugging Face cache, without loading it; (8, 'assumed')
    when the config is not at hand (every SD / SDXL VAE downsamples by 8)."""
    name = os.path.expanduser(str(ALIASES.get(str(vae or pretrained), vae or pretrained)))
    rel = "config.json" if vae else "vae/config.json"
    path = os.path.join(name, rel) if os.path.isdir(name) else _in_hf_cache(name, rel)
    try:
        channels = json.loads(Path(path).read_text())["block_out_channels"]
        return 2 ** (len(channels) - 1), f"{'--vae' if vae else '--pretrained'} {vae or pretrained}"
    except (TypeError, OSError, ValueError, KeyError):
        return 8, "assumed"


def inspect_pipeline(pretrained: str) -> str:
    """'sd' or 'sdxl' for a base checkpoint (hub id or directory), read from its model_index.json
    before any weights are loaded; a CheckpointError in one line for anything that is not a text-to-
    image SD / SDXL base model (an SDXL refiner, a checkpoint without its text encoder, another class).
    A hub id whose model_index.json cannot be had (offline and not cached) is left to the loader's own error."""
    name = os.path.expanduser(str(ALIASES.get(str(pretrained), pretrained)))
    index = Path(name) / "model_index.json"
    if not index.is_file():
        if _looks_like_path(name) or os.path.isdir(name):
            if not os.path.exists(name):
                raise CheckpointError(f"--pretrained: local directory '{name}' does not exist")
            raise CheckpointError(
                f"--pretrained: '{name}' is not a complete checkpoint directory (no model_index.json; pass a diffusers pipeline directory)"
            )
        from huggingface_hub import hf_hub_download

        try:  # cached, or else (online) the one small file that says which pipeline it is
            index = Path(hf_hub_download(name, "model_index.json", local_files_only=True))
        except Exception:  # noqa: BLE001
            try:
                if hub_offline():
                    raise OSError("offline")
                index = Path(hf_hub_download(name, "model_index.json"))
            except Exception:  # noqa: BLE001 - unavailable: load_pipeline reports it with the full advice
                return "unknown"
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--pretrained: cannot read '{index}' ({e})") from None
    cls = config.get("_class_name", "")
    missing_text_encoder = config.get("text_encoder") in (None, [None, None]) or config.get("tokenizer") in (
        None,
        [None, None],
    )
    if config.get("requires_aesthetics_score") or (cls.startswith("StableDiffusionXL") and missing_text_encoder):
        raise CheckpointError(
            f"--pretrained: '{pretrained}' is an SDXL refiner or lacks text_encoder/tokenizer; pass an SDXL *base* "
            f"checkpoint (e.g. stabilityai/stable-diffusion-xl-base-1.0) or an SD 1.x/2.x one"
        )
    if cls.startswith("StableDiffusionXL"):
        return "sdxl"
    if cls.startswith("StableDiffusion") and not missing_text_encoder:
        return "sd"
    raise CheckpointError(
        f"--pretrained: '{pretrained}' is a {cls or 'unknown'} pipeline; this project trains SD 1.x/2.x and SDXL base models"
    )


def load_pipeline(pretrained: str = DEFAULT_PRETRAINED, device="cpu", dtype=torch.float32, vae: str | None = None):
    """A StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusionXLPipeline (SDXL base) with a DDIM
    scheduler, frozen, on `device`.

    `pretrained` is a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
    stabilityai/stable-diffusion-xl-base-1.0) or a directory in the same layout (model_index.json,
    unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/, tokenizer_2/).
    `vae` replaces the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix). SDXL's own VAE overflows in
    float16 (its config says `force_upcast`), so under float16 it is kept in float32 and `decode`
    runs it in float32 (bf16 is safe and left alone).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind = inspect_pipeline(pretrained)
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if vae is not None:
        extra["vae"] = from_pretrained(AutoencoderKL, vae, "--vae", dtype=dtype)
    pipe = from_pretrained(cls, pretrained, "--pretrained", dtype=dtype, **extra)
    scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = DDIMScheduler.from_config(scheduler_config)
    # SDXL ships an Euler config; DDIM built from it is SD's DDIM, except that DDIM's defaults for keys
    # the config lacks are clip_sample=True / set_alpha_to_one=True, which are not SD's or SDXL's.
    defaulted = [k for k in ("clip_sample", "set_alpha_to_one") if k not in scheduler_config]
    if defaulted:
        pipe.scheduler = DDIMScheduler.from_config({**scheduler_config, **{k: False for k in defaulted}})
        print(
            f"note: the scheduler config of '{pretrained}' lacks {', '.join(defaulted)}; using False (the SD/SDXL value)",
            file=sys.stderr,
        )
    modules = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    for module in filter(None, modules):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if kind == "sdxl" and dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    return pipe


@dataclass
class Conditioning:
    """Everything the UNet is conditioned on, per sample.

    SD: the text encoder's token states `embeds` [B, 77, D]. SDXL adds the pooled text embedding
    `pooled` [B, 1280] and the micro-conditioning `time_ids` [B, 6] = (H, W, 0, 0, H, W), which the
    UNet takes as `added_cond_kwargs`. Indexing, `cat` and `expand` act on every field at once, so the
    trainers store and replay a conditioning without knowing which model it is for.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if v is None else fn(v) for v in (self.embeds, self.pooled, self.time_ids)))

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> Conditioning:
        return self._map(lambda v: v[idx])

    def expand(self, n: int) -> Conditioning:
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda v: v.to(*args, **kwargs))

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        fields = [[getattr(c, f) for c in items] for f in ("embeds", "pooled", "time_ids")]
        return Conditioning(*(None if vs[0] is None else torch.cat(vs) for vs in fields))

    def unet_kwargs(self) -> dict:
        added = None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.embeds, "added_cond_kwargs": added}


class TextConditioner:
    """Prompts -> `Conditioning` for one pipeline at one resolution (the one text path of every script).

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states (before the
    final layer norm) of both text encoders concatenated to [B, 77, 768 + 1280], the second encoder's
    projected embedding as `pooled`, and `time_ids` (H, W, 0, 0, H, W) for the run's resolution.

    Two "empty" conditionings, which are the same tensor on SD and different ones on SDXL:
      `empty`    the encoding of "" — DiffExp's e_empty, which prompt weighting blends towards;
      `negative` CFG's unconditional input — zeros (embeddings and pooled) when the pipeline sets
                 `force_zeros_for_empty_prompt` (SDXL base does), else the encoding of "".
    """

    def __init__(self, pipe, resolution: int | None = None):
        self.pipe = pipe
        self.tokenizers = [pipe.tokenizer] + (
            [pipe.tokenizer_2] if getattr(pipe, "text_encoder_2", None) is not None else []
        )
        self.text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if len(self.tokenizers) == 2 else [])
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.empty = self.encode([""])
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            zeros = lambda v: None if v is None else torch.zeros_like(v)  # noqa: E731
            self.negative = Conditioning(zeros(self.empty.embeds), zeros(self.empty.pooled), self.empty.time_ids)
        else:
            self.negative = self.empty

    @property
    def widths(self) -> list[int]:
        """The width of each encoder's part of `embeds` (SDXL: [768, 1280])."""
        return [te.config.hidden_size for te in self.text_encoders]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        device = self.text_encoders[0].device
        if len(self.text_encoders) == 1:  # SD 1.x / 2.x
            tok = self.tokenizers[0](
                prompts,
                padding="max_length",
                max_length=self.tokenizers[0].model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            return Conditioning(self.text_encoders[0](tok.input_ids.to(device))[0])
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected text embedding
        H = W = self.resolution
        time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=states[0].dtype, device=device).expand(len(prompts), -1)
        return Conditioning(torch.cat(states, dim=-1), pooled, time_ids)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Token states [B, 77, D] of `prompts` (padded/truncated to the tokenizer's max length); on SDXL
    the concatenation of both encoders' (use TextConditioner for the pooled embedding and time ids)."""
    return (
        TextConditioner(pipe).encode(prompts).embeds if hasattr(pipe, "text_encoder_2") else _encode_sd(pipe, prompts)
    )


def _encode_sd(pipe, prompts):
    tok = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def cfg_unet(unet, x, t, cond: Conditioning, negative: Conditioning, guidance=None):
    """The two outputs classifier-free guidance combines, (out_u, out_c), from one UNet call.

    x: [B, C, h, w]; t: a scalar timestep or one per sample; cond: the samples' conditioning;
    negative: CFG's unconditional conditioning ([1, ...] or [B, ...]); guidance: each sample's scale
    as host numbers (a float, a list or a CPU tensor), or None.

    CFG is out_u + w (out_c - out_u). At w = 1 that is out_c, at w = 0 out_u: a sample whose scale is
    exactly 1 (DiffExp's default w_low) needs only the conditional row and one at 0 only the
    unconditional row, so the UNet batch holds just the rows some sample needs, and the half a sample
    skipped is returned as a copy of the half it has (then the CFG step yields exactly that output).
    The scales must be host values so that choosing rows never waits on the device.
    """
    B = len(x)
    t = t.expand(B) if t.ndim == 0 else t
    negative = negative.expand(B) if len(negative) != B else negative
    if guidance is None:
        w = [None] * B
    elif isinstance(guidance, (int, float)):
        w = [float(guidance)] * B
    else:
        w = torch.as_tensor(guidance).reshape(-1).expand(B).tolist()
    rows_u = [i for i in range(B) if w[i] != 1.0]
    rows_c = [i for i in range(B) if w[i] != 0.0]
    if len(rows_u) == B and len(rows_c) == B:  # ordinary CFG: the doubled batch, unconditional half first
        inputs = Conditioning.cat([negative, cond])
        return unet(torch.cat([x, x]), torch.cat([t, t]), **inputs.unet_kwargs()).sample.chunk(2)
    if not rows_u or not rows_c:  # every sample at w = 1 (or every one at w = 0): one half only
        out = unet(x, t, **(cond if rows_c else negative).unet_kwargs()).sample
        return out, out
    # a mix (DDPO's training pass visits shuffled steps): the needed rows of the doubled batch, then each
    # output put back in place; the two index lists go to the device in one copy each, without a sync
    pos_u = {i: k for k, i in enumerate(rows_u)}
    pos_c = {i: len(rows_u) + k for k, i in enumerate(rows_c)}
    take = _device_index(rows_u + [B + i for i in rows_c], x.device)
    put = _device_index(
        [pos_u.get(i, pos_c.get(i)) for i in range(B)] + [pos_c.get(i, pos_u.get(i)) for i in range(B)], x.device
    )
    inputs = Conditioning.cat([negative, cond])._map(lambda v: v.index_select(0, take.to(v.device)))
    out = unet(
        torch.cat([x, x]).index_select(0, take), torch.cat([t, t]).index_select(0, take), **inputs.unet_kwargs()
    ).sample
    return out.index_select(0, put).chunk(2)


def compile_problem() -> str | None:
    """Why --compile cannot work on this machine, or None: torch.compile's inductor backend builds its
    CPU kernels (and its wrapper) with a C++ compiler, and without one it fails at the first UNet call,
    deep in a traceback, after the models are loaded."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 - whatever inductor raises, the fix is the same
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (
            f"--compile: torch.compile's inductor backend needs a C++ compiler and found none ({reason}); "
            f"install one (e.g. apt install g++, or set CXX) or run without --compile"
        )
    return None


def compile_unet(unet):
    """torch.compile the UNet in place (nn.Module.compile), LoRA adapters included, so its state-dict
    keys, the checkpoints and load_checkpoint stay those of the eager module. The first calls compile
    (about 1.5 minutes for the tiny test UNet on 2 CPU cores); each new grad mode compiles once more,
    and the first new batch size recompiles once with the batch dimension dynamic (the w = 1 / w = 0
    shortcut of cfg_unet and DDPO's shuffled training steps change it), after which no call recompiles."""
    unet.compile()
    return unet


def _device_index(rows: list[int], device) -> torch.Tensor:
    """An index tensor on `device`, copied from pinned memory without waiting for the device."""
    index = torch.tensor(rows, dtype=torch.long)
    return index.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else index


def load_prompts(name_or_path: str, flag: str = "--prompts") -> list[str]:
    """A prompt set: a built-in name, a text file (one prompt a line) or a column of a CSV/TSV file.

    - `NAME`: a built-in set, `prompts/NAME.txt` or an entry of TABULAR_SETS (`parti`: the 150
      PartiPrompts of the "Imagination" challenge).
    - `FILE` (any extension but .csv/.tsv): UTF-8 text, one prompt a line (stripped; blank lines skipped).
    - `FILE.csv[:COLUMN][?COL=V1|V2;COL2=V3]` (or .tsv): a UTF-8 table with a header row (.csv: comma,
      "-quoting; .tsv: tab, no quoting), prompts verbatim from COLUMN (default: the one column named
      Prompt or Prompts, any case), only the rows where COL is one of V1, V2, ... and COL2 is V3. Values
      match exactly after stripping surrounding spaces (DrawBench's category is "Gary Marcus et al. ").
      FILE is the part up to the first .csv/.tsv followed by ':', '?' or the end; a relative FILE that
      does not exist is looked up in prompts/. Column names cannot hold '?', '=' or ';'; values cannot
      hold '|' or ';'. A string naming an existing file is always read as that whole file.
      Examples: `prompts/PartiPrompts.tsv:Prompt?Challenge=Imagination` (= `parti`),
      `PartiPrompts.tsv:Prompt?Category=Food & Beverage;Challenge=Basic|Complex`,
      `drawbench.csv:Prompts?Category=Conflicting|Gary Marcus et al.|Reddit` (DrawBench's 58).

    Errors (unknown name or file, unknown column, no matching row, non-UTF-8 or empty file) raise
    ValueError / FileNotFoundError with a one-line message starting with `flag`.
    """
    builtin = PROMPTS_DIR / f"{name_or_path}.txt"
    spec = TABULAR_SETS.get(name_or_path)
    if spec is not None:
        file, column, filters = _parse_table_spec(spec)
        return _load_table(PROMPTS_DIR / file, column, filters, flag, name_or_path)
    path = builtin if builtin.is_file() else Path(os.path.expanduser(name_or_path))
    if path.is_file() and path.suffix.lower() not in (".csv", ".tsv"):
        prompts = [line.strip() for line in _read_utf8(path, flag).splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{flag} file '{path}' has no prompts: write one prompt per line")
        return prompts
    try:
        table = (str(path), None, []) if path.is_file() else _parse_table_spec(name_or_path)
    except ValueError as e:
        raise ValueError(f"{flag} '{name_or_path}': {e}") from None
    if table is None:
        known = ", ".join(sorted([p.stem for p in PROMPTS_DIR.glob("*.txt")] + list(TABULAR_SETS)))
        raise FileNotFoundError(f"{flag} '{name_or_path}' is neither a built-in prompt set ({known}) nor a file")
    file, column, filters = table
    path = Path(os.path.expanduser(file))
    if not path.is_file() and not path.is_absolute() and (PROMPTS_DIR / file).is_file():
        path = PROMPTS_DIR / file
    if not path.is_file():
        raise FileNotFoundError(f"{flag} '{name_or_path}': file '{file}' does not exist")
    return _load_table(path, column, filters, flag, name_or_path)


# Built-in prompt sets that are a selection from a table in prompts/ (in load_prompts' FILE.csv:COLUMN?... syntax).
TABULAR_SETS = {
    # Our reading of the DiffExp paper's "150 challenging Parti prompts": the only Challenge with 150.
    "parti": "PartiPrompts.tsv:Prompt?Challenge=Imagination",
}


def _read_utf8(path: Path, flag: str) -> str:
    """The text of `path` as UTF-8 (a byte-order mark is dropped), or a one-line error naming flag and file."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{flag} file '{path}' is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): re-save it as UTF-8"
        ) from None


def _parse_table_spec(spec: str):
    """'FILE.csv[:COLUMN][?COL=V1|V2;COL2=V3]' -> (FILE, COLUMN or None, [(COL, {V1, V2}), ...]), or None
    when `spec` does not name a .csv/.tsv file. FILE ends at the first .csv/.tsv followed by ':', '?' or the end."""
    import re

    m = re.fullmatch(r"(.*?\.(?:csv|tsv))(?::([^?]*))?(?:\?(.*))?", spec, re.IGNORECASE | re.DOTALL)
    if m is None:
        return None
    file, column, query = m.groups()
    filters = []
    for cond in query.split(";") if query is not None else []:  # not '&': Parti has "Writing & Symbols"
        col, eq, values = cond.partition("=")
        if not eq or not col.strip():
            raise ValueError(f"filter '{cond}' is not COLUMN=VALUE or COLUMN=V1|V2")
        filters.append((col.strip(), {v.strip() for v in values.split("|")}))
    return file, (column or "").strip() or None, filters


def _load_table(path: Path, column: str | None, filters, flag: str, spec: str) -> list[str]:
    """The non-empty cells of `column` (verbatim) in the rows of a CSV/TSV file that pass every filter."""
    import csv
    import io

    text = _read_utf8(path, flag)
    tsv = path.suffix.lower() == ".tsv"  # TSV has no quoting: a prompt may start with '"' (PartiPrompts does)
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
    )
    try:
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as e:
        raise ValueError(f"{flag} file '{path}' is not a valid {'TSV' if tsv else 'CSV'} file ({e})") from None
    if not rows:
        raise ValueError(f"{flag} file '{path}' is empty: it needs a header row, then one prompt per row")
    header = [name.strip() for name in rows[0]]

    def index(name: str) -> int:
        if name not in header:
            raise ValueError(
                f"{flag} '{spec}': file '{path}' has no column {name!r}; its columns: {', '.join(map(repr, header))}"
            )
        return header.index(name)

    if column is None:  # no ':COLUMN': the one column named prompt/prompts, in any case
        named = [name for name in header if name.lower() in ("prompt", "prompts")]
        if len(named) != 1:
            raise ValueError(
                f"{flag} '{spec}': name the prompt column as FILE:COLUMN; columns of '{path}': {', '.join(map(repr, header))}"
            )
        column = named[0]
    col = index(column)

    def cell(row: list[str], i: int) -> str:
        return row[i] if i < len(row) else ""

    rows, applied = rows[1:], []
    for name, values in filters:
        i = index(name)
        kept = [row for row in rows if cell(row, i).strip() in values]
        if not kept:
            seen = sorted({cell(row, i).strip() for row in rows})
            shown = ", ".join(map(repr, seen[:20])) + (f", ... ({len(seen)} in all)" if len(seen) > 20 else "")
            where = f" among the rows with {' and '.join(applied)}" if applied else ""
            raise ValueError(
                f"{flag} '{spec}': no row of '{path}' has {name} in {sorted(values)}; the values of {name}{where}: {shown or 'none'}"
            )
        rows = kept
        applied.append(f"{name}={'|'.join(sorted(values))}")
    prompts = [cell(row, col) for row in rows if cell(row, col).strip()]
    if not prompts:
        raise ValueError(f"{flag} '{spec}': file '{path}' has no prompts in column {column!r}")
    return prompts


def build_clip_tokenizer(out_dir: str | Path):
    """Write and load the real CLIP BPE tokenizer from the vocabulary open_clip ships (built offline, as every test model is).

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
    cond: Conditioning | torch.Tensor,
    guidance: torch.Tensor,
    num_steps: int,
    generator: torch.Generator,
    eta: float = 0.0,
    resolution: int | None = None,
    backend: str | None = None,
    negative: Conditioning | None = None,
) -> torch.Tensor:
    """Images in [0, 1] from a conditioning (or SD prompt embeddings [B, L, D]) with per-step
    guidance [num_steps]; `negative` is CFG's unconditional input (default: the pipeline's).

    Noise comes from a CPU `generator` (x_T first, then each step's noise when eta > 0), so a seed
    gives the same images on any device.
    """
    from kernels import DDIMSchedule, cfg_ddim_step

    cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)
    device, dtype, B = cond.embeds.device, cond.embeds.dtype, len(cond)
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if negative is None:  # encoding "" costs a text-encoder call: callers that sample often pass their own
        negative = TextConditioner(pipe, resolution).negative
    negative = negative.to(device, dtype)
    latent = resolution // pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(num_steps)
    timesteps = pipe.scheduler.timesteps.to(device)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, num_steps, device)
    guidance_host = guidance.detach().cpu()  # read once, so the skip of cfg_unet never waits inside the loop
    guidance = guidance.to(device)
    x = torch.randn(B, pipe.unet.config.in_channels, latent, latent, generator=generator).to(device, dtype)
    for i, t in enumerate(timesteps):
        out_u, out_c = cfg_unet(pipe.unet, x, t, cond, negative, float(guidance_host[i]))
        coeffs = schedule.coefficients(t.expand(B), eta)
        z = torch.randn(x.shape, generator=generator).to(device, x.dtype) if eta > 0 else None
        x = cfg_ddim_step(out_u, out_c, x, guidance[i].expand(B), coeffs, noise=z, backend=backend)
    return decode(pipe, x)


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, rank, batch, ...): resuming redraws the same numbers."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


@torch.no_grad()
def evaluate_held_out(
    pipe, reward_fn, prompts, out_dir, num_steps, w_high, generator, resolution=None, backend=None
) -> dict:
    """Held-out prompts, fixed seeds, constant w_high, no DiffExp, eta = 0: the same noise every
    time, so successive evaluations show what training changed. Saves NNN.png + prompts.json in
    `out_dir` (what sample.py's gallery reads) and returns the mean rewards for the log."""
    from torchvision.utils import save_image

    text = TextConditioner(pipe, resolution)
    cond = text.encode(prompts)
    guidance = torch.full((num_steps,), float(w_high))
    images = generate(pipe, cond, guidance, num_steps, generator, 0.0, resolution, backend, negative=text.negative)
    scores, components = reward_fn(images, prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out_dir / f"{i:03d}.png")
    (out_dir / "prompts.json").write_text(json.dumps({"prompts": list(prompts), "reward": scores.float().tolist()}))
    return {"eval_reward_mean": scores.float().mean().item()} | {
        f"eval_reward/{k}": v.float().mean().item() for k, v in components.items()
    }


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (differentiable), run at the VAE's own precision: a float32 VAE
    (SDXL's, kept in float32 under fp16 because it overflows there) runs with autocast off, so
    autocast cannot put it back into float16."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float32 and torch.is_autocast_enabled(latents.device.type)
    with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# LoRA and checkpoints (both trainers). A checkpoint is a directory written under a temporary
# name and renamed into place, so a crash mid-write never leaves a half checkpoint behind.


def add_lora(unet, rank: int, alpha: float):
    """LoRA adapters on the UNet's attention projections; returns the trainable parameters (fp32)."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # train the adapters in fp32 even when the frozen weights are half
    return params


def lora_state_dict(unet) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_checkpoint(output_dir: str | Path, epoch: int, unet, state: dict, keep: int = 3) -> Path:
    """Write checkpoints/epoch_NNNN/ (diffusers LoRA weights + training state) atomically, with the
    permissions of every other output (the umask's), and byte-identical for identical training; keep
    the last `keep` checkpoints (0: keep all)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    ckpt_root = Path(output_dir) / "checkpoints"
    final = ckpt_root / f"epoch_{epoch:04d}"
    tmp = ckpt_root / f".tmp_epoch_{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()  # so load_lora_weights rebuilds rank *and* alpha
    # peft keeps target_modules as a set, whose order changes with the process's hash seed: sort it.
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_adapter_metadata=metadata, unet_lora_layers=weights)
    _canonical_safetensors_header(tmp / "pytorch_lora_weights.safetensors")
    torch.save(state, tmp / "training_state.pt")
    mode = 0o666 & ~_umask()  # safetensors writes 0600 (a private temp file renamed into place)
    for f in tmp.iterdir():
        os.chmod(f, mode)
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
        raise CheckpointError(
            f"--resume: checkpoint '{ckpt}' does not match this model's LoRA layout (check --lora-rank and --pretrained)"
        )
    return state


# ---------------------------------------------------------------------------------------------
# Logs: one JSON line per epoch (plain files always; Weights & Biases with --track).


class RunLog:
    """A run's files: args.json (the run's current arguments), args.jsonl (every invocation's arguments,
    appended: the history of the run), log.jsonl (one JSON line per epoch); Weights & Biases with --track."""

    def __init__(
        self,
        output_dir: str | Path,
        args,
        track: bool = False,
        project: str = "diffexp",
        enabled: bool = True,
        invocation: dict | None = None,
    ):
        self.dir, self.enabled, self.wandb = Path(output_dir), enabled, None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        current = _jsonable(vars(args))
        (self.dir / "args.json").write_text(json.dumps(current, indent=2))
        import datetime

        entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "argv": sys.argv[1:]}
        with open(self.dir / "args.jsonl", "a") as f:
            f.write(json.dumps(entry | _jsonable(invocation or {}) | {"args": current}) + "\n")
        if track:
            import wandb

            self.wandb = wandb.init(project=project, config=current, dir=str(self.dir))

    def log(self, record: dict, images: dict | None = None):
        if not self.enabled:
            return
        with open(self.dir / "log.jsonl", "a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
        if self.wandb is not None:
            import wandb

            extra = {k: wandb.Image(str(v)) for k, v in (images or {}).items()}
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))} | extra, step=record.get("samples")
            )

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


# ---------------------------------------------------------------------------------------------
# The output directory: one run per directory, never two mixed, nothing computed deleted unasked.

RUN_OUTPUTS = ("checkpoints", "log.jsonl", "eval", "images")  # what a run computed
ARGS_FILES = ("args.json", "args.jsonl")
# Arguments that can change on --resume without changing what the run is (when it evaluates, saves,
# logs, how it computes the same numbers). Every other argument differing from the run's is refused,
# except --num-epochs when DiffExp's exploration window stays where it was (see _same_exploration).
HARMLESS_ARGS = frozenset(
    {
        "output_dir",
        "resume",
        "overwrite",
        "allow_changed_args",
        "config",
        "eval_every",
        "save_every",
        "keep_checkpoints",
        "track",
        "wandb_project",
        "kernels",
        "gradient_checkpointing",
        "compile",
    }
)


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


def _flag_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def check_run_dir(args) -> RunPlan:
    """Decide what to do with args.output_dir given --resume / --overwrite / --allow-changed-args, reading
    only; a ValueError (one line, naming the flags and the fix) when the directory holds another run, when
    --resume has nothing to resume, or when --resume's arguments differ from the run's (args.json) in
    anything but HARMLESS_ARGS."""
    out = Path(args.output_dir)
    resume, overwrite, allow = (
        args.resume,
        getattr(args, "overwrite", False),
        getattr(args, "allow_changed_args", False),
    )
    if resume and overwrite:
        raise ValueError(
            "--resume and --overwrite contradict each other: --resume continues the run in --output-dir, --overwrite deletes it; pass one"
        )
    found = tuple(n + ("/" if (out / n).is_dir() else "") for n in RUN_OUTPUTS if (out / n).exists())
    if found == ("checkpoints/",) and not any((out / "checkpoints").iterdir()):
        found = ()  # an empty checkpoints/ (a run stopped while writing its first checkpoint leaves .tmp_*)
    ckpt = latest_checkpoint(out)
    if overwrite:
        return RunPlan("overwrite", found=found)
    if not resume:
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
    changed = {}
    recorded = out / "args.json"
    if recorded.is_file():
        try:
            old = json.loads(recorded.read_text())
        except ValueError:
            raise ValueError(
                f"--resume: {recorded} is not valid JSON; restore it, or pass --overwrite to start the run again"
            ) from None
        new = _jsonable(vars(args))
        changed = {k: [old[k], v] for k, v in new.items() if k not in HARMLESS_ARGS and k in old and old[k] != v}
        if "num_epochs" in changed and _same_exploration(old, new):
            del changed["num_epochs"]  # only the run's length changes: extending or shortening it is harmless
    if changed and not allow:
        listed = ", ".join(
            f"--{k.replace('_', '-')} {_flag_value(a)} -> {_flag_value(b)}" for k, (a, b) in changed.items()
        )
        raise ValueError(
            f"--resume: these arguments differ from the run's ({recorded}): {listed}; rerun with the run's values, "
            f"or pass --allow-changed-args to continue it with the new ones"
        )
    epoch = int(ckpt.name.split("_", 1)[1])
    return RunPlan("resume", ckpt, changed, found, finished=epoch >= args.num_epochs - 1)


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
    (RUN_OUTPUTS and its argument history), 'restart' its partial outputs (the history is kept and the new
    invocation appended). Files the trainers did not write are left alone. Returns what was deleted."""
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


def parse_args_with_presets(cls, presets: dict[str, dict], args: list[str] | None = None):
    """tyro.cli(cls), where `--config NAME` makes the preset's values the defaults: every other flag
    still overrides them one by one, and --help shows them (a dict flag's KEY VALUE pairs override the
    preset's entries key by key). ValueError for an unknown preset."""
    import dataclasses

    import tyro

    argv = list(sys.argv[1:] if args is None else args)
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
    # (--reward-models.KEY VALUE), so the preset's entries are merged in after parsing instead: the
    # flag's KEY VALUE pairs override them key by key.
    dicts = {k: v for k, v in preset.items() if isinstance(v, dict)}
    default = (
        dataclasses.replace(cls(), config=name, **{k: v for k, v in preset.items() if k not in dicts}) if name else None
    )
    args = tyro.cli(cls, args=argv, default=default)
    for k, v in dicts.items():
        setattr(args, k, {**v, **getattr(args, k)})
    return args


def cfg_switch_warning(timesteps, num_train_timesteps: int, t_sw: float) -> str:
    """The one-line warning for a DiffExp CFG schedule that never switches: no sampling timestep reaches
    t_sw * T (every step at w_high), or every one does (every step at w_low)."""
    ts = [int(t) for t in timesteps]
    shown = ", ".join(map(str, ts[:6])) + (", ..." if len(ts) > 6 else "")
    threshold = f"t_sw*T = {t_sw * num_train_timesteps:g}"
    if all(t < t_sw * num_train_timesteps for t in ts):
        return (
            f"warning: --t-sw {t_sw} with --num-steps {len(ts)}: no sampling timestep ({shown}) reaches {threshold}, so the "
            f"CFG schedule never uses --w-low; raise --num-steps or lower --t-sw (or pass --no-cfg-schedule)"
        )
    return (
        f"warning: --t-sw {t_sw} with --num-steps {len(ts)}: every sampling timestep ({shown}) is >= {threshold}, so the "
        f"CFG schedule never switches to --w-high; raise --t-sw (or pass --no-cfg-schedule)"
    )


def resolve_mixed_precision(value: str) -> tuple[str, str]:
    """('no' | 'fp16' | 'bf16', a one-line note) for --mixed-precision, where 'auto' is bf16 on a CUDA
    device that supports it and float32 ('no') elsewhere (bf16 on a CPU is several times slower)."""
    if value != "auto":
        return value, f"mixed precision: {value}"
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "mixed precision: bf16 (--mixed-precision auto: CUDA)"
    return (
        "no",
        "mixed precision: no, float32 (--mixed-precision auto: no CUDA device with bf16; pass --mixed-precision bf16 to force it)",
    )


def save_sample_grid(
    images: torch.Tensor,
    prompts: list[str],
    path: str | Path,
    columns: int | None = None,
    tile: tuple[int, int] = (128, 256),
):
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
