"""Janus-Pro through transformers' Janus classes: prompt rows, checkpoint round trip, our sampler against transformers'
own image-generation path, sampled = teacher-forced log-probs, LoRA, and the VQ decoder.

Every model here is a tiny `JanusForConditionalGeneration` built from a `JanusConfig` (real classes, random seeded
weights), saved with `save_pretrained` and loaded back by `janus_policy` the way a Janus-Pro folder is.
"""

import json

import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicCache
from transformers.generation.logits_process import ClassifierFreeGuidanceLogitsProcessor

from grpo_image.decoders.vq import JanusVQDecoder, to_uint8
from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.policies.janus import BOI, BOS, JanusPolicy, janus_policy, tiny_janus_policy
from grpo_image.training.weights import LoraWeights
from grpo_image.core.sampling import SamplingSettings, left_pad, policy_rows, sample_codes
from tests.helpers_sampling import logprob_tolerance, position_logits, roundings_to_a_logit

PROMPTS = ["a red square", "x", "  a cat on a mat, seen from above "]  # unequal lengths: left padding; one stripped
SEEDS = torch.tensor([5, 6, 7])
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def janus_tolerance(policy, codes: torch.Tensor, cfg_scale: float = 1.0, temperature: float = 1.0) -> float:
    """How far two fp32 computations of these codes' log-probs may lie apart (`logprob_tolerance`): 2 LLaMA layers of
    hidden 32, MLP 64, heads of 8 over at most P + L - 1 keys, then the generation head's projection (32 terms more),
    on the largest raw logit the model gives these codes."""
    tokens = max(len(row) for row in policy.encode(PROMPTS)) + codes.shape[1] - 1
    roundings = roundings_to_a_logit(layers=2, hidden=32, intermediate=64, head_dim=8, tokens=tokens) + 32
    max_logit = position_logits(policy, PROMPTS, codes, SamplingSettings()).abs().max().item()
    return logprob_tolerance(roundings, max_logit, cfg_scale=cfg_scale, temperature=temperature)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def make_tiny() -> JanusPolicy:
    # weights of std 0.3 spread the code logits, so that greedy choices are clear and CFG changes them
    return tiny_janus_policy(side=4, num_codes=32, initializer_range=0.3, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_janus")
    make_tiny().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def janus(folder) -> JanusPolicy:
    return janus_policy(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def processor(janus):
    """transformers' Janus processor over the checkpoint's tokenizer; mean/std 0.5 as in Janus-Pro's preprocessor."""
    from transformers import JanusImageProcessor, JanusProcessor  # after grpo_image (its torchvision shim)

    image_processor = JanusImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return JanusProcessor(image_processor=image_processor, tokenizer=janus.tokenizer, num_image_tokens=16)


def chat(prompt: str) -> str:
    """What Janus's chat template gives for one user message with add_generation_prompt=True."""
    return f"<|User|>: {prompt.strip()}\n\n<|Assistant|>:"


def processor_inputs(processor, prompts):
    return processor(text=[chat(p) for p in prompts], generation_mode="image", padding=True, return_tensors="pt")


# 1. prompt rows ---------------------------------------------------------------------------------------------------


def test_rows_follow_janus_format_and_equal_the_processor_and_generate_masking(janus, processor):
    tokenizer = janus.tokenizer
    rows = janus.encode(PROMPTS)
    assert tokenizer.decode(rows[0]) == BOS + "<|User|>: a red square\n\n<|Assistant|>:" + BOI
    assert tokenizer.decode(rows[2]) == BOS + "<|User|>: a cat on a mat, seen from above\n\n<|Assistant|>:" + BOI
    uncond = janus.encode(PROMPTS, unconditional=True)
    pad, bos, boi = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids(BOI)
    for row, empty in zip(rows, uncond):  # Janus: tokens[1:-1] = pad_id, same length as the prompt's row
        assert empty == [bos] + [pad] * (len(row) - 2) + [boi]
    # transformers: JanusProcessor(generation_mode="image") appends <begin_of_image> and the tokenizer adds BOS
    inputs = processor_inputs(processor, PROMPTS)
    ids, mask = left_pad(rows, pad, torch.device("cpu"))  # [3, P]
    assert torch.equal(ids, inputs["input_ids"]) and torch.equal(mask, inputs["attention_mask"])
    # generate(generation_mode="image") step 7: every token but BOS and BOI of the second half becomes pad
    tokens = inputs["input_ids"].clone()
    tokens.masked_fill_((tokens != bos) & (tokens != boi), pad)
    uncond_ids, uncond_mask = left_pad(uncond, pad, torch.device("cpu"))
    assert torch.equal(uncond_ids, tokens) and torch.equal(uncond_mask, inputs["attention_mask"])


# 2. checkpoint ----------------------------------------------------------------------------------------------------


def test_loaded_checkpoint_equals_the_saved_policy(folder, janus):
    saved = json.loads((folder / "generation_config.json").read_text())
    assert saved["generation_kwargs"]["boi_token_id"] == janus.boi_token_id  # what generate(image) reads
    assert json.loads((folder / "config.json").read_text())["model_type"] == "janus"
    assert (janus.grid, janus.num_codes, janus.image_token_offset) == ((4, 4), 32, len(janus.tokenizer))
    codes = torch.tensor([[0, 31, 3, 7, 7, 1, 2, 9, 30, 4, 4, 4, 8, 16, 0, 5]])
    settings = SamplingSettings(cfg_scale=5.0)
    with torch.no_grad():
        before = teacher_forced_logprobs(make_tiny(), ["a cat"], codes, settings)
        after = teacher_forced_logprobs(janus, ["a cat"], codes, settings)
    assert torch.equal(before, after)
    model = janus.model
    assert not any(p.requires_grad for p in model.model.vqmodel.parameters())
    assert not any(p.requires_grad for p in model.model.vision_model.parameters())
    assert model.model.generation_head.vision_head.weight.requires_grad
    assert model.model.language_model.embed_tokens.weight.requires_grad


def test_deepseeks_original_layout_is_refused_with_a_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality", "language_config": {}}))
    with pytest.raises(ValueError, match="deepseek-community/Janus-Pro"):
        janus_policy(str(tmp_path))


# 3. our sampler and log-probs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    SamplingSettings(),
    SamplingSettings(cfg_scale=5.0),
    SamplingSettings(cfg_scale=5.0, temperature=0.8, top_k=8, top_p=0.9),
], ids=["plain", "cfg5", "cfg5_filters"])
def test_sampled_logprobs_equal_teacher_forced_and_never_touch_lm_head(janus, settings):
    def refuse(module, args, output):
        raise AssertionError("the text head ran")

    hook = janus.model.lm_head.register_forward_hook(refuse)
    try:
        codes, sampled = sample_codes(janus, PROMPTS, SEEDS, settings)  # [3, 16]
        with torch.no_grad():
            forced = teacher_forced_logprobs(janus, PROMPTS, codes, settings, chunk=5)
    finally:
        hook.remove()
    assert codes.shape == (3, 16) and codes.min() >= 0 and codes.max() < 32
    assert torch.isfinite(sampled).all() and (sampled <= 0).all()
    assert max_diff(forced, sampled) <= janus_tolerance(janus, codes, settings.cfg_scale, settings.temperature)
    again, _ = sample_codes(janus, PROMPTS[1:2], SEEDS[1:2], settings)  # a sample depends on its seed and prompt only
    assert torch.equal(again, codes[1:2])


