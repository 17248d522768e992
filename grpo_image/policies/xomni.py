"""X-Omni as a policy: the native `XOmniForCausalLM` (see xomni_model.py) behind the CausalLMPolicy protocol.

What X-Omni's public code fixes about image generation, and what this adapter does with it:

- Image string (X-Omni-Team/X-Omni `generate.py` l.27-28; choyakawa/X-Omni `modeling_xomni.py` l.201-214, the HF
  checkpoints' modeling code): `<SOM>{h} {w}<IMAGE>` + h*w codes + `<EOM>`, codes row-major, each written as the
  text `<MM-Token-{k}>`. `h, w` are the token grid, pixel size // 16 (`--downsample-size 16`), height first, any
  aspect ratio (`--image-size H W`, default 1152). generate.py floors silently; `xomni_grid` refuses sizes that
  are not multiples of 16, since the decoder would then not return the size asked for.
- Prompt (generate.py l.40-45): the raw prompt text directly followed by that prefix (no chat template, no
  separator), tokenised with the tokenizer's defaults (Qwen2's adds no BOS), left-padded.
- CFG (generate.py l.35, l.48-60): the unconditional row is the prefix alone (`<SOM>{h} {w}<IMAGE>`, no special
  tokens), passed to HF's classifier-free guidance (`guidance_scale` + `negative_prompt_ids`). HF mixes
  log-softmaxed scores, which differs from mixing raw logits by a per-row constant only, so it is the same
  distribution as this project's `guided_logits`. Default `--cfg-scale 1.0`: no CFG.
- Sampling defaults (generate.py l.76-79): temperature 1.0, min-p 0.03, top-p 1.0; `max_new_tokens = h*w`;
  `<EOM>` is appended afterwards (l.62) and `mm_special_tokens` are suppressed (l.36).
- Ids (modeling_xomni.py l.73-87, l.275-282, l.189-192): an id >= `vocab_size` is multimodal (id - vocab_size
  indexes mm_embed_tokens / mm_head); image mode scores ids vocab_size .. vocab_size+image_vocab_size-1 from the
  first image_vocab_size rows of mm_head, and `mmdecode` parses the decoded text's `<MM-Token-k>` back to code k.
  So the tokenizer must map `<MM-Token-k>` to vocab_size + k: `check_tokenizer_layout` verifies it on load. The
  ids of `<SOM>`, `<EOM>`, `<IMAGE>` are not fixed by the public code (it converts `config.mm_special_tokens` with
  the tokenizer); mm_vocab_size = 16,448 = 16,384 codes + 64 suggests they follow the codes, which is where the
  tiny tokenizer here (and the tiny reference checkpoint) puts them. This adapter reads them from the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.policies.tokenizers import BYTE_TOKENS, EOS, PAD, byte_alphabet, byte_level_tokenizer
from grpo_image.policies.xomni_model import XOmniConfig, XOmniForCausalLM

DOWNSAMPLE = 16  # pixels per code side (SigLIP-VQ encoder, and the decoder's output per code)
SOM, EOM, IMAGE = "<SOM>", "<EOM>", "<IMAGE>"  # X-Omni's image delimiters (config.mm_special_tokens)
XOMNI_TEMPLATE = "{prompt}" + SOM + "{h} {w}" + IMAGE  # a prompt row, right before the first image code


def mm_code_token(code: int) -> str:
    """How X-Omni's tokenizer writes image code `code`."""
    return f"<MM-Token-{code}>"


def xomni_grid(height: int, width: int, downsample: int = DOWNSAMPLE) -> tuple[int, int]:
    """The (h, w) token grid of a height x width pixel image, e.g. 1024 x 1024 -> (64, 64), 768 x 1024 -> (48, 64)."""
    if height < downsample or width < downsample or height % downsample or width % downsample:
        raise ValueError(
            f"X-Omni image size {height}x{width} (height x width) must be positive multiples of {downsample} px "
            f"(one code per {downsample}x{downsample} patch), e.g. 1024x1024 or 768x1152"
        )
    return height // downsample, width // downsample


