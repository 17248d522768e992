"""GLM-Image's autoregressive model as a policy: transformers' `GlmImageForConditionalGeneration` behind the protocol.

GLM-Image (zai-org) is X-Omni's successor: a 9B GLM-4 language model that writes semantic-VQ codes (X-Omni's
tokenizer) and a 7B DiT that decodes them (`grpo_image.decoders.glm_image`). What the installed libraries fix, with
the files this adapter follows (transformers 5.24 `models/glm_image/`, diffusers 0.42 `pipelines/glm_image/`):

- Prompt. `GlmImagePipeline.generate_prior_tokens` (pipeline_glm_image.py l.358-376) wraps the prompt in one user
  message and calls `processor.apply_chat_template(..., tokenize=True, target_h=H, target_w=W)` with no generation
  prompt; the processor appends `{grid_bos}{H/32} {W/32}{grid_eos}{grid_bos}{ph} {pw}{grid_eos}{bos}` to the
  rendered text (processing_glm_image.py l.204-210), `<sop>`/`<eop>` and `<|dit_token_16384|>` in the checkpoint.
  Whatever the checkpoint's chat template and tokenizer put in front (GLM-4's `[gMASK]<sop>`, a role tag) is
  therefore the template's business: `encode` makes exactly that call, so its rows are the pipeline's rows, and
  the unconditional row (only used if a recipe asks the AR for guidance, which GLM-Image itself never does) is the
  same call with an empty prompt.
- Two grids, one sequence. `_get_target_shape` (processing_glm_image.py l.240-253) floors H, W to multiples of 32
  and derives a preview grid of about 16 x 16 (ph = int(sqrt(h/w) * 16), pw = int(sqrt(w/h) * 16)); the AR writes
  the ph*pw preview codes, then the h*w large codes, then the end token, with no separator
  (`_compute_generation_params`, `_extract_large_image_tokens`, pipeline_glm_image.py l.221-252). So a rollout
  here is L = ph*pw + h*w codes and `grid` is the large (h, w): the decoder keeps the last h*w codes. The grids are
  read from the processor's own `image_grid_thw` output, never recomputed.
- Codes are rows 0..V-1 of a separate `lm_head` of `vision_vocab_size` (16,512) rows (modeling_glm_image.py
  l.1333); id V is the image start (the prefix's last token) and V+1 the end (configuration_glm_image.py l.178-180);
  the text ids of the shared embedding are GLM-4's shifted by 16,512. So a code's input id is the code itself
  (`codes_to_ids` is the identity) and `image_logits` uses rows 0..V-1 of `lm_head` only. Holding the sampler to
  those rows also means a rollout can never stop early on the end token or stray into other rows, which plain
  `generate` allows.
- Positions are 3-axis mrope (`get_rope_index`, modeling_glm_image.py l.942-1109): prefix token p of a row whose
  prefix holds P real tokens gets (p, p, p); preview code t gets (P, P + t // pw, P + t % pw); large code u gets
  (B, B + u // w, B + u % w) with B = P + max(ph, pw). Left padding only shifts where P starts: each row counts
  its own tokens. 1-D positions (a plain causal LM's) give other logits, even on a tiny model.
- Only the language model runs: the vision encoder and the VQ tokenizer (image-to-image inputs) are frozen here,
  and LoRA recipes target the language model's layers alone (`train.lora.target_regex`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from grpo_image.policies.causal_lm import CausalLMPolicy
from grpo_image.policies.tokenizers import byte_alphabet, byte_level_tokenizer

AR_FOLDER, PROCESSOR_FOLDER = "vision_language_encoder", "processor"  # the GLM-Image repository's layout
GRID_FACTOR = 32  # pixels per large-grid code side (processing_glm_image.py l.245)
# generate()'s other sampling warpers: a generation_config that sets one samples from a distribution the sampler cannot
UNSUPPORTED_WARPERS = ("typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty", "top_h")


def glm_image_grids(processor, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h, w), (ph, pw)): the large and preview grids the processor asks the AR for at height x width pixels."""
    if height < GRID_FACTOR or width < GRID_FACTOR or height % GRID_FACTOR or width % GRID_FACTOR:
        raise ValueError(
            f"GLM-Image image size {height}x{width} (height x width) must be positive multiples of {GRID_FACTOR} px "
            f"(the processor floors other sizes and the decoder would not return the size asked for)"
        )
    with torch.device("cpu"):  # a few ints, also when the model is built on the meta device (grpo-image plan)
        grids = pipeline_processor_call(processor, [""], height, width)["image_grid_thw"].tolist()  # [[1,h,w],[1,ph,pw]]
    if len(grids) != 2 or grids[0][0] != 1 or grids[1][0] != 1:
        raise ValueError(f"GLM-Image processor: expected a large and a preview grid for text-to-image, got {grids}")
    return (grids[0][1], grids[0][2]), (grids[1][1], grids[1][2])


