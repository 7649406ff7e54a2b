"""train_alignprop.py end to end on the tiny offline pipeline (CPU)."""

import json
import re
import sys

import pytest
import torch

import diffusion
import rundir
from conftest import TWO_PROCESSES, lora_weights, read_log, run_main, run_script


def tiny_args(tiny_sd_dir, tiny_aesthetic, out, *extra):
    return [
        "--pretrained",
        tiny_sd_dir,
        "--reward",
        "aesthetic",
        *tiny_aesthetic,
        "--num-steps",
        4,
        "--samples-per-epoch",
        4,
        "--batch-size",
        2,
        "--gradient-accumulation-steps",
        2,
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
        *extra,
    ]


@pytest.fixture(scope="module")
def two_epoch_run(tiny_sd_dir, tiny_aesthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("alignprop") / "run"
    run_script("train_alignprop.py", *tiny_args(tiny_sd_dir, tiny_aesthetic, out, "--num-epochs", 2, "--lr", 1e-2))
    return out


def test_two_epochs_write_logs_checkpoints_and_change_lora(two_epoch_run):
    log = read_log(two_epoch_run)
    assert [r["epoch"] for r in log] == [-1, 0, 1]  # evaluation before training, then one line per epoch
    assert [r["samples"] for r in log] == [0, 4, 8]  # cumulative samples: the paper's x-axis
    for key in [
        "reward_mean",
        "reward_std",
        "reward/aesthetic",
        "loss",
        "grad_norm",
        "w_low_share",
        "sec_per_sample",
        "peak_rss_mb",  # on a CPU the process peak (the CUDA peak is peak_cuda_mb)
        "eval_reward_mean",
    ]:
        assert key in log[1], key
    assert log[1]["exploring"] and log[1]["w_low_share"] == pytest.approx(
        0.5
    )  # t_sw=0.5, 4 steps: 751, 501 of 751, 501, 251, 1
    assert all(r["word"] for r in log[1]["prompt_weights"])  # simple_animals prompts are one content word
    assert (two_epoch_run / "images" / "epoch_0001.png").exists()
    # eval/epoch_NNNN is the evaluation after epoch NNNN, like checkpoints/epoch_NNNN; eval/initial before training
    assert sorted(p.name for p in (two_epoch_run / "eval").iterdir()) == ["epoch_0000", "epoch_0001", "initial"]
    assert sorted(p.name for p in (two_epoch_run / "checkpoints").iterdir()) == ["epoch_0000", "epoch_0001"]
    weights = lora_weights(two_epoch_run / "checkpoints" / "epoch_0001")
    lora_b = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # B starts at zero: non-zero means trained


def test_checkpoint_loads_in_diffusers_with_the_right_scale(two_epoch_run, tiny_sd_dir):
    """diffusers' load_lora_weights gives the UNet we trained (rank *and* alpha restored)."""
    from diffusers import StableDiffusionPipeline

    ckpt = two_epoch_run / "checkpoints" / "epoch_0001"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.load_lora_weights(ckpt)
    ours = diffusion.load_pipeline(str(tiny_sd_dir))
    diffusion.add_lora(ours.unet, rank=4, alpha=4)
    rundir.load_checkpoint(ckpt, ours.unet)
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    base = diffusion.load_pipeline(str(tiny_sd_dir)).unet(x, t, e).sample
    with torch.no_grad():
        a, b = pipe.unet(x, t, e).sample, ours.unet(x, t, e).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - base).abs().max() > 1e-4  # the LoRA does something


def test_lora_alpha_metadata_round_trips(tiny_sd_dir, tmp_path):
    """alpha != rank: the reloaded scaling must be alpha / rank."""
    from diffusers import StableDiffusionPipeline

    pipe = diffusion.load_pipeline(str(tiny_sd_dir))
    params = diffusion.add_lora(pipe.unet, rank=4, alpha=16)
    torch.manual_seed(0)
    for p in params:
        p.data.normal_(0, 0.05)
    ckpt = rundir.save_checkpoint(tmp_path, 0, pipe.unet, {"epoch": 0})
    other = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    other.load_lora_weights(ckpt)
    x, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(other.unet(x, t, e).sample, pipe.unet(x, t, e).sample, atol=1e-5, rtol=1e-5)


