"""SDXL: a tiny SDXL base built from config, saved in the hub layout and loaded through
diffusion.load_pipeline, against diffusers' own StableDiffusionXLPipeline as the oracle."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import diffusion
import rundir
from conftest import ROOT, lora_weights, read_log, run_main, run_script
from explore import DiffExpConfig, PromptWeight, apply_prompt_weights, choose_words, diffexp_conditioning


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tools.tiny import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_dir):
    return diffusion.load_pipeline(str(tiny_sdxl_dir))


def test_load_pipeline_gives_sdxl_with_sd_ddim(pipe):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from tools.tiny import SD_SCHEDULER_CONFIG

    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    sd = DDIMScheduler(**SD_SCHEDULER_CONFIG)  # DDIM from SDXL's Euler config is SD 1.5's DDIM
    for n in (4, 50):
        pipe.scheduler.set_timesteps(n)
        sd.set_timesteps(n)
        assert torch.equal(pipe.scheduler.timesteps, sd.timesteps)
    assert torch.equal(pipe.scheduler.alphas_cumprod, sd.alphas_cumprod)
    assert pipe.scheduler.final_alpha_cumprod == sd.final_alpha_cumprod
    assert not any(p.requires_grad for p in pipe.text_encoder_2.parameters())


def test_scheduler_config_without_ddim_keys_gets_sd_values(tmp_path, capfd):
    from tools.tiny import SDXL_SCHEDULER_CONFIG, make_tiny_sdxl

    config = {k: v for k, v in SDXL_SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
    out = make_tiny_sdxl(tmp_path / "m", scheduler_config=config)
    loaded = diffusion.load_pipeline(str(out))
    assert loaded.scheduler.config.clip_sample is False and loaded.scheduler.config.set_alpha_to_one is False
    assert "lacks clip_sample, set_alpha_to_one; using False" in capfd.readouterr().err


def test_conditioning_matches_the_pipelines_encode_prompt(pipe):
    text = diffusion.TextConditioner(pipe)
    prompts = ["a red dog", "wow!! a cat riding a bike"]
    cond = text.encode(prompts)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.pooled, pooled)
    assert cond.embeds.shape == (2, 77, 32 + 64) and text.widths == [32, 64]
    # CFG's negative is zeros (force_zeros_for_empty_prompt); DiffExp's e_empty is the encoding of ""
    assert torch.equal(text.negative.embeds, neg[:1]) and torch.equal(text.negative.pooled, neg_pooled[:1])
    assert text.empty.embeds.abs().max() > 0
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2


@pytest.mark.parametrize("eta,px", [(0.0, 32), (1.0, 32), (0.0, 64)])
def test_generate_equals_the_sdxl_pipeline(pipe, tiny_sdxl_dir, eta, px):
    """diffusion.generate == StableDiffusionXLPipeline with DDIM on the same noise (x_T, then each
    step's noise from the same generator), two different prompts in one batch; also away from the
    native size (time_ids follow the resolution, as --resolution 512 does on the real model)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    oracle = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    oracle.scheduler = DDIMScheduler.from_config(oracle.scheduler.config)
    oracle.set_progress_bar_config(disable=True)
    prompts = ["a red dog", "wow!! a cat riding a bike"]
    cond = diffusion.TextConditioner(pipe, px).encode(prompts)
    assert cond.time_ids[0].tolist() == [px, px, 0, 0, px, px]
    ours = diffusion.generate(
        pipe, cond, torch.full((4,), 5.0), 4, torch.Generator().manual_seed(3), eta=eta, resolution=px
    )

    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, px // 2, px // 2, generator=g)
    images = oracle(
        prompt_embeds=cond.embeds,
        pooled_prompt_embeds=cond.pooled,
        guidance_scale=5.0,
        num_inference_steps=4,
        eta=eta,
        generator=g,
        latents=latents,
        output_type="pt",
        height=px,
        width=px,
    ).images
    assert ours.shape == (2, 3, px, px)
    torch.testing.assert_close(ours, images, atol=1e-5, rtol=1e-4)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # the two prompts give different images


def test_prompt_weighting_blends_each_encoder_at_its_own_positions(pipe):
    """'wow!!' is 2 tokens for tokenizer 1 and 3 for tokenizer 2 ('!' is special there), so 'dog'
    sits at position 5 in the first encoder's half and 6 in the second's."""
    text = diffusion.TextConditioner(pipe)
    prompt = "wow!! a red dog"
    choice = choose_words([prompt] * 64, text.tokenizers, torch.Generator().manual_seed(0))
    dog = next(c for c in choice if c.word == "dog")
    assert dog.positions == [5] and dog.positions_2 == [6]

    e = text.encode([prompt]).embeds[0]
    e0 = text.empty.embeds[0]
    w = 1.7
    expected = e.clone()  # by hand: each half blended towards its own encoder's "" at its own position
    expected[5, :32] = e0[5, :32] + w * (e[5, :32] - e0[5, :32])
    expected[6, 32:] = e0[6, 32:] + w * (e[6, 32:] - e0[6, 32:])
    out = apply_prompt_weights(e[None], e0, [replace(dog, weight=w)], text.widths)[0]
    torch.testing.assert_close(out, expected)
    # the first tokenizer's position is not the second's: weighting the second half at 5 would differ
    assert not torch.allclose(out[5, 32:], e0[5, 32:] + w * (e[5, 32:] - e0[5, 32:]))

    # through diffexp_conditioning: the pooled embedding is untouched unless asked for
    cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w))
    cond = text.encode(["a red dog"])
    out_cond, _, rec = diffexp_conditioning(
        cfg, True, ["a red dog"], cond, text, torch.tensor([999, 1]), 1000, torch.Generator().manual_seed(0)
    )
    assert torch.equal(out_cond.pooled, cond.pooled) and not torch.equal(out_cond.embeds, cond.embeds)
    assert rec[0].record()["positions_2"] == rec[0].positions_2
    pooled_cfg = DiffExpConfig(cfg_schedule=False, prompt_weight_range=(w, w), prompt_weight_pooled=True)
    out_cond, _, _ = diffexp_conditioning(
        pooled_cfg, True, ["a red dog"], cond, text, torch.tensor([999, 1]), 1000, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out_cond.pooled, text.empty.pooled + w * (cond.pooled - text.empty.pooled))


