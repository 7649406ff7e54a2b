"""sample.py explore (same starting noise across settings, the statistics, the outputs, one-line
errors) and the checks issue 15 asks of sample.py generate/plot. Everything runs in-process through
sample.main / sample.explore on the tiny SD model (32 px, VAE factor 2, 4 steps)."""

from __future__ import annotations

import csv
import json
import math
import statistics

import pytest
import torch

import diffusion
import sample

STEPS = (
    4  # SD's leading spacing: timesteps 751, 501, 251, 1 -- t_sw 0.8 (800) never switches, t_sw 0.5 does at two steps
)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cat\na blue dog sleeping\n")
    return path


def run_explore(tiny_sd_dir, prompts_file, out, settings, **kwargs):
    args = dict(pretrained=str(tiny_sd_dir), prompts=str(prompts_file), rewards="jpeg", num_steps=STEPS, num_per_prompt=3,
                batch_size=4, grid_prompts=2, output_dir=str(out))  # fmt: skip
    return sample.explore(settings=tuple(settings), **(args | kwargs))


def test_same_starting_noise_across_settings(tiny_sd_dir, prompts_file, tmp_path, capfd):
    """2 prompts x 3 images in batches of 4 (one batch spans both prompts). Settings that sample exactly
    like 'none' give identical images; the ones that should differ do; and 'none' alone, in another run
    with no other setting, gives the same images again: the noise depends on (seed, batch) only."""
    settings = ["none", "cfg:w_low=7.5", "cfg", "pw:range=1:1", "cfg:t_sw=0.5", "pw", "diffexp:t_sw=0.5"]
    first = run_explore(tiny_sd_dir, prompts_file, tmp_path / "a", settings)
    again = run_explore(tiny_sd_dir, prompts_file, tmp_path / "b", ["none"])
    err = capfd.readouterr().err
    emb, grids = first["embeddings"], first["grids"]  # embeddings: the images at 32x32 (no image tower in jpeg), float
    assert first["embedding"].startswith("pixels")
    assert emb["none"].shape == (2, 3, 3 * 32 * 32)
    # 'none' run twice: bit-identical images.
    assert torch.equal(emb["none"], again["embeddings"]["none"]) and torch.equal(grids["none"], again["grids"]["none"])
    # Same as 'none': w_low == w_high; a schedule that never switches (t_sw 0.8 at 4 steps, said once); weight 1.
    for same in ["cfg:w_low=7.5", "cfg", "pw:range=1:1"]:
        assert torch.equal(emb[same], emb["none"]), same
        assert torch.equal(grids[same], grids["none"]), same
    assert (
        "warning: setting 'cfg' (t_sw 0.8) with --num-steps 4: no sampling timestep (751, 501, 251, 1) reaches t_sw*T = 800"
        in err
    )
    assert "never uses w_low; raise --num-steps or lower its t_sw\n" in err
    assert "setting 'cfg:t_sw=0.5'" not in err and "setting 'cfg:w_low=7.5'" not in err  # switches; cannot matter
    # Different from 'none', image by image: the schedule switches, a word is weighted, or both.
    for other in ["cfg:t_sw=0.5", "pw", "diffexp:t_sw=0.5"]:
        for p in range(2):
            for n in range(3):
                assert not torch.equal(emb[other][p, n], emb["none"][p, n]), (other, p, n)
    # The DiffExp draws: the same word and uniform draw for (prompt, index) in every prompt-weighting setting.
    pw, unit, both = first["choices"]["pw"], first["choices"]["pw:range=1:1"], first["choices"]["diffexp:t_sw=0.5"]
    for key in pw:
        assert pw[key].word == unit[key].word == both[key].word and pw[key].word is not None
        assert unit[key].weight == 1.0 and 1.0 <= pw[key].weight <= 2.0 and pw[key].weight == both[key].weight
    assert all(first["choices"]["none"][key].word is None for key in pw)


