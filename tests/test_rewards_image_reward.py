"""ImageReward on a tiny checkpoint in BLIP's own layout, against the reference's computation restated here.

The expected score never goes through transformers' BLIP classes or the reward's renaming: BLIP's VisionTransformer
(vit.py) and its BERT with cross-attention (med.py) are written out below as plain tensor operations on the
checkpoint's own tensor names, after the reference's preprocessing (torchvision's Resize of the shorter side to 224
and CenterCrop, restated with PIL) and tokenisation (padding to 35), then its MLP and (r - mean) / std.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import grpo_image  # noqa: F401, I001  (first: makes torchvision importable before transformers)

from rewards.image_reward import ImageReward
from tests.helpers_reward_models import TINY_MED, TINY_VIT, write_tiny_image_reward

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "two dogs on the hill at dawn", "a tiny house"]
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward/ImageReward.py `self.mean`, `self.std`
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # `_transform`


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_image_reward(tmp_path_factory.mktemp("image_reward"), seed=1)


@pytest.fixture(scope="module")
def reward(files):
    checkpoint, tokenizer, _ = files
    return ImageReward(str(checkpoint), str(tokenizer), vit=TINY_VIT, device="cpu", batch_size=2)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)  # uint8 [n, h, w, 3]


def reference_pixels(image: np.ndarray) -> torch.Tensor:
    """Resize(224, BICUBIC) then CenterCrop(224), ToTensor, Normalize, as torchvision does them on a PIL image."""
    pil = Image.fromarray(image)
    w, h = pil.size
    size = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)  # (width, height): shorter side 224
    pil = pil.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
    x = torch.from_numpy(np.asarray(pil.crop((left, top, left + 224, top + 224))).copy()).permute(2, 0, 1) / 255
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]  # [3, 224, 224]


def attention(q, k, v, heads: int, mask=None):
    """Multi-head scaled dot-product attention: q [T, D], k and v [S, D] -> [T, D]; mask [S] adds -10000 (med.py)."""
    q, k, v = (x.reshape(x.shape[0], heads, -1).transpose(0, 1) for x in (q, k, v))  # [h, *, D / h]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # [h, T, S]
    if mask is not None:
        scores = scores + (1.0 - mask) * -10000.0
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(q.shape[1], -1)  # [T, D]


def linear(state, name, x):
    return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]


def layer_norm(state, name, x, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def reference_vit(state, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward on one image [3, 224, 224] -> [1 + patches, D] (vit.py)."""
    at, d = "blip.visual_encoder.", TINY_VIT["hidden_size"]
    x = F.conv2d(pixels[None], state[f"{at}patch_embed.proj.weight"], state[f"{at}patch_embed.proj.bias"],
                 stride=TINY_VIT["patch_size"]).flatten(2)[0].T  # [patches, D]  # fmt: skip
    x = torch.cat([state[f"{at}cls_token"][0], x]) + state[f"{at}pos_embed"][0]  # [1 + patches, D]
    for b in range(TINY_VIT["num_hidden_layers"]):
        block = f"{at}blocks.{b}."
        q, k, v = linear(state, f"{block}attn.qkv", layer_norm(state, f"{block}norm1", x, 1e-6)).split(d, dim=-1)
        x = x + linear(state, f"{block}attn.proj", attention(q, k, v, TINY_VIT["num_attention_heads"]))
        hidden = F.gelu(linear(state, f"{block}mlp.fc1", layer_norm(state, f"{block}norm2", x, 1e-6)))
        x = x + linear(state, f"{block}mlp.fc2", hidden)
    return layer_norm(state, f"{at}norm", x, 1e-6)


