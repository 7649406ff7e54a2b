"""Train a custom reward model for a visual attribute, then fine-tune towards it.

    # 1. make data: SD images of a prompt set, snowed at a random strength (the label), cached on disk
    python train_reward.py --attribute snow --levels 2 --source animals_activities --data data/snow --only-make-data
    # 2. train the reward (a small CNN from scratch, or --backbone clip for a frozen CLIP + head)
    python train_reward.py --data data/snow --out runs/reward-snow --reward-mode class_prob --target 1
    # 3. fine-tune towards it
    python train_alignprop.py --reward custom:runs/reward-snow

Data is either generated (--attribute: pixelate, jpeg, blur, snow, rain, fog applied at strength s in
[0, 1] to source images; s is the label) or a labelled folder: root/<class>/*.png (classification) or a
CSV with columns path,score (regression). A generated dataset is itself a CSV dataset (labels.csv), so
the two paths meet. The output directory holds config.json + model.safetensors (what
`--reward custom:DIR` loads through rewards.py, differentiably), a learning curve, and validation
predictions against labels; a run refuses an output directory that holds another model unless --overwrite.
A wrong invocation stops with one line `error: ...` (exit code 2) before any model is loaded.
"""

from __future__ import annotations

import rundir  # first, and light: Ctrl-C while the rest imports (seconds) ends in one line, not a traceback

if __name__ == "__main__":
    rundir.on_ctrl_c(lambda: "interrupted: the reward model was not saved (--out keeps any generated data/)")

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks for updates online at import otherwise

import copy
import csv
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from diffusion import DEFAULT_PRETRAINED, CheckpointError, check_checkpoints, from_pretrained, load_prompts
from rewards import build_custom_network, custom_preprocess, custom_value

