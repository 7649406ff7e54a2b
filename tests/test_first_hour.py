"""A user's first hour with the two trainers: every wrong invocation stops with one `error:` line naming
the flag (exit 2) before any model is loaded; one run per --output-dir, never two mixed and none lost;
checkpoint checks before loading; --help; the `--config toy` preset; what a short run shows.

The wrong invocations run in this process (`main(cli(argv))`, SystemExit caught): a subprocess costs
~2 s of imports each, and test_one_wrong_invocation_as_a_user_runs_it covers the process itself.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffusion
import rewards
import rundir
import runs
import train_alignprop
import train_ddpo
from conftest import ROOT, read_log, run_script


def alignprop_argv(sd, models, out, *extra):
    return [
        "--pretrained", sd, "--reward", "aesthetic", *models, "--num-steps", 4, "--samples-per-epoch", 4, "--batch-size", 2,
        "--gradient-accumulation-steps", 2, "--mixed-precision", "no", "--eval-every", 1, "--eval-num", 2, "--output-dir", out,
        "--explore-frac", 1.0, "--t-sw", 0.5, *extra,
    ]  # fmt: skip


def ddpo_argv(sd, out, *extra):
    return [
        "--pretrained", sd, "--reward", "jpeg", "--num-steps", 4, "--samples-per-epoch", 4, "--sample-batch-size", 2,
        "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0,
        "--output-dir", out, "--explore-frac", 1.0, "--t-sw", 0.5, *extra,
    ]  # fmt: skip


def run_main(trainer, argv, monkeypatch, capsys):
    """trainer.main(trainer.cli(argv)) here, with loading a model an error: (exit code, stdout, stderr)."""

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(diffusion, "load_pipeline", no_model)
    monkeypatch.setattr(rewards, "load_reward", no_model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        trainer.main(trainer.cli([str(a) for a in argv]))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def assert_one_error_line(code, err, flag):
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert flag in err, err


# (id, extra flags, the flag the message must name, a flag it must not blame)
ALIGNPROP_WRONG = [
    ("lr_negative", ["--lr", "-1"], "--lr", None),
    ("lora_rank_0", ["--lora-rank", "0"], "--lora-rank", None),
    ("lora_alpha_0", ["--lora-alpha", "0"], "--lora-alpha", None),
    ("batch_size_0", ["--batch-size", "0"], "--batch-size", None),
    ("num_epochs_0", ["--num-epochs", "0"], "--num-epochs", None),
    ("samples_per_epoch_0", ["--samples-per-epoch", "0"], "--samples-per-epoch", None),
    ("accumulation_0", ["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps", None),
    ("num_steps_0", ["--num-steps", "0"], "--num-steps", "--backprop-steps"),
    ("save_every_0", ["--save-every", "0"], "--save-every", None),
    ("keep_checkpoints_negative", ["--keep-checkpoints", "-1"], "--keep-checkpoints", None),
    ("eval_every_negative", ["--eval-every", "-1"], "--eval-every", None),
    ("eval_num_0", ["--eval-num", "0"], "--eval-num", None),
    ("resolution_0", ["--resolution", "0"], "--resolution", None),
    ("resolution_not_multiple", ["--resolution", "33"], "--resolution 33 is not a multiple of 2", None),
    ("adam_beta1_1", ["--adam-beta1", "1"], "--adam-beta1", None),
    ("adam_epsilon_0", ["--adam-epsilon", "0"], "--adam-epsilon", None),
    ("max_grad_norm_negative", ["--max-grad-norm", "-1"], "--max-grad-norm", None),
    ("backprop_steps_9", ["--backprop-steps", "9"], "--backprop-steps must be in [1, --num-steps=4]", None),
    ("t_sw", ["--t-sw", "1.5"], "--t-sw must be in [0, 1]", None),
    ("jpeg", ["--reward", "jpeg"], "jpeg is not differentiable", None),
    ("unknown_reward", ["--reward", "nonsense"], "unknown reward 'nonsense'", None),
    (
        "samples_not_divisible",
        ["--samples-per-epoch", "5"],
        "--samples-per-epoch 5 must be divisible by --batch-size 2",
        None,
    ),
    (
        "accumulation_not_dividing",
        ["--gradient-accumulation-steps", "3"],
        "--gradient-accumulation-steps 3 must divide",
        None,
    ),
    ("unknown_reward_model_key", ["--reward-models", "foo", "bar"], "--reward-models: unknown key", None),
    ("resume_and_overwrite", ["--resume", "--overwrite"], "--resume and --overwrite", None),
    ("resume_nothing", ["--resume"], "--resume", None),
    ("unknown_preset", ["--config", "nope"], "--config: unknown preset 'nope'", None),
    ("ema_decay_1", ["--ema-decay", "1"], "--ema-decay must be in [0, 1)", None),
    ("ema_every_0", ["--ema-decay", "0.9", "--ema-every", "0"], "--ema-every must be >= 1", "--ema-decay"),
    ("ema_every_without_decay", ["--ema-every", "4"], "--ema-every 4 does nothing without --ema-decay", None),
    ("eta_above_1", ["--eta", "5"], "--eta must be in [0, 1]", None),  # DDIM's coefficient: not real above 1
    (
        "backprop_steps_random_of_1",
        ["--backprop-steps-random"],
        "--backprop-steps-random draws K from 1..--backprop-steps, which is 1",
        None,
    ),
    (
        "pooled_without_weighting",
        ["--prompt-weight-pooled", "--no-prompt-weighting"],
        "--prompt-weight-pooled weights the pooled",
        None,
    ),
    ("output_dir_empty", ["--output-dir", ""], "--output-dir '': give a directory", None),
    ("output_dir_a_file", ["--output-dir", str(ROOT / "README.md")], "README.md' is a file: give a directory", None),
    (
        "output_dir_under_a_file",
        ["--output-dir", str(ROOT / "README.md" / "run")],
        "is a file, so the directory cannot be made",
        None,
    ),
    (
        "pretrained_not_cached",
        ["--pretrained", "someone/not-cached"],
        "--pretrained: 'someone/not-cached' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
        None,
    ),
    (
        "pretrained_missing_dir",
        ["--pretrained", "/no/such/dir"],
        "--pretrained: local directory '/no/such/dir' does not exist",
        None,
    ),
    (
        "reward_model_not_cached",
        ["--reward", "pickscore"],
        "--reward-models pickscore_model: 'yuvalkirstain/PickScore_v1' is not in the local",
        None,
    ),
]

DDPO_WRONG = [
    ("inner_epochs_0", ["--inner-epochs", "0"], "--inner-epochs must be >= 1", "--adv-clip-max"),
    ("adv_clip_max_0", ["--adv-clip-max", "0"], "--adv-clip-max must be > 0", "--inner-epochs"),
    ("num_steps_0", ["--num-steps", "0"], "--num-steps must be >= 1", "--inner-epochs"),
    ("sample_batch_size_0", ["--sample-batch-size", "0"], "--sample-batch-size", None),
    ("train_batch_size_0", ["--train-batch-size", "0"], "--train-batch-size", None),
    ("stat_buffer_size_0", ["--stat-buffer-size", "0"], "--stat-buffer-size", None),
    (
        "stat_min_count_above_buffer",
        ["--stat-min-count", "40"],
        "--stat-min-count 40 is more than --stat-buffer-size 32",
        None,
    ),
    ("lr_negative", ["--lr", "-1"], "--lr", None),
    ("lora_rank_0", ["--lora-rank", "0"], "--lora-rank", None),
    ("num_epochs_0", ["--num-epochs", "0"], "--num-epochs", None),
    ("save_every_0", ["--save-every", "0"], "--save-every", None),
    ("eval_every_negative", ["--eval-every", "-1"], "--eval-every", None),
    ("eval_num_0", ["--eval-every", "1", "--eval-num", "0"], "--eval-num", None),
    ("keep_checkpoints_negative", ["--keep-checkpoints", "-1"], "--keep-checkpoints", None),
    ("resolution_not_multiple", ["--resolution", "33"], "--resolution 33 is not a multiple of 2", None),
    ("eta_0", ["--eta", "0"], "--eta must be in (0, 1] for DDPO (0 gives sigma = 0", None),
    ("eta_above_1", ["--eta", "5"], "--eta must be in (0, 1] for DDPO", None),  # was accepted, then clamped
    (
        "pooled_without_weighting",
        ["--prompt-weight-pooled", "--no-prompt-weighting"],
        "--prompt-weight-pooled weights the pooled embedding",
        None,
    ),
    ("output_dir_empty", ["--output-dir", ""], "--output-dir '': give a directory", None),
    ("output_dir_a_file", ["--output-dir", str(ROOT / "README.md")], "is a file: give a directory", None),
    ("clip_range_0", ["--clip-range", "0"], "--clip-range must be > 0", None),
    ("t_sw", ["--t-sw", "-0.1"], "--t-sw must be in [0, 1]", None),
    (
        "samples_not_divisible",
        ["--samples-per-epoch", "6", "--sample-batch-size", "4"],
        "--samples-per-epoch 6 must be divisible by --sample-batch-size 4",
        None,
    ),
    ("train_batch_not_dividing", ["--train-batch-size", "3"], "--train-batch-size 3 must divide", None),
    ("group_size_1", ["--group-size", "1"], "--group-size must be 0 (off) or >= 2", None),
    ("group_size_negative", ["--group-size", "-2"], "--group-size must be 0 (off) or >= 2", None),
    ("group_size_not_dividing", ["--group-size", "3"], "--group-size 3 must divide --samples-per-epoch 4", None),
    (
        "group_size_with_tracker_settings",
        ["--group-size", "2", "--stat-min-count", "4"],
        "--stat-buffer-size / --stat-min-count tune the per-prompt tracker, which --group-size replaces",
        None,
    ),
    ("kl_beta_negative", ["--kl-beta", "-0.1"], "--kl-beta must be a number >= 0", None),
    ("kl_beta_nan", ["--kl-beta", "nan"], "--kl-beta must be a number >= 0", None),
    ("ema_decay_negative", ["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1)", None),
    ("ema_decay_nan", ["--ema-decay", "nan"], "--ema-decay must be in [0, 1)", None),
    ("ema_every_0", ["--ema-decay", "0.9", "--ema-every", "0"], "--ema-every must be >= 1", "--ema-decay"),
    ("ema_every_without_decay", ["--ema-every", "4"], "--ema-every 4 does nothing without --ema-decay", None),
    ("reward_weight", ["--reward", "hps:abc"], "--reward", None),
    (
        "reward_model_not_cached",
        ["--reward", "aesthetic"],
        "--reward-models aesthetic_clip: 'openai/clip-vit-large-patch14' is not in the local",
        None,
    ),
]


@pytest.mark.parametrize("case, extra, flag, not_blamed", ALIGNPROP_WRONG, ids=[c[0] for c in ALIGNPROP_WRONG])
def test_alignprop_wrong_invocation(
    case, extra, flag, not_blamed, tiny_sd_dir, tiny_aesthetic, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    code, _, err = run_main(
        train_alignprop, alignprop_argv(tiny_sd_dir, tiny_aesthetic, out, *extra), monkeypatch, capsys
    )
    assert_one_error_line(code, err, flag)
    assert not_blamed is None or not_blamed not in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("case, extra, flag, not_blamed", DDPO_WRONG, ids=[c[0] for c in DDPO_WRONG])
def test_ddpo_wrong_invocation(case, extra, flag, not_blamed, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(train_ddpo, ddpo_argv(tiny_sd_dir, out, *extra), monkeypatch, capsys)
    assert_one_error_line(code, err, flag)
    assert not_blamed is None or not_blamed not in err, err
    assert not out.exists()


def test_missing_reward_checkpoint_names_the_real_override(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """Every checkpoint is checked before any is loaded; the fix names --reward-models KEY DIR (a flag
    that exists), and 'unset HF_HUB_OFFLINE' is said only when it is set."""
    argv = ddpo_argv(
        tiny_sd_dir,
        tmp_path / "out",
        "--reward",
        "pickscore",
        "--reward-models",
        "pickscore_model",
        tmp_path / "no-such-dir",
    )
    code, _, err = run_main(train_ddpo, argv, monkeypatch, capsys)
    assert_one_error_line(
        code, err, f"--reward-models pickscore_model: local directory '{tmp_path / 'no-such-dir'}' does not exist"
    )
    code, _, err = run_main(
        train_ddpo, ddpo_argv(tiny_sd_dir, tmp_path / "out", "--reward", "pickscore"), monkeypatch, capsys
    )
    assert_one_error_line(
        code, err, "pass its local directory with --reward-models pickscore_model DIR, or unset HF_HUB_OFFLINE"
    )
    assert "--pickscore-model" not in err


def test_offline_without_hf_hub_offline_fails_fast(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """No HF_HUB_OFFLINE and a hub that cannot be reached (here: a closed local port): one HEAD request
    with a short timeout, no retries, a line that does not tell the user to unset anything."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    t0 = time.time()
    code, _, err = run_main(train_ddpo, ddpo_argv("someone/not-cached", tmp_path / "out"), monkeypatch, capsys)
    assert_one_error_line(
        code,
        err,
        "--pretrained: 'someone/not-cached' is not in the local Hugging Face cache and the hub cannot be reached",
    )
    assert "HF_HUB_OFFLINE" not in err and time.time() - t0 < 10


