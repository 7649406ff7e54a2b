"""The offline toy world (toy.py): the smoke build, the shipped model and scorer, the 'toy' aliases,
the toy-compose reward."""

import re
from pathlib import Path

import torch

from diffusion import ALIASES, encode_prompts, from_pretrained, generate, load_pipeline, load_prompts
from rewards import load_reward
from tools import toy


def test_rendering_is_deterministic_and_captions_match_content():
    a, caps_a = toy.render(32, torch.Generator().manual_seed(3))
    b, caps_b = toy.render(32, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and caps_a == caps_b
    assert a.shape == (32, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert all(c in toy.ALL_SINGLE or c in toy.ALL_TWO for c in caps_a)
    # A red circle is red where it is drawn: the centre pixel of a lone large shape is its colour.
    img = toy.render_captions(["a red circle"] * 8, torch.Generator().manual_seed(0))
    r, g, b_ = img[:, :, 12:20, 12:20].mean((0, 2, 3))  # single shapes are centred in [10, 22]
    assert r > g + 0.2 and r > b_ + 0.2
    # "A left of B": the first object's colour lies in the left half, the second's in the right.
    img = toy.render_captions(["a blue square left of a yellow circle"] * 8, torch.Generator().manual_seed(0))
    left, right = img[..., :16], img[..., 16:]
    blue = lambda x: (x[:, 2] - x[:, 0] > 0.4).float().sum()  # noqa: E731
    assert blue(left) > 10 * (blue(right) + 1)


def test_prompt_sets_are_the_scripts_and_unseen_combinations_are_held_out():
    sets = toy.write_prompt_sets(0, write=False)
    for k, v in sets.items():
        assert load_prompts(k) == v, f"prompts/{k}.txt is not what toy.py writes; rerun python toy.py --eval-only"
    unseen = {toy.name(o) for o in toy.UNSEEN}
    seen_text = " | ".join(sets["toy_shapes"] + sets["toy_two_shapes"])
    assert not any(u in seen_text for u in unseen)
    assert all(any(u in p for u in unseen) for p in sets["toy_unseen"])


def test_smoke_build_loads_generates_and_scores_offline(tmp_path):
    out, scorer = tmp_path / "toy", tmp_path / "toy-scorer"
    toy.main(toy.Args(smoke=True, out=str(out), scorer_out=str(scorer), write_prompts=False))
    assert (out / "model_index.json").is_file() and (scorer / "processor_config.json").is_file()
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))  # safetensors only
    pipe = load_pipeline(str(out))
    assert pipe.unet.dtype == torch.float32  # fp16 files load into the requested dtype
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    images = generate(
        pipe, encode_prompts(pipe, ["a red circle"]), torch.full((2,), 7.5), 2, torch.Generator().manual_seed(0)
    )
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    scores, _ = load_reward("pickscore", pickscore_model=str(scorer), pickscore_processor=str(scorer))(
        images, ["a red circle"]
    )
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_aliases_resolve_to_the_shipped_models():
    assert ALIASES["toy"].joinpath("model_index.json").is_file(), "models/toy is missing: build it with python toy.py"
    assert ALIASES["toy-scorer"].joinpath("config.json").is_file(), (
        "models/toy-scorer is missing: build it with python toy.py"
    )
    from transformers import CLIPProcessor

    assert (
        from_pretrained(CLIPProcessor, "toy-scorer", "--pickscore-processor").image_processor.crop_size["height"] == 32
    )


def test_shipped_scorer_picks_the_right_caption():
    """The bar: >= 90% of held-out single-shape images get their own caption among all 24 (4% by chance)."""
    reward = load_reward("pickscore", pickscore_model="toy-scorer", pickscore_processor="toy-scorer")
    captions = toy.ALL_SINGLE * 4  # every combination, the held-out ones included
    images = toy.render_captions(captions, torch.Generator().manual_seed(12345))
    assert toy.scorer_accuracy(reward, images, captions, toy.ALL_SINGLE) >= 0.9
    # Through the reward's own call path: an image scores higher with its caption than with another colour's.
    own, _ = reward(images[:24], captions[:24])
    other, _ = reward(images[:24], [toy.ALL_SINGLE[(i + 1) % 24] for i in range(24)])  # next colour, same shape
    assert (own > other).float().mean() >= 0.9