# 4. against transformers' own Janus generation path ---------------------------------------------------------------


def test_greedy_cfg_codes_equal_transformers_generate(janus, processor):
    inputs = processor_inputs(processor, PROMPTS)
    theirs = janus.model.generate(**inputs, generation_mode="image", do_sample=False, guidance_scale=5)  # [3, 16]
    ours, _ = sample_codes(janus, PROMPTS, SEEDS, SamplingSettings(cfg_scale=5.0, top_k=1))  # top-1 = argmax
    assert torch.equal(ours, theirs.long())


def transformers_scores(model, processor, prompts, codes, cfg_scale):
    """JanusForConditionalGeneration.generate(generation_mode="image") of transformers (modeling_janus.py: step 7 and
    its loop), fed the given codes instead of drawing them: raw generation-head scores [2B, L, V] and the
    ClassifierFreeGuidanceLogitsProcessor output [B, L, V]."""
    tokenizer = processor.tokenizer
    inputs = processor_inputs(processor, prompts)
    b = len(prompts)
    tokens = inputs["input_ids"].repeat(2, 1)  # [2B, P]
    keep = (tokens[b:] == tokenizer.bos_token_id) | (tokens[b:] == tokenizer.convert_tokens_to_ids(BOI))
    tokens[b:].masked_fill_(~keep, tokenizer.pad_token_id)
    mask = inputs["attention_mask"].repeat(2, 1)  # [2B, P]
    embeds = model.get_input_embeddings()(tokens)  # [2B, P, H]
    cache = DynamicCache(config=model.config.text_config)
    guidance = ClassifierFreeGuidanceLogitsProcessor(cfg_scale)
    raw, guided = [], []
    for t in range(codes.shape[1]):
        out = model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, cache=cache, use_cache=True
        )  # no position_ids, as generate passes none
        scores = model.model.generation_head(out.last_hidden_state[:, -1, :])  # [2B, V]
        raw.append(scores)
        guided.append(guidance(inputs["input_ids"], scores))  # [B, V]
        step = torch.cat([codes[:, t], codes[:, t]]).unsqueeze(-1)  # [2B, 1]
        embeds = model.prepare_embeddings_for_image_generation(step)  # [2B, 1, H]
        mask = torch.cat([mask, mask.new_ones(2 * b, 1)], dim=1)
    return torch.stack(raw, dim=1), torch.stack(guided, dim=1)


