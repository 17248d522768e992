"""The built-in tiny policy: a real Qwen2 causal LM at toy size with X-Omni's token layout.

It exists so that the whole loop runs on a laptop CPU and in tests with the same classes as a real checkpoint:
`Qwen2ForCausalLM`, a fast tokenizer built here offline (byte-level, so any text, Chinese included, encodes),
`save_pretrained` / `from_pretrained`. The vocabulary is laid out as X-Omni's is: text tokens first, then the
image codes `<img_0>`..`<img_{V-1}>` as one id range, then `<SOM>`, `<EOM>`, `<IMAGE>`; a prompt ends in
`<SOM>{h} {w}<IMAGE>` and the image codes follow. The tokenizer is the layout: loading a saved tiny policy
reads the code range back from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.policies.tokenizers import EOS, PAD, byte_alphabet, byte_level_tokenizer
from grpo_image.policies.xomni import EOM, IMAGE, SOM, XOMNI_TEMPLATE


def image_code_token(code: int) -> str:
    return f"<img_{code}>"


def build_tiny_tokenizer(num_codes: int):
    """256 byte tokens, pad, eos, then V image codes, then SOM, EOM, IMAGE."""
    specials = [PAD, EOS, *(image_code_token(c) for c in range(num_codes)), SOM, EOM, IMAGE]
    return byte_level_tokenizer(byte_alphabet() + specials, specials, pad_token=PAD, eos_token=EOS)


def code_range(tokenizer) -> tuple[int, int]:
    """(offset, V) of the image codes, read from the tokenizer's `<img_k>` tokens."""
    vocab = tokenizer.get_vocab()
    num_codes = sum(1 for token in vocab if token.startswith("<img_") and token.endswith(">"))
    if num_codes == 0:
        raise ValueError("this tokenizer has no <img_k> tokens: not a tiny grpo-image policy")
    return vocab[image_code_token(0)], num_codes


def tiny_policy(
    path: str | None = None,
    num_codes: int = 16,
    grid: tuple[int, int] | list[int] = (4, 4),
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: str = "float32",
) -> CausalLMPolicy:
    """Load a saved tiny policy from `path`, or build a randomly initialised one (seeded) when path is None.

    `dtype` is the compute precision, as for the real policies (bfloat16 runs on the CPU too).
    """
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tiny policy folder not found: {path}")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = Qwen2ForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    else:
        tokenizer = build_tiny_tokenizer(num_codes)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        config._attn_implementation = "sdpa"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
    offset, codes = code_range(tokenizer)
    return CausalLMPolicy(model.to(getattr(torch, dtype)), tokenizer, offset, codes, tuple(grid), XOMNI_TEMPLATE)
