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
