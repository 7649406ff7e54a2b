"""The arms of the evidence comparisons (tools/bench_arms.py).

Every arm of a seed samples from the same noise: DiffExp's random choices (word, weight) and AlignProp's
random K come from streams of their own, so switching DiffExp on, or drawing K, never moves x_T or the
step noise. Checked where it shows: with w_low = w_high and a weight range of exactly 1, DiffExp changes
nothing a sample depends on, so the first epoch's samples (the training rewards and the saved grid) must
equal the baseline's bit for bit, though the DiffExp arm did draw a word for every sample.

Placed by hand: drawing the choices (or K) from the batch's own generator again, as before the fix,
shifts x_T and fails these tests."""

import pytest

from conftest import read_log, run_main

NEUTRAL_DIFFEXP = ["--cfg-schedule", "--prompt-weighting", "--w-low", 5, "--w-high", 5, "--prompt-weight-range", 1, 1]
BASELINE = ["--no-cfg-schedule", "--no-prompt-weighting", "--w-high", 5]


def first_epoch(tiny_sd_dir, tiny_aesthetic, out, trainer, *extra):
    common = ["--pretrained", tiny_sd_dir, "--reward", "aesthetic", *tiny_aesthetic, "--num-steps", 4, "--t-sw", 0.5]
    common += ["--samples-per-epoch", 4, "--num-epochs", 1, "--eval-every", 0, "--mixed-precision", "no"]
    common += ["--explore-frac", 1.0, "--lr", 0, "--output-dir", out]
    batches = (
        ["--batch-size", 2, "--gradient-accumulation-steps", 2]
        if trainer == "alignprop"
        else ["--sample-batch-size", 2, "--train-batch-size", 2, "--gradient-accumulation-steps", 2]
    )
    run_main(f"train_{trainer}.py", *common, *batches, *extra)
    record = next(r for r in read_log(out) if r["epoch"] == 0)
    return record, (out / "images" / "epoch_0000.png").read_bytes()


@pytest.mark.parametrize("trainer", ["alignprop", "ddpo"])
def test_diffexp_arm_shares_the_baselines_noise(trainer, tiny_sd_dir, tiny_aesthetic, tmp_path):
    base, base_grid = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "base", trainer, *BASELINE)
    diffexp, diffexp_grid = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "diffexp", trainer, *NEUTRAL_DIFFEXP)
    assert all(w["word"] for w in diffexp["prompt_weights"])  # the DiffExp arm drew its choices ...
    assert not any(w["word"] for w in base["prompt_weights"])
    assert diffexp["reward_mean"] == base["reward_mean"]  # ... from a stream that left x_T and the noise alone
    assert diffexp["reward_std"] == base["reward_std"]
    assert diffexp_grid == base_grid


def test_random_k_shares_the_fixed_k_noise(tiny_sd_dir, tiny_aesthetic, tmp_path):
    """K only decides where the graph starts, so K ~ U{1..2} and K = 2 sample the same images."""
    fixed, fixed_grid = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "k", "alignprop", "--backprop-steps", 2)
    drawn, drawn_grid = first_epoch(
        tiny_sd_dir,
        tiny_aesthetic,
        tmp_path / "k-random",
        "alignprop",
        "--backprop-steps",
        2,
        "--backprop-steps-random",
    )
    assert (drawn["reward_mean"], drawn_grid) == (fixed["reward_mean"], fixed_grid)


def test_cfgfree_arm_rolls_out_at_w_1_and_evaluates_at_w_high(tiny_sd_dir, tiny_aesthetic, tmp_path):
    """The field's CFG-free rollouts as bench_arms runs them: w = 1 on every training step, the whole run (every
    epoch exploring, w_low share 1), while evaluation keeps w_high: its images before training equal the baseline
    arm's exactly (the same seed's fixed noise at w_high). Placed by hand: evaluating at w_low fails it."""
    from tools.bench_arms import ARMS

    # The baseline's --w-low 3 is unused by its sampling; an evaluation at w_low (not w_high) would show it.
    base, _ = first_epoch(
        tiny_sd_dir, tiny_aesthetic, tmp_path / "base", "ddpo", *BASELINE, "--w-low", 3, "--eval-every", 1
    )
    free, _ = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "free", "ddpo", *ARMS["cfgfree"], "--w-high", 5,
                          "--eval-every", 1, "--num-epochs", 2)  # fmt: skip
    log = read_log(tmp_path / "free")
    assert [(r["exploring"], r["w_low_share"]) for r in log if r["epoch"] >= 0] == [(True, 1.0), (True, 1.0)]
    assert free["reward_mean"] != base["reward_mean"]  # the rollouts did change ...
    for image in ("000.png", "001.png"):  # ... but not what evaluation samples with
        assert (tmp_path / "free" / "eval" / "initial" / image).read_bytes() == (
            tmp_path / "base" / "eval" / "initial" / image
        ).read_bytes()


def test_full_chain_gradient_reaches_the_w_low_step(tiny_sd_dir, tiny_aesthetic, tmp_path):
    """AlignProp with K = all 4 steps, DiffExp on (t_sw 0.5: the first two steps at w_low): the gradient goes
    through the first, w_low, step. Both runs share their noise, so the only difference between K = 4 and
    K = 3 is the first step's contribution, which must be non-zero. Placed by hand: keeping step 0 out of the
    graph (with_grad from step 1 on) makes the two gradients equal and fails this test."""
    diffexp = ["--cfg-schedule", "--prompt-weighting", "--w-high", 5, "--lr", 1e-3]
    k4, _ = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "k4", "alignprop", *diffexp, "--backprop-steps", 4)
    k3, _ = first_epoch(tiny_sd_dir, tiny_aesthetic, tmp_path / "k3", "alignprop", *diffexp, "--backprop-steps", 3)
    assert k4["w_low_share"] == 0.5 and k4["reward_mean"] == k3["reward_mean"]  # the same samples ...
    assert k4["grad_norm"] > 0 and abs(k4["grad_norm"] - k3["grad_norm"]) > 1e-6 * k4["grad_norm"]  # ... more gradient