ATTRIBUTES = ("pixelate", "jpeg", "blur", "snow", "rain", "fog")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Args:
    out: str = "runs/reward"
    """output directory: config.json + model.safetensors (use as --reward custom:OUT), plots and reports."""
    overwrite: bool = False
    """replace the reward model already in --out (without it, a run refuses to write over one)."""
    data: str | None = None
    """a dataset: folder root/<class>/*.png (classification), CSV 'path,score' (regression; paths relative to
    the CSV), or a directory holding labels.csv. With --attribute: where the generated data is cached
    (default OUT/data)."""

    # --- generated data
    attribute: Literal["pixelate", "jpeg", "blur", "snow", "rain", "fog"] | None = None
    """generate data: apply this attribute at strength s in [0, 1] to source images; s is the label."""
    source: str = "animals_activities"
    """source images for --attribute: an image folder, or a prompt set (built-in name or text file) sampled
    with --pretrained."""
    pretrained: str = DEFAULT_PRETRAINED
    """diffusion model that makes the source images from a prompt set (hub id or local directory)."""
    num_source: int = 64
    """number of source images: generated from the prompt set (cycled), or taken from the folder (0 = all; at
    least 2, since validation holds out whole source images)."""
    variants: int = 8
    """transformed copies of each source image, each at its own strength."""
    levels: int = 0
    """0: strengths uniform in [0, 1] (regression); K >= 2: strengths on the K levels 0, 1/(K-1), ..., 1
    (classification; 2 = clean vs full strength)."""
    data_size: int = 128
    """side in pixels of the generated images (sources are resized and centre-cropped to it first)."""
    sample_steps: int = 25
    """DDIM steps when generating source images."""
    guidance: float = 7.5
    """CFG scale when generating source images."""
    resolution: int | None = None
    """resolution of generated source images, a multiple of 8 (default: the model's)."""
    only_make_data: bool = False
    """stop after making (or finding cached) data."""

    # --- model
    task: Literal["auto", "regression", "classification"] = "auto"
    """auto: classification for a folder, or for generated data with --levels >= 2; regression otherwise."""
    backbone: Literal["cnn", "clip"] = "cnn"
    """cnn: a small CNN trained from scratch (fully offline); clip: a frozen CLIP image encoder + trained head."""
    clip_model: str = "openai/clip-vit-large-patch14"
    """CLIPModel for --backbone clip (hub id or local directory)."""
    image_size: int = 64
    """CNN input side: images are resized to it in torch, in training and when used as a reward."""
    width: int = 32
    """CNN width (channels of its first stage)."""
    classes: str | None = None
    """classification: the class order, comma-separated. Default: sorted folder names / sorted distinct scores.
    A class's value (its reward in 'prediction' mode) is its name if numeric, else its position 0, 1, ..."""
    label_range: tuple[float, float] | None = None
    """regression: reject a dataset with a label outside [lo, hi] (names the file and line)."""

    # --- training
    epochs: int = 30
    """maximum number of epochs."""
    batch_size: int = 64
    """images per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    val_frac: float = 0.2
    """fraction held out for validation (generated data: whole source images, so no content leaks)."""
    patience: int = 5
    """early stopping: stop after this many epochs without a better validation loss; keep the best."""
    seed: int = 0
    """seeds data generation, the split, initialisation and batching (0 <= seed < 2**32)."""
    device: str = "auto"
    """auto: cuda if available, else cpu; or name one (cpu, cuda, cuda:N, mps)."""

    # --- reward value
    reward_mode: Literal["prediction", "target", "class_prob"] = "prediction"
    """prediction: the predicted strength / expected class value; target: -|prediction - target|;
    class_prob: probability of the class --target."""
    target: str | None = None
    """the target strength (reward mode target) or class name (class_prob)."""


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args) -> torch.device:
    """The flags on their own (no file read): one-line errors naming the flag and the fix. Returns the device.
    The groups run in this order, so a run with several wrong flags names the same one first every time."""
    validate_inputs(args)
    validate_numbers(args)
    validate_classes_and_target(args)
    return parse_device(args)


def validate_inputs(args: Args):
    """Where the data comes from: --data or --attribute given, no empty path or name, --only-make-data with
    something to make."""
    if args.attribute is None and args.data is None:
        raise ValueError("give --data (a folder, a CSV or a generated dataset) or --attribute (to generate one)")
    for flag, value in (("--out", args.out), ("--data", args.data), ("--source", args.source), ("--pretrained", args.pretrained),
                        ("--clip-model", args.clip_model), ("--classes", args.classes), ("--target", args.target)):  # fmt: skip
        if value is not None and not value.strip():  # Path("") is the working directory: never what was meant
            raise ValueError(f"{flag} is empty: give a value or leave the flag out")
    if args.attribute is None and args.only_make_data:
        raise ValueError("--only-make-data needs --attribute (what to generate)")


def validate_numbers(args: Args):
    """The numeric flags: counts >= 1, sizes, rates and fractions in range, so nothing fails mid-run on them."""
    if args.levels == 1 or args.levels < 0:
        raise ValueError(f"--levels must be 0 (continuous strengths) or >= 2, got {args.levels}")
    for flag, value in (("--variants", args.variants), ("--data-size", args.data_size), ("--sample-steps", args.sample_steps),
                        ("--image-size", args.image_size), ("--width", args.width), ("--epochs", args.epochs),
                        ("--batch-size", args.batch_size), ("--patience", args.patience)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.num_source < 0 or args.num_source == 1:
        raise ValueError(
            f"--num-source must be 0 (all) or >= 2 (validation holds out whole source images), got {args.num_source}"
        )
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ValueError(
            f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {args.resolution}"
        )
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise ValueError(
            f"--guidance must be a number >= 0 (<= 1 turns classifier-free guidance off), got {args.guidance}"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a number > 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    if not 0 < args.val_frac < 1:
        raise ValueError(f"--val-frac must be in (0, 1), got {args.val_frac}")
    if not 0 <= args.seed < 2**32:  # numpy's generators take no negative seed
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.label_range is not None and not args.label_range[0] < args.label_range[1]:
        raise ValueError(f"--label-range must be 'lo hi' with lo < hi, got {args.label_range}")


def validate_classes_and_target(args: Args):
    """--classes and --reward-mode/--target agree with each other (the dataset's own classes are checked later,
    in check_reward_mode and load_dataset)."""
    if args.classes is not None:
        names = [c.strip() for c in args.classes.split(",")]
        if "" in names or len(set(names)) < len(names) or len(names) < 2:
            raise ValueError(
                f"--classes must name at least two distinct classes, comma-separated, got '{args.classes}'"
            )
        if args.task == "regression":
            raise ValueError("--classes orders the classes of a classifier: drop it, or pass --task classification")
    if args.reward_mode in ("target", "class_prob") and args.target is None:
        raise ValueError(
            f"--reward-mode {args.reward_mode} needs --target (a strength for 'target', a class name for 'class_prob')"
        )
    if args.reward_mode == "prediction" and args.target is not None:
        raise ValueError(
            f"--target '{args.target}' is used only by --reward-mode target or class_prob: add one of them, or drop --target"
        )
    if args.reward_mode == "target":
        try:
            if not math.isfinite(float(args.target)):
                raise ValueError
        except ValueError:
            raise ValueError(f"--target must be a number for --reward-mode target, got '{args.target}'") from None


def parse_device(args: Args) -> torch.device:
    """--device as a torch.device that exists here (auto: cuda if available, else cpu)."""
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got '{args.device}'")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise ValueError(
            f"--device {args.device}: no such CUDA device here ({torch.cuda.device_count()} visible): use --device cpu or auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available here: use --device cpu or auto")
    return device


def check_out(args: Args):
    """--out must be a directory this run can make and write (not '', a file, under a file or a dangling
    symlink, unwritable) holding no other result: a trained reward model only with --overwrite
    (--only-make-data writes OUT/data alone, beside one), never a fine-tuning run or another script's
    result. Its data/ cache is its own and stays. The one rule every writer follows (rundir.py)."""
    rundir.check_writable(args.out, "--out")
    rundir.check_result_dir(args.out, "train_reward.py", args.overwrite or args.only_make_data, "--out", keep=("data",))


def claim_out(args: Args, data: Path):
    """Hold the folder this run writes, from before any model loads: --out (marked unfinished until the
    model is saved; an earlier model replaced with --overwrite, OUT/data kept), or with --only-make-data
    the data folder alone. One error line when another process holds it."""
    try:
        if args.only_make_data:
            return rundir.hold(data, "train_reward.py --only-make-data", "--data")
        return rundir.claim(args.out, "train_reward.py", args.overwrite, "--out", keep=("data",))
    except ValueError as e:
        fail(str(e))


def read_json(path: Path, flag: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise ValueError(
            f"{flag}: cannot read '{path}' ({type(e).__name__}): delete it or point {flag} elsewhere"
        ) from None


def generation_settings(args: Args) -> dict:
    """What generated data depends on (meta.json); data made with other settings is never reused."""
    return dict(attribute=args.attribute, source=args.source, pretrained=args.pretrained if not Path(args.source).is_dir() else None,
                num_source=args.num_source, variants=args.variants, levels=args.levels, data_size=args.data_size,
                sample_steps=args.sample_steps, guidance=args.guidance, resolution=args.resolution, seed=args.seed)  # fmt: skip


def check_generated(args: Args, root: Path) -> bool:
    """Before generating into `root`: True if it holds this very data already; else check the sources
    (folder images readable, prompt set readable) so that generation cannot fail half-way on them."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"--data '{root}' is a file; with --attribute it is the directory to cache generated data in")
    if (root / "meta.json").is_file():
        old, meta = read_json(root / "meta.json", "--data"), generation_settings(args)
        if old == meta and (root / "labels.csv").is_file():
            return True
        if old == meta:
            raise ValueError(
                f"--data '{root}' has meta.json but no labels.csv: delete '{root}' to generate the data again"
            )
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
        raise ValueError(
            f"--data '{root}' holds data made with other settings {diff}: pass another --data or delete it"
        )
    # An interrupted generation leaves only images/ (labels.csv and meta.json come last); anything else
    # is somebody's data that generating would write into.
    foreign = (
        sorted(p.name for p in root.iterdir() if p.name not in ("images", "labels.csv", ".lock"))
        if root.is_dir()
        else []
    )
    if foreign:
        raise ValueError(
            f"--data '{root}' holds other files ({foreign[0]}) and no generated dataset: with --attribute, pass a new or empty --data"
        )
    if Path(args.source).is_dir():
        paths = list_images(Path(args.source))
        paths = paths[: args.num_source] if args.num_source else paths
        if len(paths) < 2:
            raise ValueError(
                f"--source '{args.source}' has {len(paths)} image(s) ({', '.join(IMAGE_EXTS)}); it needs at least 2: add images or name a prompt set"
            )
        for p in paths:
            check_image(p, "--source")
        return False
    try:
        prompts = load_prompts(args.source, "--source")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"--source '{args.source}' is not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8"
        ) from None
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    except OSError as e:
        raise ValueError(
            f"--source: cannot read '{args.source}' ({type(e).__name__}): check the path and its permissions"
        ) from None
    if (args.num_source or len(prompts)) < 2:
        raise ValueError(
            f"--source '{args.source}' has 1 prompt: validation holds out whole source images, so pass --num-source >= 2 (prompts are cycled)"
        )
    return False


