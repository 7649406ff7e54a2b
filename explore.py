"""DiffExp: exploration for reward fine-tuning of text-to-image diffusion models.

Two independent parts, both shared by train_ddpo.py and train_alignprop.py:

(a) Dynamic CFG schedule. Denoising runs from t = T-1 (noise) to t = 0 (image). The noisiest steps,
    t >= t_sw * T, use an extremely low guidance scale `w_low` (diverse layouts); the rest use the
    ordinary scale `w_high` (quality). `cfg_scales` returns the scale for every step and sample.

    On a flow-matching model (SD3 / SD3.5: x = (1 - sigma) x_0 + sigma eps, model timestep sigma * T)
    t_sw keeps its meaning as a noise level: a step runs at w_low when its signal-to-noise ratio
    ((1 - sigma) / sigma)^2 is at most SD's, alpha_bar / (1 - alpha_bar), at the first DDPM timestep
    t >= t_sw * T (SD and SDXL share that alpha_bar schedule), i.e. when sigma >= sigma_sw(t_sw)
    (0.836 for t_sw = 0.8). Why not the other two readings: "sigma >= t_sw" compares a flow sigma with
    a DDPM time fraction, which are different scales (sigma = 0.8 is far less noisy than SD's t = 800);
    "the first (1 - t_sw) of the steps" ties the switch to the step count and to SD3's shift (3.0 puts
    most steps at high noise), not to how noisy the latents are, which is what decides the layout the
    low scale is meant to diversify. With SD3's shift 3.0 and --t-sw 0.8: 11 of 28 steps, 19 of 50 run
    at w_low (the first 20% would be 6 and 10; sigma >= 0.8: 12 and 22). `w_low_threshold`,
    `low_guidance_steps` and `describe_cfg_schedule` give this for any of SD, SDXL and SD3.

(b) Random prompt weighting. For each sample one word of its prompt is chosen at random and its
    token embeddings are pushed away from the empty prompt's:
        e'_k = e_empty_k + w * (e_k - e_empty_k)   at the chosen word's token positions k,
    with w ~ U(w_min, w_max) per sample. `choose_words` draws (reproducibly, from a generator) and
    records the choice; `apply_prompt_weights` applies it to text-encoder outputs.

    SDXL has two text encoders whose token states are concatenated ([B, 77, 768 + 1280]). The formula
    is applied to both halves, each at the chosen word's positions *in its own tokenizer* (the second
    tokenizer treats '!' as a special token, so positions can differ after a '!'), with e_empty each
    encoder's own output for "" (not CFG's all-zeros negative). The pooled embedding is left alone
    by default — the paper's formula is about token states, and this is what compel computes for
    SDXL; `prompt_weight_pooled` applies the same blend to it (p' = p_empty + w (p - p_empty)).

    SD3 has three: CLIP-L and CLIP-G side by side in the first 77 rows (as SDXL) and T5's states in the
    rows after them. The chosen word is weighted in all three, each at its positions in its own
    tokenizer (T5's sentencepiece splits words differently from CLIP's BPE), with each encoder's own
    encoding of "" as e_empty; the pooled embedding (CLIP-L's ++ CLIP-G's) as on SDXL.

    FLUX.1's token states are T5's alone (CLIP-L gives only the pooled vector): the word is chosen among
    T5's words and weighted at its T5 positions (`positions` are T5's there), e_empty T5's encoding of "";
    the pooled vector is blended only with `prompt_weight_pooled`, as on SDXL and SD3.

(a) on a guidance-distilled model. FLUX.1-dev has no unconditional branch: the guidance scale is an input
    of the transformer (its guidance embedding), distilled from CFG. Our reading of the schedule there (no
    paper states it): the guidance input g takes w_low on the steps at least as noisy as SD's t_sw*T (the
    same sigma_sw rule, on FLUX's sigmas, which its scheduler shifts by the image's token count, so the
    steps at w_low depend on the resolution) and w_high after; defaults w_low 1, w_high 3.5 (the
    pipeline's). A low distilled guidance on the steps where layout is decided is what a low CFG scale
    does on SD. With `true_cfg` (two calls, the encoded "" as negative) the schedule acts on the true-CFG
    scale instead, g fixed at 3.5; FLUX.1-schnell has no guidance input, so there only `true_cfg` gives the
    schedule something to act on (`check_guidance`).

Exploration is applied only during the first `explore_frac` of fine-tuning (`is_exploring`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

# Function words that rarely carry content. Whether they may be picked is an option
# (`exclude_stopwords`): emphasising "the" mostly wastes a sample.
STOPWORDS = frozenset(
    "a an the of in on at to for with and or but by from into onto over under near is are was were "
    "be been being it its this that these those as his her their my your our".split()
)


@dataclass
class DiffExpConfig:
    """DiffExp: a low guidance scale on the noisiest steps and one randomly emphasised word per prompt,
    while exploring (the first --explore-frac of the epochs). Both trainers and sample.py embed this one
    dataclass; its fields are the command-line flags."""

    cfg_schedule: bool = True
    """DiffExp (a), the dynamic CFG schedule: guidance w_low on the noisy steps t >= t_sw*T, w_high after"""
    prompt_weighting: bool = True
    """DiffExp (b), random prompt weighting: one random word of each prompt emphasised by a random weight"""
    t_sw: float = 0.8
    """switch point in [0, 1]: steps with t >= t_sw*T (the first ~(1 - t_sw) of the steps, the noisiest) use w_low"""
    w_low: float = 1.0
    """guidance scale of the noisy steps (extremely low); on FLUX.1-dev the distilled guidance input g (or, with --true-cfg, the true-CFG scale)"""
    w_high: float | None = None
    """the ordinary guidance scale: after the switch, everywhere when not exploring, and in evaluation; None: the model family's default: on SD/SDXL/SD3 the paper's, 5 for DDPO and 7.5 for AlignProp and sample.py; on FLUX.1 3.5, its pipeline's guidance"""
    prompt_weight_range: tuple[float, float] = (1.0, 2.0)
    """the chosen word's weight w ~ U(w_min, w_max)"""
    exclude_stopwords: bool = True
    """never emphasise function words ('a', 'the', 'of', ...)"""
    explore_frac: float = 0.75
    """explore during the first explore_frac of the epochs, then sample plainly (w_high, unweighted prompts)"""
    prompt_weight_pooled: bool = False
    """SDXL / SD3 / FLUX: also blend the pooled text embedding with the chosen word's weight (off: the token states only)"""
    true_cfg: bool = False
    """FLUX.1 only: classifier-free guidance with the negative prompt "" (two transformer calls a step; diffusers' true_cfg_scale) instead of the distilled guidance input; w_low/w_high are then the true-CFG scales and FLUX.1-dev's guidance input stays at 3.5. Needed for a CFG schedule on FLUX.1-schnell, which has no guidance input"""

    def validate(self) -> DiffExpConfig:
        """Raise ValueError naming the command-line flag and the fix for any bad value."""
        if not 0.0 <= self.t_sw <= 1.0:
            raise ValueError(f"--t-sw must be in [0, 1] (fraction of the T timesteps), got {self.t_sw}")
        if not 0.0 <= self.explore_frac <= 1.0:
            raise ValueError(f"--explore-frac must be in [0, 1], got {self.explore_frac}")
        if not (self.w_low >= 0 and (self.w_high is None or self.w_high >= 0)):  # also refuses nan
            raise ValueError(f"--w-low and --w-high must be >= 0, got {self.w_low} and {self.w_high}")
        if not (math.isfinite(self.w_low) and (self.w_high is None or math.isfinite(self.w_high))):
            raise ValueError(f"--w-low and --w-high must be finite, got {self.w_low} and {self.w_high}")
        lo, hi = self.prompt_weight_range
        if not 0.0 <= lo <= hi:
            raise ValueError(f"--prompt-weight-range must be two numbers 0 <= w_min <= w_max, got {lo} {hi}")
        return self

    def for_family(self, family: str, trainer: str | None = None) -> DiffExpConfig:
        """This config with w_high set to the family's default when it is None (`default_w_high`)."""
        return self if self.w_high is not None else replace(self, w_high=default_w_high(family, trainer))