def reference_cls(state, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """med.py's BertModel (mode "multimodal") on one prompt's ids [35] against image tokens [S, D_v] -> [CLS] [D]."""
    at, heads, eps = "blip.text_encoder.", TINY_MED["num_attention_heads"], TINY_MED["layer_norm_eps"]
    x = state[f"{at}embeddings.word_embeddings.weight"][ids] + state[f"{at}embeddings.position_embeddings.weight"][
        : len(ids)
    ]  # [35, D]: no token type embeddings in med.py
    x = layer_norm(state, f"{at}embeddings.LayerNorm", x, eps)
    for layer in range(TINY_MED["num_hidden_layers"]):
        lay = f"{at}encoder.layer.{layer}."
        for kind, source, source_mask in (("attention", x, mask.float()), ("crossattention", image, None)):
            q, k, v = (linear(state, f"{lay}{kind}.self.{n}", s) for n, s in (("query", x), ("key", source),
                                                                            ("value", source)))  # fmt: skip
            out = linear(state, f"{lay}{kind}.output.dense", attention(q, k, v, heads, source_mask))
            x = layer_norm(state, f"{lay}{kind}.output.LayerNorm", out + x, eps)
        hidden = F.gelu(linear(state, f"{lay}intermediate.dense", x))
        x = layer_norm(state, f"{lay}output.LayerNorm", linear(state, f"{lay}output.dense", hidden) + x, eps)
    return x[0]


def reference_score(state, tokenizer, image: np.ndarray, prompt: str) -> float:
    tokens = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_tokens = reference_vit(state, reference_pixels(image))  # [1 + patches, D_v]
        raw = reference_cls(state, tokens.input_ids[0], tokens.attention_mask[0], image_tokens)  # [D]
        for index in (0, 2, 4, 6, 7):  # the MLP's Linears; its Dropouts (1, 3, 5) are off in eval; no activations
            raw = linear(state, f"mlp.layers.{index}", raw)
    return (float(raw[0]) - MEAN) / STD


@pytest.fixture(scope="module")
def reference_tokenizer(files):
    """BLIP's init_tokenizer on the tiny bert folder: [DEC] as bos, [ENC] as an additional special token."""
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(files[1])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def test_image_reward_tokenises_like_blip(reward, reference_tokenizer):
    ids = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35).input_ids
    assert ids == reference_tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35).input_ids
    added = len(reference_tokenizer) - 2
    assert reward.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [added, added + 1]  # after the vocabulary
    assert ids[1][:3] == [2] + reference_tokenizer.convert_tokens_to_ids(["two", "dogs"])  # [CLS] first
    assert len(ids[1]) == 35 and ids[1][-1] == 0  # padded with [PAD] to 35


@pytest.mark.parametrize("shape", [(300, 227), (224, 224), (120, 401)])  # tall with odd margins, exact, wide
def test_image_reward_preprocesses_like_torchvision(reward, shape):
    image = _images(1, *shape)[0]
    # the same PIL bicubic resize and integer crop both ways, then /255 and the normalisation in float32: exact
    # up to the order of the float32 operations (1 ULP of values up to 2.2)
    torch.testing.assert_close(reward.preprocess(Image.fromarray(image)), reference_pixels(image), rtol=0, atol=1e-6)


def test_image_reward_scores_like_the_reference(files, reward, reference_tokenizer):
    _, _, state = files
    images = _images(3, 300, 227, seed=2)
    scores = reward(images, PROMPTS, [{}] * 3).scores
    assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
    expected = [reference_score(state, reference_tokenizer, im, p) for im, p in zip(images, PROMPTS)]
    # fp32 both ways; batched transformers kernels against the restated per-image formula sum in other orders (a
    # few float32 ULPs, ~1e-7 relative, per op); through 2 + 2 unit-gain layers, cross-attention and the MLP the
    # [CLS] feature moves by ~1e-6 relative, the score (|score| ~ 1, divided by std ~1) by ~1e-6: 1e-5 with margin
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-2  # the images and prompts are told apart, so the comparison means something


def test_image_reward_gpu_parameters_count_what_the_score_uses(files, reward):
    checkpoint, _, state = files
    used = sum(t.numel() for k, t in state.items() if not k.startswith(("blip.vision_proj", "blip.text_proj"))) - (
        state["blip.text_encoder.embeddings.position_ids"].numel()
    )  # every tensor of the file but the two projections and the position index
    loaded = sum(p.numel() for module in (reward.vision, reward.text, reward.mlp) for p in module.parameters())
    assert ImageReward.gpu_parameters(checkpoint=str(checkpoint), vit=TINY_VIT, tokenizer="unused") == loaded == used


