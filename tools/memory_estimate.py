"""Estimate the trainers' peak GPU memory by shape accounting: no GPU, no weights, no download.

    python tools/memory_estimate.py                                   # SDXL at 1024 px, batch 1 and 4
    python tools/memory_estimate.py --model sd3.5-medium sd3.5-large --resolution 512 1024 --batch 1 4
    python tools/memory_estimate.py --model sdxl --resolution 512 1024 --no-autocast --lora-rank 0  # the old modelling
    python tools/memory_estimate.py --model flux.1-dev --resolution 512 1024 --batch 1 4 --trainer alignprop ddpo
    python tools/memory_estimate.py --model flux.1-dev --resolution 512 1024 --shard 1 2 8 --text loaded cached --wide

The denoiser (UNet, SD3 or FLUX transformer) and the VAE are built from their published configs (the dicts
below) on PyTorch's `meta` device, with LoRA adapters where the trainers put them, and one training
step is traced:
  alignprop  K denoiser calls on the CFG-doubled batch with gradient (K = --backprop-steps), then the
             VAE decode of the batch (reward backprop; the reward model's own activations are not counted)
  ddpo       one denoiser call on the CFG-doubled batch at one timestep (no VAE in the graph)
FLUX.1-dev is guidance-distilled: its calls are of the batch itself, not doubled (the trainers' default; with
--true-cfg a call doubles as on SD3, which the batch-2B row approximates).
Every tensor autograd saves for backward is counted once (by storage; weights are resident memory,
counted separately). Attention is counted as a memory-efficient kernel keeps it (q, k, v, output, row
log-sum-exp), as PyTorch's SDPA does on a GPU. With a half --dtype the trace follows CUDA autocast as
the trainers run it (weights in half, LoRA in fp32): matmuls and convolutions take half copies of
their inputs, layer/group norms and softmax run in fp32 and keep fp32 copies.

Backward walks the traced pieces in reverse; a checkpointed piece keeps only its inputs until then
and is recomputed whole, so the activations at the peak are max over pieces i of (what pieces 1..i
keep + what piece i saves when recomputed). The modes checkpoint:
  call    each denoiser call carrying gradient (torch.utils.checkpoint on the whole call; the VAE is not)
  blocks  what diffusers 0.42 checkpoints when enable_gradient_checkpointing() is on: each UNet resnet
          and each BasicTransformerBlock (attention projections in/out are not), each SD3 joint
          transformer block, each FLUX double- and single-stream block, the VAE decoder's mid block and
          each of its up blocks
  none    nothing
Resident = frozen denoiser + VAE + text encoders + reward model (all in --dtype; SDXL's VAE in fp32
under fp16, as the loader does) + LoRA weights, gradients and AdamW moments (fp32, 16 bytes per
parameter). `--text cached` (the trainers' --cache-text) leaves the text encoders out. `--shard N` (the
trainers' --fsdp over N processes) divides the denoiser's parameters and the LoRA's 16 bytes per parameter
by N (buffers, such as SD3's position table, stay whole in every process, as FSDP2 keeps them) and adds
what FSDP2 holds all-gathered at once ("gathered"): the root unit's weights (the denoiser outside its
blocks, held through the step) and two of the largest block units (the one computing and the next,
prefetched); the units are sharding.units' (the trainers' own rule). Activations are per process, so they
do not change with N. "smallest GPU": the first of --gpus whose memory the peak fits with the same share of
headroom as the fit column (--headroom-gib of --gpu-gib, 10 %). Not counted: gradient buffers of activations during backward, the reward model's
activations, the CUDA context, allocator slack and fragmentation, the sampling phase (no graph) and
DDPO's stored trajectories. These are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python tools/memory_estimate.py` from anywhere imports the project's modules (FLUX)
from sharding import units  # noqa: E402  (the trainers' FSDP units: one rule for every family)

GiB = 2**30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("call", "blocks", "none")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusion.add_lora's target_modules (SD, SDXL)

# --- published configs (diffusers layout; keys that only name versions or paths left out) ---------------

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False,
)  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
# stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in blocks 0-12)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
# stabilityai/stable-diffusion-3.5-large transformer/config.json (no dual attention)
SD35L_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
    pos_embed_max_size=192, qk_norm="rms_norm",
)  # fmt: skip
# vae/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 (SDXL:
# sample_size 1024, scaling 0.13025; the shapes are the same) and of both SD3.5 repos (16 latent channels,
# no quant convs)
VAE_4CH = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)  # fmt: skip
VAE_16CH = VAE_4CH | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
# black-forest-labs/FLUX.1-dev transformer/config.json (its VAE has VAE_16CH's shapes)
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip

# Text encoders (transformers configs; frozen, forward only): text_encoder[_2|_3]/config.json of the repos.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
    hidden_act="gelu",
)  # fmt: skip
T5_XXL = dict(
    d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128, feed_forward_proj="gated-gelu",
)  # fmt: skip
# The default reward, `aesthetic`: openai/clip-vit-large-patch14 (CLIPModel) + the LAION MLP head.
AESTHETIC_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        patch_size=14, image_size=224)  # fmt: skip
AESTHETIC_MLP = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1


@dataclass(frozen=True)
class Family:
    label: str
    kind: str  # "unet", "sd3" or "flux"
    denoiser: dict
    vae: dict
    text_encoders: tuple  # (name, builder kind, config) of the encoders always loaded
    native: int  # px
    tokens: int  # text tokens the denoiser attends to
    t5: bool = False  # has an optional T5-XXL (text_encoder_3)
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "sd15": Family("SD 1.5", "unet", SD15_UNET, VAE_4CH, (("CLIP-L", "clip", CLIP_L),), 512, 77),
    "sdxl": Family(
        "SDXL", "unet", SDXL_UNET, VAE_4CH, (("CLIP-L", "clip", CLIP_L), ("CLIP-G", "clip_proj", CLIP_G)), 1024, 77
    ),
    # SD3's denoiser sees 77 CLIP tokens + 256 T5 tokens; without T5 the pipeline feeds zeros in their place,
    # so the sequence (and the activations) are the same with and without T5.
    "sd3.5-medium": Family(
        "SD3.5 Medium",
        "sd3",
        SD35M_TRANSFORMER,
        VAE_16CH,
        (("CLIP-L", "clip_proj", CLIP_L), ("CLIP-G", "clip_proj", CLIP_G)),
        1024,
        77 + 256,
        t5=True,
    ),
    "sd3.5-large": Family(
        "SD3.5 Large",
        "sd3",
        SD35L_TRANSFORMER,
        VAE_16CH,
        (("CLIP-L", "clip_proj", CLIP_L), ("CLIP-G", "clip_proj", CLIP_G)),
        1024,
        77 + 256,
        t5=True,
    ),
    # FLUX.1-dev: CLIP-L (pooled only) and T5-XXL always loaded; the transformer sees 512 T5 tokens.
    "flux.1-dev": Family(
        "FLUX.1-dev",
        "flux",
        FLUX_DEV_TRANSFORMER,
        VAE_16CH,
        (("CLIP-L", "clip", CLIP_L), ("T5-XXL", "t5", T5_XXL)),
        1024,
        512,
    ),
}


# --- what autograd keeps ------------------------------------------------------------------------------------

_sdpa = F.scaled_dot_product_attention
_autocast: list[torch.dtype] = []  # the half dtype while an emulated autocast region is active


class EfficientAttention(torch.autograd.Function):
    """Saves what a flash / memory-efficient attention kernel keeps: q, k, v, out, log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.no_grad():
            out = _sdpa(q, k, v)
        ctx.save_for_backward(q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device))
        return out


