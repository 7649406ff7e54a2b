"""SD3 / SD3.5 (flow matching): a tiny SD3 built from config, saved in the hub layout and loaded through
diffusion.load_pipeline, against diffusers' StableDiffusion3Pipeline and FlowMatchEulerDiscreteScheduler
and a float64 transcription of the flow step written here."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import diffusion
import kernels
from conftest import ROOT
from explore import (
    DiffExpConfig,
    apply_prompt_weights,
    cfg_scales,
    choose_words,
    describe_cfg_schedule,
    diffexp_conditioning,
    low_guidance_steps,
    word_token_positions,
)
from kernels import cfg_ddim as op1

requires_triton = pytest.mark.skipif(op1.triton is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
PROMPTS = ["a red dog", "wow!! a zorblax hedgehog"]


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_dir(tmp_path_factory):
    from tools.tiny import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-no-t5"), t5=False)


@pytest.fixture(scope="session")
def tiny_sd35_dir(tmp_path_factory):
    from tools.tiny import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd35"), t5=False, sd35=True)


DIRS = {"t5": "tiny_sd3_dir", "no_t5": "tiny_sd3_no_t5_dir", "sd35": "tiny_sd35_dir"}


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    return diffusion.load_pipeline(str(tiny_sd3_dir))


@pytest.fixture(scope="module")
def pipe_no_t5(tiny_sd3_no_t5_dir):
    return diffusion.load_pipeline(str(tiny_sd3_no_t5_dir))


@pytest.fixture(scope="module")
def text(pipe):
    return diffusion.TextConditioner(pipe)


def oracle_pipeline(directory):
    from diffusers import StableDiffusion3Pipeline

    t5 = json.loads((directory / "model_index.json").read_text())["text_encoder_3"] != [None, None]
    kwargs = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    oracle = StableDiffusion3Pipeline.from_pretrained(directory, **kwargs)
    oracle.set_progress_bar_config(disable=True)
    return oracle


# ---------------------------------------------------------------------------------------------
# Loader


@pytest.mark.parametrize("t5", [True, False])
def test_load_pipeline_gives_frozen_sd3_with_its_flow_scheduler(t5, request):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    directory = request.getfixturevalue("tiny_sd3_dir" if t5 else "tiny_sd3_no_t5_dir")
    assert diffusion.inspect_pipeline(str(directory)) == "sd3"
    pipe = request.getfixturevalue("pipe" if t5 else "pipe_no_t5")
    assert isinstance(pipe, StableDiffusion3Pipeline) and diffusion.pipeline_kind(pipe) == "sd3"
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler and pipe.scheduler.config.shift == 3.0
    assert isinstance(diffusion.denoiser(pipe), SD3Transformer2DModel)
    assert (pipe.text_encoder_3 is not None) == t5 and (pipe.tokenizer_3 is not None) == t5
    modules = [pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    assert not any(p.requires_grad for m in filter(None, modules) for p in m.parameters())
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == pytest.approx(0.0609)


def _broken_copy(src, dst, drop_dir=None, null=()):
    shutil.copytree(src, dst)
    if drop_dir:
        shutil.rmtree(dst / drop_dir)
    index = json.loads((dst / "model_index.json").read_text())
    for key in null:
        index[key] = [None, None]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize(
    "drop_dir, null, named",
    [
        ("text_encoder_2", (), "text_encoder_2"),  # the directory is gone
        (None, ("transformer",), "transformer"),  # model_index says there is none
        (None, ("tokenizer_3",), "tokenizer_3"),  # half of T5: an encoder without its tokenizer
        ("tokenizer_3", (), "tokenizer_3"),
    ],
)
def test_incomplete_sd3_is_refused_in_one_line_before_loading(
    tiny_sd3_dir, tmp_path, monkeypatch, drop_dir, null, named
):
    broken = _broken_copy(tiny_sd3_dir, tmp_path / "broken", drop_dir, null)
    monkeypatch.setattr(diffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(diffusion.CheckpointError) as e:
        diffusion.load_pipeline(str(broken))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--pretrained:") and f"without {named}" in msg
    assert "T5, text_encoder_3 with tokenizer_3, is optional" in msg


def test_sd3_loads_from_a_hub_id_in_the_cache(tiny_sd3_no_t5_dir, tmp_path):
    """A hub id goes through the same from_pretrained path: a Hugging Face cache laid out by hand (refs/main,
    snapshots/<commit>/...), read offline in a fresh process."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-sd3" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_sd3_no_t5_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = (
        "import diffusion; p = diffusion.load_pipeline('tiny-org/tiny-sd3'); "
        "print(diffusion.inspect_pipeline('tiny-org/tiny-sd3'), type(p).__name__, p.text_encoder_3)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["sd3", "StableDiffusion3Pipeline", "None"]


# ---------------------------------------------------------------------------------------------
# Conditioning


@pytest.mark.parametrize("t5", [True, False])
def test_conditioning_matches_the_pipelines_encode_prompt(t5, request):
    pipe = request.getfixturevalue("pipe" if t5 else "pipe_no_t5")
    text = diffusion.TextConditioner(pipe)
    cond = text.encode(PROMPTS)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    assert cond.embeds.shape == (2, 77 + 256, 128) and cond.pooled.shape == (2, 32 + 64) and cond.time_ids is None
    torch.testing.assert_close(cond.embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    # CFG's negative is the encoded "" (not zeros), and it is DiffExp's e_empty as well
    torch.testing.assert_close(text.negative.embeds.expand(2, -1, -1), neg)
    torch.testing.assert_close(text.negative.pooled.expand(2, -1), neg_pooled)
    assert text.negative is text.empty and text.empty.pooled.abs().max() > 0
    t5_rows = cond.embeds[:, 77:]
    assert (t5_rows.abs().amax((1, 2)) > 0).all() if t5 else torch.equal(t5_rows, torch.zeros_like(t5_rows))
    assert torch.equal(cond.embeds[:, :77, 96:], torch.zeros(2, 77, 32))  # CLIP states zero-padded to T5's width
    assert text.parts == [(0, 0, 32), (0, 32, 64)] + ([(77, 0, 128)] if t5 else [])
    assert text.max_lengths == [77, 77] + ([256] if t5 else [])


def test_cfg_unet_calls_the_transformer_and_keeps_the_w1_w0_shortcut(pipe, text):
    model = diffusion.denoiser(pipe)
    cond = text.encode(["a red dog", "a cat", "a zorblax"])
    x = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(750.0)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[0]), with_kwargs=True)

    def direct(c):  # the pipeline's call, written out
        return model(
            hidden_states=x, timestep=t.expand(3), encoder_hidden_states=c.embeds, pooled_projections=c.pooled
        ).sample

    with torch.no_grad():
        full_u, full_c = diffusion.cfg_unet(model, x, t, cond, text.negative, 5.0)
        one_u, one_c = diffusion.cfg_unet(model, x, t, cond, text.negative, 1.0)
        zero_u, zero_c = diffusion.cfg_unet(model, x, t, cond, text.negative, 0.0)
        mix_u, mix_c = diffusion.cfg_unet(model, x, t, cond, text.negative, torch.tensor([1.0, 5.0, 0.0]))
        handle.remove()
        ref_c, ref_u = direct(cond), direct(text.negative.expand(3))
    assert seen == [6, 3, 3, 4]
    torch.testing.assert_close(full_c, ref_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full_u, ref_u, atol=1e-5, rtol=1e-5)
    assert torch.equal(one_c, one_u) and torch.equal(zero_u, zero_c)
    torch.testing.assert_close(one_c, ref_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_u, ref_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix_c[:2], ref_c[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix_u[1:], ref_u[1:], atol=1e-5, rtol=1e-5)
    assert (full_c - full_u).abs().max() > 1e-4  # the two conditionings differ, so the check can fail


# ---------------------------------------------------------------------------------------------
# The flow step in the kernels' terms


def flow_schedule(n=10):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tools.tiny import SD3_SCHEDULER_CONFIG

    sched = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
    sched.set_timesteps(n)
    return sched


def flow_grpo_reference(v, x, z, i, sigmas, a):
    """Flow-GRPO's SDE step and its log-prob for one sample at step i, in float64, from the formula."""
    sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
    s = float(sigmas[1]) if sigma == 1 else sigma
    std = a * math.sqrt(sigma / (1 - s))
    dt = sigma_next - sigma
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    scale = std * math.sqrt(-dt)
    x_next = mean + scale * z
    log_prob = (-((x_next - mean) ** 2) / (2 * scale**2) - math.log(scale) - math.log(math.sqrt(2 * math.pi))).mean()
    return x_next, log_prob


@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sde_step_and_log_prob_equal_the_float64_formula(backend, dtype):
    sched = flow_schedule(10)
    schedule = kernels.schedule_for(sched, 10, "cpu")
    assert isinstance(schedule, kernels.FlowMatchSchedule)
    g = torch.Generator().manual_seed(1)
    steps = torch.tensor([0, 9, 4, 1, 7])  # per-sample steps: sigma = 1 (first), the last, and between
    B, shape = len(steps), (5, 16, 6, 7)
    u, c, x, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4))
    w = torch.tensor([1.0, 4.5, 7.0, 0.0, 2.5], dtype=torch.float64)
    a = 0.7
    coeffs = schedule.coefficients(sched.timesteps[steps], a, dtype=dtype)
    assert isinstance(coeffs, kernels.FlowCoefficients)
    args = [t.to(dtype) for t in (u, c, x)]
    x_next, lp = kernels.cfg_ddim_step(
        *args, w.to(dtype), coeffs, noise=z.to(dtype), return_log_prob=True, backend=backend
    )
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for b in range(B):
        v = u[b] + w[b] * (c[b] - u[b])
        ref_x, ref_lp = flow_grpo_reference(v, x[b], z[b], int(steps[b]), sched.sigmas.double(), a)
        torch.testing.assert_close(x_next[b].double(), ref_x, atol=tol * 10, rtol=tol)
        assert lp[b].item() == pytest.approx(ref_lp.item(), rel=tol, abs=tol)
    # op 2 recomputes the same log-prob from the stored step: the first importance ratio is 1
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3])
    loss, stats = kernels.ddpo_clip_loss(*args, x_next, w.to(dtype), coeffs, lp, adv, 1e-4, backend=backend)
    assert (stats["ratio"] - 1).abs().max().item() < 1e-6 and loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)


