"""The offline toy world (toy.py): the smoke build, the shipped model and scorer, the 'toy' aliases."""

import torch

import toy
from diffusion import ALIASES, encode_prompts, from_pretrained, generate, load_pipeline, load_prompts
from rewards import load_reward


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
    images = generate(pipe, encode_prompts(pipe, ["a red circle"]), torch.full((2,), 7.5), 2, torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    scores, _ = load_reward("pickscore", pickscore_model=str(scorer), pickscore_processor=str(scorer))(images, ["a red circle"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


def test_aliases_resolve_to_the_shipped_models():
    assert ALIASES["toy"].joinpath("model_index.json").is_file(), "models/toy is missing: build it with python toy.py"
    assert ALIASES["toy-scorer"].joinpath("config.json").is_file(), "models/toy-scorer is missing: build it with python toy.py"
    from transformers import CLIPProcessor

    assert from_pretrained(CLIPProcessor, "toy-scorer", "--pickscore-processor").image_processor.crop_size["height"] == 32


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


def test_bench_toy_passes_every_extra_flag_to_the_trainers():
    """bench_toy's --extra is repeated once per token; every token must reach the trainer's command."""
    import tyro

    import bench_toy

    args = tyro.cli(bench_toy.Args, args=["--extra=--prompt-weight-range", "--extra=1", "--extra=3"])
    cmd = bench_toy.command(args, "alignprop", "pw", 0, "out")
    assert cmd[-5:] == ["--no-cfg-schedule", "--prompt-weighting", "--prompt-weight-range", "1", "3"]
    assert tyro.cli(bench_toy.Args, args=[]).extra == []


def test_bench_toy_report_pairs_seeds(tmp_path):
    """The table's gains are final - start per seed, compared with the baseline's gain of the same seed;
    'samples to reach the baseline's final' is only given when the baseline gained."""
    import json

    import bench_toy

    curves = {  # (start, final) of eval_reward_mean per method, arm and seed
        "alignprop": {"baseline": {0: (10.0, 11.0), 1: (12.0, 12.5)}, "diffexp": {0: (10.0, 11.5), 1: (12.0, 13.5)}},
        "ddpo": {"baseline": {0: (10.0, 9.5), 1: (12.0, 11.0)}, "diffexp": {0: (10.0, 10.0), 1: (12.0, 12.0)}},
    }
    for method, arms in curves.items():
        for arm, seeds in arms.items():
            for seed, (start, final) in seeds.items():
                run = tmp_path / method / arm / f"seed{seed}"
                run.mkdir(parents=True)
                rows = [{"epoch": -1, "samples": 0, "eval_reward_mean": start}, {"epoch": 0, "samples": 16, "eval_reward_mean": final}]
                (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = bench_toy.Args(methods=("alignprop", "ddpo"), arms=("baseline", "diffexp"), seeds=(0, 1), epochs=1, output_dir=str(tmp_path))
    bench_toy.report(args)
    rows = {}
    for line in (tmp_path / "bench.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0], cells[1]] = cells
    assert rows["alignprop", "baseline"][4] == "+0.750 ± 0.250"  # gains 1.0 and 0.5
    assert rows["alignprop", "diffexp"][4] == "+1.500 ± 0.000"  # gains 1.5 and 1.5
    assert rows["alignprop", "diffexp"][5] == "+0.750 ± 0.250"  # paired differences 0.5 and 1.0: s.e. = sample std 0.354 / sqrt 2
    assert rows["alignprop", "diffexp"][6] == "16"  # its mean curve (12.5) reaches the baseline's final mean (11.75) at 16 samples
    assert rows["ddpo", "diffexp"][5] == "+0.750 ± 0.250"  # paired differences 0.5 and 1.0
    assert rows["ddpo", "diffexp"][6] == "— (baseline did not gain)"  # baseline 11.0 -> 10.25: nothing to reach
    assert (tmp_path / "bench.png").is_file()
