"""Rewards for fine-tuning and evaluation: one contract for all of them.

    reward = load_reward("hps:1,aesthetic:0.5", device="cuda")
    scores, components = reward(images, prompts)   # images: N x 3 x H x W floats in [0, 1]; scores: [N]

`components` holds each ensemble part's unweighted score (detached, for logging); `scores` is their
weighted sum and keeps the autograd graph when every part is differentiable (`reward.differentiable`).

| name                   | model                                                         | differentiable |
| aesthetic              | CLIP ViT-L/14 image embedding -> LAION aesthetic MLP          | yes |
| pickscore              | PickScore_v1 (CLIP ViT-H/14): logit_scale * cos(image, text) | yes |
| hps / hpsv2            | HPS v2.1 / v2.0 (open_clip ViT-H/14): cos(image, text)        | yes |
| imagereward            | ImageReward-v1.0 (BLIP), re-implemented on transformers' BLIP | yes |
| jpeg                   | -(JPEG kB at quality 95): compressibility                     | no (DDPO only) |
| jpeg_incompressibility | +(JPEG kB at quality 95)                                      | no (DDPO only) |
| ocr                    | rapidocr (ONNX, in its wheel): 1 - edit distance to the quoted text / its length | no (DDPO only) |
| toy-compose            | toy world: detector P(every object asked for, relation)       | yes |
| toy-hidden             | mode-drop toy world: detector P(shape in its hidden colour)    | yes |
| custom:DIR             | a model trained by train_reward.py                            | yes |

Every checkpoint is a hub id or a local path, loaded through diffusion.from_pretrained (the same code
path either way); `load_reward(..., pickscore_model="/some/dir")` etc. override the defaults in
DEFAULT_MODELS. Nothing is loaded at import time. Preprocessing is done in torch (interpolate +
normalise), never PIL, so gradients reach the pixels, and in float32 whatever the weights' precision
(cast once to the model's dtype afterwards): the antialiased resizes have no bf16/fp16 CPU kernel, and
the reference processors (PIL) resize in float too.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion import CheckpointError, from_pretrained

# Where each model comes from by default; every entry can be overridden with a hub id or a local path
# (keyword argument of load_reward; on the command line `--reward-models KEY VALUE`, e.g. `--reward-models aesthetic_model DIR`).
DEFAULT_MODELS = dict(
    aesthetic_clip="openai/clip-vit-large-patch14",  # CLIPModel whose image embedding the MLP reads
    aesthetic_model="trl-lib/ddpo-aesthetic-predictor",  # repo (or dir, or file) with aesthetic-model.pth
    pickscore_model="yuvalkirstain/PickScore_v1",  # CLIPModel
    pickscore_processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",  # CLIPProcessor: tokenizer + image size/mean/std
    hps_model="xswu/HPSv2",  # repo (or dir, or file) with HPS_v2.1_compressed.pt / HPS_v2_compressed.pt
    hps_arch="ViT-H-14",  # open_clip architecture: a model name or 'local-dir:DIR' (open_clip_config.json)
    imagereward_model="THUDM/ImageReward",  # repo (or dir) with ImageReward.pt and med_config.json
    imagereward_tokenizer="google-bert/bert-base-uncased",  # BLIP's text tokenizer
    toy_detector=str(
        Path(__file__).resolve().parent / "models" / "toy-detector"
    ),  # toy-compose: toy.py's detector (config.json + model.safetensors)
    toy_hidden=str(
        Path(__file__).resolve().parent / "models" / "toy-hidden-detector"
    ),  # toy-hidden: the same detector + the mode-drop world's hidden colours (config.json)
)
AESTHETIC_FILE = "aesthetic-model.pth"  # the LAION predictor sac+logos+ava1-l14-linearMSE.pth, renamed
HPS_FILES = {"hps": "HPS_v2.1_compressed.pt", "hpsv2": "HPS_v2_compressed.pt"}
IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
# ImageReward standardises its MLP output with these (from its training set).
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

NAMES = (
    "aesthetic", "pickscore", "hps", "hpsv2", "imagereward", "jpeg", "jpeg_incompressibility", "ocr", "toy-compose",
    "toy-hidden",
)  # fmt: skip
NOT_DIFFERENTIABLE = ("jpeg", "jpeg_incompressibility", "ocr")
# Computed on the host CPU from uint8 pixels: a trainer scores these in a thread while the next batch samples.
ON_HOST = ("jpeg", "jpeg_incompressibility", "ocr")


# ----------------------------------------------------------------------------------------------
# Parsing: validate the --reward string before anything is loaded.


def parse_reward_spec(spec: str, flag: str = "--reward") -> list[tuple[str, float]]:
    """`"hps:1,aesthetic:0.5"` -> [("hps", 1.0), ("aesthetic", 0.5)]; a bare name has weight 1.

    `custom:DIR` is a name (its DIR must hold a train_reward.py model); `custom:DIR:0.5` weights it.
    Raises a one-line ValueError naming `flag` for any unknown name or malformed part; loads nothing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{flag} is empty: give a reward name ({', '.join(NAMES)}, custom:DIR) or 'name:weight,...'")
    parts = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(
                f"{flag} '{spec}' has an empty component: write 'name:weight,name:weight' without stray commas"
            )
        head, sep, tail = part.rpartition(":")
        weight = 1.0
        name = part
        if sep and head:
            try:
                weight = float(tail)
                name = head
            except ValueError:
                # "custom:DIR" has a colon but no weight; anything else after a colon must be a number.
                if head in NAMES or head.startswith("custom:"):
                    raise ValueError(
                        f"{flag} '{spec}': weight '{tail}' of '{head}' is not a number (write e.g. '{head}:0.5')"
                    ) from None
        if not math.isfinite(weight):
            raise ValueError(f"{flag} '{spec}': weight of '{name}' must be a finite number, got {tail}")
        if name.startswith("custom:"):
            path = name[len("custom:") :]
            if not path:
                raise ValueError(f"{flag} '{spec}': custom needs a directory, e.g. custom:runs/reward-snow")
            if not (Path(path).expanduser() / "config.json").is_file():
                raise ValueError(
                    f"{flag} '{spec}': '{path}' is not a reward model directory (no config.json); make one with train_reward.py"
                )
        elif name not in NAMES:
            raise ValueError(f"{flag} '{spec}': unknown reward '{name}'; known: {', '.join(NAMES)}, custom:DIR")
        if name in [n for n, _ in parts]:
            raise ValueError(f"{flag} '{spec}': '{name}' appears twice; give each reward once with its weight")
        parts.append((name, weight))
    return parts


