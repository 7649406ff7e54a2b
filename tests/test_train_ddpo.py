"""train_ddpo.py end to end on the tiny offline pipeline (CPU), and its advantage computation."""

import sys

import numpy as np
import pytest
import torch

from conftest import TWO_PROCESSES, lora_weights, read_log, run_main, run_script
from kernels import ppo_clip_loss_reference
from train_ddpo import PerPromptStatTracker


def tiny_args(tiny_sd_dir, out, *extra):
    return [
        "--pretrained",
        tiny_sd_dir,
        "--num-steps",
        4,
        "--samples-per-epoch",
        4,
        "--sample-batch-size",
        2,
        "--train-batch-size",
        2,
        "--gradient-accumulation-steps",
        1,
        "--mixed-precision",
        "no",
        "--eval-every",
        0,
        "--output-dir",
        out,
        "--explore-frac",
        1.0,
        "--t-sw",
        0.5,
        *extra,
    ]


@pytest.mark.parametrize(
    "diffexp",
    [[], ["--w-low", 3], ["--no-cfg-schedule", "--no-prompt-weighting"]],
    ids=["diffexp-on", "diffexp-w-low-3", "diffexp-off"],
)
def test_ratio_is_one_before_any_update(tiny_sd_dir, tiny_aesthetic, tmp_path, diffexp):
    """lr = 0: the policy never changes, so every recomputed log-prob (every sample, every step,
    with the stored guidance scale and weighted embeddings) must equal the stored one. At w_low = 1 both CFG
    halves give the conditional output; at w_low = 3 a training pass that ignored the stored per-step
    guidance (w_high everywhere) would move the ratio off 1."""
    proc = run_main("train_ddpo.py", *tiny_args(tiny_sd_dir, tmp_path / "run", "--reward", "aesthetic", *tiny_aesthetic,
                      "--num-epochs", 1, "--lr", 0, "--adam-weight-decay", 0, *diffexp))  # fmt: skip
    assert "note: --lr 0: the LoRA weights will not change (a dry run)" in proc.stdout  # allowed, but said
    r = read_log(tmp_path / "run")[-1]
    assert r["exploring"] and (r["w_low_share"] == 0.5) == ("--no-cfg-schedule" not in diffexp)
    assert any(p["word"] for p in r["prompt_weights"]) == ("--no-prompt-weighting" not in diffexp)
    assert abs(r["ratio_min"] - 1) < 1e-4 and abs(r["ratio_max"] - 1) < 1e-4
    assert r["clipfrac"] == 0.0 and r["approx_kl"] < 1e-8


