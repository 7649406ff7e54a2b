"""The model side, shared by train_ddpo.py, train_alignprop.py, sample.py and train_reward.py: loading
a base model (the one code path for hub ids and local directories, checked before anything loads),
prompt sets, the conditioning a model family needs (`Conditioning`, `TextConditioner`), the guided
denoiser call (`cfg_unet`), sampling without gradients (`generate`), decoding, and LoRA adapters.

The tests build tiny random-initialised models, save them in the hub layout and load them through these
same functions. Run directories, logs and checkpoints are in runs.py.
"""

from __future__ import annotations

import contextlib
import gzip
import json
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
ALIASES = {name: MODELS_DIR / name for name in ("toy", "toy-scorer", "toy-hidden", "toy-dropped")}


def from_pretrained(cls, name: str, what: str, **kwargs):
    """`cls.from_pretrained(name)` for a hub id or a local directory, with a one-line error when
    the checkpoint is missing (offline, wrong id, wrong directory) instead of a library stack trace."""
    name = os.path.expanduser(str(ALIASES.get(str(name), name)))
    if _looks_like_path(name) and not os.path.exists(name):
        raise CheckpointError(f"{what}: local directory '{name}' does not exist")
    try:
        with _quiet_hub_fallback(), _quiet_loading_bars():
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


@contextlib.contextmanager
def _quiet_loading_bars():
    """No "Loading pipeline components" / "Loading weights" bars from diffusers and transformers: the
    console tells the run's story. DIFFEXP_LOADING_BARS=1 shows them."""
    if os.environ.get("DIFFEXP_LOADING_BARS", "") not in ("", "0"):
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    before = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            diffusers_logging.enable_progress_bar()
        if before[1]:
            transformers_logging.enable_progress_bar()


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


def resolution_multiple(pretrained: str, vae: str | None = None, family: str | None = None) -> tuple[int, str]:
    """(n, where it was read): a --resolution must be a multiple of n, the VAE's downsampling factor
    (vae_downsampling), times 2 on FLUX.1 (`family` 'flux'), whose transformer takes 2x2 latent patches."""
    factor, source = vae_downsampling(pretrained, vae)
    if family == "flux":
        return 2 * factor, f"{source}, times 2 for FLUX's 2x2 latent patches"
    return factor, source


def has_guidance_input(pretrained: str) -> bool | None:
    """Whether a FLUX.1 checkpoint's transformer takes the guidance scale as an input (guidance_embeds:
    FLUX.1-dev yes, FLUX.1-schnell no), read from transformer/config.json in its directory or the Hugging Face
    cache (online: the one small file is fetched, as model_index.json is) without loading anything; None when
    that file cannot be had (the loader then says what is missing)."""
    name = os.path.expanduser(str(ALIASES.get(str(pretrained), pretrained)))
    rel = "transformer/config.json"
    path = os.path.join(name, rel) if os.path.isdir(name) else _in_hf_cache(name, rel)
    if path is None and not os.path.isdir(name) and not hub_offline():
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, rel)
        except Exception:  # noqa: BLE001 - unavailable: the loader reports it with the full advice
            return None
    try:
        return bool(json.loads(Path(path).read_text()).get("guidance_embeds", False))
    except (TypeError, OSError, ValueError):
        return None


def _model_index(pretrained: str) -> dict | None:
    """The model_index.json of a base checkpoint (hub id or directory), read before any weights are
    loaded; None for a hub id whose index cannot be had (offline and not cached): the loader's own
    error then says what is missing."""
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
                return None
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--pretrained: cannot read '{index}' ({e})") from None


def _absent(entry) -> bool:
    return entry in (None, [None, None])


# What an SD3 / SD3.5 checkpoint must hold; T5 (text_encoder_3 + tokenizer_3) is optional, as in the pipeline.
SD3_REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
SD3_OPTIONAL = ("text_encoder_3", "tokenizer_3")


def _missing_components(pretrained: str, config: dict, required, optional=()) -> list[str]:
    """The components of `required` (and of `optional`, which may be absent only as a whole) that a
    checkpoint lacks: listed as null in model_index.json or, for a directory, its sub-directory absent."""
    name = os.path.expanduser(str(ALIASES.get(str(pretrained), pretrained)))
    missing = [c for c in required if _absent(config.get(c))]
    present = [c for c in optional if not _absent(config.get(c))]
    if present and len(present) < len(optional):
        missing += [c for c in optional if c not in present]
    if os.path.isdir(name):
        missing += [c for c in (*required, *present) if c not in missing and not os.path.isdir(os.path.join(name, c))]
    return missing