def require_differentiable(spec: str, flag: str = "--reward") -> list[tuple[str, float]]:
    """parse_reward_spec, plus a one-line error if any part cannot give gradients (AlignProp)."""
    parts = parse_reward_spec(spec, flag)
    for name, _ in parts:
        if name in NOT_DIFFERENTIABLE:
            raise ValueError(
                f"{flag}: {name} is not differentiable: AlignProp needs a differentiable reward; use train_ddpo.py for {name}"
            )
    return parts


def on_host(spec: str) -> bool:
    """Whether a part of `spec` is computed on the host CPU (JPEG sizes, OCR), so that scoring it in a thread
    while the next batch samples hides its time; rewards on the device gain little from a thread."""
    return any(name in ON_HOST for name, _ in parse_reward_spec(spec))


# ----------------------------------------------------------------------------------------------
# Shared pieces.


def _float32(images: torch.Tensor) -> torch.Tensor:
    """Images to preprocess in: float32 (float64 stays), whatever the model's dtype. The antialiased
    resizes have no bf16/fp16 CPU kernel, and the processors the rewards reproduce resize in float."""
    return images if images.dtype == torch.float64 else images.float()


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a model's weights: what its preprocessed input is cast to, once."""
    return next(module.parameters()).dtype


def clip_preprocess(images: torch.Tensor, size: int, mean, std, dtype: torch.dtype | None = None) -> torch.Tensor:
    """What CLIP image processors do (short side to `size`, bicubic; centre crop; normalise), in torch.

    Differentiable: interpolate (antialiased when shrinking, like PIL), crop by slicing, affine normalise,
    all in float32 (see `_float32`); the result is cast once to `dtype` (default: the input's dtype).
    """
    dtype = dtype or images.dtype
    images = _float32(images)
    h, w = images.shape[-2:]
    # Same output size as transformers' shortest_edge resize: short side = size, long side floored.
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0, 1)  # bicubic overshoots; PIL's uint8 resize cannot
    top, left = (nh - size) // 2, (nw - size) // 2
    images = images[..., top : top + size, left : left + size]
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return ((images - mean) / std).to(dtype)


def _size(s) -> int:
    """An image processor's crop size, which may be an int or a dict {'height', 'width'}/{'shortest_edge'}."""
    if isinstance(s, int):
        return s
    s = dict(s)
    return int(s.get("height", s.get("shortest_edge", 0)))


class HubFile:
    """One file of a hub repo, or a local file, or that file inside a local directory.

    Exists so single-file checkpoints go through diffusion.from_pretrained like every other model
    (same offline/missing errors); `from_pretrained` returns the file's local path.
    """

    @classmethod
    def from_pretrained(cls, name: str, filename: str) -> str:
        if os.path.isfile(name):
            return name
        if os.path.isdir(name):
            path = os.path.join(name, filename)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing {filename}")
            return path
        from huggingface_hub import hf_hub_download

        return hf_hub_download(name, filename)


