"""HPSv3 on a tiny model of its real classes, against the reference's computation restated here.

The checkpoint is written as HPSv3's own code saves it (transformers 4.45 names, `rm_head`); the expected score is
computed without the reward's code: the reference's resize (qwen_vl_utils' smart_resize at 256 * 28 * 28 pixels, PIL
bicubic), its rescale, normalisation and patch layout (transformers 4.45's Qwen2VLImageProcessor), its text (the
chat template rendered by hand around the instruction), plain positions, the Qwen2VLForConditionalGeneration the
checkpoint was saved from, and the head on the `<|Reward|>` token.
"""

from __future__ import annotations

import hashlib
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import grpo_image  # noqa: F401, I001  (first: makes torchvision importable before transformers)

from rewards.hpsv3 import HPSv3, model_inputs
from tests.helpers_reward_models import write_tiny_hpsv3

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "two dogs on a hill at dawn", "x"]
PIXELS = 256 * 28 * 28  # hpsv3/inference.py prepare_batch: min_pixels = max_pixels
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # Qwen2-VL's


@pytest.fixture(scope="module")
def hpsv3_files(tmp_path_factory):
    return write_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"), seed=1)


@pytest.fixture(scope="module")
def reward(hpsv3_files):
    base, checkpoint, _, _ = hpsv3_files
    return HPSv3(str(checkpoint), str(base), dtype="float32", device="cpu", batch_size=2)


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)  # uint8 [n, h, w, 3]


