"""X-Omni's language model, implemented natively on current transformers from its Qwen2 building blocks.

X-Omni's own modeling code (`trust_remote_code`) runs only on transformers < 4.54, so this module re-implements
the architecture with the same configuration keys and weight names: an X-Omni checkpoint folder (config.json and
safetensors, sharded or not) loads with `XOmniForCausalLM.from_pretrained(folder)` as it is, and a folder saved
from here has X-Omni's layout. What the model computes, per token (R rows, T tokens, H hidden):

- a token is multimodal when its id >= `vocab_size` (multimodal id = id - vocab_size); text tokens are embedded
  by `model.lm_embed_tokens`, multimodal ones by `model.mm_embed_tokens`;
- every layer is a Qwen2 decoder layer over the whole sequence (1-D RoPE, causal). The first `num_mm_adap_layers`
  and the last `num_mm_head_layers` layers update multimodal tokens only: text tokens still provide keys and values
  (so they are computed and cached) but their hidden states pass through unchanged;
- the final norm is per token too (`model.mm_norm` / `model.lm_norm`), and so are the heads (`mm_head` / `lm_head`).

`forward` reproduces X-Omni's logits exactly (full text+multimodal width, fp32, one mode at a time, the other
columns at the float32 minimum) so that HF `generate` and parity checks work; the RL code never calls it. It uses
`get_decoder()` for hidden states and `image_logits()`, which applies only the image rows of `mm_head`.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel, Qwen2Config
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

from grpo_image.policies.causal_lm import fp32_head, plain_linear

GENERATION_MODES = ("text", "image")


@strict
class XOmniConfig(Qwen2Config):
    """Qwen2's keys plus X-Omni's, under X-Omni's names (defaults: the released 7B models).

    `num_hidden_layers` counts every layer, the multimodal-only ones included (28 Qwen2.5-7B layers + 4 + 4 = 36).
    `mm_vocab_size` multimodal ids follow the text vocabulary; the first `image_vocab_size` are image codes.
    Extra keys of a real X-Omni config.json (vision_config, auto_map, ...) are kept as plain attributes.
    """

    model_type = "x-omni"

    mm_vocab_size: int = 16448
    image_vocab_size: int = 16384
    num_mm_adap_layers: int = 4
    num_mm_head_layers: int = 4
    mm_special_tokens: list[str] | tuple[str, ...] = ("<SOM>", "<EOM>", "<IMAGE>")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not 0 < self.image_vocab_size <= self.mm_vocab_size:
            raise ValueError(
                f"x-omni config: need 0 < image_vocab_size <= mm_vocab_size, "
                f"got {self.image_vocab_size} and {self.mm_vocab_size}"
            )
        if min(self.num_mm_adap_layers, self.num_mm_head_layers) < 0 or (
            self.num_mm_adap_layers + self.num_mm_head_layers > self.num_hidden_layers
        ):
            raise ValueError(
                f"x-omni config: num_mm_adap_layers ({self.num_mm_adap_layers}) + num_mm_head_layers "
                f"({self.num_mm_head_layers}) must be >= 0 and fit in num_hidden_layers ({self.num_hidden_layers})"
            )


class XOmniPreTrainedModel(PreTrainedModel):
    config_class = XOmniConfig
    config: XOmniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # X-Omni's checkpoints may carry its image tokenizer's weights; they are not part of the language model
    _keys_to_ignore_on_load_unexpected = [r"^image_tokenizer\."]


def _multimodal_embedding(num: int, hidden: int) -> nn.Embedding:
    # X-Omni passes padding_idx=-1, i.e. the last row: zero at init and never updated by gradients. It is an id no
    # tokenizer emits; keeping the same rule keeps full fine-tuning identical to X-Omni's.
    return nn.Embedding(num, hidden, padding_idx=num - 1)


class XOmniModel(XOmniPreTrainedModel):
    """Embeddings, decoder layers and the per-token final norm: input ids [R, T] -> hidden states [R, T, H]."""

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.lm_embed_tokens = _multimodal_embedding(config.vocab_size, config.hidden_size)
        self.mm_embed_tokens = _multimodal_embedding(config.mm_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.lm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mm_norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm_embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.lm_embed_tokens = value

    def is_multimodal_only(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` is one of the adapter / head layers that update multimodal tokens only."""
        config = self.config
        first_head_layer = config.num_hidden_layers - config.num_mm_head_layers
        return layer_idx < config.num_mm_adap_layers or layer_idx >= first_head_layer

    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [R, T, H] (text or multimodal table per token) and the multimodal mask [R, T, 1]."""
        text_vocab = self.config.vocab_size
        multimodal = (input_ids >= text_vocab).unsqueeze(-1)  # [R, T, 1]
        text = self.lm_embed_tokens(input_ids.clamp(max=text_vocab - 1))  # [R, T, H]
        mm = self.mm_embed_tokens((input_ids - text_vocab).clamp(min=0))  # [R, T, H]
        return torch.where(multimodal, mm, text), multimodal

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`hidden_states` (when asked) are the embeddings, then each layer's output, all before the final norm."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("XOmniModel needs input_ids (not inputs_embeds): the ids decide text vs multimodal")
        for key in ("output_attentions", "return_dict", "cache_position"):
            kwargs.pop(key, None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, multimodal = self.embed(input_ids)  # [R, T, H], [R, T, 1]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)  # [1, T]
        mask_args = dict(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        masks = {"full_attention": create_causal_mask(**mask_args)}
        if "sliding_attention" in self.config.layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_args)
        position_embeddings = self.rotary_emb(hidden, position_ids)  # cos, sin [R or 1, T, head_dim]
        all_hidden = [hidden] if output_hidden_states else None
        for index, layer in enumerate(self.layers):
            updated = layer(
                hidden,
                attention_mask=masks[self.config.layer_types[index]],
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )  # [R, T, H]
            hidden = torch.where(multimodal, updated, hidden) if self.is_multimodal_only(index) else updated
            if all_hidden is not None:
                all_hidden.append(hidden)
        normed = torch.where(multimodal, self.mm_norm(hidden), self.lm_norm(hidden))  # [R, T, H]
        return BaseModelOutputWithPast(
            last_hidden_state=normed,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class XOmniForCausalLM(XOmniPreTrainedModel, GenerationMixin):
    """XOmniModel plus the text head `lm_head` [vocab_size, H] and the multimodal head `mm_head` [mm_vocab_size, H]."""

    def __init__(self, config: XOmniConfig):
        super().__init__(config)
        self.model = XOmniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mm_head = nn.Linear(config.hidden_size, config.mm_vocab_size, bias=False)
        self.generation_mode = "text"
        self.post_init()

    def get_decoder(self) -> XOmniModel:
        return self.model

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def set_generation_mode(self, mode: str) -> None:
        """As in X-Omni: 'text' makes `forward` score text ids only, 'image' image codes only."""
        if mode not in GENERATION_MODES:
            raise ValueError(f"generation mode must be one of {GENERATION_MODES}, got {mode!r}")
        self.generation_mode = mode

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes only, from the first image_vocab_size rows of mm_head, in fp32 (`fp32_head`):
        [..., H] -> [..., V]."""
        head = plain_linear(self.mm_head, "X-Omni's mm_head")
        return fp32_head(hidden, head.weight[: self.config.image_vocab_size])  # [..., V]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """X-Omni's logits [R, T, vocab_size + mm_vocab_size] in fp32: one mode's columns, the rest at float32 min."""
        if labels is not None:
            raise ValueError("XOmniForCausalLM does not compute a language-modelling loss; pass labels=None")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state[:, -logits_to_keep:]  # [R, T', H] (all T when logits_to_keep is 0)
        text_vocab, width = self.config.vocab_size, self.config.vocab_size + self.config.mm_vocab_size
        logits = torch.full((*hidden.shape[:-1], width), torch.finfo(torch.float32).min, device=hidden.device)
        if self.generation_mode == "text":
            logits[..., :text_vocab] = self.lm_head(hidden).float()  # [R, T', vocab_size]
        else:
            logits[..., text_vocab : text_vocab + self.config.image_vocab_size] = self.image_logits(hidden).float()
        return CausalLMOutputWithPast(
            logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


AutoConfig.register(XOmniConfig.model_type, XOmniConfig, exist_ok=True)
AutoModelForCausalLM.register(XOmniConfig, XOmniForCausalLM, exist_ok=True)