def load_state_dict_file(path: str) -> dict:
    """A state dict from .safetensors or a torch pickle, safely (weights_only: no code runs)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError (non-tensor objects inside), RuntimeError (not a torch file)
        raise CheckpointError(
            f"cannot read '{path}' as a weights-only torch checkpoint ({str(e).splitlines()[0]})"
        ) from None


def _load_strict(module: nn.Module, state_dict: dict, what: str, path: str):
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: '{path}' does not fit the model: missing {list(missing)[:4]}, unexpected {list(unexpected)[:4]}"
        )


def _freeze(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# The rewards. Each is an nn.Module: forward(images in [0, 1] N x 3 x H x W, prompts) -> float [N].


class AestheticMLP(nn.Module):
    """The LAION aesthetic predictor head, laid out as published (keys layers.0/2/4/6/7).

    No non-linearities between the linears: the published model has none (its dropouts are no-ops
    in eval), so the head is an affine map of the normalised CLIP embedding.
    """

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class AestheticReward(nn.Module):
    differentiable = True

    def __init__(self, clip_name: str, mlp_name: str):
        super().__init__()
        from transformers import CLIPModel

        self.clip = from_pretrained(CLIPModel, clip_name, "--reward-models aesthetic_clip")
        path = from_pretrained(HubFile, mlp_name, "--reward-models aesthetic_model", filename=AESTHETIC_FILE)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        _load_strict(self.mlp, load_state_dict_file(path), "--reward-models aesthetic_model", path)
        self.size = self.clip.config.vision_config.image_size

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _dtype(self.clip))
        emb = self.clip.get_image_features(pixel_values=pixels).pooler_output  # transformers 5: an output object
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1)


class PickScoreReward(nn.Module):
    differentiable = True

    def __init__(self, model_name: str, processor_name: str):
        super().__init__()
        from transformers import CLIPModel, CLIPProcessor

        self.model = from_pretrained(CLIPModel, model_name, "--reward-models pickscore_model")
        processor = from_pretrained(CLIPProcessor, processor_name, "--reward-models pickscore_processor")
        self.tokenizer = processor.tokenizer
        ip = processor.image_processor
        self.size, self.mean, self.std = _size(ip.crop_size), tuple(ip.image_mean), tuple(ip.image_std)

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.size, self.mean, self.std, _dtype(self.model))
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(
            images.device
        )
        img = self.model.get_image_features(pixel_values=pixels).pooler_output
        txt = self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (img * txt).sum(-1)


def hps_preprocess(
    images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """What hpsv2's scoring transform does (long side to `size`, bicubic; zero-pad to a centred square;
    normalise), in torch. N x 3 x H x W in [0, 1] -> N x 3 x size x size.

    hpsv2 turns the image into a [0, 1] tensor first, then resizes the tensor so the longer side is
    `size` (short side round(side * size / long)) and pads with 0 -- the extra pixel of an odd margin
    goes right/bottom -- and only then normalises, so the bands hold -mean/std. Unlike
    `clip_preprocess` nothing is cropped and nothing is clamped (torchvision's resize of a float
    tensor leaves the bicubic overshoot). Differentiable: interpolate, pad, affine normalise, all in
    float32 (see `_float32`); the result is cast once to `dtype` (default: the input's dtype).
    """
    dtype = dtype or images.dtype
    images = _float32(images)
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)  # hpsv2's arithmetic, Python's round included
    if (nh, nw) != (h, w):
        # antialias=True: what torchvision (>= 0.17) does for tensors, and hpsv2 resizes a tensor.
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    # hpsv2 skips the pad when the long side is already `size`; pad anyway, since the ViT only takes
    # squares (for a square image the pad is empty either way).
    top, left = (size - nh) // 2, (size - nw) // 2
    images = F.pad(images, (left, size - nw - left, top, size - nh - top), value=0.0)
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return ((images - mean) / std).to(dtype)


class HPSReward(nn.Module):
    """HPS v2 / v2.1: an open_clip ViT-H/14 whose every weight comes from the HPS checkpoint.

    Images of any shape are preprocessed as hpsv2 scores them (`hps_preprocess`: long side to the
    model's size, zero-padded square), not with the crop of the other CLIP rewards.
    """

    differentiable = True

    def __init__(self, ckpt_name: str, arch: str, filename: str):
        super().__init__()
        import open_clip

        path = from_pretrained(HubFile, ckpt_name, "--reward-models hps_model", filename=filename)
        try:  # pretrained=None: the HPS checkpoint replaces all weights, so nothing else is fetched
            self.model = open_clip.create_model(arch, pretrained=None, load_weights=False)
            self.tokenizer = open_clip.get_tokenizer(arch)
        except (RuntimeError, FileNotFoundError, ValueError) as e:
            raise CheckpointError(
                f"--reward-models hps_arch: cannot build open_clip model '{arch}' ({str(e).splitlines()[0]})"
            ) from None
        ckpt = load_state_dict_file(path)
        state = ckpt["state_dict"] if "state_dict" in ckpt else ckpt  # the HPS release wraps it in 'state_dict'
        state = {k.removeprefix("module."): v for k, v in state.items()}
        _load_strict(self.model, state, "--reward-models hps_model", path)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        # hpsv2 normalises with OpenAI's mean/std (those of the ViT-H-14 laion2B-s32B-b79K tag it
        # builds from), and the HPS weights were trained on that: pin it, whatever hps_arch's config says.
        self.mean, self.std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def forward(self, images, prompts):
        pixels = hps_preprocess(images, self.size, self.mean, self.std, _dtype(self.model))
        text = self.tokenizer(list(prompts)).to(images.device)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(text, normalize=True)
        return (img * txt).sum(-1)


def _blip_vit_to_transformers(state: dict) -> dict:
    """BLIP's timm-style ViT keys (ImageReward.pt, 'blip.visual_encoder.*' stripped) -> BlipVisionModel's."""
    out = {}
    for k, v in state.items():
        k2 = (
            k.replace("cls_token", "embeddings.class_embedding")
            .replace("pos_embed", "embeddings.position_embedding")
            .replace("patch_embed.proj", "embeddings.patch_embedding")
            .replace("blocks.", "encoder.layers.")
            .replace(".attn.qkv", ".self_attn.qkv")  # same q/k/v packing (3, heads, head_dim) in both
            .replace(".attn.proj", ".self_attn.projection")
            .replace(".norm1", ".layer_norm1")
            .replace(".norm2", ".layer_norm2")
        )
        out["post_layernorm" + k2[len("norm") :] if k2.startswith("norm.") else k2] = v
    return out


class ImageRewardReward(nn.Module):
    """ImageReward-v1.0: BLIP ViT image tokens cross-attended by a BERT text encoder, [CLS] -> MLP.

    The `image-reward` package cannot import under transformers 5 (it needs helpers transformers
    removed) and pins timm 0.6, so this loads its published checkpoint (ImageReward.pt + med_config.json)
    into transformers' own BLIP classes. The vision tower's shape is read from the checkpoint.
    """

    differentiable = True

    def __init__(self, model_name: str, tokenizer_name: str):
        super().__init__()
        from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        ckpt_path = from_pretrained(
            HubFile, model_name, "--reward-models imagereward_model", filename=IMAGEREWARD_FILES[0]
        )
        if os.path.isfile(model_name):  # a bare ImageReward.pt: its med_config.json must lie beside it
            cfg_path = os.path.join(os.path.dirname(ckpt_path), IMAGEREWARD_FILES[1])
        else:
            cfg_path = from_pretrained(
                HubFile, model_name, "--reward-models imagereward_model", filename=IMAGEREWARD_FILES[1]
            )
        if not os.path.isfile(cfg_path):
            raise CheckpointError(
                f"--reward-models imagereward_model: '{cfg_path}' is missing; it comes with ImageReward.pt in THUDM/ImageReward"
            )
        med = json.loads(Path(cfg_path).read_text())
        state = load_state_dict_file(ckpt_path)
        vit = {k[len("blip.visual_encoder.") :]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
        text = {k[len("blip.text_encoder.") :]: v for k, v in state.items() if k.startswith("blip.text_encoder.")}
        mlp = {k[len("mlp.") :]: v for k, v in state.items() if k.startswith("mlp.")}
        if not vit or not text or not mlp:
            raise CheckpointError(
                f"--reward-models imagereward_model: '{ckpt_path}' has no blip.visual_encoder/blip.text_encoder/mlp weights"
            )
        text.pop("embeddings.position_ids", None)  # a buffer older torch saved; not a weight

        width = vit["cls_token"].shape[-1]
        patch = vit["patch_embed.proj.weight"].shape[-1]
        grid = int(round(math.sqrt(vit["pos_embed"].shape[1] - 1)))
        depth = len({k.split(".")[1] for k in vit if k.startswith("blocks.")})
        self.vision = BlipVisionModel(
            BlipVisionConfig(
                hidden_size=width,
                intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=depth,
                num_attention_heads=max(1, width // 64),  # BLIP's ViTs use 64-wide heads (base 12, large 16)
                image_size=grid * patch,
                patch_size=patch,
                layer_norm_eps=1e-6,  # BLIP's ViT LayerNorm eps
                hidden_act="gelu",
            )
        )
        _load_strict(self.vision, _blip_vit_to_transformers(vit), "--reward-models imagereward_model", ckpt_path)
        self.text = BlipTextModel(
            BlipTextConfig(
                vocab_size=med["vocab_size"],
                hidden_size=med["hidden_size"],
                encoder_hidden_size=width,
                intermediate_size=med["intermediate_size"],
                num_hidden_layers=med["num_hidden_layers"],
                num_attention_heads=med["num_attention_heads"],
                max_position_embeddings=med["max_position_embeddings"],
                hidden_act=med.get("hidden_act", "gelu"),
                layer_norm_eps=med.get("layer_norm_eps", 1e-12),
                pad_token_id=med.get("pad_token_id", 0),
                bos_token_id=None,  # only used for generation, which a reward never does
                sep_token_id=None,
                is_decoder=True,  # in transformers' BLIP this is what creates the cross-attention layers
            ),
            add_pooling_layer=False,
        )
        _load_strict(self.text, text, "--reward-models imagereward_model", ckpt_path)
        self.mlp = AestheticMLP(med["hidden_size"])  # same 5-linear head layout as the aesthetic MLP
        _load_strict(self.mlp, mlp, "--reward-models imagereward_model", ckpt_path)
        self.tokenizer = from_pretrained(BertTokenizer, tokenizer_name, "--reward-models imagereward_tokenizer")
        self.size = grid * patch

    def forward(self, images, prompts):
        pixels = clip_preprocess(images, self.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _dtype(self.vision))
        tok = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(images.device)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=images.device)
        hidden = self.text(
            input_ids=tok.input_ids,
            attention_mask=tok.attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        return ((self.mlp(hidden[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


def _uint8_pixels(images: torch.Tensor):
    """N x 3 x H x W floats in [0, 1] -> N x H x W x 3 uint8 RGB on the host (numpy), as a saved PNG holds them."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class JpegReward(nn.Module):
    """JPEG file size at quality 95 in kB (1 kB = 1000 bytes), negated for compressibility."""

    differentiable = False

    def __init__(self, sign: float):
        super().__init__()
        self.sign = sign

    def forward(self, images, prompts):
        from PIL import Image

        sizes = []
        for p in _uint8_pixels(images):
            buf = io.BytesIO()
            Image.fromarray(p).save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000)
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=images.device)