def test_noise_level_zero_is_the_schedulers_euler_step():
    """a = 0: each of 8 steps equals FlowMatchEulerDiscreteScheduler.step on the guided velocity, and no
    log-prob is defined (a one-line refusal naming the flag)."""
    n, B = 8, 3
    sched = flow_schedule(n)
    schedule = kernels.schedule_for(sched, n, "cpu")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 16, 8, 8, generator=g)
    w = torch.tensor([1.0, 3.0, 7.5])
    for t in sched.timesteps:
        u, c, z = (torch.randn(x.shape, generator=g) for _ in range(3))
        coeffs = schedule.coefficients(t.expand(B), 0.0)
        ours = kernels.cfg_ddim_step(u, c, x, w, coeffs, noise=z, backend="eager")
        ref = sched.step(u + w.view(-1, 1, 1, 1) * (c - u), t, x).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
        x = ref
    with pytest.raises(ValueError, match=r"noise level eta > 0 .*--eta 0.7") as e:
        kernels.cfg_ddim_step(u, c, x, w, coeffs, noise=z, return_log_prob=True)
    assert "\n" not in str(e.value)


def test_schedule_lookup_is_per_sample_and_leaves_the_scheduler_alone():
    sched = flow_schedule(6)
    before = sched.timesteps.clone()
    schedule = kernels.schedule_for(sched, 28, "cpu")  # a copy is set to 28 steps; the pipeline's stays at 6
    assert torch.equal(sched.timesteps, before) and len(schedule.timesteps) == 28
    ref = flow_schedule(28)
    torch.testing.assert_close(schedule.sigmas, ref.sigmas.double(), rtol=0, atol=0)
    perm = torch.tensor([27, 0, 13, 5])
    mixed = schedule.coefficients(ref.timesteps[perm], 0.7)
    for k, i in enumerate(perm):
        one = schedule.coefficients(ref.timesteps[i].reshape(1), 0.7)
        assert (mixed.c_x[k], mixed.c_eps[k], mixed.sigma[k]) == (one.c_x[0], one.c_eps[0], one.sigma[0])
    from diffusers import DDIMScheduler

    from tools.tiny import SD_SCHEDULER_CONFIG

    assert isinstance(kernels.schedule_for(DDIMScheduler(**SD_SCHEDULER_CONFIG), 50, "cpu"), kernels.DDIMSchedule)