# w_high when --w-high is not given, on the models guided by CFG (SD, SDXL, SD3): the paper's scale per trainer.
PAPER_W_HIGH = {"ddpo": 5.0, "alignprop": 7.5}


def default_w_high(family: str, trainer: str | None = None) -> float:
    """The default of --w-high: on FLUX.1 3.5 (FluxPipeline's guidance_scale: its distilled guidance input,
    or the true-CFG scale); elsewhere the paper's scale for `trainer` (5 for DDPO, 7.5 for AlignProp), 7.5
    for sample.py (trainer None)."""
    if family == "flux":
        from diffusion import FLUX_GUIDANCE

        return FLUX_GUIDANCE
    return PAPER_W_HIGH.get(trainer, 7.5)


def check_guidance(cfg: DiffExpConfig, family: str, guidance_input: bool | None, setting: str | None = None):
    """ValueError (one line, naming the flag and the ways out) for guidance options the model cannot take:
    --true-cfg on a model that always uses CFG, and a CFG schedule on FLUX.1-schnell (no guidance input,
    `guidance_input` False) without --true-cfg, where it would have nothing to act on. `setting`: the
    `sample.py explore` setting that turns the schedule on (its name replaces --cfg-schedule)."""
    if cfg.true_cfg and family not in ("flux", "unknown"):
        raise ValueError(
            "--true-cfg: only FLUX.1 has a distilled guidance to replace with true CFG; SD, SDXL and SD3 always use "
            "classifier-free guidance: drop the flag"
        )
    if family == "flux" and guidance_input is False and cfg.cfg_schedule and not cfg.true_cfg:
        what = f"--settings '{setting}'" if setting else "--cfg-schedule"
        off = f"drop the setting '{setting}'" if setting else "pass --no-cfg-schedule"
        raise ValueError(
            f"{what}: this FLUX.1 transformer has no guidance input (FLUX.1-schnell) and, without --true-cfg, no "
            f"unconditional branch, so the CFG schedule has nothing to act on: {off}, or pass --true-cfg to guide "
            f'with the negative prompt "" (two transformer calls a step)'
        )


