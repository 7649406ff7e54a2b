"""Tests that bite: one per bug that was placed by hand in the newer code and passed the suite. Each compares
what the code did with an independent computation (a hand-rolled EMA, the loss rebuilt from its parts, the
scales evaluation sampled with, diffusers' own alpha_bar), not with another run of the same code. Each was
seen to fail with its bug placed by hand (the docstrings say which bug and how it showed).

The DDPO run most of them read is made once (module fixture) with spies on what the trainer hands to
backward, to the clipped loss and to the KL, on the lock during every epoch, and on what evaluation samples."""

import fcntl
import math
import os
import sys
import types

import pytest
import torch

import diffusion
import kernels
import rundir
import runs
import sample
import train_ddpo
from conftest import read_log, run_main

W_LOW, W_HIGH, KL_BETA, EMA_DECAY = 1.0, 5.0, 0.3, 0.5


def lock_is_held(path) -> bool:
    """Whether a process holds `path`'s flock (this one included: flock conflicts across open files)."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog\n")  # every prompt has a word to weight
    return path


@pytest.fixture(scope="module")
def spied_ddpo(tiny_sd_dir, prompts_file, tmp_path_factory):
    """DDPO, 4 epochs of one optimizer step, DiffExp for the first half (--explore-frac 0.5), a KL penalty, an
    EMA, evaluation every 2 epochs, every checkpoint kept."""
    import accelerate

    out = tmp_path_factory.mktemp("ddpo") / "run"
    seen = {"backward": [], "clip": [], "kl": [], "lock": [], "eval": []}
    real = {"backward": accelerate.Accelerator.backward, "clip": kernels.ddpo_clip_loss,
            "kl": train_ddpo.equal_variance_kl, "end_epoch": runs.Run.end_epoch, "generate": diffusion.generate}  # fmt: skip

    def backward(self, loss, **kwargs):
        seen["backward"].append(loss.detach().double())
        return real["backward"](self, loss, **kwargs)

    def clip(*args, **kwargs):
        loss, stats = real["clip"](*args, **kwargs)
        seen["clip"].append(loss.detach().double())
        return loss, stats

    def kl(mean, ref_mean, sigma):
        seen["kl"].append([t.detach().double().clone() for t in (mean, ref_mean, sigma)])
        return real["kl"](mean, ref_mean, sigma)

    def end_epoch(self, epoch, *args, **kwargs):
        seen["lock"].append((self.dir / ".lock").is_file() and lock_is_held(self.dir / ".lock"))
        return real["end_epoch"](self, epoch, *args, **kwargs)

    def generate(pipe, cond, guidance, num_steps, generator, eta, *args, **kwargs):
        seen["eval"].append((guidance.clone(), eta))
        return real["generate"](pipe, cond, guidance, num_steps, generator, eta, *args, **kwargs)

    argv = ["--pretrained", tiny_sd_dir, "--reward", "jpeg", "--prompts", prompts_file, "--num-steps", 2, "--num-epochs", 4,
            "--samples-per-epoch", 2, "--sample-batch-size", 2, "--train-batch-size", 2, "--gradient-accumulation-steps", 1,
            "--mixed-precision", "no", "--lr", 3e-2, "--t-sw", 0.5, "--w-low", W_LOW, "--w-high", W_HIGH, "--explore-frac", 0.5,
            "--kl-beta", KL_BETA, "--ema-decay", EMA_DECAY, "--eval-every", 2, "--eval-num", 1, "--keep-checkpoints", 0,
            "--output-dir", out]  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(accelerate.Accelerator, "backward", backward)
        mp.setattr(kernels, "ddpo_clip_loss", clip)
        mp.setattr(train_ddpo, "equal_variance_kl", kl)
        mp.setattr(runs.Run, "end_epoch", end_epoch)
        mp.setattr(diffusion, "generate", generate)
        proc = run_main("train_ddpo.py", *argv)
    return out, seen, proc


def test_the_loss_handed_to_backward_is_the_clipped_loss_plus_beta_kl(spied_ddpo):
    """loss = clip loss + beta * KL(policy || reference), KL recomputed here in float64 from the two step means
    and sigma the trainer compared: mean_CHW((mean - ref_mean)^2) / (2 sigma^2). Bug placed by hand: the KL
    term subtracted (loss - beta * kl): this test failed (the KL penalty rewarded drifting away)."""
    _, seen, _ = spied_ddpo
    steps = 2  # every denoising step is trained (--timestep-fraction 1), one batch per optimizer step
    assert len(seen["backward"]) == len(seen["clip"]) == len(seen["kl"]) == 4 * steps
    drifted = 0
    for handed, clip, (mean, ref_mean, sigma) in zip(seen["backward"], seen["clip"], seen["kl"]):
        kl = (mean - ref_mean).pow(2).flatten(1).mean(1) / (2 * sigma.reshape(-1) ** 2)
        torch.testing.assert_close(handed * steps, clip + KL_BETA * kl.mean(), rtol=1e-5, atol=1e-9)
        drifted += kl.mean().item() > 1e-8
    assert drifted > 0  # once the LoRA moved, the policy is away from the reference: the KL term is not 0


def test_lock_is_held_through_every_epoch(spied_ddpo):
    """The run holds --output-dir/.lock until its last epoch is saved. Bug placed by hand: the lock released
    when the first epoch starts (held.release() at the top of Run.epochs' loop): this test failed at epoch 0."""
    out, seen, _ = spied_ddpo
    assert seen["lock"] == [True] * 4
    assert not (out / ".lock").exists()  # released at the end


def test_evaluation_samples_at_w_high_deterministically(spied_ddpo):
    """Held-out evaluation samples the model as it is used: constant w_high, eta 0, no DiffExp. Bug placed by
    hand: evaluation at w_low (Run.evaluate passing diffexp.w_low): this test failed."""
    _, seen, _ = spied_ddpo
    assert len(seen["eval"]) == 3  # before training, after epochs 1 and 3
    for guidance, eta in seen["eval"]:
        assert guidance.tolist() == [W_HIGH] * 2 and eta == 0.0


@pytest.mark.parametrize("trainer", ["ddpo", "alignprop"])
def test_diffexp_explores_the_first_explore_frac_of_the_epochs(
    trainer, spied_ddpo, tiny_sd_dir, tiny_aesthetic, prompts_file, tmp_path
):
    """With --explore-frac 0.5 of 4 epochs, epochs 0 and 1 sample with a weighted word (and the w_low steps),
    2 and 3 plainly: read from what each sample recorded, against the paper's rule epoch < frac * epochs.
    Bug placed by hand: AlignProp's loop with a hard-coded 0.75 (is_exploring(epoch, num_epochs, 0.75)): the
    alignprop case failed (epoch 2 weighted its words)."""
    if trainer == "ddpo":
        out = spied_ddpo[0]
    else:
        out = tmp_path / "run"
        run_main("train_alignprop.py", "--pretrained", tiny_sd_dir, "--reward", "aesthetic", *tiny_aesthetic, "--prompts", prompts_file,
                 "--num-steps", 2, "--num-epochs", 4, "--samples-per-epoch", 1, "--batch-size", 1, "--gradient-accumulation-steps", 1,
                 "--mixed-precision", "no", "--eval-every", 0, "--t-sw", 0.5, "--explore-frac", 0.5, "--output-dir", out)  # fmt: skip
    epochs = [r for r in read_log(out) if r["epoch"] >= 0]
    weighted = [all(p["word"] is not None for p in r["prompt_weights"]) for r in epochs]
    plain = [all(p["word"] is None for p in r["prompt_weights"]) for r in epochs]
    expected = [e < 0.5 * 4 for e in range(4)]
    assert weighted == expected and plain == [not x for x in expected]


def test_ddpo_ema_is_a_hand_rolled_ema_of_the_updated_weights(spied_ddpo, tiny_sd_dir):
    """ema_k = d ema_(k-1) + (1 - d) weights_k after each optimizer step, from the LoRA's initial weights,
    rolled here in float64 over the checkpoints' weights (one step per epoch). Bug placed by hand: DDPO's
    run.update_ema() before optimizer.step() (the EMA of the weights one step behind): this test failed."""
    out, _, _ = spied_ddpo
    pipe = diffusion.load_pipeline(str(tiny_sd_dir))
    torch.manual_seed(0)  # --seed: the LoRA's initialisation, as the trainer makes it
    params = diffusion.add_lora(pipe.unet, 4, 4.0)
    ema = [p.detach().double().clone() for p in params]
    for epoch in range(4):
        state = rundir.load_checkpoint(out / "checkpoints" / f"epoch_{epoch:04d}", pipe.unet)
        weights = [p.detach().double() for p in params]
        ema = [EMA_DECAY * e + (1 - EMA_DECAY) * w for e, w in zip(ema, weights)]
        assert state["ema"]["steps"] == epoch + 1
        for saved, expected in zip(state["ema"]["weights"], ema, strict=True):
            torch.testing.assert_close(saved.double(), expected, atol=1e-7, rtol=1e-6)
    assert max((e - w).abs().max().item() for e, w in zip(ema, weights)) > 1e-4  # the EMA is not the last weights


def test_the_printed_resume_command_never_overwrites(monkeypatch, tmp_path):
    """Ctrl-C prints the command that resumes the run: the same command with --resume and without
    --overwrite, which would delete the run. Bug placed by hand: only --resume filtered out of argv: this test
    failed (the printed command deleted what it meant to continue)."""
    monkeypatch.setattr(sys, "argv", ["train_ddpo.py", "--overwrite", "--output-dir", str(tmp_path), "--lr", "1e-3"])
    run = types.SimpleNamespace(log=object(), dir=tmp_path, epoch=3)  # what interrupted_line reads of a Run
    assert runs.Run.interrupted_line(run) == (
        f"interrupted in epoch 3: no checkpoint yet (--resume restarts it from scratch); continue with: "
        f"python train_ddpo.py --output-dir {tmp_path} --lr 1e-3 --resume"
    )


def test_generate_holds_its_output_dir(tiny_sd_dir, tmp_path, capsys):
    """Two generates at once into one --output-dir wrote into each other: its result is claimed under the
    lock. Bug placed by hand: rundir.claim without hold(): this test failed (the second generate ran)."""
    out = tmp_path / "gen"
    held = rundir.hold(out, "sample.py generate")  # another generate, still running (this process's own lock)
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            sample.main(
                [
                    "generate",
                    "--pretrained",
                    str(tiny_sd_dir),
                    "--prompt",
                    "a cat",
                    "--num-steps",
                    "2",
                    "--output-dir",
                    str(out),
                ]
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(
            f"error: --output-dir {out} is in use by process {os.getpid()} (sample.py generate"
        )
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        held.release()


def test_sigma_sw_has_the_snr_of_sds_t_star():
    """On a flow model DiffExp switches at sigma_sw, whose SNR ((1 - sigma) / sigma)^2 is SD's at t* = the first
    integer timestep >= t_sw * 1000, from diffusers' own DDPMScheduler with SD's schedule (float32 there, so
    to 1e-5; neighbouring timesteps differ by ~3e-3). Bug placed by hand: alpha_bar[t* - 1]: this test failed
    (the 3-decimal checks elsewhere did not)."""
    from diffusers import DDPMScheduler

    from explore import flow_switch_sigma

    ab = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod
    for t_sw in (0.8, 0.6, 0.37, 0.8005, 0.1, 0.999):
        t_star = math.ceil(round(t_sw * 1000, 6))
        snr = float(ab[t_star] / (1 - ab[t_star]))
        sigma = flow_switch_sigma(t_sw)
        assert ((1 - sigma) / sigma) ** 2 == pytest.approx(snr, rel=1e-5), t_sw
    assert flow_switch_sigma(0.0) == 0.0 and flow_switch_sigma(1.0) == math.inf


def test_ddpo_samples_sd3_at_flow_grpos_noise_level(tiny_sd3_dir, tmp_path, monkeypatch):
    """DDPO on SD3 without --eta samples and trains with the SDE noise level 0.7 (Flow-GRPO's; README and
    --help say so). Bug placed by hand: FlowMatchSchedule.stochastic_eta = 0.5: this test failed."""
    from kernels.cfg_ddim import FlowMatchSchedule

    etas, real = [], FlowMatchSchedule.coefficients

    def coefficients(self, timesteps, eta, *args, **kwargs):
        etas.append(eta)
        return real(self, timesteps, eta, *args, **kwargs)

    monkeypatch.setattr(FlowMatchSchedule, "coefficients", coefficients)
    run_main("train_ddpo.py", "--pretrained", tiny_sd3_dir, "--reward", "jpeg", "--num-steps", 2, "--num-epochs", 1,
             "--samples-per-epoch", 1, "--sample-batch-size", 1, "--train-batch-size", 1, "--gradient-accumulation-steps", 1,
             "--mixed-precision", "no", "--eval-every", 0, "--output-dir", tmp_path / "run")  # fmt: skip
    assert len(etas) >= 2 * 2 and set(etas) == {0.7}  # every sampling and every training step