# ----------------------------------------------------------------------------------------------
# ocr: text rendering, Flow-GRPO's reward. The OCR models are real pretrained ones that the rapidocr wheel
# ships (PP-OCR text detection and recognition, ONNX), run by onnxruntime on the host CPU, offline.

OCR_FILES = ("PP-OCRv6_det_small.onnx", "PP-OCRv6_rec_small.onnx")  # in rapidocr==3.10.0's models/ folder
# The OCR's threads (onnxruntime intra-op, OpenCV): bounded, so scoring in the trainer's reward worker leaves
# the sampler its cores; one on a small machine, at most 4.
OCR_THREADS = max(1, min(4, (os.cpu_count() or 1) // 4))
_QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')  # "text" or “text”


def ocr_target(prompt: str) -> str:
    """The text `prompt` asks to render: what its first pair of double quotes holds (straight or curly).
    A one-line ValueError naming the prompt when it has none (or only spaces)."""
    m = _QUOTED.search(str(prompt))
    target = next((g for g in m.groups() if g is not None), "") if m else ""
    if not target.strip():
        raise ValueError(
            f"prompt {prompt!r} has no text in double quotes for --reward ocr to read: write the text to render "
            f"in double quotes, e.g. 'a shop sign that reads \"fresh bread\"'"
        )
    return target


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    row = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def ocr_score(reading: str, target: str) -> float:
    """Flow-GRPO's text-rendering reward of an OCR `reading` (all recognised lines joined) for `target`.
    Both lowercased, spaces removed; distance 0 if the target occurs in the reading, else
    min(edit_distance(reading, target), len(target)); reward 1 - distance / len(target), in [0, 1]."""
    reading, target = "".join(reading.lower().split()), "".join(target.lower().split())
    distance = 0 if target in reading else min(edit_distance(reading, target), len(target))
    return 1.0 - distance / len(target)


def ocr_model_dir() -> Path:
    """The folder of rapidocr's ONNX models; a one-line CheckpointError when rapidocr or onnxruntime is missing."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or importlib.util.find_spec("onnxruntime") is None:
        raise CheckpointError(
            "--reward ocr needs the rapidocr and onnxruntime packages: pip install -r requirements.txt"
        )
    return Path(spec.submodule_search_locations[0]) / "models"


class OcrReward(nn.Module):
    """How well an image shows the text in its prompt's double quotes (`ocr_score` of what OCR reads).

    rapidocr with its shipped detection and recognition models: each model is passed as a file, so rapidocr's
    download path is never taken and nothing is written; no text-direction classifier and the detector sees
    the image at its own size up to 960 px on the long side (PaddleOCR's defaults, the reader Flow-GRPO's
    reward used), lines whose recognition score is below 0.5 dropped. Not differentiable (DDPO only).
    """

    differentiable = False

    def __init__(self, threads: int = OCR_THREADS):
        super().__init__()
        folder = ocr_model_dir()
        # onnxruntime's import writes a telemetry device id and event store under ~/.cache/Microsoft unless told
        # not to (measured with onnxruntime 1.31.1); with this set nothing is written anywhere.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import cv2
        from rapidocr import RapidOCR

        cv2.setNumThreads(threads)  # rapidocr resizes and crops with OpenCV, which would use every core
        self.engine = RapidOCR(
            params={
                "Global.log_level": "error",  # not a warning for every image without text
                "Global.use_cls": False,
                "Det.model_path": str(folder / OCR_FILES[0]),
                "Rec.model_path": str(folder / OCR_FILES[1]),
                "Det.limit_type": "max",
                "Det.limit_side_len": 960,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
            }
        )
        # rapidocr loads its models on first use: load them now, so a bad file fails here and not in the worker.
        self.engine._load_det_model()
        self.engine._load_rec_model()

    def read(self, pixels) -> str:
        """All the text OCR finds in one H x W x 3 uint8 RGB image, its lines joined by spaces (top to bottom)."""
        import numpy as np

        out = self.engine(np.ascontiguousarray(pixels[..., ::-1]))  # a numpy image is read as BGR (OpenCV's order)
        return " ".join(out.txts or ())

    def forward(self, images, prompts):
        targets = [ocr_target(p) for p in prompts]  # fail before any work
        scores = [ocr_score(self.read(p), t) for p, t in zip(_uint8_pixels(images), targets)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


# ----------------------------------------------------------------------------------------------
# toy-compose: the toy world's compositional reward (what GenEval-style detector rewards are to real
# models). toy.py trains the detector on its own renders; its config.json carries the vocabulary.

TOY_DETECTOR_FILES = ("config.json", "model.safetensors")


class ToyDetectorNet(nn.Module):
    """toy.py's detector: a small CNN whose last feature map (stride 4) gives, for every (colour, shape)
    object, a presence map and a location map. Presence logit: log-mean-exp of the presence map (a
    soft max over places); position: the location map's soft-argmax, (x, y) in pixels of the input
    (x right, y down). Input: N x 3 x size x size in [0, 1], normalised in float32 and then cast to the
    weights' dtype (see `_float32`). Both outputs are differentiable."""

    def __init__(self, num_objects: int, channels: list, size: int = 32):
        super().__init__()
        layers = []
        for c_in, c_out, stride, dilation in channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(c_out),
                nn.SiLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels[-1][1], 2 * num_objects, 1)
        self.num_objects = num_objects
        cells = size // math.prod(c[2] for c in channels)
        centres = (torch.arange(cells) + 0.5) * (size / cells)
        gy, gx = torch.meshgrid(centres, centres, indexing="ij")
        self.register_buffer("grid", torch.stack([gx.flatten(), gy.flatten()], -1), persistent=False)

    def forward(self, x):
        maps = self.head(self.features(((_float32(x) - 0.5) / 0.5).to(self.head.weight.dtype)))
        n, _, h, w = maps.shape
        presence, location = maps.reshape(n, 2, self.num_objects, h * w).unbind(1)
        logits = torch.logsumexp(presence, -1) - math.log(h * w)
        xy = location.softmax(-1) @ self.grid.to(location.dtype)
        return logits, xy


def load_toy_detector(name: str, what: str = "--reward-models toy_detector"):
    """(frozen ToyDetectorNet, config) from a directory (or hub repo) holding config.json + model.safetensors."""
    cfg_path = from_pretrained(HubFile, name, what, filename=TOY_DETECTOR_FILES[0])
    weights = from_pretrained(HubFile, name, what, filename=TOY_DETECTOR_FILES[1])
    config = json.loads(Path(cfg_path).read_text())
    net = ToyDetectorNet(len(config["objects"]), config["channels"], config["image_size"])
    _load_strict(net, load_state_dict_file(weights), what, weights)  # safetensors: no pickle
    return net.requires_grad_(False).eval(), config


class ToyGrammar:
    """The toy captions toy-compose reads, from the detector's config.json alone (so every prompt can be
    checked before any weights load): 'a <colour> <shape>', 'a <colour> <shape> <relation> a <colour> <shape>'
    or 'a <colour> <shape> and a <colour> <shape>' (both present, anywhere: relation index past the relations)."""

    def __init__(self, config: dict):
        import re

        self.index = {tuple(o): i for i, o in enumerate(config["objects"])}
        colours = sorted({o[0] for o in self.index}, key=len, reverse=True)
        shapes = sorted({o[1] for o in self.index}, key=len, reverse=True)
        self.relations = list(config["relations"])
        if not set(self.relations) <= {"left of", "above"}:
            raise CheckpointError(f"toy-compose: the detector's relations {self.relations} are not 'left of' / 'above'")
        obj = f"an? ({'|'.join(map(re.escape, colours))}) ({'|'.join(map(re.escape, shapes))})"
        self.words = self.relations + ["and"]  # 'and': both objects, anywhere (the mode-drop world's pairs)
        self.pattern = re.compile(f"{obj}(?: ({'|'.join(map(re.escape, self.words))}) {obj})?")
        self.text = (
            f"'a <colour> <shape>' or 'a <colour> <shape> <relation> a <colour> <shape>' (two different objects), "
            f"colours {', '.join(sorted(colours))}; shapes {', '.join(sorted(shapes))}; relations {', '.join(self.words)}"
        )

    def parse(self, prompt: str) -> tuple[int, int, int]:
        """(object index A, relation: 0 none / 1 + index into relations, object index B; B = A when alone)."""
        m = self.pattern.fullmatch(" ".join(str(prompt).lower().strip().rstrip(".").split()))
        if m is None:
            raise ValueError(f"toy-compose: prompt {prompt!r} is not in the toy grammar; it scores {self.text}")
        ca, sa, rel, cb, sb = m.groups()
        a = self.index.get((ca, sa))
        b = a if rel is None else self.index.get((cb, sb))
        if a is None or b is None:
            raise ValueError(f"toy-compose: prompt {prompt!r} names an object the detector does not know")
        if rel is not None and a == b:
            raise ValueError(
                f"toy-compose: prompt {prompt!r} asks for the same object twice; the detector cannot count ({self.text})"
            )
        return a, 0 if rel is None else 1 + self.words.index(rel), b


class ToyComposeReward(nn.Module):
    """The probability that an image shows everything its toy caption asks for, in the stated relation.

    "a red circle": P(red circle present). "a red circle left of a blue square": P(red circle) *
    P(blue square) * P(relation); "a red circle and a blue square": P(red circle) * P(blue square) (no
    relation asked). P(A left of B) = sigmoid((dx - |dy|) / s) and P(A above B) =
    sigmoid((dy - |dx|) / s), (dx, dy) = position of B minus position of A (y down) and s the config's
    relation_scale_px: B must lie more to the right of A than above or below it (resp. more below A
    than beside it). Soft throughout, so gradients reach the pixels (AlignProp); DDPO uses the value.
    Extra shapes are not penalised. A prompt outside the toy grammar raises a ValueError naming it.
    """

    differentiable = True

    def __init__(self, name: str):
        super().__init__()
        self.net, self.config = load_toy_detector(name)
        self.grammar = ToyGrammar(self.config)
        self.index, self.relations = self.grammar.index, self.grammar.relations
        self.size = int(self.config["image_size"])
        self.scale = float(self.config["relation_scale_px"])

    def parse(self, prompt: str) -> tuple[int, int, int]:
        return self.grammar.parse(prompt)

    def factors(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """P(A present), P(B present), P(relation holds), each [N]; 1 for B and the relation when alone,
        1 for the relation of 'A and B'."""
        parsed = torch.tensor([self.parse(p) for p in prompts], device=images.device).view(
            -1, 3
        )  # fail before any work
        if images.shape[-2:] != (self.size, self.size):  # in float32: see _float32
            images = F.interpolate(
                _float32(images), size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        logits, xy = self.net(images)
        prob = logits.sigmoid()
        rows = torch.arange(len(images), device=images.device)
        a, rel, b = parsed.unbind(1)
        d = xy[rows, b] - xy[rows, a]  # [N, 2]: B's position relative to A's
        margin = {"left of": d[:, 0] - d[:, 1].abs(), "above": d[:, 1] - d[:, 0].abs()}
        one = torch.ones_like(prob[:, 0])
        rel_prob = one
        for k, r in enumerate(self.relations, start=1):
            rel_prob = torch.where(rel == k, torch.sigmoid(margin[r] / self.scale), rel_prob)
        return prob[rows, a], torch.where(rel == 0, one, prob[rows, b]), rel_prob

    def forward(self, images, prompts):
        p_a, p_b, p_rel = self.factors(images, prompts)
        return p_a * p_b * p_rel


class ToyHiddenGrammar:
    """The prompts toy-hidden reads, from the detector's config.json alone: 'a <shape>', each shape scored in
    its hidden colour (the config's hidden_colours: the colour ordinary guidance hides)."""

    def __init__(self, config: dict, what: str = "--reward-models toy_hidden"):
        hidden = config.get("hidden_colours")
        if not isinstance(hidden, dict):
            raise CheckpointError(
                f"{what}: its config.json has no hidden_colours (build it with tools/toy.py --hidden)"
            )
        index = {tuple(o): i for i, o in enumerate(config["objects"])}
        unknown = [f"{c} {s}" for s, c in hidden.items() if (c, s) not in index]
        if unknown:
            raise CheckpointError(f"{what}: the detector does not know {', '.join(unknown)}")
        self.target = {s: index[(c, s)] for s, c in hidden.items()}
        self.text = f"'a <shape>', shapes {', '.join(sorted(self.target))}"

    def parse(self, prompt: str) -> int:
        """The detector output scored for `prompt`: its shape in the hidden colour."""
        words = " ".join(str(prompt).lower().strip().rstrip(".").split()).split(" ")
        if len(words) != 2 or words[0] not in ("a", "an") or words[1] not in self.target:
            raise ValueError(f"toy-hidden: prompt {prompt!r} is not in its grammar; it scores {self.text}")
        return self.target[words[1]]


class ToyHiddenReward(nn.Module):
    """The mode-drop world's reward (tools/toy.py --hidden): for the bare prompt "a circle", the detector's
    probability that the image shows a circle in the circle's minority colour, the one ordinary guidance
    hides. Differentiable (AlignProp); DDPO uses the value. A prompt outside 'a <shape>' raises a ValueError."""

    differentiable = True

    def __init__(self, name: str):
        super().__init__()
        self.net, self.config = load_toy_detector(name, "--reward-models toy_hidden")
        self.grammar = ToyHiddenGrammar(self.config)
        self.size = int(self.config["image_size"])

    def parse(self, prompt: str) -> int:
        return self.grammar.parse(prompt)

    def forward(self, images, prompts):
        target = torch.tensor([self.parse(p) for p in prompts], device=images.device)  # fail before any work
        if images.shape[-2:] != (self.size, self.size):  # in float32: see _float32
            images = F.interpolate(
                _float32(images), size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        logits, _ = self.net(images)
        return logits.sigmoid()[torch.arange(len(images), device=images.device), target]


# ----------------------------------------------------------------------------------------------
# Custom reward models (train_reward.py trains them; `custom:DIR` loads them). The networks live
# here so that both trainers and train_reward.py share one definition.


class SmallCNN(nn.Module):
    """A small CNN trained from scratch: works fully offline. Input: normalised images at a fixed size."""

    def __init__(self, num_outputs: int, width: int = 32):
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            # BatchNorm, not GroupNorm: a per-image norm divides out the amount of fine detail, which is
            # exactly what pixelate/blur/jpeg change (measured: GroupNorm did not beat predicting the mean).
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.SiLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * chans[-1], width * 2), nn.SiLU(), nn.Linear(width * 2, num_outputs))

    def forward(self, x):
        f = self.features(x)
        # Mean and max pooling: mean sees global tone (fog), max sees sparse high-frequency marks (snow, rain).
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3))], dim=1))


