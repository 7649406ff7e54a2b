import os
import sys
from pathlib import Path

# No test touches the network: every model is built here and loaded from disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest.ini's `-n auto` runs the suite in worker processes on 4 cores or more (pytest-xdist; on 2, in this one,
# see pytest_xdist_auto_num_workers): the cores are shared out among the workers and the subprocesses the tests
# start, since two thread teams on one core slow each other many times.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
# Triton kernels run through the CPU interpreter when there is no GPU; the flag is read when a
# kernel is defined, so it must be set before any project module imports triton.
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny SD 1.x checkpoint in the hub layout (epsilon prediction)."""
    from tools.tiny import make_tiny_sd

    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny SD3 checkpoint in the hub layout (flow matching; CLIP-L, CLIP-G and T5), shared by the SD3 tests."""
    from tools.tiny import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev checkpoint in the hub layout (guidance embedding, dynamic shifting), shared by the FLUX tests."""
    from tools.tiny import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_flux_schnell_dir(tmp_path_factory):
    """A tiny FLUX.1-schnell checkpoint: no guidance embedding, schnell's scheduler (shift 1, no dynamic shifting)."""
    from tools.tiny import make_tiny_flux

    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), guidance=False)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from diffusion import build_clip_tokenizer

    return build_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_aesthetic(tmp_path_factory):
    """--reward-models arguments pointing `aesthetic` at a tiny CLIP + a tiny MLP in the published layout."""
    from tiny_rewards import make_tiny_aesthetic, make_tiny_clip

    root = tmp_path_factory.mktemp("tiny-aesthetic")
    clip = make_tiny_clip(root / "clip")
    mlp = make_tiny_aesthetic(root / "mlp", dim=32)
    return ["--reward-models", "aesthetic_clip", str(clip), "aesthetic_model", str(mlp)]


# Two CPU processes (gloo) as a user launches them; --standalone picks a free port, so suites run side by side.
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def run_script(script: str, *args, cwd=None, timeout=600, launcher=None):
    """Run a project script as users do (a subprocess), failing the test with its output on error."""
    import subprocess
    import tempfile

    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    # A private TMPDIR, removed after, so nothing a run leaves there (torch.distributed.run: a torchelastic_*
    # folder per run) outlives the test.
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            cmd,
            cwd=cwd or ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": tmp},
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def run_main(script: str, *args):
    """Run a trainer or sample.py in this process, as `run_script` does in a subprocess, less the ~4 s
    a fresh interpreter spends importing torch and diffusers. For runs whose result is the point; the
    command line itself (exit codes, signals, locks, launchers, other precisions: accelerate's state
    is per process) stays with run_script, and so do runs compared bit for bit with a subprocess's (this
    process's thread count may differ from a fresh one's). Returns an object with what it printed, .stdout
    and .stderr; both are also passed on, so a failing test shows them."""
    import contextlib
    import importlib
    import io
    import types

    module = importlib.import_module(script.removesuffix(".py"))
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if script == "sample.py":
                module.main(argv)  # its subcommands parse argv themselves
            else:
                module.main(module.cli(argv))
    finally:
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
    return types.SimpleNamespace(stdout=out.getvalue(), stderr=err.getvalue())


def read_log(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines() if line.strip()]


def lora_weights(ckpt_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(ckpt_dir) / "pytorch_lora_weights.safetensors")


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini): a worker per two cores, at most 4; on 2 cores or fewer none, the suite in this
    process. Measured on 2 cores (2026-12-06, each alone): one process (torch's two threads) 17 min 28 s, two
    single-thread workers 22 min 17 s: the long tests at the end ran at one thread each while the short ones
    had gone, and each worker builds its own tiny models. 0 makes xdist run the tests here, undistributed."""
    cores = os.cpu_count() or 1
    return min(4, cores // 2) if cores >= 4 else 0
