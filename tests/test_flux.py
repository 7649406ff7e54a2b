"""FLUX.1 (flow matching, guidance-distilled): a tiny FLUX.1-dev and -schnell built from config (tools/tiny.py), saved
in the hub layout and loaded through diffusion.load_pipeline, against diffusers' FluxPipeline (its packing, position
ids, dynamic shift, encode_prompt and whole sampling loop) and values derived here by hand."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

import diffusion
import kernels
from explore import DiffExpConfig, check_guidance, choose_words, diffexp_conditioning, low_guidance_steps

PROMPTS = ["a red dog", "wow!! a zorblax hedgehog"]
PX = 32  # the tiny FLUX's test size: 16x16 latents, 8x8 = 64 image tokens (the pipeline's own default is 256 px)


@pytest.fixture(scope="module")
def pipe(tiny_flux_dir):
    return diffusion.load_pipeline(str(tiny_flux_dir))


@pytest.fixture(scope="module")
def pipe_schnell(tiny_flux_schnell_dir):
    return diffusion.load_pipeline(str(tiny_flux_schnell_dir))


@pytest.fixture(scope="module")
def text(pipe):
    return diffusion.TextConditioner(pipe, PX)


def oracle_pipeline(directory):
    from diffusers import FluxPipeline

    oracle = FluxPipeline.from_pretrained(directory)
    oracle.set_progress_bar_config(disable=True)
    return oracle


# ---------------------------------------------------------------------------------------------
# Loader


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_load_pipeline_gives_frozen_flux_with_and_without_the_guidance_embedding(guidance, request):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    directory = request.getfixturevalue("tiny_flux_dir" if guidance else "tiny_flux_schnell_dir")
    assert diffusion.inspect_pipeline(str(directory)) == "flux"
    assert diffusion.has_guidance_input(str(directory)) is guidance  # read from the config, nothing loaded
    pipe = request.getfixturevalue("pipe" if guidance else "pipe_schnell")
    assert isinstance(pipe, FluxPipeline) and diffusion.pipeline_kind(pipe) == "flux"
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # its own scheduler, not DDIM
    assert pipe.scheduler.config.use_dynamic_shifting is guidance  # schnell ships it off (shift 1)
    model = diffusion.denoiser(pipe)
    assert isinstance(model, FluxTransformer2DModel) and model.config.guidance_embeds is guidance
    modules = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert diffusion.native_resolution(pipe) == 128 * 2  # FluxPipeline's default_sample_size x the VAE's factor
    assert diffusion.resolution_multiple(str(directory), family="flux")[0] == 4  # 2x2 patches of a factor-2 VAE


def _broken_copy(src, dst, drop_dir=None, null=(), cls=None):
    shutil.copytree(src, dst)
    if drop_dir:
        shutil.rmtree(dst / drop_dir)
    index = json.loads((dst / "model_index.json").read_text())
    for key in null:
        index[key] = [None, None]
    if cls:
        index["_class_name"] = cls
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    "drop_dir, null, named",
    [
        ("text_encoder_2", (), "text_encoder_2"),
        (None, ("tokenizer",), "tokenizer"),
        (None, ("transformer",), "transformer"),
    ],
)
def test_incomplete_flux_is_refused_in_one_line_before_loading(tiny_flux_dir, tmp_path, monkeypatch, drop_dir, null, named):  # fmt: skip
    broken = _broken_copy(tiny_flux_dir, tmp_path / "broken", drop_dir, null)
    monkeypatch.setattr(diffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(diffusion.CheckpointError) as e:
        diffusion.load_pipeline(str(broken))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--pretrained:") and f"FLUX.1 checkpoint without {named};" in msg
    assert "black-forest-labs/FLUX.1-dev" in msg


def test_other_flux_pipelines_are_refused_in_one_line(tiny_flux_dir, tmp_path):
    """A FLUX fill / Kontext / control checkpoint takes other inputs than text alone: not a base model here."""
    broken = _broken_copy(tiny_flux_dir, tmp_path / "fill", cls="FluxFillPipeline")
    with pytest.raises(
        diffusion.CheckpointError, match=r"is a FluxFillPipeline pipeline; .*FLUX.1 \(FluxPipeline\)"
    ) as e:
        diffusion.inspect_pipeline(str(broken))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Packing, position ids, dynamic shift: the pipeline's own functions as the oracle


def test_packing_and_position_ids_equal_the_pipelines():
    """Latents h x w (not square, so rows and columns cannot be swapped unnoticed) pack into (h/2)(w/2) tokens
    of width 64 exactly as FluxPipeline._pack_latents does, unpack back, and the image ids are (0, row, col)
    as _prepare_latent_image_ids gives them; the text ids of encode_prompt are zeros."""
    from diffusers import FluxPipeline

    B, C, h, w = 2, 16, 6, 10
    x = torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(0))
    packed = diffusion.pack_latents(x)
    assert packed.shape == (B, (h // 2) * (w // 2), 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, B, C, h, w))
    assert torch.equal(diffusion.unpack_latents(packed, h, w), x)
    # _unpack_latents takes pixel sizes: h x w latents of a VAE with factor 8 are 8h x 8w pixels
    assert torch.equal(FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8), x)
    ids = diffusion.latent_image_ids(h, w)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2, "cpu", torch.float32))
    assert ids[:, 0].eq(0).all() and ids[w // 2 + 1].tolist() == [0, 1, 1] and ids[-1].tolist() == [0, h // 2 - 1, w // 2 - 1]  # fmt: skip
    # the token of patch (row r, col c) holds channel k's 2x2 block in positions 4k .. 4k + 3, row-major
    r, c, k = 1, 3, 5
    assert packed[0, r * (w // 2) + c, 4 * k : 4 * k + 4].tolist() == x[0, k, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].flatten().tolist()  # fmt: skip


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_dynamic_shift_equals_the_pipelines_at_two_resolutions(which, request):
    """The timesteps and sigmas sampling_schedule sets are those FluxPipeline's own call sets (sigmas
    linspace(1, 1/N, N), mu from the image's token count), at 32 and 64 px; on dev they differ between the
    two (mu 0.468 and 0.5, by the formula written out here), on schnell (no dynamic shifting) they do not."""
    directory = request.getfixturevalue("tiny_flux_dir" if which == "dev" else "tiny_flux_schnell_dir")
    pipe = request.getfixturevalue("pipe" if which == "dev" else "pipe_schnell")
    oracle = oracle_pipeline(directory)
    n, seen = 5, {}
    for px in (32, 64):
        oracle(prompt="a cat", num_inference_steps=n, height=px, width=px, output_type="latent")
        timesteps, schedule = diffusion.sampling_schedule(pipe, n, px)
        torch.testing.assert_close(timesteps, oracle.scheduler.timesteps, rtol=1e-6, atol=0)
        torch.testing.assert_close(schedule.sigmas, oracle.scheduler.sigmas.double(), rtol=1e-6, atol=0)
        tokens = (px // 2 // 2) ** 2
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)
        sigmas = np.linspace(1, 1 / n, n)
        by_hand = math.e**mu / (math.e**mu + (1 / sigmas - 1)) if which == "dev" else sigmas
        torch.testing.assert_close(schedule.sigmas[:-1], torch.from_numpy(by_hand), rtol=1e-6, atol=0)
        seen[px] = timesteps
    assert (which == "dev") == (not torch.equal(seen[32], seen[64]))


def test_flow_step_on_unpacked_latents_is_the_step_on_the_packed_tokens(pipe):
    """The SDE step and its log-prob act element-wise and average over all C·H·W elements, so running them on
    the unpacked latents (what the trainers store) or on FLUX's packed tokens gives the same numbers."""
    _, schedule = diffusion.sampling_schedule(pipe, 4, PX)
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(2, 16, 16, 16, generator=g, dtype=torch.float64) for _ in range(3))
    t = schedule.timesteps[torch.tensor([0, 2])]
    co = schedule.coefficients(t, 0.7, dtype=torch.float64)
    x1, lp1 = kernels.cfg_ddim_step(v, v, x, 3.5, co, noise=z, return_log_prob=True, backend="eager")
    pk = diffusion.pack_latents
    x2, lp2 = kernels.cfg_ddim_step(pk(v), pk(v), pk(x), 3.5, co, noise=pk(z), return_log_prob=True, backend="eager")
    torch.testing.assert_close(pk(x1), x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp1, lp2, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Conditioning and the denoiser call


def test_conditioning_matches_the_pipelines_encode_prompt(pipe, text):
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu")
    cond = text.encode(PROMPTS)
    assert cond.embeds.shape == (2, 512, 128) and cond.pooled.shape == (2, 32) and cond.time_ids is None
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert torch.equal(text_ids, torch.zeros(512, 3))
    # DiffExp's e_empty is the encoded ""; the distilled model has no CFG negative
    with torch.no_grad():
        e0, p0, _ = pipe.encode_prompt([""], None, device="cpu")
    assert torch.equal(text.empty.embeds, e0) and torch.equal(text.empty.pooled, p0)
    assert text.negative is None and text.distilled
    assert text.max_lengths == [512] and text.parts == [(0, 0, 128)] and len(text.tokenizers) == 1
    true_cfg = diffusion.TextConditioner(pipe, PX, true_cfg=True)
    assert true_cfg.negative is true_cfg.empty and not true_cfg.distilled


@pytest.mark.parametrize("which", ["dev", "schnell"])
def test_cfg_unet_makes_one_call_with_the_per_sample_guidance_input(which, request, text):
    """Distilled (negative None): one transformer call of batch B whatever the scales (also 1 and 0, the CFG
    shortcuts' values), each sample's scale given as the guidance input (dev) or none at all (schnell), and
    the output returned as both halves. Compared with the transformer called by hand on packed latents."""
    pipe = request.getfixturevalue("pipe" if which == "dev" else "pipe_schnell")
    model = diffusion.denoiser(pipe)
    cond = diffusion.TextConditioner(pipe, PX).encode(["a red dog", "a cat", "a zorblax"])
    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(750.0)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append((k["hidden_states"].shape[0], k["guidance"])), with_kwargs=True)  # fmt: skip
    w = torch.tensor([1.0, 4.5, 0.0])
    with torch.no_grad():
        out_u, out_c = diffusion.cfg_unet(model, x, t, cond, None, w)
        hook.remove()
        ids = torch.tensor([[0.0, r, c] for r in range(8) for c in range(8)])  # (0, row, col) of each 2x2 patch
        ref = model(
            hidden_states=diffusion.pack_latents(x),
            timestep=torch.full((3,), 0.75),
            guidance=w if which == "dev" else None,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros(512, 3),
            img_ids=ids,
        ).sample
    assert out_u is out_c and len(seen) == 1 and seen[0][0] == 3
    assert seen[0][1].tolist() == w.tolist() if which == "dev" else seen[0][1] is None
    torch.testing.assert_close(diffusion.pack_latents(out_c), ref, rtol=1e-5, atol=1e-6)
    if which == "dev":  # the guidance input changes the output, so the check above can fail
        with torch.no_grad():
            other, _ = diffusion.cfg_unet(model, x, t, cond, None, torch.tensor([3.5, 3.5, 3.5]))
        assert (other - out_c).abs().flatten(1).amax(1).min() > 1e-4


