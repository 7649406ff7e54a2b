"""The one loading path for hub ids and local directories, offline (built offline, as every test model is)."""

import open_clip
import pytest
import torch

from diffusion import CheckpointError, encode_prompts, load_pipeline, load_prompts


def test_tokenizer_reproduces_open_clip_ids(tokenizer):
    assert len(tokenizer) == 49408
    for prompt in ["a photo of a hippopotamus riding a bike", "A dolphin, riding a BIKE!!", "octopus doing laundry"]:
        ref = open_clip.tokenize([prompt])[0]
        assert tokenizer(prompt).input_ids == ref[ref != 0].tolist()


def test_tiny_pipeline_round_trip_generates_offline(tiny_sd_dir):
    pipe = load_pipeline(str(tiny_sd_dir))
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.steps_offset == 1 and not pipe.scheduler.config.set_alpha_to_one
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    images = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=3,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    emb = encode_prompts(pipe, ["a red circle"])
    assert emb.shape == (1, 77, 32)


def test_missing_hub_checkpoint_offline_is_one_clear_line():
    with pytest.raises(CheckpointError) as e:
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "\n" not in msg
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "HF_HUB_OFFLINE" in msg and "hf download" in msg


def test_missing_local_directory(tmp_path):
    with pytest.raises(CheckpointError, match="local directory .* does not exist"):
        load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint directory"):
        load_pipeline(str(tmp_path / "empty"))


def test_prompt_sets(tmp_path):
    assert len(load_prompts("animals_activities")) == 135
    assert load_prompts("animals_activities")[:2] == ["an ant washing the dishes", "an ant riding a bike"]
    assert len(load_prompts("simple_animals")) == 45
    assert "a hippopotamus playing soccer" in load_prompts("unseen_animals_activities")
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(f)) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="--prompts file .* has no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="neither a built-in prompt set .*animals_activities"):
        load_prompts("no_such_set")
