"""train_reward.py on CPU, offline: generated data, folder/CSV datasets, training, and custom:DIR rewards.

Source images are procedural (gradients, smooth noise, fine grain, shapes), made here, so nothing is
downloaded; one test makes source images with the tiny SD pipeline through our loader.
"""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import rewards
import train_reward as tr
from conftest import ROOT


def procedural_images(folder, n, size=32, seed=0):
    """Random scenes: a colour gradient, smooth noise, fine grain (like fur or foliage), and shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c0, c1, angle = rng.random(3), rng.random(3), rng.random() * 2 * np.pi
        t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
        coarse = Image.fromarray((rng.random((max(2, size // 8),) * 2 + (3,)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        img = 0.7 * (c0 * (1 - t) + c1 * t) + 0.3 * np.asarray(coarse) / 255
        img = img + rng.uniform(0.03, 0.15) * rng.standard_normal((size, size, 1))
        pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        for _ in range(rng.integers(2, 6)):
            (x0, y0), (w, h) = rng.integers(0, size, 2), rng.integers(3, size // 2, 2)
            color = tuple(int(v) for v in rng.integers(0, 256, 3))
            [draw.ellipse, draw.rectangle][int(rng.integers(2))]([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
        pil.save(folder / f"{i:04d}.png")
    return folder


def as_tensor(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return procedural_images(tmp_path_factory.mktemp("sources"), 60, size=32)


@pytest.fixture(scope="module")
def pixelate_model(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixelate")
    args = tr.Args(attribute="pixelate", source=str(sources), num_source=60, variants=8, data_size=32, image_size=32, width=16,
                   epochs=20, batch_size=16, patience=8, data=str(root / "data"), out=str(root / "model"))  # fmt: skip
    return root, args, tr.main(args)


def test_pixelate_regressor_beats_predicting_the_mean(pixelate_model):
    root, args, metrics = pixelate_model
    # Measured: see the report printed by -s. Over four other data seeds the ratio val MSE / MSE of
    # predicting the training mean was 0.13-0.44; demand at least a halving.
    print(metrics)
    assert metrics["n_train"] == 384 and metrics["n_val"] == 96
    assert metrics["val_mse"] < 0.5 * metrics["baseline_mse"]
    assert metrics["val_spearman"] > 0.6
    out = root / "model"
    for name in ("config.json", "model.safetensors", "learning_curve.png", "val_predictions.csv", "history.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "val_predictions.csv")))
    assert len(rows) == 96 and set(rows[0]) == {"path", "label", "prediction"}


def test_custom_reward_ranks_more_pixelated_higher_and_gives_gradients(pixelate_model, tmp_path):
    root, _, _ = pixelate_model
    reward = rewards.load_reward(f"custom:{root / 'model'}")
    assert reward.differentiable
    clean = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(procedural_images(tmp_path / "new", 10, seed=123).glob("*.png"))]
    strengths = (0.1, 0.5, 0.9)
    with torch.no_grad():
        scores = torch.stack([reward(as_tensor([tr.apply_attribute(im, "pixelate", s, 0) for im in clean]), [""] * 10)[0] for s in strengths])
    assert (scores[2] > scores[0]).float().mean() >= 0.8  # per image: heavy pixelation above light
    assert scores[0].mean() < scores[1].mean() < scores[2].mean()
    # Differentiable all the way to the pixels, at a resolution other than the model's.
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    total, comps = reward(images, ["a", "b"])
    total.sum().backward()
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    # The 'target' mode is -|prediction - target|, computed from the same prediction.
    towards = rewards.load_reward(f"custom:{root / 'model'}", custom_mode="target", custom_target=0.5)
    with torch.no_grad():
        torch.testing.assert_close(towards(images, ["a", "b"])[0], -(comps[f"custom:{root / 'model'}"] - 0.5).abs())


def test_snow_classifier_beats_chance(sources, tmp_path):
    args = tr.Args(attribute="snow", levels=2, source=str(sources), num_source=40, variants=4, data_size=32, image_size=32, width=16,
                   epochs=15, batch_size=16, data=str(tmp_path / "data"), out=str(tmp_path / "model"), reward_mode="class_prob", target="1")  # fmt: skip
    metrics = tr.main(args)
    print(metrics)  # measured over four other data seeds: 0.875-1.0 validation accuracy (chance 0.5)
    assert metrics["chance_acc"] == 0.5 and metrics["n_val"] == 32
    assert metrics["val_acc"] >= 0.85
    reward = rewards.load_reward(f"custom:{tmp_path / 'model'}")
    img = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(sources.glob("*.png"))[40:48]]
    with torch.no_grad():
        p_clean, _ = reward(as_tensor(img), [""] * 8)
        p_snow, _ = reward(as_tensor([tr.apply_attribute(im, "snow", 1.0, 3) for im in img]), [""] * 8)
    assert ((p_clean >= 0) & (p_clean <= 1)).all() and (p_snow > p_clean).float().mean() >= 0.8


def test_generated_data_is_deterministic_and_cached(sources, tmp_path, capsys):
    kw = dict(attribute="rain", source=str(sources), num_source=4, variants=3, data_size=32, only_make_data=True, seed=7)
    tr.main(tr.Args(**kw, data=str(tmp_path / "a")))
    tr.main(tr.Args(**kw, data=str(tmp_path / "b")))
    labels = (tmp_path / "a" / "labels.csv").read_text()
    assert labels == (tmp_path / "b" / "labels.csv").read_text() and len(labels.splitlines()) == 13
    for row in list(csv.DictReader(open(tmp_path / "a" / "labels.csv"))):
        assert (tmp_path / "a" / row["path"]).read_bytes() == (tmp_path / "b" / row["path"]).read_bytes()
        assert 0 <= float(row["score"]) <= 1
    capsys.readouterr()
    tr.main(tr.Args(**kw, data=str(tmp_path / "a")))
    assert "using cached dataset" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--data '.*a' holds data made with other settings \{'seed': \(7, 8\)\}: pass another --data or delete it"):
        tr.main(tr.Args(**{**kw, "seed": 8}, data=str(tmp_path / "a")))


def test_every_attribute_is_identity_at_zero_and_grows_with_strength(sources):
    img = np.asarray(Image.open(sorted(sources.glob("*.png"))[0]).convert("RGB"))
    for attribute in tr.ATTRIBUTES:
        assert np.array_equal(tr.apply_attribute(img, attribute, 0.0, 1), img)
        change = [np.abs(tr.apply_attribute(img, attribute, s, 1).astype(float) - img).mean() for s in (0.2, 1.0)]
        assert 0 < change[0] < change[1], (attribute, change)


def test_source_images_from_a_prompt_set_through_the_pipeline(tiny_sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog riding a bike\n")
    args = tr.Args(attribute="jpeg", source=str(prompts), pretrained=str(tiny_sd_dir), num_source=3, variants=2, sample_steps=2,
                   data_size=32, data=str(tmp_path / "data"), only_make_data=True)  # fmt: skip
    tr.main(args)
    rows = list(csv.DictReader(open(tmp_path / "data" / "labels.csv")))
    assert len(rows) == 6 and [r["group"] for r in rows] == ["0", "0", "1", "1", "2", "2"]
    assert Image.open(tmp_path / "data" / rows[0]["path"]).size == (32, 32)


def write_folder(root, classes, n=4, size=16):
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((size, size, 3), 60 * k + 5 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_dataset_with_clip_backbone_trains_and_loads(tmp_path):
    from tiny_rewards import make_tiny_clip

    data = write_folder(tmp_path / "data", ["light", "heavy", "none"], n=4)
    paths, labels, groups, origins, task, _ = tr.load_dataset(tr.Args(data=str(data), classes="none,light,heavy"), data)
    assert task == dict(task="classification", classes=["none", "light", "heavy"], class_values=[0.0, 1.0, 2.0])
    assert labels == [0] * 4 + [1] * 4 + [2] * 4 and paths[0].parent.name == "none"
    clip = make_tiny_clip(tmp_path / "clip")
    args = tr.Args(data=str(data), backbone="clip", clip_model=str(clip), epochs=2, val_frac=0.25, out=str(tmp_path / "model"))
    metrics = tr.main(args)
    assert metrics["n_val"] == 3 and 0 <= metrics["val_acc"] <= 1
    cfg = rewards.load_custom_model(tmp_path / "model")[1]
    assert cfg["image_size"] == 32 and cfg["clip_model"] == str(clip)
    reward = rewards.load_reward(f"custom:{tmp_path / 'model'}")
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    score, _ = reward(images, ["", ""])  # expected class value, in [0, 2]
    score.sum().backward()
    assert ((score >= 0) & (score <= 2)).all() and images.grad.abs().sum() > 0


def test_csv_dataset_loads_with_relative_paths(tmp_path):
    write_folder(tmp_path, ["imgs"], n=3)
    (tmp_path / "scores.csv").write_text("path,score\nimgs/0.png,1.5\nimgs/1.png,7\n\n" + f"{tmp_path / 'imgs' / '2.png'},3\n")
    paths, scores, groups, origins, task, _ = tr.load_dataset(tr.Args(data=str(tmp_path / "scores.csv")), tmp_path / "scores.csv")
    assert task == dict(task="regression") and scores == [1.5, 7.0, 3.0]
    assert paths[0] == tmp_path / "imgs" / "0.png" and origins[2] == f"{tmp_path / 'scores.csv'} line 5"


@pytest.mark.parametrize(
    "case, message",
    [
        ("stray", r"--data '.*': image 'x.png' lies outside a class folder; arrange images as .*/<class>/\*.png"),
        ("one_class", r"--data '.*': a folder dataset needs at least two class folders .*found \['a'\]"),
        ("empty_class", r"--data '.*': class folder 'b' has no images"),
        ("unreadable", r"folder dataset '.*': cannot read image '.*b/bad.png' \(UnidentifiedImageError"),
        ("csv_columns", r"scores.csv line 1: the header must name the columns 'path' and 'score', got file,value"),
        ("csv_score", r"scores.csv line 3: score 'abc' is not a number"),
        ("csv_range", r"scores.csv line 3: score 1.5 is outside --label-range \[0, 1\]"),
        ("csv_short", r"scores.csv line 3: expected 2 columns \(path,score\), got 1"),
        ("csv_unreadable", r"scores.csv line 3: cannot read image '.*bad.png'"),
        ("not_a_class", r"--data '.*': folder 'b' is not one of --classes \['a', 'c'\]"),
    ],
)
def test_bad_datasets_name_the_file_and_line(case, message, tmp_path):
    data = tmp_path / "data"
    target = data
    if case.startswith("csv"):
        write_folder(data, ["imgs"], n=2)
        (data / "bad.png").write_text("not an image")
        second = {"csv_score": "imgs/1.png,abc", "csv_range": "imgs/1.png,1.5", "csv_short": "imgs/1.png", "csv_unreadable": "bad.png,0.5"}.get(case, "imgs/1.png,0.5")
        header = "file,value" if case == "csv_columns" else "path,score"
        (data / "scores.csv").write_text(f"{header}\nimgs/0.png,0.2\n{second}\n")
        target = data / "scores.csv"
    else:
        write_folder(data, ["a"] if case == "one_class" else ["a", "b"])
        if case == "stray":
            Image.new("RGB", (8, 8)).save(data / "x.png")
        elif case == "empty_class":
            for p in (data / "b").iterdir():
                p.unlink()
        elif case == "unreadable":
            (data / "b" / "bad.png").write_bytes(b"\x89PNG broken")
    args = tr.Args(data=str(target), label_range=(0.0, 1.0) if case == "csv_range" else None, classes="a,c" if case == "not_a_class" else None,
                   epochs=1, out=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(ValueError, match=message) as e:
        tr.main(args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written for a bad dataset


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(), "give --data (a folder, a CSV or a generated dataset) or --attribute (to generate one)"),
        (dict(attribute="snow", levels=1), "--levels must be 0 (continuous strengths) or >= 2, got 1"),
        (dict(data="x", val_frac=1.5), "--val-frac must be in (0, 1), got 1.5"),
        (dict(data="x", reward_mode="target"), "--reward-mode target needs --target"),
        (dict(data="x", reward_mode="target", target="high"), "--target must be a number for --reward-mode target, got 'high'"),
        (dict(data="x", label_range=(1.0, 0.0)), "--label-range must be 'lo hi' with lo < hi"),
        (dict(data="x", only_make_data=True), "--only-make-data needs --attribute"),
    ],
)
def test_bad_arguments_fail_before_anything_loads(kw, message):
    with pytest.raises(ValueError) as e:
        tr.main(tr.Args(**kw))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_reward_mode_must_fit_the_task(tmp_path):
    write_folder(tmp_path / "d", ["imgs"], n=2)
    (tmp_path / "d" / "labels.csv").write_text("path,score\nimgs/0.png,0.1\nimgs/1.png,0.9\n")
    with pytest.raises(ValueError, match="--reward-mode class_prob needs a classification task"):
        tr.main(tr.Args(data=str(tmp_path / "d"), reward_mode="class_prob", target="1", out=str(tmp_path / "o")))
    write_folder(tmp_path / "f", ["a", "b"], n=2)
    with pytest.raises(ValueError, match="--target 'c' is not a class; classes: a, b"):
        tr.main(tr.Args(data=str(tmp_path / "f"), reward_mode="class_prob", target="c", out=str(tmp_path / "o")))


def test_help_lists_the_flags_with_their_docs():
    out = subprocess.run([sys.executable, str(ROOT / "train_reward.py"), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--attribute", "--levels", "--backbone", "--reward-mode", "--only-make-data", "--label-range"):
        assert flag in out.stdout
    assert "strength s in" in out.stdout


def test_alignprop_fine_tunes_towards_the_custom_reward(pixelate_model, tiny_sd_dir, tmp_path):
    """The third README command: a short train_alignprop.py run with --reward custom:DIR moves that reward
    (fixed-seed evaluation before vs after training)."""
    from conftest import read_log, run_script

    root, _, _ = pixelate_model
    out = tmp_path / "run"
    run_script("train_alignprop.py", "--pretrained", tiny_sd_dir, "--reward", f"custom:{root / 'model'}", "--num-steps", 4,
               "--samples-per-epoch", 4, "--batch-size", 2, "--gradient-accumulation-steps", 1, "--mixed-precision", "no",
               "--num-epochs", 6, "--lr", 5e-2, "--backprop-steps", 2, "--eval-every", 6, "--eval-num", 2, "--output-dir", out)  # fmt: skip
    log = read_log(out)
    before, after = log[0]["eval_reward_mean"], log[-1]["eval_reward_mean"]
    # Measured when written: 0.1191 -> 0.1476. The tiny random pipeline makes nearly flat images,
    # so the signal is small; the run is deterministic from its seed.
    print(f"custom pixelate reward (fixed-seed eval) {before:.4f} -> {after:.4f}")
    assert after > before + 0.01