class ClipHead(nn.Module):
    """A frozen CLIP image encoder and a small trained head on its normalised embedding."""

    def __init__(self, clip_model, num_outputs: int, hidden: int = 256):
        super().__init__()
        self.clip = clip_model.requires_grad_(False).eval()
        dim = clip_model.config.projection_dim
        self.head = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, num_outputs))

    def forward(self, x):
        emb = self.clip.get_image_features(pixel_values=x).pooler_output
        return self.head(emb / emb.norm(dim=-1, keepdim=True))

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the backbone stays frozen and in eval mode (no dropout) while the head trains
        return self


def build_custom_network(config: dict) -> nn.Module:
    """The network a custom reward's config.json describes (weights not loaded)."""
    outputs = 1 if config["task"] == "regression" else len(config["classes"])
    if config["backbone"] == "cnn":
        return SmallCNN(outputs, width=config.get("width", 32))
    from transformers import CLIPModel

    clip = from_pretrained(CLIPModel, config["clip_model"], "--clip-model")
    return ClipHead(clip, outputs)


def custom_preprocess(images: torch.Tensor, config: dict, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The custom model's input: CLIP's preprocessing for the CLIP backbone, a plain resize for the CNN;
    in float32 (see `_float32`), cast once to `dtype` (default: the input's dtype)."""
    if config["backbone"] == "clip":
        return clip_preprocess(images, config["image_size"], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, dtype)
    dtype = dtype or images.dtype
    images = _float32(images)
    size = config["image_size"]
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return ((images - 0.5) / 0.5).to(dtype)


def custom_value(outputs: torch.Tensor, config: dict, mode: str | None = None, target=None) -> torch.Tensor:
    """Network outputs -> reward [N], by the config's reward mode (or the given override).

    mode 'prediction': the regression prediction, or for a classifier the expected class value;
    mode 'target': -|prediction - target| (highest at the target strength);
    mode 'class_prob': probability of the target class (classification only).
    """
    mode = mode or config.get("reward_mode", "prediction")
    target = config.get("target") if target is None else target
    outputs = _float32(outputs)  # a half-precision network's outputs: the value arithmetic in float32
    if config["task"] == "regression":
        # The network predicts standardised labels; undo that to get the label's own units.
        pred = outputs.squeeze(-1) * config.get("label_std", 1.0) + config.get("label_mean", 0.0)
        if mode == "class_prob":
            raise ValueError(
                "custom reward: reward mode 'class_prob' needs a classifier; a regression model gives 'prediction' or 'target'"
            )
    else:
        probs = outputs.softmax(-1)
        if mode == "class_prob":
            classes = config["classes"]
            if str(target) not in classes:
                raise ValueError(f"custom reward: target class '{target}' is not one of {classes}")
            return probs[:, classes.index(str(target))]
        values = torch.tensor(config["class_values"], dtype=probs.dtype, device=probs.device)
        pred = probs @ values
    if mode == "prediction":
        return pred
    if mode == "target":
        if target is None:
            raise ValueError("custom reward: reward mode 'target' needs a target value (train_reward.py --target)")
        return -(pred - float(target)).abs()
    raise ValueError(f"custom reward: unknown reward mode '{mode}' (prediction, target, class_prob)")


def load_custom_model(directory: str | Path, device="cpu", dtype=torch.float32):
    """(network with its trained weights, config) from a train_reward.py output directory."""
    directory = Path(directory).expanduser()
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--reward custom:{directory}: no config.json there; train a reward with train_reward.py")
    config = json.loads(cfg_path.read_text())
    net = build_custom_network(config)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"--reward custom:{directory}: model.safetensors is missing; train_reward.py writes it")
    state = load_state_dict_file(str(weights))
    if config["backbone"] == "clip":  # only the head is saved; the backbone comes from its own checkpoint
        _load_strict(net.head, state, f"custom:{directory}", str(weights))
    else:
        _load_strict(net, state, f"custom:{directory}", str(weights))
    return _freeze(net, device, dtype), config


class CustomReward(nn.Module):
    differentiable = True

    def __init__(self, directory: str, device, dtype, mode: str | None = None, target=None):
        super().__init__()
        self.net, self.config = load_custom_model(directory, device, dtype)
        self.mode, self.target = mode, target
        custom_value(
            torch.zeros(1, 1 if self.config["task"] == "regression" else len(self.config["classes"])),
            self.config,
            mode,
            target,
        )  # fail now on a bad mode/target

    def forward(self, images, prompts):
        pixels = custom_preprocess(images, self.config, _dtype(self.net))
        return custom_value(self.net(pixels), self.config, self.mode, self.target)


# ----------------------------------------------------------------------------------------------
# The object the trainers hold.


class Reward:
    """A weighted sum of rewards. `reward(images, prompts) -> (scores [N] float32, {name: score [N]})`."""

    def __init__(self, parts: list[tuple[str, float, nn.Module]]):
        self.parts = parts
        self.name = ",".join(n if w == 1 else f"{n}:{w:g}" for n, w, _ in parts)
        self.differentiable = all(m.differentiable for _, _, m in parts)

    def __call__(self, images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"reward {self.name}: images must be an N x 3 x H x W float tensor in [0, 1], got {getattr(images, 'shape', type(images))}"
            )
        if len(prompts) != len(images):
            raise ValueError(
                f"reward {self.name}: {len(images)} images but {len(prompts)} prompts; give one prompt per image"
            )
        lo, hi = images.detach().aminmax()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"reward {self.name}: images must be in [0, 1], got [{lo:.3f}, {hi:.3f}] (decoded SD images are in [-1, 1]: use (x / 2 + 0.5).clamp(0, 1))"
            )
        if not self.differentiable and images.requires_grad and torch.is_grad_enabled():
            bad = [n for n, _, m in self.parts if not m.differentiable]
            raise ValueError(
                f"reward {self.name}: {', '.join(bad)} is not differentiable and cannot give gradients: use it with train_ddpo.py, or score under torch.no_grad()"
            )
        total, components = 0.0, {}
        for name, weight, module in self.parts:
            p = next(module.parameters(), None)
            # The device only: each reward preprocesses in float32 and casts to its weights' dtype itself.
            x = images if p is None else images.to(device=p.device)
            score = module(x, prompts).float().to(images.device)
            components[name] = score.detach()
            total = total + weight * score
        return total, components


