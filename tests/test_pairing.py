"""Every arm of a seed samples from the same noise: DiffExp's random choices (word, weight) and AlignProp's
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
        tiny_sd_dir, tiny_aesthetic, tmp_path / "k-random", "alignprop", "--backprop-steps", 2, "--backprop-steps-random"
    )
    assert (drawn["reward_mean"], drawn_grid) == (fixed["reward_mean"], fixed_grid)