def _check_sd3(pretrained: str, config: dict):
    """Refuse, in one line and before any weights load, an SD3 checkpoint missing a component the
    pipeline needs. T5 may be absent, but not half of it (an encoder without its tokenizer, or the reverse)."""
    missing = _missing_components(pretrained, config, SD3_REQUIRED, SD3_OPTIONAL)
    if missing:
        raise CheckpointError(
            f"--pretrained: '{pretrained}' is an SD3 checkpoint without {', '.join(missing)}; SD3 needs transformer, vae, "
            f"scheduler, text_encoder(_2) and tokenizer(_2) (T5, text_encoder_3 with tokenizer_3, is optional): pass a "
            f"complete SD3 / SD3.5 directory or hub id (e.g. stabilityai/stable-diffusion-3.5-medium)"
        )


# What a FLUX.1 checkpoint must hold: CLIP-L (its pooled output) and T5 (the token states) are both needed.
FLUX_REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _check_flux(pretrained: str, config: dict):
    """Refuse, in one line and before any weights load, a FLUX.1 checkpoint missing a component."""
    missing = _missing_components(pretrained, config, FLUX_REQUIRED)
    if missing:
        raise CheckpointError(
            f"--pretrained: '{pretrained}' is a FLUX.1 checkpoint without {', '.join(missing)}; FLUX needs transformer, "
            f"vae, scheduler, text_encoder + tokenizer (CLIP) and text_encoder_2 + tokenizer_2 (T5): pass a complete "
            f"FLUX.1 directory or hub id (e.g. black-forest-labs/FLUX.1-dev)"
        )


def _check_folders(pretrained: str, config: dict, family: str) -> str:
    """`family`, once a local SD / SDXL directory is seen to hold the component folders its model_index.json
    lists (else the loader names the root's config.json, not the missing folder)."""
    name = os.path.expanduser(str(ALIASES.get(str(pretrained), pretrained)))
    needed = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
    missing = [
        c for c in needed if not _absent(config.get(c)) and c in config and not os.path.isdir(os.path.join(name, c))
    ]
    if os.path.isdir(name) and missing:
        raise CheckpointError(
            f"--pretrained: '{pretrained}' has no {', '.join(c + '/' for c in missing)} (its model_index.json lists "
            f"{'it' if len(missing) == 1 else 'them'}): pass a complete diffusers pipeline directory"
        )
    return family


def inspect_pipeline(pretrained: str) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux' for a base checkpoint (hub id or directory), read from its model_index.json
    before any weights are loaded; a CheckpointError in one line for anything that is not a text-to-image
    SD / SDXL / SD3 / FLUX.1 base model (an SDXL refiner, a checkpoint without a text encoder it needs, a FLUX
    fill / Kontext / control pipeline, another class). A hub id whose model_index.json cannot be had (offline
    and not cached) is left to the loader's own error."""
    config = _model_index(pretrained)
    if config is None:
        return "unknown"
    cls = config.get("_class_name", "")
    if cls.startswith("StableDiffusion3"):
        _check_sd3(pretrained, config)
        return "sd3"
    if cls == "FluxPipeline":  # FLUX.1-dev and -schnell; FluxFill/Kontext/Control take other inputs
        _check_flux(pretrained, config)
        return "flux"
    missing_text_encoder = _absent(config.get("text_encoder")) or _absent(config.get("tokenizer"))
    if config.get("requires_aesthetics_score") or (cls.startswith("StableDiffusionXL") and missing_text_encoder):
        raise CheckpointError(
            f"--pretrained: '{pretrained}' is an SDXL refiner or lacks text_encoder/tokenizer; pass an SDXL *base* "
            f"checkpoint (e.g. stabilityai/stable-diffusion-xl-base-1.0) or an SD 1.x/2.x one"
        )
    if cls.startswith("StableDiffusionXL"):
        return _check_folders(pretrained, config, "sdxl")
    if cls.startswith("StableDiffusion") and not missing_text_encoder:
        return _check_folders(pretrained, config, "sd")
    raise CheckpointError(
        f"--pretrained: '{pretrained}' is a {cls or 'unknown'} pipeline; this project trains SD 1.x/2.x, SDXL, SD3 / SD3.5 "
        f"and FLUX.1 (FluxPipeline) base models"
    )


