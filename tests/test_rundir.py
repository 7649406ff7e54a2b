"""rundir.py, the one set of rules for the folder every script writes: held by one process (what a stale
lock says), one result per folder (train_reward.py's --out held too), what a checkpoint records and what
--resume checks against it (the trainer, the base model's fingerprint), what a resumed run says about a
damaged log, --resume taking the run's own arguments, and captions of prompts of any length."""

import json
import os
import shutil
import sys
import threading

import pytest
import torch

import rundir
import runs
import train_alignprop
import train_ddpo
from conftest import read_log, run_main


def ddpo_argv(sd, out, *extra):
    return [str(a) for a in [
        "--pretrained", sd, "--reward", "jpeg", "--num-steps", 2, "--samples-per-epoch", 2, "--sample-batch-size", 2,
        "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0,
        "--output-dir", out, *extra,
    ]]  # fmt: skip


# --- held by one process --------------------------------------------------------------------------------


def test_a_live_unrelated_pid_in_a_free_lock_is_not_called_dead(tmp_path):
    """A .lock whose flock is free was left by a process that ended; its number may belong to a live, unrelated
    process by now (here: this test's parent). The note must not claim that process is not running (the old
    note said 'which is no longer running' of a live PID)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "owner": "ddpo", "started": "then"}))
    held = rundir.hold(out, "alignprop")
    try:
        assert held.notes == [
            f"note: {out} was left locked by process {os.getppid()} (ddpo, started then), which no longer holds it "
            f"(it was killed): taken over"
        ]
    finally:
        held.release()


def test_train_reward_holds_its_out(tmp_path, capsys):
    """train_reward.py had no lock: two runs on one --out wrote into each other. It now holds --out as every
    writer does (the hold here is this process's own: flock conflicts across open files)."""
    from PIL import Image

    import train_reward as tr

    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (40 * i, 100, 200 if cls == "a" else 0)).save(data / cls / f"{i}.png")
    held = rundir.hold(tmp_path / "out", "someone")
    try:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            tr.main(tr.Args(data=str(data), out=str(tmp_path / "out"), epochs=1, image_size=8, width=4, val_frac=0.5))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(
            f"error: --out {tmp_path / 'out'} is in use by process {os.getpid()}"
        )
    finally:
        held.release()


# --- what a checkpoint records, what --resume checks -------------------------------------------------------


