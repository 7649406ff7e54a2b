"""The mode-drop toy world (tools/toy.py --hidden): its captions, the shipped model's hidden mode under
the guidance settings, the toy-hidden reward, and toy-compose's 'A and B' prompts."""

import re
from collections import Counter

import pytest
import torch

from conftest import read_log, run_main
from diffusion import ALIASES, TextConditioner, generate, load_pipeline, load_prompts, seeded
from explore import PromptWeight, apply_prompt_weights, cfg_scales, word_token_positions
from rewards import DEFAULT_MODELS, checkpoints_needed, load_reward
from tools import toy

ARGS = toy.Args()


def test_world_is_deterministic_and_captions_follow_the_stated_rates():
    a, caps_a, (pairs_a, _, _) = toy.hidden_data(64, torch.Generator().manual_seed(3), ARGS, layout=True)
    b, caps_b, _ = toy.hidden_data(64, torch.Generator().manual_seed(3), ARGS, layout=True)
    assert torch.equal(a, b) and caps_a == caps_b
    c, caps_c = toy.hidden_data(64, torch.Generator().manual_seed(4), ARGS)
    assert not torch.equal(a, c) and caps_a != caps_c
    # Each caption says what was drawn: a pair's caption names both of its objects; a one-shape image's
    # names its object (or its shape alone), possibly followed or preceded by an undrawn second object.
    for (x, rel, y), cap in zip(pairs_a, caps_a):
        named = cap.split(" and ")
        if rel is not None:
            assert sorted(named) == sorted([toy.name(x), toy.name(y)]), cap
        elif len(named) == 2:
            assert toy.name(x) in named and all(n == toy.name(x) or x[1] not in n for n in named), cap
        else:
            assert named[0] in (toy.name(x), toy.bare(x[1])), cap
    # The rates, counted on a larger draw (n = 8000; three standard errors are about 0.03).
    _, caps, (pairs, _, _) = toy.hidden_data(8000, torch.Generator().manual_seed(5), ARGS, layout=True)
    singles = [(x, cap) for (x, rel, _), cap in zip(pairs, caps) if rel is None]
    assert abs(len(singles) / 8000 - (1 - ARGS.hidden_two_frac)) < 0.03
    as_pair = [cap for _, cap in singles if " and " in cap]
    assert abs(len(as_pair) / len(singles) - ARGS.hidden_single_as_pair) < 0.03
    count = Counter(
        (x[0] == toy.HIDDEN_COLOURS[x[1]][1], cap == toy.bare(x[1])) for x, cap in singles if " and " not in cap
    )
    minority = count[True, True] + count[True, False]
    assert abs(minority / sum(count.values()) - 0.5) < 0.03
    assert abs(count[True, True] / minority - ARGS.hidden_bare_minority) < 0.04
    assert abs(count[False, True] / (sum(count.values()) - minority) - ARGS.hidden_bare_majority) < 0.04


def test_prompt_sets_are_the_scripts():
    sets = toy.hidden_prompt_sets(0, write=False)
    for k, v in sets.items():
        assert load_prompts(k) == v, f"prompts/{k}.txt is not what toy.py writes; rerun python tools/toy.py --hidden"
    assert load_prompts("toy_hidden") == ["a circle", "a square", "a triangle", "a diamond"]
    assert all(" and " in p for p in sets["toy_dropped"]) and len(set(sets["toy_dropped"])) == 8


def test_smoke_build_writes_a_loadable_pipeline(tmp_path):
    """The --hidden stage end to end at a few steps: the UNet alone is written, the rest links to models/toy."""
    out, det = tmp_path / "toy-hidden", tmp_path / "toy-hidden-detector"
    toy.main(toy.Args(hidden=True, smoke=True, hidden_out=str(out), hidden_detector_out=str(det)))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "vae").is_symlink()
    pipe = load_pipeline(str(out))
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert load_reward("toy-hidden", toy_hidden=str(det)).name == "toy-hidden"


def _hidden_share(pipe, text, reward, prompts, guidance, k, steps):
    """Share of images (k per prompt, the same starting noise for every guidance) with toy-hidden > 0.5."""
    prompts = [p for p in prompts for _ in range(k)]
    images = generate(pipe, text.encode(prompts), guidance, steps, seeded(0, 0), negative=text.negative)
    return (reward(images, prompts)[0] > 0.5).float().mean().item()