def is_exploring(epoch: int, num_epochs: int, explore_frac: float) -> bool:
    """DiffExp is used for the first `explore_frac` of the epochs (paper: 0.75), then switched off."""
    return epoch < explore_frac * num_epochs


def cfg_scales(
    timesteps: torch.Tensor,
    num_train_timesteps: int,
    t_sw: float,
    w_low: float,
    w_high: float,
    enabled: bool = True,
    scheduler=None,
) -> torch.Tensor:
    """Guidance scale for each entry of `timesteps` (any shape, any device): w_low where t >= t_sw * T,
    or, given the pipeline's `scheduler`, where `low_guidance_steps` says (on SD / SDXL the same rule;
    on a flow-matching model the noise-level one: sigma >= sigma_sw(t_sw)).

    With `enabled=False` (ablation, or after exploration) every step uses w_high.
    t_sw = 1 never switches to w_low (t < T always); t_sw = 0 uses w_low everywhere.
    """
    if not 0.0 <= t_sw <= 1.0:
        raise ValueError(f"--t-sw must be in [0, 1] (fraction of the T timesteps), got {t_sw}")
    high = torch.full(timesteps.shape, float(w_high), device=timesteps.device)
    if not enabled:
        return high
    threshold = t_sw * num_train_timesteps if scheduler is None else w_low_threshold(scheduler, t_sw)
    return torch.where(timesteps >= threshold, torch.full_like(high, float(w_low)), high)


