"""The wrong or unlucky turns a user took that ended in a traceback, a silent no-op or a misleading line:
each now ends in one line before anything is written, or works with a note. Ctrl-C while importing and
during `sample.py generate`, a generate that failed while loading, a LoRA without its base or on another
model family, an empty --prompt, a model folder without unet/, fp16 on a CPU, a gallery of nothing."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import diffusion
import rundir
import sample
import train_ddpo
from conftest import ROOT


def start(script, *argv):
    """A script as a user starts it in a terminal (SIGINT delivered as Ctrl-C delivers it)."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, argv)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def error_line(capsys, fn) -> str:
    """The one line a wrong invocation gets (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


class Logged(logging.Handler):
    """What a library logger says (diffusers' logger does not propagate to pytest's capture)."""

    def __init__(self, name: str):
        super().__init__()
        self.messages, self.logger = [], logging.getLogger(name)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


# --- Ctrl-C ---------------------------------------------------------------------------------------------


def test_ctrl_c_while_importing_is_one_line(tiny_sd_dir, tmp_path):
    """In the first second the script is still importing torch and diffusers: Ctrl-C there printed a
    KeyboardInterrupt traceback from inside an import. Placed by hand (no rundir.on_ctrl_c at the top of
    train_ddpo.py): the traceback is back."""
    out = tmp_path / "run"
    proc = start("train_ddpo.py", "--pretrained", tiny_sd_dir, "--reward", "jpeg", "--output-dir", out)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err
    assert err.splitlines() == ["interrupted while starting: nothing was written"], err
    assert not out.exists()


def test_ctrl_c_during_generate_leaves_an_unfinished_result(tiny_sd_dir, tmp_path, capsys):
    """Ctrl-C during `sample.py generate` printed a traceback and left its partial images marked as a finished
    result (the next generate said it 'already holds a result'). Now: one line saying how many images were
    written, the result marked unfinished, and the next generate refused unless --overwrite replaces it."""
    out = tmp_path / "gen"
    common = ["generate", "--pretrained", tiny_sd_dir, "--num-steps", 2, "--output-dir", out]
    proc = start("sample.py", *common, "--prompt", "a red cat", "--num-per-prompt", 400, "--batch-size", 1)
    t0 = time.time()
    while not (out / "0001.png").exists():
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("interrupted: sample.py generate wrote ")
    assert err.splitlines()[-1].endswith(
        f"of 400 images to {out}, marked unfinished; run it again with --overwrite to replace them"
    )
    assert json.loads((out / ".result.json").read_text())["complete"] is False
    again = [str(a) for a in common] + ["--prompt", "a blue dog"]
    line = error_line(capsys, lambda: sample.main(again))
    assert line.startswith(f"error: --output-dir {out} holds an unfinished sample.py generate result (started ")
    sample.main(again + ["--overwrite"])
    assert "deleted the unfinished sample.py generate result" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [".result.json", "0000.png", "grid.png", "scores.csv"]
    assert json.loads((out / ".result.json").read_text())["complete"] is True


def test_a_generate_that_failed_while_loading_does_not_block_the_next(tiny_sd_dir, tmp_path):
    """A generate that failed while loading left its mark: the next one was refused as 'already holds a
    result'. Now the failed one leaves the directory as it found it."""
    broken, out = tmp_path / "broken", tmp_path / "gen"
    shutil.copytree(tiny_sd_dir, broken)
    (broken / "unet" / "config.json").write_text("{not json")  # found by the loader only
    out.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "generate", "--pretrained", str(broken), "--prompt", "a cat",
                           "--num-steps", "2", "--output-dir", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.startswith("error: --pretrained:"), proc.stderr
    assert list(out.iterdir()) == []
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
    assert (out / "0000.png").is_file()


# --- sample.py's inputs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_sd_dir, tmp_path_factory):
    """A trainer's checkpoint (what save_checkpoint writes: LoRA weights, state, checkpoint.json)."""
    pipe = diffusion.load_pipeline(str(tiny_sd_dir))
    torch.manual_seed(0)
    diffusion.add_lora(pipe.unet, 4, 4.0)
    out = tmp_path_factory.mktemp("run")
    record = rundir.base_record("ddpo", "sd", str(tiny_sd_dir))
    return rundir.save_checkpoint(out, 0, pipe.unet, {"epoch": 0}, record=record)


