"""HPSv2, CLIPScore, PickScore and Aesthetic with tiny random models of the real classes.

Each test writes weights in the real on-disk format (an HPS checkpoint {"state_dict": ...}, a save_pretrained
CLIP folder, a LAION head file), lets the reward load them, and checks its scores against the same formula
computed directly in the test, through a different code path where one exists (CLIPModel's forward for the CLIP
rewards, hand-written resize-and-pad preprocessing for HPS).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import grpo_image  # noqa: F401, I001  (first: makes torchvision importable before open_clip / transformers CLIP)
import open_clip

from rewards.aesthetic import Aesthetic
from rewards.clip_score import CLIPScore
from rewards.hpsv2 import HPSv2
from rewards.pickscore import PickScore
from tests.helpers_rewards import write_tiny_hps

PROMPTS = ["a red cat", "two dogs on a hill", "a tiny house"]


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)  # uint8 [n, h, w, 3]


# ---------------------------------------------------------------- HPSv2


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A tiny open_clip config folder and an HPS-format checkpoint of a seeded model built from it."""
    return write_tiny_hps(tmp_path_factory.mktemp("hps"), seed=1)


def hps_direct(model, tokenizer, image: np.ndarray, prompt: str) -> float:
    """HPS as its reference scores, re-stated from tgxs002/HPSv2 (hpsv2/src/open_clip/transform.py `image_transform`
    with resize_longest_max=True, `ResizeMaxSize`; hpsv2/img_score.py): ToTensor, then the float tensor's longest side
    to 224 (bicubic), zero padding [left, top, right, bottom] = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2],
    Normalize(OpenAI mean/std); score = diagonal of normalised image features @ normalised text features.T."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as F

    x = T.ToTensor()(Image.fromarray(image).convert("RGB"))  # float32 [3, H, W] in [0, 1]
    height, width = x.shape[1:]
    scale = 224 / float(max(height, width))
    new_size = tuple(round(dim * scale) for dim in (height, width))
    x = F.resize(x, new_size, T.InterpolationMode.BICUBIC)
    pad_h, pad_w = 224 - new_size[0], 224 - new_size[1]
    x = F.pad(x, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    x = T.Normalize(mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)(x)
    with torch.no_grad():
        image_features = model.encode_image(x[None], normalize=True)  # [1, D]
        text_features = model.encode_text(tokenizer([prompt]), normalize=True)  # [1, D]
    return float((image_features @ text_features.T).diagonal().item())


def hps_uint8_first(model, tokenizer, image: np.ndarray, prompt: str) -> float:
    """The order this reward used before: PIL resizes the uint8 image (rounding every pixel to 1/255), then pads."""
    pil = Image.fromarray(image)
    scale = 224 / max(pil.size)
    w, h = round(pil.size[0] * scale), round(pil.size[1] * scale)
    canvas = Image.new("RGB", (224, 224), (0, 0, 0))
    canvas.paste(pil.resize((w, h), Image.BICUBIC), ((224 - w) // 2, (224 - h) // 2))
    x = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255  # [3, 224, 224]
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    with torch.no_grad():
        image_features = model.encode_image(((x - mean) / std)[None])  # [1, D]
        text_features = model.encode_text(tokenizer([prompt]))  # [1, D]
    return float(torch.cosine_similarity(image_features, text_features).item())


def test_hpsv2_matches_direct_computation(hps_files):
    model_name, checkpoint, model = hps_files
    reward = HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu", batch_size=2)
    tokenizer = open_clip.get_tokenizer(model_name)
    for shape in [(49, 80), (80, 30)]:  # wide with odd padding (43 + 44 rows), and tall
        images = _images(3, *shape)
        scores = reward(images, PROMPTS, [{}] * 3).scores
        assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
        expected = [hps_direct(model, tokenizer, image, prompt) for image, prompt in zip(images, PROMPTS)]
        # fp32 both ways (HPS's autocast is CUDA-only); batches of 2 against one image at a time change the matmuls'
        # blocking, so each dot product sums in another order (a few float32 ULPs, ~1e-7 relative, per layer of the
        # tiny ViT and text tower); the cosine of unit vectors then moves by ~1e-6: 1e-5 is that with a 10x margin
        np.testing.assert_allclose(scores, expected, atol=1e-5)
    # The order matters and the test sees it: resizing the uint8 image first moves these noisy images' scores by
    # several times the tolerance.
    uint8_first = [hps_uint8_first(model, tokenizer, image, prompt) for image, prompt in zip(images, PROMPTS)]
    assert np.abs(np.array(uint8_first) - expected).max() > 3e-5
    # The checkpoint really was loaded: a model with other weights scores differently.
    torch.manual_seed(2)
    other = open_clip.create_model(model_name).eval()
    assert abs(hps_direct(other, tokenizer, images[0], PROMPTS[0]) - expected[0]) > 1e-3


def test_hpsv2_precision_option(hps_files):
    model_name, checkpoint, _ = hps_files
    images = _images(2, 40, 56)
    amp = HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu")
    fp32 = HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu", dtype="float32")
    bf16 = HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu", dtype="bfloat16")
    assert amp.dtype == torch.float32 and not amp.autocast  # HPS's "amp" is fp32 weights; autocast only on CUDA
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_array_equal(amp(images, PROMPTS[:2], [{}] * 2).scores, fp32(images, PROMPTS[:2], [{}] * 2).scores)
    low = bf16(images, PROMPTS[:2], [{}] * 2).scores
    # bf16 keeps 8 bits of mantissa (relative error 2^-9 = 2e-3 per rounding); through the tiny towers the cosine
    # of unit vectors moves by a few 1e-3, never by 5e-2, and the scores stay finite
    assert np.isfinite(low).all() and np.abs(low - fp32(images, PROMPTS[:2], [{}] * 2).scores).max() < 5e-2
    with pytest.raises(ValueError, match="dtype"):
        HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu", dtype="fp8")


def test_hpsv2_finds_the_hpsv2_cache_folder(hps_files, tmp_path, monkeypatch):
    model_name, checkpoint, _ = hps_files
    monkeypatch.setenv("HPS_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HPS_v2_compressed.pt"):
        HPSv2(version="v2.0", model_name=model_name, device="cpu")
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(checkpoint.read_bytes())
    images = _images(1, 64, 64)
    cached = HPSv2(version="v2.0", model_name=model_name, device="cpu")
    assert cached.checkpoint_path == tmp_path / "HPS_v2_compressed.pt"
    direct = HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu")
    np.testing.assert_array_equal(cached(images, ["x"], [{}]).scores, direct(images, ["x"], [{}]).scores)


def test_hpsv2_rejects_bad_inputs(hps_files, tmp_path):
    model_name, checkpoint, _ = hps_files
    with pytest.raises(ValueError, match="version"):
        HPSv2(version="v3", checkpoint=str(checkpoint))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HPSv2(checkpoint=str(tmp_path / "missing.pt"), model_name=model_name)
    torch.save({"model": {}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="state_dict"):
        HPSv2(checkpoint=str(tmp_path / "wrong.pt"), model_name=model_name, device="cpu")


# ---------------------------------------------------------------- transformers CLIP: CLIPScore, PickScore, Aesthetic


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel with its processor, saved with save_pretrained like a hub snapshot."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789")
    vocab = {token: i for i, token in enumerate(letters + [t + "</w>" for t in letters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])  # no merges: one token per character
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=40, bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], **tiny,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tiny),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def clip_direct(path, images: np.ndarray, prompts: list[str]):
    """CLIPModel's own forward: (logits_per_image diagonal, logit scale, normalised image embeddings)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    processor = CLIPProcessor.from_pretrained(path)
    inputs = processor(text=prompts, images=[Image.fromarray(im) for im in images], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal().numpy(), float(model.logit_scale.exp().detach()), out.image_embeds


@pytest.fixture(scope="module")
def flipped_clip_dir(clip_dir, tmp_path_factory):
    """The tiny CLIP with its text projection negated: its cosines change sign, so that CLIP score's clamp at 0
    keeps these test images' scores (the random model's are mostly negative) and a prefix shows in them."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    path = tmp_path_factory.mktemp("clip_flipped")
    model.save_pretrained(path)
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(path)
    return path


def test_clip_score_and_pickscore_match_clip_forward(clip_dir, flipped_clip_dir):
    images = _images(3, 40, 60)
    logits, scale, _ = clip_direct(clip_dir, images, PROMPTS)  # logits = scale * cosine
    pick = PickScore(str(clip_dir), device="cpu", batch_size=2)(images, PROMPTS, [{}] * 3).scores
    assert pick.dtype == np.float32 and pick.shape == (3,)
    # batched against one forward of every image: the cosine's summation order differs (~1e-6, as for HPSv2
    # above); PickScore is the cosine times the model's logit scale (exp(2.6592) = 14.3 here), hence 1e-4
    np.testing.assert_allclose(pick, logits, atol=1e-4)
    # CLIP score, the reference's formula (jmhessel/clipscore): w * clip(cos(image, "A photo depicts " + caption), 0),
    # w = 2.5: 2.5 times the cosine, hence 1e-5
    plain, _, _ = clip_direct(flipped_clip_dir, images, PROMPTS)
    hessel, _, _ = clip_direct(flipped_clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    clip = CLIPScore(str(flipped_clip_dir), device="cpu", batch_size=2)(images, PROMPTS, [{}] * 3).scores
    bare = CLIPScore(str(flipped_clip_dir), device="cpu", prefix="")(images, PROMPTS, [{}] * 3).scores
    assert clip.dtype == np.float32 and clip.shape == (3,) and (clip > 0).all()
    np.testing.assert_allclose(clip, 2.5 * np.maximum(hessel / scale, 0), atol=1e-5)
    np.testing.assert_allclose(bare, 2.5 * np.maximum(plain / scale, 0), atol=1e-5)
    assert np.abs(clip - bare).max() > 0.1  # the prefix changes the cosine itself (by 0.1-0.5 here)
    # Hessel's rule: a prefix without a trailing space gets one.
    spaced = CLIPScore(str(clip_dir), device="cpu", prefix="A photo depicts")
    assert spaced.prefix == "A photo depicts " and spaced.encoder.dtype == torch.float32  # the reference's on CPU
    # The separate processor path (PickScore ships its processor apart from its weights) gives the same.
    separate = PickScore(str(clip_dir), processor_path=str(clip_dir), device="cpu")
    np.testing.assert_allclose(separate(images, PROMPTS, [{}] * 3).scores, pick, atol=1e-6)  # same batches: same sums


def test_clip_rewards_precision_option(clip_dir):
    images = _images(2, 40, 60)
    fp32 = PickScore(str(clip_dir), device="cpu")
    bf16 = PickScore(str(clip_dir), device="cpu", dtype="bfloat16")
    assert fp32.encoder.dtype == torch.float32 and bf16.encoder.dtype == torch.bfloat16
    assert next(bf16.encoder.model.parameters()).dtype == torch.bfloat16
    high, low = fp32(images, PROMPTS[:2], [{}] * 2).scores, bf16(images, PROMPTS[:2], [{}] * 2).scores
    # bf16 rounds to 2^-9 relative per operation; the cosine moves by a few 1e-3 through the one-layer towers, times
    # the logit scale 14.3: well under 0.5, and the scores stay float32
    assert low.dtype == np.float32 and np.abs(high - low).max() < 0.5
    with pytest.raises(ValueError, match="dtype"):
        CLIPScore(str(clip_dir), device="cpu", dtype="half")


def _laion_mlp(dim: int) -> torch.nn.Module:
    """The improved aesthetic predictor's layout: its state dict keys are layers.{0,2,4,6,7}.*."""
    holder = torch.nn.Module()
    holder.layers = torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    )
    return holder