def _attention(q=None, k=None, v=None, *args, query=None, key=None, value=None, **kwargs):
    # positional (SD's and SD3's processors) or by keyword (diffusers' attention dispatcher: FLUX)
    q, k, v = (a if a is not None else b for a, b in ((q, query), (k, key), (v, value)))
    if _autocast:  # SDPA is on autocast's lower-precision list
        q, k, v = (x.to(_autocast[0]) for x in (q, k, v))
    return EfficientAttention.apply(q, k, v)


# CUDA autocast's op lists (torch.amp docs), as far as these models call them.
_LOW = {F.linear, F.conv2d, F.conv_transpose2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
        torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.mm, torch.addmm}  # fmt: skip
_FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.exp,
         torch.Tensor.exp, torch.pow, torch.Tensor.pow, torch.rsqrt, torch.Tensor.rsqrt, torch.sum, torch.Tensor.sum,
         F.normalize, torch.norm, torch.Tensor.norm}  # fmt: skip
_PROMOTE = {torch.cat, torch.stack}


class Autocast(TorchFunctionMode):
    """CUDA autocast's casts, on any device (meta tensors have no autocast dispatch key): each cast is a
    new tensor, so what an op saves after a cast is counted as the copy it is on a GPU."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW or func in _FP32:
            to = self.dtype if func in _LOW else torch.float32
            cast = lambda x: x.to(to) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        elif func in _PROMOTE and args and isinstance(args[0], (list, tuple)):
            ts = args[0]
            if len({t.dtype for t in ts}) > 1:
                to = torch.float32 if any(t.dtype == torch.float32 for t in ts) else ts[0].dtype
                args = ([t.to(to) for t in ts], *args[1:])
        return func(*args, **kwargs)

    def __enter__(self):
        _autocast.append(self.dtype)
        return super().__enter__()

    def __exit__(self, *exc):
        _autocast.pop()
        return super().__exit__(*exc)


class Tape:
    """Bytes autograd saves, once per storage, as pieces in forward order: a tensor saved outside any
    checkpointed segment is its own piece (kept until backward reaches it); a checkpointed segment is one
    piece that keeps its inputs and, when backward recomputes it, saves what it saved in forward."""

    def __init__(self, weights: set[int]):
        self.weights, self.seen, self.pieces, self.segment = weights, set(), [], None
        self.held = []  # every tensor counted stays referenced, so no later storage can reuse its address

    def _count(self, t) -> int:
        self.held.append(t)
        return t.untyped_storage().nbytes()

    @staticmethod
    def _key(t):
        return t.untyped_storage()._cdata

    def pack(self, t):
        key = self._key(t)
        if key in self.weights or key in self.seen:
            return t
        if self.segment is None:
            self.seen.add(key)
            self.pieces.append((self._count(t), 0))
        elif key not in self.segment["keys"]:
            self.segment["keys"].add(key)
            self.segment["inner"] += self._count(t)
        return t

    def checkpoint(self, fn, *args, **kwargs):
        """Run fn as a checkpointed segment (diffusers' gradient_checkpointing_func signature)."""
        if self.segment is not None:  # nested: part of the enclosing segment
            return fn(*args, **kwargs)
        kept = 0
        for a in [*args, *kwargs.values()]:
            for t in a.values() if isinstance(a, dict) else [a]:
                if isinstance(t, torch.Tensor) and self._key(t) not in self.weights | self.seen:
                    self.seen.add(self._key(t))
                    kept += self._count(t)
        self.segment = {"keys": set(), "inner": 0}
        try:
            out = fn(*args, **kwargs)
        finally:
            self.pieces.append((kept, self.segment["inner"]))
            self.segment = None
        return out

    def total(self) -> int:
        """Every byte saved, as if nothing were checkpointed."""
        return sum(k + i for k, i in self.pieces)

    def peak(self) -> int:
        """Activations held at the worst moment of forward + backward."""
        kept, worst = 0, 0
        for k, i in self.pieces:
            kept += k
            worst = max(worst, kept + i)
        return max(worst, kept)

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable rank-r adapter, computed as peft's lora.Linear does (the input cast
    to the adapter's dtype first)."""

    def __init__(self, base: nn.Linear, rank: int, dtype):
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, base.out_features, bias=False, dtype=dtype)

    def forward(self, x, *args, **kwargs):
        return self.base(x) + self.up(self.down(x.to(self.down.weight.dtype)))


