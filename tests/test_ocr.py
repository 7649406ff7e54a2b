"""The `ocr` reward (text rendering, Flow-GRPO's formula) with the real pretrained OCR models the rapidocr
wheel ships: the formula against hand computations; the reward on phrases rendered with Pillow's own
TrueType font; nothing downloaded or written; the refusals before anything loads; the prompt sets; and
DDPO with --group-size on the tiny SD, the OCR scored in the reward worker, resumed exactly.

OCR costs about 0.1-0.5 s an image here, so images are small text lines and the engine loads once."""

import functools
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import diffusion
import rewards
import sample
import train_alignprop
import train_ddpo
from conftest import ROOT, lora_weights, read_log
from rewards import edit_distance, ocr_score, ocr_target
from tools.ocr_degradations import render, to_tensor

LINE = (448, 112)  # a text line's canvas, px: small, so the detector's work is small


def line(text: str, font_px: int = 40):
    return render(text, size=LINE, font_px=font_px)


@pytest.fixture(scope="module")
def ocr():
    """The reward as trainers load it, and its OcrReward (the engine, loaded once for the module)."""
    reward = rewards.load_reward("ocr")
    return reward, reward.parts[0][2]


# --- the formula ---------------------------------------------------------------------------------


def test_edit_distance_equals_hand_counts_and_the_recursive_definition():
    assert edit_distance("kitten", "sitting") == 3  # k->s, e->i, +g
    assert edit_distance("flaw", "lawn") == 2  # -f, +n
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("open", "open") == 0 and edit_distance("opne", "open") == 2

    @functools.cache
    def d(a, b):  # the definition itself, recursively: independent of the rolling-row DP
        if not a or not b:
            return len(a) + len(b)
        return min(d(a[:-1], b) + 1, d(a, b[:-1]) + 1, d(a[:-1], b[:-1]) + (a[-1] != b[-1]))

    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = ("".join(rng.choice(list("abc"), rng.integers(0, 7))) for _ in range(2))
        assert edit_distance(a, b) == d(a, b), (a, b)


@pytest.mark.parametrize(
    "reading, target, by_hand",
    [
        ("FRESH BREAD", "fresh bread", 1.0),  # lowercased, spaces removed
        ("we sell fresh bread daily", "fresh bread", 1.0),  # the target inside the reading: distance 0
        ("fresh", "fresh bread", 1 - 5 / 10),  # 'freshbread' has 10 letters, 5 missing
        ("fresh brcad", "fresh bread", 1 - 1 / 10),  # one substitution
        ("opne", "open", 1 - 2 / 4),  # a transposition is two edits
        ("", "open", 0.0),  # nothing read: distance 4, the target's length
        ("we sell fresh brcad daily", "fresh bread", 0.0),  # not inside; distance >= 21 - 10 > 10: capped at 10
        ("a completely different reading", "open", 0.0),  # capped at len(target): never below 0
    ],
)
def test_ocr_score_equals_a_hand_computation(reading, target, by_hand):
    assert ocr_score(reading, target) == pytest.approx(by_hand, abs=1e-12)


def test_the_target_is_the_quoted_text_and_a_prompt_without_one_is_named():
    assert ocr_target('a shop sign that reads "fresh bread"') == "fresh bread"
    assert ocr_target("a mug printed with \u201cgood morning\u201d") == "good morning"  # curly quotes too
    assert ocr_target('a sign "open" next to a sign "closed"') == "open"  # the first pair, as Flow-GRPO's split('"')[1]
    for prompt in ["a red mug", 'a sign that reads ""', 'a sign that reads "   "', 'an "unclosed quote']:
        with pytest.raises(ValueError, match=f"prompt {prompt!r} has no text in double quotes for --reward ocr"):
            ocr_target(prompt)


def test_ocr_is_a_host_reward_and_not_differentiable():
    assert rewards.on_host("ocr") and rewards.on_host("hps,ocr:0.5") and rewards.on_host("jpeg")
    assert not rewards.on_host("hps") and not rewards.on_host("aesthetic,pickscore:2")
    with pytest.raises(
        ValueError, match="--reward: ocr is not differentiable: AlignProp needs a differentiable reward"
    ):
        rewards.require_differentiable("hps,ocr")


