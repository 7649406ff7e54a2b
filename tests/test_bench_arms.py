"""tools/bench_arms.py as a user runs it: the budget and time estimate it prints, a finished comparison
skipped, an interrupted run continued with --resume (and only such a run), the paired report."""

import shutil
import sys

import pytest

from conftest import ROOT, read_log, run_script


@pytest.fixture
def comparison(tiny_sd_dir, tiny_aesthetic, tmp_path):
    return [
        "--pretrained", tiny_sd_dir, "--reward", "aesthetic", *tiny_aesthetic,
        "--prompts", "simple_animals", "--eval-prompts", "unseen_animals", "--methods", "alignprop", "--arms", "baseline", "diffexp",
        "--seeds", 0, 1, "--epochs", 2, "--samples-per-epoch", 2, "--batch-size", 2, "--num-steps", 2, "--eval-every", 1,
        "--eval-num", 2, "--output-dir", tmp_path / "bench", "--extra=--mixed-precision", "--extra=no", "--extra=--t-sw",
        "--extra=0.4",
    ]  # fmt: skip


def test_a_comparison_runs_reports_and_resumes(comparison, tmp_path):
    proc = run_script("tools/bench_arms.py", *comparison)
    assert "4 runs x 2 epochs x 2 samples = 16 training samples (4 a run); 4 runs to go" in proc.stdout
    # the method's run time from its first epoch, then after each run the time left (4 runs: 3, 2, 1 left)
    assert "first epoch:" in proc.stdout and "one alignprop run takes about" in proc.stdout
    assert [f"runs left: {n}, about" in proc.stdout for n in (3, 2, 1)] == [True] * 3
    table = (tmp_path / "bench" / "bench.md").read_text().splitlines()
    assert len(table) == 4 and "| alignprop | diffexp | 2 |" in table[3]
    assert (tmp_path / "bench" / "bench.png").stat().st_size > 10_000
    # An interrupted run (its last epoch and checkpoint gone) is continued, the finished ones skipped.
    run = tmp_path / "bench" / "alignprop" / "diffexp" / "seed1"
    log = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join(log[:-1]) + "\n")
    for ckpt in (run / "checkpoints").glob("epoch_0001"):
        shutil.rmtree(ckpt)
    again = run_script("tools/bench_arms.py", *comparison)
    assert "1 runs to go" in again.stdout and "[1/1] alignprop diffexp seed 1" in again.stdout
    assert [r["epoch"] for r in read_log(run)] == [-1, 0, 1]
    history = (run / "args.jsonl").read_text().splitlines()
    assert '"mode": "resume"' in history[-1]


def test_only_a_run_with_something_to_resume_is_passed_resume(tmp_path):
    """A folder holding only the .lock of a run killed while starting gets no --resume (the trainer refuses
    --resume there: 'holds no run to resume'), nor one whose checkpoints/ is empty; a log does."""
    from tools import bench_arms

    run = tmp_path / "seed0"
    assert bench_arms.resume_flag(run) == []
    run.mkdir()
    (run / ".lock").write_text('{"pid": 1, "owner": "alignprop"}')
    assert bench_arms.resume_flag(run) == []
    (run / "checkpoints").mkdir()
    assert bench_arms.resume_flag(run) == []
    (run / "log.jsonl").write_text('{"epoch": -1}\n')
    assert bench_arms.resume_flag(run) == ["--resume"]


def test_wrong_arms_fail_in_one_line(tmp_path):
    import subprocess

    for argv, message in [(["--arms", "diffexp"], "--arms must include baseline"), (["--methods", "ppo"], "unknown method/arm ['ppo']"),
                          (["--config", "nope"], "--config: unknown preset 'nope'")]:  # fmt: skip
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_arms.py"), *argv, "--output-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode != 0 and proc.stderr.strip().startswith("error: ") and message in proc.stderr, (
            proc.stderr
        )


def test_method_flags_reach_only_their_method():
    from tools import bench_arms

    # --method-flags replaces the preset's DDPO flags
    args = bench_arms.cli(["--config", "toy-hidden", "--method-flags", "ddpo: --lr 3e-3 --clip-range 1e-3"])
    assert bench_arms.command(args, "ddpo", "baseline", 0, "out")[-4:] == ["--lr", "3e-3", "--clip-range", "1e-3"]
    assert "--lr" not in bench_arms.command(args, "alignprop", "baseline", 0, "out")
    assert args.success_reward == "toy-hidden" and args.eval_prompts == "toy_hidden_eval"


def test_every_preset_says_how_long_it_takes():
    from tools import bench_arms

    assert set(bench_arms.PRESET_TIME) == set(bench_arms.PRESETS)
    assert all(" h on a 2-core CPU" in t for t in bench_arms.PRESET_TIME.values())