def test_clipped_objective_matches_float64_hand_computation():
    eps = 0.1
    lp_old = torch.zeros(6, dtype=torch.float64)
    ratio = torch.tensor([1.05, 1.3, 0.7, 1.05, 1.3, 0.7], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    loss, stats = ppo_clip_loss_reference(ratio.log(), lp_old, adv, eps)
    # By hand: max(-A r, -A clip(r)) per sample.
    # A=+1: r=1.05 (inside) -> -1.05; r=1.3 -> max(-1.3, -1.1) = -1.1 (clipped); r=0.7 -> max(-0.7, -0.9) = -0.7 (unclipped)
    # A=-2: r=1.05 -> 2.1; r=1.3 -> max(2.6, 2.2) = 2.6 (unclipped); r=0.7 -> max(1.4, 1.8) = 1.8 (clipped)
    expected = (-1.05 - 1.1 - 0.7 + 2.1 + 2.6 + 1.8) / 6
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    assert float(stats["clipfrac"]) == pytest.approx(4 / 6)  # |r - 1| > eps for r = 1.3 and 0.7


def test_policy_gradient_matches_pathwise_gradient(tiny_sd_dir):
    """The gradient of DDPO's surrogate is the score-function estimate of the reward gradient.

    For one step x_prev = mu_theta + sigma z and a reward f(x_prev) = u.x_prev + c/2 |x_prev|^2, the
    reward gradient has a closed form, d/dtheta E_z f = J^T (u + c mu), and the log-probs being
    per-dimension means (README, The method) make E_z[(f - baseline) d log_prob] that divided by C*H*W. With
    many draws of z the loss's gradient must match it in direction and scale, with per-sample
    guidance scales as DiffExp uses them; a sign, scale or guidance error in the backward does not.
    The eager backend makes the estimate over all 8192 draws; the Triton kernel's gradient must equal
    it on a slice of them (the whole estimate through the CPU interpreter took 28 s; the kernel's own
    gradients are also gradchecked in float64 in test_kernels.py)."""
    from diffusion import add_lora, encode_prompts, load_pipeline
    from kernels import DDIMSchedule, ddpo_clip_loss
    from kernels.cfg_ddim import ddim_mean, gaussian_log_prob

    pipe = load_pipeline(str(tiny_sd_dir), "cpu", torch.float32)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, 4, 4.0)
    with torch.no_grad():  # LoRA B starts at zero; make it nonzero so every adapter weight has a gradient
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pipe.scheduler.set_timesteps(4)
    t = pipe.scheduler.timesteps[1]
    B, K, c, H = 2, 4096, 0.5, 8
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, 4)
    coeffs, rep_coeffs = schedule.coefficients(t.expand(B), eta=1.0), schedule.coefficients(t.expand(K * B), eta=1.0)
    guidance = torch.tensor([1.0, 5.0])
    x_t = torch.randn(B, 4, H, H)
    u = torch.randn(4, H, H)
    embeds = torch.cat(
        [encode_prompts(pipe, [""]).expand(B, -1, -1), encode_prompts(pipe, ["a cat", "a dog riding a bike"])]
    )

    def grad_of(loss, **kwargs):
        pipe.unet.zero_grad(set_to_none=True)
        loss.backward(**kwargs)
        return torch.cat([p.grad.flatten() for p in params])

    out_u, out_c = pipe.unet(torch.cat([x_t, x_t]), t.expand(2 * B), embeds).sample.chunk(2)
    mean = ddim_mean(out_u, out_c, x_t, guidance, coeffs)
    reference = grad_of(
        (mean * (u + c * mean.detach())).sum(), retain_graph=True
    )  # the UNet outputs serve both gradients

    g = torch.Generator().manual_seed(1)
    rep = lambda v: v.repeat(K, *[1] * (v.dim() - 1))  # noqa: E731  [K*B]: draw k of sample b at k*B + b
    z = torch.randn(K // 2 * B, 4, H, H, generator=g)
    z = torch.cat([z, -z])  # antithetic pairs: the even part of f (|z|^2) cancels instead of adding variance
    x_prev = rep(mean.detach()) + rep_coeffs.sigma.view(-1, 1, 1, 1) * z
    f = (x_prev * u).flatten(1).sum(1) + c / 2 * x_prev.flatten(1).pow(2).sum(1)
    advantages = (f.view(K, B) - f.view(K, B).mean(0)).flatten()  # a per-sample baseline, as per-prompt tracking gives
    old_log_prob = gaussian_log_prob(x_prev, rep(mean.detach()), rep_coeffs.sigma)

    inputs = (rep(out_u), rep(out_c), rep(x_t), x_prev, guidance.repeat(K))  # [K*B]: each draw's row

    def surrogate(rows, backend):
        coeffs_rows = type(rep_coeffs)(
            rep_coeffs.c_x[rows], rep_coeffs.c_eps[rows], rep_coeffs.sigma[rows], rep_coeffs.eta
        )
        return ddpo_clip_loss(*(v[rows] for v in inputs), coeffs_rows, old_log_prob[rows], advantages[rows], 0.2,
                              backend=backend)  # fmt: skip

    loss, stats = surrogate(slice(None), "eager")
    assert float(stats["clipfrac"]) == 0.0
    estimate = -grad_of(loss, retain_graph=True) * B * x_t[0].numel()  # the loss is a mean over K*B of -A*ratio
    cos = float(estimate @ reference / (estimate.norm() * reference.norm()))
    assert cos > 0.9, cos  # measured 0.946; the same test with the two guidance scales swapped gives 0.43
    assert 0.85 < float(estimate.norm() / reference.norm()) < 1.2  # measured 1.04

    rows = slice(0, 64)  # 32 draws of each sample, each sample at its own guidance scale
    eager = grad_of(surrogate(rows, "eager")[0], retain_graph=True)
    triton = grad_of(surrogate(rows, "triton")[0])
    torch.testing.assert_close(triton, eager, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_v_sd_dir(tmp_path_factory):
    from tools.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd-v"), prediction_type="v_prediction")


def test_training_moves_the_reward(monkeypatch, tiny_v_sd_dir, tmp_path):
    """Five DDPO epochs raise a simple reward, mean brightness, well beyond its sampling noise.

    The setting is what makes this affordable on a CPU (README, DDPO): the score-function gradient's
    noise grows with the number of latent dimensions the policy injects noise into, so the images
    are 8 px (4x4x4 latents) and each update averages 1024 trajectories (cosine with the exact
    reward gradient 0.2-0.4 from 512 trajectories there, about 0 at 32 px); and the v-prediction
    tiny model, because on the random epsilon model x_T rather than the policy's own noise decides
    most of the sample.
    Measured when written, gain of the last two epochs over the first in standard errors: 7.8 for
    this seed, 10.0 / 8.4 / 6.7 / 4.8 / 8.0 for seeds 1-5; -4.7 with the advantages' sign flipped,
    -0.2 with each advantage given to the neighbouring trajectory."""

    import rewards
    import train_ddpo

    def brightness_reward(spec, device="cpu", dtype=torch.float32, **models):
        def score(images, prompts):
            value = images.float().mean(dim=(1, 2, 3))
            return value, {"brightness": value}

        return score

    monkeypatch.setattr(rewards, "load_reward", brightness_reward)  # --reward is still parsed and checked
    out = tmp_path / "run"
    argv = [
        "--pretrained",
        tiny_v_sd_dir,
        "--reward",
        "jpeg",
        "--resolution",
        8,
        "--num-steps",
        4,
        "--num-epochs",
        5,
        "--samples-per-epoch",
        1024,
        "--sample-batch-size",
        256,
        "--train-batch-size",
        256,
        "--gradient-accumulation-steps",
        4,
        "--lr",
        5e-2,
        "--clip-range",
        0.2,
        "--no-cfg-schedule",
        "--no-prompt-weighting",
        "--no-per-prompt-stat-tracking",
        "--mixed-precision",
        "no",
        "--eval-every",
        0,
        "--output-dir",
        out,
    ]
    monkeypatch.setattr(sys, "argv", ["train_ddpo.py", *map(str, argv)])
    train_ddpo.main(train_ddpo.cli())
    log = [r for r in read_log(out) if "reward_mean" in r]
    assert [r["samples"] for r in log] == [1024 * (i + 1) for i in range(5)]
    assert all("reward/brightness" in r for r in log)
    n, first, last = 1024, log[0], log[-2:]
    gain = sum(r["reward_mean"] for r in last) / 2 - first["reward_mean"]
    se = (first["reward_std"] ** 2 / n + sum(r["reward_std"] ** 2 for r in last) / (4 * n)) ** 0.5
    print(
        "ddpo brightness by epoch", [round(r["reward_mean"], 5) for r in log], f"gain {gain:.5f} = {gain / se:.1f} s.e."
    )
    assert gain > 3 * se, (gain, se)


def test_per_prompt_stat_tracking():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=3)
    prompts = ["cat", "cat", "dog", "dog"]
    r1 = np.array([1.0, 3.0, 10.0, 30.0])
    # Fewer than min_count rewards per prompt: normalised by the whole batch.
    np.testing.assert_allclose(tracker(prompts, r1), (r1 - r1.mean()) / (r1.std() + 1e-6))
    r2 = np.array([2.0, 4.0, 20.0, 40.0])
    # Now each prompt has 4 >= 3 rewards: normalised within its own buffer.
    cat, dog = np.array([1.0, 3.0, 2.0, 4.0]), np.array([10.0, 30.0, 20.0, 40.0])
    expected = np.concatenate([(r2[:2] - cat.mean()) / (cat.std() + 1e-6), (r2[2:] - dog.mean()) / (dog.std() + 1e-6)])
    np.testing.assert_allclose(tracker(prompts, r2), expected)
    state = tracker.state_dict()
    again = PerPromptStatTracker(8, 3)
    again.load_state_dict(state)
    assert again.state_dict() == state


@pytest.fixture(scope="module")
def jpeg_run(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpo") / "run"
    run_script(
        "train_ddpo.py",
        *tiny_args(
            tiny_sd_dir, out, "--reward", "jpeg", "--num-epochs", 2, "--lr", 1e-2, "--eval-every", 2, "--eval-num", 2
        ),
    )
    return out


def test_jpeg_two_epochs_logs_checkpoint(jpeg_run, tiny_sd_dir):
    log = read_log(jpeg_run)
    assert [r["samples"] for r in log] == [0, 4, 8]
    for key in [
        "reward_mean",
        "reward_std",
        "reward/jpeg",
        "approx_kl",
        "clipfrac",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
        "advantage_std",
        "sec_per_sample",
        "peak_rss_mb",  # on a CPU the process peak (the CUDA peak is peak_cuda_mb)
    ]:
        assert key in log[1], key
    weights = lora_weights(jpeg_run / "checkpoints" / "epoch_0001")
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.load_lora_weights(jpeg_run / "checkpoints" / "epoch_0001")


def test_resume_reproduces_uninterrupted(jpeg_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    base = tiny_args(tiny_sd_dir, out, "--reward", "jpeg", "--lr", 1e-2, "--eval-every", 2, "--eval-num", 2)
    run_script("train_ddpo.py", *base, "--num-epochs", 1)
    run_script("train_ddpo.py", *base, "--num-epochs", 2, "--resume")
    a, b = lora_weights(jpeg_run / "checkpoints" / "epoch_0001"), lora_weights(out / "checkpoints" / "epoch_0001")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


def test_two_processes_gather_rewards_train_on_their_own_advantages_and_stay_in_sync(tiny_sd_dir, tmp_path):
    """Two CPU processes: the rewards are gathered before the advantages, each process trains on the
    advantages of its own samples (its slice of the gathered ones the log records, in process order), and
    the processes keep identical LoRA weights. What each process hands the clipped loss is recorded by a
    wrapper around the trainer. Bug placed by hand: every process training on process 0's advantages
    (.reshape(world, -1)[0]): this test failed on process 1."""
    import json

    from conftest import ROOT

    wrapper = tmp_path / "ddpo_recording_advantages.py"
    wrapper.write_text(f"""
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import kernels, train_ddpo
seen, real = [], kernels.ddpo_clip_loss
def spy(out_u, out_c, x_t, x_prev, w, coeffs, old_log_probs, advantages, *args, **kwargs):
    seen.extend(advantages.tolist())
    return real(out_u, out_c, x_t, x_prev, w, coeffs, old_log_probs, advantages, *args, **kwargs)
kernels.ddpo_clip_loss = spy
train_ddpo.main(train_ddpo.cli(sys.argv[1:]))
with open({str(tmp_path)!r} + f"/advantages_{{os.environ['RANK']}}.json", "w") as f:
    json.dump(seen, f)
""")
    run_script(wrapper, *tiny_args(tiny_sd_dir, tmp_path / "run", "--reward", "jpeg", "--num-epochs", 1, "--lr", 1e-2,
                                   "--sample-batch-size", 2, "--train-batch-size", 1), launcher=TWO_PROCESSES)  # fmt: skip
    r = read_log(tmp_path / "run")[-1]
    assert r["samples"] == 4  # 2 processes x 2 trajectories, gathered before the advantages
    assert r["lora_sync_error"] == 0.0
    for rank in (0, 1):
        used = json.loads((tmp_path / f"advantages_{rank}.json").read_text())
        own = r["advantages"][2 * rank : 2 * rank + 2]
        assert sorted(set(used)) == pytest.approx(sorted(own), abs=1e-6), rank
    assert r["advantages"][:2] != pytest.approx(r["advantages"][2:], abs=1e-3)  # the slices differ: the check can fail


def test_the_host_reward_worker_runs_one_thread(tiny_sd_dir, tmp_path):
    """A host-side reward (JPEG) is scored in a worker thread that must use one intra-op thread. A new
    thread starts with the OpenMP default, which is 1 under OMP_NUM_THREADS=1, so the run is made where
    the default is 2: without the worker's set_num_threads(1) it would score with 2."""
    import json
    import os
    import subprocess

    from conftest import ROOT

    code = f"""
import json, sys, threading, torch
sys.path.insert(0, {str(ROOT)!r})
import rewards, train_ddpo
fresh = []
t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads())); t.start(); t.join()
seen = []
def host_reward(spec, **kwargs):
    def score(images, prompts):
        seen.append(torch.get_num_threads())
        return images.mean((1, 2, 3)), {{}}
    return score
rewards.load_reward = host_reward
train_ddpo.main(train_ddpo.cli(sys.argv[1:]))
print(json.dumps({{"fresh": fresh, "worker": seen}}))
"""
    argv = ["--pretrained", tiny_sd_dir, "--reward", "jpeg", "--num-steps", 2, "--samples-per-epoch", 2, "--sample-batch-size", 2,
            "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0,
            "--num-epochs", 1, "--output-dir", tmp_path / "run"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = json.loads(proc.stdout.strip().splitlines()[-1])
    assert threads["fresh"] == [2]  # the default a new thread gets here: the check below can fail
    assert threads["worker"] == [1]


def test_two_processes_on_sd3_with_groups_spanning_them(tiny_sd3_dir, tiny_aesthetic, tmp_path):
    """SD3 in 2 processes with --group-size 2 over 6 samples: samples 0-2 are process 0's, 3-5 process 1's, so
    group 1 (samples 2 and 3) spans the two. Both processes drew the same groups (the gathered prompts come
    in pairs), each group's advantages come from both its samples, whichever process holds them (with k = 2
    they are +-a, a = 1 / (1 + 2e-4 / |reward gap|); a group normalised on one side only gives 0), and the
    processes keep identical LoRA weights."""
    out = tmp_path / "run"
    run_script("train_ddpo.py", *tiny_args(tiny_sd3_dir, out, "--reward", "aesthetic", *tiny_aesthetic, "--num-epochs", 1,
                                           "--lr", 1e-2, "--samples-per-epoch", 6, "--sample-batch-size", 3,
                                           "--train-batch-size", 3, "--group-size", 2, "--w-low", 3), launcher=TWO_PROCESSES)  # fmt: skip
    r = read_log(out)[-1]
    prompts, advantages = [p["prompt"] for p in r["prompt_weights"]], np.array(r["advantages"])
    assert r["samples"] == 6 and len(prompts) == len(advantages) == 6
    assert prompts[0::2] == prompts[1::2]
    np.testing.assert_allclose(advantages[0::2], -advantages[1::2], atol=1e-6)
    assert np.abs(advantages).min() > 0.5
    assert r["lora_sync_error"] == 0.0