def load_pipeline(pretrained: str = DEFAULT_PRETRAINED, device="cpu", dtype=torch.float32, vae: str | None = None):
    """A StableDiffusionPipeline (SD 1.x / 2.x) or StableDiffusionXLPipeline (SDXL base) with a DDIM
    scheduler, or a StableDiffusion3Pipeline (SD3 / SD3.5) or FluxPipeline (FLUX.1-dev / -schnell) with its
    own flow-matching scheduler, frozen, on `device`.

    `pretrained` is a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5,
    stabilityai/stable-diffusion-xl-base-1.0, stabilityai/stable-diffusion-3.5-medium) or a directory in
    the same layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL adds
    text_encoder_2/, tokenizer_2/; SD3 has transformer/ instead of unet/, two CLIP encoders and, optionally,
    T5 as text_encoder_3/ + tokenizer_3/: a checkpoint saved without T5 loads without it, and its prompts
    are encoded with zeros in T5's place, as the pipeline does); FLUX.1 has transformer/, CLIP-L as
    text_encoder/ + tokenizer/ and T5 as text_encoder_2/ + tokenizer_2/.
    `vae` replaces the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix). SDXL's own VAE overflows in
    float16 (its config says `force_upcast`), so under float16 it is kept in float32 and `decode`
    runs it in float32 (bf16 is safe and left alone).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    kind = inspect_pipeline(pretrained)
    classes = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
    cls = classes.get(kind, StableDiffusionPipeline)
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    if kind == "sd3" and _absent(_model_index(pretrained).get("text_encoder_3")):
        extra |= {"text_encoder_3": None, "tokenizer_3": None}  # the pipeline needs the absence said explicitly
    if vae is not None:
        extra["vae"] = from_pretrained(AutoencoderKL, vae, "--vae", dtype=dtype)
    pipe = from_pretrained(cls, pretrained, "--pretrained", dtype=dtype, **extra)
    if kind not in ("sd3", "flux"):  # SD3's and FLUX's flow-matching schedulers are their samplers: kept as shipped
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
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    for module in filter(None, [denoiser(pipe), pipe.vae, *encoders]):
        module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device, silence_dtype_warnings=True)  # fp16 on a CPU works (slowly): the callers say so once
    if kind == "sdxl" and dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
    return pipe


def pipeline_kind(pipe) -> str:
    """'flux' (flow matching, a transformer on packed latents, CLIP-L pooled + T5), 'sd3' (flow matching, a
    transformer, CLIP-L + CLIP-G + optional T5), 'sdxl' or 'sd', of a loaded pipeline."""
    if _is_flux_transformer(denoiser(pipe)):
        return "flux"
    if hasattr(pipe, "text_encoder_3"):  # set (to None when T5 is absent) by every SD3 pipeline
        return "sd3"
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def denoiser(pipe):
    """The network the trainers fine-tune and call: SD / SDXL's UNet (predicts epsilon or v), SD3's or
    FLUX's transformer (predicts the flow velocity). Call it through `denoise` or `cfg_unet`, which know
    each one's arguments; every one of them takes and returns latents [B, C, h, w] (FLUX's packing into
    tokens happens inside `denoise`)."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def native_resolution(pipe) -> int:
    """The pixel size a pipeline samples at by default: the denoiser's sample_size (latent pixels) times the
    VAE's factor (SD 1.5: 512, SDXL and SD3: 1024); FLUX's transformer has no sample_size, and its
    pipeline's default_sample_size (128) gives 1024 px."""
    size = getattr(denoiser(pipe).config, "sample_size", None) or pipe.default_sample_size
    return size * pipe.vae_scale_factor


def _inner(model):
    return getattr(model, "_orig_mod", getattr(model, "module", model))  # torch.compile / DDP wrappers


def _is_sd3_transformer(model) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(_inner(model), SD3Transformer2DModel)


def _is_flux_transformer(model) -> bool:
    from diffusers import FluxTransformer2DModel

    return isinstance(_inner(model), FluxTransformer2DModel)