def check_tokenizer_layout(tokenizer, config: XOmniConfig) -> dict[str, int]:
    """Fail unless image code k is the token `<MM-Token-k>` with id vocab_size + k; return the special tokens' ids."""
    vocab = tokenizer.get_vocab()
    for code in (0, config.image_vocab_size - 1):
        token, expected = mm_code_token(code), config.vocab_size + code
        if vocab.get(token) != expected:
            raise ValueError(
                f"tokenizer does not match the X-Omni config: {token} has id {vocab.get(token)}, expected "
                f"vocab_size + {code} = {expected} (is this the checkpoint's own tokenizer?)"
            )
    missing = [token for token in config.mm_special_tokens if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks X-Omni's special tokens {missing} (config.mm_special_tokens)")
    return {token: vocab[token] for token in config.mm_special_tokens}


class XOmniPolicy(CausalLMPolicy):
    """CausalLMPolicy with X-Omni's layout: codes are ids vocab_size + k, scored by the image rows of mm_head.

    Encoding, the decoder forward (`get_decoder()` ends in X-Omni's per-token norm), `codes_to_ids` and saving
    are CausalLMPolicy's own; what differs is where the codes live (after the text head, not inside it) and which
    head scores them.
    """

    def __init__(
        self, model: XOmniForCausalLM, tokenizer, grid: tuple[int, int], prompt_template: str = XOMNI_TEMPLATE
    ):
        config = model.config
        super().__init__(model, tokenizer, config.vocab_size, config.image_vocab_size, grid, prompt_template)

    def check_code_range(self, model, tokenizer, image_token_offset: int, num_codes: int) -> None:
        """X-Omni's codes lie beyond the text head by design: check them against the config and tokenizer."""
        self.special_token_ids = check_tokenizer_layout(tokenizer, model.config)

    @staticmethod
    def image_head_of(model: nn.Module) -> list[nn.Module]:
        """X-Omni's codes are scored by `mm_head` (its first image_vocab_size rows), never by the text head."""
        return [model.mm_head]

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the V image codes only, never the text or full multimodal width: [..., H] -> [..., V]."""
        return self.model.image_logits(hidden)  # [..., V]; reached through peft's wrappers as well


def xomni_policy(
    path: str,
    height: int = 1024,
    width: int = 1024,
    dtype: str = "bfloat16",
    attn_implementation: str = "sdpa",
    prompt_template: str = XOMNI_TEMPLATE,
) -> XOmniPolicy:
    """Load an X-Omni folder (X-Omni-En / -Zh / -PT / -SFT, or one saved here) natively, never with remote code."""
    from transformers import AutoTokenizer

    grid = xomni_grid(height, width)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"X-Omni checkpoint folder not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = XOmniForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    return XOmniPolicy(model, tokenizer, grid, prompt_template)


def build_tiny_xomni_tokenizer(vocab_size: int, image_vocab_size: int, mm_vocab_size: int | None = None):
    """A byte-level tokenizer with X-Omni's id layout, built offline.

    Text ids 0..vocab_size-1: 256 byte tokens, <pad>, <eos>, then unused fillers (as Qwen's vocabulary is padded);
    multimodal ids from vocab_size: `<MM-Token-0>`.. for the image codes, then <SOM>, <EOM>, <IMAGE>, then fillers
    up to mm_vocab_size (default: codes + the three special tokens).
    """
    specials = [SOM, EOM, IMAGE]
    mm_vocab_size = image_vocab_size + len(specials) if mm_vocab_size is None else mm_vocab_size
    if vocab_size < BYTE_TOKENS + 2 or mm_vocab_size < image_vocab_size + len(specials):
        raise ValueError(f"tiny X-Omni tokenizer: need vocab_size >= {BYTE_TOKENS + 2} and room for codes and specials")
    codes = [mm_code_token(code) for code in range(image_vocab_size)]
    text = [PAD, EOS] + [f"<|text_filler_{i}|>" for i in range(vocab_size - BYTE_TOKENS - 2)]
    mm = codes + specials + [f"<|mm_filler_{i}|>" for i in range(mm_vocab_size - image_vocab_size - len(specials))]
    return byte_level_tokenizer(byte_alphabet() + text + mm, [PAD, EOS, *codes, *specials], pad_token=PAD, eos_token=EOS)


def tiny_xomni_policy(
    grid: tuple[int, int] | list[int] = (3, 4),
    image_vocab_size: int = 16,
    vocab_size: int = 300,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_mm_adap_layers: int = 1,
    num_mm_head_layers: int = 1,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: str = "float32",
) -> XOmniPolicy:
    """A randomly initialised (seeded) X-Omni of toy size with its tokenizer, for CPU runs and tests.

    `dtype` is the compute precision, as for `xomni_policy` (bfloat16 runs on the CPU too).
    """
    tokenizer = build_tiny_xomni_tokenizer(vocab_size, image_vocab_size)
    config = XOmniConfig(
        vocab_size=vocab_size,
        mm_vocab_size=len(tokenizer) - vocab_size,
        image_vocab_size=image_vocab_size,
        num_mm_adap_layers=num_mm_adap_layers,
        num_mm_head_layers=num_mm_head_layers,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = XOmniForCausalLM(config)
    return XOmniPolicy(model.to(getattr(torch, dtype)).eval(), tokenizer, tuple(grid))
