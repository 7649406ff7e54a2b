"""rewards.py against independent references, with tiny models saved in the published layouts."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from diffusion import CheckpointError
from tiny_rewards import IR_VISION, make_tiny_aesthetic, make_tiny_clip, make_tiny_hps, make_tiny_imagereward

PROMPTS = ["a photo of a cat", "a dog riding a bike", "a red tree in the snow"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Overrides of rewards.DEFAULT_MODELS pointing at tiny checkpoints."""
    root = tmp_path_factory.mktemp("rewards")
    hps_dir, hps_arch = make_tiny_hps(root / "hps")
    ir_dir, ir_tok = make_tiny_imagereward(root / "imagereward")
    return dict(
        aesthetic_clip=str(make_tiny_clip(root / "clip-openai", seed=1)),
        aesthetic_model=str(make_tiny_aesthetic(root / "aesthetic", dim=32)),
        # PickScore's processor with a mean/std unlike OpenAI's, so ignoring the processor would show.
        pickscore_model=str(
            make_tiny_clip(root / "clip-pick", seed=2, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
        ),
        pickscore_processor=str(root / "clip-pick"),
        hps_model=str(hps_dir),
        hps_arch=hps_arch,
        imagereward_model=str(ir_dir),
        imagereward_tokenizer=str(ir_tok),
    )


_cache = {}


def get(spec, models):
    if spec not in _cache:
        _cache[spec] = rewards.load_reward(spec, **models)
    return _cache[spec]


def uint8_images(n, size, seed=0):
    """Images on the uint8 grid, so the PIL reference path sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, *size), generator=g).float() / 255


def to_pil(images):
    return [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images]


@pytest.mark.parametrize(
    "name", ["aesthetic", "pickscore", "hps", "hpsv2", "imagereward", "jpeg", "jpeg_incompressibility"]
)
def test_every_reward_shape_dtype_finite_and_gradient(name, models):
    reward = get(name, models)
    assert reward.name == name and reward.differentiable == (name not in rewards.NOT_DIFFERENTIABLE)
    images = uint8_images(3, (40, 56)).requires_grad_(True)  # not the model's resolution, not square
    if not reward.differentiable:
        with pytest.raises(ValueError, match=f"reward {name}: {name} is not differentiable and cannot give gradients"):
            reward(images, PROMPTS)
        with torch.no_grad():
            scores, comps = reward(images, PROMPTS)
        assert scores.grad_fn is None
    else:
        scores, comps = reward(images, PROMPTS)
        scores.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
        params = [p for _, _, m in reward.parts for p in m.parameters()]
        assert params and not any(p.requires_grad for p in params)  # frozen
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert list(comps) == [name] and torch.equal(comps[name], scores.detach())


def test_pickscore_equals_clipmodel_logits_per_image(models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(models["pickscore_model"]).eval()
    processor = CLIPProcessor.from_pretrained(models["pickscore_processor"])
    reward = get("pickscore", models)
    for size, atol in (((32, 32), 1e-4), ((64, 80), 2e-2)):  # at the model's size exact; resized: PIL vs torch bicubic
        images = uint8_images(3, size, seed=size[0])
        inputs = processor(
            images=to_pil(images), text=PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        with torch.no_grad():
            expected = model(**inputs).logits_per_image.diagonal()
            got, _ = reward(images, PROMPTS)
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert expected.std() > 10 * atol  # the comparison distinguishes the three samples


def test_aesthetic_matches_hand_computation(models):
    """CLIP image embedding via the image processor's PIL path, normalised, then the published
    linear layers applied one by one from the state-dict file (no activations in between)."""
    from transformers import CLIPImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(models["aesthetic_clip"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(models["aesthetic_clip"])(
        images=to_pil(uint8_images(3, (32, 32))), return_tensors="pt"
    ).pixel_values
    sd = torch.load(f"{models['aesthetic_model']}/aesthetic-model.pth", weights_only=True)
    with torch.no_grad():
        x = clip.get_image_features(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
        got, _ = get("aesthetic", models)(uint8_images(3, (32, 32)), PROMPTS)
    torch.testing.assert_close(got, x.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_aesthetic_rejects_a_state_dict_of_another_layout(models, tmp_path):
    sd = torch.load(f"{models['aesthetic_model']}/aesthetic-model.pth", weights_only=True)
    sd["layers.8.weight"] = sd.pop("layers.7.weight")  # e.g. a head with a ReLU in between
    torch.save(sd, tmp_path / "aesthetic-model.pth")
    with pytest.raises(
        CheckpointError,
        match=r"--reward-models aesthetic_model: '.*aesthetic-model.pth' does not fit the model: missing \['layers.7.weight'\], unexpected \['layers.8.weight'\]",
    ):
        rewards.load_reward("aesthetic", **{**models, "aesthetic_model": str(tmp_path)})


def test_hps_matches_open_clip_forward(models):
    """The HPS recipe with open_clip's own pieces: image_transform on PIL, get_tokenizer, model(...)."""
    import open_clip

    for name, file in rewards.HPS_FILES.items():
        model = open_clip.create_model(models["hps_arch"], pretrained=None, load_weights=False, output_dict=True).eval()
        model.load_state_dict(torch.load(f"{models['hps_model']}/{file}", weights_only=True)["state_dict"])
        preprocess = open_clip.image_transform(32, is_train=False)
        images = uint8_images(3, (32, 32), seed=3)
        with torch.no_grad():
            out = model(
                torch.stack([preprocess(im) for im in to_pil(images)]),
                open_clip.get_tokenizer(models["hps_arch"])(PROMPTS),
            )
            expected = (out["image_features"] @ out["text_features"].T).diagonal()
            got, _ = get(name, models)(images, PROMPTS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(get("hps", models)(images, PROMPTS)[0], get("hpsv2", models)(images, PROMPTS)[0])


def _blip_vit_reference(sd, pixels, heads):
    """BLIP's ViT written directly on the published keys: patchify, [CLS] + positions, pre-LN blocks."""
    p, d = sd["patch_embed.proj.weight"].shape[-1], sd["cls_token"].shape[-1]
    x = (
        F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([sd["cls_token"].expand(len(x), -1, -1), x], dim=1) + sd["pos_embed"]
    b, n, _ = x.shape
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        k = lambda s, i=i: sd[f"blocks.{i}.{s}"]  # noqa: E731
        h = F.layer_norm(x, (d,), k("norm1.weight"), k("norm1.bias"), eps=1e-6)
        q, kk, v = (
            F.linear(h, k("attn.qkv.weight"), k("attn.qkv.bias"))
            .reshape(b, n, 3, heads, d // heads)
            .permute(2, 0, 3, 1, 4)
        )
        att = ((q @ kk.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, n, d), k("attn.proj.weight"), k("attn.proj.bias"))
        h = F.layer_norm(x, (d,), k("norm2.weight"), k("norm2.bias"), eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, k("mlp.fc1.weight"), k("mlp.fc1.bias"))), k("mlp.fc2.weight"), k("mlp.fc2.bias")
        )
        i += 1
    return F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def test_imagereward_matches_reference_on_published_keys(models):
    import json

    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    sd = torch.load(f"{models['imagereward_model']}/ImageReward.pt", weights_only=True)
    med = json.load(open(f"{models['imagereward_model']}/med_config.json"))
    vit = {k.removeprefix("blip.visual_encoder."): v for k, v in sd.items() if k.startswith("blip.visual_encoder.")}
    images = uint8_images(3, (32, 32), seed=4)
    mean = torch.tensor(rewards.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(rewards.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    text = BlipTextModel(
        BlipTextConfig(**{k: med[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")},
                       encoder_hidden_size=IR_VISION["width"], is_decoder=True, bos_token_id=None, sep_token_id=None),
        add_pooling_layer=False,
    ).eval()  # fmt: skip
    text.load_state_dict(
        {
            k.removeprefix("blip.text_encoder."): v
            for k, v in sd.items()
            if k.startswith("blip.text_encoder.") and "position_ids" not in k
        }
    )
    prompts = PROMPTS[:2] + [" ".join(["a red cat riding a blue bike"] * 6)]  # 42 words: cut at ImageReward's 35 tokens
    tok = BertTokenizer.from_pretrained(models["imagereward_tokenizer"])(
        prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        image_tokens = _blip_vit_reference(vit, (images - mean) / std, heads=IR_VISION["width"] // 64)
        cls = text(
            input_ids=tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=image_tokens
        ).last_hidden_state[:, 0]
        for i in (0, 2, 4, 6, 7):
            cls = cls @ sd[f"mlp.layers.{i}.weight"].T + sd[f"mlp.layers.{i}.bias"]
        expected = (cls.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
        got, _ = get("imagereward", models)(images, prompts)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.std() > 1e-3


def test_ensemble_is_the_weighted_sum_of_its_parts(models):
    ens = rewards.load_reward("aesthetic:0.5, pickscore:2,hps:-1", **models)
    assert ens.name == "aesthetic:0.5,pickscore:2,hps:-1" and ens.differentiable
    images = uint8_images(3, (48, 48), seed=5).requires_grad_(True)
    total, comps = ens(images, PROMPTS)
    assert list(comps) == ["aesthetic", "pickscore", "hps"]
    with torch.no_grad():
        singles = {n: get(n, models)(images, PROMPTS)[0] for n in comps}
    for n in comps:
        torch.testing.assert_close(comps[n], singles[n])
    torch.testing.assert_close(total, 0.5 * singles["aesthetic"] + 2 * singles["pickscore"] - singles["hps"])
    total.sum().backward()
    assert images.grad.abs().sum() > 0
    # With jpeg in it the ensemble is not differentiable, and says so.
    assert not rewards.load_reward("hps,jpeg:0.1", **models).differentiable


def test_jpeg_scores_noise_lower_than_flat():
    reward = rewards.load_reward("jpeg")
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores, _ = reward(torch.cat([flat, noise]), ["x", "y"])
    assert scores[1] < scores[0] < 0
    assert scores[1] < -5  # 64x64 noise at quality 95 is well over 5 kB; a flat image well under 1 kB
    assert scores[0] > -1
    inc, _ = rewards.load_reward("jpeg_incompressibility")(torch.cat([flat, noise]), ["x", "y"])
    torch.testing.assert_close(inc, -scores)


def test_parse_reward_spec_valid(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert rewards.parse_reward_spec("hps") == [("hps", 1.0)]
    assert rewards.parse_reward_spec("hps:1,aesthetic:0.5,pickscore:1") == [
        ("hps", 1.0),
        ("aesthetic", 0.5),
        ("pickscore", 1.0),
    ]
    assert rewards.parse_reward_spec(f"custom:{tmp_path}") == [(f"custom:{tmp_path}", 1.0)]
    assert rewards.parse_reward_spec(f"jpeg:-2, custom:{tmp_path}:0.25") == [
        ("jpeg", -2.0),
        (f"custom:{tmp_path}", 0.25),
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "hsp",
            "--reward 'hsp': unknown reward 'hsp'; known: aesthetic, pickscore, hps, hpsv2, imagereward, jpeg, jpeg_incompressibility, ocr, toy-compose, toy-hidden, custom:DIR",
        ),
        ("hps:abc", "--reward 'hps:abc': weight 'abc' of 'hps' is not a number (write e.g. 'hps:0.5')"),
        (
            "hps:1,,x",
            "--reward 'hps:1,,x' has an empty component: write 'name:weight,name:weight' without stray commas",
        ),
        ("hps:1,", "--reward 'hps:1,' has an empty component"),
        ("", "--reward is empty: give a reward name"),
        ("hps:nan", "--reward 'hps:nan': weight of 'hps' must be a finite number, got nan"),
        ("hps,aesthetic,hps:2", "--reward 'hps,aesthetic,hps:2': 'hps' appears twice"),
        ("custom:", "--reward 'custom:': custom needs a directory"),
        (
            "custom:/no/such/dir",
            "--reward 'custom:/no/such/dir': '/no/such/dir' is not a reward model directory (no config.json); make one with train_reward.py",
        ),
    ],
)
def test_parse_reward_spec_errors(spec, message):
    with pytest.raises(ValueError) as e:
        rewards.parse_reward_spec(spec)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_require_differentiable():
    assert rewards.require_differentiable("hps:1,aesthetic:2") == [("hps", 1.0), ("aesthetic", 2.0)]
    for spec, name in (("jpeg", "jpeg"), ("hps:1,jpeg_incompressibility:0.1", "jpeg_incompressibility")):
        with pytest.raises(ValueError) as e:
            rewards.require_differentiable(spec)
        assert (
            str(e.value)
            == f"--reward: {name} is not differentiable: AlignProp needs a differentiable reward; use train_ddpo.py for {name}"
        )


def test_missing_weights_offline_name_the_checkpoint_and_the_fix(tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"--reward-models pickscore_model: cannot load 'yuvalkirstain/PickScore_v1'.*HF_HUB_OFFLINE is set.*`hf download yuvalkirstain/PickScore_v1`",
    ):
        rewards.load_reward("pickscore")
    with pytest.raises(
        CheckpointError, match=r"--reward-models hps_model: cannot load 'xswu/HPSv2'.*`hf download xswu/HPSv2`"
    ):
        rewards.load_reward("hps")
    with pytest.raises(
        CheckpointError, match=r"--reward-models aesthetic_clip: local directory '/no/such/clip' does not exist"
    ):
        rewards.load_reward("aesthetic", aesthetic_clip="/no/such/clip")


def test_incomplete_local_directory_names_the_missing_file(models, tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"--reward-models aesthetic_model: '.*' is not a complete checkpoint directory \(missing aesthetic-model.pth\)",
    ):
        rewards.load_reward("aesthetic", **{**models, "aesthetic_model": str(tmp_path)})
    with pytest.raises(CheckpointError, match=r"--reward-models hps_model: .* \(missing HPS_v2.1_compressed.pt\)"):
        rewards.load_reward("hps", **{**models, "hps_model": str(tmp_path)})


def test_bad_calls_and_overrides(models):
    reward = get("pickscore", models)
    with pytest.raises(
        ValueError,
        match=r"reward pickscore: images must be an N x 3 x H x W float tensor in \[0, 1\], got torch.Size\(\[3, 32, 32\]\)",
    ):
        reward(torch.rand(3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match="reward pickscore: 3 images but 2 prompts; give one prompt per image"):
        reward(torch.rand(3, 3, 32, 32), PROMPTS[:2])
    with pytest.raises(
        ValueError,
        match=r"reward pickscore: images must be in \[0, 1\], got \[-1.000, 1.000\] .*\(x / 2 \+ 0.5\).clamp\(0, 1\)",
    ):
        reward(torch.linspace(-1, 1, 3 * 3 * 32 * 32).view(3, 3, 32, 32), PROMPTS)
    with pytest.raises(
        ValueError, match=r"load_reward: unknown model override\(s\) \['pickscore_modle'\]; known: aesthetic_clip"
    ):
        rewards.load_reward("pickscore", pickscore_modle="x")


def test_lower_precision_gives_float32_scores(models):
    reward = rewards.load_reward("pickscore", dtype=torch.bfloat16, **models)
    images = uint8_images(3, (32, 32))
    with torch.no_grad():
        low, _ = reward(images, PROMPTS)
        full, _ = get("pickscore", models)(images, PROMPTS)
    assert low.dtype == torch.float32 and math.isfinite(low.sum().item())
    torch.testing.assert_close(low, full, atol=0.5, rtol=0.05)
    assert np.corrcoef(low.numpy(), full.numpy())[0, 1] > 0.9


def test_unreadable_checkpoint_is_a_clear_error(models, tmp_path):
    (tmp_path / "aesthetic-model.pth").write_text("not a checkpoint")
    with pytest.raises(
        CheckpointError, match=r"cannot read '.*aesthetic-model.pth' as a weights-only torch checkpoint"
    ):
        rewards.load_reward("aesthetic", **{**models, "aesthetic_model": str(tmp_path)})


def hpsv2_transform_by_hand(image, size):
    """hpsv2's scoring transform for one 3 x H x W image in [0, 1], step by step: scale the long side to
    `size`, bicubic (antialiased, as torchvision resizes a tensor), paste centred on a zero canvas
    (odd margins: the extra pixel right/bottom), then normalise with OpenAI's mean/std."""
    _, h, w = image.shape
    long_side = max(h, w)
    new_h, new_w = round(h * size / long_side), round(w * size / long_side)
    resized = image
    if (new_h, new_w) != (h, w):
        resized = F.interpolate(image[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[
            0
        ]
    canvas = torch.zeros(3, size, size, dtype=image.dtype)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    mean = torch.tensor(rewards.OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(rewards.OPENAI_CLIP_STD).view(3, 1, 1)
    return (canvas - mean) / std


@pytest.mark.parametrize(
    "hw, content",  # content: (rows, cols) of the 32 x 32 output that hold the image, worked out by hand
    [
        ((48, 32), (slice(0, 32), slice(5, 26))),  # 48x32 -> 32x21, 11 columns of pad: 5 left, 6 right
        ((32, 48), (slice(5, 26), slice(0, 32))),
        ((56, 36), (slice(0, 32), slice(5, 26))),  # 36 -> round(20.57) = 21, not the floor 20
        ((40, 40), (slice(0, 32), slice(0, 32))),  # square: resized, no pad
        ((512, 768), (slice(5, 26), slice(0, 32))),
    ],  # an SD 512x768 frame: 768 -> 32, 512 -> round(21.33) = 21
)
def test_hps_preprocess_matches_hpsv2_transform_by_hand(hw, content):
    import torchvision.transforms.functional as TF

    images = uint8_images(2, hw, seed=5)
    got = rewards.hps_preprocess(images, 32)
    expected = torch.stack([hpsv2_transform_by_hand(x, 32) for x in images])
    assert got.shape == (2, 3, 32, 32)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Outside the content the pad is 0 in pixel space, i.e. -mean/std once normalised.
    band = torch.ones(32, 32, dtype=torch.bool)
    band[content] = False
    pad = -torch.tensor(rewards.OPENAI_CLIP_MEAN) / torch.tensor(rewards.OPENAI_CLIP_STD)
    torch.testing.assert_close(got.permute(0, 2, 3, 1)[:, band], pad.expand(2, int(band.sum()), 3))
    # The very torchvision calls hpsv2's tensor pipeline makes (resize, pad with fill 0, normalise).
    h, w = hw
    new = [round(d * 32 / max(h, w)) for d in hw]
    tv = TF.resize(images, new, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ph, pw = 32 - new[0], 32 - new[1]
    tv = TF.normalize(
        TF.pad(tv, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0),
        rewards.OPENAI_CLIP_MEAN,
        rewards.OPENAI_CLIP_STD,
    )
    torch.testing.assert_close(got, tv, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(48, 32), (32, 48)])
def test_hps_score_of_non_square_image_is_the_model_on_hpsv2_pixels(hw, models):
    """End to end: HPS of a non-square image = the HPS model on the by-hand hpsv2 tensor, and the
    crop-based CLIP preprocessing would have given another score."""
    import open_clip

    model = open_clip.create_model(models["hps_arch"], pretrained=None, load_weights=False).eval()
    model.load_state_dict(
        torch.load(f"{models['hps_model']}/{rewards.HPS_FILES['hps']}", weights_only=True)["state_dict"]
    )
    tokenizer = open_clip.get_tokenizer(models["hps_arch"])
    images = uint8_images(3, hw, seed=7).requires_grad_(True)
    with torch.no_grad():
        pixels = torch.stack([hpsv2_transform_by_hand(x, 32) for x in images.detach()])
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
        expected = (img * txt).sum(-1)
        cropped = F.normalize(
            model.encode_image(
                rewards.clip_preprocess(images.detach(), 32, rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD)
            ),
            dim=-1,
        )
    got, _ = get("hps", models)(images, PROMPTS)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    assert (got.detach() - (cropped * txt).sum(-1)).abs().max() > 1e-3
    got.sum().backward()  # gradients still reach the pixels through the resize and the pad
    assert images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


# ----------------------------------------------------------------------------------------------
# Half-precision weights: preprocessing runs in float32, then casts once to the model's dtype.


@pytest.fixture(scope="module")
def custom_dirs(tmp_path_factory, models):
    """custom:DIR rewards as train_reward.py saves them (config.json + model.safetensors), random
    weights: a CNN regressor and a classifier head on the tiny CLIP."""
    import json

    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("custom")
    configs = {
        "cnn": dict(task="regression", backbone="cnn", image_size=32, width=8, reward_mode="prediction",
                    target=None, label_mean=0.5, label_std=0.2),
        "clip": dict(task="classification", classes=["0", "1"], class_values=[0.0, 1.0], backbone="clip",
                     image_size=32, clip_model=models["aesthetic_clip"], reward_mode="prediction", target=None),
    }  # fmt: skip
    out = {}
    for kind, config in configs.items():
        torch.manual_seed(0)
        net = rewards.build_custom_network(config)
        module = net.head if kind == "clip" else net  # train_reward.py saves only the head on CLIP
        (root / kind).mkdir()
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(root / kind / "model.safetensors"))
        (root / kind / "config.json").write_text(json.dumps(config))
        out[kind] = f"custom:{root / kind}"
    return out


def _half_precision_case(name, models, custom_dirs):
    """(reward spec, images in [0, 1] at a size each reward must resize, prompts)."""
    if name == "toy-compose":
        from tools import toy

        images, prompts = toy.render(4, torch.Generator().manual_seed(11), two_frac=0.5)
        return name, F.interpolate(images, size=(48, 48), mode="bilinear").clamp(0, 1), prompts
    spec = custom_dirs[name.removeprefix("custom-")] if name.startswith("custom-") else name
    return spec, uint8_images(4, (40, 56), seed=12), PROMPTS + ["a cat on a horse"]


@pytest.mark.parametrize(
    "name, atol",  # bf16 weights against fp32, in the reward's units; measured 2026-12-03, CPU, fixed seeds
    [
        ("aesthetic", 0.01),  # measured max difference 0.0013 (scores -0.15 +- 0.01)
        ("pickscore", 0.2),  # 0.044 (100 x cosine: scores -0.01 ... 1.7)
        ("hps", 0.01),  # 0.0032 (cosine: -0.16 ... 0.17)
        ("hpsv2", 0.01),  # 0.0029
        ("imagereward", 0.05),  # 0.028 (0.64 ... 0.73)
        ("custom-cnn", 1e-3),  # 5e-5 (the random CNN's prediction barely moves: 0.515)
        ("custom-clip", 2e-3),  # 1.2e-4 (expected class value ~0.49)
        ("toy-compose", 0.02),  # 0.0036 (probabilities 0.94 ... 0.98)
    ],
)
def test_bf16_weights_score_bf16_images_on_cpu(name, atol, models, custom_dirs):
    """--mixed-precision bf16 on a CPU: bf16 images through bf16 weights score without error (the
    antialiased resize has no bf16 CPU kernel, so preprocessing must run in float32), close to the
    float32 score of the same pixels, with a gradient reaching every image."""
    spec, images, prompts = _half_precision_case(name, models, custom_dirs)
    extra = {} if name == "toy-compose" else models
    low = rewards.load_reward(spec, dtype=torch.bfloat16, **extra)
    assert all(p.dtype == torch.bfloat16 for _, _, m in low.parts for p in m.parameters())
    x = images.to(torch.bfloat16).requires_grad_(True)
    scores, _ = low(x, prompts)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every image gets a gradient
    with torch.no_grad():
        full, _ = rewards.load_reward(spec, **extra)(x.detach().float(), prompts)
    torch.testing.assert_close(scores.detach(), full, atol=atol, rtol=0)


def test_preprocessing_runs_in_float32_and_casts_once():
    """bf16 in, bf16 out, and bitwise the float32 computation on the same pixels rounded once at the
    end; also for a float32 input asked for bf16 (what the rewards do with half weights)."""
    images = uint8_images(2, (40, 56), seed=13).to(torch.bfloat16)
    mean, std = rewards.OPENAI_CLIP_MEAN, rewards.OPENAI_CLIP_STD
    config = dict(backbone="cnn", image_size=32)
    for fn in (
        lambda x, **kw: rewards.clip_preprocess(x, 32, mean, std, **kw),
        lambda x, **kw: rewards.hps_preprocess(x, 32, **kw),
        lambda x, **kw: rewards.custom_preprocess(x, config, **kw),
    ):
        reference = fn(images.float())
        assert reference.dtype == torch.float32
        got = fn(images)
        assert got.dtype == torch.bfloat16 and torch.equal(got, reference.to(torch.bfloat16))
        assert torch.equal(fn(images.float(), dtype=torch.bfloat16), got)