def test_resume_equals_uninterrupted(two_epoch_run, tiny_sd_dir, tiny_aesthetic, tmp_path):
    """A 1-epoch run resumed for a second epoch (--num-epochs alone may change: with --explore-frac 1
    every epoch explores either way) ends where the uninterrupted 2-epoch run does. Its first checkpoint
    is the same file, byte for byte, as the other run's (another process, another hash seed), and its
    files have the permissions of every other output."""
    out = tmp_path / "run"
    run_script("train_alignprop.py", *tiny_args(tiny_sd_dir, tiny_aesthetic, out, "--num-epochs", 1, "--lr", 1e-2))
    name = "checkpoints/epoch_0000/pytorch_lora_weights.safetensors"
    assert (out / name).read_bytes() == (two_epoch_run / name).read_bytes()
    assert (out / name).stat().st_mode & 0o777 == (out / "log.jsonl").stat().st_mode & 0o777 == 0o666 & ~rundir._umask()
    proc = run_script(
        "train_alignprop.py", *tiny_args(tiny_sd_dir, tiny_aesthetic, out, "--num-epochs", 2, "--lr", 1e-2, "--resume")
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert re.search(r"epoch 1 samples 8 reward \S+ eval -?\d+\.\d{4} loss", proc.stdout), (
        proc.stdout
    )  # the held-out reward
    assert [json.loads(line)["mode"] for line in (out / "args.jsonl").read_text().splitlines()] == ["new", "resume"]
    a, b = lora_weights(two_epoch_run / "checkpoints" / "epoch_0001"), lora_weights(out / "checkpoints" / "epoch_0001")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
    assert [r["samples"] for r in read_log(out)] == [0, 4, 8]


def test_training_moves_the_reward(tiny_sd_dir, tiny_aesthetic, tmp_path):
    """Reward on fixed held-out prompts and seeds (the eval pass) before vs after 8 epochs.

    The training batches' own reward is too noisy on a random tiny model (new prompts and noise
    every epoch); the eval pass sees the same prompts and noise each time. Measured when written:
    -0.3447 before, -0.3339 after, rising every epoch.
    """
    run_main(
        "train_alignprop.py",
        *tiny_args(
            tiny_sd_dir,
            tiny_aesthetic,
            tmp_path / "run",
            "--num-epochs",
            8,
            "--lr",
            1e-2,
            "--eval-every",
            8,
            "--gradient-accumulation-steps",
            1,
            "--backprop-steps",
            2,
        ),
    )
    log = read_log(tmp_path / "run")
    before, after = log[0]["eval_reward_mean"], log[-1]["eval_reward_mean"]
    print(f"alignprop eval reward {before:.4f} -> {after:.4f}")
    assert after > before + 5e-3


def _run_in_process(monkeypatch, tiny_sd_dir, tiny_aesthetic, out, *extra):
    """main() in this process, with a hook on the UNet recording which calls receive gradient."""
    import train_alignprop

    calls = []

    def load_and_hook(*a, **kw):
        pipe = original(*a, **kw)

        def hook(module, args, output):
            record = {"grad_in_forward": torch.is_grad_enabled(), "grad_received": False}
            calls.append(record)
            if output.sample.requires_grad:
                output.sample.register_hook(lambda g: record.update(grad_received=True))

        pipe.unet.register_forward_hook(hook)
        return pipe

    original = diffusion.load_pipeline
    monkeypatch.setattr(diffusion, "load_pipeline", load_and_hook)
    argv = [str(a) for a in tiny_args(tiny_sd_dir, tiny_aesthetic, out, "--num-epochs", 1, "--eval-every", 0, *extra)]
    monkeypatch.setattr(sys, "argv", ["train_alignprop.py", *argv])

    train_alignprop.main(train_alignprop.cli())
    return calls


def test_truncated_backprop_k1_only_last_step_gets_gradient(monkeypatch, tiny_sd_dir, tiny_aesthetic, tmp_path):
    calls = _run_in_process(
        monkeypatch,
        tiny_sd_dir,
        tiny_aesthetic,
        tmp_path / "a",
        "--backprop-steps",
        1,
        "--gradient-checkpointing",
        "none",
    )
    # 2 batches x 4 denoising steps; in each trajectory only the 4th (last) UNet call carries gradient.
    assert [c["grad_received"] for c in calls] == [False, False, False, True] * 2
    assert [c["grad_in_forward"] for c in calls] == [False, False, False, True] * 2
    calls = _run_in_process(
        monkeypatch,
        tiny_sd_dir,
        tiny_aesthetic,
        tmp_path / "b",
        "--backprop-steps",
        3,
        "--gradient-checkpointing",
        "none",
    )
    assert [c["grad_received"] for c in calls] == [False, True, True, True] * 2


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, tiny_sd_dir, tiny_aesthetic, tmp_path):
    # per UNet call, per UNet/VAE-decoder block, and none: the same gradients and the same update
    for mode in ("call", "blocks", "none"):
        _run_in_process(
            monkeypatch,
            tiny_sd_dir,
            tiny_aesthetic,
            tmp_path / mode,
            "--backprop-steps",
            2,
            "--gradient-checkpointing",
            mode,
            "--lr",
            1e-2,
        )
    plain = read_log(tmp_path / "none")[-1]
    assert plain["grad_norm"] > 0
    wb = lora_weights(tmp_path / "none" / "checkpoints" / "epoch_0000")
    for mode in ("call", "blocks"):
        assert read_log(tmp_path / mode)[-1]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
        wa = lora_weights(tmp_path / mode / "checkpoints" / "epoch_0000")
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_two_processes_keep_identical_lora(tiny_sd_dir, tiny_aesthetic, tmp_path):
    run_script(
        "train_alignprop.py",
        *tiny_args(
            tiny_sd_dir,
            tiny_aesthetic,
            tmp_path / "run",
            "--num-epochs",
            1,
            "--gradient-accumulation-steps",
            1,
            "--eval-every",
            0,
            "--lr",
            1e-2,
        ),
        launcher=TWO_PROCESSES,
    )
    record = read_log(tmp_path / "run")[-1]
    assert record["samples"] == 4  # both processes' samples counted
    assert record["lora_sync_error"] == 0.0