def test_diffusers_hub_fallback_warning_is_dropped_while_loading():
    """diffusers' "Couldn't connect to the Hub ... Will try to load from local cache" says nothing after
    check_checkpoints and must not come before a one-line error; other warnings still show."""
    import logging

    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Collect()
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with diffusion._quiet_hub_fallback():
            logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
            logger.warning("Couldn't connect to the Hub: offline.\nWill try to load from local cache.")
            logger.warning("something else")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert seen == ["something else"]


def test_one_wrong_invocation_as_a_user_runs_it(tmp_path):
    """The process itself: imports print nothing, the line is the only output on stderr, exit 2."""
    proc = subprocess.run([sys.executable, ROOT / "train_alignprop.py", "--lora-rank", "0", "--output-dir", tmp_path / "out"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr == "error: --lora-rank must be >= 1, got 0\n", proc.stderr


# --- one run per output directory --------------------------------------------------------------------


def fake_run(out: Path, args: dict | None = None, checkpoints=(), partial=True):
    """An output directory as a run leaves it: args.json, log.jsonl, eval/initial, images/ (partial)
    and the given checkpoint folders."""
    out.mkdir(parents=True, exist_ok=True)
    if args is not None:
        (out / "args.json").write_text(json.dumps(rundir.jsonable(args)))
    if partial:
        (out / "log.jsonl").write_text(json.dumps({"epoch": -1, "samples": 0}) + "\n")
        (out / "eval" / "initial").mkdir(parents=True)
        (out / "images").mkdir()
    for name in checkpoints:  # complete files (the trainers check them before loading), not real weights
        ckpt = out / "checkpoints" / name
        ckpt.mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, ckpt / "pytorch_lora_weights.safetensors")
        torch.save({}, ckpt / "training_state.pt")


def recorded(args, trainer: str) -> dict:
    """The arguments a run records in args.json: as parsed, with --w-high's default (None: the family's) resolved
    for the tiny SD model, as preflight does before anything is written."""
    return runs.flat_args(dataclasses.replace(args, diffexp=args.diffexp.for_family("sd", trainer)))


def test_a_run_killed_before_its_first_checkpoint_is_not_mixed_with_a_new_one(
    tiny_sd_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    fake_run(out)
    code, _, err = run_main(train_ddpo, ddpo_argv(tiny_sd_dir, out), monkeypatch, capsys)
    assert_one_error_line(code, err, "stopped before its first checkpoint (log.jsonl, eval/, images/)")
    assert "pass --resume" in err and "--overwrite" in err
    assert (out / "log.jsonl").exists()  # untouched


def test_a_run_with_checkpoints_is_refused(tiny_sd_dir, tiny_aesthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    fake_run(out, checkpoints=["epoch_0000", "epoch_0001"])
    code, _, err = run_main(train_alignprop, alignprop_argv(tiny_sd_dir, tiny_aesthetic, out), monkeypatch, capsys)
    assert_one_error_line(
        code, err, f"--output-dir {out} already holds a run (checkpoints up to epoch_0001): pass --resume"
    )
    assert "--overwrite" in err


def test_resume_with_changed_arguments_is_refused_in_one_line(
    tiny_sd_dir, tiny_aesthetic, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    first = train_alignprop.cli(
        [str(a) for a in alignprop_argv(tiny_sd_dir, tiny_aesthetic, out, "--explore-frac", 0.75, "--num-epochs", 4)]
    )
    fake_run(out, recorded(first, "alignprop"), checkpoints=["epoch_0000"])
    changed = [
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--prompts",
        "animals_activities",
        "--num-epochs",
        "8",
        "--eval-every",
        "2",
        "--keep-checkpoints",
        "1",
    ]
    argv = alignprop_argv(
        tiny_sd_dir, tiny_aesthetic, out, "--explore-frac", 0.75, "--num-epochs", 4, "--resume", *changed
    )
    code, _, err = run_main(train_alignprop, argv, monkeypatch, capsys)
    assert_one_error_line(code, err, "--resume: these arguments differ from the run's")
    # --num-epochs says why it matters: the exploration window (the first 75% of the epochs) moves
    assert (
        "--num-epochs 4 -> 8 (it moves DiffExp's exploration window, the first 0.75 of the epochs: epochs 0-2 of 4, "
        "0-5 of 8), --prompts simple_animals -> animals_activities, --lr 0.001 -> 0.01, --seed 0 -> 3;" in err
    )
    assert "--eval-every" not in err and "--keep-checkpoints" not in err  # harmless ones
    assert "--allow-changed-args" in err


def test_check_run_dir_decisions(tmp_path):
    """What each combination of --resume / --overwrite / --allow-changed-args does, read-only."""
    base = train_ddpo.cli(["--output-dir", str(tmp_path / "run"), "--num-epochs", "4", "--explore-frac", "1.0"])

    def plan(**kw):
        return rundir.plan_run(rundir.jsonable(runs.flat_args(runs.replace_flat(base, **kw))))

    assert plan().mode == "new"
    fake_run(tmp_path / "run", runs.flat_args(base))
    assert plan(resume=True).mode == "restart"  # killed before its first checkpoint: start again in place
    assert plan(overwrite=True).mode == "overwrite"
    fake_run(tmp_path / "run", checkpoints=["epoch_0001"], partial=False)
    p = plan(resume=True, eval_every=1, track=True)
    assert (p.mode, p.checkpoint.name, p.changed, p.finished) == ("resume", "epoch_0001", {}, False)
    assert plan(resume=True, compile=True, kernels="eager").changed == {}  # how, not what, it computes
    # --num-epochs alone is harmless while every epoch explores alike (explore_frac 1.0: extending a run) ...
    assert plan(resume=True, num_epochs=10).changed == {}
    assert plan(resume=True, num_epochs=2).finished  # ... and a run that holds its last epoch has nothing left to do
    # ... but not when it moves DiffExp's exploration window (explore_frac 0.75 of 4 vs 8 epochs)
    # args.json = the run's current args
    rundir.RunLog(tmp_path / "run").start(runs.flat_args(runs.replace_flat(base, explore_frac=0.75)))
    with pytest.raises(ValueError, match=r"--num-epochs 4 -> 8"):
        plan(resume=True, num_epochs=8, explore_frac=0.75)
    p = plan(resume=True, num_epochs=8, explore_frac=0.75, lr=1.0, allow_changed_args=True)
    assert p.changed == {"num_epochs": [4, 8], "lr": [3e-4, 1.0]}
    assert (
        len((tmp_path / "run" / "args.jsonl").read_text().splitlines()) == 1
    )  # the history is appended, not overwritten


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    out = tmp_path / "run"
    fake_run(out, {"lr": 1.0}, checkpoints=["epoch_0000"])
    (out / "args.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    args = train_ddpo.cli(["--output-dir", str(out), "--overwrite"])
    deleted = rundir.prepare_run_dir(out, rundir.plan_run(rundir.jsonable(runs.flat_args(args))))
    assert deleted == ["checkpoints", "log.jsonl", "eval", "images", "args.json", "args.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_of_a_finished_run_loads_nothing(tiny_sd_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ddpo_argv(tiny_sd_dir, out, "--num-epochs", 2)
    fake_run(out, recorded(train_ddpo.cli([str(a) for a in argv]), "ddpo"), checkpoints=["epoch_0000", "epoch_0001"])
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    train_ddpo.main(train_ddpo.cli([str(a) for a in [*argv, "--resume"]]))
    assert "nothing to do: the run in" in capsys.readouterr().out


# --- checkpoints ----------------------------------------------------------------------------------------


def test_checkpoints_are_sorted_by_epoch_and_keep_zero_keeps_all(tiny_sd_dir, tmp_path):
    pipe = diffusion.load_pipeline(str(tiny_sd_dir))
    diffusion.add_lora(pipe.unet, 4, 4.0)
    for epoch in (9, 10, 11, 12):
        rundir.save_checkpoint(tmp_path / "all", epoch, pipe.unet, {"epoch": epoch}, keep=0)
        rundir.save_checkpoint(tmp_path / "two", epoch, pipe.unet, {"epoch": epoch}, keep=2)
    (tmp_path / "all" / "checkpoints" / "epoch_10000").mkdir()  # past 9999 the names no longer sort as numbers
    assert [p.name for p in rundir.checkpoints(tmp_path / "all")] == [
        "epoch_0009",
        "epoch_0010",
        "epoch_0011",
        "epoch_0012",
        "epoch_10000",
    ]
    assert [p.name for p in rundir.checkpoints(tmp_path / "two")] == ["epoch_0011", "epoch_0012"]
    mode = 0o666 & ~rundir._umask()
    for f in (tmp_path / "two" / "checkpoints" / "epoch_0012").iterdir():
        assert f.stat().st_mode & 0o777 == mode, f  # like every other output (safetensors alone would give 0600)
    from safetensors import safe_open

    with safe_open(tmp_path / "two" / "checkpoints" / "epoch_0012" / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.target_modules"] == sorted(meta["unet.target_modules"])  # not a set's hash-seed order
    raw = (tmp_path / "two" / "checkpoints" / "epoch_0012" / "pytorch_lora_weights.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])  # not a hash map's order either


def test_vae_downsampling_is_read_without_loading(tiny_sd_dir):
    assert diffusion.vae_downsampling(str(tiny_sd_dir)) == (2, f"--pretrained {tiny_sd_dir}")
    assert diffusion.vae_downsampling("toy")[0] == 2
    assert diffusion.vae_downsampling("someone/not-cached") == (8, "assumed")


# --- --help ---------------------------------------------------------------------------------------------


def parse_help(trainer, monkeypatch, capsys) -> dict[str, str]:
    """{flag: its help text without '(default: ...)'} from `--help`, as printed to a 120-column terminal
    (one column of sections)."""
    monkeypatch.setenv("COLUMNS", "120")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        trainer.cli(["--help"])
    entries, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"\s{1,3}(-[^\s,]+)(?:, (--[^\s,]+))?(?: \S+)*?(?:\s{2,}(.*))?$", line.rstrip())
        if m:
            flag = m.group(1) if m.group(1).startswith("--") else m.group(2)
            entries[flag] = m.group(3) or ""
        elif flag and line.startswith(" " * 8):
            entries[flag] += " " + line.strip()
    return {f: re.sub(r"\s*\(default: [^)]*\)\s*$", "", " ".join(h.split())) for f, h in entries.items()}


@pytest.mark.parametrize("trainer", [train_alignprop, train_ddpo], ids=["alignprop", "ddpo"])
def test_help_documents_every_flag(trainer, monkeypatch, capsys):
    helps = parse_help(trainer, monkeypatch, capsys)
    for name in runs.flat_args(trainer.Args()):
        flag = "--" + name.replace("_", "-")
        text = helps.get(flag)
        assert text is not None, f"{flag} is not in --help"
        # at least a phrase, not a section comment ("run", "PPO") picked up as help
        assert len(text.split()) >= 3 and text not in ("run", "PPO", "model and reward", "sampling", "optimisation"), (
            flag,
            text,
        )
    assert all(name in helps["--reward"] for name in rewards.NAMES), helps["--reward"]
    assert all(key in helps["--reward-models"] for key in rewards.DEFAULT_MODELS), helps["--reward-models"]
    assert "0 keeps all" in helps["--keep-checkpoints"] and "auto" in helps["--mixed-precision"]


# --- the toy preset ------------------------------------------------------------------------------------

TOY_LONG = {
    "alignprop": "--pretrained toy --reward pickscore --reward-models pickscore_model toy-scorer pickscore_processor toy-scorer "
    "--prompts toy_two_shapes --eval-prompts toy_unseen --num-steps 10 --mixed-precision no --num-epochs 30 "
    "--samples-per-epoch 16 --batch-size 8 --gradient-accumulation-steps 2 --eval-every 5 --eval-num 16 --output-dir runs/toy-alignprop",
    "ddpo": "--pretrained toy --reward pickscore --reward-models pickscore_model toy-scorer pickscore_processor toy-scorer "
    "--prompts toy_two_shapes --eval-prompts toy_unseen --num-steps 10 --mixed-precision no --num-epochs 30 "
    "--samples-per-epoch 16 --sample-batch-size 8 --train-batch-size 8 --gradient-accumulation-steps 2 --eval-every 5 --eval-num 16 "
    "--output-dir runs/toy-ddpo",
}


@pytest.mark.parametrize("trainer", [train_alignprop, train_ddpo], ids=["alignprop", "ddpo"])
def test_toy_preset_is_the_long_toy_command_and_flags_override_it(trainer):
    name = trainer.__name__.removeprefix("train_")
    preset, long = trainer.cli(["--config", "toy"]), trainer.cli(TOY_LONG[name].split())
    assert {**runs.flat_args(preset), "config": None} == runs.flat_args(long)
    tweaked = trainer.cli(["--config=toy", "--num-epochs", "2", "--reward-models", "pickscore_model", "/elsewhere"])
    assert (tweaked.num_epochs, tweaked.model.pretrained) == (2, "toy")
    assert tweaked.model.reward_models == {
        "pickscore_model": "/elsewhere",
        "pickscore_processor": "toy-scorer",
    }  # key by key


def test_toy_preset_runs_offline_end_to_end(tmp_path):
    """`python train_alignprop.py --config toy` as a user types it (one short epoch here), offline."""
    out = tmp_path / "toy"
    proc = run_script("train_alignprop.py", "--config", "toy", "--num-epochs", 1, "--samples-per-epoch", 8, "--gradient-accumulation-steps", 1,
                      "--eval-num", 2, "--output-dir", out)  # fmt: skip
    assert proc.stdout.startswith("mixed precision: no")
    # 10 steps, t_sw 0.8: w_low on 901 and 801; K = 1 misses them, and the run says so
    assert "the CFG schedule's w_low steps are the first 2, so no gradient passes" in proc.stdout
    log = read_log(out)
    assert [r["epoch"] for r in log] == [-1, 0] and "eval_reward_mean" in log[-1]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["epoch_0000", "initial"]
    assert (out / "checkpoints" / "epoch_0000" / "pytorch_lora_weights.safetensors").exists()


# --- what a short DDPO run shows -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddpo_runs(tiny_sd_dir, tmp_path_factory):
    """Two one-epoch DDPO runs in this process, with and without --per-prompt-stat-tracking, recording
    the tracker's calls, the console and the files. The first also: 4 steps at t_sw 0.8 (a CFG schedule
    that never switches), evaluation with --eval-num above the 6 prompts of unseen_animals, the
    --mixed-precision default (auto)."""
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        real = train_ddpo.PerPromptStatTracker.__call__

        def spy(self, prompts, rewards_np):
            calls.append(list(prompts))
            return real(self, prompts, rewards_np)

        mp.setattr(train_ddpo.PerPromptStatTracker, "__call__", spy)
        for name, extra in [
            ("tracked", ["--t-sw", "0.8", "--eval-every", "1", "--eval-num", "10"]),
            ("batch", ["--no-per-prompt-stat-tracking"]),
        ]:
            out = tmp_path_factory.mktemp("ddpo") / name
            argv = ddpo_argv(tiny_sd_dir, out, "--num-epochs", 1, *extra)
            if name == "tracked":
                i = argv.index("--mixed-precision")
                del argv[i : i + 2]  # the default, auto
            stdout, stderr = StringIO(), StringIO()
            calls.clear()
            with redirect_stdout(stdout), redirect_stderr(stderr):
                train_ddpo.main(train_ddpo.cli([str(a) for a in argv]))
            runs[name] = {"out": out, "calls": list(calls), "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
    return runs


def test_per_prompt_stat_tracking_flag_reaches_the_training_loop(ddpo_runs):
    tracked, batch = ddpo_runs["tracked"], ddpo_runs["batch"]
    assert len(tracked["calls"]) == 1 and len(tracked["calls"][0]) == 4  # the epoch's 4 trajectories' prompts
    assert batch["calls"] == []


def test_a_run_says_what_it_does(ddpo_runs):
    run = ddpo_runs["tracked"]
    out, stdout, stderr = run["out"], run["stdout"], run["stderr"]
    assert stdout.startswith("mixed precision: no, float32 (--mixed-precision auto")
    assert json.loads((out / "args.json").read_text())["mixed_precision"] == "no"
    assert "note: --eval-num 10 is more than the 6 prompts of --eval-prompts unseen_animals: evaluating all 6" in stdout
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --t-sw 0.8 with --num-steps 4: no sampling timestep (751, 501, 251, 1) reaches t_sw*T = 800, so the CFG schedule "
        "never uses --w-low; raise --num-steps or lower --t-sw (or pass --no-cfg-schedule)"
    ]
    assert re.search(r"before training: held-out reward -?\d+\.\d{4} \(6 prompts\)", stdout), stdout
    assert re.search(r"epoch 0 samples 4 reward \S+ eval -?\d+\.\d{4} approx_kl", stdout), stdout  # the held-out reward
    # eval/ and checkpoints/ use the same numbers; the initial evaluation has its own name
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["epoch_0000", "initial"]
    assert len(json.loads((out / "eval" / "initial" / "prompts.json").read_text())["prompts"]) == 6
    assert (out / "checkpoints" / "epoch_0000").is_dir()
    history = [json.loads(line) for line in (out / "args.jsonl").read_text().splitlines()]
    assert [h["mode"] for h in history] == ["new"] and history[0]["args"]["t_sw"] == 0.8


def test_training_grid_shows_the_epochs_samples_large_with_prompts(ddpo_runs):
    from PIL import Image

    grid = Image.open(ddpo_runs["batch"]["out"] / "images" / "epoch_0000.png")
    # 4 samples of 32 px from 2 batches, each tile upscaled to 128 px, a caption band under each row
    assert grid.size[0] == 2 * (128 + 4) + 4 and grid.size[1] > 2 * (128 + 4) + 4, grid.size


def test_resume_of_a_run_killed_before_its_first_checkpoint_restarts_it(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        str(a)
        for a in ddpo_argv(
            tiny_sd_dir, out, "--num-epochs", 1, "--num-steps", 2, "--samples-per-epoch", 2, "--train-batch-size", 1
        )
    ]
    fake_run(out, runs.flat_args(train_ddpo.cli(argv)))
    (out / "images" / "epoch_0000.png").write_bytes(b"old")
    (out / "args.jsonl").write_text(json.dumps({"mode": "new"}) + "\n")
    train_ddpo.main(train_ddpo.cli(argv + ["--resume"]))
    assert "restarting it from epoch 0 (deleted log.jsonl, eval, images)" in capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == [-1, 0]  # one run, not two
    assert (out / "images" / "epoch_0000.png").read_bytes()[:4] == b"\x89PNG"
    assert [json.loads(line)["mode"] for line in (out / "args.jsonl").read_text().splitlines()] == ["new", "restart"]
    assert not os.path.exists(out / "eval" / "initial")  # --eval-every 0: the old run's evaluation is gone, not kept


def test_resume_drops_a_torn_log_line(tmp_path):
    """A run killed while writing log.jsonl leaves half a line: resuming drops it with the later epochs."""
    from rundir import RunLog

    (tmp_path / "log.jsonl").write_text('{"epoch": -1}\n{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "rew')
    RunLog(tmp_path).truncate_after(0)
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": -1}\n{"epoch": 0}\n'