def reference_resize(height: int, width: int, factor: int = 28) -> tuple[int, int]:
    """qwen_vl_utils' smart_resize (hpsv3/dataset/utils.py) with min_pixels = max_pixels = PIXELS."""
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > PIXELS:
        beta = math.sqrt(height * width / PIXELS)
        return math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    if h_bar * w_bar < PIXELS:
        beta = math.sqrt(PIXELS / (height * width))
        return math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_pixels(image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One image as the reference feeds it: (pixel_values [h * w / 196, 1176], image_grid_thw [1, 3])."""
    height, width = reference_resize(*image.shape[:2])
    resized = Image.fromarray(image).resize((width, height), Image.BICUBIC)
    x = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3], 4.45's rescale
    x = ((x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).transpose(2, 0, 1)  # [3, H, W]
    patches = np.tile(x[None], (2, 1, 1, 1))  # [2, 3, H, W]: one image fills both temporal slots
    gh, gw = height // 14, width // 14
    patches = patches.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(patches.reshape(gh * gw, 3 * 2 * 14 * 14)), torch.tensor([[1, gh, gw]])


def reference_text(prompt: str, image_tokens: int) -> str:
    """Qwen2-VL-7B-Instruct's chat template rendered by hand for one image and HPSv3's text."""
    inputs = model_inputs()
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * image_tokens + "<|vision_end|>" + inputs["instruction"].format(text_prompt=prompt)
        + inputs["suffix"] + "<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip


def reference_mu(model, head, tokenizer, image: np.ndarray, prompt: str, positions: str = "plain") -> float:
    """HPSv3's mu for one image, the reference's way (batch of one, so no padding)."""
    pixel_values, grid = reference_pixels(image)
    ids = tokenizer(reference_text(prompt, int(grid.prod()) // 4), return_tensors="pt").input_ids  # [1, T]
    if positions == "plain":
        where = {"position_ids": torch.arange(ids.shape[1])[None]}  # [1, T]
    else:  # Qwen2-VL's own 3-D positions, from the image tokens' places
        where = {"mm_token_type_ids": (ids == model.config.image_token_id).int()}  # [1, T]
    with torch.no_grad():
        hidden = model.model(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, **where).last_hidden_state
        token = ids[0].tolist().index(tokenizer.convert_tokens_to_ids("<|Reward|>"))
        return float(head(hidden[0, token].float())[0])


@pytest.fixture(scope="module")
def reference_tokenizer(hpsv3_files):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hpsv3_files[0])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    return tokenizer


def test_hpsv3_instruction_is_the_references_byte_for_byte():
    inputs = model_inputs()
    # SHA-256 of hpsv3 1.0.0's `INSTRUCTION` (2,523 characters) and `prompt_with_special_token` (67), taken from
    # hpsv3/dataset/data_collator_qwen.py in the wheel whose sha256 model_inputs/hpsv3.yaml records
    assert hashlib.sha256(inputs["instruction"].encode()).hexdigest() == (
        "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
    )
    assert hashlib.sha256(inputs["suffix"].encode()).hexdigest() == (
        "2471faca094ae5bd6fe17b71dce20c3d7583625545e235889f7e74e7eeb69d0a"
    )
    assert inputs["suffix"] == "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
    assert inputs["instruction"].endswith("Textual prompt - {text_prompt}\n\n\n")
    assert inputs["reward_token"] == "<|Reward|>" and inputs["pixels"] == PIXELS


def test_hpsv3_sends_the_reference_text(reward, reference_tokenizer):
    images = _images(2, 300, 500)
    batch = reward.encode([Image.fromarray(im) for im in images], PROMPTS[:2])
    for row, (image, prompt) in enumerate(zip(images, PROMPTS[:2])):
        grid = reference_pixels(image)[1]
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert reference_tokenizer.decode(ids) == reference_text(prompt, int(grid.prod()) // 4)
    assert batch["attention_mask"][1].all() and not batch["attention_mask"][0].all()  # right padding: row 0 shorter
    length = batch["input_ids"].shape[1]
    assert torch.equal(batch["position_ids"], torch.arange(length).expand(2, length))


@pytest.mark.parametrize("shape", [(300, 500), (448, 448), (700, 260)])  # upscaled, exact, downscaled
def test_hpsv3_preprocessing_is_the_references(reward, shape):
    image = _images(1, *shape)[0]
    pixel_values, grid = reference_pixels(image)
    batch = reward.encode([Image.fromarray(image)], ["p"])
    assert torch.equal(batch["image_grid_thw"], grid)
    # float32 both ways; numpy's float64 rescale before the cast against the processor's own order: 1 ULP (6e-8
    # relative) of values up to 2.2, through the division by std (~0.27): below 1e-6
    np.testing.assert_allclose(batch["pixel_values"].numpy(), pixel_values.numpy(), atol=1e-6)


def test_hpsv3_scores_like_the_reference(hpsv3_files, reward, reference_tokenizer):
    base, checkpoint, model, head = hpsv3_files
    images = _images(3, 300, 500, seed=2)
    scores = reward(images, PROMPTS, [{}] * 3).scores
    assert scores.dtype == np.float32 and scores.shape == (3,) and np.isfinite(scores).all()
    expected = [reference_mu(model, head, reference_tokenizer, im, p) for im, p in zip(images, PROMPTS)]
    # fp32 both ways; batches of 2 with right padding against one unpadded sequence change the blocking of every
    # matmul (a few float32 ULPs, ~1e-7 relative, per op); over ~2,800 tokens, 2 vision and 2 language layers at unit
    # gain and the head, hidden states move by ~1e-6 relative and mu (|mu| < 1) by ~1e-6: 1e-5 is that with a 10x margin
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 1e-2  # the images and prompts are told apart, so the comparison means something
    # Qwen2-VL's own 3-D image positions give another score: the reference's plain positions matter.
    other = reference_mu(model, head, reference_tokenizer, images[0], PROMPTS[0], positions="3d")
    assert abs(other - expected[0]) > 1e-3


def test_hpsv3_bf16_default_stays_near_fp32(hpsv3_files, reward):
    base, checkpoint, _, _ = hpsv3_files
    images = _images(2, 448, 448, seed=3)
    bf16 = HPSv3(str(checkpoint), str(base), device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.head[0].weight.dtype == torch.float32  # the reference's precision
    # torch's bf16 SDPA kernel on the CPU needs AVX-512 dispatch (under ATEN_CPU_CAPABILITY=avx2 it raises), so the
    # bf16 model runs here with eager attention: the same attention, written out
    bf16.model.set_attn_implementation("eager")
    fp32 = reward(images, PROMPTS[:2], [{}] * 2).scores
    # bf16 keeps 8 significant bits (2^-9 = 0.2% relative rounding per op); through 4 unit-gain layers and the head
    # the errors add up to a few percent of |mu| ~ 1 at worst: 0.1 bounds it
    np.testing.assert_allclose(bf16(images, PROMPTS[:2], [{}] * 2).scores, fp32, atol=0.1)


def test_hpsv3_gpu_parameters_count_the_loaded_model(hpsv3_files, reward):
    base, _, model, head = hpsv3_files
    loaded = sum(p.numel() for module in (reward.model, reward.head) for p in module.parameters())
    built = sum(p.numel() for p in model.parameters()) - model.lm_head.weight.numel() + sum(
        p.numel() for p in head.parameters()
    )  # the whole checkpoint but the language model head, which the score never reads
    assert HPSv3.gpu_parameters(base_model=str(base), checkpoint="unused") == loaded == built


def test_hpsv3_pickles_as_its_arguments(reward):
    blob = pickle.dumps(reward)
    assert len(blob) < 10_000  # its configuration, not its weights
    images = _images(2, 300, 300, seed=4)
    np.testing.assert_array_equal(
        pickle.loads(blob)(images, PROMPTS[:2], [{}] * 2).scores, reward(images, PROMPTS[:2], [{}] * 2).scores
    )


def test_hpsv3_refuses_bad_inputs(hpsv3_files, reward, tmp_path):
    from safetensors.torch import load_file, save_file

    base, checkpoint, _, _ = hpsv3_files
    with pytest.raises(FileNotFoundError, match="HPSv3.safetensors"):
        HPSv3(str(tmp_path / "missing.safetensors"), str(base))
    with pytest.raises(ValueError, match="dtype"):
        HPSv3(str(checkpoint), str(base), dtype="int8")
    state = load_file(str(checkpoint))
    save_file({k: v for k, v in state.items() if not k.startswith("rm_head.")}, str(tmp_path / "no_head.safetensors"))
    with pytest.raises(ValueError, match="not an HPSv3 checkpoint"):
        HPSv3(str(tmp_path / "no_head.safetensors"), str(base), device="cpu")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1]  # saved before the reward token
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        HPSv3(str(tmp_path / "short.safetensors"), str(base), device="cpu")
    with pytest.raises(ValueError, match="reward token"):
        reward(_images(1, 64, 64), ["a <|Reward|> b"], [{}])


def test_hpsv3_in_the_memory_plan(hpsv3_files):
    from grpo_image.planning.decoder_sizes import reward_parts

    base, checkpoint, _, _ = hpsv3_files
    scorer = {"_component_": "rewards.hpsv3.HPSv3", "checkpoint": str(checkpoint), "base_model": str(base)}
    parts, unknown = reward_parts([{"name": "hps3", "scorer": scorer}])
    assert unknown == [] and [(p.name, p.params) for p in parts] == [("hps3: HPSv3", HPSv3.gpu_parameters(str(base)))]
    assert parts[0].dtype_bytes == 2  # bf16, the reference's precision and the reward's default