def generated_task(args: Args) -> dict:
    """The task the generated data will have (as load_dataset will find it), known before generating it."""
    task = args.task if args.task != "auto" else ("classification" if args.levels >= 2 else "regression")
    if task == "regression":
        return dict(task="regression")
    if args.levels < 2:
        raise ValueError(
            "--task classification on generated data needs --levels >= 2 (the strength levels are the classes)"
        )
    classes = [f"{k / (args.levels - 1):g}" for k in range(args.levels)]
    order = [c.strip() for c in args.classes.split(",")] if args.classes else classes
    if sorted(order) != sorted(classes):
        raise ValueError(
            f"--classes must be the {args.levels} strength levels {','.join(classes)} (in any order), got '{args.classes}'"
        )
    return dict(task="classification", classes=order)


def check_reward_mode(args: Args, task: dict):
    if task["task"] == "regression" and args.reward_mode == "class_prob":
        raise ValueError(
            "--reward-mode class_prob needs a classification task; use prediction or target for regression"
        )
    if task["task"] == "classification" and args.reward_mode == "class_prob" and args.target not in task["classes"]:
        raise ValueError(f"--target '{args.target}' is not a class; classes: {', '.join(task['classes'])}")


# ----------------------------------------------------------------------------------------------
# Generated data: an attribute applied at strength s in [0, 1]; s = 0 leaves the image unchanged.