@requires_triton
def test_triton_equals_eager_with_flow_coefficients():
    """Op 1 (values, log-prob, gradients) and op 2 (loss, stats, gradients) under the interpreter (or on the
    GPU) against the eager path, with flow-matching coefficients and several ragged blocks per row."""
    device = "cuda" if CUDA else "cpu"
    sched = flow_schedule(12)
    schedule = kernels.schedule_for(sched, 12, device)
    g = torch.Generator().manual_seed(3)
    B, shape = 4, (4, 16, 5, 7)
    coeffs = schedule.coefficients(sched.timesteps[torch.tensor([0, 11, 3, 6])].to(device), 0.7)
    out, x, z = (torch.randn(s, generator=g).to(device) for s in ((2 * B, *shape[1:]), shape, shape))
    w = torch.tensor([1.0, 2.0, 4.5, 0.0], device=device)
    moved = out + 1e-3 * torch.randn(out.shape, generator=g).to(device)  # the model a little after sampling
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5], device=device)
    old_block = op1.BLOCK_OVERRIDE
    op1.BLOCK_OVERRIDE = 128
    try:
        results = {}
        for backend in ("eager", "triton"):
            o, xx = out.clone().requires_grad_(), x.clone().requires_grad_()
            out_u, out_c = o.chunk(2)  # the two halves of one CFG call, as cfg_unet returns them
            x_next, lp = kernels.cfg_ddim_step(out_u, out_c, xx, w, coeffs, z, True, backend=backend)
            (x_next * torch.linspace(-1, 1, x_next.numel(), device=device).view_as(x_next)).sum().backward()
            o2 = moved.clone().requires_grad_()
            loss, stats = kernels.ddpo_clip_loss(
                *o2.chunk(2), x, x_next.detach(), w, coeffs, lp.detach(), adv, 1e-3, backend=backend
            )
            loss.backward()
            results[backend] = (x_next, lp, o.grad, xx.grad, loss, stats["ratio"], o2.grad)
    finally:
        op1.BLOCK_OVERRIDE = old_block
    for name, e, t in zip(("x_next", "log_prob", "d out", "d x", "loss", "ratio", "d out (loss)"), *results.values()):
        torch.testing.assert_close(t, e, atol=2e-5, rtol=2e-5, msg=name)
    assert results["eager"][-1].abs().max() > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flow_coefficients_do_not_sync_with_the_host():
    sched = flow_schedule(28)
    schedule = kernels.schedule_for(sched, 28, "cuda")
    timesteps = sched.timesteps.cuda()
    schedule.coefficients(timesteps[:1].expand(4), 0.7)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in timesteps:
            co = schedule.coefficients(t.expand(4), 0.7)
        co = schedule.coefficients(timesteps[torch.randperm(28, device="cuda")[:4]], 0.7)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(co.c_x).all() and (co.sigma > 0).all()