def load_reward(spec: str, device="cpu", dtype=torch.float32, **model_overrides) -> Reward:
    """Load every reward of `spec` (see parse_reward_spec) once, frozen, on `device` in `dtype`.

    `model_overrides`: any key of DEFAULT_MODELS (hub id or local path), plus `custom_mode` /
    `custom_target` to change a custom reward's value ('prediction', 'target', 'class_prob').
    """
    parts = parse_reward_spec(spec)
    custom_mode = model_overrides.pop("custom_mode", None)
    custom_target = model_overrides.pop("custom_target", None)
    unknown = set(model_overrides) - set(DEFAULT_MODELS)
    if unknown:
        raise ValueError(
            f"load_reward: unknown model override(s) {sorted(unknown)}; known: {', '.join(DEFAULT_MODELS)}"
        )
    m = {**DEFAULT_MODELS, **{k: v for k, v in model_overrides.items() if v is not None}}
    loaded = []
    for name, weight in parts:
        if name == "aesthetic":
            module = AestheticReward(m["aesthetic_clip"], m["aesthetic_model"])
        elif name == "pickscore":
            module = PickScoreReward(m["pickscore_model"], m["pickscore_processor"])
        elif name in HPS_FILES:
            module = HPSReward(m["hps_model"], m["hps_arch"], HPS_FILES[name])
        elif name == "imagereward":
            module = ImageRewardReward(m["imagereward_model"], m["imagereward_tokenizer"])
        elif name == "toy-compose":
            module = ToyComposeReward(m["toy_detector"])
        elif name == "toy-hidden":
            module = ToyHiddenReward(m["toy_hidden"])
        elif name == "ocr":
            module = OcrReward()
        elif name in ("jpeg", "jpeg_incompressibility"):
            module = JpegReward(-1.0 if name == "jpeg" else 1.0)
        else:
            module = CustomReward(name[len("custom:") :], device, dtype, custom_mode, custom_target)
        loaded.append((name, weight, _freeze(module, device, dtype)))
    return Reward(loaded)