def lora_targets(model: nn.Module) -> tuple[str, ...]:
    """diffusion.add_lora's target names for the model (FLUX's from diffusion itself; SD/SDXL/SD3's attention
    projections), matched as peft matches them: the whole name, or its end after a dot."""
    from diffusers import FluxTransformer2DModel

    if isinstance(model, FluxTransformer2DModel):
        from diffusion import flux_lora_targets

        return tuple(flux_lora_targets(model))
    return LORA_TARGETS


def add_lora(model: nn.Module, rank: int, dtype) -> int:
    """Wrap diffusion.add_lora's targets; returns the number of LoRA parameters."""
    names = lora_targets(model)
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in names)
    ]
    count = 0
    for name, lin in targets:
        count += rank * (lin.in_features + lin.out_features)
        if rank:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(lin, rank, dtype))
    return count


# --- models -------------------------------------------------------------------------------------------------


def count_text_encoder(kind: str, config: dict) -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        if kind == "t5":
            model = T5EncoderModel(T5Config(**config))
        else:
            cls = CLIPTextModelWithProjection if kind == "clip_proj" else CLIPTextModel
            model = cls(CLIPTextConfig(**config))
    return sum(p.numel() for p in model.parameters())


def count_aesthetic() -> int:
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(text_config=CLIP_L, vision_config=AESTHETIC_VISION, projection_dim=768))
    return sum(p.numel() for p in model.parameters()) + AESTHETIC_MLP


