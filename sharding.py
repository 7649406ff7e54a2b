"""Runs that outgrow one GPU: the frozen denoiser and its LoRA sharded across the processes of a launch
(--fsdp), and every prompt's text encoding computed once so that the text encoders leave the device
(--cache-text). runs.py calls this module where the model is set up and where checkpoints are written and
read; the trainers' loops are the same with or without either.

Sharding is PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), applied here, where the model is set up,
rather than through accelerate's FSDP plugin: the plugin does not run on CPU processes, and applying
`fully_shard` ourselves gives the CPU processes of the tests and the GPUs of a real run one code path.
Every block of the denoiser is one FSDP unit (`units`: SD/SDXL's down, mid and up blocks and the
transformer blocks inside them, SD3's and FLUX's transformer blocks), the rest of it the root unit. A
process keeps 1/N of every weight, all-gathers a unit's weights just before the unit runs and frees them
after, and in backward reduce-scatters the LoRA gradients: FSDP's reduction (a mean over the processes)
replaces the all-reduce runs.py makes for a replicated run, and each process steps AdamW on its shard.
The VAE, the reward and the text encoders stay whole in every process: the VAE is small (84 M parameters)
next to the decode's activations, and the text encoders are better removed than sharded (--cache-text).

Precision: no MixedPrecisionPolicy. Each weight is all-gathered in the dtype it is stored in (the frozen
ones in --mixed-precision's bf16, the LoRA in fp32: FSDP2 asks only a unit's trainable weights to share
one dtype) and accelerate's autocast casts for the compute, exactly as in a replicated run, so a sharded run
computes what a replicated one does; the LoRA gradients are reduce-scattered in fp32. A policy with
param_dtype=bf16 would also all-gather the LoRA in bf16 (half the LoRA's all-gather, which is small next to
the frozen weights) and change nothing else under autocast; it is not used so that both paths stay one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch


def checks(args, world: int) -> Iterator[tuple[bool, str]]:
    """(ok, error line) for --fsdp with `world` processes and for the launch (made before anything loads).
    --cache-text needs none: no reward uses the pipeline's text encoders (each loads its own models)."""
    m = args.model
    plugin = next((k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"), None)  # fmt: skip
    # fmt: off
    yield plugin is None, f"the accelerate config turns on accelerate's {plugin} plugin, which this project does not use: launch with a plain multi-GPU config (configs/accelerate_8gpu_fsdp.yaml) and pass --fsdp to shard the denoiser"
    if not m.fsdp:
        return
    yield world > 1, "--fsdp shards the denoiser across the processes of the launch, and this launch has 1: start several (torchrun --nproc_per_node N, or accelerate launch --config_file configs/accelerate_8gpu_fsdp.yaml), or drop --fsdp"
    yield not m.compile, "--fsdp with --compile is not supported (torch.compile of the sharded denoiser is untested here): drop one of them"
    yield m.mixed_precision != "fp16", "--fsdp with --mixed-precision fp16: fp16's loss scaler would see only its own shard's overflows and the processes could step apart; use --mixed-precision bf16"
    # fmt: on


# ---------------------------------------------------------------------------------------------
# The denoiser sharded (FSDP2).


def units(model) -> list[str]:
    """The names of the submodules of `model` (a denoiser) that each become one FSDP unit, innermost first
    (fully_shard goes bottom-up): every element of a ModuleList named `*blocks` (down_blocks.0,
    transformer_blocks.3, single_transformer_blocks.0, at any depth) and every `*_block` (mid_block). So
    SD, SDXL, SD3 and FLUX are split by the same rule, into units of one block's weights each."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        in_block_list = len(parts) > 1 and parts[-1].isdigit() and parts[-2].endswith("blocks")
        if in_block_list or parts[-1].endswith("_block"):
            names.append(name)
    return sorted(names, key=lambda n: -n.count("."))  # stable: blocks of one depth keep the model's order


def shard(model, device) -> list[int]:
    """Shard `model` (the denoiser, LoRA adapters added, on the CPU or `device`) across every process of the
    launch, each unit of `units` and then the whole: its weights move to `device` one unit at a time, as
    1/N shards. Every process must call it. Returns the number of parameter values each process holds,
    counted on each process (a list, one entry per rank)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world,))
    for name in units(model):
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    held = [None] * world
    dist.all_gather_object(held, sum(p.to_local().numel() for p in model.parameters()))
    return held


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered(x):
    """`x` (a tensor, or dicts, lists and tuples of them, as in a state dict) with every sharded tensor
    (DTensor) replaced by the whole tensor; everything else is returned as it is. For a sharded tensor this
    is a collective: every process must call it, on the same structure."""
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        return x.full_tensor()
    if isinstance(x, dict):
        return {k: gathered(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(gathered(v) for v in x)
    return x


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This process's part of `value`, a whole tensor of `param`'s shape, as `param` is sharded (no
    communication: every process holds `value`, read from a checkpoint); `value` itself when `param` is
    not sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def shard_optimizer_state(optimizer):
    """After optimizer.load_state_dict of a checkpoint (written whole, as every run writes it): each
    moment of a sharded parameter cut to this process's shard, as AdamW steps on shards."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = shard_like(value, p)


def gathered_lora(model, ema=None):
    """(the LoRA weights, the EMA's LoRA weights or None), whole, in diffusers' layout, of a sharded
    denoiser, for the checkpoint the main process writes: every process must call it. None when the model
    is not sharded (the checkpoint reads its weights directly)."""
    from diffusion import lora_state_dict

    if not is_sharded(model):
        return None
    weights = gathered(lora_state_dict(model))
    if ema is None:
        return weights, None
    with ema.swapped():
        return weights, gathered(lora_state_dict(model))


def place(pipe, device):
    """Everything of a pipeline loaded on the CPU moved to `device` except its denoiser, which `shard`
    moves there unit by unit as shards: the whole frozen denoiser is never on one GPU."""
    from diffusion import denoiser

    keep = denoiser(pipe)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module) and module is not keep:
            module.to(device)


# ---------------------------------------------------------------------------------------------
# Text encodings cached (--cache-text).


class CachedText:
    """A TextConditioner (diffusion.py) whose prompts were all encoded once, up front, after which its
    text encoders leave the device: moved to PyTorch's 'meta' device, they hold no memory and any further
    call of them fails loudly. `encode` looks prompts up (on the host, moved to the device per batch);
    everything else is the conditioner's: the tokenizers DiffExp chooses words with, where each encoder's
    states sit (`parts`), `empty` and `negative` (encoded before the encoders left). DiffExp's prompt
    weighting blends these encodings with `empty` as it blends fresh ones, so it is unchanged."""

    def __init__(self, text, prompts: list[str], batch_size: int = 64):
        self.text = text
        self.device = text.text_encoders[0].device
        unique = list(dict.fromkeys(prompts))
        self.rows = {}
        for i in range(0, len(unique), batch_size):
            chunk = unique[i : i + batch_size]
            cond = text.encode(chunk).to("cpu")
            self.rows |= {p: cond[j : j + 1] for j, p in enumerate(chunk)}
        for name, module in text.pipe.components.items():  # every text encoder (FLUX's CLIP gives only `pooled`)
            if name.startswith("text_encoder") and module is not None:
                module.to("meta")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __getattr__(self, name):  # tokenizers, parts, max_lengths, empty, negative, pipe, ...
        if name == "text":  # not set yet (or being copied): no recursion
            raise AttributeError(name)
        return getattr(self.text, name)

    def encode(self, prompts: list[str]):
        from diffusion import Conditioning

        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise KeyError(f"--cache-text: prompt {missing[0]!r} was not among the prompts encoded at the start")
        return Conditioning.cat([self.rows[p] for p in prompts]).to(self.device)