def apply_attribute(img: np.ndarray, attribute: str, s: float, seed: int) -> np.ndarray:
    """uint8 H x W x 3 -> uint8 H x W x 3 with `attribute` at strength `s` (deterministic given seed)."""
    if s <= 0:
        return img
    size = img.shape[0]
    pil = Image.fromarray(img)
    if attribute == "pixelate":
        factor = 1 + s * 7  # block side from 1 to 8 pixels
        small = max(1, round(size / factor))
        return np.asarray(pil.resize((small, small), Image.BOX).resize((size, size), Image.NEAREST))
    if attribute == "jpeg":
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(round(95 - 90 * s)))  # quality 95 (s = 0) down to 5 (s = 1)
        return np.asarray(Image.open(buf).convert("RGB"))
    if attribute == "blur":
        from PIL import ImageFilter

        return np.asarray(pil.filter(ImageFilter.GaussianBlur(radius=s * 0.04 * size)))  # sigma up to 4% of the side
    import albumentations as A

    # The weather effects at a fixed full strength, blended in with opacity s: continuous, monotone,
    # and the identity at s = 0 (albumentations' own intensity knobs are neither).
    effect = {
        "snow": lambda: A.RandomSnow(
            snow_point_range=(0.3, 0.3), brightness_coeff=2.5, method="bleach", p=1.0
        ),  # "texture" leaves black blotches
        "rain": lambda: A.RandomRain(rain_type="heavy", brightness_coefficient=0.8, p=1.0),
        "fog": lambda: A.RandomFog(fog_coef_range=(0.8, 0.8), alpha_coef=0.1, p=1.0),
    }[attribute]()
    effect.set_random_seed(seed)
    full = effect(image=img)["image"].astype(np.float32)
    return np.clip(np.round((1 - s) * img + s * full), 0, 255).astype(np.uint8)


def center_square(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    side = min(w, h)
    img = img.convert("RGB").crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    return np.asarray(img.resize((size, size), Image.BICUBIC))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS)


def source_images(args: Args, device) -> list[np.ndarray]:
    """Clean images at data_size: from an image folder, or sampled from a prompt set with our loader."""
    if Path(args.source).is_dir():  # check_generated has seen at least two images with readable headers
        paths = list_images(Path(args.source))
        paths = paths[: args.num_source] if args.num_source else paths
        out = []
        for p in paths:
            try:
                out.append(center_square(Image.open(p), args.data_size))
            except Exception as e:  # corrupt past its header
                fail(str(image_error(p, "--source", e)))
        return out

    from diffusion import load_pipeline

    prompts = load_prompts(args.source, "--source")
    n = args.num_source or len(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(n)]
    from diffusers.utils import logging as diffusers_logging

    # With HF_HUB_OFFLINE set, diffusers logs "Couldn't connect to the Hub ... Will try to load from local
    # cache" on every load, cached or not; a missing checkpoint gets from_pretrained's one line instead.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe = load_pipeline(
            args.pretrained, device=device, dtype=torch.float16 if device.type == "cuda" else torch.float32
        )
    finally:
        diffusers_logging.set_verbosity(verbosity)
    out = []
    for start in tqdm(range(0, n, 8), desc="source images"):
        batch = prompts[start : start + 8]
        gen = torch.Generator("cpu").manual_seed(args.seed * 100003 + start)  # same images whatever the device
        images = pipe(prompt=batch, num_inference_steps=args.sample_steps, guidance_scale=args.guidance, generator=gen,
                      height=args.resolution, width=args.resolution, output_type="np").images  # fmt: skip
        out += [center_square(Image.fromarray((im * 255).round().astype(np.uint8)), args.data_size) for im in images]
    del pipe
    return out


def make_data(args: Args, device, root: Path):
    """Generate the dataset in `root`: images/*.png, labels.csv (path,score,group), meta.json.
    check_generated has vetted `root` and the sources."""
    sources = source_images(args, device)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(tqdm(sources, desc=f"applying {args.attribute}")):
        for v in range(args.variants):
            rng = np.random.default_rng([args.seed, i, v])  # each sample its own stream: order-independent
            s = float(rng.integers(args.levels)) / (args.levels - 1) if args.levels else float(rng.random())
            name = f"images/{i:05d}_{v}.png"
            Image.fromarray(apply_attribute(img, args.attribute, s, int(rng.integers(2**31)))).save(root / name)
            rows.append((name, f"{s:.6g}", str(i)))
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "score", "group"), *rows])
    (root / "meta.json").write_text(
        json.dumps(generation_settings(args), indent=2)
    )  # written last: marks the cache complete
    print(f"wrote {len(rows)} images of {args.attribute} to {root}")


# ----------------------------------------------------------------------------------------------
# Datasets: (paths, labels, groups, classes) from a folder or a CSV, with errors naming file and line.


def image_error(path: Path, where: str, e: Exception) -> ValueError:
    return ValueError(
        f"{where}: cannot read image '{path}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): replace or remove it"
    )


def check_image(path: Path, where: str):
    """Open the header only: cheap, and catches missing files, non-images and unreadable files before any
    model loads. A file corrupt further in still fails in read_image, with the same one-line message."""
    try:
        with Image.open(path):
            pass
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise image_error(path, where, e) from None