def test_shipped_model_hides_the_minority_colour_under_guidance():
    """At w = 1 the shapes' minority colours are common, at w = 7.5 rare; DiffExp's CFG schedule (w_low = 1
    on the noisiest steps) brings part of them back. Wired backwards (w_low on the last steps) or ignored,
    it gives about the w = 7.5 share."""
    assert ALIASES["toy-hidden"].joinpath("model_index.json").is_file(), "build it: python tools/toy.py --hidden"
    pipe = load_pipeline("toy-hidden")
    text = TextConditioner(pipe)
    reward = load_reward("toy-hidden")
    prompts, k, steps = load_prompts("toy_hidden"), 16, 10
    pipe.scheduler.set_timesteps(steps)
    ts = pipe.scheduler.timesteps
    schedule = cfg_scales(ts, 1000, 0.8, 1.0, 7.5)
    # the schedule itself, from its definition: w_low exactly at the timesteps >= 0.8 T (901 and 801 of 10 steps)
    assert schedule.tolist() == [1.0 if t >= 800 else 7.5 for t in ts.tolist()] and schedule.tolist().count(1.0) == 2
    low = _hidden_share(pipe, text, reward, prompts, torch.full((steps,), 1.0), k, steps)
    high = _hidden_share(pipe, text, reward, prompts, torch.full((steps,), 7.5), k, steps)
    sched = _hidden_share(pipe, text, reward, prompts, schedule, k, steps)
    assert low >= 0.1 and low >= 3 * high, (low, high)
    # measured 2026-12-03: low 12/64, high 2/64, schedule 6/64 (backwards: 2/64, as high); ask for 2 more than high
    assert sched >= high + 2 / 64, (low, sched, high)


def test_toy_hidden_reward_scores_the_hidden_colour_and_passes_gradients():
    assert (DEFAULT_MODELS["toy_hidden"].endswith("toy-hidden-detector")) and load_reward("toy-hidden").differentiable
    reward = load_reward("toy-hidden")
    shapes = list(toy.HIDDEN_COLOURS)
    hidden = [((toy.HIDDEN_COLOURS[s][1], s), None, None) for s in shapes]
    usual = [((toy.HIDDEN_COLOURS[s][0], s), None, None) for s in shapes]
    other = [(("orange", s), None, None) for s in shapes]  # neither of the shape's colours
    g = torch.Generator().manual_seed(11)
    prompts = [toy.bare(s) for s in shapes]
    yes = toy.render(4, g, pairs=hidden)[0].requires_grad_(True)
    scores, parts = reward(yes, prompts)
    assert (scores > 0.8).all() and torch.equal(parts["toy-hidden"], scores.detach()), scores
    for pairs in (usual, other):
        assert (reward(toy.render(4, g, pairs=pairs)[0], prompts)[0] < 0.2).all()
    # A minority-colour circle is not a hidden-mode square: the prompt's shape counts.
    assert (reward(yes, [toy.bare(s) for s in shapes[1:] + shapes[:1]])[0] < 0.2).all()
    scores.sum().backward()
    assert torch.isfinite(yes.grad).all() and (yes.grad.flatten(1).abs().sum(1) > 0).all()
    # Case, spacing and a final full stop are forgiven, as toy-compose forgives them.
    assert reward(yes[:1].detach(), ["A  Circle."])[0] > 0.8


@pytest.mark.parametrize("bad", ["a blue circle", "a hexagon", "a circle and a square", "circle", "a dolphin"])
def test_toy_hidden_refuses_prompts_outside_its_grammar(bad):
    reward = load_reward("toy-hidden")
    image = toy.render(1, torch.Generator().manual_seed(0))[0]
    with pytest.raises(ValueError, match=re.escape(repr(bad))) as e:
        reward(image, [bad])
    assert "\n" not in str(e.value) and "'a <shape>'" in str(e.value)


def test_toy_hidden_checkpoints_are_named_by_their_flag():
    needed = checkpoints_needed("toy-hidden", toy_hidden="/nowhere")
    assert [(flag, name) for flag, name, _ in needed] == [("--reward-models toy_hidden", "/nowhere")] * 2


def test_toy_compose_reads_and_prompts():
    """'A and B': both present wherever they are (no relation); one missing scores low."""
    reward = load_reward("toy-compose")
    pairs = [
        (("red", "circle"), "left of", ("blue", "square")),
        (("blue", "square"), "above", ("red", "circle")),
        (("green", "triangle"), "left of", ("purple", "diamond")),
        (("purple", "diamond"), "above", ("green", "triangle")),
    ]
    images, _ = toy.render(4, torch.Generator().manual_seed(12), pairs=pairs)
    both = [toy.and_caption(a, b) for a, _, b in pairs]
    reversed_ = [toy.and_caption(b, a) for a, _, b in pairs]
    missing = [toy.and_caption(a, ("orange", "circle")) for a, _, _ in pairs]
    assert (reward(images, both)[0] > 0.8).all() and (reward(images, reversed_)[0] > 0.8).all()
    assert (reward(images, missing)[0] < 0.2).all()
    with pytest.raises(ValueError, match="same object twice"):
        reward(images[:1], ["a red circle and a red circle"])