# FLUX.1-dev's guidance input when no scale is given (FluxPipeline's guidance_scale default): what the
# transformer gets under true CFG, where the CFG scale is the one that varies.
FLUX_GUIDANCE = 3.5


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens of latents [B, C, h, w]: each 2x2 patch becomes one token of width 4C, in row-major patch
    order, channels outermost within a token: [B, (h/2)(w/2), 4C] (FluxPipeline._pack_latents)."""
    B, C, h, w = x.shape
    return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens [B, (h/2)(w/2), 4C] -> latents [B, C, h, w]."""
    B, _, D = tokens.shape
    return tokens.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def latent_image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The rotary position ids of FLUX's image tokens for latents h x w: (0, row, col) of each 2x2 patch, in
    the order of `pack_latents` ([(h/2)(w/2), 3]); the text tokens' ids are all zeros."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device=device, dtype=dtype)


def denoise(model, x, t, cond: Conditioning, guidance=None) -> torch.Tensor:
    """One call of the denoiser (`denoiser(pipe)`) on latents x [B, C, h, w] at timesteps t: the UNet takes
    (sample, timestep, encoder_hidden_states, added_cond_kwargs), SD3's transformer (hidden_states,
    timestep, encoder_hidden_states, pooled_projections); the caller does not need to know which.

    FLUX's transformer works on tokens: x is packed 2x2 (`pack_latents`) with its position ids, the
    timestep goes in as sigma = t / 1000 (as FluxPipeline passes it), the velocity comes back unpacked
    to [B, C, h, w], so the step, its log-prob and everything the trainers store stay on latents. A
    transformer with a guidance embedding (FLUX.1-dev) gets `guidance` (a number or one per sample, host
    values or a tensor; None: FLUX_GUIDANCE); one without (FLUX.1-schnell) ignores it, as do the others."""
    if _is_flux_transformer(model):
        B, _, h, w = x.shape
        g = None
        if _inner(model).config.guidance_embeds:
            g = _per_sample_tensor(FLUX_GUIDANCE if guidance is None else guidance, B, x.device)
        out = model(
            hidden_states=pack_latents(x),
            timestep=t.to(x.dtype) / 1000,
            guidance=g,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=latent_image_ids(h, w, x.device, x.dtype),
        ).sample
        return unpack_latents(out, h, w)
    if _is_sd3_transformer(model):
        return model(
            hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled
        ).sample
    return model(x, t, **cond.unet_kwargs()).sample


def _per_sample_tensor(values, B: int, device) -> torch.Tensor:
    """[B] float32 on `device` from a number, host values or a tensor; host values are copied from pinned
    memory, so the copy never waits for the device."""
    if torch.is_tensor(values) and values.device.type != "cpu":
        return values.float().reshape(-1).expand(B)
    v = torch.as_tensor(values, dtype=torch.float32).reshape(-1).expand(B).contiguous()
    return v.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else v.to(device)