def test_the_checkpoints_checked_are_the_wheels_models_and_a_missing_package_is_one_line(monkeypatch):
    needed = rewards.checkpoints_needed("ocr")
    assert [(flag, files) for flag, _, files in needed] == [("--reward ocr", (f,)) for f in rewards.OCR_FILES]
    assert all(os.path.isfile(os.path.join(folder, f)) for _, folder, (f,) in needed)
    diffusion.check_checkpoints(needed)
    real = rewards.importlib.util.find_spec
    monkeypatch.setattr(rewards.importlib.util, "find_spec", lambda n, *a: None if n == "rapidocr" else real(n, *a))
    with pytest.raises(diffusion.CheckpointError, match=r"^--reward ocr needs the rapidocr and onnxruntime packages"):
        rewards.checkpoints_needed("hps,ocr")


# --- the reward on rendered text (the real OCR models) -------------------------------------------


def test_reward_on_rendered_phrases(ocr):
    """Clean phrases of the held-out set ~ 1; the phrase inside a longer text exactly 1; half the letters
    about 1 - missing / length; two lines read as one text; no text (blank, noise) exactly 0."""
    reward, _ = ocr
    rng = np.random.default_rng(0)
    noise = to_tensor([line("")])[0] * 0 + torch.from_numpy(rng.random((3, LINE[1], LINE[0]))).float()
    cases = [  # (image, prompt, expected, tolerance)
        (line("thank you"), 'a greeting card with "thank you" on the front', 1.0, 0.1),
        (line("last chance"), 'a banner that says "last chance"', 1.0, 0.1),
        (line("fire station"), 'a green street sign reading "fire station"', 1.0, 0.1),
        (line("we have fresh bread today", 24), 'a sign that reads "fresh bread"', 1.0, 0.0),
        (line("fresh\nbread", 32), 'a sign that reads "fresh bread"', 1.0, 0.0),
        (line("fresh"), 'a sign that reads "fresh bread"', 1 - 5 / 10, 0.1),
        (line("lemo"), 'a jar labelled "lemonade"', 1 - 4 / 8, 0.125),
        (line(""), 'a sign that reads "open"', 0.0, 0.0),
    ]
    images = torch.cat([to_tensor([img for img, *_ in cases]), noise[None]])
    prompts = [p for _, p, *_ in cases] + ['a sign that reads "open"']
    scores, components = reward(images, prompts)
    assert scores.dtype == torch.float32 and scores.shape == (len(prompts),) and torch.equal(components["ocr"], scores)
    for score, (_, prompt, expected, tol) in zip(scores.tolist(), cases):
        assert abs(score - expected) <= tol + 1e-6, (prompt, score)
    assert scores[-1] == 0.0  # noise: nothing read


def test_the_ocr_runs_the_shipped_models_on_a_bounded_number_of_threads(ocr):
    """Both onnxruntime sessions hold the wheel's model files and OCR_THREADS intra-op threads (onnxruntime's
    default, 0, would take every core), and OpenCV is held to the same number."""
    import cv2

    _, module = ocr
    assert 1 <= rewards.OCR_THREADS <= 4
    for part, name in ((module.engine.text_det, rewards.OCR_FILES[0]), (module.engine.text_rec, rewards.OCR_FILES[1])):
        session = part.session.session
        assert session._model_path == str(rewards.ocr_model_dir() / name)
        assert session.get_session_options().intra_op_num_threads == rewards.OCR_THREADS
    assert cv2.getNumThreads() == rewards.OCR_THREADS


def test_the_reward_is_the_formula_on_what_ocr_reads(ocr):
    """'fresh brcad' drawn for "fresh bread": OCR reads it as drawn, and the reward is the hand computation on
    that reading, 1 - 1/10 (one substitution in 10 letters)."""
    reward, module = ocr
    image = to_tensor([line("fresh brcad")])
    reading = module.read(rewards._uint8_pixels(image)[0])
    assert "".join(reading.lower().split()) == "freshbrcad", reading
    scores, _ = reward(image, ['a shop sign that reads "fresh bread"'])
    assert scores.item() == pytest.approx(0.9, abs=1e-6)