def test_image_reward_gpu_parameters_of_the_released_model(files, tmp_path):
    import json

    # med_config.json of THUDM/ImageReward (train/src/config/med_config.json): BERT-base with cross-attention
    med = {"hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
           "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
           "vocab_size": 30524}  # fmt: skip
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    # ViT-L/16 at 224 px: 24 blocks of 12 d^2 + 13 d (qkv, proj, fc1, fc2 with biases, two LayerNorms) at d = 1024,
    # the 16 x 16 x 3 patch convolution with bias, the cls token, 197 positions and the final LayerNorm: 303,301,632
    d = 1024
    vit = 24 * (12 * d * d + 13 * d) + (3 * 16 * 16 * d + d) + d + 197 * d + 2 * d
    assert vit == 303_301_632  # timm's vit_large_patch16_224 without its 1000-class head
    # BERT-base with cross-attention to 1024-wide image tokens: embeddings (words, 512 positions, LayerNorm), then per
    # layer self-attention (4 t^2 + 4 t), its LayerNorm, cross-attention (2 t^2 + 2 t for query and output, 2 (1024 t
    # + t) for key and value), its LayerNorm, the feed-forward (2 t 3072 + 3072 + t) and its LayerNorm
    t = 768
    attention, cross = 4 * t * t + 4 * t, 2 * t * t + 2 * t + 2 * (1024 * t + t)
    layer = attention + 2 * t + cross + 2 * t + (2 * t * 3072 + 3072 + t) + 2 * t
    text = 30524 * t + 512 * t + 2 * t + 12 * layer
    mlp = (768 * 1024 + 1024) + (1024 * 128 + 128) + (128 * 64 + 64) + (64 * 16 + 16) + (16 + 1)
    assert ImageReward.gpu_parameters(checkpoint=str(tmp_path / "ImageReward.pt")) == vit + text + mlp


def test_image_reward_pickles_as_its_arguments(reward):
    blob = pickle.dumps(reward)
    assert len(blob) < 10_000  # its configuration, not its weights
    images = _images(2, 64, 80, seed=4)
    np.testing.assert_array_equal(
        pickle.loads(blob)(images, PROMPTS[:2], [{}] * 2).scores, reward(images, PROMPTS[:2], [{}] * 2).scores
    )


def test_image_reward_refuses_bad_inputs(files, tmp_path):
    checkpoint, tokenizer, state = files
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ImageReward(str(tmp_path / "ImageReward.pt"), str(tokenizer), vit=TINY_VIT)
    with pytest.raises(FileNotFoundError, match="med_config"):
        ImageReward(str(checkpoint), str(tokenizer), med_config=str(tmp_path / "none.json"), vit=TINY_VIT)
    with pytest.raises(ValueError, match="dtype"):
        ImageReward(str(checkpoint), str(tokenizer), vit=TINY_VIT, dtype="int8")
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.layers.7")}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_bytes((checkpoint.parent / "med_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"MLP does not fit .*missing \['7.bias', '7.weight'\]"):
        ImageReward(str(tmp_path / "ImageReward.pt"), str(tokenizer), vit=TINY_VIT, device="cpu")
    with pytest.raises(ValueError, match="ViT does not fit"):  # a checkpoint of another ViT than the one configured
        ImageReward(str(checkpoint), str(tokenizer), vit={**TINY_VIT, "intermediate_size": 32}, device="cpu")


def test_image_reward_in_the_memory_plan(files):
    from grpo_image.planning.decoder_sizes import reward_parts

    checkpoint, tokenizer, _ = files
    scorer = {"_component_": "rewards.image_reward.ImageReward", "checkpoint": str(checkpoint),
              "tokenizer": str(tokenizer), "vit": TINY_VIT}  # fmt: skip
    parts, unknown = reward_parts([{"name": "ir", "scorer": scorer}])
    expected = ImageReward.gpu_parameters(str(checkpoint), vit=TINY_VIT)
    assert unknown == [] and [(p.name, p.params) for p in parts] == [("ir: ImageReward", expected)]
    assert parts[0].dtype_bytes == 4  # fp32, the reference's precision and the reward's default
    (half,), _ = reward_parts([{"name": "ir", "scorer": {**scorer, "dtype": "bfloat16"}}])
    assert half.dtype_bytes == 2