def our_raw_logits(policy, prompts, codes):
    """Our image logits of the cond + uncond rows, teacher-forced in one forward as logprobs.py lays them out."""
    prefix, prefix_mask = left_pad(policy_rows(policy, prompts, True), policy.pad_token_id, policy.device)  # [2B, P]
    code_ids = policy.codes_to_ids(codes[:, :-1]).repeat(2, 1)  # [2B, L-1]
    ids = torch.cat([prefix, code_ids], dim=1)
    mask = torch.cat([prefix_mask, torch.ones_like(code_ids)], dim=1)
    hidden, _ = policy.forward_hidden(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))  # [2B, P+L-1, H]
    return policy.image_logits(hidden[:, prefix.shape[1] - 1 :])  # [2B, L, V]


def test_cfg_logits_and_logprobs_equal_transformers_generation_path(janus, processor):
    settings = SamplingSettings(cfg_scale=5.0)
    codes, sampled = sample_codes(janus, PROMPTS, SEEDS, settings)  # [3, 16]
    with torch.no_grad():
        raw, guided = transformers_scores(janus.model, processor, PROMPTS, codes, 5.0)  # [6, 16, 32], [3, 16, 32]
        ours = our_raw_logits(janus, PROMPTS, codes)  # [6, 16, 32]
        conditional_only = SamplingSettings(cfg_scale=5.0, cfg_logprobs="conditional")
        conditional = teacher_forced_logprobs(janus, PROMPTS, codes, conditional_only)  # [3, 16]
    assert raw.shape == ours.shape == (6, 16, 32)
    assert raw.abs().max() > 1.0  # logits of a useful scale: the tolerances below are relative to it
    # the same fp32 function, other orders of summation (and padded rows' RoPE angles shifted, which attention's
    # relative positions cancel up to rounding): a logit carries half a log-prob's error (`janus_tolerance`)
    assert max_diff(ours, raw) <= janus_tolerance(janus, codes) / 2  # measured 1.1e-5 on logits up to 7
    theirs = guided.log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # [3, 16]
    assert max_diff(sampled, theirs) <= janus_tolerance(janus, codes, cfg_scale=5.0)
    theirs_cond = raw[:3].log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # conditional rows alone
    assert max_diff(conditional, theirs_cond) <= janus_tolerance(janus, codes)
    assert max_diff(theirs_cond, theirs) > 1e-2  # CFG really changes the distribution


# 5. LoRA ----------------------------------------------------------------------------------------------------------