@pytest.mark.parametrize("kind", ["linear.pth", "mlp.pth", "linear.safetensors"])
def test_aesthetic_matches_head_on_normalised_embeddings(clip_dir, tmp_path, kind):
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 1) if kind.startswith("linear") else _laion_mlp(16)
    path = tmp_path / f"head_{kind}"
    if kind.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(head.state_dict(), str(path))
    else:
        torch.save(head.state_dict(), path)
    images = _images(3, 40, 60)
    scores = Aesthetic(str(clip_dir), str(path), device="cpu")(images, PROMPTS, [{}] * 3).scores
    _, _, embeds = clip_direct(clip_dir, images, PROMPTS)  # [3, 16], already unit norm
    with torch.no_grad():
        expected = (head(embeds) if isinstance(head, torch.nn.Linear) else head.layers.eval()(embeds))[:, 0]
    assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
    # a unit-norm embedding (cosine-level error ~1e-6, as above) through a head whose weights are O(0.3): 1e-5
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)


def test_aesthetic_rejects_unknown_head(clip_dir, tmp_path):
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="neither a linear head"):
        Aesthetic(str(clip_dir), str(tmp_path / "odd.pth"), device="cpu")


# ---------------------------------------------------------------- pickling


def test_model_rewards_pickle_round_trip(hps_files, clip_dir, tmp_path):
    model_name, checkpoint, _ = hps_files
    torch.save(torch.nn.Linear(16, 1).state_dict(), tmp_path / "head.pth")
    rewards = [
        HPSv2(checkpoint=str(checkpoint), model_name=model_name, device="cpu", dtype="float32"),
        CLIPScore(str(clip_dir), device="cpu", prefix="a picture of"),
        PickScore(str(clip_dir), device="cpu"),
        Aesthetic(str(clip_dir), str(tmp_path / "head.pth"), device="cpu"),
    ]
    images = _images(2, 48, 48)
    for reward in rewards:
        blob = pickle.dumps(reward)
        assert len(blob) < 10_000  # pickled as its configuration, not its weights
        clone = pickle.loads(blob)
        expected = reward(images, PROMPTS[:2], [{}] * 2).scores
        np.testing.assert_array_equal(clone(images, PROMPTS[:2], [{}] * 2).scores, expected)
