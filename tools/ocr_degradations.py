"""The `ocr` reward against degradations of rendered text: what its number means before paying for a GPU.

    python tools/ocr_degradations.py                                   # the table on stdout (markdown)
    python tools/ocr_degradations.py --phrases 20 --out docs/text_rendering_table.md

Each held-out phrase (prompts/text_render_eval.txt) is rendered black on white at 512 x 512 px with the
TrueType font Pillow ships (`ImageFont.load_default(size=...)`, the same on every machine, no system
fonts), degraded, and scored by `rewards.load_reward("ocr")`. For every condition the table gives the mean,
the lowest and the share of exact (1.0) rewards over the phrases, and `if read perfectly`: the formula on
the text actually drawn (what a perfect reader would give; it differs from the reward where the OCR errs).
Also the OCR's time per image. Nothing here needs a GPU or the network.
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZE = 512  # the resolution Flow-GRPO trains SD3.5-Medium's text rendering at
TEXT = 48  # px: the font size of the clean rendering


def render(text: str, size=SIZE, font_px: int = TEXT, ink=(0, 0, 0), paper=(255, 255, 255)) -> Image.Image:
    """`text` (lines split at newlines) centred on a `size` (side, or (width, height)) canvas, in Pillow's
    shipped TrueType font."""
    w, h = (size, size) if isinstance(size, int) else size
    img = Image.new("RGB", (w, h), paper)
    font = ImageFont.load_default(size=font_px)
    ImageDraw.Draw(img).multiline_text((w / 2, h / 2), text, fill=ink, font=font, anchor="mm", align="center")
    return img


def to_tensor(images: list[Image.Image]):
    """PIL images -> N x 3 x H x W floats in [0, 1], what a reward takes."""
    import torch

    return torch.stack([torch.from_numpy(np.array(i.convert("RGB"))).permute(2, 0, 1) for i in images]).float() / 255


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def noise(img: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    x = np.asarray(img, dtype=np.float64) / 255 + np.random.default_rng(seed).normal(0, sigma, (SIZE, SIZE, 3))
    return Image.fromarray((x.clip(0, 1) * 255).round().astype(np.uint8))


def pixelate(img: Image.Image, factor: int) -> Image.Image:
    """Down by `factor` (area average) and back up (bicubic): text drawn at a lower resolution."""
    small = img.resize((SIZE // factor, SIZE // factor), Image.Resampling.BOX)
    return small.resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def two_lines(text: str) -> str:
    """The phrase broken over two lines: between words, or a single word in the middle."""
    words = text.split()
    if len(words) > 1:
        k = (len(words) + 1) // 2
        return " ".join(words[:k]) + "\n" + " ".join(words[k:])
    return text[: len(text) // 2] + "\n" + text[len(text) // 2 :]


def first_half(text: str) -> str:
    """The phrase cut after half its letters (spaces do not count), rounded down."""
    keep, out = len(text.replace(" ", "")) // 2, ""
    for ch in text:
        if keep == 0:
            break
        out, keep = out + ch, keep - (ch != " ")
    return out.rstrip()


def drop_letter(text: str) -> str:
    i = len(text) // 2 if text[len(text) // 2] != " " else len(text) // 2 + 1
    return text[:i] + text[i + 1 :]


def swap_letter(text: str) -> str:
    """One letter replaced by a different one (a typo the model could make)."""
    i = len(text) // 2 if text[len(text) // 2] != " " else len(text) // 2 + 1
    return text[:i] + ("x" if text[i] != "x" else "z") + text[i + 1 :]


# (group, condition, fn(phrase) -> (image, the text actually drawn))
CONDITIONS = [
    ("clean", "48 px black on white", lambda p: (render(p), p)),
    ("clean", "all capitals", lambda p: (render(p.upper()), p.upper())),
    *[("small text", f"{s} px", lambda p, s=s: (render(p, font_px=s), p)) for s in (16, 8, 6, 5, 4)],
    *[("low resolution", f"drawn at {SIZE // f} px, upscaled x{f}", lambda p, f=f: (pixelate(render(p), f), p)) for f in (4, 8, 12)],
    *[("blur", f"Gaussian radius {r}", lambda p, r=r: (render(p).filter(ImageFilter.GaussianBlur(r)), p)) for r in (2, 4, 5, 6, 8)],
    *[("JPEG", f"quality {q}", lambda p, q=q: (jpeg(render(p), q), p)) for q in (10, 5, 2, 1)],
    *[("noise", f"Gaussian sigma {s}", lambda p, s=s: (noise(render(p), s), p)) for s in (0.2, 0.4, 0.6, 0.8)],
    *[("rotation", f"{a} degrees", lambda p, a=a: (render(p).rotate(a, fillcolor="white"), p)) for a in (15, 30, 45, 60, 90, 180)],
    ("colour on colour", "grey 200 on white", lambda p: (render(p, ink=(200, 200, 200)), p)),
    ("colour on colour", "grey 235 on white", lambda p: (render(p, ink=(235, 235, 235)), p)),
    ("colour on colour", "grey 248 on white", lambda p: (render(p, ink=(248, 248, 248)), p)),
    ("colour on colour", "white on black", lambda p: (render(p, ink=(255, 255, 255), paper=(0, 0, 0)), p)),
    ("colour on colour", "red on green", lambda p: (render(p, ink=(200, 30, 30), paper=(40, 150, 60)), p)),
    ("colour on colour", "yellow on white", lambda p: (render(p, ink=(240, 220, 40)), p)),
    ("colour on colour", "navy on black", lambda p: (render(p, ink=(20, 30, 90), paper=(0, 0, 0)), p)),
    ("layout", "two lines", lambda p: (render(two_lines(p)), two_lines(p))),
    ("layout", "inside a sentence", lambda p: (render(f"we have {p} today", font_px=32), f"we have {p} today")),
    ("layout", "with another line of text", lambda p: (render(f"{p}\nsince 2026"), f"{p}\nsince 2026")),
    ("layout", "mirrored", lambda p: (render(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT), None)),
    ("partial words", "first half of the letters", lambda p: (render(first_half(p)), first_half(p))),
    ("partial words", "one letter missing", lambda p: (render(drop_letter(p)), drop_letter(p))),
    ("partial words", "one letter wrong", lambda p: (render(swap_letter(p)), swap_letter(p))),
    ("partial words", "one letter wrong, in a sentence", lambda p: (render(f"we have {swap_letter(p)} today", font_px=32),
                                                                     f"we have {swap_letter(p)} today")),
    ("partial words", "words in reverse order", lambda p: (render(" ".join(p.split()[::-1])), " ".join(p.split()[::-1]))),
    ("no text", "blank", lambda p: (render(""), "")),
    ("no text", "noise only", lambda p: (noise(render(""), 0.4, seed=1), "")),
]  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--phrases", type=int, default=20, help="held-out phrases used (the first N of the file's, in order)"
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)

    import rewards
    from diffusion import load_prompts

    targets = list(dict.fromkeys(rewards.ocr_target(p) for p in load_prompts("text_render_eval")))[: args.phrases]
    reward = rewards.load_reward("ocr")
    engine = reward.parts[0][2]
    rows, times = [], []
    for group, name, make in CONDITIONS:
        scores, ideal = [], []
        for target in targets:
            image, drawn = make(target)
            pixels = np.asarray(image.convert("RGB"))
            start = time.perf_counter()
            reading = engine.read(pixels)
            times.append(time.perf_counter() - start)
            scores.append(rewards.ocr_score(reading, target))
            ideal.append(None if drawn is None else rewards.ocr_score(drawn, target))
        exact = sum(s == 1.0 for s in scores) / len(scores)
        perfect = "n/a" if None in ideal else f"{statistics.fmean(ideal):.2f}"  # mirrored glyphs are no text
        rows.append(
            f"| {group} | {name} | {statistics.fmean(scores):.2f} | {min(scores):.2f} | {exact:.0%} | {perfect} |"
        )
    lengths = sorted(len("".join(t.split())) for t in targets)
    lines = [
        f"`python tools/ocr_degradations.py --phrases {args.phrases}` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, {rewards.OCR_THREADS} OCR thread(s)): {len(targets)} held-out phrases of "
        f"{lengths[0]}-{lengths[-1]} characters (median {lengths[len(lengths) // 2]}), {SIZE} x {SIZE} px, "
        f"{len(CONDITIONS) * len(targets)} images.",
        "",
        "| group | condition | mean reward | lowest | exact (1.0) | if read perfectly |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"OCR time per {SIZE} px image: median {statistics.median(times):.3f} s, mean {statistics.fmean(times):.3f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