def test_empty_prompt_file(tmp_path, monkeypatch, capsys):
    import train_alignprop

    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        train_alignprop.main(train_alignprop.cli(["--prompts", str(empty), "--output-dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err.startswith("error: --prompts file")
        and "has no prompts" in err
        and len(err.splitlines()) == 1
    )


def test_sample_py_generates_with_the_checkpoint_and_scores(two_epoch_run, tiny_sd_dir, tiny_aesthetic, tmp_path):
    import csv

    out = tmp_path / "samples"
    models = tiny_aesthetic[1:]
    run_main(
        "sample.py",
        "generate",
        "--pretrained",
        tiny_sd_dir,
        "--lora",
        two_epoch_run / "checkpoints" / "epoch_0001",
        "--prompts",
        "unseen_animals",
        "--num-steps",
        4,
        "--eval-rewards",
        "aesthetic",
        "--reward-models",
        *models,
        "--output-dir",
        out,
        "--batch-size",
        4,
    )
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["prompt"] for r in rows] == ["hippopotamus", "snail", "crocodile", "cheetah", "lobster", "octopus"]
    assert all(float(r["aesthetic"]) == float(r["aesthetic"]) for r in rows)  # finite numbers
    assert (out / "grid.png").exists() and (out / "0005.png").exists()
    # The LoRA changes the images: the base model's are different.
    run_main(
        "sample.py",
        "generate",
        "--pretrained",
        tiny_sd_dir,
        "--prompt",
        "hippopotamus",
        "--num-steps",
        4,
        "--output-dir",
        tmp_path / "base",
    )
    import numpy as np
    from PIL import Image

    a, b = np.asarray(Image.open(out / "0000.png")), np.asarray(Image.open(tmp_path / "base" / "0000.png"))
    assert a.shape == b.shape and (a != b).any()


def test_plot_and_gallery_from_a_real_run(two_epoch_run, tmp_path):
    run_main(
        "sample.py",
        "plot",
        two_epoch_run,
        two_epoch_run,
        "--labels",
        "DiffExp",
        "copy",
        "--output",
        tmp_path / "curve.png",
    )
    assert (tmp_path / "curve.png").stat().st_size > 1000
    run_main("sample.py", "gallery", two_epoch_run, "--output", tmp_path / "gallery.html")
    page = (tmp_path / "gallery.html").read_text()
    assert page.count('type="range"') == 2  # one slider per held-out prompt (--eval-num 2)
    assert page.count("data:image/png;base64,") == 2 * 3 + 2  # initial + 2 epochs per prompt, plus the shown frame
    assert "hippopotamus" in page and "before training: reward" in page and "epoch 1: reward" in page
    frames = json.loads(re.search(r"captions\[0\] = (\[.*?\]);", page).group(1))
    assert [c.split(":")[0] for c in frames] == ["before training", "epoch 0", "epoch 1"]  # in training order
