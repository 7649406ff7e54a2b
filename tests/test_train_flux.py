"""Both trainers and sample.py on FLUX.1, end to end: the tiny FLUX.1-dev / -schnell of conftest (built from config,
saved in the hub layout, loaded by diffusion.load_pipeline) at 32 px with 3 steps, trained in this process."""

import json
import math
import statistics
import sys

import numpy as np
import pytest
import torch

import diffusion
import rundir
from conftest import lora_weights, read_log, run_main


def flux_args(directory, out, *extra):
    return [
        "--pretrained", directory, "--resolution", 32, "--num-steps", 3, "--mixed-precision", "no", "--eval-every", 0,
        "--output-dir", out, "--explore-frac", 1.0, "--t-sw", 0.5, "--num-epochs", 1, *extra,
    ]  # fmt: skip


DDPO = ["--reward", "jpeg", "--samples-per-epoch", 4, "--sample-batch-size", 2, "--train-batch-size", 2,
        "--gradient-accumulation-steps", 2]  # fmt: skip


def train(monkeypatch, trainer: str, argv):
    """trainer.main(trainer.cli()) in this process, as `python train_X.py ARGV` would run it."""
    module = __import__(trainer)
    monkeypatch.setattr(sys, "argv", [f"{trainer}.py", *map(str, argv)])
    module.main(module.cli())


