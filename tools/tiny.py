"""Tiny random-initialised models in the hub directory layout (built offline, as every test model is).

They are built from config, saved exactly as a hub checkpoint is laid out, and then loaded by the
tests through the project's own loaders, so the tests exercise the code path real checkpoints take.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

# Stable Diffusion v1.5's scheduler config (scheduler/scheduler_config.json on the hub).
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


# A tiny CLIP text tower over the real 49408-token CLIP vocabulary (shared with tiny_rewards.py).
CLIP_TEXT = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


# A tiny AutoencoderKL: 32 px images, 4x16x16 latents (downsampling factor 2).
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=32,
)


def make_tiny_sd(out_dir: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny SD 1.x pipeline (32 px images, 4x16x16 latents) saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, projection_dim=32))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# SDXL base 1.0's scheduler config as shipped (an Euler scheduler; load_pipeline swaps in DDIM).
SDXL_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)


def make_tiny_sdxl(
    out_dir: str | Path, refiner: bool = False, scheduler_config: dict | None = None, seed: int = 0
) -> Path:
    """A tiny SDXL base (or refiner) pipeline saved with save_pretrained, built like the real one:
    CLIPTextModel + CLIPTextModelWithProjection of different widths (32 + 64 = 96-d token states,
    32-d pooled), a second tokenizer padding with '!', a UNet with addition_embed_type="text_time"
    (projection input = pooled + 6 time ids x 8; the refiner's has 5: its aesthetic score replaces
    the crop pair), a VAE with scaling_factor 0.13025 and force_upcast, and SDXL's Euler config."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffusion import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    time_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64 if refiner else 96,
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + (5 if refiner else 6) * time_dim,
    )
    vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)  # SDXL's scaling; it overflows in fp16
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**CLIP_TEXT, "hidden_size": 64, "intermediate_size": 128}, projection_dim=pooled_dim)
    )
    with tempfile.TemporaryDirectory() as tmp:
        build_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")  # as SDXL's tokenizer_2: pads with '!' (id 0)
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config or SDXL_SCHEDULER_CONFIG)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, projection_dim=32))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(out_dir)
    return out_dir


# A small English corpus for the tiny T5 tokenizer: the paper's animals and activities, plus a made-up
# word frequent enough to be one Unigram piece (while CLIP's BPE splits it) and punctuation.
T5_CORPUS_ANIMALS = (
    "ant bat bear beetle bee bird butterfly camel cat chicken cow deer dog dolphin duck fish fly fox frog goat goose "
    "gorilla hedgehog horse kangaroo lion lizard llama monkey mouse pig rabbit raccoon rat shark sheep snake spider "
    "squirrel tiger turkey turtle whale wolf zebra"
).split()
T5_CORPUS = (
    [f"a {a} {x}" for a in T5_CORPUS_ANIMALS for x in ("washing the dishes", "riding a bike", "playing chess")] * 3
    + ["a photo of a zorblax", "zorblax!"] * 40
    + ["a red dog", "a blue cat on the grass"] * 10
    + ["the quick brown fox jumps over the lazy dog, well-known: wow!!"] * 5  # every letter, some punctuation
)


