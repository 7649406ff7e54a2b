"""The GRPO-era options on the tiny SD pipeline, trained in this process: DDPO's --group-size (group
advantages) and --kl-beta (KL to the reference policy), with --timestep-fraction; both trainers'
--ema-decay / --ema-every. References are hand computations and closed forms written here."""

import math
import statistics
import sys

import numpy as np
import pytest
import torch

import diffusion
import rundir
import runs
import train_ddpo
from conftest import lora_weights, read_log
from train_ddpo import equal_variance_kl, group_advantages, group_prompts


def train(monkeypatch, trainer: str, argv):
    """trainer.main(trainer.cli()) in this process, as `python train_X.py ARGV` would run it."""
    module = __import__(trainer)
    monkeypatch.setattr(sys, "argv", [f"{trainer}.py", *map(str, argv)])
    module.main(module.cli())


def test_group_advantages_equal_a_hand_computation():
    rewards = np.array([1.0, 3.0, 10.0, 10.0, 0.0, 4.0, 8.0])
    groups = np.array([0, 0, 1, 1, 2, 2, 2])
    # by hand: group 0 has mean 2, std 1; group 1 two equal rewards (std 0: advantage 0, not a division
    # by zero); group 2 mean 4, std sqrt(((0-4)^2 + 0 + (8-4)^2) / 3) = sqrt(32/3)
    s2 = math.sqrt(32 / 3)
    expected = [-1 / 1.0001, 1 / 1.0001, 0.0, 0.0, -4 / (s2 + 1e-4), 0.0, 4 / (s2 + 1e-4)]
    np.testing.assert_allclose(group_advantages(rewards, groups), expected, rtol=1e-12, atol=1e-15)
    order = np.array([6, 0, 3, 1, 5, 2, 4])  # a group's members need not be next to each other
    np.testing.assert_allclose(group_advantages(rewards[order], groups[order]), np.array(expected)[order], rtol=1e-12)


def test_group_prompts_are_draws_repeated_in_a_row():
    prompts = ["cat", "dog", "owl", "fox", "yak"]
    drawn = group_prompts(prompts, 6, 3, torch.Generator().manual_seed(7))
    a, b = torch.randint(5, (2,), generator=torch.Generator().manual_seed(7)).tolist()
    assert drawn == [prompts[a]] * 3 + [prompts[b]] * 3


def test_equal_variance_kl_is_the_gaussian_kl_per_dimension():
    """Against torch.distributions' KL of two Normals (float64), averaged over C*H*W like the log-probs."""
    from torch.distributions import Normal, kl_divergence

    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(2, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    s = sigma.view(-1, 1, 1, 1)
    expected = kl_divergence(Normal(mean, s), Normal(ref, s)).flatten(1).mean(1)
    torch.testing.assert_close(equal_variance_kl(mean, ref, sigma).double(), expected, rtol=1e-6, atol=0)


def ddpo_argv(sd, out, *extra):
    """6 samples a process in 3 batches of 2, trained as 2 batches of 3 accumulated into one optimizer step
    per epoch (at its end): an epoch's training pass sees the policy that sampled."""
    return [
        "--pretrained", sd, "--reward", "jpeg", "--num-steps", 4, "--samples-per-epoch", 6, "--sample-batch-size", 2,
        "--train-batch-size", 3, "--gradient-accumulation-steps", 2, "--mixed-precision", "no", "--eval-every", 0,
        "--output-dir", out, "--explore-frac", 1.0, "--t-sw", 0.5, "--lr", 1e-2, *extra,
    ]  # fmt: skip


@pytest.fixture
def spies(monkeypatch):
    """Counts the denoiser's calls and records each call of train_ddpo.group_advantages."""
    seen = {"denoise": 0, "groups": []}
    real_denoise, real_groups = diffusion.denoise, train_ddpo.group_advantages

    def denoise(*args, **kwargs):
        seen["denoise"] += 1
        return real_denoise(*args, **kwargs)

    def groups(rewards, group_of, *args, **kwargs):
        out = real_groups(rewards, group_of, *args, **kwargs)
        seen["groups"].append((np.array(rewards), np.array(group_of), out))
        return out

    monkeypatch.setattr(diffusion, "denoise", denoise)
    monkeypatch.setattr(train_ddpo, "group_advantages", groups)
    return seen


def test_groups_kl_and_timestep_fraction_in_one_run(monkeypatch, spies, tiny_sd_dir, tmp_path):
    """--group-size 3 (group 0 spans sampling batches 0 and 1), --kl-beta 0.1 and --timestep-fraction 0.5 at
    once, 2 epochs: the groups are prompts drawn 3 times in a row and their advantages (r - group mean) /
    (group std + 1e-4), by hand; the KL to the reference is exactly 0 before the first update (LoRA B starts
    at 0) and positive after it; the ratio is still 1 before the first update; the KL costs one extra
    denoiser call per trained step, and --kl-beta 0 none."""
    train(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, tmp_path / "run", "--num-epochs", 2, "--group-size", 3,
                                               "--kl-beta", 0.1, "--timestep-fraction", 0.5))  # fmt: skip
    log = read_log(tmp_path / "run")[1:]
    sampling, trained = 3 * 4, 2 * 2  # per epoch: 3 batches x 4 steps; 2 training batches x 2 of the 4 steps
    assert spies["denoise"] == 2 * (sampling + 2 * trained)
    assert len(spies["groups"]) == 2
    for record, (rewards32, groups, _) in zip(log, spies["groups"]):
        # by hand in float64: float32 loses ~1e-5 to the cancellation in r - mean
        rewards = rewards32.astype(np.float64)
        prompts = [p["prompt"] for p in record["prompt_weights"]]
        assert prompts[:3] == [prompts[0]] * 3 and prompts[3:] == [prompts[3]] * 3
        assert groups.tolist() == [0, 0, 0, 1, 1, 1]
        assert record["reward_mean"] == pytest.approx(rewards.mean(), rel=1e-6)
        by_hand = [
            (r - statistics.fmean(rewards[g : g + 3])) / (statistics.pstdev(rewards[g : g + 3]) + 1e-4)
            for g in (0, 3)
            for r in rewards[g : g + 3]
        ]
        assert rewards[:3].std() > 1e-3 and rewards[3:].std() > 1e-3  # the normalisation does something
        assert record["advantage_min"] == pytest.approx(min(by_hand), rel=1e-5)
        assert record["advantage_max"] == pytest.approx(max(by_hand), rel=1e-5)
    assert log[0]["kl"] == 0.0 and log[1]["kl"] > 0
    assert abs(log[0]["ratio_min"] - 1) < 1e-5 and abs(log[0]["ratio_max"] - 1) < 1e-5

    spies["denoise"] = 0
    train(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, tmp_path / "no-kl", "--num-epochs", 1, "--group-size", 3,
                                               "--timestep-fraction", 0.5))  # fmt: skip
    assert spies["denoise"] == sampling + trained
    assert "kl" not in read_log(tmp_path / "no-kl")[-1]