# ---------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize(
    "which, guidance, px", [("t5", 5.0, 32), ("no_t5", 5.0, 32), ("t5", 1.0, 32), ("t5", 4.0, 48), ("sd35", 5.0, 32)]
)
def test_generate_equals_the_sd3_pipeline(which, guidance, px, request):
    """diffusion.generate (Euler ODE, eta = 0) == StableDiffusion3Pipeline on the same initial latents, steps,
    guidance and CFG negative (the encoded ""), two prompts in one batch; guidance 1 takes the
    conditional-only shortcut as the pipeline does; also away from the native size, and on a transformer
    with SD3.5's changes (RMS-normalised queries and keys, a dual-attention block)."""
    directory = request.getfixturevalue(DIRS[which])
    pipe = {"t5": "pipe", "no_t5": "pipe_no_t5"}
    pipe = request.getfixturevalue(pipe[which]) if which in pipe else diffusion.load_pipeline(str(directory))
    oracle = oracle_pipeline(directory)
    cond = diffusion.TextConditioner(pipe, px).encode(PROMPTS)
    ours = diffusion.generate(
        pipe, cond, torch.full((4,), guidance), 4, torch.Generator().manual_seed(3), resolution=px
    )
    latents = torch.randn(2, 16, px // 2, px // 2, generator=torch.Generator().manual_seed(3))
    images = oracle(
        prompt=PROMPTS,
        guidance_scale=guidance,
        num_inference_steps=4,
        latents=latents,
        output_type="pt",
        height=px,
        width=px,
    ).images
    assert ours.shape == (2, 3, px, px)
    torch.testing.assert_close(ours, images, atol=1e-5, rtol=1e-4)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts give different images


def test_generate_with_noise_is_the_sde_and_decode_applies_the_vae_shift(pipe, text):
    cond = text.encode(PROMPTS)
    ode = diffusion.generate(pipe, cond, torch.full((3,), 4.0), 3, torch.Generator().manual_seed(0))
    sde = diffusion.generate(pipe, cond, torch.full((3,), 4.0), 3, torch.Generator().manual_seed(0), eta=0.7)
    again = diffusion.generate(pipe, cond, torch.full((3,), 4.0), 3, torch.Generator().manual_seed(0), eta=0.7)
    assert torch.equal(sde, again) and (sde - ode).abs().max() > 1e-3
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipe.vae.decode(z / 1.5305 + 0.0609).sample / 2 + 0.5
        torch.testing.assert_close(diffusion.decode(pipe, z), ref.clamp(0, 1))


def test_add_lora_adapts_both_streams_of_the_joint_attention(tiny_sd35_dir):
    pipe = diffusion.load_pipeline(str(tiny_sd35_dir))
    model = diffusion.denoiser(pipe)
    params = diffusion.add_lora(model, rank=4, alpha=4)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(p.dtype == torch.float32 for p in params) and all("lora" in n for n in names)
    for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
        assert any(f"attn.{proj}.lora_A" in n for n in names), proj
    assert any("attn2.to_q.lora_A" in n for n in names)  # SD3.5 Medium's image-only attention too
    text = diffusion.TextConditioner(pipe)
    x, t, cond = torch.randn(1, 16, 16, 16), torch.tensor([500.0]), text.encode(["a cat"])
    with torch.no_grad():
        before = diffusion.denoise(model, x, t, cond)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
        after = diffusion.denoise(model, x, t, cond)
    assert (after - before).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# DiffExp on SD3


def test_word_positions_in_all_three_tokenizers(text):
    """'zorblax' is 3 CLIP BPE tokens and one T5 piece; 'hedgehog' one CLIP token and 7 T5 pieces; 'wow!!'
    is 2 tokens for CLIP-L, 3 for CLIP-G ('!' is special there) and 4 for T5, which has no BOS."""
    prompt = "wow!! a zorblax hedgehog"
    expected = [
        {"zorblax": [4, 5, 6], "hedgehog": [7]},
        {"zorblax": [5, 6, 7], "hedgehog": [8]},
        {"zorblax": [6], "hedgehog": [7, 8, 9, 10, 11, 12, 13]},
    ]
    for tokenizer, length, want in zip(text.tokenizers, text.max_lengths, expected):
        words = word_token_positions(prompt, tokenizer, length)
        assert {w: p for w, p in words if w in want} == want
        ids = tokenizer(prompt).input_ids  # independent of the word-by-word count: the full tokenisation
        for word, positions in words:
            assert [ids[p] for p in positions] == tokenizer(word, add_special_tokens=False).input_ids
        specials = set(tokenizer.all_special_ids) - {0}  # CLIP-G's '!' pad (id 0) is special yet in the text
        assert [p for _, pos in words for p in pos] == [p for p, i in enumerate(ids) if i not in specials]
    choices = choose_words(
        [prompt] * 32, text.tokenizers, torch.Generator().manual_seed(0), max_lengths=text.max_lengths
    )
    picked = {c.word: (c.positions, c.positions_2, c.positions_3) for c in choices}
    assert picked["zorblax"] == ([4, 5, 6], [5, 6, 7], [6]) and picked["hedgehog"] == ([7], [8], list(range(7, 14)))
    assert choices[0].record()["positions_3"] == choices[0].positions_3


def test_t5_truncation_keeps_positions_inside_its_256_tokens(text):
    long_prompt = " ".join(["hedgehog"] * 40)  # 280 T5 pieces: truncated at 255 + '</s>'
    words = word_token_positions(long_prompt, text.tokenizers[2], text.max_lengths[2])
    assert max(p for _, pos in words for p in pos) == 254
    assert words[36][1] == list(range(252, 255)) and words[37][1] == []


def test_prompt_weighting_blends_every_encoder_at_its_own_positions(text):
    prompt = "wow!! a zorblax hedgehog"
    cond = text.encode([prompt] * 32)
    choices = choose_words(
        [prompt] * 32, text.tokenizers, torch.Generator().manual_seed(0), max_lengths=text.max_lengths
    )
    w = 1.7
    b = next(k for k, c in enumerate(choices) if c.word == "hedgehog")
    choices[b].weight = w
    e, e0 = cond.embeds[b], text.empty.embeds[0]
    expected = e.clone()  # by hand: CLIP-L's columns at row 7, CLIP-G's at row 8, T5's rows 77 + 7..13
    blend = lambda r, cols: e0[r, cols] + w * (e[r, cols] - e0[r, cols])  # noqa: E731
    expected[7, :32] = blend(7, slice(0, 32))
    expected[8, 32:96] = blend(8, slice(32, 96))
    expected[84:91, :] = blend(slice(84, 91), slice(None))
    out = apply_prompt_weights(cond.embeds[b : b + 1], e0, [choices[b]], parts=text.parts)[0]
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out[84:91], e[84:91])  # T5's rows really move (so the check can fail)

    # through diffexp_conditioning, as a trainer calls it: the same choice, pooled untouched unless asked
    cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w))
    one = text.encode(["a zorblax hedgehog"])
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    out_cond, _, rec = diffexp_conditioning(
        cfg, True, ["a zorblax hedgehog"], one, text, torch.tensor([1000.0]), 1000, g()
    )
    redo = apply_prompt_weights(one.embeds, e0, rec, parts=text.parts)
    assert rec[0].positions_3 and torch.equal(out_cond.embeds, redo) and torch.equal(out_cond.pooled, one.pooled)
    pooled_cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w), prompt_weight_pooled=True)
    out_cond, _, _ = diffexp_conditioning(
        pooled_cfg, True, ["a zorblax hedgehog"], one, text, torch.tensor([1000.0]), 1000, g()
    )
    torch.testing.assert_close(out_cond.pooled, text.empty.pooled + w * (one.pooled - text.empty.pooled))