def pipeline_processor_call(processor, prompts: list[str], height: int, width: int):
    """The pipeline's own processor call (pipeline_glm_image.py l.359-376), one user message per prompt, unpadded."""
    messages = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors=None,
        processor_kwargs={"target_h": height, "target_w": width},
    )  # fmt: skip


def mrope_code_offsets(preview: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(t, h, w) positions of the L = ph*pw + h*w codes for a prefix of 0 tokens: [3, L] (add P per row)."""
    (ph, pw), (h, w) = preview, grid
    t = torch.arange(ph * pw)
    u = torch.arange(h * w)
    preview_pos = torch.stack([torch.zeros_like(t), t // pw, t % pw])  # [3, ph*pw]
    base = max(ph, pw)
    large_pos = torch.stack([torch.zeros_like(u), u // w, u % w]) + base  # [3, h*w]
    return torch.cat([preview_pos, large_pos], dim=1)  # [3, L]


class GlmImagePolicy(CausalLMPolicy):
    """CausalLMPolicy over GLM-Image's AR model: L = preview + large codes, 3-axis positions, code rows of lm_head.

    The text model (`get_decoder()`, GLM-4 layers and final norm), the static KV cache for `model.config` and the
    image head are CausalLMPolicy's own; what differs is the processor-made prefix, the positions and what is
    saved (the processor, so that a saved policy loads like the original).
    """

    def __init__(self, model: nn.Module, processor, height: int, width: int) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "glm_image":
            raise ValueError(f"GlmImagePolicy needs a GlmImageForConditionalGeneration, got {config.model_type!r}")
        grid, self.preview = glm_image_grids(processor, height, width)
        self.processor = processor
        self.height, self.width = int(height), int(width)
        super().__init__(model, processor.tokenizer, 0, config.vq_config.num_embeddings, grid)
        self.image_start_token_id = int(config.image_start_token_id)
        self.code_offsets = mrope_code_offsets(self.preview, self.grid)  # [3, L]
        glm = model.get_base_model() if hasattr(model, "get_base_model") else model
        for module in (glm.model.visual, glm.model.vqmodel):  # image-to-image inputs only: never run here
            module.requires_grad_(False)

    def check_code_range(self, model: nn.Module, tokenizer, image_token_offset: int, num_codes: int) -> None:
        """Codes 0..V-1 are rows of lm_head, the start and end ids are not codes, and rows end in the start id."""
        config = model.config
        rows = model.get_output_embeddings().weight.shape[0]
        start, end = config.image_start_token_id, config.image_end_token_id
        if num_codes > rows or min(start, end) < num_codes:
            raise ValueError(
                f"GLM-Image config: {num_codes} codes (vq_config.num_embeddings), lm_head of {rows} rows, image "
                f"start/end ids {start}/{end}: codes must be head rows 0..{num_codes - 1} and start/end lie above"
            )
        if tokenizer.bos_token_id != start:
            raise ValueError(
                f"GLM-Image tokenizer: its bos_token {tokenizer.bos_token!r} (id {tokenizer.bos_token_id}), which the "
                f"processor appends to every prompt, is not the model's image_start_token_id {start} (is this the "
                "checkpoint's own processor?)"
            )

    @property
    def num_positions(self) -> int:
        """L: the preview codes, then the large grid's."""
        return self.preview[0] * self.preview[1] + self.grid[0] * self.grid[1]

    def encode(self, prompts: list[str], unconditional: bool = False) -> list[list[int]]:
        """The pipeline's prefix ids of each prompt (empty prompts when unconditional), ending in the image start."""
        rows = pipeline_processor_call(self.processor, ["" if unconditional else p for p in prompts], self.height, self.width)
        ids = [list(row) for row in rows["input_ids"]]
        for prompt, row in zip(prompts, ids):
            if not row or row[-1] != self.image_start_token_id:
                raise ValueError(
                    f"GLM-Image prompt {prompt!r} does not encode to a row ending in the image start "
                    f"{self.image_start_token_id}"
                )
        return ids

    def prefix_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """Text positions (p, p, p) of left-padded prefixes: mask [R, P] -> [3, R, P] (pads get 0)."""
        return super().prefix_positions(mask).unsqueeze(0).expand(3, -1, -1)  # [3, R, P]

    def code_positions(self, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """mrope positions of codes start..stop-1 after each row's own prefix (mask [R, P]): [3, R, stop - start]."""
        offsets = self.code_offsets[:, start:stop].to(mask.device)  # [3, T]
        return offsets.unsqueeze(1) + mask.sum(-1).view(1, -1, 1)  # [3, R, T]

    def checkpoint_sampling(self) -> dict[str, float]:
        """What GlmImagePipeline's AR samples with, for the recipe's null sampling keys: its
        `generate(do_sample=True)` (pipeline_glm_image.py l.439-443) reads the AR model's generation_config, i.e. the
        checkpoint's `vision_language_encoder/generation_config.json` loaded with the model, and gives each key that
        file leaves unset transformers' global default (`GenerationConfig._get_default_generation_params`:
        temperature 1, top_k 50, top_p 1; no min-p), the order of precedence of `_prepare_generation_config`."""
        from transformers import GenerationConfig

        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        config, defaults = model.generation_config, GenerationConfig._get_default_generation_params()
        other = {key: getattr(config, key, None) for key in UNSUPPORTED_WARPERS}
        other = {key: value for key, value in other.items() if value is not None and value != defaults.get(key)}
        if other:
            raise ValueError(
                f"GLM-Image generation_config sets {other}, which this sampler does not apply: set "
                "sampling.temperature, top_k, top_p and min_p in the recipe to sample without it"
            )

        def value(key: str):
            own = getattr(config, key, None)
            return defaults.get(key) if own is None else own

        return {"temperature": float(value("temperature")), "top_k": int(value("top_k") or 0),
                "top_p": float(value("top_p")), "min_p": float(value("min_p") or 0.0)}  # fmt: skip

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """The AR model and its processor in one folder, which `glm_image_policy` loads like the original."""
        self.model.save_pretrained(path, state_dict=state_dict)
        self.processor.save_pretrained(path)


def glm_image_folders(path: str | Path) -> tuple[Path, Path]:
    """(AR model folder, processor folder) of a GLM-Image folder or of a folder saved by `GlmImagePolicy`."""
    root = Path(path)
    if (root / AR_FOLDER).is_dir():  # the repository's layout
        return root / AR_FOLDER, root / PROCESSOR_FOLDER
    return root, root


def glm_image_policy(
    path: str,
    height: int = 1024,
    width: int = 1024,
    dtype: str = "bfloat16",
    attn_implementation: str = "sdpa",
) -> GlmImagePolicy:
    """Load GLM-Image's AR model and processor, never with remote code.

    `path`: the GLM-Image folder (zai-org/GLM-Image downloaded: `vision_language_encoder/` and `processor/` are
    read, the DiT is not), or a folder saved by this policy (model and processor side by side).
    """
    from transformers import AutoProcessor, GlmImageForConditionalGeneration

    model_dir, processor_dir = glm_image_folders(path)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"GLM-Image checkpoint not found: no {config_file} (nor {Path(path) / AR_FOLDER}/)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != "glm_image":
        raise ValueError(f"{config_file}: model_type {model_type!r} is not 'glm_image'")
    model = GlmImageForConditionalGeneration.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(processor_dir)
    return GlmImagePolicy(model.eval(), processor, height, width)


# A GLM-4-style stand-in for the checkpoint's chat template (one user turn, no generation prompt is asked for).
TINY_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<eop>", "<|user|>", "<|assistant|>", "<|image|>"]


def build_tiny_glm_image_processor(num_codes: int, vision_vocab_size: int):
    """A `GlmImageProcessor` with GLM-Image's id layout, built offline.

    Ids 0..vision_vocab_size-1 are `<|dit_token_k|>` (codes, then the image start k = V and end k = V+1), then the
    256 byte-level tokens, then GLM's special tokens: text ids start after the vision rows, as GLM-Image's do.
    """
    from transformers import GlmImageImageProcessor, GlmImageProcessor

    if vision_vocab_size < num_codes + 2:
        raise ValueError(f"tiny GLM-Image: vision_vocab_size {vision_vocab_size} has no room for {num_codes} codes + 2")
    vision = [f"<|dit_token_{k}|>" for k in range(vision_vocab_size)]
    tokenizer = byte_level_tokenizer(
        vision + byte_alphabet() + TINY_SPECIALS, vision + TINY_SPECIALS, bos_token=vision[num_codes],
        eos_token="<|endoftext|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "grid_bos_token": "<sop>", "grid_eos_token": "<eop>"},
    )  # fmt: skip
    return GlmImageProcessor(
        image_processor=GlmImageImageProcessor(), tokenizer=tokenizer, chat_template=TINY_CHAT_TEMPLATE
    )


def tiny_glm_image_policy(
    height: int = 64,
    width: int = 96,
    num_codes: int = 64,
    hidden_size: int = 32,
    num_layers: int = 2,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: str = "float32",
) -> GlmImagePolicy:
    """A randomly initialised (seeded) GLM-Image AR model of toy size with the real classes and its processor.

    Its rotary layout is GLM-Image's in miniature: partial rotary (half of each head), mrope sections (2, 1, 1).
    """
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    vision_vocab = num_codes + 8
    processor = build_tiny_glm_image_processor(num_codes, vision_vocab)
    tokenizer = processor.tokenizer
    text = dict(
        vocab_size=len(tokenizer), vision_vocab_size=vision_vocab, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=1024, initializer_range=initializer_range, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=num_codes + 1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1]},
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, patch_size=16, image_size=64)
    vq = dict(embed_dim=16, num_embeddings=num_codes, latent_channels=16)
    config = GlmImageConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_start_token_id=num_codes,
        image_end_token_id=num_codes + 1, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>"),
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GlmImageForConditionalGeneration(config)
    return GlmImagePolicy(model.to(getattr(torch, dtype)).eval(), processor, height, width)