def build_t5_tokenizer(out_dir: str | Path | None = None, model_max_length: int = 512):
    """A T5 tokenizer (T5TokenizerFast: a Unigram model behind T5's whitespace/Metaspace pre-tokenizer,
    '</s>' appended, pad 0 / eos 1 / unk 2, as the real one) over a ~100-piece vocabulary trained offline
    with the `tokenizers` library on T5_CORPUS. Its pieces differ from CLIP's BPE tokens: 'hedgehog' is
    one CLIP token and several T5 pieces, 'zorblax' several CLIP tokens and one T5 piece."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],  # T5's ids 0, 1, 2
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(T5_CORPUS, trainer)
    vocab = json.loads(unigram.to_str())["model"]["vocab"]
    # The trainer runs on several threads: its scores differ in the last bits from run to run. Rounded
    # and sorted, the same vocabulary (and the same ids) comes out every time.
    vocab = [tuple(v) for v in vocab[:3]] + sorted(
        ((p, round(s, 6)) for p, s in vocab[3:]), key=lambda v: (-v[1], v[0])
    )
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


# Stable Diffusion 3 (medium and 3.5) ship this scheduler config.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def make_tiny_t5(width: int):
    """(tokenizer, encoder): the offline T5 tokenizer and a tiny T5 v1.1 encoder (gated GELU, as SD3's and
    FLUX's T5-XXL) of model width `width`."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_t5_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    return tokenizer, T5EncoderModel(config)


def make_tiny_sd3(out_dir: str | Path, t5: bool = True, seed: int = 0, sd35: bool = False) -> Path:
    """A tiny SD3 pipeline (32 px images, 16x16x16 latents) saved with StableDiffusion3Pipeline.save_pretrained,
    built like the real one: two CLIPTextModelWithProjection of different widths (32 and 64: 96-d token states,
    32 + 64 = 96-d pooled), the second tokenizer padding with '!', a T5 encoder 128 wide (or none with t5=False:
    text_encoder_3 = tokenizer_3 = None), an SD3Transformer2DModel whose joint_attention_dim is T5's width and
    pooled_projection_dim the two CLIP projections summed, a 16-channel VAE with SD3's scaling and shift
    factors, and FlowMatchEulerDiscreteScheduler(shift=3.0). sd35=True gives the transformer SD3.5's
    changes: RMS-normalised queries and keys, and (as 3.5 Medium) a second, image-only attention in the
    first block."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from diffusion import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    t5_width = 128
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,  # = heads x head dim: the text stream has the image stream's width
        pooled_projection_dim=32 + 64,
        pos_embed_max_size=32,
        **(dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}),
    )
    vae = AutoencoderKL(
        **{**TINY_VAE, "latent_channels": 16},
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT, projection_dim=32))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**CLIP_TEXT, "hidden_size": 64, "intermediate_size": 128}, projection_dim=64)
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3, text_encoder_3 = make_tiny_t5(t5_width)
    with tempfile.TemporaryDirectory() as tmp:
        build_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, pad_token="!")  # as SD3's tokenizer_2: pads with '!' (id 0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# FLUX.1-dev's scheduler config as shipped (dynamic shifting: mu from the image's token count); FLUX.1-schnell's
# turns dynamic shifting off and ships shift 1.0.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER_CONFIG = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}


def make_tiny_flux(out_dir: str | Path, guidance: bool = True, seed: int = 0) -> Path:
    """A tiny FLUX.1 pipeline (32 px images, 16x16x16 latents packed 2x2 into 64 tokens of width 64) saved with
    FluxPipeline.save_pretrained, built like the real one: a FluxTransformer2DModel (one double-stream block, two
    single-stream blocks, rotary axes (4, 6, 6) summing to the head dim, joint_attention_dim = T5's width,
    pooled_projection_dim = CLIP's width) with the guidance embedding of FLUX.1-dev (guidance=True) or without
    it, as FLUX.1-schnell (guidance=False, with schnell's scheduler config), a CLIPTextModel (only its pooled
    output is used), a T5 encoder 128 wide with the offline T5 tokenizer, a 16-channel VAE with FLUX's scaling
    and shift factors and no quant convs, and FlowMatchEulerDiscreteScheduler with FLUX's dynamic shifting."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffusion import build_clip_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    t5_width = 128
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=CLIP_TEXT["hidden_size"],
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(
        **{**TINY_VAE, "latent_channels": 16},
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, projection_dim=32))
    tokenizer_2, text_encoder_2 = make_tiny_t5(t5_width)
    with tempfile.TemporaryDirectory() as tmp:
        build_clip_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler_config = FLUX_SCHEDULER_CONFIG if guidance else FLUX_SCHNELL_SCHEDULER_CONFIG
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)
    return out_dir