def test_lora_adapters_change_outputs_and_disabling_restores_the_base(folder):
    policy = janus_policy(str(folder), dtype="float32")
    codes = torch.tensor([[1, 2, 3, 4] * 4, [9, 9, 0, 31] * 4])
    prompts, settings = ["a dog", "two cats on a mat"], SamplingSettings(cfg_scale=5.0)
    with torch.no_grad():
        base = teacher_forced_logprobs(policy, prompts, codes, settings)
    weights = LoraWeights(policy, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    lm_lora_b = [p for name, p in policy.model.named_parameters() if "lora_B" in name and "language_model" in name]
    assert len(lm_lora_b) == 2 * 7  # every projection of both LM layers
    with torch.no_grad():
        assert torch.equal(teacher_forced_logprobs(policy, prompts, codes, settings), base)  # B = 0 at init
        for p in lm_lora_b:
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        adapted = teacher_forced_logprobs(policy, prompts, codes, settings)
        with weights.reference() as reference_policy:
            restored = teacher_forced_logprobs(reference_policy, prompts, codes, settings)
    assert max_diff(adapted, base) > 1e-2  # past any rounding (1e-5 here): B of std 0.2 is no small change
    assert torch.equal(restored, base)
    teacher_forced_logprobs(policy, prompts, codes, settings).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lm_lora_b)
    assert not policy.janus.model.generation_head.vision_head.weight.requires_grad  # peft froze the base


# 6. VQ decoder ----------------------------------------------------------------------------------------------------


def janus_script_uint8(pixels: torch.Tensor) -> np.ndarray:
    """DeepSeek's generation_inference.py: float32, NHWC, clip((x + 1) / 2 * 255, 0, 255) into a uint8 array."""
    dec = pixels.to(torch.float32).numpy().transpose(0, 2, 3, 1)
    dec = np.clip((dec + 1) / 2 * 255, 0, 255)
    out = np.zeros(dec.shape, dtype=np.uint8)
    out[:] = dec
    return out


def test_vq_decoder_equals_janus_vq_decode_converted_as_janus_does(folder, janus, processor, tmp_path):
    codes = torch.randint(0, 32, (5, 16), generator=torch.Generator().manual_seed(0))  # [5, 16]
    seeds = np.arange(5, dtype=np.int64)
    decoder = JanusVQDecoder(str(folder), device="cpu", max_batch_size=2)
    images = decoder(codes.numpy(), (4, 4), seeds)
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8  # 4 codes a side, 2 px per code here
    with torch.no_grad():
        pixels = janus.model.model.vqmodel.decode(codes)  # [5, 3, 8, 8], the loaded whole model's VQ
    assert np.array_equal(images, janus_script_uint8(pixels))
    assert images.std() > 5  # not a constant image
    processed = processor.postprocess(list(pixels), return_tensors="pt")["pixel_values"]  # transformers' way
    assert np.abs(processed.permute(0, 2, 3, 1).numpy().astype(int) - images.astype(int)).max() <= 1
    # the same from the model object, in one batch, with other seeds, and from a sharded checkpoint
    from_model = JanusVQDecoder(janus.model, device="cpu", max_batch_size=None)
    assert np.array_equal(from_model(codes.numpy(), (4, 4), seeds[::-1]), images)
    janus.model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert np.array_equal(JanusVQDecoder(tmp_path, device="cpu")(codes.numpy(), (4, 4), seeds), images)


def test_uint8_conversion_by_hand():
    # (x + 1) / 2 * 255: -2 -> clipped 0; -1 -> 0; 0 -> 127.5 -> 127; 0.999 -> 254.87 -> 254; 1 -> 255; 3 -> 255
    values = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(values)[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]


def test_vq_decoder_refuses_bad_inputs(janus):
    decoder = JanusVQDecoder(janus.model, device="cpu")
    codes = np.zeros((2, 16), dtype=np.int64)
    with pytest.raises(ValueError, match="4x4 grid only"):
        decoder(codes, (2, 8), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        decoder(codes + 32, (4, 4), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="seeds"):
        decoder(codes, (4, 4), np.zeros(3, dtype=np.int64))