def test_prompt_weighting_without_t5_leaves_the_zero_rows(pipe_no_t5):
    text = diffusion.TextConditioner(pipe_no_t5)
    assert len(text.tokenizers) == 2
    cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(2.0, 2.0))
    cond = text.encode(["a zorblax hedgehog"])
    out, _, rec = diffexp_conditioning(
        cfg, True, ["a zorblax hedgehog"], cond, text, torch.tensor([1000.0]), 1000, torch.Generator()
    )
    assert rec[0].positions_3 is None and "positions_3" not in rec[0].record()
    changed = (out.embeds[0] != cond.embeds[0]).any(-1).nonzero().flatten().tolist()
    assert changed == sorted(set(rec[0].positions) | set(rec[0].positions_2)) and max(changed) < 77


def sd_alpha_bar():
    from diffusers import DDIMScheduler

    from tools.tiny import SD_SCHEDULER_CONFIG

    return DDIMScheduler(**SD_SCHEDULER_CONFIG).alphas_cumprod.double()


@pytest.mark.parametrize("n, expected_low", [(28, 11), (50, 19)])
def test_cfg_schedule_on_sd3_matches_sds_noise_level(n, expected_low, text):
    """--t-sw 0.8 on SD3: w_low exactly on the steps whose SNR ((1 - sigma) / sigma)^2 is at most SD's
    alpha_bar / (1 - alpha_bar) at t = 800 (diffusers' own SD table); 11 of 28 and 19 of 50 steps, the
    numbers the notes give."""
    sched = flow_schedule(n)
    ab = sd_alpha_bar()[800]
    sigma = sched.sigmas[:-1].double()
    want = ((1 - sigma) / sigma) ** 2 <= ab / (1 - ab) * (1 + 1e-6)
    low = low_guidance_steps(sched.timesteps, sched, 0.8)
    assert low.tolist() == want.tolist() and int(low.sum()) == expected_low
    # the same through diffexp_conditioning, which reads the scheduler from the TextConditioner's pipeline
    cfg = DiffExpConfig(prompt_weighting=False, t_sw=0.8, w_low=1.0, w_high=7.5)
    _, guidance, _ = diffexp_conditioning(
        cfg, True, ["a cat"], text.encode(["a cat"]), text, sched.timesteps, 1000, torch.Generator()
    )
    assert guidance.tolist() == [1.0 if lo else 7.5 for lo in want.tolist()]
    line = describe_cfg_schedule(sched.timesteps, sched, 0.8, 1.0, 7.5)
    assert "\n" not in line and f"on {expected_low} of {n} steps" in line and "sigma >= 0.836" in line


