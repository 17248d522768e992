"""Janus-Pro as a policy: transformers' `JanusForConditionalGeneration` behind the CausalLMPolicy protocol.

What Janus-Pro fixes about image generation, and what this adapter does with it:

- Prompt. DeepSeek's `generation_inference.py` (deepseek-ai/Janus) formats a User turn and an empty Assistant
  turn with the "deepseek" SFT template and no system prompt, then appends the image start tag; transformers'
  path is the same string: its Janus chat template (`convert_janus_weights_to_hf.py` CHAT_TEMPLATE, checked in
  `tests/models/janus/test_processing_janus.py`) with `add_generation_prompt=True`, then
  `JanusProcessor(..., generation_mode="image")` appends `tokenizer.boi_token`. Both tokenise with the BOS:
      BOS + "<|User|>: {prompt}\\n\\n<|Assistant|>:<begin_of_image>"      (prompt stripped, as both strip it)
  The image codes follow `<begin_of_image>`: 576 of them (24 x 24) at 384 px, from a 16,384-code VQ.
- Unconditional row (CFG). Janus keeps the first and last token and replaces everything between by the pad
  token (`tokens[i, 1:-1] = pad_id`, generation_inference.py); transformers' `generate(generation_mode="image")`
  replaces every token that is neither BOS nor BOI by `pad_token_id` (modeling_janus.py, step 7). Both give
      BOS + PAD * (len(conditional row) - 2) + <begin_of_image>
  with the pads attended (attention mask 1): the unconditional row has its prompt's length.
- CFG mixes raw logits, `uncond + scale * (cond - uncond)` (both implementations), which is this project's
  `guided_logits`; Janus's usual scale is 5 (the recipe's `sampling.cfg_scale`), temperature 1.
- Image codes are not text tokens. Janus embeds a code with `generation_embeddings` then `generation_aligner`
  (`prepare_embeddings_for_image_generation`) and scores the next code with `generation_head`, never with the
  text embedding or `lm_head`. The sampler and the teacher-forced log-probs pass ids, so this policy gives codes
  the ids `text_vocab_size + k` (`codes_to_ids`), beyond every text id, and `forward_hidden` embeds each position
  by its range; `image_logits` runs `generation_head` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from grpo_image.policies.causal_lm import CausalLMPolicy, fp32_head, plain_linear
from grpo_image.policies.tokenizers import byte_alphabet, byte_level_tokenizer

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
IMAGE_TOKEN, BOI, EOI = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
JANUS_TEMPLATE = USER + ": {prompt}\n\n" + ASSISTANT + ":" + BOI


class JanusPolicy(CausalLMPolicy):
    """CausalLMPolicy over Janus-Pro: code k is id `text_vocab_size + k`, embedded and scored by the generation path.

    The grid is the checkpoint's (`vq_config.num_patches` squared: 24 x 24 for Janus-Pro), since Janus's VQ
    decoder only decodes that size. Modules that image generation never runs (the SigLIP understanding encoder
    and its aligner, the VQ model, and `lm_head` unless it is the tied text embedding) are frozen, so full
    fine-tuning optimises only what the sampled log-probs depend on; they stay in the model and in what
    `save_pretrained` writes, so a saved policy is a whole Janus checkpoint again.
    """

    def __init__(self, model: nn.Module, tokenizer, prompt_template: str = JANUS_TEMPLATE) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "janus":
            raise ValueError(f"JanusPolicy needs a JanusForConditionalGeneration, got model_type {config.model_type!r}")
        side = int(config.vq_config.num_patches)
        super().__init__(
            model, tokenizer, config.text_config.vocab_size, config.vq_config.num_embeddings, (side, side),
            prompt_template,
        )  # fmt: skip
        if "{prompt}" not in prompt_template or not prompt_template.endswith(BOI):
            raise ValueError(f"Janus prompt_template must contain {{prompt}} and end in {BOI}, got {prompt_template!r}")
        janus = self.janus
        unused = [janus.model.vision_model, janus.model.aligner, janus.model.vqmodel]
        if janus.lm_head.weight is not janus.get_input_embeddings().weight:
            unused.append(janus.lm_head)
        for module in unused:
            module.requires_grad_(False)

    def check_code_range(self, model: nn.Module, tokenizer, image_token_offset: int, num_codes: int) -> None:
        """Codes live beyond the text vocabulary; the tokenizer must never produce an id in their range."""
        config = model.config
        if len(tokenizer) > image_token_offset:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the Janus text vocabulary is {image_token_offset}: "
                "text ids would collide with image-code ids (is this the checkpoint's own tokenizer?)"
            )
        side, tokens = config.vq_config.num_patches, config.vision_config.num_image_tokens
        if side * side != tokens:
            raise ValueError(f"Janus config: vq num_patches {side}^2 != vision_config.num_image_tokens {tokens}")
        vocab = tokenizer.get_vocab()
        if tokenizer.bos_token_id is None or tokenizer.pad_token_id is None or BOI not in vocab:
            raise ValueError(f"Janus tokenizer needs a BOS token, a pad token and {BOI}")
        self.bos_token_id, self.boi_token_id = tokenizer.bos_token_id, vocab[BOI]
        expected = (getattr(model.generation_config, "generation_kwargs", None) or {}).get("boi_token_id")
        if expected is not None and expected != self.boi_token_id:
            raise ValueError(f"generation_config boi_token_id {expected} != tokenizer's {BOI} id {self.boi_token_id}")

    @property
    def janus(self) -> nn.Module:
        """The JanusForConditionalGeneration itself, also under peft's wrapper (its LoRA layers stay active)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    @property
    def device(self) -> torch.device:
        return self.janus.model.generation_head.vision_head.weight.device

    def encode(self, prompts: list[str], unconditional: bool = False) -> list[list[int]]:
        """BOS + template ids, ending in <begin_of_image>; unconditional rows keep BOS and BOI, pad the rest."""
        rows = []
        for prompt in prompts:
            text = self.prompt_template.format(prompt=prompt.strip(), h=self.grid[0], w=self.grid[1])
            row = [self.bos_token_id] + self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if row[-1] != self.boi_token_id:
                raise ValueError(f"Janus prompt {prompt!r} does not encode to a row ending in {BOI}")
            rows.append(row[:1] + [self.pad_token_id] * (len(row) - 2) + row[-1:] if unconditional else row)
        return rows

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text ids through the LM's embedding, code ids through generation_embeddings + aligner: [R, T] -> [R, T, H]"""
        janus = self.janus
        is_code = input_ids >= self.image_token_offset  # [R, T]
        text_ids = input_ids.masked_fill(is_code, self.pad_token_id)  # [R, T]
        embeds = janus.get_input_embeddings()(text_ids)  # [R, T, H]
        if not is_code.any():
            return embeds
        codes = input_ids[is_code] - self.image_token_offset  # [M], row-major order of the code positions
        code_embeds = janus.prepare_embeddings_for_image_generation(codes).to(embeds.dtype)  # [M, H]
        return embeds.masked_scatter(is_code.unsqueeze(-1), code_embeds)  # [R, T, H]

    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # [R, T]
        attention_mask: torch.Tensor,  # [R, past + T]
        position_ids: torch.Tensor,  # [R, T]
        cache=None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, object]:
        """Final hidden states [R, T, H] of Janus's language model (after its norm) and the KV cache."""
        out = self.janus.model.language_model(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.cache

    @staticmethod
    def image_head_of(model: nn.Module) -> list[nn.Module]:
        """generation_head's two Linears (`model`: JanusForConditionalGeneration)."""
        head = model.model.generation_head
        return [head.proj_out, head.vision_head]

    def image_head(self) -> list[nn.Module]:
        return self.image_head_of(self.janus)

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """generation_head only (never lm_head): proj_out, its activation and vision_head, all in fp32 (`fp32_head`),
        so neither the logits nor the CFG mixture is rounded to bf16: [..., H] -> [..., V]."""
        head = self.janus.model.generation_head
        proj = plain_linear(head.proj_out, "Janus's generation_head.proj_out")
        out = plain_linear(head.vision_head, "Janus's generation_head.vision_head")
        with torch.autocast(hidden.device.type, enabled=False):
            projected = head.activation_fn(fp32_head(hidden, proj.weight, proj.bias))  # [..., D] fp32
            return fp32_head(projected, out.weight, out.bias)  # [..., V]


def janus_policy(
    path: str,
    dtype: str = "bfloat16",
    attn_implementation: str = "sdpa",
    prompt_template: str = JANUS_TEMPLATE,
) -> JanusPolicy:
    """Load a transformers-format Janus-Pro folder (e.g. deepseek-community/Janus-Pro-1B / -7B), never remote code."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"Janus checkpoint folder not found (no config.json): {path}")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "janus":
        hint = (
            " This is DeepSeek's original layout (deepseek-ai/Janus-Pro-*, trust_remote_code): use the "
            "transformers-format deepseek-community/Janus-Pro-* or convert it with transformers' "
            "convert_janus_weights_to_hf.py."
        ) if "language_config" in raw else ""  # fmt: skip
        raise ValueError(f"{config_file}: model_type {raw.get('model_type')!r} is not 'janus'.{hint}")
    model = JanusForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return JanusPolicy(model.eval(), tokenizer, prompt_template)


def build_tiny_janus_tokenizer():
    """A byte-level fast tokenizer with Janus's special tokens, built offline; it adds BOS as Janus's does."""
    specials = [BOS, EOS, PAD, USER, ASSISTANT, IMAGE_TOKEN, BOI, EOI]  # ids 256.. after the bytes
    return byte_level_tokenizer(
        byte_alphabet() + specials, specials, prepend_bos=BOS, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI},
    )


def tiny_janus_policy(
    side: int = 4,
    num_codes: int = 32,
    hidden_size: int = 32,
    num_layers: int = 2,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> JanusPolicy:
    """A randomly initialised (seeded) Janus of toy size with the real classes: side x side codes, 2 px per code."""
    from transformers import GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusVisionConfig
    from transformers import JanusVQVAEConfig, LlamaConfig

    tokenizer = build_tiny_janus_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=initializer_range, **ids,
    )  # fmt: skip
    vision = JanusVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16 * side, patch_size=16,
        projection_dim=hidden_size, num_image_tokens=side * side,
    )  # fmt: skip
    vq = JanusVQVAEConfig(  # GroupNorm(32) needs 32 channels; one upsampling level: 2 px per code
        embed_dim=8, num_embeddings=num_codes, latent_channels=8, base_channels=32, channel_multiplier=[1, 1],
        num_res_blocks=1, projection_dim=hidden_size, image_token_embed_dim=hidden_size, num_hidden_layers=2,
    )  # fmt: skip
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id,
        initializer_range=initializer_range,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(config)
    boi = {"boi_token_id": tokenizer.convert_tokens_to_ids(BOI)}  # what generate(generation_mode="image") reads
    model.generation_config = GenerationConfig(**ids, generation_kwargs=boi)
    return JanusPolicy(model.float().eval(), tokenizer)
