"""bench_peer.py is a script, not a test: these only check that a wrong invocation, or a machine
without trl, gets one `error:` line and exit 2 before anything is built or run."""

import subprocess
import sys

import pytest

from conftest import ROOT
from tools import bench_peer


@pytest.mark.parametrize(
    "kwargs, names",
    [
        ({"repeats": 0}, "--repeats"),
        ({"epochs": 0}, "--epochs"),
        ({"sizes": ("33x4",)}, "--sizes"),
        ({"sizes": ("32by4",)}, "--sizes"),
        ({"compile": True, "warmup_epochs": 0}, "--compile needs --warmup-epochs >= 1"),
    ],
    ids=["repeats_0", "epochs_0", "size_not_multiple_of_8", "size_not_PxS", "compile_without_warmup"],
)
def test_wrong_invocation_is_one_line(kwargs, names, capsys, monkeypatch):
    monkeypatch.setattr(bench_peer, "check_trl", lambda: pytest.fail("got past the argument checks"))
    with pytest.raises(SystemExit) as e:
        bench_peer.main(bench_peer.Args(**kwargs))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and names in err, err


def test_without_trl_it_says_how_to_get_it(tmp_path):
    code = "import runpy, sys; sys.modules['trl'] = None; sys.argv = ['bench_peer.py']; runpy.run_path({!r}, run_name='__main__')".format(
        str(ROOT / "tools" / "bench_peer.py")
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: bench_peer.py needs trl: pip install trl==0.23.1"
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("trainer", ["ddpo", "alignprop"])
def test_our_side_runs_without_trl(trainer, tiny_sd_dir, tmp_path, monkeypatch):
    """Our side of the comparison, on its main path, where trl is not installed (as here): the trainer's own
    command line (it exited 2 once the options were grouped), one epoch, timed from log.jsonl."""
    import rewards

    monkeypatch.setitem(sys.modules, "trl", None)  # trl absent: our side must not need it
    for name in ("load_reward", "checkpoints_needed"):  # run_ours replaces them, as in its own process
        monkeypatch.setattr(rewards, name, getattr(rewards, name))
    spec = dict(side="ours+diffexp", trainer=trainer, res=32, steps=2, num_epochs=1, warmup=0, threads=1,
                pretrained=str(tiny_sd_dir), out=str(tmp_path / "out"))  # fmt: skip
    result = bench_peer.run_ours(spec)
    assert len(result["sec_per_sample"]) == 1 and result["sec_per_sample"][0] > 0
    assert result["samples_per_epoch"] == [bench_peer.BATCH * bench_peer.BATCHES_PER_EPOCH]
    assert result["exploring"] == [True]
