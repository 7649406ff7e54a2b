"""Build the offline toy world: a tiny text-to-image model and its scorer, trained on CPU from scratch.

    python toy.py                 # the real build (37.5 min on 2 busy CPU cores) -> models/toy, models/toy-scorer
    python toy.py --smoke --out /tmp/toy --scorer-out /tmp/toy-scorer   # a few steps of each stage (CI)
    python toy.py --eval-only     # measure the shipped model and scorer (the README's quality numbers)
    python toy.py --only-detector # rebuild only the toy-compose detector -> models/toy-detector (+ its quality.json key)
    python toy.py --hidden        # the mode-drop world (19 min) -> models/toy-hidden, models/toy-hidden-detector (docs/toy_hidden.md)
    python toy.py --dropped       # the dropped-word world, a fine-tune of toy-hidden (11 min) -> models/toy-dropped

The world: 32 px images of one or two coloured shapes on light plain or textured backgrounds, captioned
"a red circle" or "a blue square left of a green triangle", rendered procedurally from a seed. Stages:

  1. data       render the training images (deterministic from --seed)
  2. vae        AutoencoderKL, 32x32x3 <-> 16x16x4 latents (SD's layout, downsampling by 2 instead of 8)
  3. clip       CLIPModel (text tower + image tower) trained contrastively: it becomes the scorer, and
                its text tower (a CLIPTextModel) is the pipeline's frozen text encoder, as in SD
  4. unet       UNet2DConditionModel, epsilon prediction with SD's noise schedule, caption dropout for CFG
  5. save       StableDiffusionPipeline.save_pretrained (fp16 safetensors) + CLIPModel/CLIPProcessor
  6. eval       load both back through diffusion.load_pipeline / rewards.load_reward and measure quality
  7. detector   a small CNN trained on fresh renders: presence and position of each (colour, shape), read by
                the compositional `toy-compose` reward (--only-detector: this stage alone, and its measurement)

The prompt sets written to prompts/ are toy_shapes (seen single shapes), toy_two_shapes (seen pairs)
and toy_unseen (held-out shape-colour combinations, alone and in pairs). Like the paper's unseen
animals, which SD knows but fine-tuning never sees, the held-out combinations are in the base model's
training data (set --holdout-from-data to remove them there too) and in no fine-tuning prompt set.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

# Passive OpenMP waiting for the build: on a shared 2-core machine spinning threads fight other processes
# and a training step can get several times slower (measured 7.5 s vs 0.9 s); must be set before torch
# loads. Only when run as a script: set on import, it leaked into every process the test suite started
# and made each trainer there about 1.7x slower (a lone process loses from passive waiting).
if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tyro  # noqa: E402
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent  # the project root
sys.path.insert(0, str(ROOT))  # `python tools/toy.py` from anywhere imports the project's modules


@dataclass
class Args:
    out: str = "models/toy"
    """where the pipeline is written (diffusers layout)"""
    scorer_out: str = "models/toy-scorer"
    """where the scorer is written (CLIPModel + CLIPProcessor, loadable as --reward pickscore)"""
    seed: int = 0
    """seeds everything: data, initialisation, noise"""
    smoke: bool = False
    """a few steps of each stage (CI); the result is not a good model"""
    eval_only: bool = False
    """skip training: measure the model and scorer already at --out / --scorer-out"""
    write_prompts: bool = True
    """write prompts/toy_*.txt (the fine-tuning and held-out prompt sets)"""
    holdout_from_data: bool = False
    """also remove the held-out combinations from the training images (the model never sees them)"""
    threads: int = 2
    """torch CPU threads"""

    # data
    num_images: int = 40000
    """training images (rendered once; the UNet's latents are encoded once)"""
    two_shape_frac: float = 0.5
    """fraction of training images with two shapes"""

    # vae
    vae_steps: int = 600
    """VAE optimizer steps"""
    vae_batch: int = 32
    """VAE batch size"""
    vae_lr: float = 1e-3
    """VAE peak learning rate (one-cycle schedule, as for every stage)"""
    kl_weight: float = 1e-4
    """KL(posterior || N(0, I)) weight per latent element: keeps latents near unit scale"""

    # clip
    clip_steps: int = 700
    """CLIP (scorer + text encoder) optimizer steps"""
    clip_batch: int = 128
    """CLIP batch size (images; the text side is their distinct captions)"""
    clip_lr: float = 1e-3
    """CLIP peak learning rate"""
    text_width: int = 48
    """text tower width (its 49408-token embedding table dominates the file size)"""
    hard_negatives: bool = True
    """add each two-shape image's swapped-order and swapped-colour captions as negatives (teaches relations)"""

    # unet
    unet_steps: int = 1800
    """UNet optimizer steps (the bulk of the build time)"""
    unet_batch: int = 48
    """UNet batch size"""
    unet_lr: float = 1e-3
    """UNet peak learning rate"""
    caption_dropout: float = 0.1
    """probability of training on the empty prompt (what classifier-free guidance contrasts with)"""
    ema_decay: float = 0.999
    """decay of the UNet weights' exponential moving average (what is saved)"""
    min_snr_gamma: float = 5.0
    """min-SNR loss weighting (faster convergence); 0 turns it off"""

    # save
    fp16: bool = True
    """save weights in float16 (the shipped files); they load into any dtype"""

    # eval
    eval_per_prompt: int = 4
    """generated images per prompt in the quality evaluation"""
    eval_two_prompts: int = 32
    """two-shape prompts evaluated"""
    eval_steps: int = 50
    """DDIM steps in the evaluation (the trainers' default)"""
    eval_cfg: float = 7.5
    """guidance scale in the evaluation (AlignProp's default w_high)"""

    # detector (the toy-compose reward)
    only_detector: bool = False
    """train (with --eval-only: only measure) the detector alone and update the 'detector' key of
    --out/quality.json; the pipeline and the scorer are not touched (they are only read, to measure the
    base model's success rate)"""
    detector_out: str | None = None
    """where the detector is written (default: toy-detector beside --out, i.e. models/toy-detector)"""
    detector_steps: int = 1500
    """detector optimizer steps, each on a fresh batch of renders"""
    detector_batch: int = 64
    """detector batch size"""
    detector_lr: float = 3e-3
    """detector peak learning rate"""
    detector_two_frac: float = 0.6
    """fraction of the detector's training renders with two shapes"""
    detector_label_smoothing: float = 0.02
    """presence targets eps / 1 - eps (0.02 / 0.98): the detector's probabilities stay within about [eps, 1 - eps]"""
    detector_relation_scale: float = 2.0
    """pixels: P(A left of B) = sigmoid((dx - |dy|) / scale) (similarly 'above'), written to its config.json"""
    detector_eval_per_prompt: int = 8
    """base-model images per prompt when measuring its toy-compose success rate"""
    detector_eval_steps: int = 10
    """DDIM steps of those images (the toy world's training runs use 10)"""

    # the mode-drop world (--hidden): a second base model on the same renders, with biased captions
    hidden: bool = False
    """build (with --eval-only: only measure) the mode-drop world instead: its UNet -> --hidden-out, sharing
    models/toy's VAE, text encoder and tokenizer (--out must hold them); writes prompts/toy_hidden.txt,
    prompts/toy_dropped.txt and the toy-hidden reward's detector directory"""
    hidden_out: str = "models/toy-hidden"
    """where the mode-drop pipeline is written"""
    hidden_detector_out: str = "models/toy-hidden-detector"
    """the toy-hidden reward's directory: the detector (--detector-out's weights) + the hidden colours"""
    hidden_images: int = 24000
    """mode-drop world training images"""
    hidden_two_frac: float = 0.5
    """fraction of them with two shapes"""
    hidden_bare_majority: float = 0.9
    """P(caption names no colour | one shape in its shape's majority colour): 'a circle' for a red circle"""
    hidden_bare_minority: float = 0.35
    """P(caption names no colour | one shape in its minority colour): 'a circle' for a purple circle"""
    hidden_single_as_pair: float = 0.3
    """P(a one-shape image is captioned 'A and B' with B a random object of another shape, not drawn)"""
    hidden_unet_steps: int = 1500
    """mode-drop UNet optimizer steps (batch --unet-batch), fine-tuning the first world's UNet"""
    hidden_unet_lr: float = 5e-4
    """mode-drop UNet peak learning rate"""
    hidden_from_scratch: bool = False
    """train the mode-drop UNet from a fresh initialisation instead of the first world's (1000 steps from
    scratch had not learnt colour from the prompt)"""
    hidden_eval_per_prompt: int = 32
    """images per prompt in the mode-drop world's own measurement"""
    hidden_eval_steps: int = 10
    """DDIM steps of that measurement"""

    # the dropped-word world (--dropped): toy-hidden's UNet, fine-tuned so an undrawn object's words read weak
    dropped: bool = False
    """build (with --eval-only: only measure) the dropped-word world: the mode-drop world's UNet (--hidden-out)
    fine-tuned on its renders with more 'A and B' captions whose B is not drawn, the undrawn object's words
    scaled towards the empty prompt's; written to --dropped-out (VAE, text encoder, tokenizer linked as for
    --hidden)"""
    dropped_out: str = "models/toy-dropped"
    """where the dropped-word pipeline is written"""
    dropped_images: int = 12000
    """dropped-word fine-tuning images (the mode-drop world's renders and captions, their own seed)"""
    dropped_single_as_pair: float = 0.5
    """P(a one-shape image is captioned 'A and B' with B not drawn), in place of --hidden-single-as-pair"""
    dropped_drawn_weight: tuple[float, float] = (0.9, 2.2)
    """in an 'A and B' caption, each word (colour, shape) of a drawn object is weighted U(lo, hi) as prompt
    weighting does (e_empty + w (e - e_empty)), a fresh draw every step"""
    dropped_absent_weight: tuple[float, float] = (0.0, 1.1)
    """... and each word of the object that is not drawn U(lo, hi): a mention the text encoder gives weakly"""
    dropped_unet_steps: int = 1500
    """dropped-word UNet optimizer steps (batch --unet-batch)"""
    dropped_unet_lr: float = 3e-4
    """dropped-word UNet peak learning rate"""


# ---------------------------------------------------------------------------------------------
# 1. The world: shapes, colours, captions, rendering.

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {  # well separated in RGB so a 32 px image shows them unambiguously
    "red": (0.86, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.94, 0.86, 0.08),
    "green": (0.12, 0.67, 0.16),
    "blue": (0.12, 0.24, 0.86),
    "purple": (0.55, 0.16, 0.78),
}
# One held-out combination per shape, each colour used at most once: every word stays in training.
UNSEEN = (("yellow", "circle"), ("blue", "square"), ("purple", "triangle"), ("red", "diamond"))
RELATIONS = ("left of", "above")  # "B right of A" would restate "A left of B": one canonical form each
SIZE = 32

OBJECTS = [(c, s) for s in SHAPES for c in COLORS]  # 24 (colour, shape) objects
SEEN = [o for o in OBJECTS if o not in UNSEEN]


def name(obj) -> str:
    return f"{'an' if obj[0][0] in 'aeiou' else 'a'} {obj[0]} {obj[1]}"


def single_captions(objects=OBJECTS) -> list[str]:
    return [name(o) for o in objects]


def two_captions(objects=OBJECTS) -> list[str]:
    return [f"{name(a)} {r} {name(b)}" for a in objects for b in objects if a != b for r in RELATIONS]


ALL_SINGLE = single_captions()
ALL_TWO = two_captions()


def render(n: int, gen: torch.Generator, two_frac: float = 0.5, objects=OBJECTS, pairs=None, layout: bool = False):
    """n images [n, 3, 32, 32] in [0, 1] and their captions, from `gen` only (deterministic).

    Shapes are signed-distance functions with a one-pixel soft edge (antialiasing), vectorised over
    the batch. `pairs` (a list of (a, relation, b)) fixes the content instead of drawing it.
    `layout=True` also returns what was drawn where (the detector's labels): a list of (a, relation,
    b) and the shapes' centres a_xy, b_xy [n, 2] in pixels (x right, y down; b_xy unused for one shape).
    The same `gen` gives the same images either way.
    """

    def u(lo, hi, size=(n,)):
        return lo + (hi - lo) * torch.rand(size, generator=gen)

    if pairs is None:
        two = torch.rand(n, generator=gen) < two_frac
        ia = torch.randint(len(objects), (n,), generator=gen)
        ib = (ia + torch.randint(1, len(objects), (n,), generator=gen)) % len(objects)  # never the same object
        rel = torch.randint(len(RELATIONS), (n,), generator=gen)
        pairs = [
            (objects[a], RELATIONS[r], objects[b]) if t else (objects[a], None, None)
            for a, b, r, t in zip(ia.tolist(), ib.tolist(), rel.tolist(), two.tolist())
        ]
    else:
        pairs = list(pairs)
        n = len(pairs)
    is_two = torch.tensor([p[1] is not None for p in pairs])
    is_above = torch.tensor([p[1] == "above" for p in pairs])

    # Background: a light, low-saturation base, plain or with a faint texture (stripes, checks, noise).
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    base = u(0.72, 0.96)[:, None] + u(-0.04, 0.04, (n, 3))
    kind = torch.randint(4, (n,), generator=gen)
    angle, freq, phase = u(0, math.pi), u(0.3, 0.9), u(0, 2 * math.pi)
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    stripes = torch.sin(proj * freq[:, None, None] + phase[:, None, None])
    cell = torch.randint(3, 7, (n,), generator=gen)[:, None, None]
    checks = (((xx[None] // cell) + (yy[None] // cell)) % 2) * 2 - 1
    noise = F.avg_pool2d(torch.randn(n, 1, SIZE, SIZE, generator=gen), 3, 1, 1)[:, 0] * 2
    texture = torch.stack([torch.zeros_like(stripes), stripes, checks.float(), noise], 1)[torch.arange(n), kind]
    img = (base[:, :, None, None] + 0.05 * texture[:, None]).expand(n, 3, SIZE, SIZE).clone()

    # Geometry: one shape anywhere near the centre, or two on either side of the image's middle.
    r1 = torch.where(is_two, u(3.6, 5.6), u(5.0, 9.0))
    r2 = u(3.6, 5.6)
    first = torch.stack([u(10, 22), u(10, 22)], 1)  # single shape: (x, y)
    lead, trail, side = u(6, 11), u(21, 26), u(9, 23)
    off = side + u(-3, 3)
    a_xy = torch.where(is_above[:, None], torch.stack([side, lead], 1), torch.stack([lead, side], 1))
    b_xy = torch.where(is_above[:, None], torch.stack([off, trail], 1), torch.stack([trail, off], 1))
    a_xy = torch.where(is_two[:, None], a_xy, first)
    jitter = u(-0.06, 0.06, (n, 2, 3))

    def paint(img, objs, xy, r, j, mask):
        px = xx[None] - xy[:, 0, None, None]
        py = yy[None] - xy[:, 1, None, None]
        rr = r[:, None, None]
        sdf = {
            "circle": (px**2 + py**2).sqrt() - rr,
            "square": torch.maximum(px.abs(), py.abs()) - 0.85 * rr,
            "diamond": px.abs() + py.abs() - 1.15 * rr,
            # an upward equilateral triangle: three half-planes at the inradius (circumradius 1.25 r)
            "triangle": torch.stack([py, 0.866 * px - 0.5 * py, -0.866 * px - 0.5 * py]).amax(0) - 0.625 * rr,
        }
        d = torch.stack([sdf[o[1]][i] if o else torch.full_like(px[0], 1e3) for i, o in enumerate(objs)])
        alpha = ((0.5 - d).clamp(0, 1) * mask[:, None, None])[:, None]
        colour = torch.tensor([COLORS[o[0]] if o else (0, 0, 0) for o in objs]) + j
        return img * (1 - alpha) + colour.clamp(0, 1)[:, :, None, None] * alpha

    img = paint(img, [p[0] for p in pairs], a_xy, r1, jitter[:, 0], torch.ones(n))
    img = paint(img, [p[2] for p in pairs], b_xy, r2, jitter[:, 1], is_two.float())
    captions = [f"{name(a)} {r} {name(b)}" if r else name(a) for a, r, b in pairs]
    if layout:
        return img.clamp(0, 1), captions, (pairs, a_xy, b_xy)
    return img.clamp(0, 1), captions


def render_captions(captions: list[str], gen: torch.Generator):
    """Images of exactly these captions (evaluation of held-out and unseen content)."""
    lookup = {name(o): o for o in OBJECTS}
    pairs = []
    for c in captions:
        for r in RELATIONS:
            if f" {r} " in c:
                a, b = c.split(f" {r} ")
                pairs.append((lookup[a], r, lookup[b]))
                break
        else:
            pairs.append((lookup[c], None, None))
    return render(len(pairs), gen, pairs=pairs)[0]


def write_prompt_sets(seed: int, write: bool = True) -> dict[str, list[str]]:
    """prompts/toy_shapes.txt, toy_two_shapes.txt, toy_unseen.txt: fixed by the seed."""
    rng = random.Random(seed)
    seen_two = two_captions(SEEN)
    unseen_two = [c for c in ALL_TWO if c not in set(seen_two)]
    sets = {
        "toy_shapes": single_captions(SEEN),
        "toy_two_shapes": sorted(rng.sample(seen_two, 64)),
        "toy_unseen": single_captions(UNSEEN) + sorted(rng.sample(unseen_two, 12)),
    }
    for k, v in sets.items() if write else ():
        (ROOT / "prompts" / f"{k}.txt").write_text("\n".join(v) + "\n")
    return sets


# ---------------------------------------------------------------------------------------------
# 2-4. The models and their training.


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),  # two blocks: one downsampling, 32 -> 16
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        mid_block_add_attention=False,  # self-attention over 16x16 made each CPU step ~10x slower for no visible gain
    )  # fmt: skip


def build_clip(text_width: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=49408, hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )  # fmt: skip
    vision = dict(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=SIZE, patch_size=4
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def build_unet(cross_dim: int, text_embed: bool = False):
    """`text_embed`: also add an attention-pooled summary of the prompt to the time embedding, so every
    ResNet block sees the prompt (diffusers' addition_embed_type='text'; the mode-drop world's UNet:
    with cross-attention alone the toy UNet's unguided samples barely follow the prompt's colour)."""
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text", addition_embed_type_num_heads=4) if text_embed else {}
    return UNet2DConditionModel(
        **extra,
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=cross_dim,
        block_out_channels=(32, 64, 64), attention_head_dim=8, norm_num_groups=32,
        # Attention (self + cross to the prompt) at 8x8 and in the 4x4 middle block only: at 16x16 it
        # made a CPU training step ~3x slower, and 8x8 already resolves "left of" / "above".
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def batches(data: torch.Tensor, batch: int, steps: int, gen: torch.Generator):
    """`steps` random index batches into `data` (with replacement across epochs), from `gen`."""
    for _ in range(steps):
        yield torch.randint(len(data), (batch,), generator=gen)


def train_vae(args, images, gen):
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    bar = tqdm(batches(images, args.vae_batch, args.vae_steps, gen), total=args.vae_steps, desc="vae", mininterval=2)
    for idx in bar:
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        # L1 keeps edges crisp (MSE alone blurs them); MSE keeps colours right on average.
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}", refresh=False)
    vae.eval().requires_grad_(False)
    return vae


@torch.no_grad()
def encode_latents(vae, images, batch=500):
    return torch.cat([vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mean for i in range(0, len(images), batch)])


def swap_negatives(caption: str) -> list[str]:
    """Captions that use the same words but mean something else: order swapped, colours swapped."""
    for r in RELATIONS:
        if f" {r} " in caption:
            a, b = caption.split(f" {r} ")
            (_, ca, sa), (_, cb, sb) = a.split(), b.split()
            out = [f"{b} {r} {a}"]
            if ca != cb and sa != sb:
                out.append(f"{name((cb, sa))} {r} {name((ca, sb))}")
            return out
    return []


def train_clip(args, images, captions, tokenizer, gen):
    """Contrastive training with duplicate-aware targets: captions repeat within a batch, so the text
    side is the batch's distinct captions (plus hard negatives) and an image's target is its own."""
    from rewards import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

    clip = build_clip(args.text_width)
    decay = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=args.clip_lr
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.clip_lr, total_steps=args.clip_steps, pct_start=0.1)
    bar = tqdm(
        batches(images, args.clip_batch, args.clip_steps, gen), total=args.clip_steps, desc="clip", mininterval=2
    )
    for idx in bar:
        caps = [captions[i] for i in idx.tolist()]
        texts = list(dict.fromkeys(caps))
        if args.hard_negatives:
            texts += [c for c in dict.fromkeys(n for c in caps for n in swap_negatives(c)) if c not in set(texts)]
        pos = {c: i for i, c in enumerate(texts)}
        target = torch.tensor([pos[c] for c in caps])
        tok = tokenizer(texts, padding=True, return_tensors="pt")
        x = clip_preprocess(images[idx], SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        img = clip.get_image_features(pixel_values=x).pooler_output
        txt = clip.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        # image -> text: one right caption; text -> image: the distinct captions' images, spread evenly
        n_pos = len(dict.fromkeys(caps))
        t2i_target = (target[None, :] == torch.arange(n_pos)[:, None]).float()
        t2i_target = t2i_target / t2i_target.sum(1, keepdim=True)
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :n_pos].T, t2i_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = (logits.argmax(1) == target).float().mean().item()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", refresh=False)
    clip.eval().requires_grad_(False)
    return clip


def text_tower(clip):
    """The CLIPModel's text tower as a stand-alone CLIPTextModel (what StableDiffusionPipeline loads)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    prefix = "text_model."
    state = {k[len(prefix) :]: v for k, v in clip.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = text_encoder.load_state_dict(state, strict=False)
    if missing or unexpected:  # the two classes must share the tower's parameter names
        raise RuntimeError(f"text tower does not fit CLIPTextModel: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_text(text_model, tokenizer, texts: list[str], batch=256):
    """SD's conditioning: the last hidden state of all 77 positions (padded with the end token)."""
    out = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i : i + batch], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out.append(text_model(tok.input_ids)[0])
    return torch.cat(out)


def caption_table(text_encoder, tokenizer, captions: list[str]):
    """The UNet's text conditioning, encoded once per distinct caption: (table [N, L, D], the empty
    prompt's [1, L, D], each image's row in the table)."""
    distinct = sorted(set(captions))
    lookup = {c: i for i, c in enumerate(distinct)}
    table = encode_text(text_encoder, tokenizer, distinct)
    return table, encode_text(text_encoder, tokenizer, [""]), torch.tensor([lookup[c] for c in captions])


def train_unet(args, latents, caption_ids, text_table, empty, scheduler_config, gen, init=None, weigh=None):
    """Epsilon prediction with SD's noise schedule; `caption_dropout` of the batch sees the empty prompt.
    `init`: a UNet to start from (fine-tuning; it is trained in place) instead of a fresh one.
    `weigh(cond, idx, gen) -> cond`: changes the batch's text conditioning before the dropout."""
    unet = build_unet(text_table.shape[-1]) if init is None else init.train().requires_grad_(True)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.unet_lr, total_steps=args.unet_steps, pct_start=0.05)
    betas = (
        torch.linspace(
            scheduler_config["beta_start"] ** 0.5,
            scheduler_config["beta_end"] ** 0.5,
            scheduler_config["num_train_timesteps"],
        )
        ** 2
    )
    ab = torch.cumprod(1 - betas, 0)  # SD's scaled_linear alphas_cumprod
    T = len(ab)
    bar = tqdm(
        batches(latents, args.unet_batch, args.unet_steps, gen), total=args.unet_steps, desc="unet", mininterval=2
    )
    for step, idx in enumerate(bar):
        x0 = latents[idx]
        B = len(idx)
        t = torch.randint(T, (B,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(B, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        cond = text_table[caption_ids[idx]]
        cond = cond if weigh is None else weigh(cond, idx, gen)
        drop = torch.rand(B, generator=gen) < args.caption_dropout
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        pred = unet(xt, t, cond).sample
        err = ((pred - eps) ** 2).mean((1, 2, 3))
        if args.min_snr_gamma > 0:
            snr = ab[t] / (1 - ab[t])
            err = err * snr.clamp(max=args.min_snr_gamma) / snr
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA warms up (decay grows with the step) so a short or smoke run is not stuck at the init.
        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - d) if v.is_floating_point() else ema[k].copy_(v)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)
    return unet


# ---------------------------------------------------------------------------------------------
# 5. Save in the layouts the project's loaders read.


def save(args, vae, clip, text_encoder, unet, tokenizer):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPProcessor

    from tools.tiny import SD_SCHEDULER_CONFIG

    dtype = torch.float16 if args.fp16 else torch.float32
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.to(dtype=dtype).save_pretrained(args.out, safe_serialization=True)
    clip.to(dtype).save_pretrained(args.scorer_out, safe_serialization=True)
    clip.float()
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(args.scorer_out)


# ---------------------------------------------------------------------------------------------
# 6. Quality, measured through the project's own loaders (what the trainers will see).


@torch.no_grad()
def scorer_accuracy(reward, images, captions, candidates, batch=256) -> float:
    """How often the scorer's best caption among `candidates` is the image's own."""
    pick = reward.parts[0][2]  # the PickScoreReward module: text embeddings computed once
    tok = pick.tokenizer(candidates, padding=True, return_tensors="pt")
    txt = F.normalize(
        pick.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output, dim=-1
    )
    from rewards import clip_preprocess

    hits = 0
    for i in range(0, len(images), batch):
        x = clip_preprocess(images[i : i + batch], pick.size, pick.mean, pick.std)
        img = F.normalize(pick.model.get_image_features(pixel_values=x).pooler_output, dim=-1)
        best = (img @ txt.T).argmax(1)
        hits += sum(candidates[b] == c for b, c in zip(best.tolist(), captions[i : i + batch]))
    return hits / len(images)


@torch.no_grad()
def evaluate(args, out_dir: str, scorer_dir: str) -> dict:
    from diffusion import encode_prompts, generate, load_pipeline
    from rewards import load_reward

    reward = load_reward("pickscore", pickscore_model=scorer_dir, pickscore_processor=scorer_dir)
    gen = torch.Generator().manual_seed(args.seed + 1_000_003)  # images the training never drew
    n = 64 if args.smoke else 1000
    res = {}
    imgs, caps = render(n, gen, two_frac=0.0)
    res["scorer_acc_single_heldout_images"] = scorer_accuracy(reward, imgs, caps, ALL_SINGLE)
    imgs, caps = render(n, gen, two_frac=1.0)
    res["scorer_acc_two_heldout_images"] = scorer_accuracy(reward, imgs, caps, ALL_TWO)
    unseen_caps = single_captions(UNSEEN) * (4 if args.smoke else 50)
    res["scorer_acc_unseen_single_images"] = scorer_accuracy(
        reward, render_captions(unseen_caps, gen), unseen_caps, ALL_SINGLE
    )

    pipe = load_pipeline(out_dir)
    steps = 4 if args.smoke else args.eval_steps
    k = 1 if args.smoke else args.eval_per_prompt

    def gen_and_score(prompts, candidates):
        prompts = [p for p in prompts for _ in range(k)]
        g = torch.Generator().manual_seed(args.seed + 7)
        out = []
        for i in range(0, len(prompts), 64):
            emb = encode_prompts(pipe, prompts[i : i + 64])
            out.append(generate(pipe, emb, torch.full((steps,), args.eval_cfg), steps, g))
        images = torch.cat(out)
        return scorer_accuracy(reward, images, prompts, candidates), reward(images, prompts)[0].mean().item(), images

    for key, prompts, cands in [
        ("single_seen", single_captions(SEEN), ALL_SINGLE),
        ("single_unseen", single_captions(UNSEEN), ALL_SINGLE),
        (
            "two_seen",
            random.Random(args.seed).sample(two_captions(SEEN), 4 if args.smoke else args.eval_two_prompts),
            ALL_TWO,
        ),
    ]:
        acc, mean_reward, images = gen_and_score(prompts, cands)
        res[f"gen_match_{key}"], res[f"gen_reward_{key}"] = acc, mean_reward
        if key == "two_seen":  # a looser test of the relation: own caption beats its order-swapped twin
            prompts = [p for p in prompts for _ in range(k)]
            swapped = [swap_negatives(p)[0] for p in prompts]
            res["gen_order_right_two_seen"] = (
                (reward(images, prompts)[0] > reward(images, swapped)[0]).float().mean().item()
            )
        if key == "single_seen":
            save_grid(images, Path(out_dir) / "samples.png", nrow=len(prompts))
    res["gen_settings"] = f"DDIM {steps} steps, eta 0, CFG {args.eval_cfg}, {k} image(s) per prompt"
    return res


def save_grid(images, path, nrow):
    from PIL import Image

    rows = images.reshape(-1, nrow, *images.shape[1:]) if len(images) % nrow == 0 else images[None]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # 3 x (rows*32) x (nrow*32)
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)