def read_image(path: Path, where: str) -> torch.Tensor:
    """3 x H x W float in [0, 1]."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:
        raise image_error(path, where, e) from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255


def load_folder(root: Path, class_order: list[str] | None):
    """root/<class>/*.png -> (paths, class indices, groups, classes)."""
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if stray:
        raise ValueError(
            f"--data '{root}': image '{stray[0]}' lies outside a class folder; arrange images as {root}/<class>/*.png"
        )
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(dirs) < 2:
        raise ValueError(
            f"--data '{root}': a folder dataset needs at least two class folders ({root}/<class>/*.png), found {dirs}"
        )
    classes = class_order or dirs
    unknown = sorted(set(dirs) - set(classes))
    if unknown:
        raise ValueError(f"--data '{root}': folder '{unknown[0]}' is not one of --classes {classes}")
    paths, labels = [], []
    for k, c in enumerate(classes):
        if not (root / c).is_dir():
            raise ValueError(f"--classes: '{c}' has no folder in '{root}'")
        files = list_images(root / c)
        if not files:
            raise ValueError(f"--data '{root}': class folder '{c}' has no images ({', '.join(IMAGE_EXTS)})")
        for f in files:
            check_image(f, f"--data '{root}'")
        paths += files
        labels += [k] * len(files)
    return paths, labels, [str(p) for p in paths], classes


def load_csv(csv_path: Path, label_range):
    """CSV with columns path,score (and optionally group) -> (paths, scores, groups, 'file line N' of each)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets' "CSV UTF-8" starts with a BOM
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ValueError(f"--data {csv_path} line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}): give a CSV path,score "
                         "saved as UTF-8") from None  # fmt: skip
    except csv.Error as e:
        raise ValueError(f"--data {csv_path}: not a CSV ({e}): give a CSV with columns path,score") from None
    except OSError as e:
        raise ValueError(
            f"--data: cannot read '{csv_path}' ({type(e).__name__}): check the path and its permissions"
        ) from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "path" not in header or "score" not in header:
        raise ValueError(
            f"--data {csv_path} line 1: the header must name the columns 'path' and 'score', got {','.join(header) or 'an empty file'}"
        )
    ip, isc, ig = header.index("path"), header.index("score"), header.index("group") if "group" in header else None
    paths, scores, groups, origins = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < len(header):
            raise ValueError(
                f"--data {csv_path} line {line}: expected {len(header)} columns ({','.join(header)}), got {len(row)}"
            )
        try:
            score = float(row[isc])
        except ValueError:
            raise ValueError(f"--data {csv_path} line {line}: score '{row[isc]}' is not a number") from None
        if not math.isfinite(score):
            raise ValueError(f"--data {csv_path} line {line}: score '{row[isc]}' is not finite")
        if label_range is not None and not label_range[0] <= score <= label_range[1]:
            raise ValueError(
                f"--data {csv_path} line {line}: score {score:g} is outside --label-range [{label_range[0]:g}, {label_range[1]:g}]"
            )
        path = Path(row[ip].strip())
        path = path if path.is_absolute() else csv_path.parent / path
        if not path.is_file():
            raise ValueError(
                f"--data {csv_path} line {line}: image '{path}' does not exist (relative paths start at the CSV's folder): fix the path or drop the line"
            )
        check_image(path, f"--data {csv_path} line {line}")
        paths.append(path)
        scores.append(score)
        groups.append(row[ig] if ig is not None else str(line))
        origins.append(f"--data {csv_path} line {line}")
    if len(paths) < 2:
        raise ValueError(f"--data {csv_path}: needs at least two labelled images, found {len(paths)}")
    return paths, scores, groups, origins


def load_dataset(args: Args, data: Path):
    """(paths, targets, groups, where each came from, task description for config.json, dataset name)."""
    csv_path = data if data.is_file() else data / "labels.csv"
    meta = read_json(data / "meta.json", "--data") if data.is_dir() and (data / "meta.json").is_file() else {}
    order = [c.strip() for c in args.classes.split(",")] if args.classes else None
    if csv_path.is_file():
        paths, scores, groups, origins = load_csv(csv_path, args.label_range)
        task = args.task if args.task != "auto" else ("classification" if meta.get("levels", 0) >= 2 else "regression")
        if task == "regression":
            return paths, scores, groups, origins, dict(task="regression"), str(csv_path)
        classes = order or [f"{s:g}" for s in sorted(set(scores))]
        missing = sorted({f"{s:g}" for s in scores} - set(classes))
        if missing:
            raise ValueError(f"--data {csv_path}: score {missing[0]} is not one of --classes {classes}")
        extra = [c for c in classes if c not in {f"{s:g}" for s in scores}]
        if extra:
            raise ValueError(
                f"--classes: '{extra[0]}' is not a score in {csv_path}; the classes of a CSV are its distinct scores"
            )
        labels = [classes.index(f"{s:g}") for s in scores]
        values = [float(c) for c in classes]
        return (
            paths,
            labels,
            groups,
            origins,
            dict(task="classification", classes=classes, class_values=values),
            str(csv_path),
        )
    if not data.is_dir():
        raise ValueError(
            f"--data '{data}' does not exist: give a folder root/<class>/*.png, a CSV path,score or a directory holding labels.csv"
        )
    if args.task == "regression":
        raise ValueError(f"--task regression needs a CSV 'path,score'; '{data}' is a folder dataset (classification)")
    paths, labels, groups, classes = load_folder(data, order)
    try:
        values = [float(c) for c in classes]
    except ValueError:
        values = [float(k) for k in range(len(classes))]
    origins = [f"--data '{data}'"] * len(paths)
    return paths, labels, groups, origins, dict(task="classification", classes=classes, class_values=values), str(data)


def prepare(args: Args, data: Path):
    """load_dataset, the checks that need the dataset, and the train/val split; all before any model loads."""
    paths, targets, groups, origins, task, source = load_dataset(args, data)
    check_reward_mode(args, task)
    if len(set(targets)) < 2:  # a classifier's targets are class indices: name the class, not its index
        if task["task"] == "classification":
            found = f"every label is {task['classes'][targets[0]]} (a single class)"
        else:
            found = f"every label is {targets[0]:g}"
        raise ValueError(f"--data {source}: {found}: a reward model needs labels that differ")
    if len(set(groups)) < 2:
        raise ValueError(
            f"--data {source}: all images share one group: validation holds out whole groups, so give at least two"
        )
    train_idx, val_idx = split(groups, args.val_frac, args.seed)
    if task["task"] == "classification" and len({targets[i] for i in train_idx}) < 2:
        raise ValueError(
            f"--data {source}: the training split has a single class: add images of the other classes or lower --val-frac"
        )
    return paths, targets, origins, task, source, train_idx, val_idx


def split(groups: list[str], val_frac: float, seed: int):
    """Train/val indices, whole groups (source images) on one side; at least one group each side."""
    unique = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(unique))
    n_val = min(len(unique) - 1, max(1, round(val_frac * len(unique))))
    val_groups = {unique[i] for i in perm[:n_val]}
    val = [i for i, g in enumerate(groups) if g in val_groups]
    train = [i for i, g in enumerate(groups) if g not in val_groups]
    return train, val


# ----------------------------------------------------------------------------------------------
# Training.


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 and ra.std() > 0 and rb.std() > 0 else float("nan")


def plot_report(out: Path, history: list[dict], config: dict, val_labels: np.ndarray, val_pred: np.ndarray):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ep = [h["epoch"] for h in history]
    axes[0].plot(ep, [h["train_loss"] for h in history], label="train")
    axes[0].plot(ep, [h["val_loss"] for h in history], label="validation")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("MSE (standardised labels)" if config["task"] == "regression" else "cross-entropy")
    axes[0].legend()
    axes[0].set_title("learning curve")
    if config["task"] == "regression":
        axes[1].scatter(val_labels, val_pred, s=8, alpha=0.6)
        lo, hi = float(min(val_labels.min(), val_pred.min())), float(max(val_labels.max(), val_pred.max()))
        axes[1].plot([lo, hi], [lo, hi], "k--", lw=1)
        axes[1].set_xlabel("label")
        axes[1].set_ylabel("prediction")
        axes[1].set_title("validation: prediction vs label")
    else:
        k = len(config["classes"])
        cm = np.zeros((k, k), dtype=int)
        for t, p in zip(val_labels.astype(int), val_pred.astype(int)):
            cm[t, p] += 1
        axes[1].imshow(cm, cmap="Blues")
        for (t, p), n in np.ndenumerate(cm):
            axes[1].text(p, t, str(n), ha="center", va="center")
        axes[1].set_xticks(range(k), config["classes"])
        axes[1].set_yticks(range(k), config["classes"])
        axes[1].set_xlabel("predicted class")
        axes[1].set_ylabel("true class")
        axes[1].set_title("validation confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The steps of a run, in the order main() takes them.


def check(args: Args, data: Path):
    """Everything that can be checked before any model is loaded or anything is written: the flags, --out,
    the dataset (or, for data still to generate, its sources) and --clip-model; a wrong one exits with one
    'error:' line. Returns (device, whether the generated data is cached, the prepared dataset or None)."""
    dataset, cached = None, False
    try:
        device = validate(args)
        check_out(args)
        if args.attribute:
            cached = check_generated(args, data)
            if not cached:  # the data does not exist yet: check the reward mode against the task it will have
                check_reward_mode(args, generated_task(args))
            if not cached and not Path(args.source).is_dir():  # images from a prompt set: the model must be there
                check_checkpoints([("--pretrained", args.pretrained, ("model_index.json",))])
        if (cached or not args.attribute) and not args.only_make_data:
            dataset = prepare(args, data)
        if args.backbone == "clip" and not args.only_make_data:
            from transformers import CLIPConfig

            from_pretrained(CLIPConfig, args.clip_model, "--clip-model")  # config.json only: is the checkpoint there?
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    return device, cached, dataset


def make_data_unless_cached(args: Args, device, data: Path, cached: bool):
    """With --attribute, generate the dataset into `data` unless check() found it there already; a given
    --data needs nothing here."""
    if cached:
        print(f"using cached dataset {data} ({args.attribute})")
    elif args.attribute:
        try:
            make_data(args, device, data)
        except CheckpointError as e:  # --pretrained missing (offline, wrong id or directory)
            fail(str(e))


def prepare_generated(args: Args, data: Path):
    """prepare() on the data generated just now (check() could not see it yet): the same checks and split."""
    try:
        return prepare(args, data)
    except ValueError as e:
        fail(str(e))


def build_model(args: Args, task: dict, source: str, device):
    """The reward's config (what rewards.py needs to rebuild and score it) and its network, initialised from
    --seed. Returns (config, network)."""
    config = dict(**task, backbone=args.backbone, image_size=args.image_size, width=args.width,
                  reward_mode=args.reward_mode, target=args.target, data=source, attribute=args.attribute)  # fmt: skip
    if args.backbone == "clip":
        config["clip_model"] = args.clip_model

    torch.manual_seed(args.seed)
    try:
        net = build_custom_network(config).to(device)
    except CheckpointError as e:  # a --clip-model with config.json but no weights
        fail(str(e))
    if args.backbone == "clip":  # CLIP's input size is its own, not --image-size
        config["image_size"] = net.clip.config.vision_config.image_size
    return config, net


def embed_images(args: Args, net, config: dict, paths: list[Path], origins: list[str], device) -> torch.Tensor:
    """Every image as the model's input, read once: through the very preprocessing the reward applies
    (rewards.custom_preprocess), and with the frozen CLIP backbone its normalised embedding, so that only
    the head is trained."""
    feats, chunk = [], []
    bar = tqdm(paths, desc="loading images")
    for i, p in enumerate(bar):
        try:
            image = read_image(p, origins[i])
        except ValueError as err:  # corrupt past the header that prepare() checked
            bar.close()  # the error on a line of its own
            fail(str(err))
        chunk.append(custom_preprocess(image[None], config)[0])
        if len(chunk) == 32 or i == len(paths) - 1:
            x = torch.stack(chunk).to(device)
            if args.backbone == "clip":
                with torch.no_grad():
                    e = net.clip.get_image_features(pixel_values=x).pooler_output
                    x = e / e.norm(dim=-1, keepdim=True)
            feats.append(x.cpu())
            chunk = []
    return torch.cat(feats)


def training_tensors(config: dict, X: torch.Tensor, targets: list, train_idx: list[int], val_idx: list[int], device):
    """The train and validation tensors and the loss. Regression labels are standardised with the training
    split's mean and std, which go into the config (the reward undoes them). Returns (Xtr, ytr, Xva, yva, loss_fn)."""
    if config["task"] == "regression":
        y_all = torch.tensor(targets, dtype=torch.float32)
        mean, std = y_all[train_idx].mean().item(), y_all[train_idx].std().item() or 1.0
        config.update(label_mean=mean, label_std=std)
        y = (y_all - mean) / std
        loss_fn = lambda out, t: F.mse_loss(out.squeeze(-1), t)  # noqa: E731
    else:
        y = torch.tensor(targets, dtype=torch.long)
        loss_fn = F.cross_entropy
    return X[train_idx].to(device), y[train_idx].to(device), X[val_idx].to(device), y[val_idx].to(device), loss_fn


def predict(model, X: torch.Tensor) -> torch.Tensor:
    """The model's outputs on X, in batches of 256, without gradients."""
    with torch.no_grad():
        return torch.cat([model(xb) for xb in X.split(256)])


def train_epoch(
    args: Args, model, opt, loss_fn, Xtr: torch.Tensor, ytr: torch.Tensor, gen: torch.Generator, device
) -> float:
    """One pass over the training split in a random order (drawn from `gen`), with random horizontal flips for
    the CNN. Returns the loss summed over the images."""
    model.train()
    total = 0.0
    for b in torch.randperm(len(Xtr), generator=gen).split(args.batch_size):
        x, t = Xtr[b.to(device)], ytr[b.to(device)]
        if args.backbone == "cnn":  # horizontal flips change none of the attributes
            flip = torch.rand(len(x), generator=gen).to(device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = loss_fn(model(x), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(b)
    return total


def train(args: Args, model, config: dict, loss_fn, Xtr, ytr, Xva, yva, device) -> list[dict]:
    """AdamW for up to --epochs, one line per epoch, stopping after --patience epochs without a better
    validation loss; leaves the model with its best weights, in eval mode. Returns the per-epoch history."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    history, best, best_state, bad_epochs = [], float("inf"), None, 0
    print(f"{config['task']} on {len(Xtr)} train / {len(Xva)} val images, backbone {args.backbone}, device {device}")
    bar = tqdm(range(1, args.epochs + 1), desc="epochs")
    for epoch in bar:
        t0 = time.time()
        total = train_epoch(args, model, opt, loss_fn, Xtr, ytr, gen, device)
        model.eval()
        out_va = predict(model, Xva)
        val_loss = loss_fn(out_va, yva).item()
        h = dict(epoch=epoch, train_loss=total / len(Xtr), val_loss=val_loss, seconds=time.time() - t0)
        if config["task"] == "regression":
            h["val_mse"] = val_loss * config["label_std"] ** 2  # in label units
        else:
            h["val_acc"] = (out_va.argmax(-1) == yva).float().mean().item()
        history.append(h)
        metric = f"val MSE {h['val_mse']:.4f}" if "val_mse" in h else f"val acc {h['val_acc']:.3f}"
        tqdm.write(
            f"epoch {epoch:3d}  train loss {h['train_loss']:.4f}  val loss {val_loss:.4f}  {metric}  ({h['seconds']:.1f}s)"
        )
        bar.set_postfix(val_loss=f"{val_loss:.4f}")
        if val_loss < best - 1e-6:
            best, best_state, bad_epochs = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            bad_epochs += 1
            if bad_epochs >= args.patience:
                tqdm.write(f"early stop: no better validation loss for {args.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    return history


def evaluate(model, config: dict, Xva, paths, targets, train_idx, val_idx, history: list[dict]):
    """The validation report with the best weights, in the reward's own terms (labels, not standardised
    values or class indices), against a trivial baseline; prints its line. Returns (raw outputs, metrics,
    labels, predictions, the val_predictions.csv table)."""
    out_va = predict(model, Xva).cpu()
    val_paths = [str(paths[i]) for i in val_idx]
    labels = np.array([targets[i] for i in val_idx])
    if config["task"] == "regression":
        pred = (out_va.squeeze(-1) * config["label_std"] + config["label_mean"]).numpy()
        train_mean = float(np.mean([targets[i] for i in train_idx]))
        metrics = dict(val_mse=float(np.mean((pred - labels) ** 2)), baseline_mse=float(np.mean((train_mean - labels) ** 2)),
                       val_spearman=spearman(pred, labels))  # fmt: skip
        print(
            f"validation MSE {metrics['val_mse']:.4f} vs {metrics['baseline_mse']:.4f} predicting the training mean; Spearman {metrics['val_spearman']:.3f}"
        )
        table = [
            ("path", "label", "prediction"),
            *((p, f"{lab:g}", f"{q:.4f}") for p, lab, q in zip(val_paths, labels, pred)),
        ]
    else:
        classes = config["classes"]
        probs = out_va.softmax(-1).numpy()
        pred = probs.argmax(-1)
        counts = np.bincount([targets[i] for i in train_idx], minlength=len(classes))
        metrics = dict(val_acc=float((pred == labels).mean()), majority_acc=float((labels == counts.argmax()).mean()),
                       chance_acc=1.0 / len(classes))  # fmt: skip
        print(
            f"validation accuracy {metrics['val_acc']:.3f} (majority class {metrics['majority_acc']:.3f}, chance {metrics['chance_acc']:.3f})"
        )
        table = [("path", "label", "prediction", *(f"p_{c}" for c in classes))]
        table += [
            (p, classes[lab], classes[q], *(f"{x:.4f}" for x in pr))
            for p, lab, q, pr in zip(val_paths, labels, pred, probs)
        ]
    metrics.update(best_epoch=int(min(history, key=lambda h: h["val_loss"])["epoch"]), epochs_run=len(history),
                   n_train=len(train_idx), n_val=len(val_idx))  # fmt: skip
    return out_va, metrics, labels, pred, table


def save_model(args: Args, model, config: dict, metrics: dict, out_va: torch.Tensor) -> Path:
    """config.json + model.safetensors in --out, what `--reward custom:OUT` loads; the config carries the
    metrics and every flag. The reward value is computed once first, so a config it cannot score (e.g. a
    class_prob target that is not a class) fails here, not in fine-tuning. Returns the directory."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config["metrics"] = metrics
    config["args"] = {k: v for k, v in asdict(args).items()}
    custom_value(out_va[:1], config)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def report(out: Path, config: dict, history: list[dict], table: list[tuple], labels: np.ndarray, pred: np.ndarray):
    """The rest of --out, for people: validation predictions against labels, the history, the learning curve;
    then the line saying how to use the model."""
    with open(out / "val_predictions.csv", "w", newline="") as f:
        csv.writer(f).writerows(table)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    plot_report(out, history, config, labels, pred)
    print(f"saved reward model to {out}: use it with --reward custom:{out}")


def main(args: Args) -> dict:
    """Check, make (or find) the data, load it, build the model, embed the images, train, evaluate, save,
    report. Returns the validation metrics ({'data': DIR} with --only-make-data)."""
    data = Path(args.data) if args.data else Path(args.out) / "data"
    device, cached, dataset = check(args, data)
    with claim_out(args, data) as held:  # --out (or the data folder) held until the end: one writer at a time
        make_data_unless_cached(args, device, data, cached)
        if args.only_make_data:
            return {"data": str(data)}
        if dataset is None:  # generated just now
            dataset = prepare_generated(args, data)
        paths, targets, origins, task, source, train_idx, val_idx = dataset
        config, net = build_model(args, task, source, device)
        X = embed_images(args, net, config, paths, origins, device)
        model = net.head if args.backbone == "clip" else net
        Xtr, ytr, Xva, yva, loss_fn = training_tensors(config, X, targets, train_idx, val_idx, device)
        history = train(args, model, config, loss_fn, Xtr, ytr, Xva, yva, device)
        out_va, metrics, labels, pred, table = evaluate(model, config, Xva, paths, targets, train_idx, val_idx, history)
        out = save_model(args, model, config, metrics, out_va)
        report(out, config, history, table, labels, pred)
        rundir.finish(held)  # the model is complete: marked so, and --out is released
    return metrics


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
