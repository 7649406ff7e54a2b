"""Nothing a user runs is mixed, overwritten or lost: one process holds a run's directory from its first
moment (a second is refused, a dead holder's lock is taken over), a run is continued only by the trainer
that made it, sample.py's results own their directories, Ctrl-C stops with one line and resumes exactly,
prompts a reward cannot read fail before anything loads; the notes a run prints about what it was given;
bf16 end to end on a CPU."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rundir
import runs
import sample
import train_alignprop
import train_ddpo
from conftest import ROOT, lora_weights, read_log, run_main, run_script


def ddpo_argv(sd, out, *extra):
    return [
        "--pretrained", sd, "--reward", "jpeg", "--num-steps", 2, "--samples-per-epoch", 2, "--sample-batch-size", 2,
        "--train-batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no", "--eval-every", 0,
        "--output-dir", out, "--explore-frac", 1.0, "--t-sw", 0.5, *extra,
    ]  # fmt: skip


def start(script, *argv, env=None):
    cmd = [sys.executable, str(ROOT / script), *map(str, argv)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # SIGINT as in a terminal: a shell without job control (CI in the background, nohup) starts children
    # with SIGINT ignored, and Python then never raises KeyboardInterrupt (the Ctrl-C test's run finished).
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.1)


def one_error_line(proc_or_err, code=2):
    out, err = proc_or_err.communicate(timeout=300) if hasattr(proc_or_err, "communicate") else ("", proc_or_err)
    if hasattr(proc_or_err, "returncode"):
        assert proc_or_err.returncode == code, (proc_or_err.returncode, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("epochs:")]  # not the progress bar
    assert len(lines) == 1, err
    return lines[0]


# --- one process per directory ------------------------------------------------------------------------


def test_a_second_run_on_a_held_directory_is_refused_and_the_first_is_intact(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    first = start("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 12))  # long enough to meet the second
    wait_for(out / ".lock", first)  # held before the model loads: the second comes "a few seconds after"
    assert not (out / "args.json").exists()
    second = start(
        "train_alignprop.py", "--config", "toy", "--output-dir", out
    )  # every input valid: only the directory is not
    line = one_error_line(second)
    assert line.startswith(f"error: --output-dir {out} is in use by process {first.pid} (ddpo, started ")
    stdout, _ = first.communicate(timeout=300)
    assert first.returncode == 0, stdout
    assert [r["epoch"] for r in read_log(out)] == list(range(-1, 12))
    assert [json.loads(ln)["mode"] for ln in (out / "args.jsonl").read_text().splitlines()] == ["new"]
    assert not (out / ".lock").exists()  # released at the end


def test_a_killed_holder_is_taken_over_with_a_note(tmp_path):
    out = tmp_path / "held"
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import rundir; h = rundir.hold({str(out)!r}, 'ddpo'); print('held', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ValueError, match=rf"is in use by process {holder.pid} \(ddpo"):
        rundir.hold(out, "alignprop")
    holder.kill()  # SIGKILL: no clean-up ran, the .lock file stays
    holder.wait()
    assert (out / ".lock").exists()
    held = rundir.hold(out, "alignprop")
    try:
        assert len(held.notes) == 1 and held.notes[0].startswith(
            f"note: {out} was left locked by process {holder.pid} (ddpo, started "
        )
        assert held.notes[0].endswith("which no longer holds it (it was killed): taken over")
    finally:
        held.release()
    assert out.is_dir() and not (out / ".lock").exists()  # released; the directory was there before this holder
    # (a directory this process created and left empty goes too: nothing is left behind by a run that never started)


def test_a_run_that_fails_while_loading_leaves_no_directory(tmp_path):
    out = tmp_path / "never"
    proc = start("train_ddpo.py", *ddpo_argv(tmp_path / "not-a-model", out))
    assert "--pretrained: local directory" in one_error_line(proc)
    assert not out.exists()


# --- which trainer's run ------------------------------------------------------------------------------


def fake_checkpoint(out: Path, name="epoch_0000"):
    from safetensors.torch import save_file

    ckpt = out / "checkpoints" / name
    ckpt.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, ckpt / "pytorch_lora_weights.safetensors")
    torch.save({}, ckpt / "training_state.pt")
    return ckpt


@pytest.mark.parametrize("recorded", ["run.json", "args.json only (an older run)"])
@pytest.mark.parametrize("allow", [[], ["--allow-changed-args"]], ids=["strict", "allow-changed-args"])
def test_another_trainers_run_is_never_continued(recorded, allow, tiny_sd_dir, tiny_aesthetic, tmp_path, capsys):
    out = tmp_path / "run"
    args = train_ddpo.cli([str(a) for a in ddpo_argv(tiny_sd_dir, out)])
    out.mkdir()
    (out / "args.json").write_text(json.dumps(rundir.jsonable(runs.flat_args(args))))
    if recorded == "run.json":
        (out / "run.json").write_text(json.dumps({"trainer": "ddpo", "family": "sd"}))
    fake_checkpoint(out)
    argv = [
        "--pretrained",
        tiny_sd_dir,
        "--reward",
        "aesthetic",
        *tiny_aesthetic,
        "--output-dir",
        out,
        "--resume",
        *allow,
    ]
    with pytest.raises(SystemExit) as e:
        train_alignprop.main(train_alignprop.cli([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"--output-dir {out} holds a DDPO run (train_ddpo.py)" in err and "resume it with train_ddpo.py" in err
    assert (" on SD 1.x/2.x" in err) == (recorded == "run.json")


def test_resume_finds_a_deleted_or_truncated_weight_file_before_loading(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    import diffusion

    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "run"
    argv = [str(a) for a in ddpo_argv(tiny_sd_dir, out, "--num-epochs", 1)]
    out.mkdir()
    (out / "args.json").write_text(json.dumps(rundir.jsonable(runs.flat_args(train_ddpo.cli(argv)))))
    ckpt = fake_checkpoint(out)
    weights = ckpt / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-2])  # truncated
    for broken in ("truncated", "missing"):
        with pytest.raises(SystemExit) as e:
            train_ddpo.main(train_ddpo.cli(argv + ["--resume"]))
        err = capsys.readouterr().err
        assert (
            e.value.code == 2
            and f"checkpoint {ckpt} is incomplete (pytorch_lora_weights.safetensors is {broken})" in err
        )
        weights.unlink(missing_ok=True)


def test_a_directory_holding_only_a_log_is_a_run(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": -1}\n')
    with pytest.raises(SystemExit):
        train_ddpo.main(train_ddpo.cli([str(a) for a in ddpo_argv(tiny_sd_dir, out)]))
    assert "already holds a run that stopped before its first checkpoint (log.jsonl)" in capsys.readouterr().err
    assert (out / "log.jsonl").read_text() == '{"epoch": -1}\n'


# --- Ctrl-C -------------------------------------------------------------------------------------------


def test_ctrl_c_says_where_it_stopped_and_resume_continues_exactly(tiny_sd_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_script("train_ddpo.py", *ddpo_argv(tiny_sd_dir, whole, "--num-epochs", 8))
    proc = start("train_ddpo.py", *ddpo_argv(tiny_sd_dir, cut, "--num-epochs", 8))
    wait_for(cut / "checkpoints" / "epoch_0001", proc)
    proc.send_signal(signal.SIGINT)
    line = one_error_line(proc, code=-signal.SIGINT)  # ended by SIGINT, as Python ends on Ctrl-C: 130 in a shell
    assert line.startswith("interrupted in epoch ") and "last checkpoint" in line and "KeyboardInterrupt" not in line
    command = line.split("continue with: ", 1)[1]
    assert command.endswith("--resume")
    assert not (cut / ".lock").exists()
    resumed = subprocess.run(shlex.split(command), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in read_log(cut)] == list(range(-1, 8))
    a, b = lora_weights(whole / "checkpoints" / "epoch_0007"), lora_weights(cut / "checkpoints" / "epoch_0007")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("reward_mean", "approx_kl"):
        assert [r[key] for r in read_log(whole)[1:]] == [r[key] for r in read_log(cut)[1:]]


# --- prompts a reward cannot read, and what a run says about its prompts -----------------------------


def test_prompts_outside_a_rewards_grammar_fail_before_loading_and_leave_nothing(tmp_path):
    out = tmp_path / "run"
    proc = start("train_alignprop.py", "--config", "toy", "--reward", "toy-compose", "--prompts", "simple_animals",
                 "--output-dir", out)  # fmt: skip
    line = one_error_line(proc)
    assert line.startswith(
        "error: --prompts: prompt 'ant' is outside what --reward toy-compose reads: 'a <colour> <shape>'"
    )
    assert not out.exists()


def test_notes_about_prompts_and_a_pooled_weight_without_pooled_embedding(tiny_sd_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    long = "a " + " ".join(["very"] * 90) + " long cat"
    prompts.write_text(f"# a comment line, not a prompt\n{long}\nthe of a\na red cat\n")
    argv = [str(a) for a in ddpo_argv(tiny_sd_dir, tmp_path / "run", "--num-epochs", 1, "--prompts", prompts)]
    train_ddpo.main(train_ddpo.cli(argv))
    out = capsys.readouterr().out
    assert (
        "note: --prompts: 1 of 3 prompts are longer than the text encoder's 77 tokens and are cut (by up to 18 tokens)"
        in out
    )
    assert "note: --prompts: 1 of 3 prompts have no word prompt weighting may emphasise (e.g. 'the of a'" in out
    assert {r["prompt"] for r in read_log(tmp_path / "run")[-1]["prompt_weights"]} <= {long, "the of a", "a red cat"}
    with pytest.raises(SystemExit):
        train_ddpo.main(train_ddpo.cli(argv[:-2] + ["--prompt-weight-pooled", "--output-dir", str(tmp_path / "other")]))
    assert "error: --prompt-weight-pooled: SD 1.x/2.x has no pooled text embedding" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.main(["generate", "--pretrained", str(tiny_sd_dir), "--prompt", "a cat", "--prompt-weighting",
                     "--prompt-weight-pooled", "--output-dir", str(tmp_path / "gen")])  # fmt: skip
    assert "error: --prompt-weight-pooled: SD 1.x/2.x has no pooled text embedding" in capsys.readouterr().err


def test_every_sample_logs_its_prompt_weight(tiny_sd_dir, tmp_path):
    out = tmp_path / "run"
    run_script("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 1, "--samples-per-epoch", 4,
                                           "--train-batch-size", 4))  # fmt: skip
    weights = read_log(out)[-1]["prompt_weights"]
    assert len(weights) == 4 and all({"prompt", "word", "weight"} <= set(w) for w in weights)


def test_launching_n_processes_that_start_as_one_is_said(tiny_sd_dir, tmp_path):
    """accelerate launch --num_processes 2 on a machine without GPUs starts one process."""
    accelerate = Path(sys.executable).parent / "accelerate"  # the command users type, from this environment
    cmd = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "train_ddpo.py"), *map(str, ddpo_argv(tiny_sd_dir, tmp_path / "run", "--num-epochs", 1))]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: 2 processes were asked for but this is the only one" in proc.stdout, proc.stdout
    assert "accelerate launch --multi_gpu --num_processes 2" in proc.stdout


# --- sample.py's results own their directories ---------------------------------------------------------


def test_generate_twice_into_one_directory(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    common = ["generate", "--pretrained", str(tiny_sd_dir), "--num-steps", "2", "--output-dir", str(out)]
    sample.main([*common, "--prompt", "a red cat", "--num-per-prompt", "4"])
    assert sorted(p.name for p in out.glob("*.png")) == ["0000.png", "0001.png", "0002.png", "0003.png", "grid.png"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sample.main([*common, "--prompt", "a blue dog", "--num-per-prompt", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert f"--output-dir {out} already holds a sample.py generate result" in err and "--overwrite" in err
    sample.main([*common, "--prompt", "a blue dog", "--num-per-prompt", "2", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == [".result.json", "0000.png", "0001.png", "grid.png", "scores.csv"]
    assert "a red cat" not in (out / "scores.csv").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for target, message in [(tmp_path / "mine", "holds files that sample.py did not write (notes.txt)")]:
        with pytest.raises(SystemExit):
            sample.main([*common[:-1], str(target), "--prompt", "a cat", "--overwrite"])
        assert message in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_explore_over_another_result_and_into_a_run(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "explore"
    common = ["explore", "--pretrained", str(tiny_sd_dir), "--prompt", "a red cat", "--rewards", "jpeg", "--num-steps", "2",
              "--num-per-prompt", "2", "--output-dir", str(out)]  # fmt: skip
    sample.main([*common, "--settings", "none", "cfg", "pw", "--save-images"])  # images/ as a run has one
    assert len(list((out / "grids").glob("0*.png"))) == 3 and (out / "images").is_dir()
    with pytest.raises(SystemExit):
        sample.main([*common, "--settings", "none"])
    assert "already holds a sample.py explore result" in capsys.readouterr().err
    sample.main([*common, "--settings", "none", "--overwrite"])
    assert [p.name for p in (out / "grids").glob("0*.png")] == ["00_none.png"]  # nothing of the old result stays
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"trainer": "ddpo"}')
    with pytest.raises(SystemExit):
        sample.main([*common[:-1], str(run), "--settings", "none", "--overwrite"])
    assert f"--output-dir {run} holds a training run" in capsys.readouterr().err


def test_overwrite_of_a_run_removes_what_was_derived_from_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("log.jsonl", "gallery.html", "args.json", "run.json"):
        (out / name).write_text("{}")
    (out / "plots").mkdir()
    (out / "plots" / "eval_reward_mean.png").write_bytes(b"png")
    (out / "notes.txt").write_text("mine")
    args = train_ddpo.cli(["--output-dir", str(out), "--overwrite"])
    rundir.prepare_run_dir(out, rundir.plan_run(rundir.jsonable(runs.flat_args(args))))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_plot_of_a_run_shows_the_held_out_reward(tmp_path):
    from PIL import Image

    run = tmp_path / "run"
    run.mkdir()
    records = [{"epoch": -1, "samples": 0, "eval_reward_mean": 1.0}] + [
        {"epoch": e, "samples": 4 * (e + 1), "reward_mean": 0.5 + e, **({"eval_reward_mean": 2.0} if e == 1 else {})}
        for e in range(2)
    ]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sample.main(["plot", str(run)])
    assert Image.open(run / "plots" / "eval_reward_mean.png").size[0] > 500
    sample.main(["plot", str(run), "--key", "reward_mean"])
    assert (run / "plots" / "reward_mean.png").is_file()


# --- bf16 on a CPU, end to end ------------------------------------------------------------------------


def test_bf16_end_to_end_on_cpu(tiny_sd_dir, tiny_aesthetic, tmp_path):
    """The reward's resize has no bf16 kernel on a CPU: preprocessing runs in float32 whatever the weights."""
    common = ["--pretrained", tiny_sd_dir, "--reward", "aesthetic", *tiny_aesthetic, "--num-steps", 2, "--samples-per-epoch", 2,
              "--mixed-precision", "bf16", "--num-epochs", 1, "--eval-every", 1, "--eval-num", 1]  # fmt: skip
    run_script(
        "train_alignprop.py",
        *common,
        "--batch-size",
        2,
        "--gradient-accumulation-steps",
        1,
        "--output-dir",
        tmp_path / "a",
    )
    run_script("train_ddpo.py", *common, "--sample-batch-size", 2, "--train-batch-size", 2, "--gradient-accumulation-steps", 1,
               "--output-dir", tmp_path / "d")  # fmt: skip
    for run in ("a", "d"):
        last = read_log(tmp_path / run)[-1]
        assert torch.isfinite(torch.tensor([last["reward_mean"], last["eval_reward_mean"]])).all()
    proc = run_script("sample.py", "generate", "--pretrained", tiny_sd_dir, "--prompt", "a cat", "--num-steps", 2,
                      "--mixed-precision", "bf16", "--eval-rewards", "aesthetic", *tiny_aesthetic, "--output-dir", tmp_path / "g")  # fmt: skip
    assert "aesthetic: mean" in proc.stdout


def test_a_run_written_before_run_json_and_the_new_flags_still_resumes(tiny_sd_dir, tmp_path):
    """Runs written before this layout have no run.json and an args.json without the flags added since
    (--group-size, --kl-beta, --ema-decay, --ema-every); they resume, and their trainer is still told."""
    out = tmp_path / "run"
    run_main("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 1))
    (out / "run.json").unlink()
    old = json.loads((out / "args.json").read_text())
    for key in ("group_size", "kl_beta", "ema_decay", "ema_every"):
        del old[key]
    (out / "args.json").write_text(json.dumps(old))
    assert rundir.run_identity(out) == {"trainer": "ddpo", "family": None}
    run_script("train_ddpo.py", *ddpo_argv(tiny_sd_dir, out, "--num-epochs", 2, "--resume"))
    assert [r["epoch"] for r in read_log(out)] == [-1, 0, 1]
    assert json.loads((out / "run.json").read_text()) == {"trainer": "ddpo", "family": "sd"}