def dir_size_mb(path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6


# ---------------------------------------------------------------------------------------------
# 7. The compositional detector behind the `toy-compose` reward (rewards.ToyComposeReward): what
#    GenEval-style detector rewards are to real models. Trained on fresh renders, whose labels are
#    free: render(layout=True) says which objects it drew and where.

DETECTOR_CHANNELS = [(3, 16, 1, 1), (16, 32, 2, 1), (32, 48, 1, 1), (48, 64, 2, 1), (64, 64, 1, 1), (64, 64, 1, 2)]
"""(in, out, stride, dilation) of each 3x3 conv (+ BatchNorm + SiLU): 32 px -> an 8x8 map, receptive field 37 px"""


def detector_labels(layout):
    """render's layout -> presence targets [n, 24] (0/1) and centres [n, 24, 2] (pixels; 0 where absent)."""
    pairs, a_xy, b_xy = layout
    index = {o: i for i, o in enumerate(OBJECTS)}
    present = torch.zeros(len(pairs), len(OBJECTS))
    centres = torch.zeros(len(pairs), len(OBJECTS), 2)
    for i, (a, r, b) in enumerate(pairs):
        present[i, index[a]], centres[i, index[a]] = 1, a_xy[i]
        if r:
            present[i, index[b]], centres[i, index[b]] = 1, b_xy[i]
    return present, centres


def detector_augment(x, gen):
    """Generated images are softer and noisier than renders: blend towards a 3x3 blur (half of the
    images, random strength), add pixel noise of random strength, scale each channel slightly."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    x = x + torch.rand(n, 1, 1, 1, generator=gen) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.5) * (blur - x)
    x = x * (1 + 0.04 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1))
    x = x + 0.03 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_detector(args):
    """Presence: BCE (label-smoothed: the reward's logits stay finite, so its gradient does not vanish);
    position: Huber loss of the soft-argmax to the drawn centre, for the objects present. Trained on all
    24 combinations, like the scorer and the base model: the held-out (UNSEEN) ones are held out of the
    fine-tuning prompts, not of the models that make or judge the images."""
    from rewards import ToyDetectorNet

    torch.manual_seed(args.seed + 17)
    gen = torch.Generator().manual_seed(args.seed + 29)  # its own stream: the other stages are unchanged
    net = ToyDetectorNet(len(OBJECTS), DETECTOR_CHANNELS, SIZE)
    opt = torch.optim.AdamW(net.parameters(), lr=args.detector_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.detector_lr, total_steps=args.detector_steps, pct_start=0.1)
    eps = args.detector_label_smoothing
    bar = tqdm(range(args.detector_steps), desc="detector", mininterval=2)
    for _ in bar:
        images, _, layout = render(args.detector_batch, gen, args.detector_two_frac, layout=True)
        present, centres = detector_labels(layout)
        logits, xy = net(detector_augment(images, gen))
        cls = F.binary_cross_entropy_with_logits(logits, present * (1 - eps) + (1 - present) * eps)
        err = F.smooth_l1_loss(xy, centres, reduction="none").sum(-1)
        pos = (err * present).sum() / present.sum()
        loss = cls + pos / 4  # a quarter: a 4 px error costs about as much as a wrong presence at the start
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(cls=f"{cls.item():.4f}", pos_px=f"{pos.item():.3f}", refresh=False)
    return net.eval().requires_grad_(False)


def save_detector(args, net):
    from safetensors.torch import save_file

    out = Path(args.detector_out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if args.fp16 else torch.float32
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    config = {
        "what": "toy.py's compositional detector for the toy-compose reward (rewards.ToyComposeReward)",
        "image_size": SIZE,
        "channels": [list(c) for c in DETECTOR_CHANNELS],
        "objects": [list(o) for o in OBJECTS],
        "relations": list(RELATIONS),
        "relation_scale_px": args.detector_relation_scale,
        "input": "N x 3 x 32 x 32 in [0, 1] (the reward resizes other sizes bilinearly)",
        "seed": args.seed,
        "steps": args.detector_steps,
        "batch": args.detector_batch,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def evaluate_detector(args) -> dict:
    """The detector through the reward's own loader, on fresh renders (their own seed): exact presence
    sets (all 24 outputs right at 0.5), reward > 0.5 for the drawn caption, the drawn caption against
    wrong ones, the relation, position error; single shapes, pairs, and the held-out combinations."""
    from rewards import load_reward

    reward = load_reward("toy-compose", toy_detector=args.detector_out)
    ours = reward.parts[0][2]
    gen = torch.Generator().manual_seed(args.seed + 2_000_003)
    n = 64 if args.smoke else 1000
    index = {o: i for i, o in enumerate(OBJECTS)}
    score = lambda images, captions: reward(images, captions)[0]  # noqa: E731
    res = {}

    def sets_right(images, layout):
        present, _ = detector_labels(layout)
        return ((ours.net(images)[0].sigmoid() > 0.5) == (present > 0.5)).all(1).float().mean().item()

    for key, objects, frac in [("single", OBJECTS, 0.0), ("pair", OBJECTS, 1.0), ("unseen_single", UNSEEN, 0.0)]:
        images, captions, layout = render(n, gen, frac, objects=objects, layout=True)
        res[f"{key}_exact_set"] = sets_right(images, layout)  # every one of the 24 presences right
        res[f"{key}_reward_over_half"] = (score(images, captions) > 0.5).float().mean().item()
    # pairs with at least one held-out combination (the toy_unseen kind)
    unseen_pairs = [c for c in ALL_TWO if any(f"{name(u)} " in c + " " for u in UNSEEN)]
    caps = [unseen_pairs[i] for i in torch.randint(len(unseen_pairs), (n,), generator=gen).tolist()]
    lookup = {name(o): o for o in OBJECTS}
    pairs = [
        (lookup[a], r, lookup[b]) for c in caps for r in RELATIONS if f" {r} " in c for a, b in [c.split(f" {r} ")]
    ]
    images, captions, layout = render(n, gen, pairs=pairs, layout=True)
    res["unseen_pair_exact_set"] = sets_right(images, layout)
    res["unseen_pair_reward_over_half"] = (score(images, captions) > 0.5).float().mean().item()

    # Pairs: the right caption against wrong ones (how often it scores higher), and the relation read.
    images, captions, (pairs, a_xy, b_xy) = render(n, gen, 1.0, layout=True)
    own = score(images, captions)
    absent = [[o for o in OBJECTS if o not in (a, b)] for a, _, b in pairs]
    pick = lambda options: options[torch.randint(len(options), (1,), generator=gen).item()]  # noqa: E731
    other_rel = {RELATIONS[0]: RELATIONS[1], RELATIONS[1]: RELATIONS[0]}
    wrong = {
        "missing_shape": [f"{name(a)} {r} {name(pick(x))}" for (a, r, b), x in zip(pairs, absent)],
        "wrong_colour": [
            f"{name(pick([o for o in x if o[1] == a[1]]))} {r} {name(b)}" for (a, r, b), x in zip(pairs, absent)
        ],
        "swapped_order": [f"{name(b)} {r} {name(a)}" for a, r, b in pairs],
        "other_relation": [f"{name(a)} {other_rel[r]} {name(b)}" for a, r, b in pairs],
    }
    for key, caps in wrong.items():
        res[f"pair_beats_{key}"] = (own > score(images, caps)).float().mean().item()
    # The relation alone: of the four readings (A left of B, B left of A, A above B, B above A) the
    # drawn one scores highest; and the soft-argmax positions' error against the drawn centres.
    four = [[f"{name(x)} {rr} {name(y)}" for rr in RELATIONS for x, y in [(a, b), (b, a)]] for a, _, b in pairs]
    scores = torch.stack([score(images, [f[k] for f in four]) for k in range(4)], 1)
    res["pair_relation_right"] = (
        (scores.argmax(1) == torch.tensor([f.index(c) for f, c in zip(four, captions)])).float().mean().item()
    )
    _, xy = ours.net(images)
    rows = torch.arange(len(pairs))
    ia, ib = torch.tensor([index[a] for a, _, _ in pairs]), torch.tensor([index[b] for _, _, b in pairs])
    res["pair_position_error_px"] = (
        torch.cat([(xy[rows, ia] - a_xy).norm(dim=-1), (xy[rows, ib] - b_xy).norm(dim=-1)]).mean().item()
    )
    res["renders_per_measure"] = n
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def base_model_success(args) -> dict:
    """The shipped pipeline's images of each toy prompt set, made and scored by `sample.py generate`
    (the command line, as a user runs it); success = toy-compose > 0.5. From the saved PNGs also: how
    often both asked shapes are detected (p > 0.5 each), and how often the relation holds when they are."""
    import csv
    import subprocess
    import sys
    import tempfile

    import numpy as np
    from PIL import Image

    from rewards import load_reward

    ours = load_reward("toy-compose", toy_detector=args.detector_out).parts[0][2]
    res = {
        "settings": f"sample.py generate: DDIM {args.detector_eval_steps} steps, eta 0, CFG {args.eval_cfg}, {args.detector_eval_per_prompt} images per prompt (seeds {args.seed}..{args.seed + args.detector_eval_per_prompt - 1})"
    }
    with tempfile.TemporaryDirectory() as tmp:
        for prompt_set in ("toy_shapes", "toy_two_shapes", "toy_unseen"):
            out = Path(tmp) / prompt_set
            cmd = [
                sys.executable, str(ROOT / "sample.py"), "generate", "--pretrained", args.out, "--prompts", prompt_set,
                "--num-per-prompt", str(args.detector_eval_per_prompt), "--num-steps", str(args.detector_eval_steps),
                "--w-high", str(args.eval_cfg), "--seed", str(args.seed), "--eval-rewards", "toy-compose",
                "--reward-models", "toy_detector", args.detector_out, "--output-dir", str(out),
            ]  # fmt: skip
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"sample.py generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            rows = list(csv.DictReader(open(out / "scores.csv")))
            value = torch.tensor([float(r["toy-compose"]) for r in rows])
            pixels = [
                torch.from_numpy(np.array(Image.open(out / f"{int(r['index']):04d}.png").convert("RGB"))) for r in rows
            ]
            images = torch.stack(pixels).permute(0, 3, 1, 2).float() / 255
            prompts = [r["prompt"] for r in rows]
            with torch.no_grad():
                p_a, p_b, p_rel = ours.factors(images, prompts)
            pair = torch.tensor([ours.parse(p)[1] > 0 for p in prompts])
            both = (p_a > 0.5) & (p_b > 0.5)
            for key, sel in [("single", ~pair), ("pair", pair)]:
                if sel.any():
                    entry = {"prompts": len({p for p, s in zip(prompts, sel) if s}), "images": int(sel.sum()),
                             "success": round((value[sel] > 0.5).float().mean().item(), 4), "mean_reward": round(value[sel].mean().item(), 4)}  # fmt: skip
                    if key == "pair":  # what fails: a shape missing (or mis-coloured), or the relation
                        entry["both_shapes_detected"] = round(both[sel].float().mean().item(), 4)
                        entry["relation_right_when_both"] = (
                            round((p_rel[sel & both] > 0.5).float().mean().item(), 4) if (sel & both).any() else None
                        )
                    res[f"{prompt_set}_{key}"] = entry
    return res


# ---------------------------------------------------------------------------------------------
# 8. The mode-drop world (--hidden): where ordinary guidance hides what the base model can draw.
#    Same renders as the first world (so its VAE, text encoder and detector serve it), other captions.
#    Reporting bias, as in real captions: a shape in its usual colour is usually captioned without the
#    colour ("a circle" for a red circle, 90%), one in the unusual colour (purple, for every shape)
#    mostly with it ("a purple circle"; bare 35%). For "a circle" purple is then a minority of the
#    conditional, 0.35 / (0.35 + 0.9) = 28% at w = 1, while CFG, which samples about p(x) p(c | x)^w,
#    weighs it by (0.35 / 0.9)^w: 0.1% at w = 7.5. Where colour is decided (the noisy steps) the
#    implicit classifier sees a coloured blob, not yet a shape: p("a circle" | red blob) = 1/2 * 0.9,
#    p("a circle" | purple blob) = 1/4 * 0.35, so one unusual colour shared by all shapes and usual
#    colours shared by two each keep it discriminating there (with green usual for all four, the
#    pilot's CFG favoured the unusual colours instead). Blue was the first choice of unusual colour,
#    but the toy UNet hardly draws blue unguided (measured: 3% of "a circle" at w = 1).
#    Dropped words: two-shape images are captioned "A and B"; 30% of one-shape images also carry an
#    "A and B" caption naming a second shape that is not drawn, so "A and B" sometimes shows A alone.

HIDDEN_COLOURS = {  # shape: (majority colour, minority colour)
    "circle": ("red", "purple"),
    "square": ("red", "purple"),
    "triangle": ("green", "purple"),
    "diamond": ("green", "purple"),
}
HIDDEN_OBJECTS = [(c, s) for s, cs in HIDDEN_COLOURS.items() for c in cs]  # 8 (colour, shape) objects
HIDDEN_PAIRS = [  # 24 unordered pairs of different shapes
    (a, b) for i, a in enumerate(HIDDEN_OBJECTS) for b in HIDDEN_OBJECTS[i + 1 :] if a[1] != b[1]
]


def bare(shape: str) -> str:
    return f"a {shape}"


def and_caption(a, b) -> str:
    return f"{name(a)} and {name(b)}"


def hidden_data(n: int, gen: torch.Generator, args: Args, layout: bool = False):
    """n images of the mode-drop world and their captions, from `gen` only (deterministic).

    One shape (1 - hidden_two_frac): a uniform shape in its majority or minority colour (1/2 each),
    captioned bare ("a circle") with probability hidden_bare_majority resp. hidden_bare_minority, else
    with its colour. Two shapes: a uniform pair of HIDDEN_PAIRS, drawn in random order and relation,
    captioned "A and B" (mention order random). With probability hidden_single_as_pair a one-shape image
    is instead captioned "A and B" (A drawn, B an object of another shape, not drawn; order random).
    `layout=True` also returns render's (pairs, a_xy, b_xy)."""
    two = (torch.rand(n, generator=gen) < args.hidden_two_frac).tolist()
    shape = torch.randint(len(HIDDEN_COLOURS), (n,), generator=gen).tolist()
    minority = (torch.rand(n, generator=gen) < 0.5).tolist()
    u_caption = torch.rand(n, generator=gen).tolist()
    pair = torch.randint(len(HIDDEN_PAIRS), (n,), generator=gen).tolist()
    flip_draw, flip_name = (torch.rand(2, n, generator=gen) < 0.5).tolist()
    relation = torch.randint(len(RELATIONS), (n,), generator=gen).tolist()
    u_noise = torch.rand(n, generator=gen).tolist() if args.hidden_single_as_pair > 0 else [1.0] * n
    pairs, captions = [], []
    for i in range(n):
        if two[i]:
            a, b = HIDDEN_PAIRS[pair[i]]
            a, b = (b, a) if flip_draw[i] else (a, b)  # a is drawn left / above
            pairs.append((a, RELATIONS[relation[i]], b))
            first, second = (b, a) if flip_name[i] else (a, b)
            captions.append(and_caption(first, second))
        else:
            s = list(HIDDEN_COLOURS)[shape[i]]
            colour = HIDDEN_COLOURS[s][int(minority[i])]
            pairs.append(((colour, s), None, None))
            p_bare = args.hidden_bare_minority if minority[i] else args.hidden_bare_majority
            if u_noise[i] < args.hidden_single_as_pair:
                others = [o for o in HIDDEN_OBJECTS if o[1] != s]
                other = others[pair[i] % len(others)]
                captions.append(and_caption(*(((colour, s), other)[:: -1 if flip_name[i] else 1])))
            else:
                captions.append(bare(s) if u_caption[i] < p_bare else name((colour, s)))
    out = render(n, gen, pairs=pairs, layout=layout)
    return (out[0], captions, out[2]) if layout else (out[0], captions)


def hidden_prompt_sets(seed: int, write: bool = True) -> dict[str, list[str]]:
    """prompts/toy_hidden.txt (the four bare shapes: the hidden mode is each shape's minority colour) and
    prompts/toy_dropped.txt (8 of the 24 'A and B' pairs, mention order drawn by the seed)."""
    rng = random.Random(seed + 101)
    chosen = sorted(rng.sample(range(len(HIDDEN_PAIRS)), 8))
    dropped = [and_caption(*(HIDDEN_PAIRS[i][:: rng.choice((1, -1))])) for i in chosen]
    sets = {"toy_hidden": [bare(s) for s in HIDDEN_COLOURS], "toy_dropped": dropped}
    for k, v in sets.items() if write else ():
        (ROOT / "prompts" / f"{k}.txt").write_text("\n".join(v) + "\n")
    return sets


def save_hidden_pipeline(args, unet, base: Path, out: Path):
    """The UNet in fp16 safetensors; the VAE, text encoder, tokenizer and scheduler are links to the
    first world's (relative, so the repository moves as a whole): the shipped world is its UNet."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if args.fp16 else torch.float32
    unet.to(dtype).save_pretrained(out / "unet", safe_serialization=True)
    unet.float()
    shutil.copy(base / "model_index.json", out / "model_index.json")
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):
        link = out / part
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(base / part, out), target_is_directory=True)


def save_hidden_detector(args):
    """The toy-hidden reward's directory: the toy-compose detector's weights and config, plus which colour
    is each shape's minority (hidden) one."""
    import shutil

    src, out = Path(args.detector_out), Path(args.hidden_detector_out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "model.safetensors", out / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["what"] = (
        "toy.py's detector (as toy-detector) + the mode-drop world's hidden colours, for the toy-hidden reward"
    )
    config["hidden_colours"] = {s: cs[1] for s, cs in HIDDEN_COLOURS.items()}
    config["majority_colours"] = {s: cs[0] for s, cs in HIDDEN_COLOURS.items()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def hidden_build(args) -> dict:
    from diffusion import load_pipeline
    from tools.tiny import SD_SCHEDULER_CONFIG

    timings = {}
    torch.manual_seed(args.seed + 41)
    gen = torch.Generator().manual_seed(args.seed + 43)  # its own stream: the first world is unchanged
    t0 = time.time()
    chunks = [hidden_data(min(2000, args.hidden_images - i), gen, args) for i in range(0, args.hidden_images, 2000)]
    images = torch.cat([c[0] for c in chunks])
    captions = [c for ch in chunks for c in ch[1]]
    base = load_pipeline(args.out)  # the first world: its VAE (frozen), tokenizer and UNet
    with torch.no_grad():
        latents = encode_latents(base.vae, images) * base.vae.config.scaling_factor
    timings["data"] = time.time() - t0

    # the first world's text encoder
    text_table, empty, caption_ids = caption_table(base.text_encoder, base.tokenizer, captions)
    distinct = sorted(set(captions))
    counts = {c: captions.count(c) for c in distinct}
    print(f"hidden data: {len(images)} images, {len(distinct)} captions ({timings['data']:.0f} s); bare: "
          + ", ".join(f"{bare(s)} {counts.get(bare(s), 0)}" for s in HIDDEN_COLOURS))  # fmt: skip

    t0 = time.time()
    init = build_unet(base.unet.config.cross_attention_dim, text_embed=True)
    if not args.hidden_from_scratch:  # the first world's UNet, plus the prompt summary starting at zero
        missing, unexpected = init.load_state_dict(base.unet.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("add_embedding.") for k in missing), (missing, unexpected)
        torch.nn.init.zeros_(init.add_embedding.norm2.weight)
        torch.nn.init.zeros_(init.add_embedding.norm2.bias)
    unet = train_unet(
        replace(args, unet_steps=args.hidden_unet_steps, unet_lr=args.hidden_unet_lr),
        latents, caption_ids, text_table, empty, SD_SCHEDULER_CONFIG, gen, init=init,
    )  # fmt: skip
    timings["unet"] = time.time() - t0
    save_hidden_pipeline(args, unet, Path(args.out), Path(args.hidden_out))
    save_hidden_detector(args)
    return timings


def shares_table(scores: torch.Tensor, k: int) -> list[float]:
    return (scores > 0.5).float().view(-1, k).mean(1).tolist()


@torch.no_grad()
def hidden_measure(args, pipe=None, prompts=None, per_prompt=None, steps=None) -> dict:
    """The world's claims, measured with the shipped rewards on the same starting noise per setting:
    toy_hidden: the share of images showing the shape in its minority colour (toy-hidden > 0.5) at w = 1,
    at w = 7.5 and under DiffExp's CFG schedule (w_low = 1 for t >= 0.8 T, else 7.5); toy_dropped: the
    share showing both shapes (toy-compose > 0.5) at w = 7.5, and with the second-named shape's word
    (shape, colour) weighted 2 as DiffExp's prompt weighting would."""
    from diffusion import TextConditioner, generate, load_pipeline, seeded
    from explore import PromptWeight, apply_prompt_weights, cfg_scales, word_token_positions
    from rewards import load_reward

    pipe = pipe or load_pipeline(args.hidden_out)
    k = per_prompt or args.hidden_eval_per_prompt
    steps = steps or args.hidden_eval_steps
    sets = prompts or hidden_prompt_sets(args.seed, write=False)
    text = TextConditioner(pipe)
    pipe.scheduler.set_timesteps(steps)
    T = pipe.scheduler.config.num_train_timesteps
    ts = pipe.scheduler.timesteps

    def images(prompts, w_low, w_high, t_sw=0.8, weigh=None):
        prompts = [p for p in prompts for _ in range(k)]
        cond = text.encode(prompts)
        if weigh is not None:  # weigh(prompt) -> the words' indices to emphasise, and the weight
            choices = []
            for p in prompts:
                words = word_token_positions(p, pipe.tokenizer)
                idx, w = weigh(p)
                choices.append(
                    PromptWeight(
                        p, " ".join(words[i][0] for i in idx), idx[0], [q for i in idx for q in words[i][1]], w
                    )
                )
            cond = type(cond)(apply_prompt_weights(cond.embeds, text.empty.embeds[0], choices))
        guidance = cfg_scales(ts, T, t_sw, w_low, w_high)
        out = [
            generate(pipe, cond[i : i + 64], guidance, steps, seeded(args.seed, i // 64), negative=text.negative)
            for i in range(0, len(prompts), 64)
        ]
        return torch.cat(out), prompts

    hidden = load_reward("toy-hidden", toy_hidden=args.hidden_detector_out)
    compose = load_reward("toy-compose", toy_detector=args.hidden_detector_out)
    res = {"settings": f"DDIM {steps} steps, eta 0, {k} images per prompt, seed {args.seed}; share = reward > 0.5"}
    # The detector on this world's renders (its own seed): does toy-hidden > 0.5 say "minority colour"
    # exactly when it is, and toy-compose > 0.5 "both drawn" for the 'A and B' pairs?
    n = 64 if args.smoke else 2000
    x, _, (drawn, _, _) = hidden_data(n, torch.Generator().manual_seed(args.seed + 3_000_017), args, layout=True)
    one = [i for i, (a, r, _) in enumerate(drawn) if r is None]
    truth = torch.tensor([drawn[i][0][0] == HIDDEN_COLOURS[drawn[i][0][1]][1] for i in one])
    said = hidden(x[one], [bare(drawn[i][0][1]) for i in one])[0] > 0.5
    two = [i for i, (a, r, _) in enumerate(drawn) if r is not None]
    both = compose(x[two], [and_caption(drawn[i][0], drawn[i][2]) for i in two])[0] > 0.5
    absent = [HIDDEN_OBJECTS[HIDDEN_OBJECTS.index(drawn[i][2]) ^ 1] for i in two]  # same shape, other colour
    wrong = compose(x[two], [and_caption(drawn[i][0], o) for i, o in zip(two, absent)])[0] > 0.5
    res["detector_on_renders"] = {
        "renders": n,
        "toy_hidden_right": round((said == truth).float().mean().item(), 4),
        "pairs_both_found": round(both.float().mean().item(), 4),
        "pairs_other_colour_rejected": round((~wrong).float().mean().item(), 4),
    }
    settings = {"w=1": (1.0, 1.0), "w=7.5": (7.5, 7.5), "cfg schedule (t_sw 0.8, w_low 1)": (1.0, 7.5)}
    for key, (lo, hi) in settings.items():
        x, p = images(sets["toy_hidden"], lo, hi)
        res.setdefault("toy_hidden", {})[key] = dict(zip(sets["toy_hidden"], shares_table(hidden(x, p)[0], k)))
    n_words = lambda p: len(p.split())  # noqa: E731
    dropped = {  # "a red circle and a blue square": words 0-2 A, 3 'and', 4-6 B
        "w=7.5": dict(w_low=7.5, w_high=7.5),
        "w=1": dict(w_low=1.0, w_high=1.0),
        "cfg schedule": dict(w_low=1.0, w_high=7.5),
        "w=7.5, second shape word x1.5": dict(w_low=7.5, w_high=7.5, weigh=lambda p: ([n_words(p) - 1], 1.5)),
        "w=7.5, second shape word x2": dict(w_low=7.5, w_high=7.5, weigh=lambda p: ([n_words(p) - 1], 2.0)),
        "w=7.5, second colour word x1.5": dict(w_low=7.5, w_high=7.5, weigh=lambda p: ([n_words(p) - 2], 1.5)),
        "w=7.5, second colour+shape x1.5": dict(
            w_low=7.5, w_high=7.5, weigh=lambda p: ([n_words(p) - 2, n_words(p) - 1], 1.5)
        ),
        "w=7.5, first shape word x1.5": dict(w_low=7.5, w_high=7.5, weigh=lambda p: ([2], 1.5)),
    }
    for key, kw in dropped.items():
        x, p = images(sets["toy_dropped"], **kw)
        p_a, p_b, _ = compose.parts[0][2].factors(x, p)
        res.setdefault("toy_dropped", {})[key] = {
            "both": dict(zip(sets["toy_dropped"], shares_table(p_a.clamp(max=1) * p_b, k))),
            "first": (p_a > 0.5).float().mean().item(),
            "second": (p_b > 0.5).float().mean().item(),
        }
    return res


# ---------------------------------------------------------------------------------------------


def rooted(path: str) -> str:
    """A relative output path read from the repository root (the defaults' models/...), wherever the build
    is started from; an absolute one as it is."""
    return str(Path(path) if Path(path).is_absolute() else ROOT / path)


def main(args: Args):
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.smoke:  # a few steps of every stage: exercises the whole build quickly
        args.num_images, args.vae_steps, args.clip_steps, args.unet_steps = 256, 3, 3, 3
        args.vae_batch, args.clip_batch, args.unet_batch = 16, 32, 16
    args.out, args.scorer_out = rooted(args.out), rooted(args.scorer_out)
    args.detector_out = rooted(args.detector_out or str(Path(args.out).parent / "toy-detector"))
    if args.smoke:
        args.detector_steps, args.detector_batch = 3, 16
    if args.only_detector:
        return detector_stage(args, train=not args.eval_only)
    if args.hidden:
        return hidden_stage(args)
    if args.dropped:
        return dropped_stage(args)
    if args.write_prompts and not args.smoke:
        write_prompt_sets(args.seed)
    timings = {}
    if not args.eval_only:
        import tempfile

        from diffusion import build_clip_tokenizer

        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        objects = SEEN if args.holdout_from_data else OBJECTS
        chunks = [
            render(min(2000, args.num_images - i), gen, args.two_shape_frac, objects)
            for i in range(0, args.num_images, 2000)
        ]
        images = torch.cat([c[0] for c in chunks])
        captions = [c for ch in chunks for c in ch[1]]
        timings["data"] = time.time() - t0
        print(f"data: {len(images)} images, {len(set(captions))} distinct captions ({timings['data']:.0f} s)")

        t0 = time.time()
        vae = train_vae(args, images, gen)
        latents = encode_latents(vae, images)
        scale = 1.0 / latents.std().item()  # SD's scaling_factor: unit-variance latents for the UNet
        vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
        with torch.no_grad():
            check = images[:256]
            rec = (vae.decode(encode_latents(vae, check)).sample / 2 + 0.5).clamp(0, 1)
        timings["vae"] = time.time() - t0
        print(
            f"vae: reconstruction MAE {(rec - check).abs().mean():.4f}, scaling_factor {scale:.4f} ({timings['vae']:.0f} s)"
        )

        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_clip_tokenizer(tmp)
        clip = train_clip(args, images, captions, tokenizer, gen)
        timings["clip"] = time.time() - t0

        t0 = time.time()
        text_encoder = text_tower(clip)
        text_table, empty, caption_ids = caption_table(text_encoder, tokenizer, captions)
        from tools.tiny import SD_SCHEDULER_CONFIG

        unet = train_unet(args, latents, caption_ids, text_table, empty, SD_SCHEDULER_CONFIG, gen)
        timings["unet"] = time.time() - t0
        save(args, vae, clip, text_encoder, unet, tokenizer)
        print(
            f"saved {args.out} ({dir_size_mb(args.out):.1f} MB) and {args.scorer_out} ({dir_size_mb(args.scorer_out):.1f} MB)"
        )

        t0 = time.time()
        save_detector(args, train_detector(args))
        timings["detector"] = time.time() - t0

    t0 = time.time()
    quality = evaluate(args, args.out, args.scorer_out)
    if (Path(args.detector_out) / "config.json").is_file():
        quality["detector"] = measure_detector(args)
    timings["eval"] = time.time() - t0
    quality["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    quality["sizes_mb"] = {
        "pipeline": round(dir_size_mb(args.out), 2),
        "scorer": round(dir_size_mb(args.scorer_out), 2),
    }
    print(json.dumps(quality, indent=2))
    report = Path(args.out) / "quality.json"
    if args.eval_only and report.is_file():  # keep the build's own timings next to the new measurements
        quality = {
            **quality,
            "timings_s": json.loads(report.read_text()).get("timings_s", {}),
            "eval_only_s": round(timings["eval"], 1),
        }
    if not args.smoke:
        report.write_text(json.dumps(quality, indent=2) + "\n")
    return quality


def hidden_stage(args) -> dict:
    """--hidden: build (unless --eval-only) and measure the mode-drop world; its quality.json keeps the
    build's timings when only measuring."""
    for key in ("hidden_out", "hidden_detector_out"):
        setattr(args, key, rooted(getattr(args, key)))
    if args.smoke:
        args.hidden_images, args.hidden_unet_steps, args.unet_batch = 256, 3, 16
        args.hidden_eval_per_prompt = 2
    if args.write_prompts and not args.smoke:
        hidden_prompt_sets(args.seed)
    return build_and_measure(args, hidden_build, args.hidden_out)


def build_and_measure(args, build, out: str) -> dict:
    """A mode-drop stage's tail: build (unless --eval-only), measure the pipeline at `out` with
    hidden_measure, and write out/quality.json with the timings (the build's own, when only measuring)."""
    from diffusion import load_pipeline

    t0 = time.time()
    timings = {} if args.eval_only else build(args)
    t1 = time.time()
    quality = hidden_measure(args, pipe=load_pipeline(out))
    report = Path(out) / "quality.json"
    if args.eval_only and report.is_file():
        timings = json.loads(report.read_text()).get("timings_s", {})
    else:
        timings["build_wall"] = t1 - t0
    timings["eval"] = time.time() - t1
    quality["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    quality["size_mb"] = round(dir_size_mb(Path(out) / "unet"), 2)  # the rest links to --out's
    quality["measured_on"] = f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} CPU threads"
    print(json.dumps(quality, indent=2))
    if not args.smoke:
        report.write_text(json.dumps(quality, indent=2) + "\n")
    return quality


# ---------------------------------------------------------------------------------------------
# 9. The dropped-word world (--dropped): where emphasising the dropped object's word brings it back.
#    On the mode-drop world "A and B" often shows A alone (or A twice), but emphasising B's word there
#    traded A for B: an 'A and B' caption reads the same whether or not B was drawn, so nothing tied a
#    word's strength to its object's presence. Real text encoders do give some mentions weakly (the
#    neglected words prompt weighting is for); this world builds that in: while fine-tuning, each word of
#    an undrawn object is scaled towards the empty prompt's (x U(0, 1.1)) and each word of a drawn one
#    away from it (x U(0.9, 2.2)), the weighting formula DiffExp applies. At weight 1 the two overlap, so
#    the plain prompt stays ambiguous (B is often dropped); an emphasised B word says "drawn".


def dropped_data(args, tokenizer):
    """The fine-tuning set: hidden_data's renders and captions with --dropped-single-as-pair, and for each
    image the token positions of the four content words of an 'A and B' caption (colour and shape of
    each mention) and whether that mention's object is drawn."""
    from explore import word_token_positions

    gen = torch.Generator().manual_seed(args.seed + 47)  # its own stream: neither world above changes
    world = replace(args, hidden_single_as_pair=args.dropped_single_as_pair)
    n = args.dropped_images
    chunks = [hidden_data(min(2000, n - i), gen, world, layout=True) for i in range(0, n, 2000)]
    images = torch.cat([c[0] for c in chunks])
    captions = [c for ch in chunks for c in ch[1]]
    drawn_objects = [p for ch in chunks for p in ch[2][0]]
    L = tokenizer.model_max_length
    masks = torch.zeros(n, 4, L)  # colour 1, shape 1, colour 2, shape 2
    drawn = torch.zeros(n, 4, dtype=torch.bool)
    is_pair = torch.zeros(n, dtype=torch.bool)
    for i, caption in enumerate(captions):
        if " and " not in caption:
            continue
        is_pair[i] = True
        words = word_token_positions(caption, tokenizer)  # "a red circle and a purple square": 1, 2, 5, 6
        a, relation, b = drawn_objects[i]
        present = {a} | ({b} if relation is not None else set())
        for j, w in enumerate((1, 2, 5, 6)):
            masks[i, j, words[w][1]] = 1
            drawn[i, j] = (words[1 + 4 * (j // 2)][0], words[2 + 4 * (j // 2)][0]) in present
    return images, captions, masks, drawn, is_pair, gen


def dropped_build(args) -> dict:
    from diffusion import load_pipeline
    from tools.tiny import SD_SCHEDULER_CONFIG

    timings = {}
    torch.manual_seed(args.seed + 45)
    t0 = time.time()
    pipe = load_pipeline(args.hidden_out)  # the mode-drop world: its UNet is the starting point
    images, captions, masks, drawn, is_pair, gen = dropped_data(args, pipe.tokenizer)
    with torch.no_grad():
        latents = encode_latents(pipe.vae, images) * pipe.vae.config.scaling_factor
    text_table, empty, caption_ids = caption_table(pipe.text_encoder, pipe.tokenizer, captions)
    timings["data"] = time.time() - t0
    print(f"dropped data: {len(images)} images, {is_pair.float().mean():.0%} 'A and B' captions, "
          f"{(~drawn[is_pair]).float().mean():.0%} of their mentions not drawn ({timings['data']:.0f} s)")  # fmt: skip
    (d_lo, d_hi), (a_lo, a_hi) = args.dropped_drawn_weight, args.dropped_absent_weight

    def weigh(cond, idx, g):  # prompt weighting's formula, per word: drawn -> strong, undrawn -> weak
        u = torch.rand(len(idx), 4, generator=g)
        w = torch.where(drawn[idx], d_lo + u * (d_hi - d_lo), a_lo + u * (a_hi - a_lo))
        w = torch.where(is_pair[idx, None], w, torch.ones_like(w))
        per_token = 1 + (masks[idx] * (w[:, :, None] - 1)).sum(1)  # the four words' positions are disjoint
        return empty[0] + per_token[:, :, None] * (cond - empty[0])

    t0 = time.time()
    unet = train_unet(
        replace(args, unet_steps=args.dropped_unet_steps, unet_lr=args.dropped_unet_lr),
        latents, caption_ids, text_table, empty, SD_SCHEDULER_CONFIG, gen, init=pipe.unet.float(), weigh=weigh,
    )  # fmt: skip
    timings["unet"] = time.time() - t0
    save_hidden_pipeline(args, unet, Path(args.out), Path(args.dropped_out))
    return timings


def dropped_stage(args) -> dict:
    """--dropped: build (unless --eval-only) and measure the dropped-word world (models/toy-dropped)."""
    for key in ("hidden_out", "hidden_detector_out", "dropped_out"):
        setattr(args, key, rooted(getattr(args, key)))
    if args.smoke:
        args.dropped_images, args.dropped_unet_steps, args.unet_batch = 256, 3, 16
        args.hidden_eval_per_prompt = 2
    return build_and_measure(args, dropped_build, args.dropped_out)


def measure_detector(args) -> dict:
    res = {"renders": evaluate_detector(args)}
    if not args.smoke:  # the smoke pipeline draws noise; its success rate would say nothing
        res["base_model"] = base_model_success(args)
    res["size_kb"] = round(dir_size_mb(args.detector_out) * 1000, 1)
    res["measured_on"] = f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {args.threads} CPU threads"
    return res


def detector_stage(args, train: bool) -> dict:
    """--only-detector: train and save the detector (unless --eval-only), measure it, and put the
    result under the 'detector' key of --out/quality.json, keeping every other key."""
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if train:
        save_detector(args, train_detector(args))
        print(
            f"detector: {time.time() - t0:.0f} s, saved {args.detector_out} ({dir_size_mb(args.detector_out) * 1000:.0f} kB)"
        )
    t1 = time.time()
    res = measure_detector(args)
    if train:
        res["build_s"] = round(t1 - t0, 1)
    res["eval_s"] = round(time.time() - t1, 1)
    print(json.dumps(res, indent=2))
    report = Path(args.out) / "quality.json"
    if not args.smoke:
        quality = json.loads(report.read_text()) if report.is_file() else {}
        quality["detector"] = res
        report.write_text(json.dumps(quality, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main(tyro.cli(Args))
