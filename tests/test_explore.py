"""DiffExp's two exploration parts and its schedule (explore.py)."""

import pytest
import torch
from diffusers import DDIMScheduler

from explore import (
    DiffExpConfig,
    apply_prompt_weights,
    backprop_note,
    cfg_scales,
    choose_words,
    describe_cfg_schedule,
    is_exploring,
    unswitched_schedule_warning,
    word_token_positions,
)
from tools.tiny import SD_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def timesteps_50():
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched.set_timesteps(50)
    return sched.timesteps  # 981, 961, ..., 1


@pytest.mark.parametrize("t_sw, n_low", [(0.0, 50), (1.0, 0), (0.8, 10)])
def test_cfg_schedule_boundaries(timesteps_50, t_sw, n_low):
    w = cfg_scales(timesteps_50, 1000, t_sw, w_low=1.0, w_high=7.5)
    # Low scale on the first (noisiest) steps only, then the ordinary scale.
    assert w.tolist() == [1.0] * n_low + [7.5] * (50 - n_low)


def test_cfg_schedule_t_sw_08_switches_at_800(timesteps_50):
    w = cfg_scales(timesteps_50, 1000, 0.8, w_low=1.0, w_high=5.0)
    assert timesteps_50[9] == 801 and w[9] == 1.0
    assert timesteps_50[10] == 781 and w[10] == 5.0
    # Exactly t = t_sw * T is still "early" (t >= t_sw * T).
    assert cfg_scales(torch.tensor([800, 799]), 1000, 0.8, 1.0, 5.0).tolist() == [1.0, 5.0]


def test_unswitched_schedule_warning_names_the_flags_or_the_setting():
    """The warning the trainers and sample.py give when a schedule never switches at this many steps (SD's
    leading spacing at 4 steps: 751, 501, 251, 1), both ways; none when it switches or cannot matter."""
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched.set_timesteps(4)
    ts = sched.timesteps

    def warn(setting=None, **kw):
        return unswitched_schedule_warning(DiffExpConfig(**kw), ts, sched, setting)

    assert warn(t_sw=0.8) == (
        "warning: --t-sw 0.8 with --num-steps 4: no sampling timestep (751, 501, 251, 1) reaches t_sw*T = 800, so "
        "the CFG schedule never uses --w-low; raise --num-steps or lower --t-sw (or pass --no-cfg-schedule)"
    )
    assert warn(t_sw=0.001, setting="cfg:t_sw=0.001") == (
        "warning: setting 'cfg:t_sw=0.001' (t_sw 0.001) with --num-steps 4: every sampling timestep (751, 501, 251, 1) "
        "is >= t_sw*T = 1, so the CFG schedule never switches to w_high; raise its t_sw"
    )
    assert warn(t_sw=0.0) is None  # w_low on every step was asked for (CFG-free rollouts at w_low 1)
    assert describe_cfg_schedule(ts, sched, 0.0, 1.0, 7.5) == (
        "DiffExp CFG schedule (--t-sw 0): w_low 1 on all 4 steps while exploring (CFG-free rollouts); "
        "w_high 7.5 after exploration and in every evaluation"
    )
    assert warn(t_sw=0.5) is None  # 751 and 501 at w_low, 251 and 1 at w_high
    assert warn(t_sw=0.8, w_low=7.5, w_high=7.5) is None  # the schedule cannot change a scale
    assert warn(t_sw=0.8, cfg_schedule=False) is None


def test_backprop_note_says_when_the_gradient_misses_the_w_low_steps():
    """AlignProp's start-up note. SD's 10 leading timesteps are 901, 801, ..., 1; at t_sw 0.8 the first two
    (901, 801) run at w_low, so the gradient reaches a w_low step only through the last 9 steps (by hand)."""
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    sched.set_timesteps(10)
    ts = sched.timesteps
    assert ts[:3].tolist() == [901, 801, 701]

    def note(k, random_k=False, **kw):
        return backprop_note(DiffExpConfig(**{"t_sw": 0.8, **kw}), ts, sched, k, random_k)

    assert note(1) == (
        "note: --backprop-steps 1 carries the gradient through the last 1 of 10 steps; the CFG schedule's w_low "
        "steps are the first 2, so no gradient passes through them (--backprop-steps 9 reaches them)"
    )
    assert note(8) is not None and note(9) is None and note(10) is None
    # K ~ U{1..8}: never past the 8th step from the end either, said as "at most"; K ~ U{1..9} reaches it at times
    assert "through at most the last 8 of 10 steps" in note(8, random_k=True) and note(9, random_k=True) is None
    assert note(1, t_sw=0.0) is None  # every step at w_low: the last one too
    assert note(2, t_sw=0.2) is not None and note(3, t_sw=0.2) is None  # w_low 901 ... 201: K = 3 reaches 201
    assert note(3, t_sw=0.3) is not None and note(4, t_sw=0.3) is None  # w_low down to 301: K = 4 reaches it
    assert note(1, cfg_schedule=False) is None and note(1, w_low=7.5, w_high=7.5) is None
    assert note(1, explore_frac=0.0) is None