# ---------------------------------------------------------------------------------------------
# generate == FluxPipeline


@pytest.mark.parametrize(
    "which, guidance, px, true_cfg",
    [
        ("dev", 2.5, 32, 1.0),
        ("dev", 4.0, 64, 1.0),
        ("schnell", 0.0, 32, 1.0),
        ("dev", 3.5, 32, 4.0),
        ("schnell", 0.0, 32, 3.0),
    ],
)
def test_generate_equals_the_flux_pipeline(which, guidance, px, true_cfg, request):
    """diffusion.generate (Euler ODE, eta = 0) == FluxPipeline on the same packed initial latents, steps and
    guidance, two prompts in one batch: FLUX.1-dev's distilled guidance at two resolutions (each with its own
    shifted sigmas), schnell without guidance, and true CFG (the negative prompt "", true_cfg_scale; on dev with
    the guidance input at its default 3.5) where the scale generate gets is the true-CFG scale."""
    directory = request.getfixturevalue("tiny_flux_dir" if which == "dev" else "tiny_flux_schnell_dir")
    pipe = request.getfixturevalue("pipe" if which == "dev" else "pipe_schnell")
    oracle = oracle_pipeline(directory)
    text = diffusion.TextConditioner(pipe, px, true_cfg=true_cfg > 1)
    scale = true_cfg if true_cfg > 1 else guidance
    ours = diffusion.generate(pipe, text.encode(PROMPTS), torch.full((3,), scale), 3, torch.Generator().manual_seed(3),
                              resolution=px, negative=text.negative)  # fmt: skip
    latents = torch.randn(2, 16, px // 2, px // 2, generator=torch.Generator().manual_seed(3))
    extra = {"negative_prompt": "", "true_cfg_scale": true_cfg} if true_cfg > 1 else {}
    images = oracle(prompt=PROMPTS, guidance_scale=guidance if which == "dev" else 3.5, num_inference_steps=3,
                    latents=diffusion.pack_latents(latents), output_type="pt", height=px, width=px, **extra).images  # fmt: skip
    assert ours.shape == (2, 3, px, px)
    # distilled: the same single call, bit for bit; true CFG: our one doubled-batch call against the pipeline's two
    tol = dict(rtol=0, atol=0) if true_cfg == 1 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, images, **tol)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts give different images