def test_statistics_equal_a_hand_computation():
    none = torch.tensor([[1.0, 2, 3, 4], [10, 20, 30, 40]])
    other = torch.tensor([[0.0, 2, 5, 4], [10, 20, 30, 45]])
    e_none = torch.tensor([[[1.0, 0], [1, 0], [0, 1], [0, 1]], [[1, 1], [1, 1], [1, 1], [1, 1]]])
    e_other = torch.tensor([[[1.0, 0], [-1, 0], [1, 0], [-1, 0]], [[1, 0], [0, 1], [1, 1], [3, 0]]])
    out = sample.explore_stats(
        {"none": none, "other": other}, {"none": e_none, "other": e_other}, top_frac=0.1, success_threshold=4.5
    )
    assert out["reference"] == "none" and out["top_k"] == 1
    # 90th percentile by linear interpolation: position 0.9 * 3 = 2.7 between the 3rd and 4th values.
    assert out["thresholds"] == pytest.approx([3 + 0.7 * 1, 30 + 0.7 * 10])
    n, o = out["settings"]["none"], out["settings"]["other"]
    approx = lambda v: pytest.approx(v, abs=1e-12)  # noqa: E731
    assert n["mean"] == approx(110 / 8) and o["mean"] == approx(116 / 8)
    assert n["std"] == approx(statistics.stdev([1, 2, 3, 4, 10, 20, 30, 40]))
    assert n["std_within"] == approx((statistics.stdev([1, 2, 3, 4]) + statistics.stdev([10, 20, 30, 40])) / 2)
    assert n["top_mean"] == approx((4 + 40) / 2) and o["top_mean"] == approx((5 + 45) / 2)
    assert n["above"] == approx(2 / 8) and o["above"] == approx(3 / 8)  # 4 > 3.7, 40 > 37; 5 and 4 > 3.7, 45 > 37
    diffs = [-1, 0, 2, 0, 0, 0, 0, 5]
    assert n["delta"] == 0 and n["delta_se"] == 0
    assert o["delta"] == approx(6 / 8) and o["delta_se"] == approx(statistics.stdev(diffs) / math.sqrt(8))
    # Diversity: mean over each prompt's 6 pairs of 1 - cos, then over prompts.
    assert n["diversity"] == approx((4 / 6 + 0) / 2)
    c = 1 - 1 / math.sqrt(2)
    assert o["diversity"] == approx((8 / 6 + (1 + c + 0 + c + 1 + c) / 6) / 2)
    # Success (>= 4.5): none solves prompt 2 only; other gets 5 in prompt 1 too.
    assert n["success_per_prompt"] == [0.0, 1.0] and n["success"] == approx(0.5) and n["solved"] == approx(0.5)
    assert o["success_per_prompt"] == [0.25, 1.0] and o["success"] == approx(0.625) and o["solved"] == approx(1.0)
    # A fixed threshold, another reference and a larger top fraction (k = ceil(0.5 * 4) = 2).
    out = sample.explore_stats({"none": none, "other": other}, reference="other", threshold=3.5, top_frac=0.5)
    assert out["top_k"] == 2 and out["thresholds"] == [3.5, 3.5]
    assert out["settings"]["none"]["above"] == approx(5 / 8) and out["settings"]["none"]["delta"] == approx(-6 / 8)
    assert out["settings"]["none"]["top_mean"] == approx(((3 + 4) / 2 + (30 + 40) / 2) / 2)
    assert "diversity" not in out["settings"]["none"] and "success" not in out["settings"]["none"]