def test_cfg_schedule_endpoints_on_sd3_and_unchanged_on_sd():
    from diffusers import DDIMScheduler

    from tools.tiny import SD_SCHEDULER_CONFIG

    sched = flow_schedule(28)
    assert (
        low_guidance_steps(sched.timesteps, sched, 0.0).all()
        and not low_guidance_steps(sched.timesteps, sched, 1.0).any()
    )
    ddim = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    ddim.set_timesteps(50)
    for t_sw in (0.0, 0.35, 0.8, 1.0):
        plain = cfg_scales(ddim.timesteps, 1000, t_sw, 1.0, 7.5)
        assert torch.equal(cfg_scales(ddim.timesteps, 1000, t_sw, 1.0, 7.5, scheduler=ddim), plain)
        assert low_guidance_steps(ddim.timesteps, ddim, t_sw).tolist() == (ddim.timesteps >= t_sw * 1000).tolist()
    assert "on 10 of 50 steps (t >= t_sw*T = 800: t 981 .. t 801)" in describe_cfg_schedule(
        ddim.timesteps, ddim, 0.8, 1, 5
    )


def test_ddpo_ratio_is_one_on_sd3_with_diffexp(pipe, text):
    """The consistency rule on SD3, the way a trainer runs it: sample with DiffExp (prompt weighting, w_low = 1
    on the noisy steps, i.e. the conditional-only shortcut) and the stochastic flow step, then recompute each
    stored step's log-prob with per-sample shuffled timesteps (mixed guidance in one call): ratio 1. With the
    unweighted prompts instead, or with w_high on every step, it is not (so the check can fail)."""
    n, B, eta = 4, 2, 0.7
    pipe.scheduler.set_timesteps(n)
    timesteps = pipe.scheduler.timesteps
    schedule = kernels.schedule_for(pipe.scheduler, n, "cpu")
    model = diffusion.denoiser(pipe)
    prompts = ["a zorblax hedgehog", "a red dog"]
    plain = text.encode(prompts)
    cfg = DiffExpConfig(t_sw=0.8, w_low=1.0, w_high=5.0, prompt_weight_range=(1.8, 1.8))
    cond, guidance, _ = diffexp_conditioning(cfg, True, prompts, plain, text, timesteps, 1000, torch.Generator())
    assert guidance.tolist() == [1.0, 1.0, 5.0, 5.0]  # sigmas 1, 0.858 | 0.602, 0.009
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(n + 1, B, 16, 16, 16, generator=g)
    x, latents, log_probs = noise[0], [noise[0]], []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            u, c = diffusion.cfg_unet(model, x, t, cond, text.negative, float(guidance[i]))
            co = schedule.coefficients(t.expand(B), eta)
            x, lp = kernels.cfg_ddim_step(u, c, x, guidance[i].expand(B), co, noise=noise[i + 1], return_log_prob=True)
            latents.append(x)
            log_probs.append(lp)
    latents, log_probs = torch.stack(latents, 1), torch.stack(log_probs, 1)
    perm = torch.tensor([[3, 0, 2, 1], [1, 2, 0, 3]])
    rows = torch.arange(B)

    def worst_ratio(c_train, scales=guidance):
        worst = 0.0
        for j in range(n):
            idx = perm[:, j]
            t, w = timesteps[idx], scales[idx]
            x_t, x_prev = latents[rows, idx], latents[rows, idx + 1]
            with torch.no_grad():
                u, c = diffusion.cfg_unet(model, x_t, t, c_train, text.negative, w)
            co = schedule.coefficients(t, eta)
            _, stats = kernels.ddpo_clip_loss(u, c, x_t, x_prev, w, co, log_probs[rows, idx], torch.ones(B), 1e-4)
            worst = max(worst, (stats["ratio"] - 1).abs().max().item())
        return worst

    assert worst_ratio(cond) < 1e-6
    # the tiny random transformer listens to its text only a little: a wrong prompt moves the ratio by ~5e-5
    assert worst_ratio(plain) > 1e-5 and worst_ratio(cond, torch.full((n,), 5.0)) > 1e-4