@dataclass
class Conditioning:
    """Everything the denoiser is conditioned on, per sample.

    SD: the text encoder's token states `embeds` [B, 77, D]. SDXL adds the pooled text embedding
    `pooled` [B, 1280] and the micro-conditioning `time_ids` [B, 6] = (H, W, 0, 0, H, W), which the
    UNet takes as `added_cond_kwargs`. SD3: `embeds` [B, 77 + 256, 4096] (CLIP-L ++ CLIP-G token states
    zero-padded to T5's width, then T5's states) and `pooled` [B, 768 + 1280], no time ids. FLUX.1:
    `embeds` = T5's states [B, 512, 4096], `pooled` = CLIP-L's pooled output [B, 768]. Indexing,
    `cat` and `expand` act on every field at once, so the trainers store and replay a conditioning
    without knowing which model it is for; `denoise` passes it to either kind of denoiser.
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
        """The UNet's conditioning arguments (SD, SDXL); `denoise` builds the transformers'."""
        added = None if self.pooled is None else {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return {"encoder_hidden_states": self.embeds, "added_cond_kwargs": added}


# SD3's and FLUX's pipelines encode prompts for T5 with up to this many tokens (their max_sequence_length default).
SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = 512


class TextConditioner:
    """Prompts -> `Conditioning` for one pipeline at one resolution (the one text path of every script).

    SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states (before the
    final layer norm) of both text encoders concatenated to [B, 77, 768 + 1280], the second encoder's
    projected embedding as `pooled`, and `time_ids` (H, W, 0, 0, H, W) for the run's resolution.
    SD3 / SD3.5 (as StableDiffusion3Pipeline.encode_prompt): CLIP-L's and CLIP-G's penultimate states
    concatenated ([B, 77, 768 + 1280]) and zero-padded to T5's width, then T5's last hidden state
    ([B, 256, 4096]; zeros when the checkpoint has no T5) along the sequence; pooled = CLIP-L's
    projection ++ CLIP-G's. FLUX.1 (as FluxPipeline.encode_prompt): T5's last hidden state
    ([B, 512, 4096]) is the sequence and CLIP-L's pooled output ([B, 768]) the pooled vector; CLIP gives
    no token states, so `tokenizers` / `text_encoders` (the encoders whose token states prompt weighting
    blends) hold T5 alone and CLIP is `pooled_encoder`.

    Two "empty" conditionings, which are the same tensor on SD and SD3 and different ones on SDXL:
      `empty`    the encoding of "" — DiffExp's e_empty, which prompt weighting blends towards;
      `negative` CFG's unconditional input — zeros (embeddings and pooled) when the pipeline sets
                 `force_zeros_for_empty_prompt` (SDXL base does), else the encoding of "". None on a
                 guidance-distilled model (FLUX.1 unless `true_cfg`): it has no unconditional branch;
                 `cfg_unet` then makes one call and gives the guidance scale to the model as an input.
    `true_cfg` (FLUX.1 only; diffusers' true_cfg_scale): classifier-free guidance with the encoded "" as
    the negative, two transformer calls a step, FLUX.1-dev's guidance input fixed at FLUX_GUIDANCE.
    """

    def __init__(
        self, pipe, resolution: int | None = None, max_sequence_length: int | None = None, true_cfg: bool = False
    ):
        self.pipe = pipe
        self.kind = pipeline_kind(pipe)
        names = {"sd": [""], "sdxl": ["", "_2"], "sd3": ["", "_2", "_3"], "flux": ["_2"]}[self.kind]
        pairs = [(getattr(pipe, f"tokenizer{s}"), getattr(pipe, f"text_encoder{s}")) for s in names]
        pairs = [(tok, enc) for tok, enc in pairs if enc is not None]  # SD3 without T5: the two CLIPs
        self.tokenizers = [tok for tok, _ in pairs]
        self.text_encoders = [enc for _, enc in pairs]
        self.pooled_encoder = (pipe.tokenizer, pipe.text_encoder) if self.kind == "flux" else None
        # Tokens each encoder sees: CLIP's 77, T5's max_sequence_length (the pipelines' defaults: SD3 256, FLUX 512).
        self.max_sequence_length = max_sequence_length or (FLUX_T5_TOKENS if self.kind == "flux" else SD3_T5_TOKENS)
        self.max_lengths = [
            self.max_sequence_length if _is_t5_tokenizer(tok) else tok.model_max_length for tok in self.tokenizers
        ]
        self.resolution = resolution or native_resolution(pipe)
        self.empty = self.encode([""])
        self.distilled = self.kind == "flux" and not true_cfg
        if self.distilled:
            self.negative = None
        elif getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            zeros = lambda v: None if v is None else torch.zeros_like(v)  # noqa: E731
            self.negative = Conditioning(zeros(self.empty.embeds), zeros(self.empty.pooled), self.empty.time_ids)
        else:
            self.negative = self.empty

    @property
    def widths(self) -> list[int]:
        """The width of each encoder's token states (SDXL: [768, 1280]; SD3: [768, 1280, 4096]; FLUX: [4096])."""
        return [te.config.hidden_size for te in self.text_encoders]

    @property
    def parts(self) -> list[tuple[int, int, int]]:
        """Where each encoder's token states sit in `embeds`, as (first row, first column, width), in the
        order of `tokenizers`: SD [(0, 0, 768)], SDXL [(0, 0, 768), (0, 768, 1280)], SD3 the same two
        CLIP blocks, then T5's rows (77, 0, 4096) when the checkpoint has T5; FLUX T5's [(0, 0, 4096)]."""
        w = self.widths
        if len(w) == 1:
            return [(0, 0, w[0])]
        clip = [(0, 0, w[0]), (0, w[0], w[1])]
        return clip + [(self.max_lengths[0], 0, w[2])] if len(w) == 3 else clip

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        device = self.text_encoders[0].device
        if self.kind == "sd":
            tok = self.tokenizers[0](
                prompts,
                padding="max_length",
                max_length=self.tokenizers[0].model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            return Conditioning(self.text_encoders[0](tok.input_ids.to(device))[0])
        if self.kind == "flux":
            return Conditioning(
                self._encode_t5(prompts, self.tokenizers[0], self.text_encoders[0]), self._pooled(prompts)
            )
        states, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out = encoder(ids.to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])  # the encoder's projected text embedding
        if self.kind == "sdxl":
            H = W = self.resolution
            time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=states[0].dtype, device=device)
            return Conditioning(torch.cat(states, dim=-1), pooled[-1], time_ids.expand(len(prompts), -1))
        clip = torch.cat(states, dim=-1)
        if len(self.text_encoders) == 3:
            t5 = self._encode_t5(prompts, self.tokenizers[2], self.text_encoders[2]).to(clip.dtype)
        else:  # no T5: zeros in its place, as the pipeline does
            width = denoiser(self.pipe).config.joint_attention_dim
            t5 = torch.zeros(len(prompts), self.max_sequence_length, width, dtype=clip.dtype, device=device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _encode_t5(self, prompts: list[str], tokenizer, encoder) -> torch.Tensor:
        """T5's last hidden state of `prompts`, padded / truncated to max_sequence_length tokens."""
        ids = tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return encoder(ids.to(encoder.device))[0]

    def _pooled(self, prompts: list[str]) -> torch.Tensor:
        """FLUX's pooled vector: CLIP-L's pooled output (its final-norm state at the end token)."""
        tokenizer, encoder = self.pooled_encoder
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return encoder(ids.to(encoder.device), output_hidden_states=False).pooler_output


def _is_t5_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("T5")


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """Token states [B, 77, D] of `prompts` (padded/truncated to the tokenizer's max length); on SDXL
    the concatenation of both encoders', on SD3 TextConditioner's [B, 77 + 256, D] (use TextConditioner
    for the pooled embedding and time ids)."""
    return (
        TextConditioner(pipe).encode(prompts).embeds if hasattr(pipe, "text_encoder_2") else _encode_sd(pipe, prompts)
    )


def _encode_sd(pipe, prompts):
    tok = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]