def test_cfg_schedule_off_and_per_sample_shape():
    ts = torch.tensor([[981, 21], [501, 981]])
    assert cfg_scales(ts, 1000, 0.5, 1.0, 7.5, enabled=False).tolist() == [[7.5, 7.5], [7.5, 7.5]]
    assert cfg_scales(ts, 1000, 0.5, 1.0, 7.5).tolist() == [[1.0, 7.5], [1.0, 1.0]]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_invalid_t_sw_is_rejected_with_the_flag(bad):
    with pytest.raises(ValueError, match=r"--t-sw must be in \[0, 1\]"):
        cfg_scales(torch.tensor([1]), 1000, bad, 1.0, 7.5)
    with pytest.raises(ValueError, match=r"--t-sw must be in \[0, 1\]"):
        DiffExpConfig(t_sw=bad).validate()


def test_config_validation_messages():
    with pytest.raises(ValueError, match="--explore-frac"):
        DiffExpConfig(explore_frac=2).validate()
    with pytest.raises(ValueError, match="--prompt-weight-range"):
        DiffExpConfig(prompt_weight_range=(2.0, 1.0)).validate()
    with pytest.raises(ValueError, match="--w-low"):
        DiffExpConfig(w_low=-1).validate()


def test_exploration_schedule():
    assert [is_exploring(e, 8, 0.75) for e in range(8)] == [True] * 6 + [False] * 2
    assert not any(is_exploring(e, 8, 0.0) for e in range(8))
    assert all(is_exploring(e, 8, 1.0) for e in range(8))


def test_word_positions_match_full_tokenisation(tokenizer):
    for prompt in ["a hippopotamus riding a bike", "A dolphin, playing CHESS!", "an octopus doing laundry"]:
        words = word_token_positions(prompt, tokenizer)
        ids = tokenizer(prompt).input_ids
        flat = [p for _, pos in words for p in pos]
        assert flat == list(range(1, len(ids) - 1))  # every token between BOS and EOS, in order, once
        for word, pos in words:
            assert [ids[p] for p in pos] == tokenizer(word, add_special_tokens=False).input_ids


def _embeds(tokenizer, prompts, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(prompts), tokenizer.model_max_length, D, generator=g), torch.randn(
        tokenizer.model_max_length, D, generator=g
    )


def test_weight_one_is_identity(tokenizer):
    prompts = ["a cat riding a bike", "a dog playing chess"]
    choices = choose_words(prompts, tokenizer, torch.Generator().manual_seed(0), weight_range=(1.0, 1.0))
    e, e0 = _embeds(tokenizer, prompts)
    assert torch.equal(apply_prompt_weights(e, e0, choices), e)


def test_only_chosen_word_positions_change(tokenizer):
    prompts = ["a hippopotamus riding a bike"] * 6
    choices = choose_words(prompts, tokenizer, torch.Generator().manual_seed(3), weight_range=(1.5, 3.0))
    e, e0 = _embeds(tokenizer, prompts)
    out = apply_prompt_weights(e, e0, choices)
    for b, c in enumerate(choices):
        assert c.word in {"hippopotamus", "riding", "bike"}  # stop words "a" excluded by default
        assert 1.5 <= c.weight <= 3.0
        changed = (out[b] != e[b]).any(-1).nonzero().flatten().tolist()
        assert changed == c.positions
        expected = e0[c.positions] + c.weight * (e[b, c.positions] - e0[c.positions])
        torch.testing.assert_close(out[b, c.positions], expected)


def test_multi_token_word_is_weighted_whole(tokenizer):
    words = dict(word_token_positions("a hippopotamus", tokenizer))
    assert len(words["hippopotamus"]) > 1  # split into several BPE tokens by CLIP's vocabulary
    c = choose_words(["a hippopotamus"], tokenizer, torch.Generator().manual_seed(0))[0]
    assert c.word == "hippopotamus" and c.positions == words["hippopotamus"]


def test_same_seed_same_choices_and_recorded(tokenizer):
    prompts = ["a cat riding a bike", "a dog playing chess", "an ant washing the dishes"] * 3
    a = choose_words(prompts, tokenizer, torch.Generator().manual_seed(7))
    b = choose_words(prompts, tokenizer, torch.Generator().manual_seed(7))
    c = choose_words(prompts, tokenizer, torch.Generator().manual_seed(8))
    assert a == b and a != c
    assert len({x.word for x in a}) > 1  # the choice really varies across samples


def test_stopword_option(tokenizer):
    # Only stop words: nothing eligible when excluded -> unweighted, recorded as such.
    c = choose_words(["a the of"], tokenizer, torch.Generator().manual_seed(0))[0]
    assert c.word is None and c.positions == [] and c.weight == 1.0
    picked = {
        choose_words(["a cat"], tokenizer, torch.Generator().manual_seed(s), exclude_stopwords=False)[0].word
        for s in range(20)
    }
    assert picked == {"a", "cat"}


def test_one_word_and_overlong_prompts(tokenizer):
    one = choose_words(["zebra"], tokenizer, torch.Generator().manual_seed(0))[0]
    assert one.word == "zebra" and one.positions == [1]
    long_prompt = " ".join(f"cat{i}" for i in range(60))  # >77 tokens: truncated by the encoder
    words = word_token_positions(long_prompt, tokenizer)
    assert max(p for _, pos in words for p in pos) == 75  # last slot (76) is <|endoftext|>
    for s in range(30):
        c = choose_words([long_prompt], tokenizer, torch.Generator().manual_seed(s))[0]
        assert c.positions and max(c.positions) <= 75  # a word past truncation is never chosen
    e, e0 = _embeds(tokenizer, [long_prompt])
    assert apply_prompt_weights(e, e0, [c]).shape == e.shape