def test_a_short_alignprop_run_with_diffexp_raises_the_hidden_mode_reward(tmp_path):
    """AlignProp with DiffExp on (the trainer's defaults: CFG schedule and prompt weighting), 8 epochs x 16
    samples at lr 1e-2 on the shipped model, seed 0: the held-out toy-hidden reward (16 fixed-seed images at
    w_high, no DiffExp) rises. AlignProp rather than DDPO because only it moves within a CI budget here: at
    its stable lr (3e-3) DDPO needed the evidence run's whole 480 samples (about 160 s) to move its baseline
    (docs/toy_hidden.md). Measured 2026-12-03: 0.094 -> 0.780 in about 35 s."""
    eval_prompts = tmp_path / "eval.txt"  # every shape, 4 fixed-seed images each
    eval_prompts.write_text("".join(f"{p}\n" * 4 for p in load_prompts("toy_hidden")))
    out = tmp_path / "run"
    run_main(
        "train_alignprop.py", "--pretrained", "toy-hidden", "--reward", "toy-hidden", "--prompts", "toy_hidden",
        "--eval-prompts", eval_prompts, "--eval-num", 16, "--eval-every", 8, "--num-epochs", 8,
        "--samples-per-epoch", 16, "--batch-size", 8, "--gradient-accumulation-steps", 2, "--num-steps", 10,
        "--lr", 1e-2, "--mixed-precision", "no", "--seed", 0, "--output-dir", out,
    )  # fmt: skip
    log = read_log(out)
    # DiffExp was on: the first epochs explored, with both parts (w_low steps, weighted prompts)
    first = next(r for r in log if r["epoch"] == 0)
    assert first["exploring"] and first["w_low_share"] > 0 and any(w for w in first["prompt_weights"]), first
    evals = [r["eval_reward_mean"] for r in log if "eval_reward_mean" in r]
    assert len(evals) == 2 and evals[1] > evals[0] + 0.2, evals


def test_dropped_world_marks_which_mentions_are_drawn():
    """--dropped's fine-tuning set: every 'A and B' caption's four content words are located, and a mention
    counts as drawn exactly when its object is in the render (a pair: both; a one-shape image: one)."""
    tokenizer = load_pipeline("toy-hidden").tokenizer
    args = toy.Args(dropped_images=400)
    _, caps, masks, drawn, is_pair, _ = toy.dropped_data(args, tokenizer)
    _, caps_again, _, drawn_again, _, _ = toy.dropped_data(args, tokenizer)
    assert caps == caps_again and torch.equal(drawn, drawn_again)
    assert abs(is_pair.float().mean().item() - (0.5 + 0.5 * args.dropped_single_as_pair)) < 0.08
    for i, cap in enumerate(caps):
        if " and " not in cap:
            assert not is_pair[i] and masks[i].sum() == 0
            continue
        ids = tokenizer(cap).input_ids
        words = cap.split()
        for j, w in enumerate((1, 2, 5, 6)):  # "a red circle and a purple square"
            (pos,) = masks[i, j].nonzero().flatten().tolist()
            assert tokenizer.decode([ids[pos]]).strip() == words[w]
        # the colour and shape words of one mention agree; a pair draws both, a one-shape image one
        assert drawn[i, 0] == drawn[i, 1] and drawn[i, 2] == drawn[i, 3]
        assert int(drawn[i, 0]) + int(drawn[i, 2]) in (1, 2)


def test_smoke_dropped_build_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "toy-dropped"
    toy.main(toy.Args(dropped=True, smoke=True, dropped_out=str(out)))
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (out / "text_encoder").is_symlink()
    assert load_pipeline(str(out)).unet.config.addition_embed_type == "text"


def _both_share(pipe, text, compose, prompts, k, weigh=None):
    """Share of 'A and B' images (k per prompt, 10 steps at w 7.5, the same noise) with toy-compose > 0.5;
    weigh: (word indices, weight) emphasised as DiffExp's prompt weighting does."""
    prompts = [p for p in prompts for _ in range(k)]
    cond = text.encode(prompts)
    if weigh is not None:
        choices = []
        for p in prompts:
            words = word_token_positions(p, pipe.tokenizer)
            idx, w = weigh
            positions = [q for i in idx for q in words[i][1]]
            choices.append(PromptWeight(p, " ".join(words[i][0] for i in idx), idx[0], positions, w))
        cond = type(cond)(apply_prompt_weights(cond.embeds, text.empty.embeds[0], choices))
    images = generate(pipe, cond, torch.full((10,), 7.5), 10, seeded(0, 0), negative=text.negative)
    return (compose(images, prompts)[0] > 0.5).float().mean().item()


def test_shipped_dropped_world_drops_a_word_that_emphasis_brings_back():
    """models/toy-dropped, toy_dropped prompts, w 7.5: both objects are drawn at a measurable rate, and
    emphasising the second-named object's shape word (x 1.5, prompt weighting's formula) raises it; the
    first-named's does not, as that is the object the model keeps."""
    assert ALIASES["toy-dropped"].joinpath("model_index.json").is_file(), "build it: python tools/toy.py --dropped"
    pipe = load_pipeline("toy-dropped")
    pipe.scheduler.set_timesteps(10)
    text, compose = TextConditioner(pipe), load_reward("toy-compose")
    prompts, k = load_prompts("toy_dropped"), 8
    plain = _both_share(pipe, text, compose, prompts, k)
    second = _both_share(pipe, text, compose, prompts, k, weigh=([6], 1.5))
    first = _both_share(pipe, text, compose, prompts, k, weigh=([2], 1.5))
    assert plain >= 0.05 and second >= plain + 6 / 64 and first <= plain + 3 / 64, (plain, second, first)