def sd_alphas_cumprod() -> torch.Tensor:
    """alpha_bar of SD 1.x/2.x and SDXL's training schedule (scaled_linear betas 0.00085 .. 0.012 over
    1000 steps), float64: the noise levels the paper's t_sw was set on."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _is_flow_matching(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def flow_switch_sigma(t_sw: float) -> float:
    """sigma_sw: a flow-matching step runs at w_low when sigma >= sigma_sw, the sigma whose SNR
    ((1 - sigma) / sigma)^2 equals SD's alpha_bar / (1 - alpha_bar) at t* = the first integer timestep
    >= t_sw * 1000 (the SD steps at w_low are exactly those with t >= t*, i.e. SNR <= SNR(t*)).
    t_sw = 0: every step (0); t* >= 1000: none (inf), as on SD."""
    if not 0.0 <= t_sw <= 1.0:
        raise ValueError(f"--t-sw must be in [0, 1] (fraction of the T timesteps), got {t_sw}")
    if t_sw == 0:
        return 0.0
    t_star = math.ceil(t_sw * 1000 - 1e-9)
    if t_star >= 1000:
        return math.inf
    ab = float(sd_alphas_cumprod()[t_star])
    return 1.0 / (1.0 + math.sqrt(ab / (1.0 - ab)))


def w_low_threshold(scheduler, t_sw: float) -> float:
    """The model timestep from which on (t >= it) a sampling step runs at w_low: t_sw * T on SD / SDXL
    (DDPM timesteps), sigma_sw(t_sw) * T on a flow-matching model (SD3, whose timesteps are sigma * T)."""
    T = scheduler.config.num_train_timesteps
    if _is_flow_matching(scheduler):
        return flow_switch_sigma(t_sw) * T
    if not 0.0 <= t_sw <= 1.0:
        raise ValueError(f"--t-sw must be in [0, 1] (fraction of the T timesteps), got {t_sw}")
    return t_sw * T


def low_guidance_steps(timesteps: torch.Tensor, scheduler, t_sw: float) -> torch.Tensor:
    """Per sampling step (the scheduler's timesteps, any shape), whether DiffExp's CFG schedule runs it at
    w_low (while exploring, with the schedule on): the same call for SD, SDXL and SD3."""
    return timesteps >= w_low_threshold(scheduler, t_sw)


def describe_cfg_schedule(timesteps: torch.Tensor, scheduler, t_sw: float, w_low: float, w_high: float) -> str:
    """One line, for a trainer to print at start-up, saying which sampling steps run at w_low."""
    ts = timesteps.detach().cpu()
    low = low_guidance_steps(ts, scheduler, t_sw)
    n, k = len(ts), int(low.sum())
    T = scheduler.config.num_train_timesteps
    if _is_flow_matching(scheduler):
        rule = f"sigma >= {flow_switch_sigma(t_sw):.3f}: an SNR at most SD's at t_sw*T = {t_sw * T:g}"
        at = lambda t: f"sigma {float(t) / T:.3f}"  # noqa: E731
    else:
        rule = f"t >= t_sw*T = {t_sw * T:g}"
        at = lambda t: f"t {float(t):g}"  # noqa: E731
    which = f": {at(ts[low][0])} .. {at(ts[low][-1])}" if k else ""
    if t_sw == 0:  # asked for: every rollout step at w_low (w_low 1: the CFG-free rollouts of Flow-GRPO and others)
        return (
            f"DiffExp CFG schedule (--t-sw 0): w_low {w_low:g} on all {n} steps while exploring"
            f"{' (CFG-free rollouts)' if w_low == 1 else ''}; w_high {w_high:g} after exploration and in every evaluation"
        )
    return (
        f"DiffExp CFG schedule (--t-sw {t_sw}): w_low {w_low:g} on {k} of {n} steps ({rule}{which}), "
        f"w_high {w_high:g} on the other {n - k}"
    )


@dataclass
class PromptWeight:
    """What random prompt weighting did to one sample (logged, and enough to redo it)."""

    prompt: str
    word: str | None  # None: nothing was weighted (no eligible word)
    word_index: int  # index among the prompt's whitespace-separated words, -1 if none
    positions: list[int] = field(default_factory=list)  # token positions in the encoder output (BOS = 0)
    weight: float = 1.0
    positions_2: list[int] | None = None  # SDXL / SD3: the same word's positions in the second tokenizer
    positions_3: list[int] | None = None  # SD3 with T5: the same word's positions in T5's tokenizer

    def record(self) -> dict:
        """What the logs keep of this choice."""
        out = {"prompt": self.prompt, "word": self.word, "weight": round(self.weight, 3), "positions": self.positions}
        extra = {k: getattr(self, k) for k in ("positions_2", "positions_3") if getattr(self, k) is not None}
        return out | extra

    def all_positions(self) -> list[list[int] | None]:
        """The chosen word's positions in each tokenizer, in the order of the encoders."""
        return [self.positions, self.positions_2, self.positions_3]


def word_token_positions(prompt: str, tokenizer, max_length: int | None = None) -> list[tuple[str, list[int]]]:
    """Split a prompt into whitespace words and give each the positions of all its tokens.

    Neither CLIP's BPE nor T5's sentencepiece (Unigram behind a whitespace split) merges across
    whitespace, so tokenising word by word gives the same sequence as tokenising the prompt. The
    special tokens the tokenizer adds are counted: CLIP's position 0 is <|startoftext|>, T5 has none
    before the words (its '</s>' comes after them). Tokens at or beyond the truncation point (max_length
    minus the special tokens after the words) are dropped, so a word cut off by truncation keeps only
    its visible tokens, and a word wholly past it keeps none.
    """
    max_length = max_length or tokenizer.model_max_length
    specials = tokenizer("").input_ids  # what the tokenizer adds around any prompt
    before = 1 if tokenizer.bos_token_id is not None and specials[:1] == [tokenizer.bos_token_id] else 0
    last = max_length - (len(specials) - before)
    out, pos = [], before
    for word in prompt.split():
        if pos >= last:  # past the truncation point no token is seen: no need to tokenise (a huge prompt stays cheap)
            out.append((word, []))
            continue
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        out.append((word, [p for p in range(pos, pos + n) if p < last]))
        pos += n
    return out


def _eligible(word: str, positions: list[int], exclude_stopwords: bool) -> bool:
    if not positions:  # cut off by truncation (checked first: cheap for the words of a huge prompt)
        return False
    core = re.sub(r"[^\w]", "", word.lower())
    return bool(core) and not (exclude_stopwords and core in STOPWORDS)


def choose_words(
    prompts: list[str],
    tokenizer,
    generator: torch.Generator,
    weight_range: tuple[float, float] = (1.0, 2.0),
    exclude_stopwords: bool = True,
    max_lengths: list[int] | None = None,
) -> list[PromptWeight]:
    """Pick one random word per prompt and a weight w ~ U(weight_range), reproducibly from `generator`.

    `tokenizer` is one tokenizer, or a list of two (SDXL) or three (SD3: CLIP-L, CLIP-G, T5): the word's
    positions are then found in each (`positions`, `positions_2`, `positions_3`); which words are
    eligible is decided by the first. `max_lengths`: the tokens each encoder sees (default: each
    tokenizer's model_max_length; SD3 encodes T5 with 256, see TextConditioner.max_lengths).
    Exactly two draws are made per prompt (word, weight), whatever the prompt, so the stream of
    random numbers and hence every later choice does not depend on earlier prompts' lengths.
    """
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    if len(tokenizers) > 3:
        raise ValueError(f"prompt weighting handles up to three tokenizers, got {len(tokenizers)}")
    lengths = list(max_lengths) if max_lengths is not None else [None] * len(tokenizers)
    lo, hi = weight_range
    choices = []
    for prompt in prompts:
        u_word, u_weight = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        words = word_token_positions(prompt, tokenizers[0], lengths[0])
        eligible = [i for i, (w, pos) in enumerate(words) if _eligible(w, pos, exclude_stopwords)]
        if not eligible:
            others = [[] if k < len(tokenizers) else None for k in (1, 2)]
            choices.append(PromptWeight(prompt, None, -1, [], 1.0, *others))
            continue
        i = eligible[min(int(u_word * len(eligible)), len(eligible) - 1)]
        others = [
            word_token_positions(prompt, tokenizers[k], lengths[k])[i][1] if k < len(tokenizers) else None
            for k in (1, 2)
        ]
        choices.append(PromptWeight(prompt, words[i][0], i, words[i][1], lo + (hi - lo) * u_weight, *others))
    return choices


def apply_prompt_weights(
    embeds: torch.Tensor,
    empty_embeds: torch.Tensor,
    choices: list[PromptWeight],
    widths: list[int] | None = None,
    parts: list[tuple[int, int, int]] | None = None,
) -> torch.Tensor:
    """e'_k = e_empty_k + w (e_k - e_empty_k) at each sample's chosen positions; elsewhere e is unchanged.

    embeds: [B, L, D] text-encoder output of the prompts; empty_embeds: [L, D] or [1, L, D] for "".
    widths: SDXL's split of D between the two encoders ([768, 1280]); the first part is weighted at
    `positions`, the second at `positions_2`. parts (instead of widths): each encoder's block of embeds as
    (first row, first column, width), in the order of the choice's positions lists (TextConditioner.parts;
    SD3: CLIP-L, CLIP-G side by side in rows 0..76, T5 from row 77). Built as one blend with a per-element
    weight tensor (1 where untouched), so it is a single device op and differentiable; w = 1 is exactly
    the identity.
    """
    if len(choices) != embeds.shape[0]:
        raise ValueError(f"{len(choices)} prompt-weight choices for {embeds.shape[0]} embeddings")
    if parts is None:
        widths = widths or [embeds.shape[-1]]
        if sum(widths) != embeds.shape[-1]:
            raise ValueError(f"encoder widths {widths} do not add up to the embedding width {embeds.shape[-1]}")
        parts = [(0, sum(widths[:k]), width) for k, width in enumerate(widths)]
    for row, col, width in parts:
        if col + width > embeds.shape[-1] or row >= embeds.shape[1]:
            raise ValueError(f"encoder block {(row, col, width)} lies outside the embeddings {tuple(embeds.shape)}")
    w = torch.ones(embeds.shape, dtype=torch.float32)
    for b, c in enumerate(choices):
        for (row, col, width), positions in zip(parts, c.all_positions()):
            if positions:
                w[b, [row + p for p in positions], col : col + width] = c.weight
    w = w.to(device=embeds.device, dtype=embeds.dtype)
    empty = empty_embeds.reshape(1, *embeds.shape[1:]).to(embeds.dtype)
    return torch.where(w == 1, embeds, empty + w * (embeds - empty))


def diffexp_conditioning(
    cfg: DiffExpConfig,
    exploring: bool,
    prompts: list[str],
    cond,
    text,
    timesteps: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator,
    scheduler=None,
):
    """One batch's DiffExp decision, shared by both trainers and sample.py.

    cond: the prompts' `diffusion.Conditioning`; text: the `diffusion.TextConditioner` that made it
    (its tokenizers, where each encoder's states sit in the embeddings, and the empty prompt's encoding
    e_empty). scheduler: the pipeline's, which says how t_sw reads on its timesteps (`cfg_scales`);
    default: that of the TextConditioner's pipeline. Returns the
    conditioning to sample with (weighted while exploring), the guidance scale of every denoising
    step ([num_steps], on the timesteps' device: pass CPU timesteps to get host values) and the
    per-sample record of the prompt weighting. Outside exploration (or with a part switched off) the
    corresponding output is the plain one: unweighted conditioning, constant w_high.
    """
    if exploring and cfg.prompt_weighting:
        weights = choose_words(
            prompts, text.tokenizers, generator, cfg.prompt_weight_range, cfg.exclude_stopwords, text.max_lengths
        )
        empty = text.empty.to(cond.embeds.device)
        embeds = apply_prompt_weights(cond.embeds, empty.embeds[0], weights, parts=text.parts)
        pooled = cond.pooled
        if cfg.prompt_weight_pooled and pooled is not None:
            w = torch.tensor([c.weight for c in weights], dtype=pooled.dtype).to(pooled.device).unsqueeze(-1)
            pooled = empty.pooled + w * (pooled - empty.pooled)
        cond = replace(cond, embeds=embeds, pooled=pooled)
    else:
        weights = [PromptWeight(p, None, -1) for p in prompts]
    if scheduler is None:
        scheduler = getattr(getattr(text, "pipe", None), "scheduler", None)
    cfg = cfg.for_family(getattr(text, "kind", "sd"))  # w_high None: the family's default (sample.py's)
    guidance = cfg_scales(
        timesteps,
        num_train_timesteps,
        cfg.t_sw,
        cfg.w_low,
        cfg.w_high,
        enabled=exploring and cfg.cfg_schedule,
        scheduler=scheduler,
    )
    return cond, guidance, weights


def cfg_switch_warning(timesteps, scheduler, t_sw: float, setting: str | None = None) -> str:
    """The one-line warning for a DiffExp CFG schedule that never switches at this many steps: no sampling
    step is noisy enough for w_low (every step at w_high), or every one is (every step at w_low).
    `setting`: the name of a `sample.py explore` setting, whose t_sw is not a flag."""
    ts = [float(t) for t in timesteps]
    shown = ", ".join(f"{t:g}" for t in ts[:6]) + (", ..." if len(ts) > 6 else "")
    T = scheduler.config.num_train_timesteps
    threshold = (
        f"t = sigma_sw*T = {w_low_threshold(scheduler, t_sw):g} (the SNR of SD's t_sw*T)"
        if _is_flow_matching(scheduler)
        else f"t_sw*T = {t_sw * T:g}"
    )
    if setting is None:
        what, t_sw_flag, w, off = f"--t-sw {t_sw}", "--t-sw", "--w-", " (or pass --no-cfg-schedule)"
    else:  # an explore setting: its t_sw and w_low are not flags
        what, t_sw_flag, w, off = f"setting '{setting}' (t_sw {t_sw})", "its t_sw", "w_", ""
    what += f" with --num-steps {len(ts)}"
    if not bool(low_guidance_steps(torch.as_tensor(ts), scheduler, t_sw).any()):
        return (
            f"warning: {what}: no sampling timestep ({shown}) reaches {threshold}, so the CFG schedule never uses "
            f"{w}low; raise --num-steps or lower {t_sw_flag}{off}"
        )
    return (
        f"warning: {what}: every sampling timestep ({shown}) is >= {threshold}, so the CFG schedule never switches "
        f"to {w}high; raise {t_sw_flag}{off}"
    )


def unswitched_schedule_warning(cfg: DiffExpConfig, timesteps, scheduler, setting: str | None = None) -> str | None:
    """`cfg_switch_warning` when `cfg`'s CFG schedule is on, matters (w_low != w_high) and never switches at
    these timesteps; else None. t_sw = 0 (w_low on every step, e.g. CFG-free rollouts) is asked for, not warned of."""
    low = low_guidance_steps(torch.as_tensor(timesteps).cpu(), scheduler, cfg.t_sw)
    if not cfg.cfg_schedule or cfg.w_low == cfg.w_high or cfg.t_sw == 0 or 0 < int(low.sum()) < len(low):
        return None
    return cfg_switch_warning(timesteps, scheduler, cfg.t_sw, setting)


def backprop_note(cfg: DiffExpConfig, timesteps, scheduler, backprop_steps: int, random_k: bool = False) -> str | None:
    """AlignProp: a note when the CFG schedule runs some steps at w_low but the gradient (through the last
    `backprop_steps` steps, or K ~ U{1..backprop_steps} with `random_k`) never passes through them, so the
    schedule changes the images trained on but not the path the update takes; None when it does, or the
    schedule does not act.
    (On the toy mode-drop world DiffExp cost AlignProp reward at K = 1 and did not at K = 10.)"""
    low = low_guidance_steps(torch.as_tensor(timesteps).cpu(), scheduler, cfg.t_sw)
    if not cfg.cfg_schedule or cfg.explore_frac == 0 or cfg.w_low == cfg.w_high or not bool(low.any()):
        return None
    n = len(low)
    needed = n - int(low.nonzero().max())  # the last w_low step is this many steps from the end
    if backprop_steps >= needed:
        return None
    span = f"{'at most ' if random_k else ''}the last {backprop_steps} of {n} steps"
    return (
        f"note: --backprop-steps {backprop_steps} carries the gradient through {span}; the CFG schedule's w_low "
        f"steps are the first {int(low.sum())}, so no gradient passes through them (--backprop-steps {needed} "
        f"reaches them)"
    )


def schedule_note(cfg: DiffExpConfig, timesteps, scheduler, say=print) -> float:
    """Say at start-up which sampling steps run at w_low while exploring (or warn, on stderr, that the CFG
    schedule never switches at this many steps); returns the share of steps at w_low."""
    import sys

    share = low_guidance_steps(timesteps.cpu(), scheduler, cfg.t_sw).float().mean().item()
    if not cfg.cfg_schedule or cfg.explore_frac == 0 or cfg.w_low == cfg.w_high:
        return share
    warning = unswitched_schedule_warning(cfg, timesteps, scheduler)
    if warning:
        say(warning, file=sys.stderr)
    else:
        say(describe_cfg_schedule(timesteps, scheduler, cfg.t_sw, cfg.w_low, cfg.w_high))
    return share


def prompt_notes(prompts: list[str], text, cfg: DiffExpConfig, flag: str = "--prompts") -> list[str]:
    """The notes a run prints once about its prompts: how many the text encoder cuts (and by how many
    tokens, at most), and, with prompt weighting, how many have no word it may emphasise (only function
    words: they are sampled with weight 1)."""
    notes = []
    for i, (tokenizer, limit) in enumerate(zip(text.tokenizers, text.max_lengths)):
        lengths = [len(tokenizer(p, verbose=False).input_ids) for p in dict.fromkeys(prompts)]
        cut = [n - limit for n in lengths if n > limit]
        t5 = type(tokenizer).__name__.startswith("T5")
        if cut and (i == 0 or t5):  # CLIP-G cuts where CLIP-L does; T5 has its own window
            what = "T5" if t5 else "the text encoder"
            notes.append(
                f"note: {flag}: {len(cut)} of {len(lengths)} prompts are longer than {what}'s {limit} tokens and are cut "
                f"(by up to {max(cut)} tokens); what is cut off does not condition the images"
            )
    if cfg.prompt_weighting:
        empty = [p for p in dict.fromkeys(prompts) if not any(_eligible(w, pos, cfg.exclude_stopwords)
                                                              for w, pos in word_token_positions(p, text.tokenizers[0], text.max_lengths[0]))]  # fmt: skip
        if empty:
            notes.append(
                f"note: {flag}: {len(empty)} of {len(set(prompts))} prompts have no word prompt weighting may emphasise "
                f"(e.g. {empty[0]!r}: only function words or punctuation); they are sampled unweighted"
            )
    return notes