def cfg_unet(unet, x, t, cond: Conditioning, negative: Conditioning | None, guidance=None):
    """The two outputs classifier-free guidance combines, (out_u, out_c), from one denoiser call.

    unet: `denoiser(pipe)` (a UNet, or SD3's or FLUX's transformer, called through `denoise`);
    x: [B, C, h, w]; t: a scalar timestep or one per sample; cond: the samples' conditioning;
    negative: CFG's unconditional conditioning ([1, ...] or [B, ...]), or None for a guidance-distilled
    model (TextConditioner.negative of FLUX.1 without true CFG); guidance: each sample's scale as host
    numbers (a float, a list or a CPU tensor), or None.

    A guidance-distilled model has no unconditional branch: its one call takes each sample's scale as the
    guidance input (FLUX.1-dev's guidance embedding; FLUX.1-schnell has none and ignores it), and its
    output is returned as both halves, so the CFG step out_u + w (out_c - out_u) is that output whatever w.

    CFG is out_u + w (out_c - out_u). At w = 1 that is out_c, at w = 0 out_u: a sample whose scale is
    exactly 1 (DiffExp's default w_low) needs only the conditional row and one at 0 only the
    unconditional row, so the UNet batch holds just the rows some sample needs, and the half a sample
    skipped is returned as a copy of the half it has (then the CFG step yields exactly that output).
    The scales must be host values so that choosing rows never waits on the device.
    """
    B = len(x)
    t = t.expand(B) if t.ndim == 0 else t
    if negative is None:  # guidance-distilled: the scale is an input of the one call
        out = denoise(unet, x, t, cond, guidance)
        return out, out
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
        return denoise(unet, torch.cat([x, x]), torch.cat([t, t]), inputs).chunk(2)
    if not rows_u or not rows_c:  # every sample at w = 1 (or every one at w = 0): one half only
        out = denoise(unet, x, t, cond if rows_c else negative)
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
    out = denoise(unet, torch.cat([x, x]).index_select(0, take), torch.cat([t, t]).index_select(0, take), inputs)
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
      A line whose first non-blank character is `#` is a comment and skipped, so a prompt file can carry
      notes; a `#` later in a line is part of the prompt. A file of only comments and blank lines is an error.
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
        prompts = _text_prompts(_read_utf8(path, flag))
        if not prompts:
            raise ValueError(
                f"{flag} file '{path}' has no prompts: write one prompt per line (lines starting with # are comments)"
            )
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


