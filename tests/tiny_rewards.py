"""Tiny random-initialised reward models saved in their published layouts (built offline, as every test model is).

Each builder writes what the real checkpoint looks like on disk (hub directory, or the single file
its authors released) so that rewards.py loads it through the same code path as the real thing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tools.tiny import CLIP_TEXT

CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)


def make_tiny_clip(out_dir, seed: int = 0, image_mean=None, image_std=None) -> Path:
    """A CLIPModel (32 px images, 32-d projection) and its CLIPProcessor, saved like a hub repo."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffusion import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=32))
    model.save_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    kw = {}
    if image_mean is not None:
        kw = dict(image_mean=list(image_mean), image_std=list(image_std))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **kw)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def aesthetic_state_dict(dim: int = 32, seed: int = 0) -> dict:
    """Random weights under the published LAION aesthetic predictor's keys (layers.0/2/4/6/7)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(0, dim, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    sd = {}
    for idx, d_in, d_out in sizes:
        sd[f"layers.{idx}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        sd[f"layers.{idx}.bias"] = torch.randn(d_out, generator=g) * 0.1
    return sd


def make_tiny_aesthetic(out_dir, dim: int = 32, seed: int = 0) -> Path:
    """A directory holding aesthetic-model.pth as published: a plain torch.save of the state dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(aesthetic_state_dict(dim, seed), out_dir / "aesthetic-model.pth")
    return out_dir


# open_clip's own model-config format (what model_configs/ViT-H-14.json holds), tiny.
OPEN_CLIP_CFG = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)


def make_tiny_hps(out_dir, seed: int = 0) -> tuple[Path, str]:
    """(directory with HPS_v2.1_compressed.pt and HPS_v2_compressed.pt, the open_clip arch string).

    The HPS release is `torch.save({'state_dict': model.state_dict()})` of an open_clip ViT-H/14;
    here the same with a tiny open_clip CLIP whose config lies in out_dir/arch/open_clip_config.json.
    """
    import open_clip

    out_dir = Path(out_dir)
    arch_dir = out_dir / "arch"
    arch_dir.mkdir(parents=True, exist_ok=True)
    (arch_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CFG}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{arch_dir}", pretrained=None, load_weights=False)
    torch.save({"state_dict": model.state_dict()}, out_dir / "HPS_v2.1_compressed.pt")
    torch.manual_seed(seed + 1)
    model = open_clip.create_model(f"local-dir:{arch_dir}", pretrained=None, load_weights=False)
    torch.save({"state_dict": model.state_dict()}, out_dir / "HPS_v2_compressed.pt")
    return out_dir, f"local-dir:{arch_dir}"


BERT_WORDS = "a an the of photo cat dog horse riding bike playing chess on in red blue tree snow rain".split()
IR_VISION = dict(width=128, depth=1, patch=16, image=32)  # 2 heads of 64, as rewards.py infers
IR_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=40,
)


def make_bert_tokenizer(out_dir) -> Path:
    """A small uncased WordPiece tokenizer (BertTokenizer) saved like bert-base-uncased."""
    from transformers import BertTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out_dir / "vocab.txt"), do_lower_case=True).save_pretrained(out_dir)
    return out_dir


def imagereward_state_dict(seed: int = 0) -> dict:
    """Random weights under ImageReward.pt's published keys: blip.visual_encoder.* (BLIP's timm-style
    ViT), blip.text_encoder.* (BLIP's med.py BERT with cross-attention), blip.{vision,text}_proj, mlp.*."""
    from transformers import BlipTextConfig, BlipTextModel

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    d, p = IR_VISION["width"], IR_VISION["patch"]
    n = (IR_VISION["image"] // p) ** 2
    sd = {
        "blip.visual_encoder.cls_token": rnd(1, 1, d, scale=0.5),
        "blip.visual_encoder.pos_embed": rnd(1, n + 1, d, scale=0.5),
        "blip.visual_encoder.patch_embed.proj.weight": rnd(d, 3, p, p),
        "blip.visual_encoder.patch_embed.proj.bias": rnd(d),
        "blip.visual_encoder.norm.weight": 1 + rnd(d),
        "blip.visual_encoder.norm.bias": rnd(d),
    }
    for i in range(IR_VISION["depth"]):
        b = f"blip.visual_encoder.blocks.{i}."
        sd |= {
            b + "norm1.weight": 1 + rnd(d), b + "norm1.bias": rnd(d),
            b + "attn.qkv.weight": rnd(3 * d, d, scale=0.2), b + "attn.qkv.bias": rnd(3 * d),
            b + "attn.proj.weight": rnd(d, d, scale=0.1), b + "attn.proj.bias": rnd(d),
            b + "norm2.weight": 1 + rnd(d), b + "norm2.bias": rnd(d),
            b + "mlp.fc1.weight": rnd(4 * d, d, scale=0.1), b + "mlp.fc1.bias": rnd(4 * d),
            b + "mlp.fc2.weight": rnd(d, 4 * d, scale=0.1), b + "mlp.fc2.bias": rnd(d),
        }  # fmt: skip
    # med.py's BERT and transformers' BlipTextModel (a port of med.py) share parameter names.
    torch.manual_seed(seed)
    text = BlipTextModel(
        BlipTextConfig(
            **IR_TEXT, encoder_hidden_size=d, is_decoder=True, pad_token_id=0, bos_token_id=None, sep_token_id=None
        ),
        add_pooling_layer=False,
    )
    for k, v in text.state_dict().items():
        sd["blip.text_encoder." + k] = v + rnd(*v.shape)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(IR_TEXT["max_position_embeddings"])[
        None
    ]  # old torch saved it
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = rnd(256, d), rnd(256)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = rnd(256, IR_TEXT["hidden_size"]), rnd(256)
    for k, v in aesthetic_state_dict(IR_TEXT["hidden_size"], seed).items():
        sd["mlp." + k] = v
    return sd


def make_tiny_imagereward(out_dir, seed: int = 0) -> tuple[Path, Path]:
    """(directory with ImageReward.pt + med_config.json, BERT tokenizer directory)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(imagereward_state_dict(seed), out_dir / "ImageReward.pt")
    med = dict(
        architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
        initializer_range=0.02, layer_norm_eps=1e-12, model_type="bert", pad_token_id=0, type_vocab_size=2,
        encoder_width=IR_VISION["width"], add_cross_attention=True, **IR_TEXT,
    )  # fmt: skip
    (out_dir / "med_config.json").write_text(json.dumps(med, indent=2))
    return out_dir, make_bert_tokenizer(out_dir / "tokenizer")