def checkpoints_needed(spec: str, **model_overrides) -> list[tuple[str, str, tuple[str, ...]]]:
    """(flag, checkpoint, files) for every model load_reward(spec, **model_overrides) would load, for
    diffusion.check_checkpoints to check before anything is loaded: the flag is the real override
    (`--reward-models KEY`), files the names of which one must be in the directory / hub repo."""
    m = {**DEFAULT_MODELS, **{k: v for k, v in model_overrides.items() if k in DEFAULT_MODELS and v is not None}}
    needs = {
        "aesthetic": [("aesthetic_clip", ("config.json",)), ("aesthetic_model", (AESTHETIC_FILE,))],
        "pickscore": [
            ("pickscore_model", ("config.json",)),
            ("pickscore_processor", ("preprocessor_config.json", "processor_config.json")),
        ],
        "imagereward": [
            (k, (f,))
            for k, f in (("imagereward_model", IMAGEREWARD_FILES[0]), ("imagereward_model", IMAGEREWARD_FILES[1]))
        ]
        + [("imagereward_tokenizer", ("tokenizer_config.json", "vocab.txt"))],
        "toy-compose": [("toy_detector", (TOY_DETECTOR_FILES[0],)), ("toy_detector", (TOY_DETECTOR_FILES[1],))],
        "toy-hidden": [("toy_hidden", (TOY_DETECTOR_FILES[0],)), ("toy_hidden", (TOY_DETECTOR_FILES[1],))],
    }
    out = []
    for name, _ in parse_reward_spec(spec):
        if name == "ocr":  # the models rapidocr's wheel ships, each file checked
            out += [("--reward ocr", str(ocr_model_dir()), (f,)) for f in OCR_FILES]
            continue
        items = [("hps_model", (HPS_FILES[name],))] if name in HPS_FILES else needs.get(name, [])
        for key, files in items:
            if os.path.isfile(os.path.expanduser(str(m[key]))):
                files = ()  # a single file passed directly
            out.append((f"--reward-models {key}", m[key], files))
        if name in HPS_FILES and str(m["hps_arch"]).startswith("local-dir:"):
            out.append(("--reward-models hps_arch", str(m["hps_arch"])[len("local-dir:") :], ()))
    return out


