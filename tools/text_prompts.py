"""Build the text-rendering prompt sets for `--reward ocr`: prompts/text_render.txt (training) and
prompts/text_render_eval.txt (held out), templates x short phrases, with a fixed seed.

    python tools/text_prompts.py              # rewrites both files (the same bytes every time) and prints their sizes
    python tools/text_prompts.py --check      # exits 1 if the files differ from what the script writes

The phrases are split once at random (seeded) into training and held-out ones; a held-out phrase that
shares text with a training phrase or a template (one inside the other, lowercased, spaces removed, as the
reward compares them) moves to training, so no held-out phrase occurs in any training prompt: the held-out set asks whether
what was learnt carries over to words never rewarded, as the paper's unseen animals do. Every template is
used by both sets: the question is the words, not the objects they are written on.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN, HELD_OUT = ROOT / "prompts" / "text_render.txt", ROOT / "prompts" / "text_render_eval.txt"
SEED = 0
HELD_OUT_FRACTION = 0.2
TEMPLATES_PER_PHRASE = {"train": 4, "eval": 2}

# Where text appears in photos and designs: signs, posters, mugs, T-shirts, book covers, neon, chalkboards...
TEMPLATES = [
    'a wooden shop sign that reads "{}"',
    'a vintage poster with the words "{}"',
    'a white coffee mug printed with "{}"',
    'a black T-shirt with "{}" written across the chest',
    'a book cover titled "{}"',
    'a glowing neon sign that says "{}"',
    'a chalkboard outside a cafe with "{}" written in chalk',
    'a green street sign reading "{}"',
    'a birthday cake with "{}" written in icing',
    'a shop window with "{}" painted on the glass',
    'a banner hanging across a street that says "{}"',
    'a handwritten note on yellow paper that says "{}"',
    'a movie poster with the title "{}"',
    'a cardboard protest sign that says "{}"',
    'a billboard by a highway that reads "{}"',
    'a laptop sticker that says "{}"',
    'a doormat that says "{}"',
    'a greeting card with "{}" on the front',
    'a baseball cap embroidered with "{}"',
    'a canvas tote bag printed with "{}"',
    'graffiti on a brick wall that reads "{}"',
    'a diner menu board that says "{}"',
    'a sandwich board on a sidewalk reading "{}"',
    'a magazine cover with the headline "{}"',
    'a hand-lettered wooden sign at a wedding that says "{}"',
    'a cereal box labelled "{}"',
    'a cinema marquee showing "{}"',
    'an embroidered cushion that says "{}"',
    'a metal door plate engraved with "{}"',
    'a paper coffee cup with "{}" written in marker',
]

# Short words and phrases (one to three words), the length of text a sign or a cover holds.
PHRASES = """
open; closed; fresh bread; hot coffee; welcome; exit; sale; free wifi; good morning; hello world; thank you;
keep calm; stay wild; dream big; be kind; no parking; push; pull; danger; quiet please; open late; best tacos;
ice cream; pizza; live music; happy birthday; just married; home sweet home; on air; do not disturb; love you;
go team; bake sale; lost cat; yard sale; book club; night owl; sunrise; moonlight; ocean view; city lights;
first place; gold rush; coffee time; tea house; fish market; flower shop; art gallery; bike repair; farm stand;
used books; record store; vinyl; game over; level up; good vibes; no signal; free hugs; hello; goodbye;
summer camp; winter sale; spring fling; autumn leaves; stop; slow down; one way; dead end; wet paint; caution;
staff only; restrooms; elevator; lobby; gate 12; platform 9; room 404; since 1999; est 1984; grand opening;
last chance; sold out; now hiring; we are open; come in; try again; well done; nice try; you got this;
believe; create; explore; adventure; wanderlust; paradise; sunshine; rainbow; thunder; galaxy; rocket; robot;
pixel; hacker; data; debug; deploy; launch; orbit; comet; nebula; jungle; desert; tundra; harbor; lighthouse;
bakery; butcher; deli; diner; saloon; motel; casino; arcade; cinema; theater; museum; library; school;
garage; workshop; studio; gym; yoga; spa; salon; barber; tattoo; laundry; pharmacy; clinic; police;
fire station; post office; bank; hotel; airport; market; kitchen; garden; orchard; vineyard; brewery; cafe;
bistro; noodles; dumplings; sushi; burgers; hot dogs; donuts; pancakes; waffles; cupcakes; lemonade;
smoothies; fresh juice; craft beer; wine bar; milkshakes; popcorn; candy; chocolate; cookies; fresh fish;
organic; vegan; gluten free; daily special; happy hour; two for one; half price; buy now; free delivery;
order here; pay here; take one; please wait; self service; cash only; north pole; zebra crossing; jazz night;
quiz night; karaoke; pet shop; dog park; bus stop; taxi; ticket office; lost and found; snack bar; good luck;
mind the gap; no smoking; silence; smile; relax; enjoy; peace; hope; courage; focus
"""


def key(text: str) -> str:
    """The text as the reward compares it: lowercased, spaces removed."""
    return "".join(text.lower().split())


def build(seed: int = SEED) -> tuple[list[str], list[str], list[str], list[str]]:
    """(training prompts, held-out prompts, training phrases, held-out phrases), the same for the same seed."""
    phrases = [p.strip() for p in PHRASES.replace("\n", " ").split(";") if p.strip()]
    dupes = [p for p, n in Counter(map(key, phrases)).items() if n > 1]
    if dupes:
        raise SystemExit(f"error: phrases listed twice: {dupes}")
    rng = random.Random(seed)
    shuffled = rng.sample(phrases, len(phrases))
    n_held = round(HELD_OUT_FRACTION * len(phrases))
    held, train = shuffled[:n_held], shuffled[n_held:]
    # A held-out phrase inside a training phrase or a template, or a training phrase inside it ("open" / "open
    # late", "cafe" / 'a chalkboard outside a cafe'), goes to training.
    clash = [h for h in held if any(key(h) in key(t) or key(t) in key(h) for t in train + TEMPLATES)]
    held = [h for h in held if h not in clash]
    train += clash

    def prompts(words: list[str], per_phrase: int) -> list[str]:
        out = [t.format(w) for w in words for t in rng.sample(TEMPLATES, per_phrase)]
        rng.shuffle(out)
        return out

    return prompts(train, TEMPLATES_PER_PHRASE["train"]), prompts(held, TEMPLATES_PER_PHRASE["eval"]), train, held


def file_text(prompts: list[str]) -> str:
    """One prompt a line, no comments (the built-in sets are plain lines; this script is their provenance)."""
    return "\n".join(prompts) + "\n"


def lengths(phrases: list[str]) -> str:
    """The target lengths (characters the reward compares: spaces removed) as 'min / median / max' and a histogram."""
    n = sorted(len(key(p)) for p in phrases)
    bins = Counter(min(k // 4, 3) for k in n)
    labels = ["1-3", "4-7", "8-11", "12+"]
    return f"{n[0]} / {n[len(n) // 2]} / {n[-1]}; " + ", ".join(f"{labels[b]}: {bins.get(b, 0)}" for b in range(4))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if prompts/ differs from what this script writes")
    args = ap.parse_args(argv)
    train, held, train_words, held_words = build()
    texts = {
        TRAIN: file_text(train),
        HELD_OUT: file_text(held),
    }
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, t in texts.items() if not p.is_file() or p.read_text() != t]
        if stale:
            print(f"error: {', '.join(stale)} differ from what tools/text_prompts.py writes: rerun it", file=sys.stderr)
            sys.exit(1)
    else:
        for path, text in texts.items():
            path.write_text(text)
    print(
        f"{TRAIN.relative_to(ROOT)}: {len(train)} prompts, {len(train_words)} phrases; lengths {lengths(train_words)}"
    )
    print(
        f"{HELD_OUT.relative_to(ROOT)}: {len(held)} prompts, {len(held_words)} phrases; lengths {lengths(held_words)}"
    )
    print(f"{len(TEMPLATES)} templates; lengths are min / median / max characters without spaces")


if __name__ == "__main__":
    main()
