"""Any Hugging Face causal LM whose image codes are a contiguous id range of its vocabulary.

This is the policy protocol the sampler and the trainer use: encode prompts, run the backbone (with or without
a KV cache) to hidden states, and apply the *image head only* (the V rows of the output embedding that belong to
image codes), so that no logit of the text vocabulary is ever computed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def fp32_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A head's logits in fp32 whatever the policy's dtype: hidden [..., H], weight rows [V, H] -> fp32 [..., V].

    Why: the sampler's behaviour log-probs (one token at a time against a KV cache) and the trainer's (a whole
    sequence at once) come from different kernels. Rounded to bf16, a logit of 8 to 32 moves in steps of 0.03 to
    0.125 nats, and guidance multiplies a logit error by about cfg_scale, so a head in bf16 turns the two paths'
    tiny differences into whole bf16 steps of the ratio. Here the hidden states and the rows are upcast and the
    product runs with autocast off (autocast would cast them back to bf16). Rows that are fp32 already (full
    fine-tuning's master weights) are used as they are, so their gradients land on the parameter itself; rows of a
    bf16 base are copied to fp32 for the call (V x H x 4 bytes, freed after it), and gradients still flow to the
    hidden states and through them to LoRA's adapters.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())  # [..., V]


def plain_linear(module: nn.Module, what: str) -> nn.Linear:
    """`module` itself, refused when peft has wrapped it: the fp32 head reads its weight and would skip an adapter."""
    if hasattr(module, "base_layer") or not isinstance(module, nn.Linear):
        raise ValueError(
            f"{what} must be a plain Linear, got {type(module).__name__}: adapters on the image head are not "
            "supported (its logits are computed in fp32 from its weight); leave it out of train.lora's targets"
        )
    return module


class CausalLMPolicy:
    """A causal LM plus the layout of its image codes.

    `image_token_offset` is the id of image code 0; codes 0..num_codes-1 are ids offset..offset+num_codes-1.
    `prompt_template` builds a row's text from `{prompt}` and the grid `{h}`, `{w}`; the unconditional row for
    classifier-free guidance is the same template with an empty prompt.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        image_token_offset: int,
        num_codes: int,
        grid: tuple[int, int],
        prompt_template: str = "{prompt}",
    ) -> None:
        self.check_code_range(model, tokenizer, image_token_offset, num_codes)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid}")
        self.model = model
        self.tokenizer = tokenizer
        self.image_token_offset = int(image_token_offset)
        self.num_codes = int(num_codes)
        self.grid = (int(grid[0]), int(grid[1]))
        self.prompt_template = prompt_template
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def check_code_range(self, model: nn.Module, tokenizer, image_token_offset: int, num_codes: int) -> None:
        """Fail unless the code ids are rows of the head that `image_logits` uses (overridden by other layouts)."""
        vocab = model.get_output_embeddings().weight.shape[0]
        if image_token_offset < 0 or image_token_offset + num_codes > vocab:
            raise ValueError(
                f"image codes {image_token_offset}..{image_token_offset + num_codes - 1} "
                f"do not fit the model's vocabulary of {vocab}"
            )

    @property
    def num_positions(self) -> int:
        """L: image codes per rollout."""
        return self.grid[0] * self.grid[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    def encode(self, prompts: list[str], unconditional: bool = False) -> list[list[int]]:
        """Token ids of each row's prefix, ending right before the first image code."""
        h, w = self.grid
        texts = [self.prompt_template.format(prompt="" if unconditional else p, h=h, w=w) for p in prompts]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def prefix_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Position ids of left-padded prefixes: mask [R, P] -> [R, P] (pads get 0; 3-axis RoPE overrides this)."""
        return (mask.cumsum(-1) - 1).clamp_(min=0)

    def code_positions(self, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Position ids of image codes start..stop-1 after each row's prefix (mask [R, P]): [R, stop - start]."""
        offsets = torch.arange(start, stop, device=mask.device)  # [stop - start]
        return mask.sum(-1, keepdim=True) + offsets  # [R, stop - start]

    def new_cache(self, rows: int, max_tokens: int, bucket: int = 1):
        """A KV cache allocated once for `max_tokens` tokens per row (it never grows by concatenation), whose forwards
        attend only over the view the sampler sets (`CacheViews.attend_over`), in steps of `bucket` positions."""
        from grpo_image.policies.kv_cache import CacheViews

        return CacheViews(self.model.config, max_tokens, bucket)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # [R, T]
        attention_mask: torch.Tensor,  # [R, past + T] (or wider: columns past the cache's end are ignored)
        position_ids: torch.Tensor,  # [R, T]
        cache=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        """Final hidden states [R, T, H] (after the final norm) and the KV cache."""
        out = self.model.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache

    @staticmethod
    def image_head_of(model: nn.Module) -> list[nn.Module]:
        """The Linears whose weights `image_logits` reads in fp32 (`fp32_head`), found on a bare model of the family
        (also one built on the meta device for the memory plan). Full fine-tuning's reference keeps them in the
        masters' dtype: rounded to bf16 they would move its logits away from the policy's, which reads fp32 masters."""
        return [model.get_output_embeddings()]

    def image_head(self) -> list[nn.Module]:
        """`image_head_of` this policy's model."""
        return self.image_head_of(self.model)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the V image codes only, in fp32 (`fp32_head`): [..., H] -> [..., V]."""
        head = plain_linear(self.model.get_output_embeddings(), "the image head")
        lo, hi = self.image_token_offset, self.image_token_offset + self.num_codes
        bias = head.bias[lo:hi] if head.bias is not None else None
        return fp32_head(hidden, head.weight[lo:hi], bias)  # [..., V]

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_token_offset

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write the model and tokenizer so that the recipe's loader reads the folder like the original.

        `state_dict`: the weights to write instead of the live model's (e.g. gathered from FSDP shards).
        """
        self.model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)


def causal_lm_policy(
    path: str,
    image_token_offset: int,
    num_codes: int,
    grid: tuple[int, int] | list[int],
    prompt_template: str = "{prompt}",
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
) -> CausalLMPolicy:
    """Load a local HF causal LM folder (never with remote code) as a policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return CausalLMPolicy(model, tokenizer, image_token_offset, num_codes, tuple(grid), prompt_template)