def _text_prompts(text: str) -> list[str]:
    """The prompts of a text prompt file: its lines stripped, without blank lines and `#` comment lines."""
    return [line for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


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
    negative: Conditioning | None | str = "pipeline",
) -> torch.Tensor:
    """Images in [0, 1] from a conditioning (or SD prompt embeddings [B, L, D]) with per-step
    guidance [num_steps]; `negative` is CFG's unconditional input ("pipeline": the pipeline's, i.e.
    TextConditioner(pipe).negative; None: a guidance-distilled model's single call, FLUX.1's default).

    SD / SDXL sample with DDIM (`eta` its noise scale), SD3 and FLUX with their flow-matching scheduler's
    timesteps (shift applied; FLUX's for the resolution, `sampling_schedule`) and the Euler step, or with
    `eta` > 0 the stochastic step of the same marginals (`eta` its noise level). Noise comes from a CPU
    `generator` (x_T first, then each step's noise when eta > 0), so a seed gives the same images on any
    device. On FLUX the guidance is the distilled guidance input (or, with a negative, the true-CFG scale).
    """
    from kernels import cfg_ddim_step

    cond = cond if isinstance(cond, Conditioning) else Conditioning(cond)
    device, dtype, B = cond.embeds.device, cond.embeds.dtype, len(cond)
    model = denoiser(pipe)
    resolution = resolution or native_resolution(pipe)
    if isinstance(negative, str):  # encoding "" costs a text-encoder call: callers that sample often pass their own
        negative = TextConditioner(pipe, resolution).negative
    negative = None if negative is None else negative.to(device, dtype)
    latent = resolution // pipe.vae_scale_factor
    timesteps, schedule = sampling_schedule(pipe, num_steps, resolution, device)
    timesteps = timesteps.to(device)
    guidance_host = guidance.detach().cpu()  # read once, so the skip of cfg_unet never waits inside the loop
    guidance = guidance.to(device)
    x = torch.randn(B, pipe.vae.config.latent_channels, latent, latent, generator=generator).to(device, dtype)
    for i, t in enumerate(timesteps):
        out_u, out_c = cfg_unet(model, x, t, cond, negative, float(guidance_host[i]))
        coeffs = schedule.coefficients(t.expand(B), eta)
        z = torch.randn(x.shape, generator=generator).to(device, x.dtype) if eta > 0 else None
        x = cfg_ddim_step(out_u, out_c, x, guidance[i].expand(B), coeffs, noise=z, backend=backend)
    return decode(pipe, x)


def timestep_arguments(pipe, num_steps: int, resolution: int | None = None) -> dict:
    """What the pipeline's own __call__ passes to scheduler.set_timesteps besides the step count: nothing on
    SD, SDXL and SD3; on FLUX (FluxPipeline) the sigmas linspace(1, 1/N, N) and, for a scheduler with dynamic
    shifting (FLUX.1-dev), mu, linear in the image's token count (h/2)(w/2) from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (the pipeline's calculate_shift). The scheduler
    then maps each sigma to e^mu / (e^mu + 1/sigma - 1), so the steps' noise levels depend on the resolution."""
    if pipeline_kind(pipe) != "flux":
        return {}
    import numpy as np

    cfg = pipe.scheduler.config
    latent = (resolution or native_resolution(pipe)) // pipe.vae_scale_factor
    tokens = (latent // 2) ** 2
    base, top = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    lo, hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    mu = lo + (hi - lo) * (tokens - base) / (top - base)
    return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}


def sampling_schedule(pipe, num_steps: int, resolution: int | None = None, device=None):
    """(the timesteps of `num_steps` steps on the host, noise to image; the kernels' schedule on `device`),
    with the pipeline's scheduler set to them as its own __call__ sets it (`timestep_arguments`): the one
    place every script gets its steps from, so sampling, DDPO's training pass, the CFG schedule's switch and
    its start-up note see the same timesteps (on FLUX, those of the run's resolution)."""
    from kernels import schedule_for

    kwargs = timestep_arguments(pipe, num_steps, resolution)
    pipe.scheduler.set_timesteps(num_steps, **kwargs)
    return pipe.scheduler.timesteps.cpu(), schedule_for(pipe.scheduler, num_steps, device, **kwargs)


