"""--compile: the trainers compile the UNet (with its LoRA adapters) in place and train exactly as
without it. The trainers use inductor; here torch.compile is pointed at the aot_eager backend, which
runs the same capture (dynamo graphs, guards, recompiles on new batch sizes and grad modes, AOT
autograd's forward/backward split) with eager kernels, because inductor needs ~1.5 minutes per
graph to build its C++ kernels on 2 CPU cores. bench_peer.py --compile runs inductor itself and
prints its difference to eager."""

import sys

import pytest
import torch

import diffusion
from conftest import lora_weights, read_log


@pytest.fixture
def aot_eager(monkeypatch):
    """nn.Module.compile with backend aot_eager; returns the list of modules compiled."""
    import torch._dynamo

    compiled = []
    original = torch.nn.Module.compile

    def compile_aot_eager(self, *args, **kwargs):
        compiled.append(self)
        return original(self, *args, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_aot_eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield compiled
    torch._dynamo.reset()


def run(monkeypatch, trainer: str, argv: list):
    import importlib

    module = importlib.import_module(trainer)
    monkeypatch.setattr(sys, "argv", [f"{trainer}.py", *[str(a) for a in argv]])
    module.main(module.cli())


def last_lora(run_dir):
    return lora_weights(max((run_dir / "checkpoints").glob("epoch_*")))


def ddpo_argv(tiny_sd_dir, tiny_aesthetic, out, *extra):
    # DiffExp on with t_sw 0.5: sampling runs the w = 1 shortcut (batch 2) and full CFG (batch 4), the
    # training pass visits shuffled steps (mixed batches of 3), so the compiled UNet meets several batch
    # sizes in both grad modes
    return [
        "--pretrained",
        tiny_sd_dir,
        "--num-steps",
        4,
        "--samples-per-epoch",
        4,
        "--sample-batch-size",
        2,
        "--train-batch-size",
        2,
        "--gradient-accumulation-steps",
        1,
        "--mixed-precision",
        "no",
        "--eval-every",
        0,
        "--output-dir",
        out,
        "--explore-frac",
        1.0,
        "--t-sw",
        0.5,
        "--reward",
        "aesthetic",
        *tiny_aesthetic,
        "--num-epochs",
        1,
        "--lr",
        1e-2,
        *extra,
    ]


def test_ddpo_compiled_trains_like_eager(monkeypatch, aot_eager, tiny_sd_dir, tiny_aesthetic, tmp_path):
    run(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, tiny_aesthetic, tmp_path / "eager"))
    assert aot_eager == []
    run(monkeypatch, "train_ddpo", ddpo_argv(tiny_sd_dir, tiny_aesthetic, tmp_path / "compiled", "--compile"))
    assert len(aot_eager) == 1 and type(aot_eager[0]).__name__ == "UNet2DConditionModel"
    assert (
        torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    )  # the UNet really ran compiled (no_grad and grad)
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    for a, b in zip(eager, compiled):
        for key in ("reward_mean", "loss", "ratio_min", "ratio_max"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    # the checkpoints hold the same LoRA weights under the same keys (compiled in place: no _orig_mod. prefix)
    a, b = last_lora(tmp_path / "eager"), last_lora(tmp_path / "compiled")
    assert a.keys() == b.keys() and all("_orig_mod" not in k for k in b)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def alignprop_argv(tiny_sd_dir, tiny_aesthetic, out, *extra):
    return [
        "--pretrained",
        tiny_sd_dir,
        "--num-steps",
        3,
        "--batch-size",
        2,
        "--samples-per-epoch",
        2,
        "--gradient-accumulation-steps",
        1,
        "--mixed-precision",
        "no",
        "--eval-every",
        0,
        "--output-dir",
        out,
        "--reward",
        "aesthetic",
        *tiny_aesthetic,
        "--num-epochs",
        1,
        "--lr",
        1e-2,
        "--backprop-steps",
        2,
        "--no-cfg-schedule",
        "--no-prompt-weighting",
        *extra,  # DDPO's test covers the shortcut's batch sizes
    ]


def test_alignprop_compiled_trains_like_eager(monkeypatch, aot_eager, tiny_sd_dir, tiny_aesthetic, tmp_path):
    # the default --gradient-checkpointing call: the compiled UNet runs inside torch.utils.checkpoint
    run(monkeypatch, "train_alignprop", alignprop_argv(tiny_sd_dir, tiny_aesthetic, tmp_path / "eager"))
    run(monkeypatch, "train_alignprop", alignprop_argv(tiny_sd_dir, tiny_aesthetic, tmp_path / "compiled", "--compile"))
    assert len(aot_eager) == 1
    eager, compiled = read_log(tmp_path / "eager")[-1], read_log(tmp_path / "compiled")[-1]
    assert compiled["reward_mean"] == pytest.approx(eager["reward_mean"], rel=1e-4)
    a, b = last_lora(tmp_path / "eager"), last_lora(tmp_path / "compiled")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_compile_without_a_cpp_compiler_is_one_line(monkeypatch, tmp_path, capsys, tiny_sd_dir):
    import torch._inductor.cpp_builder as cpp_builder

    import train_ddpo

    def no_compiler():
        raise RuntimeError("Failed to find C++ compiler. Please specify via CXX environment variable.")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    loaded = []
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "train_ddpo.py",
            "--pretrained",
            str(tiny_sd_dir),
            "--reward",
            "jpeg",
            "--compile",
            "--output-dir",
            str(tmp_path / "out"),
        ],
    )

    with pytest.raises(SystemExit) as e:
        train_ddpo.main(train_ddpo.cli())
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and loaded == []
    assert err == [
        "error: --compile: torch.compile's inductor backend needs a C++ compiler and found none (Failed to find C++ compiler. "
        "Please specify via CXX environment variable.); install one (e.g. apt install g++, or set CXX) or run without --compile"
    ]
