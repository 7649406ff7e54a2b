"""--fsdp (the denoiser and its LoRA sharded across the processes with PyTorch's FSDP2) and --cache-text, on
CPU processes (gloo).

The reference for a sharded run is the replicated run of the same command (the one every multi-process run
made before --fsdp: the whole model in each process, the LoRA gradients all-reduced by runs.py): both draw
the same noise in the same process, so their LoRA weights agree to float rounding when FSDP's reduce-scatter
averages what the all-reduce averaged. The parameter count each process holds is measured in the run and
compared with a count of the whole model made here. Two-process runs are slow to start, so the runs share one
launch (tests/runs_in_one_launch.py) and one more for the resume; both are launched with the shipped
accelerate configs (configs/accelerate_8gpu_fsdp.yaml, configs/accelerate_2node.yaml: two "machines" on
localhost), with --num_processes 2 and no GPU.

Bugs placed by hand, each failing these tests: a mesh of each process alone (nothing sharded, no gradient
reduction: the processes train apart), the local shard saved instead of the gathered LoRA, the resumed
optimizer state left out (the moments restart at zero), the encodings cached in a different batch order
than the prompts, and the text encoders kept on the device after caching.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

import diffusion
import rundir
import runs
from conftest import ROOT, lora_weights, read_log, run_main

# DiffExp on in every run: exploring throughout (--explore-frac 1), the CFG schedule switching half way
# (--t-sw 0.5: w_low 1 on the first of the 2 steps, so cfg_unet's one-half shortcut runs too) and a weighted word.
# Adam divides each gradient by its running size (+ epsilon), so an element whose gradient is near zero has its
# rounding amplified up to lr / (4 epsilon) times: lr 1e-3 and epsilon 1e-6 keep the runs' rounding below 1e-6
# while every LoRA weight still moves by about 1e-3 (the tolerance, 1e-5, is 1 % of that).
COMMON = ["--resolution", 32, "--num-steps", 2, "--samples-per-epoch", 4, "--mixed-precision", "no", "--num-epochs", 1, "--eval-every", 2,
          "--eval-num", 2, "--explore-frac", 1.0, "--t-sw", 0.5, "--lr", 1e-3, "--adam-epsilon", 1e-6]  # fmt: skip
DDPO = ["--sample-batch-size", 2, "--train-batch-size", 1, "--gradient-accumulation-steps", 1]  # 2 steps an epoch

# name -> (trainer, its own arguments, model fixture); each is run replicated and with --fsdp. alignprop-sd's
# sharded run is killed after its first epoch and resumed (the `resumed` fixture).
RUNS = {
    "alignprop-sd": ("train_alignprop.py", ["--batch-size", 1, "--gradient-accumulation-steps", 2, "--backprop-steps", 2,
                                            "--num-epochs", 2, "--gradient-checkpointing", "blocks", "--ema-decay", 0.5], "sd"),
    "alignprop-sd3": ("train_alignprop.py", ["--batch-size", 1, "--gradient-accumulation-steps", 1, "--backprop-steps", 2,
                                             "--gradient-checkpointing", "call"], "sd3"),
    "ddpo-sd": ("train_ddpo.py", [*DDPO, "--kl-beta", 0.1, "--ema-decay", 0.5], "sd"),
    "ddpo-sd3": ("train_ddpo.py", DDPO, "sd3"),
    "ddpo-flux": ("train_ddpo.py", DDPO, "flux"),
}  # fmt: skip


def command(name, models, reward, out, *extra):
    script, own, family = RUNS[name]
    argv = [
        "--pretrained",
        models[family],
        "--reward",
        "aesthetic",
        *reward,
        *COMMON,
        *own,
        "--output-dir",
        out,
        *extra,
    ]
    return script, [str(a) for a in argv]


def accelerate_launch(config, *args):
    """`accelerate launch` with a shipped config, 2 processes in all, as a user writes it."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return [*accelerate, "--config_file", str(ROOT / "configs" / config), "--num_processes", "2", *map(str, args)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*commands, timeout=600):
    """Launcher commands run side by side (the machines of one launch), each a subprocess in a private TMPDIR
    (the launchers leave a folder there). Returns the finished processes (returncode, stdout, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": tmp}
        procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in commands]  # fmt: skip
        outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        p.stdout, p.stderr = stdout, stderr
    return procs


@pytest.fixture(scope="module")
def models(tiny_sd_dir, tiny_sd3_dir, tiny_flux_dir):
    return {"sd": tiny_sd_dir, "sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


@pytest.fixture(scope="module")
def runs_done(models, tiny_aesthetic, tmp_path_factory):
    """Every run of RUNS replicated and sharded, the sharded alignprop-sd last, killed right after its first
    checkpoint: one two-process launch. Returns the root of their directories (NAME/replicated, NAME/fsdp)."""
    root = tmp_path_factory.mktemp("fsdp")
    plan = []
    for name in RUNS:
        plan.append(command(name, models, tiny_aesthetic, root / name / "replicated"))
        if name != "alignprop-sd":
            plan.append(command(name, models, tiny_aesthetic, root / name / "fsdp", "--fsdp"))
    plan.append(
        [
            *command("alignprop-sd", models, tiny_aesthetic, root / "alignprop-sd" / "fsdp", "--fsdp"),
            "kill-after-checkpoint",
        ]
    )
    (root / "runs.json").write_text(json.dumps(plan))
    # A free port: accelerate's default (29500) would collide with another launch on this machine.
    (proc,) = launch(
        accelerate_launch("accelerate_8gpu_fsdp.yaml", "--main_process_port", free_port(),
                          ROOT / "tests" / "runs_in_one_launch.py", root / "runs.json")
    )  # fmt: skip
    finished = proc.stdout.count("finished: ")
    assert finished == len(plan) - 1 and proc.returncode != 0, (
        f"{finished} of {len(plan) - 1} runs finished, exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return root


@pytest.fixture(scope="module")
def resumed(runs_done, models, tiny_aesthetic):
    """The killed sharded alignprop-sd run resumed with --resume by a two-node launch: the two commands of
    configs/accelerate_2node.yaml (machine rank 0 and 1, one process each), meeting on localhost as two
    machines do. Returns its directory."""
    out = runs_done / "alignprop-sd" / "fsdp"
    assert [c.name for c in rundir.checkpoints(out)] == ["epoch_0000"]  # killed after its first checkpoint
    script, argv = command("alignprop-sd", models, tiny_aesthetic, out, "--fsdp", "--resume")
    port = free_port()
    machines = [
        accelerate_launch("accelerate_2node.yaml", "--machine_rank", rank, "--main_process_ip", "127.0.0.1",
                          "--main_process_port", port, ROOT / script, *argv)
        for rank in (0, 1)
    ]  # fmt: skip
    procs = launch(*machines)
    for p in procs:
        assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert f"resumed from {out}/checkpoints/epoch_0000" in procs[0].stdout
    return out


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", list(RUNS))
def test_sharded_run_equals_replicated(runs_done, resumed, name):
    """The same LoRA (and EMA) as the replicated run at every checkpoint, the same samples (rewards, held-out
    rewards), gradient norms, KL and DDPO's ratio statistics. alignprop-sd's sharded run was killed after its first epoch and resumed
    by a two-node launch: it equals the uninterrupted replicated run, so the optimizer and EMA states came
    back whole and were sharded again."""
    rep, fsdp = runs_done / name / "replicated", runs_done / name / "fsdp"
    ckpts = rundir.checkpoints(rep)
    assert [c.name for c in rundir.checkpoints(fsdp)] == [c.name for c in ckpts]
    for ckpt in ckpts:
        a, b = lora_weights(ckpt), lora_weights(fsdp / "checkpoints" / ckpt.name)
        assert_same_lora(a, b)
        if "--ema-decay" in RUNS[name][1]:
            assert_same_lora(lora_weights(ckpt / "ema"), lora_weights(fsdp / "checkpoints" / ckpt.name / "ema"))
    up = [v for k, v in a.items() if ".up." in k or "lora_B" in k]  # zero at the start
    assert sum(v.abs().mean().item() for v in up) / len(up) > 5e-4  # it trained: 1e-5 is a small part of that
    la, lb = read_log(rep), read_log(fsdp)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb] == list(range(-1, len(ckpts)))
    for ra, rb in zip(la, lb):
        for key in (
            "reward_mean",
            "eval_reward_mean",
            "grad_norm",
            "kl",
            "approx_kl",
            "ratio_min",
            "ratio_max",
            "clipfrac",
        ):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    assert la[-1]["lora_sync_error"] == 0.0 and "lora_sync_error" not in lb[-1]


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_each_process_holds_half_the_denoiser(runs_done, models, family):
    """The counts each process measured of what it holds, against the whole denoiser counted here."""
    pipe = diffusion.load_pipeline(models[family])
    unet = diffusion.denoiser(pipe)
    diffusion.add_lora(unet, 4, 4.0)
    total = sum(p.numel() for p in unet.parameters())
    name = f"ddpo-{family}"
    held = read_log(runs_done / name / "fsdp")[-1]["fsdp_params_per_process"]
    assert len(held) == 2 and sum(held) == total
    assert all(abs(n / total - 0.5) < 0.02 for n in held), (held, total)


def test_resumed_run_holds_half_in_each_of_two_nodes(resumed, runs_done):
    """The two-node launch sharded the denoiser as the one-node launch did."""
    held = read_log(resumed)[-1]["fsdp_params_per_process"]
    assert (
        read_log(resumed)[-1]["epoch"] == 1
        and held == read_log(runs_done / "ddpo-sd" / "fsdp")[-1]["fsdp_params_per_process"]
    )


@pytest.mark.parametrize("name", ["alignprop-sd", "ddpo-sd3", "ddpo-flux"])
def test_sharded_checkpoint_loads_in_the_diffusers_pipeline(runs_done, resumed, models, name):
    """The checkpoint of a sharded run is the whole LoRA in diffusers' file: the pipeline's load_lora_weights
    takes it, and the weights it then holds are the file's."""
    from peft.utils import get_peft_model_state_dict

    ckpt = rundir.latest_checkpoint(runs_done / name / "fsdp")
    pipe = diffusion.load_pipeline(models[RUNS[name][2]])
    pipe.load_lora_weights(ckpt)
    model = diffusion.denoiser(pipe)
    held = get_peft_model_state_dict(model, adapter_name=next(iter(model.peft_config)))
    saved = diffusion.lora_weights_to_peft(lora_weights(ckpt))
    assert len(held) == len(saved) > 0
    for k, v in saved.items():
        torch.testing.assert_close(held[k], v, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# --cache-text


@pytest.mark.parametrize("family", ["sd", "sd3", "flux"])
def test_cached_text_gives_the_same_samples_and_frees_the_encoders(
    models, tiny_aesthetic, tmp_path, monkeypatch, family
):
    """A DDPO epoch with DiffExp on (a weighted word in every prompt, the CFG schedule), with and without
    --cache-text: the same images sampled (exactly on SD; to 1e-5 on SD3 and FLUX, whose encoders round a
    batch of every prompt a little apart from a batch of two), the same rewards and held-out evaluation;
    afterwards every text encoder of the cached run is on the 'meta' device (no memory; FLUX's pooled CLIP
    too), and the cache holds every training and evaluation prompt."""
    seen = {}
    keep_for_grid, load_models = runs.Run.keep_for_grid, runs.Run._load_models

    def keep(self, images, prompts, batches):
        seen.setdefault(self.dir.name, []).append((images.detach().clone(), list(prompts)))
        return keep_for_grid(self, images, prompts, batches)

    def load(self):
        seen[self.dir.name + "-run"] = self
        return load_models(self)

    monkeypatch.setattr(runs.Run, "keep_for_grid", keep)
    monkeypatch.setattr(runs.Run, "_load_models", load)
    argv = ["--pretrained", models[family], "--reward", "aesthetic", *tiny_aesthetic, *COMMON, *DDPO, "--eval-every", 1]
    run_main("train_ddpo.py", *argv, "--output-dir", tmp_path / "plain")
    run_main("train_ddpo.py", *argv, "--output-dir", tmp_path / "cached", "--cache-text")
    assert len(seen["plain"]) == len(seen["cached"]) == 2
    for (a, pa), (b, pb) in zip(seen["plain"], seen["cached"]):
        assert pa == pb
        # to rounding: an encoder's matmuls may round a batch of every prompt apart from a batch of two
        torch.testing.assert_close(a, b, atol=0 if family == "sd" else 1e-5, rtol=0)
        assert (a[0] - a[1]).abs().max() > 0.01  # two different samples
    la, lb = read_log(tmp_path / "plain"), read_log(tmp_path / "cached")
    for key in ("reward_mean", "eval_reward_mean"):
        assert lb[-1][key] == pytest.approx(la[-1][key], rel=1e-5)
    assert la[-1]["prompt_weights"] == lb[-1]["prompt_weights"]
    assert any(w["word"] for w in lb[-1]["prompt_weights"])  # a word was weighted
    run = seen["cached-run"]
    encoders = [getattr(run.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    encoders = [e for e in encoders if e is not None]
    assert len(encoders) == {"sd": 1, "sd3": 3, "flux": 2}[family]
    assert all(p.device.type == "meta" for e in encoders for p in e.parameters())
    assert set(run.text.rows) == {"", *run.prompts, *run.eval_prompts}
    plain = seen["plain-run"]
    assert all(p.device.type == "cpu" for e in plain.text.text_encoders for p in e.parameters())


def test_uncached_prompt_is_one_clear_error(tiny_sd_dir):
    from sharding import CachedText

    text = CachedText(diffusion.TextConditioner(diffusion.load_pipeline(tiny_sd_dir)), ["", "a cat"])
    assert text.encode(["a cat", ""]).embeds.shape[0] == 2
    with pytest.raises(KeyError, match="'a dog' was not among the prompts encoded"):
        text.encode(["a dog"])


# ---------------------------------------------------------------------------------------------
# Wrong invocations: one line, before any model loads.


@pytest.mark.parametrize(
    "extra, env, message",
    [
        (["--fsdp"], {}, "error: --fsdp shards the denoiser across the processes of the launch, and this launch has 1"),
        (["--fsdp", "--compile"], {"WORLD_SIZE": "2"}, "error: --fsdp with --compile is not supported"),
        (["--fsdp", "--mixed-precision", "fp16"], {"WORLD_SIZE": "2"}, "error: --fsdp with --mixed-precision fp16"),
        ([], {"ACCELERATE_USE_FSDP": "true"}, "error: the accelerate config turns on accelerate's FSDP plugin"),
    ],
)
@pytest.mark.parametrize("trainer", ["train_alignprop", "train_ddpo"])
def test_wrong_combinations_fail_in_one_line_before_loading(
    tmp_path, monkeypatch, capsys, trainer, extra, env, message
):
    import importlib

    module = importlib.import_module(trainer)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        module.main(module.cli([*extra, "--output-dir", str(tmp_path / "out")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Which submodules become FSDP units, per family, by the one rule.


def test_units_are_the_blocks_of_every_family(tiny_sd_dir, tiny_sd3_dir):
    from diffusers import FluxTransformer2DModel

    from sharding import units

    unet = diffusion.denoiser(diffusion.load_pipeline(tiny_sd_dir))
    flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(4, 6, 6))  # fmt: skip
    sd3 = diffusion.denoiser(diffusion.load_pipeline(tiny_sd3_dir))
    assert units(flux) == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert units(sd3) == [f"transformer_blocks.{i}" for i in range(sd3.config.num_layers)]
    names = units(unet)
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + [
        f"up_blocks.{i}" for i in range(len(unet.up_blocks))
    ]
    inner = [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert sorted(names) == sorted(blocks + ["mid_block"] + inner) and inner
    for i, n in enumerate(names):  # innermost first: no unit comes after a unit inside it
        assert not any(later.startswith(n + ".") for later in names[i + 1 :])
    # every weight of a block is in one unit; what is left to the root is the small stem and head
    in_units = sum(p.numel() for n in names if n.count(".") <= 1 for p in unet.get_submodule(n).parameters())
    assert in_units / sum(p.numel() for p in unet.parameters()) > 0.8


def test_shipped_accelerate_configs_are_plain_launches():
    """The configs README names: one GPU; eight GPUs on one machine (sharded with --fsdp, which the trainer
    applies itself: accelerate's own FSDP plugin stays off); two machines of eight."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    shape = {
        "accelerate_1gpu.yaml": (DistributedType.NO, 1, 1),
        "accelerate_8gpu_fsdp.yaml": (DistributedType.MULTI_GPU, 8, 1),
        "accelerate_2node.yaml": (DistributedType.MULTI_GPU, 16, 2),
    }
    assert sorted(p.name for p in (ROOT / "configs").glob("accelerate_*.yaml")) == sorted(shape)
    for name, expected in shape.items():
        config = load_config_from_file(str(ROOT / "configs" / name))
        assert (config.distributed_type, config.num_processes, config.num_machines) == expected
        assert not config.fsdp_config and not config.deepspeed_config and config.mixed_precision == "no"
