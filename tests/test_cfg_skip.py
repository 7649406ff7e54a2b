"""The guidance shortcut of diffusion.cfg_unet: at w = 1 only the conditional half of the UNet batch
is run (w = 0: only the unconditional half), and the result equals the conditional-only computation."""

import sys

import pytest
import torch

import diffusion
from conftest import read_log


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return diffusion.load_pipeline(str(tiny_sd_dir))


def batch_sizes(unet):
    seen = []
    handle = unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen, handle


def test_skip_is_taken_exactly_where_the_scale_is_one_or_zero(pipe):
    from kernels import DDIMSchedule, cfg_ddim_step

    text = diffusion.TextConditioner(pipe)
    cond = text.encode(["a red circle", "a blue square", "a cat"])
    x, t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(501)
    seen, handle = batch_sizes(pipe.unet)
    with torch.no_grad():
        full_u, full_c = diffusion.cfg_unet(pipe.unet, x, t, cond, text.negative, 7.5)
        one_u, one_c = diffusion.cfg_unet(pipe.unet, x, t, cond, text.negative, 1.0)
        zero_u, zero_c = diffusion.cfg_unet(pipe.unet, x, t, cond, text.negative, 0.0)
        mix_u, mix_c = diffusion.cfg_unet(pipe.unet, x, t, cond, text.negative, torch.tensor([1.0, 7.5, 0.0]))
        cond_only = pipe.unet(x, t.expand(3), cond.embeds).sample
    handle.remove()
    # w != 1: the doubled batch; w = 1 or 0: half of it; mixed: the rows some sample needs (u: 2, c: 2)
    assert seen == [6, 3, 3, 4, 3]
    # w = 1 gives the conditional-only output exactly, and so does the CFG step built on it
    assert torch.equal(one_c, cond_only) and torch.equal(one_u, one_c)
    coeffs = DDIMSchedule.from_scheduler(pipe.scheduler, 4, "cpu").coefficients(t.expand(3), 0.0)
    step = cfg_ddim_step(one_u, one_c, x, torch.ones(3), coeffs, backend="eager")
    assert torch.equal(step, cfg_ddim_step(cond_only, cond_only, x, torch.ones(3), coeffs, backend="eager"))
    # w = 0: the unconditional output; the mixed batch puts every needed output back in its row
    torch.testing.assert_close(zero_u, full_u, atol=1e-5, rtol=1e-5)
    assert torch.equal(zero_c, zero_u)
    torch.testing.assert_close(mix_c[:2], full_c[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mix_u[1:], full_u[1:], atol=1e-5, rtol=1e-5)
    assert torch.equal(mix_u[0], mix_c[0]) and torch.equal(mix_c[2], mix_u[2])


def test_generate_runs_half_batches_on_the_w_one_steps(pipe):
    cond = diffusion.TextConditioner(pipe).encode(["a red circle", "a cat"])
    seen, handle = batch_sizes(pipe.unet)
    diffusion.generate(pipe, cond, torch.tensor([1.0, 1.0, 7.5, 7.5]), 4, torch.Generator().manual_seed(0))
    handle.remove()
    assert seen == [2, 2, 4, 4]


def test_ddpo_skips_in_sampling_and_training_and_keeps_the_main_threads(monkeypatch, tiny_sd_dir, tmp_path):
    """DiffExp at w_low = 1 on half the steps: DDPO's sampling and training passes both run the
    smaller UNet batches (the ratio-is-one tests show they compute the same thing), and scoring in
    the reward worker leaves the main thread's intra-op thread count alone."""

    import train_ddpo

    seen = []
    real = diffusion.load_pipeline

    def load_and_hook(*args, **kwargs):
        pipe = real(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda m, a: seen.append((torch.is_grad_enabled(), a[0].shape[0])))
        return pipe

    monkeypatch.setattr(diffusion, "load_pipeline", load_and_hook)
    import rewards

    worker_threads = []

    def jpeg_like(spec, **kwargs):  # a host-side reward: scored in the worker thread
        def score(images, prompts):
            worker_threads.append(torch.get_num_threads())
            return images.mean((1, 2, 3)), {}

        return score

    monkeypatch.setattr(rewards, "load_reward", jpeg_like)
    argv = ["--pretrained", tiny_sd_dir, "--num-steps", 4, "--samples-per-epoch", 2, "--sample-batch-size", 2, "--train-batch-size", 2,
            "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0, "--output-dir", tmp_path / "run",
            "--explore-frac", 1.0, "--t-sw", 0.5, "--w-low", 1.0, "--num-epochs", 1, "--reward", "jpeg"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["train_ddpo.py", *map(str, argv)])
    threads = torch.get_num_threads()
    train_ddpo.main(train_ddpo.cli())
    assert torch.get_num_threads() == threads
    assert worker_threads == [1]  # the worker's own team is one thread, so it never takes the sampler's cores
    sampling = [n for grad, n in seen if not grad]
    training = [n for grad, n in seen if grad]
    assert sampling == [2, 2, 4, 4]  # t = 751, 501 at w_low = 1; 251, 1 at w_high
    # training visits each trajectory's 4 steps in a shuffled order: rows at w = 1 need 1 UNet row, others 2
    assert len(training) == 4 and sum(training) == 2 * (2 * 1 + 2 * 2)
    assert abs(read_log(tmp_path / "run")[-1]["ratio_max"] - 1) < 1e-4