# ---------------------------------------------------------------------------------------------
# DiffExp on FLUX


def test_prompt_weighting_blends_t5_at_its_positions_and_pooled_only_when_asked(text):
    """The chosen word is one of T5's words and weighted at its sentencepiece positions: 'zorblax' is one T5
    piece at position 2 of "a zorblax hedgehog" (after '▁', 'a'), 'hedgehog' the 7 pieces after it (T5 has no
    BOS); e_empty is T5's encoding of "". CLIP gives only the pooled vector, blended with --prompt-weight-pooled alone."""
    prompt, w = "a zorblax hedgehog", 1.7
    tok = text.tokenizers[0]
    assert type(tok).__name__.startswith("T5")
    ids = tok(prompt).input_ids
    # '▁', 'a' | '▁zorblax' | '▁', 'he', 'd', 'g', 'e', 'ho', 'g' | '</s>'
    assert tok.convert_ids_to_tokens(ids[2:3]) == ["▁zorblax"] and len(ids) == 2 + 1 + 7 + 1
    choices = choose_words(
        [prompt] * 16, text.tokenizers, torch.Generator().manual_seed(0), max_lengths=text.max_lengths
    )
    picked = {c.word: c.positions for c in choices}
    assert picked == {"zorblax": [2], "hedgehog": list(range(3, 10))}
    assert all(c.positions_2 is None and c.positions_3 is None for c in choices)

    one = text.encode([prompt])
    cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    out, _, rec = diffexp_conditioning(cfg, True, [prompt], one, text, torch.tensor([1000.0]), 1000, g())
    e, e0 = one.embeds[0], text.empty.embeds[0]
    expected = e.clone()
    rows = rec[0].positions
    expected[rows] = e0[rows] + w * (e[rows] - e0[rows])
    torch.testing.assert_close(out.embeds[0], expected)
    assert not torch.equal(out.embeds[0, rows], e[rows]) and torch.equal(out.pooled, one.pooled)
    pooled_cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w), prompt_weight_pooled=True)
    out, _, _ = diffexp_conditioning(pooled_cfg, True, [prompt], one, text, torch.tensor([1000.0]), 1000, g())
    torch.testing.assert_close(out.pooled, text.empty.pooled + w * (one.pooled - text.empty.pooled))


