"""The native X-Omni: same function as X-Omni's own code, image-head-only logits, save/load, sampling, LoRA, grid."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.cache_utils import DynamicCache

from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.training.weights import LoraWeights
from grpo_image.policies.xomni import (
    XOmniPolicy,
    build_tiny_xomni_tokenizer,
    mm_code_token,
    tiny_xomni_policy,
    xomni_grid,
    xomni_policy,
)
from grpo_image.policies.xomni_model import XOmniConfig, XOmniForCausalLM
from grpo_image.core.sampling import SamplingSettings, sample_codes
from tests.data import DATA
from tests.helpers_sampling import logprob_tolerance, position_logits, roundings_to_a_logit

REFERENCE = DATA / "xomni_tiny_reference"
TOL = 1e-5  # the reference's pass mark; X-Omni's own code differs from itself by 2.5e-6 between eager and SDPA
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "reference.safetensors")


def load_reference_model(attn: str) -> XOmniForCausalLM:
    model, info = XOmniForCausalLM.from_pretrained(
        REFERENCE, dtype=torch.float32, attn_implementation=attn, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def ref_model(request) -> XOmniForCausalLM:
    return load_reference_model(request.param)


# 1. parity with X-Omni's own code ------------------------------------------------------------------------------


def test_config_reads_xomni_keys_as_they_are():
    config = XOmniConfig.from_pretrained(REFERENCE)
    raw = json.loads((REFERENCE / "config.json").read_text())
    assert config.model_type == raw["model_type"] == "x-omni"
    for key in ("vocab_size", "mm_vocab_size", "image_vocab_size", "num_mm_adap_layers", "num_mm_head_layers"):
        assert getattr(config, key) == raw[key], key
    assert list(config.mm_special_tokens) == raw["mm_special_tokens"]
    assert config.rope_parameters["rope_theta"] == raw["rope_theta"]


def test_every_reference_tensor_matches(ref_model, reference):
    ids = reference["input_ids"]  # [2, 19]
    model = ref_model
    with torch.no_grad():
        out = model.get_decoder()(input_ids=ids, output_hidden_states=True, use_cache=False)
        hidden = out.last_hidden_state  # [2, 19, 64]
        ours = {
            "input_ids": ids,
            "multimodal_mask": (ids >= model.config.vocab_size).long(),
            "embeddings": out.hidden_states[0],
            **{f"layer_output.{i}": out.hidden_states[i + 1] for i in range(model.config.num_hidden_layers)},
            "last_hidden_state": hidden,
            "text_logits": model.lm_head(hidden),
            "image_logits": model.image_logits(hidden),
            "image_logits_code_slice": model.image_logits(hidden[0, 9:15]),  # positions 9..14 predict the 6 codes
        }
        model.set_generation_mode("text")
        ours["text_mode_logits_full"] = model(input_ids=ids).logits
        model.set_generation_mode("image")
        ours["image_mode_logits_full"] = model(input_ids=ids).logits
        model.set_generation_mode("text")
        ours["image_logits_cached_steps"] = cached_image_logits(model, ids[0])
    assert set(ours) == set(reference), set(reference) ^ set(ours)
    diffs = {name: max_diff(ours[name], reference[name]) for name in reference}
    assert max(diffs.values()) <= TOL, diffs


def cached_image_logits(model: XOmniForCausalLM, row: torch.Tensor) -> torch.Tensor:
    """Row 0 decoded with a DynamicCache: prefix through <IMAGE> (index 9), then one code per step: [7, V]."""
    cache = DynamicCache(config=model.config)
    out = model.get_decoder()(input_ids=row[None, :10], cache=cache, use_cache=True)
    steps = [model.image_logits(out.last_hidden_state[0, -1])]
    for index in range(10, 16):
        out = model.get_decoder()(input_ids=row[None, index : index + 1], cache=cache, use_cache=True)
        steps.append(model.image_logits(out.last_hidden_state[0, -1]))
    return torch.stack(steps)  # [7, V]


def test_left_padding_and_explicit_positions_give_the_reference(ref_model, reference):
    ids = reference["input_ids"]
    pad = 3
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), ids[:1, :16]], dim=1)  # [1, 19]: row 0's first 16
    batch = torch.cat([padded, ids[1:]], dim=0)  # [2, 19]
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [2, 19]
    with torch.no_grad():
        hidden = ref_model.get_decoder()(input_ids=batch, attention_mask=mask, position_ids=positions).last_hidden_state
        logits = ref_model.image_logits(hidden)  # [2, 19, V]
    assert max_diff(logits[0, pad:], reference["image_logits"][0, :16]) <= TOL
    assert max_diff(logits[1], reference["image_logits"][1]) <= TOL


# 2. image head only ---------------------------------------------------------------------------------------------


def test_image_logits_are_the_image_slice_of_the_full_heads_and_never_run_a_full_head(ref_model, reference):
    model = ref_model
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=reference["input_ids"]).last_hidden_state  # [2, 19, H]
        full = torch.cat([model.lm_head(hidden), model.mm_head(hidden)], dim=-1)  # [2, 19, 512 + 80]
    tokenizer = build_tiny_xomni_tokenizer(model.config.vocab_size, 64, model.config.mm_vocab_size)
    policy = XOmniPolicy(model, tokenizer, grid=(2, 3))

    def refuse(module, args, output):
        raise AssertionError(f"image_logits ran a full-width head: {module}")

    hooks = [model.lm_head.register_forward_hook(refuse), model.mm_head.register_forward_hook(refuse)]
    try:
        with torch.no_grad():
            image = policy.image_logits(hidden)  # [2, 19, V]
    finally:
        for hook in hooks:
            hook.remove()
    assert image.shape == (2, 19, 64)  # V = image_vocab_size, not 512 + 80
    # the same 64-term products (hidden 64) in another shape: `logprob_tolerance` of the head's roundings alone
    assert max_diff(image, full[..., 512 : 512 + 64]) <= logprob_tolerance(64, full.abs().max().item())
    assert policy.codes_to_ids(torch.tensor([0, 63])).tolist() == [512, 575]


# 3. save and load -----------------------------------------------------------------------------------------------


def test_save_pretrained_round_trip_keeps_names_and_outputs(tmp_path, reference):
    model = load_reference_model("eager")
    ids = reference["input_ids"]
    model.save_pretrained(tmp_path / "whole")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1  # really sharded
    with safe_open(REFERENCE / "model.safetensors", "pt") as theirs, safe_open(
        tmp_path / "whole" / "model.safetensors", "pt"
    ) as ours:
        assert set(ours.keys()) == set(theirs.keys())  # X-Omni's weight names, nothing more or less
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert saved["model_type"] == "x-omni" and saved["num_mm_adap_layers"] == 2 and saved["mm_vocab_size"] == 80
    with torch.no_grad():
        before = model.get_decoder()(input_ids=ids).last_hidden_state
        for folder in ("whole", "sharded"):
            loaded, info = XOmniForCausalLM.from_pretrained(
                tmp_path / folder, attn_implementation="eager", output_loading_info=True
            )
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            after = loaded.eval().get_decoder()(input_ids=ids).last_hidden_state
            assert torch.equal(before, after), folder


def test_policy_save_and_load_back(tmp_path):
    policy = tiny_xomni_policy(grid=(2, 3), initializer_range=0.3, seed=4)
    policy.save_pretrained(tmp_path)
    loaded = xomni_policy(str(tmp_path), height=32, width=48, dtype="float32")
    assert loaded.grid == (2, 3) and loaded.encode(["a cat"]) == policy.encode(["a cat"])
    assert (loaded.image_token_offset, loaded.num_codes) == (300, 16)
    codes = torch.tensor([[0, 15, 3, 7, 7, 1]])
    with torch.no_grad():
        a = teacher_forced_logprobs(policy, ["a cat"], codes, SamplingSettings())
        b = teacher_forced_logprobs(loaded, ["a cat"], codes, SamplingSettings())
    assert torch.equal(a, b)


# 4. tiny policy: tokens, sampling -------------------------------------------------------------------------------


def test_tiny_tokenizer_layout_and_prompt_format():
    policy = tiny_xomni_policy(grid=(3, 4))
    tokenizer = policy.tokenizer
    # text ids 0..299 (256 bytes, <pad>, <eos>, fillers); codes 300..315; <SOM> 316, <EOM> 317, <IMAGE> 318
    assert [tokenizer.convert_tokens_to_ids(mm_code_token(k)) for k in (0, 15)] == [300, 315]
    assert policy.special_token_ids == {"<SOM>": 316, "<EOM>": 317, "<IMAGE>": 318}
    (ids,) = policy.encode(["a red square"])
    assert tokenizer.decode(ids) == "a red square<SOM>3 4<IMAGE>"
    assert ids[-5:] == [316, tokenizer.convert_tokens_to_ids("3"), tokenizer.convert_tokens_to_ids("Ġ"),
                        tokenizer.convert_tokens_to_ids("4"), 318]
    (empty,) = policy.encode(["a red square"], unconditional=True)
    assert tokenizer.decode(empty) == "<SOM>3 4<IMAGE>"  # X-Omni's negative prompt: the prefix alone
    assert tokenizer.convert_ids_to_tokens(policy.codes_to_ids(torch.tensor([5])).tolist()) == ["<MM-Token-5>"]


def test_a_tokenizer_with_another_layout_is_refused():
    policy = tiny_xomni_policy()
    wrong = build_tiny_xomni_tokenizer(vocab_size=301, image_vocab_size=16)  # codes start at 301, config says 300
    with pytest.raises(ValueError, match="<MM-Token-0> has id 301, expected vocab_size"):
        XOmniPolicy(policy.model, wrong, grid=(2, 2))


def tiny_tolerance(policy, prompts: list[str], codes: torch.Tensor, cfg_scale: float) -> float:
    """Two summation orders of the same fp32 log-probs (`logprob_tolerance`): the tiny X-Omni's layers of hidden 32,
    MLP 64 and heads of 8 over at most P + L - 1 keys, on the largest logit it gives these codes, with guidance."""
    config = policy.model.config
    tokens = max(len(row) for row in policy.encode(prompts)) + codes.shape[1] - 1
    roundings = roundings_to_a_logit(layers=config.num_hidden_layers, hidden=32, intermediate=64, head_dim=8,
                                     tokens=tokens)  # fmt: skip
    max_logit = position_logits(policy, prompts, codes, SamplingSettings()).abs().max().item()
    return logprob_tolerance(roundings, max_logit, cfg_scale=cfg_scale)


@pytest.fixture(scope="module")
def tiny():
    # weights of std 0.3 spread the code logits enough for min-p 0.03 to remove codes (checked below)
    return tiny_xomni_policy(grid=(3, 4), initializer_range=0.3, seed=1)


PROMPTS = ["a red square", "x", "paint it all blue, from edge to edge"]  # unequal lengths: left padding


@pytest.mark.parametrize("settings", [
    SamplingSettings(),
    SamplingSettings(cfg_scale=3.0),
    SamplingSettings(min_p=0.03),
    SamplingSettings(cfg_scale=3.0, min_p=0.03),
], ids=["plain", "cfg", "min_p", "cfg_min_p"])
def test_sampled_logprobs_equal_teacher_forced(tiny, settings):
    codes, sampled = sample_codes(tiny, PROMPTS, torch.tensor([5, 6, 7]), settings)  # [N, L]
    assert codes.shape == (3, 12) and 0 <= codes.min() and codes.max() < 16
    with torch.no_grad():
        forced = teacher_forced_logprobs(tiny, PROMPTS, codes, settings, chunk=5)
        unfiltered = teacher_forced_logprobs(tiny, PROMPTS, codes, SamplingSettings(cfg_scale=settings.cfg_scale))
    tol = tiny_tolerance(tiny, PROMPTS, codes, settings.cfg_scale)
    assert max_diff(forced, sampled) <= tol
    assert max_diff(unfiltered, sampled) <= tol  # the log-probs are of the unfiltered distribution
    assert torch.isfinite(sampled).all() and (sampled <= 0).all()
    if settings.min_p > 0:  # yet the draw is filtered: every code has at least min_p times the top probability
        logprobs = position_logits(tiny, PROMPTS, codes, settings).log_softmax(-1)  # [N, L, V]
        margin = logprobs.gather(-1, codes[..., None]).squeeze(-1) - logprobs.max(-1).values  # [N, L]
        assert (margin >= math.log(settings.min_p) - 2 * tol).all()  # the sampler's log-probs against these: two tols
        assert (logprobs - logprobs.max(-1, keepdim=True).values < math.log(settings.min_p)).any()  # some removed


# 5. LoRA --------------------------------------------------------------------------------------------------------


def test_lora_adapters_change_outputs_and_disabling_restores_the_base():
    policy = tiny_xomni_policy(grid=(2, 2), initializer_range=0.3, seed=2)
    codes = torch.tensor([[1, 2, 3, 4], [9, 9, 0, 15]])
    prompts = ["a dog", "two cats on a mat"]
    with torch.no_grad():
        base = teacher_forced_logprobs(policy, prompts, codes, SamplingSettings(cfg_scale=2.0))
    weights = LoraWeights(policy, r=4, alpha=8, dropout=0.0, target_modules=LORA_TARGETS)
    lora_b = [p for name, p in policy.model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # every projection of every layer, multimodal-only layers included
    with torch.no_grad():
        # B = 0: the same function, but peft's wrapped Linears may reach other kernels (the AVX2 ones differ from the
        # plain layers' in the last bits; AVX-512's agree bit for bit)
        unchanged = teacher_forced_logprobs(policy, prompts, codes, SamplingSettings(cfg_scale=2.0))
        assert max_diff(unchanged, base) <= tiny_tolerance(policy, prompts, codes, cfg_scale=2.0)
        for p in lora_b:
            p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
        adapted = teacher_forced_logprobs(policy, prompts, codes, SamplingSettings(cfg_scale=2.0))
        with weights.reference() as reference_policy:
            restored = teacher_forced_logprobs(reference_policy, prompts, codes, SamplingSettings(cfg_scale=2.0))
    assert max_diff(adapted, base) > 1e-2  # past the rounding bound above: B of std 0.2 is no small change
    assert max_diff(restored, base) <= tiny_tolerance(policy, prompts, codes, cfg_scale=2.0)  # as at B = 0 above
    assert all(p.requires_grad for p in lora_b) and not policy.model.get_base_model().mm_head.weight.requires_grad
    teacher_forced_logprobs(policy, prompts, codes, SamplingSettings(cfg_scale=2.0)).sum().backward()
    trainable = weights.trainable_parameters()
    assert len(trainable) == 2 * 4 * 7 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


# 6. grid from pixel size ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width, grid", [(1024, 1024, (64, 64)), (1152, 1152, (72, 72)), (768, 1024, (48, 64))])
def test_grid_from_pixel_size(height, width, grid):
    assert xomni_grid(height, width) == grid


@pytest.mark.parametrize("height, width", [(1000, 1024), (1024, 1030), (0, 1024)])
def test_sizes_that_are_not_multiples_of_16_are_refused(height, width):
    with pytest.raises(ValueError, match="multiples of 16"):
        xomni_grid(height, width)