def seeded(*keys: int) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, rank, batch, ...): resuming redraws the same numbers."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1] (differentiable), run at the VAE's own precision: a float32 VAE
    (SDXL's, kept in float32 under fp16 because it overflows there) runs with autocast off, so
    autocast cannot put it back into float16. SD3's VAE also has a shift (latents / scale + shift)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    upcast = vae.dtype == torch.float32 and torch.is_autocast_enabled(latents.device.type)
    with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# LoRA: the trainable weights (checkpoints of them are written by runs.py).


# LoRA targets: the attention projections; SD3's joint attention also projects the text stream
# (add_*_proj, to_add_out), adapted too, as diffusers' SD3 LoRA training and Flow-GRPO do.
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SD3_LORA_TARGETS = LORA_TARGETS + ["add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"]
# FLUX: Flow-GRPO's targets (train_flux.py): the double blocks' attention of both streams (to_q/k/v, to_out.0,
# add_q/k/v_proj, to_add_out) and both feed-forwards (ff, ff_context: net.0.proj in, net.2 out); the suffixes
# to_q/k/v also reach the single blocks' attention. Added here: the single blocks' proj_mlp (MLP in) and
# proj_out (attention and MLP out together: a single block has no to_out, so without it the adapted q/k/v
# are the only trained weights in 38 of FLUX.1's 57 blocks). proj_out is named per block (flux_lora_targets),
# since the suffix alone would also take the transformer's final output layer.
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + [
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
]


def flux_lora_targets(model) -> list[str]:
    """FLUX_LORA_TARGETS and each single block's proj_out, by its full name."""
    blocks = len(_inner(model).single_transformer_blocks)
    return FLUX_LORA_TARGETS + [f"single_transformer_blocks.{i}.proj_out" for i in range(blocks)]


def add_lora(unet, rank: int, alpha: float):
    """LoRA adapters on the denoiser's attention projections (`denoiser(pipe)`: SD / SDXL's UNet, SD3's
    transformer; FLUX's also on its feed-forward and single-block projections, FLUX_LORA_TARGETS); returns the
    trainable parameters (fp32)."""
    from peft import LoraConfig

    if _is_flux_transformer(unet):
        targets = flux_lora_targets(unet)
    else:
        targets = SD3_LORA_TARGETS if _is_sd3_transformer(unet) else LORA_TARGETS
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # train the adapters in fp32 even when the frozen weights are half
    return params


def lora_state_dict(unet) -> dict:
    """The adapters' weights in diffusers' LoRA layout (without the 'unet.' / 'transformer.' prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # SD3 / FLUX: the transformer's LoRA keys are peft's own (diffusers' SD3 / FLUX training scripts)
    if _is_sd3_transformer(unet) or _is_flux_transformer(unet):
        return get_peft_model_state_dict(unet)
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora_weights(model, directory, weights: dict | None = None):
    """Write `model`'s adapters as pytorch_lora_weights.safetensors in the format its pipeline's
    load_lora_weights reads (SD / SDXL: 'unet.' keys; SD3, FLUX: 'transformer.' keys), with the adapter config
    as metadata so rank *and* alpha are rebuilt. `weights`: lora_state_dict's, if already taken (whole)."""
    weights = lora_state_dict(model) if weights is None else weights
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    metadata = model.peft_config["default"].to_dict()
    # peft keeps target_modules as a set, whose order changes with the process's hash seed: sort it.
    metadata = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in metadata.items()}
    if _is_sd3_transformer(model) or _is_flux_transformer(model):
        from diffusers import FluxPipeline, StableDiffusion3Pipeline

        cls = FluxPipeline if _is_flux_transformer(model) else StableDiffusion3Pipeline
        cls.save_lora_weights(directory, transformer_lora_layers=weights, transformer_lora_adapter_metadata=metadata)
    else:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=weights, unet_lora_adapter_metadata=metadata
        )


def lora_weights_to_peft(weights: dict) -> dict:
    """A saved LoRA file's weights (save_lora_weights) as peft's state dict of the model they belong to."""
    if any(k.startswith("transformer.") for k in weights):
        return {k.removeprefix("transformer."): v for k, v in weights.items()}
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in weights.items()})