@pytest.mark.parametrize("px, n, expected_low", [(512, 28, 8), (1024, 28, 11), (1024, 50, 20)])
def test_cfg_schedule_switches_on_the_shifted_sigmas(px, n, expected_low):
    """FLUX.1-dev's scheduler (dynamic shifting, VAE factor 8): --t-sw 0.8 puts w_low exactly on the steps whose
    shifted sigma is at least sigma_sw = 1 / (1 + sqrt(ab / (1 - ab))) with SD's alpha_bar at t = 800 (computed
    here in float64), 8 of 28 steps at 512 px and 11 at 1024 px (the numbers docs/flux_notes.md gives): the same noise
    level as on SD3, reached after more steps at the higher resolution."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tools.tiny import FLUX_SCHEDULER_CONFIG

    # FluxPipeline's arguments for a 1024 px image: (1024 / 16)^2 = 4096 tokens, mu = max_shift
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    sched.set_timesteps(n, sigmas=np.linspace(1, 1 / n, n), mu=0.5 + 0.65 * ((px // 16) ** 2 - 256) / 3840)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = float(torch.cumprod(1 - betas, 0)[800])
    sigma_sw = 1 / (1 + math.sqrt(ab / (1 - ab)))
    want = (sched.sigmas[:-1].double() >= sigma_sw).tolist()
    assert low_guidance_steps(sched.timesteps, sched, 0.8).tolist() == want and sum(want) == expected_low


def test_per_step_guidance_input_is_the_documented_switch(pipe, text):
    """Through diffexp_conditioning, as the trainers and sample.py call it, on the tiny FLUX.1-dev at 32 px:
    g = w_low on the steps with shifted sigma >= sigma_sw, w_high (3.5 by default on FLUX) after; and the
    transformer receives exactly these numbers, per step, as its guidance input."""
    n = 6
    timesteps, schedule = diffusion.sampling_schedule(pipe, n, PX)
    cfg = DiffExpConfig(prompt_weighting=False, t_sw=0.8, w_low=1.0)  # w_high None: FLUX's default
    _, guidance, _ = diffexp_conditioning(cfg, True, ["a cat"], text.encode(["a cat"]), text, timesteps, 1000, torch.Generator())  # fmt: skip
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = float(torch.cumprod(1 - betas, 0)[800])
    sigma_sw = 1 / (1 + math.sqrt(ab / (1 - ab)))
    expected = [1.0 if s >= sigma_sw else 3.5 for s in schedule.sigmas[:-1].tolist()]
    assert guidance.tolist() == expected and 1.0 in expected and 3.5 in expected
    model = diffusion.denoiser(pipe)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["guidance"].tolist()), with_kwargs=True)
    try:
        diffusion.generate(pipe, text.encode(["a cat"]), guidance, n, torch.Generator().manual_seed(0), resolution=PX, negative=None)  # fmt: skip
    finally:
        hook.remove()
    assert seen == [[w] for w in expected]


def test_equal_w_low_and_w_high_give_the_plain_sampler_exactly(pipe, text):
    """w_low = w_high = 3.5 with the schedule on is the plain sampler at guidance 3.5 (the same images, bit for
    bit); w_low 1 is not (so the check can fail)."""
    n, cond = 4, text.encode(PROMPTS)
    timesteps, _ = diffusion.sampling_schedule(pipe, n, PX)

    def images(w_low, exploring=True):
        cfg = DiffExpConfig(prompt_weighting=False, t_sw=0.5, w_low=w_low)
        _, guidance, _ = diffexp_conditioning(cfg, exploring, PROMPTS, cond, text, timesteps, 1000, torch.Generator())
        return diffusion.generate(pipe, cond, guidance, n, torch.Generator().manual_seed(0), resolution=PX, negative=None)  # fmt: skip

    plain = images(1.0, exploring=False)
    assert torch.equal(images(3.5), plain) and (images(1.0) - plain).abs().max() > 1e-3


def test_guidance_options_the_model_cannot_take_are_refused_in_one_line():
    """--true-cfg needs FLUX.1; a CFG schedule on FLUX.1-schnell (no guidance input) needs --true-cfg: each a
    ValueError of one line naming both ways out. FLUX.1-dev takes either mode."""
    with pytest.raises(ValueError, match=r"^--true-cfg: only FLUX.1 .*drop the flag$"):
        check_guidance(DiffExpConfig(true_cfg=True), "sd3", None)
    with pytest.raises(ValueError) as e:
        check_guidance(DiffExpConfig(), "flux", False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--cfg-schedule:") and "--no-cfg-schedule" in msg and "--true-cfg" in msg
    with pytest.raises(
        ValueError, match=r"^--settings 'cfg:w_low=0': .*drop the setting 'cfg:w_low=0', or pass --true-cfg"
    ):
        check_guidance(DiffExpConfig(), "flux", False, setting="cfg:w_low=0")
    for cfg, guidance_input in [(DiffExpConfig(true_cfg=True), False), (DiffExpConfig(cfg_schedule=False), False),
                                (DiffExpConfig(), True), (DiffExpConfig(true_cfg=True), True)]:  # fmt: skip
        check_guidance(cfg, "flux", guidance_input)
    assert DiffExpConfig().for_family("flux").w_high == 3.5 and DiffExpConfig().for_family("sd", "ddpo").w_high == 5.0
    assert DiffExpConfig(w_high=6.0).for_family("flux").w_high == 6.0


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_targets_are_the_projections_named_in_the_readme(tiny_flux_dir):
    """The module names of diffusers' FluxTransformer2DModel that get adapters: the double blocks' attention of
    both streams and both feed-forwards (Flow-GRPO's), the single blocks' q/k/v, proj_mlp and proj_out; not the
    transformer's final proj_out, its embedders or any norm."""
    pipe = diffusion.load_pipeline(str(tiny_flux_dir))
    model = diffusion.denoiser(pipe)
    params = diffusion.add_lora(model, rank=4, alpha=4)
    adapted = sorted({n.split(".lora_A")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_A" in n})
    double = [f"transformer_blocks.0.{m}" for m in (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
        "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]  # fmt: skip
    single = [f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn.to_k", "attn.to_q", "attn.to_v", "proj_mlp", "proj_out")]  # fmt: skip
    assert adapted == sorted(double + single)
    assert params and all(p.dtype == torch.float32 for p in params)