def test_ddpo_resume_is_exact_with_groups_kl_and_ema(monkeypatch, tiny_sd_dir, tmp_path):
    """2 epochs in one go equal 1 epoch + --resume for the second: LoRA and EMA weights."""
    common = ["--group-size", 2, "--kl-beta", 0.1, "--ema-decay", 0.8]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, whole, *common, "--num-epochs", 2))
    train(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, split, *common, "--num-epochs", 1))
    train(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, split, *common, "--num-epochs", 2, "--resume"))
    a, b = (lora_weights(d / "checkpoints" / "epoch_0001") for d in (whole, split))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    ema_a, ema_b = (torch.load(d / "checkpoints" / "epoch_0001" / "training_state.pt")["ema"] for d in (whole, split))
    assert ema_a["steps"] == ema_b["steps"] == 2
    for x, y in zip(ema_a["weights"], ema_b["weights"], strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    assert [r["kl"] > 0 for r in read_log(split)[1:]] == [False, True]


def test_ema_equals_a_hand_rolled_ema_and_is_what_evaluation_sees(monkeypatch, tiny_sd_dir, tiny_aesthetic, tmp_path):
    """AlignProp, 3 epochs of 2 optimizer steps, --ema-decay 0.6 --ema-every 2 (an update at the end of each
    epoch): the checkpoint's EMA equals ema_k = 0.6 ema_(k-1) + 0.4 weights_k from the LoRA's initial
    weights, rolled by hand in float64 over the checkpoints' weights; each evaluation ran with the EMA
    weights in the model (the initial one with the initial weights), and the checkpoint holds the trained
    weights (swapped back)."""
    d, out = 0.6, tmp_path / "run"
    seen = []
    real = runs.evaluate_held_out

    def spy(pipe, *args, **kwargs):
        seen.append([p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" in n])
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(runs, "evaluate_held_out", spy)
    argv = ["--pretrained", tiny_sd_dir, "--reward", "aesthetic", *tiny_aesthetic, "--num-steps", 2, "--samples-per-epoch", 4,
            "--batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 1, "--eval-num", 1,
            "--output-dir", out, "--num-epochs", 3, "--lr", 3e-2, "--ema-decay", d, "--ema-every", 2, "--keep-checkpoints", 0]  # fmt: skip
    train(monkeypatch, "train_alignprop", argv)

    pipe = diffusion.load_pipeline(str(tiny_sd_dir))
    torch.manual_seed(0)  # --seed: the LoRA's initialisation, as the trainer makes it
    params = diffusion.add_lora(pipe.unet, 4, 4.0)
    ema = [p.detach().double().clone() for p in params]
    assert len(seen) == 4
    for mine, initial in zip(seen[0], ema, strict=True):
        torch.testing.assert_close(mine.double(), initial)
    for epoch in range(3):
        ckpt = out / "checkpoints" / f"epoch_{epoch:04d}"
        state = rundir.load_checkpoint(ckpt, pipe.unet)
        weights = [p.detach().double() for p in params]
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights)]
        assert state["ema"]["steps"] == 2 * (epoch + 1)
        for saved, evaluated, expected in zip(state["ema"]["weights"], seen[epoch + 1], ema, strict=True):
            torch.testing.assert_close(saved.double(), expected, atol=1e-7, rtol=1e-6)
            torch.testing.assert_close(evaluated.double(), expected, atol=1e-7, rtol=1e-6)
        assert max((e - w).abs().max().item() for e, w in zip(ema, weights)) > 1e-3  # EMA != the last weights
    # The last checkpoint's ema/ holds the EMA as a LoRA in the trainers' format (what --lora and diffusers'
    # load_lora_weights read): the same tensors as the hand-rolled EMA, written the way the weights are.
    from safetensors.torch import load_file

    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    expected = {f"unet.{k}": v for k, v in diffusion.lora_state_dict(pipe.unet).items()}  # SD's pipeline prefix
    saved = load_file(out / "checkpoints" / "epoch_0002" / "ema" / "pytorch_lora_weights.safetensors")
    assert sorted(saved) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(saved[k].double(), expected[k].double(), atol=1e-7, rtol=1e-6)
    fresh = diffusion.load_pipeline(str(tiny_sd_dir))
    fresh.load_lora_weights(str(out / "checkpoints" / "epoch_0002" / "ema"))
    loaded = [p for n, p in fresh.unet.named_parameters() if "lora_" in n]
    assert len(loaded) == len(params)