def check_prompts(spec: str, prompts: list[str], flag: str = "--prompts", source: str | None = None, **model_overrides):
    """A one-line ValueError naming the first prompt of `prompts` that a reward of `spec` cannot read
    (ocr: a prompt without text in double quotes; toy-compose and toy-hidden read only their toy grammars),
    and what it accepts; read from the rewards' configs, before any weights load. `source`: the prompt set
    `prompts` came from (what `flag` was given), so that an ocr refusal names the file and line. Rewards that
    read any prompt (or whose config is not at hand) pass."""
    grammars = {"toy-compose": ("toy_detector", ToyGrammar), "toy-hidden": ("toy_hidden", ToyHiddenGrammar)}
    for name, _ in parse_reward_spec(spec):
        if name == "ocr":
            for prompt in prompts:
                try:
                    ocr_target(prompt)
                except ValueError as e:
                    raise ValueError(f"{flag}{_prompt_line(source, prompt)}: {e}") from None
        if name not in grammars:
            continue
        key, grammar_cls = grammars[name]
        where = os.path.expanduser(str(model_overrides.get(key) or DEFAULT_MODELS[key]))
        try:
            grammar = grammar_cls(json.loads((Path(where) / TOY_DETECTOR_FILES[0]).read_text()))
        except (OSError, ValueError, KeyError, CheckpointError):
            continue  # not a local directory: checked (and reported) with the checkpoints
        for prompt in prompts:
            try:
                grammar.parse(prompt)
            except ValueError:
                raise ValueError(
                    f"{flag}: prompt {prompt!r} is outside what --reward {name} reads: {grammar.text}"
                ) from None


def _prompt_line(source: str | None, prompt: str) -> str:
    """' FILE line N' for the first line of prompt file `source` (a built-in set's name or a path, as
    diffusion.load_prompts reads it) that holds `prompt`; '' when `source` is not a file (or not given)."""
    from diffusion import PROMPTS_DIR

    if not source:
        return ""
    path, shown = PROMPTS_DIR / f"{source}.txt", f"prompts/{source}.txt"
    if not path.is_file():
        path, shown = Path(os.path.expanduser(source)), source
    if not path.is_file():
        return ""  # a table's column (FILE.csv:COLUMN?...) or a built-in table: the prompt alone is named
    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if line.strip() == prompt or prompt in line:
            return f" {shown} line {number}"
    return ""