def test_empty_choice_leaves_both_halves_alone(pipe):
    text = diffusion.TextConditioner(pipe)
    e = text.encode(["the a"]).embeds
    none = PromptWeight("the a", None, -1, positions_2=[])
    assert torch.equal(apply_prompt_weights(e, text.empty.embeds[0], [none], text.widths), e)


def test_fp16_keeps_the_sdxl_vae_in_float32(tiny_sdxl_dir):
    """SDXL's VAE overflows in fp16: under fp16 it stays float32 and decodes in float32 even inside autocast."""
    pipe16 = diffusion.load_pipeline(str(tiny_sdxl_dir), dtype=torch.float16)
    assert pipe16.unet.dtype == torch.float16 and pipe16.vae.dtype == torch.float32
    seen = []
    pipe16.vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.float16):
        images = diffusion.decode(pipe16, torch.randn(2, 4, 16, 16, dtype=torch.float16))
    assert seen == [torch.float32] and torch.isfinite(images).all()


def _fail_line(script, *args):
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines


def test_refiner_and_missing_text_encoder_fail_in_one_line(tiny_sdxl_dir, tmp_path):
    from tools.tiny import make_tiny_sdxl

    refiner = make_tiny_sdxl(tmp_path / "refiner", refiner=True)
    broken = tmp_path / "no-text-encoder"
    shutil.copytree(tiny_sdxl_dir, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["text_encoder"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    for directory in (refiner, broken):
        code, lines = _fail_line(
            "train_ddpo.py", "--pretrained", directory, "--reward", "jpeg", "--output-dir", tmp_path / "run"
        )
        assert code == 2 and len(lines) == 1 and "SDXL *base*" in lines[0], lines
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The trainers on tiny SDXL


def sdxl_args(tiny_sdxl_dir, out, *extra):
    return [
        "--pretrained",
        tiny_sdxl_dir,
        "--num-steps",
        4,
        "--mixed-precision",
        "no",
        "--eval-every",
        1,
        "--eval-num",
        2,
        "--output-dir",
        out,
        "--explore-frac",
        1.0,
        "--t-sw",
        0.5,
        "--num-epochs",
        1,
        *extra,
    ]


def test_ddpo_ratio_is_one_on_sdxl_and_breaks_with_other_pooled_or_time_ids(monkeypatch, tiny_sdxl_dir, tmp_path):
    """DiffExp on (CFG schedule with w_low = 1, i.e. the conditional-only shortcut, and prompt
    weighting): the training pass recomputes exactly the sampling log-probs. Feeding the training
    pass another pooled embedding or other time ids breaks that, so the check can fail."""

    import train_ddpo

    real = diffusion.cfg_unet

    def run(name, perturb=None):
        def patched(unet, x, t, cond, negative, guidance=None):
            if perturb is not None and torch.is_grad_enabled():  # the training pass only
                cond = perturb(cond)
            return real(unet, x, t, cond, negative, guidance)

        monkeypatch.setattr(diffusion, "cfg_unet", patched)
        argv = sdxl_args(tiny_sdxl_dir, tmp_path / name, "--reward", "jpeg", "--samples-per-epoch", 4, "--sample-batch-size", 2,
                         "--train-batch-size", 2, "--gradient-accumulation-steps", 2, "--eval-every", 0)  # fmt: skip
        monkeypatch.setattr(sys, "argv", ["train_ddpo.py", *map(str, argv)])
        train_ddpo.main(train_ddpo.cli())
        r = read_log(tmp_path / name)[-1]
        return max(abs(r["ratio_min"] - 1), abs(r["ratio_max"] - 1))

    assert run("same") < 1e-4
    assert run("pooled", lambda c: replace(c, pooled=c.pooled.roll(1, 0) + 0.5)) > 1e-3
    assert run("time_ids", lambda c: replace(c, time_ids=c.time_ids * 2)) > 1e-3


def test_alignprop_lora_loads_in_sdxl_pipeline_and_resumes(tiny_sdxl_dir, tmp_path):
    """One epoch of AlignProp on tiny SDXL (alpha != rank), then StableDiffusionXLPipeline's
    load_lora_weights gives the UNet we trained; --resume continues the run; sample.py loads it."""
    from diffusers import StableDiffusionXLPipeline

    from tiny_rewards import make_tiny_aesthetic, make_tiny_clip

    out = tmp_path / "run"
    clip, mlp = make_tiny_clip(tmp_path / "clip"), make_tiny_aesthetic(tmp_path / "mlp", dim=32)
    common = ["--reward", "aesthetic", "--reward-models", "aesthetic_clip", clip, "aesthetic_model", mlp, "--samples-per-epoch", 2,
              "--batch-size", 2, "--gradient-accumulation-steps", 1, "--lora-rank", 4, "--lora-alpha", 16, "--lr", 1e-2]  # fmt: skip
    run_main("train_alignprop.py", *sdxl_args(tiny_sdxl_dir, out, *common))
    ckpt = out / "checkpoints" / "epoch_0000"
    assert (out / "eval" / "epoch_0000" / "000.png").exists()  # the evaluation after epoch 0 = checkpoints/epoch_0000

    oracle = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    oracle.load_lora_weights(ckpt)
    ours = diffusion.load_pipeline(str(tiny_sdxl_dir))
    diffusion.add_lora(ours.unet, rank=4, alpha=16)
    rundir.load_checkpoint(ckpt, ours.unet)
    base = diffusion.load_pipeline(str(tiny_sdxl_dir)).unet
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    cond = diffusion.TextConditioner(ours).encode(["a cat"])
    with torch.no_grad():
        a, b, c = (u(x, t, **cond.unet_kwargs()).sample for u in (oracle.unet, ours.unet, base))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-5  # the LoRA does something
    assert any(v.abs().max() > 0 for k, v in lora_weights(ckpt).items() if "lora_B" in k or "lora.up" in k)

    # The resume in a fresh process, as a user runs it.
    run_script("train_alignprop.py", *sdxl_args(tiny_sdxl_dir, out, *common, "--num-epochs", 2, "--resume"))
    assert [r["epoch"] for r in read_log(out)] == [-1, 0, 1]

    samples = tmp_path / "samples"
    run_main("sample.py", "generate", "--pretrained", tiny_sdxl_dir, "--lora", out / "checkpoints" / "epoch_0001", "--prompt", "a cat",
               "--num-steps", 2, "--output-dir", samples)  # fmt: skip
    assert (samples / "grid.png").exists()