def test_shipped_model_loads_and_generates_offline():
    """The bar for the base model: its images of the seen single-shape prompts (CFG 7.5) are matched to
    their own prompt among all 24 by the shipped scorer >= 60% of the time (0.70 measured here)."""
    pipe = load_pipeline("toy")
    assert pipe.unet.dtype == torch.float32 and pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16
    prompts = toy.single_captions(toy.SEEN)
    images = generate(pipe, encode_prompts(pipe, prompts), torch.full((10,), 7.5), 10, torch.Generator().manual_seed(0))
    assert images.shape == (20, 3, 32, 32) and torch.isfinite(images).all()
    reward = load_reward("pickscore", pickscore_model="toy-scorer", pickscore_processor="toy-scorer")
    assert toy.scorer_accuracy(reward, images, prompts, toy.ALL_SINGLE) >= 0.6


def test_bench_arms_passes_every_extra_flag_to_the_trainers():
    """bench_toy's --extra is repeated once per token; every token must reach the trainer's command."""
    import tyro

    from tools import bench_arms as bench

    args = tyro.cli(bench.Args, args=["--extra=--prompt-weight-range", "--extra=1", "--extra=3"])
    cmd = bench.command(args, "alignprop", "pw", 0, "out")
    assert cmd[-5:] == ["--no-cfg-schedule", "--prompt-weighting", "--prompt-weight-range", "1", "3"]
    assert tyro.cli(bench.Args, args=[]).extra == []