def sigma_rule(n: int, px: int, t_sw: float, vae_factor: int = 2) -> list[bool]:
    """Whether each of FLUX.1-dev's n steps at px pixels runs at w_low, by hand in float64: FluxPipeline's sigmas
    linspace(1, 1/n, n) shifted with mu (linear in the token count (px / vae / 2)^2 from 0.5 at 256 to 1.15 at
    4096) and compared with sigma_sw, the sigma with SD's SNR at t* = ceil(t_sw * 1000)."""
    mu = 0.5 + (1.15 - 0.5) * ((px // vae_factor // 2) ** 2 - 256) / (4096 - 256)
    sigmas = [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1, 1 / n, n)]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ab = float(torch.cumprod(1 - betas, 0)[math.ceil(t_sw * 1000)])
    return [s >= 1 / (1 + math.sqrt(ab / (1 - ab))) for s in sigmas]


@pytest.mark.parametrize("case", ["diffexp off", "other g"])
def test_ddpo_ratio_on_flux_with_diffexp_off_and_with_another_guidance_input(monkeypatch, tiny_flux_dir, tmp_path, case):  # fmt: skip
    """The consistency rule with the guidance as the model's input: with DiffExp off (--explore-frac 0: g = 3.5
    everywhere, unweighted prompts) the ratio is 1 before the first update; giving the training pass's
    transformer another g (each sample's scale + 1.5) moves it off 1 by more than 1e-3 (measured: 0.014) — so
    the DiffExp-on run of test_ddpo_groups_kl_and_ema_on_flux, whose ratio is 1, does feed every step its own g."""
    real = diffusion.denoise

    def patched(model, x, t, cond, guidance=None):
        if case == "other g" and torch.is_grad_enabled():  # the training pass only
            guidance = torch.as_tensor(guidance).to(x.device) + 1.5
        return real(model, x, t, cond, guidance)

    monkeypatch.setattr(diffusion, "denoise", patched)
    extra = ["--explore-frac", 0.0] if case == "diffexp off" else []
    train(monkeypatch, "train_ddpo", flux_args(tiny_flux_dir, tmp_path / "run", *DDPO, "--lr", 0, *extra))
    r = read_log(tmp_path / "run")[-1]
    off = max(abs(r["ratio_min"] - 1), abs(r["ratio_max"] - 1))
    assert r["exploring"] is (case == "other g")
    assert off < 1e-5 if case == "diffexp off" else off > 1e-3


def test_ddpo_groups_kl_and_ema_on_flux(monkeypatch, tiny_flux_dir, tmp_path):
    """DiffExp on (w_low 1 on 2 of 3 steps, w_high FLUX's 3.5, prompt weighting at T5 positions) with --group-size
    2, --kl-beta 0.1 and --ema-decay 0.5, 2 epochs of one optimizer step each: the ratio is 1 before each update
    (every step recomputed with its own g and the weighted T5 states); the groups are prompts drawn twice in a row
    with advantages (r - group mean) / (group std + 1e-4) by hand; the KL to the LoRA-off reference is 0 before
    the first update and positive after it; the EMA made 2 updates and is saved in the checkpoint."""
    import train_ddpo

    seen = []
    real_groups = train_ddpo.group_advantages

    def groups(rewards, group_of, *args, **kwargs):
        seen.append(np.array(rewards))
        return real_groups(rewards, group_of, *args, **kwargs)

    monkeypatch.setattr(train_ddpo, "group_advantages", groups)
    argv = flux_args(tiny_flux_dir, tmp_path / "run", *DDPO, "--lr", 1e-2, "--num-epochs", 2, "--group-size", 2,
                     "--kl-beta", 0.1, "--ema-decay", 0.5)  # fmt: skip
    train(monkeypatch, "train_ddpo", argv)
    log = read_log(tmp_path / "run")[1:]  # after the start record (epoch -1)
    assert [r["kl"] > 0 for r in log] == [False, True] and log[0]["kl"] == 0.0
    for record, rewards in zip(log, seen, strict=True):
        assert max(abs(record["ratio_min"] - 1), abs(record["ratio_max"] - 1)) < 1e-5
        assert record["w_low_share"] == pytest.approx(2 / 3) and record["exploring"]
        weights = record["prompt_weights"]
        assert all(p["word"] and p["positions"] and "positions_2" not in p for p in weights)  # T5's positions only
        prompts = [p["prompt"] for p in weights]
        assert prompts[0] == prompts[1] and prompts[2] == prompts[3]
        by_hand = [(r - statistics.fmean(rewards[g : g + 2])) / (statistics.pstdev(rewards[g : g + 2]) + 1e-4)
                   for g in (0, 2) for r in rewards[g : g + 2]]  # fmt: skip
        np.testing.assert_allclose(record["advantages"], by_hand, rtol=1e-4, atol=1e-5)  # float32 rewards 2e-3 apart
    state = torch.load(tmp_path / "run" / "checkpoints" / "epoch_0001" / "training_state.pt")
    assert state["ema"]["steps"] == 2
    lora = lora_weights(tmp_path / "run" / "checkpoints" / "epoch_0001")
    assert lora.keys() == lora_weights(tmp_path / "run" / "checkpoints" / "epoch_0001" / "ema").keys()


@pytest.mark.parametrize("trainer", ["train_ddpo", "train_alignprop"])
def test_guidance_input_per_step_is_the_documented_switch(monkeypatch, tiny_flux_dir, tiny_aesthetic, tmp_path, trainer):  # fmt: skip
    """What FLUX.1-dev's transformer receives as its guidance input on each sampling step of a trainer: w_low where
    the shifted sigma of the run's resolution is at least sigma_sw (sigma_rule, by hand), w_high after, for
    every sample, in one call per step (no unconditional branch)."""
    n, t_sw, w_low, w_high = 6, 0.8, 2.0, 5.0
    seen = []
    real = diffusion.load_pipeline

    def load(*args, **kwargs):  # the run's transformer, with a hook that records what each call gets
        pipe = real(*args, **kwargs)
        record = lambda m, a, k: seen.append(
            (1000 * k["timestep"][0].item(), k["guidance"].tolist(), len(k["hidden_states"]))
        )  # noqa: E731
        pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
        return pipe

    monkeypatch.setattr(diffusion, "load_pipeline", load)
    shape = ["--sample-batch-size", 2, "--train-batch-size", 2] if trainer == "train_ddpo" else ["--batch-size", 2]
    extra = ["--gradient-checkpointing", "none"] if trainer == "train_alignprop" else []  # no recomputed calls
    reward = ["--reward", "jpeg"] if trainer == "train_ddpo" else ["--reward", "aesthetic", *tiny_aesthetic]
    argv = flux_args(tiny_flux_dir, tmp_path / "run", *reward, "--samples-per-epoch", 2, "--gradient-accumulation-steps", 1,
                     "--num-steps", n, "--t-sw", t_sw, "--w-low", w_low, "--w-high", w_high, "--lr", 0, *shape, *extra)  # fmt: skip
    train(monkeypatch, trainer, argv)
    expected = [w_low if low else w_high for low in sigma_rule(n, 32, t_sw)]
    assert w_low in expected and w_high in expected  # the switch falls inside the run
    pipe_timesteps, _ = diffusion.sampling_schedule(real(str(tiny_flux_dir)), n, 32)
    sampling = seen[:n]  # the first batch's trajectory, step by step
    assert [t for t, _, _ in sampling] == pytest.approx(pipe_timesteps.tolist(), rel=1e-5)
    assert [g for _, g, _ in sampling] == [[w, w] for w in expected] and {b for _, _, b in sampling} == {2}
    assert read_log(tmp_path / "run")[-1]["w_low_share"] == pytest.approx(expected.count(w_low) / n)


def test_alignprop_on_flux_lora_loads_in_the_flux_pipeline_and_sample_uses_it(monkeypatch, tiny_flux_dir, tiny_aesthetic, tmp_path):  # fmt: skip
    """AlignProp on FLUX.1-dev end to end (differentiable tiny aesthetic reward, DiffExp on, 2 steps, an evaluation
    after the epoch), its checkpoint read by FluxPipeline.load_lora_weights (alpha != rank) gives the transformer
    the project's loader gives, which is not the base one; sample.py generate without DiffExp writes the images
    FluxPipeline makes from the same seed (packed), and with --lora other ones."""
    from diffusers import FluxPipeline
    from PIL import Image

    argv = flux_args(tiny_flux_dir, tmp_path / "run", "--reward", "aesthetic", *tiny_aesthetic, "--num-steps", 2,
                     "--samples-per-epoch", 2, "--batch-size", 2, "--gradient-accumulation-steps", 1, "--lora-rank", 4,
                     "--lora-alpha", 8, "--lr", 1e-2, "--eval-every", 1, "--eval-num", 2)  # fmt: skip
    train(monkeypatch, "train_alignprop", argv)
    log = read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [-1, 0] and math.isfinite(log[-1]["loss"]) and "eval_reward_mean" in log[-1]
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_0000"
    assert all(k.startswith("transformer.") for k in lora_weights(ckpt))

    oracle = FluxPipeline.from_pretrained(tiny_flux_dir)
    oracle.set_progress_bar_config(disable=True)
    base_image = oracle(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
                        latents=diffusion.pack_latents(torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)))).images  # fmt: skip
    oracle.load_lora_weights(ckpt)
    ours = diffusion.load_pipeline(str(tiny_flux_dir))
    diffusion.add_lora(ours.transformer, rank=4, alpha=8)
    rundir.load_checkpoint(ckpt, ours.transformer)
    base = diffusion.load_pipeline(str(tiny_flux_dir)).transformer
    x, t = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0])
    cond = diffusion.TextConditioner(ours, 32).encode(["a cat"])
    with torch.no_grad():
        got, mine, plain = (diffusion.denoise(m, x, t, cond, 3.5) for m in (oracle.transformer, ours.transformer, base))
    torch.testing.assert_close(got, mine, atol=1e-5, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the LoRA does something

    for name, extra in (("base", []), ("lora", ["--lora", str(ckpt)])):
        run_main("sample.py", "generate", "--pretrained", tiny_flux_dir, "--prompt", "a cat", "--num-steps", 2,
                 "--resolution", 32, "--output-dir", tmp_path / name, *extra)  # fmt: skip
    base_png, lora_png = (np.asarray(Image.open(tmp_path / n / "0000.png"), dtype=np.int16) for n in ("base", "lora"))
    pipeline_png = (
        (base_image[0].permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    )  # save_image's rounding
    assert np.array_equal(base_png, pipeline_png) and np.abs(base_png - lora_png).max() > 0


def test_schnell_trains_with_true_cfg_and_refuses_a_schedule_without_it(monkeypatch, tiny_flux_schnell_dir, tmp_path, capsys):  # fmt: skip
    """FLUX.1-schnell has no guidance input: a CFG schedule without --true-cfg is refused in one line before
    anything loads, naming both ways out; with --true-cfg the schedule acts on the true-CFG scale (w_low 1: the
    conditional-only shortcut, w_high 3.5: both halves) and DDPO's ratio is 1 before the update."""
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        train(monkeypatch, "train_ddpo", flux_args(tiny_flux_schnell_dir, tmp_path / "refused", *DDPO))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --cfg-schedule: ")
    assert "--no-cfg-schedule" in err[0] and "--true-cfg" in err[0] and not (tmp_path / "refused").exists()
    monkeypatch.undo()

    calls = []
    real = diffusion.denoise
    monkeypatch.setattr(diffusion, "denoise", lambda m, x, *a, **k: calls.append(len(x)) or real(m, x, *a, **k))
    train(monkeypatch, "train_ddpo", flux_args(tiny_flux_schnell_dir, tmp_path / "run", *DDPO, "--true-cfg", "--lr", 0))
    r = read_log(tmp_path / "run")[-1]
    assert max(abs(r["ratio_min"] - 1), abs(r["ratio_max"] - 1)) < 1e-5 and r["w_low_share"] == pytest.approx(2 / 3)
    assert calls[:3] == [2, 2, 4]  # sampling: sigmas 1, 2/3 at w_low = 1 (conditional half only), then both halves


@pytest.mark.parametrize(
    "script, argv, expected",
    [
        ("train_ddpo.py", ["--pretrained", "SD", "--true-cfg"], "error: --true-cfg: only FLUX.1 has a distilled guidance"),
        ("train_ddpo.py", ["--pretrained", "FLUX", "--resolution", 34], "error: --resolution 34 is not a multiple of 4, the VAE's downsampling factor (--pretrained FLUX, times 2 for FLUX's 2x2 latent patches)"),
        ("sample.py", ["generate", "--pretrained", "SD", "--true-cfg"], "error: --true-cfg: only FLUX.1"),
        ("sample.py", ["generate", "--pretrained", "SCHNELL", "--cfg-schedule"], "error: --cfg-schedule: this FLUX.1 transformer has no guidance input"),
        ("sample.py", ["generate", "--pretrained", "FLUX", "--resolution", 34, "--prompt", "a"], "error: --resolution must be a positive multiple of 4 (the VAE's downsampling factor, times 2"),
        ("sample.py", ["explore", "--pretrained", "SCHNELL", "--rewards", "jpeg", "--settings", "none", "pw", "cfg:w_low=0"], "error: --settings 'cfg:w_low=0': this FLUX.1 transformer has no guidance input"),
    ],
)  # fmt: skip
def test_flux_options_fail_in_one_line_before_loading(monkeypatch, tiny_flux_dir, tiny_flux_schnell_dir, tiny_sd3_dir, tmp_path, capsys, script, argv, expected):  # fmt: skip
    """Each new flag's wrong use (and FLUX's 2x2 resolution rule) is one `error:` line, exit 2, before a model loads."""
    names = {"SD": tiny_sd3_dir, "FLUX": tiny_flux_dir, "SCHNELL": tiny_flux_schnell_dir}
    argv = [str(names.get(a, a)) for a in argv]
    expected = expected.replace("--pretrained FLUX", f"--pretrained {tiny_flux_dir}")
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    if script != "sample.py":
        argv += ["--output-dir", str(tmp_path / "out"), "--reward", "jpeg"]
    else:
        argv += ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        run_main(script, *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists()


def test_explore_runs_on_flux(tiny_flux_dir, tmp_path):
    """sample.py explore on FLUX.1-dev: --w-high's FLUX default (3.5) is every setting's w_high, so 'cfg:w_low=3.5'
    samples as 'none' does, bit for bit (the same starting noise); a schedule that switches (g = 1 on the noisy
    steps) and prompt weighting at T5 positions each give other images."""
    import sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog sleeping\n")
    settings = ("none", "cfg:w_low=3.5", "cfg:t_sw=0.5", "pw")
    result = sample.explore(pretrained=str(tiny_flux_dir), prompts=str(prompts), rewards="jpeg", settings=settings,
                            num_steps=3, num_per_prompt=2, batch_size=4, resolution=32, output_dir=str(tmp_path / "out"))  # fmt: skip
    emb = result["embeddings"]
    assert emb["none"].shape == (2, 2, 3 * 32 * 32) and torch.equal(emb["cfg:w_low=3.5"], emb["none"])
    for other in ("cfg:t_sw=0.5", "pw"):
        assert (emb[other] - emb["none"]).abs().flatten(2).amax(2).min() > 0, other
    info = {s["setting"]: s for s in json.loads((tmp_path / "out" / "explore.json").read_text())["settings"]}
    assert {s["w_high"] for s in info.values()} == {3.5} and info["cfg:t_sw=0.5"]["steps_at_w_low"] == 2
    assert all(w.word for w in result["choices"]["pw"].values())