def test_lora_without_pretrained_uses_the_base_it_was_trained_on(lora_checkpoint, tiny_sd_dir, tmp_path, capsys):
    """--lora without --pretrained suggested downloading SD 1.5 though the checkpoint records its base. Also
    --max-prompts (explore had it, generate did not)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na green bird\n")
    out = tmp_path / "gen"
    sample.main(["generate", "--lora", str(lora_checkpoint), "--prompts", str(prompts), "--max-prompts", "2",
                 "--num-steps", "2", "--output-dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert (
        f"note: --pretrained: {tiny_sd_dir}, the base --lora was trained on (from {lora_checkpoint / 'checkpoint.json'})"
        in err
    )
    assert [r.split(",")[1] for r in (out / "scores.csv").read_text().splitlines()[1:]] == ["a red cat", "a blue dog"]
    assert "generating" not in err  # no progress bar when stderr is not a terminal


def test_a_lora_of_another_model_family_is_refused(lora_checkpoint, tiny_sd_dir, tiny_sd3_dir, tmp_path, capsys):
    """An SD3 LoRA on an SD 1.x base matched no layer and generated the base model's images as if fine-tuned
    (and the other way round): refused before anything loads, by the checkpoint's record or, for a LoRA from
    elsewhere, by its keys."""
    pipe = diffusion.load_pipeline(str(tiny_sd3_dir))
    diffusion.add_lora(pipe.transformer, 4, 4.0)
    sd3_lora = tmp_path / "sd3-lora"
    diffusion.save_lora_weights(pipe.transformer, sd3_lora)  # no record: told by its keys ('transformer.')
    line = error_line(capsys, lambda: sample.main(["generate", "--pretrained", str(tiny_sd_dir), "--lora", str(sd3_lora),
                                                    "--output-dir", str(tmp_path / "a")]))  # fmt: skip
    assert line.startswith(
        f"error: --lora {sd3_lora} was trained on a transformer (SD3 or FLUX.1), but --pretrained {tiny_sd_dir} is SD 1.x/2.x"
    )
    line = error_line(capsys, lambda: sample.main(["generate", "--pretrained", str(tiny_sd3_dir), "--lora", str(lora_checkpoint),
                                                    "--output-dir", str(tmp_path / "b")]))  # fmt: skip
    assert "was trained on SD 1.x/2.x, but --pretrained" in line and "is SD3" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_empty_prompt_gallery_of_nothing_and_pooled_without_weighting(tmp_path, capsys):
    common = ["--output-dir", str(tmp_path / "gen")]
    assert "--prompt '': give a prompt" in error_line(
        capsys, lambda: sample.main(["generate", "--prompt", "", *common])
    )
    line = error_line(capsys, lambda: sample.main(["generate", "--prompt", "a cat", "--prompt-weight-pooled", *common]))
    assert "--prompt-weight-pooled weights the pooled embedding" in line and "--prompt-weighting" in line
    line = error_line(capsys, lambda: sample.main(["gallery", str(tmp_path / "no-such-run")]))
    assert line == f"error: {tmp_path / 'no-such-run'}: no such directory (pass a training run's --output-dir)"
    assert not (tmp_path / "gen").exists()


# --- the trainers' inputs -------------------------------------------------------------------------------


def test_a_model_folder_without_unet_names_the_folder(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    """The loader's error named the root's config.json; the folder that is missing is said before loading."""
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    partial = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, partial, ignore=shutil.ignore_patterns("unet"))
    argv = ["--pretrained", str(partial), "--reward", "jpeg", "--output-dir", str(tmp_path / "run")]
    line = error_line(capsys, lambda: train_ddpo.main(train_ddpo.cli(argv)))
    assert line.startswith(f"error: --pretrained: '{partial}' has no unet/ (its model_index.json lists it)")


def test_fp16_on_a_cpu_is_said_once(tiny_sd_dir):
    """diffusers warned, once per fp16 module, that a CPU pipeline 'will fail' (it works, slowly); the runs
    say it once themselves."""
    import runs

    with Logged("diffusers") as logged:
        pipe = diffusion.load_pipeline(str(tiny_sd_dir), "cpu", torch.float16)
    assert pipe.unet.dtype == torch.float16
    assert not [m for m in logged.messages if "will fail" in m], logged.messages
    if not torch.cuda.is_available():
        assert runs.resolve_mixed_precision("fp16") == (
            "fp16",
            "mixed precision: fp16 on a CPU (it works, slowly: float32 or bf16 are faster here)",
        )


def test_the_shipped_tools_main_paths(tmp_path, capsys, monkeypatch):
    """tools/bench_arms.py --report-only of nothing was an empty table and exit 0; with one seed it printed
    '± 0.000' as if the spread were measured."""
    from tools import bench_arms

    out = tmp_path / "bench"
    argv = [
        "--methods",
        "alignprop",
        "--arms",
        "baseline",
        "diffexp",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as e:
        bench_arms.main(bench_arms.cli([*argv, "--report-only"]))
    assert str(e.value).startswith(f"error: --report-only: {out} holds no finished run") and not out.exists()
    for arm, rewards in (("baseline", [0.1, 0.2, 0.3]), ("diffexp", [0.1, 0.25, 0.4])):
        run = out / "alignprop" / arm / "seed0"
        run.mkdir(parents=True)
        records = [
            {"epoch": e - 1, "samples": 4 * e, "eval_reward_mean": r, "reward_mean": r} for e, r in enumerate(rewards)
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bench_arms.main(bench_arms.cli([*argv, "--report-only"]))
    table = (out / "bench.md").read_text()
    assert "0.400 (1 seed: no spread)" in table and "+0.300 (1 seed: no spread)" in table and "± 0.000" not in table