def test_outputs_with_an_image_tower(tiny_sd_dir, tiny_aesthetic, prompts_file, tmp_path, capsys):
    """Through the command line: the default settings plus one sweep value of each kind, two rewards
    (aesthetic's tiny CLIP gives the embeddings), a success threshold; every output file."""
    out = tmp_path / "explore"
    sample.main(["explore", "--pretrained", str(tiny_sd_dir), "--prompts", str(prompts_file), "--rewards", "aesthetic,jpeg", *tiny_aesthetic,
                 "--num-steps", str(STEPS), "--num-per-prompt", "3", "--batch-size", "4", "--sweep-t-sw", "0.5", "--sweep-w-low", "0",
                 "--sweep-weight-range", "1:3", "--success-threshold", "-0.3", "--save-images", "--output-dir", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert "--mixed-precision auto: fp32 (no CUDA device)" in stdout
    labels = ["none", "diffexp", "cfg", "pw", "cfg:t_sw=0.5", "cfg:w_low=0", "pw:range=1:3"]
    md = (out / "explore.md").read_text()
    assert "| setting | mean | std | std within prompt | top 10% per prompt | > none's p90 |" in md
    assert "## aesthetic (first reward)" in md and "## jpeg" in md and "image tower of reward `aesthetic`" in md
    assert "## Success rate per prompt (aesthetic ≥ -0.3)" in md and "| a blue dog sleeping |" in md
    for label in labels:
        assert f"\n| {label} | " in md, label
    rows = list(csv.DictReader(open(out / "explore.csv")))
    assert len(rows) == len(labels) * 2 * 3
    assert list(rows[0]) == ["setting", "prompt_index", "prompt", "index", "word", "weight", "aesthetic", "jpeg"]
    assert [r["setting"] for r in rows[::6]] == labels
    for r in rows:
        weighted = r["setting"] in ("diffexp", "pw", "pw:range=1:3")
        assert bool(r["word"]) == weighted and bool(r["weight"]) == weighted
        assert math.isfinite(float(r["aesthetic"])) and float(r["jpeg"]) < 0
    stats = json.loads((out / "explore.json").read_text())
    assert (
        list(stats["stats"]["aesthetic"]["settings"]) == labels
        and "diversity" in stats["stats"]["aesthetic"]["settings"]["pw"]
    )
    assert stats["settings"][4] == stats["settings"][4] | {"setting": "cfg:t_sw=0.5", "t_sw": 0.5, "steps_at_w_low": 2}
    assert (out / "explore.png").stat().st_size > 10_000
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert grids == sorted(
        [f"{i:02d}_{sample._slug(label)}.png" for i, label in enumerate(labels)]
        + ["compare_p000.png", "compare_p001.png"]
    )
    assert len(list((out / "images" / "06_pw-range-1-3").glob("*.png"))) == 6


def expect_error(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exc:
        sample.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])
    return err[0]


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any model load fails the test: every error must come before it."""
    import diffusion
    import rewards

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(diffusion, "load_pipeline", boom)
    monkeypatch.setattr(rewards, "load_reward", boom)


EXPLORE_ERRORS = [
    (["--settings", "fast"], "--settings 'fast': unknown setting 'fast'"),
    (["--settings", "none", "cfg:w_lo=0"], "--settings 'cfg:w_lo=0': 'w_lo=0' is not KEY=VALUE"),
    (["--settings", "cfg:w_low"], "--settings 'cfg:w_low': 'w_low' is not KEY=VALUE"),
    (["--settings", "cfg:w_low=abc"], "--settings 'cfg:w_low=abc': w_low needs a number, got 'abc'"),
    (["--settings", "cfg:w_low=nan"], "w_low must be finite"),
    (["--settings", "cfg:w_low=0,w_low=1"], "w_low is given twice"),
    (["--settings", "cfg:w_low=0,"], "a stray comma"),
    (["--settings", "pw:t_sw=0.5"], "--settings 'pw:t_sw=0.5': t_sw does nothing without the CFG schedule"),
    (["--settings", "none:range=1:3"], "range does nothing without prompt weighting"),
    (["--settings", "cfg:t_sw=1.5"], "--settings 'cfg:t_sw=1.5': t_sw must be in [0, 1]"),
    (["--settings", "w_low=-1"], "--settings 'w_low=-1': w_low and w_high must be >= 0"),
    (["--settings", "pw:range=3:1"], "--settings 'pw:range=3:1': range must be two numbers 0 <= w_min <= w_max"),
    (["--settings", "pw:range=2"], "range needs two numbers LO:HI"),
    (["--settings"], "--settings: give at least one setting"),
    (["--sweep-weight-range", "1-3"], "--sweep-weight-range 'pw:range=1-3': range needs two numbers"),
    (["--sweep-t-sw", "2"], "--sweep-t-sw 'cfg:t_sw=2': t_sw must be in [0, 1]"),
    (["--t-sw", "2"], "--t-sw must be in [0, 1]"),
    (["--prompt-weight-range", "2", "1"], "--prompt-weight-range must be two numbers"),
    (["--num-per-prompt", "1"], "--num-per-prompt must be >= 2"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--eta", "-0.5"], "--eta must be in [0, 1]"),
    (["--resolution", "33"], "--resolution must be a positive multiple of 2"),
    (["--resolution", "0"], "--resolution must be a positive multiple of 2"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--top-frac", "0"], "--top-frac must be in (0, 1]"),
    (["--threshold-quantile", "1.5"], "--threshold-quantile must be in [0, 1]"),
    (["--success-threshold", "nan"], "--success-threshold must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--grid-images", "0"], "--grid-images"),
    (["--rewards", ""], "--rewards: give at least one reward"),
    (["--rewards", "jpeg,bogus"], "--rewards 'bogus': unknown reward 'bogus'"),
    (["--prompts", "no_such_set"], "--prompts 'no_such_set'"),
    (["--lora", "/nonexistent/ckpt"], "--lora /nonexistent/ckpt: no pytorch_lora_weights.safetensors"),
    (
        ["--rewards", "jpeg,aesthetic"],
        "--reward-models aesthetic_clip: 'openai/clip-vit-large-patch14' is not in the local Hugging Face cache",
    ),
]


@pytest.mark.parametrize("extra,message", EXPLORE_ERRORS, ids=[" ".join(e) or "empty" for e, _ in EXPLORE_ERRORS])
def test_explore_bad_arguments_fail_in_one_line(extra, message, tiny_sd_dir, nothing_loads, capsys):
    rewards = [] if "--rewards" in extra else ["--rewards", "jpeg"]
    expect_error(["explore", "--pretrained", tiny_sd_dir, *rewards, *extra], capsys, message)


GENERATE_ERRORS = [
    (["--num-per-prompt", "0"], "--num-per-prompt must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--num-steps", "0"], "--num-steps must be >= 1"),
    (["--eta", "-1"], "--eta must be in [0, 1]"),
    (["--eta", "1.5"], "--eta must be in [0, 1]"),
    (["--resolution", "33"], "--resolution must be a positive multiple of 2 (the VAE's downsampling factor), got 33"),
    (["--resolution", "-32"], "--resolution must be a positive multiple of 2"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--t-sw", "2"], "--t-sw must be in [0, 1]"),
    (["--eval-rewards", "bogus"], "--eval-rewards 'bogus': unknown reward"),
    # every checkpoint is checked before any is loaded, naming the real override
    (
        ["--eval-rewards", "jpeg,pickscore"],
        "--reward-models pickscore_model: 'yuvalkirstain/PickScore_v1' is not in the local Hugging Face cache",
    ),
    (["--vae", "/no/such/vae"], "--vae: local directory '/no/such/vae' does not exist"),
]


@pytest.mark.parametrize("extra,message", GENERATE_ERRORS, ids=[" ".join(e) for e, _ in GENERATE_ERRORS])
def test_generate_bad_arguments_fail_in_one_line(extra, message, tiny_sd_dir, nothing_loads, capsys):
    expect_error(["generate", "--pretrained", tiny_sd_dir, "--prompt", "a cat", *extra], capsys, message)


def test_vae_factor_is_read_from_the_checkpoint(tiny_sd_dir, tmp_path, nothing_loads, capsys):
    assert diffusion.vae_downsampling(str(tiny_sd_dir))[0] == 2
    assert diffusion.vae_downsampling("toy")[0] == 2  # the shipped toy world, through its alias
    assert diffusion.vae_downsampling("nobody/not-a-cached-model")[0] == 8  # SD's and SDXL's
    assert diffusion.vae_downsampling(str(tiny_sd_dir), vae=str(tiny_sd_dir / "vae"))[0] == 2
    expect_error(
        ["generate", "--pretrained", "nobody/not-a-cached-model", "--resolution", "36"], capsys, "multiple of 8"
    )


def test_generate_auto_precision_and_diffexp_draws_do_not_shift_the_noise(tiny_sd_dir, tmp_path, capsys):
    """--mixed-precision auto says fp32 on the CPU; prompt weighting at weight 1 (a word is drawn, the
    conditioning is unchanged) and a CFG schedule that never switches give the plain image exactly."""
    import numpy as np
    from PIL import Image

    common = [
        "generate",
        "--pretrained",
        str(tiny_sd_dir),
        "--prompt",
        "a red cat",
        "--num-steps",
        str(STEPS),
        "--seed",
        "3",
    ]
    sample.main([*common, "--output-dir", str(tmp_path / "plain")])
    sample.main(
        [
            *common,
            "--prompt-weighting",
            "--prompt-weight-range",
            "1",
            "1",
            "--cfg-schedule",
            "--output-dir",
            str(tmp_path / "pw"),
        ]
    )
    captured = capsys.readouterr()
    assert captured.out.count("--mixed-precision auto: fp32 (no CUDA device)") == 2
    assert "warning: --t-sw 0.8 with --num-steps 4: no sampling timestep" in captured.err
    a, b = (np.asarray(Image.open(tmp_path / d / "0000.png")) for d in ("plain", "pw"))
    assert (a == b).all()
    row = next(csv.DictReader(open(tmp_path / "pw" / "scores.csv")))
    assert row["word"] in ("red", "cat") and float(row["weight"]) == 1.0


def write_log(run, values):
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text(
        "".join(json.dumps({"epoch": i, "samples": 4 * i, "reward_mean": v}) + "\n" for i, v in enumerate(values))
    )


def test_generate_says_when_a_repeated_prompt_repeats_its_images(tiny_sd_dir, tmp_path, capsys):
    """Image j of every prompt is seeded --seed + j, so a prompt listed twice gets the same images twice:
    said in one note (a file of distinct prompts gets none)."""
    import numpy as np
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na cat\na cat\n")
    common = ["generate", "--pretrained", str(tiny_sd_dir), "--num-steps", "2"]
    sample.main([*common, "--prompts", str(prompts), "--output-dir", str(tmp_path / "repeated")])
    err = capsys.readouterr().err
    assert "note: --prompts: 2 of 4 prompts repeat an earlier one and get the same images" in err
    images = [np.asarray(Image.open(tmp_path / "repeated" / f"{i:04d}.png")) for i in range(4)]
    assert (images[0] == images[2]).all() and (images[0] == images[3]).all() and (images[0] != images[1]).any()
    prompts.write_text("a cat\na dog\n")
    sample.main([*common, "--prompts", str(prompts), "--output-dir", str(tmp_path / "distinct")])
    assert "repeat" not in capsys.readouterr().err


def test_plot_writes_next_to_its_runs(tmp_path, monkeypatch, capsys):
    write_log(tmp_path / "runs" / "diffexp", [0.1, 0.2, 0.3])
    write_log(tmp_path / "runs" / "baseline", [0.1, 0.15, 0.2])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    sample.main(["plot", str(tmp_path / "runs" / "diffexp")])
    assert (tmp_path / "runs" / "diffexp" / "plots" / "reward_mean.png").stat().st_size > 1000  # inside the run
    sample.main(
        [
            "plot",
            str(tmp_path / "runs" / "diffexp"),
            str(tmp_path / "runs" / "baseline"),
            "--labels",
            "DiffExp",
            "no DiffExp",
        ]
    )
    assert (tmp_path / "runs" / "reward_mean_DiffExp_vs_no-DiffExp.png").stat().st_size > 1000
    sample.main(["plot", str(tmp_path / "runs" / "diffexp"), "--output", str(tmp_path / "out" / "curve.png")])
    assert (tmp_path / "out" / "curve.png").is_file()
    assert list((tmp_path / "elsewhere").iterdir()) == []
    assert "wrote" in capsys.readouterr().out


def test_plot_errors(tmp_path, capsys):
    run = tmp_path / "run"
    write_log(run, [0.1, 0.2])
    (tmp_path / "empty").mkdir()
    expect_error(["plot"], capsys, "plot: give one or more training run directories")
    expect_error(["plot", tmp_path / "empty"], capsys, "no log.jsonl")
    expect_error(["plot", tmp_path / "missing"], capsys, "no such directory")
    expect_error(
        ["plot", run, "--key", "eval_reward_mean"],
        capsys,
        "--key eval_reward_mean",
        "it has epoch, reward_mean, samples",
    )
    expect_error(["plot", run, "--labels", "a", "b"], capsys, "--labels: 2 labels for 1 runs")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "sam')
    expect_error(["plot", run], capsys, "line 3 is not JSON")
    assert not list(run.glob("*.png"))