def test_fingerprint_sees_weights_changed_in_place_not_another_variant(tiny_sd_dir, tmp_path):
    base = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, base)
    before = rundir.base_fingerprint(str(base))
    assert set(before) >= {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    (base / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"another variant, never loaded")
    assert rundir.base_fingerprint(str(base)) == before
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # the same size and header: a weight changed at the same path
    weights.write_bytes(bytes(data))
    after = rundir.base_fingerprint(str(base))
    assert [k for k in before if before[k] != after[k]] == ["unet"]
    assert rundir.base_fingerprint("someone/not-downloaded") is None


@pytest.fixture(scope="module")
def alignprop_run(tiny_sd_dir, tiny_aesthetic, tmp_path_factory):
    """One epoch of AlignProp on a copy of the tiny model (so the test may change the base under the run)."""
    root = tmp_path_factory.mktemp("alignprop")
    base, out = root / "sd", root / "run"
    shutil.copytree(tiny_sd_dir, base)
    argv = ["--pretrained", base, "--reward", "aesthetic", *tiny_aesthetic, "--num-steps", 2, "--samples-per-epoch", 2,
            "--batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0,
            "--num-epochs", 1, "--output-dir", out]  # fmt: skip
    run_main("train_alignprop.py", *argv)
    return base, out, [str(a) for a in argv]


def test_each_checkpoint_records_its_trainer_and_base(alignprop_run):
    base, out, _ = alignprop_run
    record = json.loads((out / "checkpoints" / "epoch_0000" / "checkpoint.json").read_text())
    assert {k: record[k] for k in ("trainer", "family", "pretrained", "epoch")} == {
        "trainer": "alignprop", "family": "sd", "pretrained": str(base), "epoch": 0
    }  # fmt: skip
    assert record["base"] == rundir.base_fingerprint(str(base))


@pytest.mark.parametrize("record", ["checkpoint.json", "none (a checkpoint from before the record)"])
def test_ddpo_never_continues_an_alignprop_run_whose_files_were_tidied(record, alignprop_run, tmp_path, capsys):
    """The issue's harm: with run.json and args*.json gone, train_ddpo.py --resume continued an AlignProp run
    from its checkpoint (AlignProp epochs then a DDPO epoch in one log). The checkpoint says which trainer
    wrote it; one from before that record is told by its training state (DDPO's holds its prompt tracker)."""
    _, source, _ = alignprop_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    for name in ("run.json", "args.json", "args.jsonl"):
        (out / name).unlink()
    if record.startswith("none"):
        (out / "checkpoints" / "epoch_0000" / "checkpoint.json").unlink()
    log = (out / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        train_ddpo.main(train_ddpo.cli(ddpo_argv(source.parent / "sd", out, "--resume", "--num-epochs", 2)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert (
        f"--output-dir {out} holds an AlignProp run (train_alignprop.py)" in err
        and "resume it with train_alignprop.py" in err
    )
    assert (out / "log.jsonl").read_text() == log  # nothing written


def test_resume_on_a_base_changed_at_the_same_path_is_refused(alignprop_run, tmp_path):
    base, source, argv = alignprop_run
    out, changed = tmp_path / "run", tmp_path / "sd"
    shutil.copytree(source, out)
    shutil.copytree(base, changed)
    (out / "args.json").write_text((out / "args.json").read_text().replace(str(base), str(changed)))
    record = out / "checkpoints" / "epoch_0000" / "checkpoint.json"
    args = train_alignprop.cli(
        [*argv[: argv.index("--output-dir")], "--output-dir", str(out), "--num-epochs", "2", "--resume"]
    )
    args = runs.replace_flat(args, pretrained=str(changed))
    flat = rundir.jsonable(runs.flat_args(args))
    assert rundir.plan_run(flat, "alignprop", "sd").notes == ()  # the same files at another path: the same base
    weights = changed / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # one weight of the UNet changed, nothing else
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        rundir.plan_run(flat, "alignprop", "sd")
    assert str(e.value).startswith(
        f"--resume: --pretrained {changed} is not the base model checkpoint epoch_0000 was trained on: it differs in unet"
    )
    assert "--allow-changed-args" in str(e.value)
    plan = rundir.plan_run(flat | {"allow_changed_args": True}, "alignprop", "sd")
    assert plan.mode == "resume" and plan.notes[0].startswith(
        "note: --allow-changed-args: continuing although --pretrained"
    )
    record.unlink()  # a checkpoint from before the record: resumed, and said that the base cannot be checked
    plan = rundir.plan_run(flat, "alignprop", "sd")
    assert (
        plan.mode == "resume"
        and "was written before checkpoints recorded their trainer and base model" in plan.notes[0]
    )


def test_resume_takes_the_runs_own_arguments(tmp_path):
    """--resume without --config toy (or without --pretrained) suggested downloading SD 1.5 although the run
    records its base: the flags not given now take the run's values; a flag given still overrides them."""
    out = tmp_path / "run"
    toy = train_ddpo.cli(["--config", "toy", "--output-dir", str(out), "--num-epochs", "7"])
    rundir.RunLog(out).start(runs.flat_args(toy), {"trainer": "ddpo", "family": "sd"})
    resumed = train_ddpo.cli(["--output-dir", str(out), "--resume"])
    assert runs.flat_args(resumed) == runs.flat_args(toy) | {"resume": True}
    assert resumed.config == "toy" and resumed.model.pretrained == "toy" and resumed.num_epochs == 7
    assert train_ddpo.cli(["--output-dir", str(out), "--resume", "--num-epochs", "9"]).num_epochs == 9
    # Only the run's own trainer reads it (an AlignProp --resume there is refused later, not given DDPO's flags).
    assert train_alignprop.cli(["--output-dir", str(out), "--resume"]).model.pretrained == runs.ModelArgs.pretrained


# --- what a resumed run says about its log ----------------------------------------------------------------


def test_resume_says_what_the_log_lost(tmp_path):
    """A deleted or cut log.jsonl is no reason to stop (the checkpoint is the state), but what it lost is said,
    not dropped silently; what epochs after the checkpoint wrote is dropped (they are redone)."""
    log = rundir.RunLog(tmp_path)
    notes = log.truncate_after(3)
    assert notes == [
        f"note: --resume: {tmp_path / 'log.jsonl'} is missing: the history of epochs 0-3 is lost; the log goes on from epoch 4"
    ]
    (tmp_path / "log.jsonl").write_text('{"epoch": -1}\n{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "rew')
    notes = log.truncate_after(3)
    assert (tmp_path / "log.jsonl").read_text() == '{"epoch": -1}\n{"epoch": 0}\n{"epoch": 1}\n'
    assert notes[0].startswith(
        f"note: --resume: dropped 1 unreadable line(s) of {tmp_path / 'log.jsonl'} (cut while being written"
    )
    assert notes[1].startswith(f"note: --resume: {tmp_path / 'log.jsonl'} has no line for epoch(s) 2, 3 (lost")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(-1, 6)))
    assert log.truncate_after(3) == [] and [r["epoch"] for r in read_log(tmp_path)] == [-1, 0, 1, 2, 3]


def test_a_resumed_run_says_its_log_was_cut(tiny_sd_dir, tmp_path):
    """Also a run of a prompt set holding a 300 KB line: one tiny epoch of it had not finished after 4 minutes
    (the caption, and prompt weighting tokenising every word); here it takes seconds."""
    out, prompts = tmp_path / "run", tmp_path / "prompts.txt"
    prompts.write_text(("a blue dog on a green mat " * 12_000) + "\n")  # one prompt: every sample has it
    run_main("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 1, "--prompts", prompts))
    (out / "log.jsonl").write_text((out / "log.jsonl").read_text()[:-10])  # the last line cut mid-way
    proc = run_main("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 2, "--resume"))
    assert "dropped 1 unreadable line(s)" in proc.stdout and "has no line for epoch(s) 0 (lost" in proc.stdout
    assert [r["epoch"] for r in read_log(out)] == [-1, 1]
    assert "epochs:" not in proc.stderr  # stderr is no terminal here: no progress bar frames between the lines


# --- a caption of any length ----------------------------------------------------------------------------


def finishes_within(seconds: float, fn):
    """fn()'s result if it returns within `seconds` (the broken caption code took hours, not seconds)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert result, f"did not finish within {seconds} s"
    return result[0]


def test_a_megabyte_prompt_is_captioned_quickly_and_fits(tmp_path):
    """A 5 MB prompt line died after minutes in the grid's caption (PIL: too many characters) and a 300 KB one
    took hours (the caption was cut one character at a time, measuring the whole line each time). Placed by
    hand, the old wrapping failed both: PIL's error on the 5 MB line, and no end within the limit at 300 KB."""
    from PIL import Image, ImageDraw, ImageFont

    huge = ("a red cat on a blue mat " * 250_000)[:5_000_000]
    grid = finishes_within(
        20, lambda: rundir.save_sample_grid(torch.rand(2, 3, 32, 32), [huge, "a cat"], tmp_path / "g.png")
    )
    assert Image.open(grid).size[0] > 128
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
    lines = finishes_within(30, lambda: rundir.wrap_caption(draw, huge, font, 128))
    assert finishes_within(30, lambda: rundir.wrap_caption(draw, huge[:300_000], font, 128)) == lines  # the slow one
    assert len(lines) == 2 and lines[0].startswith("a red cat") and lines[1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 128 for line in lines)
    assert rundir.wrap_caption(draw, "a cat", font, 128) == ["a cat"]
    long_word = rundir.wrap_caption(draw, "x" * 500, font, 128)
    assert len(long_word) == 1 and long_word[0].endswith("...") and draw.textlength(long_word[0], font=font) <= 128


def test_a_long_prompt_is_tokenised_only_as_far_as_the_encoder_reads(tokenizer):
    """Prompt weighting tokenised every word of a prompt, also those past the encoder's 77 tokens: 3 s per
    sample for a 300 KB line. Words past the cut have no positions, so they are no longer tokenised: the
    tokenizer is called for the words up to the cut, not for each of the prompt's words (placed by hand:
    without the cut-off, 5000 calls)."""
    from explore import word_token_positions

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(args[0])
            return self.inner(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    long = "a red cat sits on the mat " * 700  # 4900 words
    words = word_token_positions(long, Counting(tokenizer))
    assert len(words) == len(long.split()) and words[0] == ("a", [1]) and words[-1] == ("mat", [])
    assert len(calls) <= 80  # "" once, then one call per word until position 76
    assert words == word_token_positions(long, tokenizer)[: len(words)]
    short = word_token_positions("a red cat", tokenizer)
    assert [w for w, _ in short] == ["a", "red", "cat"] and all(pos for _, pos in short)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