def test_nothing_is_downloaded_or_written(tmp_path):
    """A fresh process (onnxruntime not yet imported), HOME and the XDG folders in an empty directory,
    offline, every socket connection refused: loading the ocr reward and reading an image connects
    nowhere, writes nothing there, and leaves rapidocr's model folder as it was. Checked by hand that it
    can fail: without rewards.py's ORT_DISABLE_TELEMETRY, onnxruntime's import writes
    ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} and this test fails."""
    home = tmp_path / "home"
    home.mkdir()
    models = rewards.ocr_model_dir()
    before = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in models.iterdir())
    code = f"""
import json, socket, sys
sys.path.insert(0, {str(ROOT)!r})
tried = []
def refuse(self, address, *a):
    tried.append(str(address))
    raise OSError("the test refuses every connection")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
import rewards
from tools.ocr_degradations import render, to_tensor
reward = rewards.load_reward("ocr")
scores, _ = reward(to_tensor([render("open late", size=(320, 96), font_px=40)]), ['a sign "open late"'])
print(json.dumps({{"score": scores.item(), "tried": tried}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env |= {"HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf")}
    env |= {k: str(home / k.lower()) for k in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"score": 1.0, "tried": []}
    assert list(home.rglob("*")) == []
    assert sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in models.iterdir()) == before


# --- refusals, before anything loads --------------------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(diffusion, "load_pipeline", no_model)
    monkeypatch.setattr(rewards, "load_reward", no_model)


def ddpo(argv):
    train_ddpo.main(train_ddpo.cli([str(a) for a in argv]))


def alignprop(argv):
    train_alignprop.main(train_alignprop.cli([str(a) for a in argv]))


def sample_py(argv):
    sample.main([str(a) for a in argv])


def one_error_line(capsys, script, argv) -> str:
    """The one `error:` line (exit 2) that `script(argv)` stops with."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        script(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def ddpo_argv(sd, out, *extra):
    return [
        "--pretrained", sd, "--reward", "ocr", "--prompts", "text_render", "--num-steps", 2, "--samples-per-epoch", 4,
        "--sample-batch-size", 2, "--train-batch-size", 2, "--gradient-accumulation-steps", 2, "--mixed-precision",
        "no", "--eval-every", 0, "--output-dir", out, "--lr", 1e-2, "--group-size", 2, *extra,
    ]  # fmt: skip


def test_alignprop_refuses_ocr(nothing_loads, capsys, tiny_sd_dir, tmp_path):
    argv = [
        "--pretrained",
        tiny_sd_dir,
        "--reward",
        "ocr",
        "--prompts",
        "text_render",
        "--output-dir",
        tmp_path / "run",
    ]
    err = one_error_line(capsys, alignprop, argv)
    assert err.startswith("error: --reward: ocr is not differentiable: AlignProp needs a differentiable reward")
    assert not (tmp_path / "run").exists()


def test_a_prompt_without_quotes_is_refused_naming_it_and_its_line(nothing_loads, capsys, tiny_sd_dir, tmp_path):
    prompts = tmp_path / "signs.txt"
    prompts.write_text('# shop signs\na sign that reads "open"\n\na red mug\na mug printed with "hello"\n')
    refusal = "has no text in double quotes for --reward ocr to read"
    for reward in ("ocr", "jpeg,ocr:0.5"):  # alone and in a weighted sum
        argv = ddpo_argv(tiny_sd_dir, tmp_path / "run", "--reward", reward, "--prompts", prompts)
        err = one_error_line(capsys, ddpo, argv)
        assert err.startswith(f"error: --prompts {prompts} line 4: prompt 'a red mug' {refusal}"), err
    # the held-out prompts too: the default set (animals) has no quoted text
    argv = ddpo_argv(tiny_sd_dir, tmp_path / "run", "--eval-every", 1)
    err = one_error_line(capsys, ddpo, argv)
    assert err.startswith("error: --eval-prompts prompts/unseen_animals.txt line 1: prompt "), err
    assert refusal in err
    # sample.py: a single --prompt, and a --prompts file
    out = tmp_path / "samples"
    argv = [
        "generate",
        "--pretrained",
        tiny_sd_dir,
        "--prompt",
        "a red mug",
        "--eval-rewards",
        "ocr",
        "--output-dir",
        out,
    ]
    err = one_error_line(capsys, sample_py, argv)
    assert err.startswith(f"error: --prompt: prompt 'a red mug' {refusal}"), err
    argv = ["explore", "--pretrained", tiny_sd_dir, "--prompts", prompts, "--rewards", "ocr", "--output-dir", out]
    err = one_error_line(capsys, sample_py, argv)
    assert err.startswith(f"error: --prompts {prompts} line 4: prompt 'a red mug' {refusal}"), err
    assert not (tmp_path / "run").exists() and not out.exists()