def test_bench_arms_report_pairs_seeds(tmp_path):
    """The table's gains are final - start per seed, compared with the baseline's gain of the same seed;
    'samples to reach the baseline's final' is only given when the baseline gained."""
    import json

    from tools import bench_arms as bench

    curves = {  # (start, final) of eval_reward_mean per method, arm and seed
        "alignprop": {"baseline": {0: (10.0, 11.0), 1: (12.0, 12.5)}, "diffexp": {0: (10.0, 11.5), 1: (12.0, 13.5)}},
        "ddpo": {"baseline": {0: (10.0, 9.5), 1: (12.0, 11.0)}, "diffexp": {0: (10.0, 10.0), 1: (12.0, 12.0)}},
    }
    for method, arms in curves.items():
        for arm, seeds in arms.items():
            for seed, (start, final) in seeds.items():
                run = tmp_path / method / arm / f"seed{seed}"
                run.mkdir(parents=True)
                rows = [
                    {"epoch": -1, "samples": 0, "eval_reward_mean": start},
                    {"epoch": 0, "samples": 16, "eval_reward_mean": final},
                ]
                (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = bench.Args(
        methods=("alignprop", "ddpo"), arms=("baseline", "diffexp"), seeds=(0, 1), epochs=1, output_dir=str(tmp_path)
    )
    bench.report(args)
    rows = {}
    for line in (tmp_path / "bench.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0], cells[1]] = cells
    assert rows["alignprop", "baseline"][4] == "+0.750 ± 0.250"  # gains 1.0 and 0.5
    assert rows["alignprop", "diffexp"][4] == "+1.500 ± 0.000"  # gains 1.5 and 1.5
    assert (
        rows["alignprop", "diffexp"][5] == "+0.750 ± 0.250"
    )  # paired differences 0.5 and 1.0: s.e. = sample std 0.354 / sqrt 2
    assert (
        rows["alignprop", "diffexp"][6] == "16"
    )  # its mean curve (12.5) reaches the baseline's final mean (11.75) at 16 samples
    assert rows["ddpo", "diffexp"][5] == "+0.750 ± 0.250"  # paired differences 0.5 and 1.0
    assert rows["ddpo", "diffexp"][6] == "— (baseline did not gain)"  # baseline 11.0 -> 10.25: nothing to reach
    assert (tmp_path / "bench.png").is_file()


# ---------------------------------------------------------------------------------------------
# toy-compose: the compositional reward read from toy.py's detector (models/toy-detector).


def _wrong_captions(pair):
    """Captions that each get one thing wrong about `pair` = (a, relation, b)."""
    a, r, b = pair
    absent = [o for o in toy.OBJECTS if o not in (a, b)]
    other_colour = next(o for o in absent if o[1] == a[1])
    other_rel = [x for x in toy.RELATIONS if x != r][0]
    return {
        "missing shape": f"{toy.name(a)} {r} {toy.name(absent[0])}",
        "wrong colour": f"{toy.name(other_colour)} {r} {toy.name(b)}",
        "swapped relation": f"{toy.name(b)} {r} {toy.name(a)}",
        "other relation": f"{toy.name(a)} {other_rel} {toy.name(b)}",
        "one shape only": toy.name(absent[1]),
    }


def test_toy_compose_scores_the_right_prompt_above_wrong_ones():
    reward = load_reward("toy-compose")  # the shipped detector, through DEFAULT_MODELS["toy_detector"]
    assert reward.differentiable and reward.name == "toy-compose"
    pairs = [  # seen and held-out (toy.UNSEEN) combinations, both relations
        (("red", "circle"), "left of", ("green", "square")),
        (("blue", "triangle"), "above", ("orange", "diamond")),
        (("yellow", "circle"), "left of", ("purple", "square")),
        (("purple", "triangle"), "above", ("red", "diamond")),
        (("green", "diamond"), "above", ("blue", "square")),
        (("orange", "square"), "left of", ("yellow", "triangle")),
    ]
    images, captions = toy.render(len(pairs), torch.Generator().manual_seed(7), pairs=pairs)
    own, _ = reward(images, captions)
    assert (own > 0.8).all(), own
    for what in _wrong_captions(pairs[0]):
        wrong, _ = reward(images, [_wrong_captions(p)[what] for p in pairs])
        assert (wrong < 0.2).all() and (own > wrong + 0.5).all(), (what, own, wrong)
    # One-shape prompts: present scores high, absent low; each shape of a pair counts as present.
    singles, single_caps = toy.render(4, torch.Generator().manual_seed(8), two_frac=0.0)
    assert (reward(singles, single_caps)[0] > 0.8).all()
    assert (reward(images, [toy.name(p[2]) for p in pairs])[0] > 0.8).all()
    assert (
        reward(singles, [toy.name(toy.OBJECTS[(toy.ALL_SINGLE.index(c) + 1) % 24]) for c in single_caps])[0] < 0.2
    ).all()


def test_toy_compose_gradient_reaches_the_pixels_at_any_size():
    reward = load_reward("toy-compose")
    images, captions = toy.render(4, torch.Generator().manual_seed(9), two_frac=1.0)
    for x in (
        images,
        torch.nn.functional.interpolate(images, size=64, mode="bilinear"),
    ):  # 64 px: resized inside, differentiably
        x = x.clamp(0, 1).requires_grad_(True)
        scores, components = reward(x, captions)
        assert scores.shape == (4,) and scores.requires_grad and torch.equal(components["toy-compose"], scores.detach())
        scores.sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient


def test_bench_arms_success_rates_from_the_saved_evaluations(tmp_path):
    """The success column re-scores a run's first and last evaluation images (PNG + prompts.json, as
    evaluate_held_out writes them) with toy-compose: renders captioned with a missing shape at the
    first evaluation fail, the same renders with their own captions at the last succeed."""
    import json

    from torchvision.utils import save_image

    from tools import bench_arms as bench

    pairs = [(("red", "circle"), "left of", ("green", "square")), (("blue", "triangle"), "above", ("orange", "diamond")),
             (("yellow", "circle"), "left of", ("purple", "square")), (("green", "diamond"), "above", ("blue", "square"))]  # fmt: skip
    images, captions = toy.render(len(pairs), torch.Generator().manual_seed(7), pairs=pairs)
    run = tmp_path / "alignprop" / "baseline" / "seed0"
    for name, prompts in [("initial", [_wrong_captions(p)["missing shape"] for p in pairs]), ("epoch_0000", captions)]:
        (run / "eval" / name).mkdir(parents=True)
        for i, image in enumerate(images):
            save_image(image, run / "eval" / name / f"{i:03d}.png")
        (run / "eval" / name / "prompts.json").write_text(json.dumps({"prompts": prompts}))
    rows = [{"epoch": -1, "samples": 0, "eval_reward_mean": 1.0}, {"epoch": 0, "samples": 16, "eval_reward_mean": 2.0}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.success_curve(run, "toy-compose", 0.5) == [(0, 0.0), (16, 1.0)]
    assert json.loads((run / "success_toy-compose_0.5.json").read_text()) == [[0, 0.0], [16, 1.0]]  # cached
    args = bench.Args(methods=("alignprop",), arms=("baseline",), seeds=(0,), epochs=1, eval_num=4, output_dir=str(tmp_path),
                      success_reward="toy-compose", success_target=0.5)  # fmt: skip
    bench.report(args)
    row = (tmp_path / "bench.md").read_text().splitlines()[2]
    assert row.endswith("| 0.0% → 100.0% | — | 16 |"), row  # first -> last; no baseline to pair with; 50% reached at 16
    empty = tmp_path / "alignprop" / "baseline" / "seed1"
    empty.mkdir()
    assert bench.success_curve(empty, "toy-compose", 0.5) == []  # no evaluations: no points


def test_toy_compose_refuses_prompts_outside_the_toy_grammar():
    import pytest

    from rewards import DEFAULT_MODELS, parse_reward_spec

    assert parse_reward_spec("toy-compose:2,jpeg") == [("toy-compose", 2.0), ("jpeg", 1.0)]
    assert (Path(DEFAULT_MODELS["toy_detector"]) / "model.safetensors").is_file()
    reward = load_reward("toy-compose")
    image = toy.render(1, torch.Generator().manual_seed(0))[0]
    for bad in [
        "a dolphin riding a bike",
        "a red circle right of a blue square",
        "a red circle left of a red circle",
        "a pink circle",
    ]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            reward(image, [bad])
    # Case, spacing, a final full stop and a/an are forgiven.
    assert reward(image, ["A  Red circle."])[0].shape == (1,)


def test_alignprop_raises_toy_compose(tmp_path):
    """AlignProp with the compositional reward on the shipped toy model, one two-shape prompt the base
    model rarely gets right. Measured 2026-11-30 (10 steps, 30 epochs x 16 samples, lr 3e-3, no DiffExp;
    held-out reward = mean over 32 fixed seeds): seed 0: 0.073 -> 0.297; seeds 1-5: +0.170, +0.137,
    +0.297, +0.429, +0.127. The test asks for +0.06 (about half the smallest gain)."""
    from conftest import read_log, run_main

    prompt = (
        "a red circle left of a green square"  # base model: 0.067 mean, 8 images (models/toy/quality.json's settings)
    )
    (tmp_path / "train.txt").write_text(prompt + "\n")
    (tmp_path / "eval.txt").write_text((prompt + "\n") * 32)  # one prompt, 32 fixed noises
    out = tmp_path / "run"
    run_main(
        "train_alignprop.py", "--pretrained", "toy", "--reward", "toy-compose", "--prompts", tmp_path / "train.txt",
        "--eval-prompts", tmp_path / "eval.txt", "--eval-num", 32, "--num-steps", 10, "--samples-per-epoch", 16,
        "--batch-size", 8, "--gradient-accumulation-steps", 2, "--num-epochs", 30, "--eval-every", 30, "--lr", 3e-3,
        "--no-cfg-schedule", "--no-prompt-weighting", "--mixed-precision", "no", "--save-every", 30, "--seed", 0,
        "--output-dir", out,
    )  # fmt: skip
    log = read_log(out)
    start, final = log[0]["eval_reward_mean"], log[-1]["eval_reward_mean"]
    assert final > start + 0.06, f"held-out toy-compose {start:.4f} -> {final:.4f}"