@dataclass
class Built:
    family: Family
    denoiser: nn.Module
    vae: nn.Module
    weights: set
    params: dict  # name -> (parameter count, bytes per parameter)
    lora_params: int
    buffers: int = 0  # bytes of the denoiser's buffers (not sharded)
    root_unit: int = 0  # bytes of the denoiser's weights outside its FSDP block units
    largest_unit: int = 0  # bytes of the largest block unit's weights


def build(name: str, dtype, lora_rank: int, autocast: bool, reward: str) -> Built:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # casting a meta model with .to() warns about fp32 modules it does not have
    fam = FAMILIES[name]
    half = dtype != torch.float32
    vae_dtype = torch.float32 if name == "sdxl" and dtype == torch.float16 else dtype  # diffusion.load_pipeline
    with torch.device("meta"):
        cls = {"unet": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[fam.kind]
        # eval(), as diffusion.load_pipeline leaves them: dropout (p = 0) then keeps no masks
        den = cls(**fam.denoiser).to(dtype).requires_grad_(False).eval()
        vae = AutoencoderKL(**fam.vae).to(vae_dtype).requires_grad_(False).eval()
        frozen = sum(t.numel() for t in [*den.parameters(), *den.buffers()])  # SD3's position table is a buffer
        # LoRA trains in fp32 (diffusion.add_lora); without autocast a half trace keeps it in half
        lora = add_lora(den, lora_rank, torch.float32 if (autocast or not half) else dtype)
    weights = {t.untyped_storage()._cdata for m in (den, vae) for t in [*m.parameters(), *m.buffers()]}
    size = dtype.itemsize
    vae_n = sum(t.numel() for t in [*vae.parameters(), *vae.buffers()])
    params = {"denoiser": (frozen, size), "VAE": (vae_n, vae_dtype.itemsize)}
    for label, kind, config in fam.text_encoders:
        params[label] = (count_text_encoder(kind, config), size)
    if fam.t5:
        params["T5-XXL"] = (count_text_encoder("t5", T5_XXL), size)
    if reward == "aesthetic":
        params["reward (aesthetic CLIP-L)"] = (count_aesthetic(), size)
    params["LoRA + grad + AdamW (fp32)"] = (lora, 16)
    unit_bytes = fsdp_units(den)
    root = unit_bytes.pop("")
    buffers = sum(t.numel() * t.element_size() for t in den.buffers())
    return Built(fam, den, vae, weights, params, lora, buffers, root, max(unit_bytes.values(), default=0))


def fsdp_units(den: nn.Module) -> dict[str, int]:
    """Bytes of the weights of each FSDP unit of sharding.units ('' the root: everything outside them), each
    parameter counted in the innermost unit that holds it."""
    names = units(den)
    owner = {}
    for name in reversed(names):  # outermost first, so inner units overwrite
        for pname, _ in den.get_submodule(name).named_parameters():
            owner[f"{name}.{pname}"] = name
    sizes = {"": 0} | dict.fromkeys(names, 0)
    for pname, p in den.named_parameters():
        sizes[owner.get(pname, "")] += p.numel() * p.element_size()
    return sizes


def resident_bytes(b: Built, t5: bool, cached_text: bool, shards: int = 1) -> int:
    """Bytes held through the step by each process: the denoiser's parameters and the LoRA's weights, gradients
    and moments divided over `shards` processes (its buffers whole), everything else whole."""
    text = {label for label, _, _ in b.family.text_encoders} | {"T5-XXL"}
    total = 0
    for k, (n, s) in b.params.items():
        if (k == "T5-XXL" and not t5) or (cached_text and k in text):
            continue
        if k == "denoiser":
            total += b.buffers + -(-(n * s - b.buffers) // shards)
        elif k.startswith("LoRA"):
            total += -(-(n * s) // shards)
        else:
            total += n * s
    return total


def gathered_bytes(b: Built, shards: int) -> int:
    """What FSDP2 holds all-gathered at the worst moment: the root unit (through the step) and two block units
    (the one computing, the next one prefetched); nothing when not sharded (everything is resident)."""
    return 0 if shards == 1 else b.root_unit + 2 * b.largest_unit


def smallest_gpu(peak: float, gpus: list[float], share: float) -> str:
    return next((f"{g:g}" for g in sorted(gpus) if peak <= g * (1 - share)), "none")


def cond_inputs(fam: Family, n: int, dtype) -> dict:
    if fam.kind == "flux":  # T5's states, CLIP-L's pooled vector, the guidance input; zero position ids of the text
        return dict(
            encoder_hidden_states=torch.randn(n, fam.tokens, fam.denoiser["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(n, fam.denoiser["pooled_projection_dim"], dtype=dtype),
            guidance=torch.full((n,), 3.5),
        )
    if fam.kind == "sd3":
        return dict(
            encoder_hidden_states=torch.randn(n, fam.tokens, fam.denoiser["joint_attention_dim"], dtype=dtype),
            pooled_projections=torch.randn(n, fam.denoiser["pooled_projection_dim"], dtype=dtype),
        )
    cond = dict(encoder_hidden_states=torch.randn(n, fam.tokens, fam.denoiser["cross_attention_dim"], dtype=dtype))
    if fam.denoiser.get("addition_embed_type") == "text_time":
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, 1280, dtype=dtype),
            "time_ids": torch.randn(n, 6, dtype=dtype),
        }
    return cond


def trace(b: Built, px: int, batch: int, mode: str, trainer: str, steps: int, dtype, autocast: bool):
    """One training step's saved tensors: (Tape of the whole step, bytes of one denoiser call, bytes of the
    VAE decode) - the last two as if nothing were checkpointed, from the `none` trace."""
    den, vae, fam = b.denoiser, b.vae, b.family
    tape = Tape(b.weights)
    for m in (den, vae):
        if mode == "blocks":
            m.enable_gradient_checkpointing(tape.checkpoint)
        else:
            m.disable_gradient_checkpointing()
    latent, channels = px // 8, fam.vae["latent_channels"]
    amp = Autocast(dtype) if autocast and dtype != torch.float32 else contextlib.nullcontext()
    F.scaled_dot_product_attention = _attention
    call_bytes = []
    try:
        with torch.device("meta"):
            x = torch.randn(batch, channels, latent, latent, dtype=torch.float32, requires_grad=b.lora_params == 0)
            cond = cond_inputs(fam, batch, dtype)
            t = torch.full((batch,), 500.0)

            def denoise(x, t, cond):
                if fam.kind == "flux":  # distilled: one call of the batch, on packed latents (diffusion.denoise)
                    from diffusion import latent_image_ids, pack_latents, unpack_latents

                    ids = dict(txt_ids=torch.zeros(fam.tokens, 3), img_ids=latent_image_ids(latent, latent))
                    with amp:
                        out = den(hidden_states=pack_latents(x.to(dtype)), timestep=t / 1000, **cond, **ids).sample
                    return unpack_latents(out, latent, latent).float()
                both = {k: _cat2(v) for k, v in cond.items()}
                with amp:
                    # the CFG-doubled batch (diffusion.cfg_unet with a scale w != 0, 1)
                    if fam.kind == "sd3":
                        out = den(hidden_states=_cat2(x.to(dtype)), timestep=_cat2(t), **both).sample
                    else:
                        out = den(_cat2(x.to(dtype)), _cat2(t), **both).sample
                return out.float()

            with tape:
                for _ in range(steps if trainer == "alignprop" else 1):
                    before = tape.total()
                    out = tape.checkpoint(denoise, x, t, cond) if mode == "call" else denoise(x, t, cond)
                    call_bytes.append(tape.total() - before)
                    # stands in for the CFG combination and the step
                    x = x + out if fam.kind == "flux" else x + out[:batch] + out[batch:]
                before = tape.total()
                if trainer == "alignprop":  # diffusion.decode: at the VAE's dtype, under autocast unless fp32
                    vae_amp = amp if vae.dtype != torch.float32 else contextlib.nullcontext()
                    with vae_amp:
                        vae.decode(x.to(vae.dtype)).sample.float()
                vae_bytes = tape.total() - before
    finally:
        F.scaled_dot_product_attention = _sdpa
    return tape, call_bytes[-1], vae_bytes


def _cat2(v):
    if isinstance(v, dict):
        return {k: _cat2(x) for k, x in v.items()}
    return torch.cat([v, v])


# --- command line -------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (the project's convention)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None):
    p = Parser(
        prog="memory_estimate.py",
        description=__doc__.split("\n\n")[0],
        epilog="What is counted and what is not: the docstring of tools/memory_estimate.py, and docs/memory.md.",
    )
    p.add_argument("--model", nargs="+", choices=list(FAMILIES), default=["sdxl"], help="model families")
    p.add_argument("--resolution", nargs="+", type=int, help="image sizes in px (default: each model's native size)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4], help="images per process (before CFG doubling)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES), help="--gradient-checkpointing modes")
    p.add_argument("--trainer", nargs="+", choices=("alignprop", "ddpo"), default=["alignprop"],
                   help="alignprop: K calls + VAE decode with gradient; ddpo: one call at one timestep")  # fmt: skip
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="bf16", help="frozen weights' precision (--mixed-precision)"
    )
    p.add_argument("--t5", nargs="+", choices=("with", "without"), default=["with", "without"],
                   help="SD3 only: with T5-XXL loaded, or text_encoder_3=None")  # fmt: skip
    p.add_argument("--backprop-steps", type=int, default=1, help="AlignProp's K (denoiser calls with gradient)")
    p.add_argument("--lora-rank", type=int, default=4, help="0: no adapters (gradient flows from the latents)")
    p.add_argument("--reward", choices=("aesthetic", "none"), default="aesthetic", help="reward weights kept resident")
    p.add_argument("--text", nargs="+", choices=("loaded", "cached"), default=["loaded"],
                   help="text encoders on the GPU, or cached: the trainers' --cache-text (encoders off the GPU)")  # fmt: skip
    p.add_argument("--shard", nargs="+", type=int, default=[1],
                   help="processes the denoiser is sharded over (the trainers' --fsdp); 1: not sharded")  # fmt: skip
    p.add_argument("--gpus", nargs="+", type=float, default=[24, 40, 48, 80, 141],
                   help="GPU memory sizes (GiB) the 'smallest GPU' column picks from")  # fmt: skip
    p.add_argument("--wide", action="store_true",
                   help="one row per setting, one column per --shard x --text: the peak and the smallest GPU")  # fmt: skip
    p.add_argument("--no-autocast", action="store_true", help="trace in plain --dtype (no autocast casts)")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory the fit column compares against")
    p.add_argument("--headroom-gib", type=float, default=8.0,
                   help="left for what is not counted: 'yes' fits with this much to spare, 'tight' fits without")  # fmt: skip
    a = p.parse_args(argv)
    for px in a.resolution or []:
        if px < 64 or px % 16:
            p.error(f"--resolution {px}: must be a multiple of 16, at least 64")
        for name in a.model:  # SD3 crops its position table to the latent grid: it must not be larger
            if FAMILIES[name].kind == "sd3" and px // 16 > FAMILIES[name].denoiser["pos_embed_max_size"]:
                p.error(f"--resolution {px} is beyond {name}'s position embedding")
    if min(a.batch) < 1:
        p.error(f"--batch must be >= 1, got {min(a.batch)}")
    if a.backprop_steps < 1:
        p.error(f"--backprop-steps must be >= 1, got {a.backprop_steps}")
    if a.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0, got {a.lora_rank}")
    if a.gpu_gib <= 0 or a.headroom_gib < 0:
        p.error("--gpu-gib must be > 0 and --headroom-gib >= 0")
    if min(a.shard) < 1:
        p.error(f"--shard must be >= 1 (processes the denoiser is sharded over), got {min(a.shard)}")
    if min(a.gpus) <= 0:
        p.error(f"--gpus must be GPU sizes > 0 GiB, got {min(a.gpus)}")
    return a


def fits(peak: float, gpu: float, headroom: float) -> str:
    return "yes" if peak <= gpu - headroom else "tight" if peak <= gpu else "no"


def main(argv=None):
    a = parse_args(argv)
    dtype = DTYPES[a.dtype]
    autocast = not a.no_autocast
    share = a.headroom_gib / a.gpu_gib
    print(
        f"Estimated peak GPU memory per process, GiB ({a.dtype}, LoRA rank {a.lora_rank}, K = {a.backprop_steps}, "
        f"{'CUDA autocast' if autocast and dtype != torch.float32 else 'no autocast'}; shape accounting, not measured)\n"
    )
    rows, wide = [], []
    for name in a.model:
        b = build(name, dtype, a.lora_rank, autocast, a.reward)
        parts = ", ".join(
            (f"{k} {n / 1e9:.2f} B" if n >= 1e9 else f"{k} {n / 1e6:.1f} M") + f" ({n * s / GiB:.2f} GiB)"
            for k, (n, s) in b.params.items()
        )
        print(f"- {b.family.label}, resident parameters: {parts}")
        if max(a.shard) > 1:
            print(
                f"  sharded (FSDP2 units of sharding.units): the root unit {b.root_unit / GiB:.2f} GiB, the largest block "
                f"unit {b.largest_unit / GiB:.2f} GiB, buffers (kept whole) {b.buffers / GiB:.2f} GiB"
            )
        for px in a.resolution or [b.family.native]:
            for batch in a.batch:
                for trainer in a.trainer:
                    traced = {}
                    for mode in a.mode:
                        traced[mode] = trace(b, px, batch, mode, trainer, a.backprop_steps, dtype, autocast)
                    full = traced.get("none") or trace(b, px, batch, "none", trainer, a.backprop_steps, dtype, autocast)
                    _, call_b, vae_b = full
                    for t5 in a.t5 if b.family.t5 else ["-"]:
                        for mode in a.mode:
                            act = traced[mode][0].peak()
                            cells = []
                            for shards in a.shard:
                                for text in a.text:
                                    res = resident_bytes(b, t5 != "without", text == "cached", shards)
                                    gathered = gathered_bytes(b, shards)
                                    peak = (res + gathered + act) / GiB
                                    gpu = smallest_gpu(peak, a.gpus, share)
                                    cells.append(f"{peak:.1f} ({gpu})")
                                    rows.append(
                                        [b.family.label, t5, text, shards, trainer, px, batch, mode, f"{res / GiB:.1f}",
                                         f"{gathered / GiB:.1f}", f"{call_b / GiB:.1f}",
                                         f"{vae_b / GiB:.1f}" if trainer == "alignprop" else "-", f"{act / GiB:.1f}",
                                         f"{peak:.1f}", fits(peak, a.gpu_gib, a.headroom_gib), gpu]
                                    )  # fmt: skip
                            wide.append([b.family.label, t5, trainer, px, batch, mode, *cells])
    print()
    if a.wide:
        header = ["model", "T5", "trainer", "px", "batch", "mode"] + [
            f"{'1 GPU' if n == 1 else f'{n} sharded'}{', text cached' if t == 'cached' else ''}"
            for n in a.shard
            for t in a.text
        ]
        table = wide
    else:
        header = ["model", "T5", "text", "shards", "trainer", "px", "batch", "mode", "resident", "gathered",
                  "denoiser call", "VAE decode", "activations at peak", "peak", f"fits {a.gpu_gib:g} GiB", "smallest GPU"]  # fmt: skip
        table = rows
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in table:
        print("| " + " | ".join(map(str, r)) + " |")
    print(
        f"\n(GiB. 'denoiser call' and 'VAE decode': bytes saved for backward by one call / the decode with nothing "
        f"checkpointed; 'gathered': what FSDP2 holds all-gathered when sharded; 'fits': yes = peak <= {a.gpu_gib:g} - "
        f"{a.headroom_gib:g} GiB headroom for what is not counted, tight = under {a.gpu_gib:g} GiB but not by that much; "
        f"smallest GPU: the first of {', '.join(f'{g:g}' for g in sorted(a.gpus))} GiB whose {1 - share:.0%} the peak fits, "
        f"'none' if none. Wide layout: each cell is 'peak (smallest GPU)'.)"
    )


if __name__ == "__main__":
    main()