# --- the prompt sets ------------------------------------------------------------------------------


def test_held_out_phrases_never_occur_in_the_training_prompts():
    from tools import text_prompts

    train, held = diffusion.load_prompts("text_render"), diffusion.load_prompts("text_render_eval")
    rewards.check_prompts("ocr", train + held)  # every prompt has its quoted text
    key = text_prompts.key  # as the reward compares: lowercased, spaces removed
    train_text = [key(p) for p in train]
    held_targets = {key(ocr_target(p)) for p in held}
    assert len(held_targets) >= 30 and len({key(ocr_target(p)) for p in train}) >= 150
    assert [t for t in held_targets if any(t in p for p in train_text)] == []
    text_prompts.main(["--check"])  # the files are what the script writes (exit 1 otherwise)


# --- DDPO/GRPO with the ocr reward on the tiny SD ---------------------------------------------------


@pytest.fixture
def reads(monkeypatch):
    """Every OcrReward.read: (the thread it ran in, what it read)."""
    seen = []
    real = rewards.OcrReward.read

    def read(self, pixels):
        text = real(self, pixels)
        seen.append((threading.current_thread() is threading.main_thread(), text))
        return text

    monkeypatch.setattr(rewards.OcrReward, "read", read)
    return seen


def test_grpo_with_ocr_reads_in_the_worker_and_resumes_exactly(reads, tiny_sd_dir, tmp_path, capsys):
    """--reward 'ocr,jpeg:0.01' --group-size 2 on the tiny SD (the jpeg part only so that the advantages are
    not all 0: the tiny model draws no letters, so OCR reads nothing and scores 0). One epoch end to end:
    every image is read by OCR in the reward worker, never the main thread; the logged ocr reward is the
    formula on those readings and the total the weighted sum; the epoch line reports the reward's time per
    sample. Then --resume to 2 epochs equals 2 epochs in one go: LoRA weights and every logged reward.
    Checked by hand that it can fail: with train_ddpo's host_reward forced False, every read is in the
    main thread."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    mixed = ["--reward", "ocr,jpeg:0.01"]
    ddpo(ddpo_argv(tiny_sd_dir, split, *mixed, "--num-epochs", 1))
    record = read_log(split)[-1]
    assert len(reads) == 4 and not any(main for main, _ in reads)
    targets = [ocr_target(p["prompt"]) for p in record["prompt_weights"]]
    expected = np.mean([ocr_score(text, t) for (_, text), t in zip(reads, targets)])
    assert record["reward/ocr"] == pytest.approx(expected, abs=1e-7)
    assert record["reward_mean"] == pytest.approx(record["reward/ocr"] + 0.01 * record["reward/jpeg"], rel=1e-5)
    assert record["reward_sec_per_sample"] > 0 and record["reward_wait_sec"] >= 0
    epoch_line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 0 ")]
    assert len(epoch_line) == 1 and f" reward_sec_per_sample {record['reward_sec_per_sample']:.4g} " in epoch_line[0]
    ddpo(ddpo_argv(tiny_sd_dir, split, *mixed, "--num-epochs", 2, "--resume"))
    ddpo(ddpo_argv(tiny_sd_dir, whole, *mixed, "--num-epochs", 2))
    assert len(reads) == 4 * 4 and not any(main for main, _ in reads)
    logs = [read_log(d)[1:] for d in (whole, split)]
    for key in ("reward/ocr", "reward/jpeg", "reward_mean", "advantages"):
        assert [r[key] for r in logs[0]] == [r[key] for r in logs[1]], key
    assert any(abs(a) > 0.1 for a in logs[0][0]["advantages"])  # the update is real
    a, b = (lora_weights(d / "checkpoints" / "epoch_0001") for d in (whole, split))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)
