"""What a reward actor holds, read from the decoder's and rewards' configs: no weight is loaded.

Each part is built on the `meta` device from its folder's config (X-Omni's FLUX transformer and projector, the FLUX
VAE and text encoders, GLM-Image's DiT, VAE and ByT5 glyph encoder, Janus's VQ model, the reward models); where a
folder is absent, the part's published configuration is used and the plan says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from grpo_image.base.config import COMPONENT_KEY, import_dotted
from grpo_image.planning.decoder_blocks import BlockKind, adapted_linears, flux_blocks, glm_image_blocks
from grpo_image.planning.model_sizes import (
    DTYPE_BYTES, component_args, config_json, default_of, meta_build, param_count, plain_node,
)

# FLUX.1-dev's VAE (black-forest-labs/FLUX.1-dev vae/config.json) and CLIP-L / T5-XXL text encoders
# (text_encoder/, text_encoder_2/: openai/clip-vit-large-patch14's text tower, google/t5-v1_1-xxl's encoder)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   projection_dim=768)  # fmt: skip
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")  # fmt: skip
# X-Omni's VQConvProjector defaults (modeling_siglip_tokenizer.py): SigLIP2-g features, 16,384 codes of 2,048
XOMNI_PROJECTOR = dict(z_channels=1536, codebook_size=16384, codebook_dim=2048, conv_layers=2)
T5_TOKENS = 512  # X-Omni-En's prompt sequence for the decoder (FluxPromptEncoder's max_sequence_length)
# GLM-Image's DiT (zai-org/GLM-Image transformer/config.json: diffusers' own defaults are a smaller model) and its
# glyph encoder, a T5 encoder of google/byt5-small's shape (text_encoder/; the DiT's text_embed_dim is its width)
GLM_IMAGE_DIT = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=128,
                     num_attention_heads=32, text_embed_dim=1472, time_embed_dim=512, condition_dim=256,
                     prior_vq_quantizer_codebook_size=16384)  # fmt: skip
BYT5_SMALL = dict(vocab_size=384, d_model=1472, d_ff=3584, d_kv=64, num_layers=12, num_heads=6,
                  feed_forward_proj="gated-gelu")  # fmt: skip


@dataclass(frozen=True)
class Part:
    """A frozen model a reward actor holds: its parameter count and the bytes of its dtype."""

    name: str
    params: int
    dtype_bytes: int

    @property
    def bytes(self) -> int:
        return self.params * self.dtype_bytes


@dataclass(frozen=True)
class DecoderShape:
    """What a reward actor's decoder holds and what one decoder call computes on."""

    name: str
    parts: tuple[Part, ...]
    dtype_bytes: int
    kind: str  # "dit" (a diffusion transformer, then its VAE), "conv" or "none" (not modelled)
    max_batch_size: int | None
    # dit: the transformer's width, its tokens per image (image tokens + text tokens), the rows per image of one of
    # its calls (2: true CFG in one batch; 1: conditional and unconditional passes in turn), and whether the VAE
    # decodes the whole call at once (else one image at a time)
    inner: int = 0
    tokens: int = 0
    rows_per_image: int = 0
    vae_batched: bool = False
    # the convolutional decoder (FLUX's VAE after the transformer, Janus's VQ): (input channels, output channels,
    # pixels) of each of its up blocks, from the latent grid to the image
    levels: tuple[tuple[int, int, int], ...] = ()
    note: str = ""
    # what decoder GRPO trains (a DiT a training process holds, grpo_image.planning.decoder_training): the transformer's
    # kinds of blocks and heads, its image tokens per image (without the text's), the elements of one image's latents
    # (what a window stores per step), the width of the conditioning embeddings it keeps per decoder batch, the
    # decoder's own guidance scale (inf: above 1, value unknown), and the (in, out) features of each Linear the
    # family's LoRA regex adapts (None: no regex known)
    block_kinds: tuple[BlockKind, ...] = ()
    heads: int = 0
    image_tokens: int = 0
    latent_elements: int = 0
    text_width: int = 0
    guidance_scale: float = 1.0
    adapted: tuple[tuple[int, int], ...] | None = None

    @property
    def blocks(self) -> int:
        return sum(kind.count for kind in self.block_kinds)


def decoder_shape(
    decoder_node, grid: tuple[int, int], prompts: list[str], lora_targets: str | None = None
) -> DecoderShape:
    """The recipe's decoder (`decoder` node) for images of an h x w `grid` of codes and the prompt set's `prompts`;
    `lora_targets`: decoder GRPO's adapted modules when the recipe overrides the family's (`decoder_train.lora`)."""
    node = plain_node(decoder_node)
    target, args = str(node[COMPONENT_KEY]), component_args(node)
    if target == "grpo_image.decoders.xomni_flux.XOmniFluxDecoder":
        return _xomni_flux(args, grid[0] * grid[1], lora_targets)
    if target == "grpo_image.decoders.glm_image.GlmImageDecoder":
        return _glm_image(args, grid, prompts, lora_targets)
    if target == "grpo_image.decoders.vq.JanusVQDecoder":
        return _janus_vq(args)
    return DecoderShape(name=target, parts=(), dtype_bytes=4, kind="none", max_batch_size=args.get("max_batch_size"),
                        note="not modelled: its memory is not counted")  # fmt: skip


def _xomni_flux(args: dict, positions: int, lora_targets: str | None) -> DecoderShape:
    from diffusers import AutoencoderKL

    from grpo_image.decoders.xomni_flux import XOmniFluxDecoder
    from grpo_image.decoders.xomni_transformer import XOmniFluxTransformer2DModel, XOmniFluxTransformer2DModelZh
    from grpo_image.decoders.xomni_transformer import detect_variant

    xomni, flux = args.get("xomni_path"), args.get("flux_path")
    vision = {}
    if xomni and (Path(xomni) / "config.json").is_file():
        vision = json.loads((Path(xomni) / "config.json").read_text()).get("vision_config", {})
    dtype = str(args.get("dtype") or vision.get("dtype") or "bfloat16").removeprefix("torch.")
    notes = []
    projector_file = args.get("projector") or _join(xomni, vision.get("encoder", {}).get("projector_path"))
    projector = _projector_params(projector_file)
    z = projector[1]
    if not (projector_file and str(projector_file).endswith(".safetensors") and Path(projector_file).is_file()):
        notes.append("projector: X-Omni's published size")
    folder = args.get("transformer") or _join(xomni, vision.get("decoder", {}).get("model_path"))
    variant = args.get("variant", "auto")
    if folder and (Path(folder) / "config.json").is_file():
        saved = json.loads((Path(folder) / "config.json").read_text())
        config = {k: v for k, v in saved.items() if not k.startswith("_")}
        config.setdefault("siglip_channels", z)
        if variant == "auto":
            variant = detect_variant(folder)
    else:
        config = {"siglip_channels": z, "guidance_embeds": True}
        notes.append("transformer: FLUX.1-dev's configuration (no transformer folder"
                     + (", so the English variant" if variant == "auto" else "") + ")")
        variant = "en" if variant == "auto" else variant
    cls = XOmniFluxTransformer2DModelZh if variant == "zh" else XOmniFluxTransformer2DModel
    transformer = meta_build(lambda: cls(**config))
    vae_folder = args.get("vae") or _join(flux, "vae")
    if vae_folder and (Path(vae_folder) / "config.json").is_file():
        vae_config = AutoencoderKL.load_config(vae_folder)
    else:
        vae_config = FLUX_VAE
        notes.append("VAE: FLUX.1-dev's configuration")
    vae = meta_build(lambda: AutoencoderKL.from_config(vae_config))
    b = DTYPE_BYTES[dtype]
    parts = [Part(f"transformer (X-Omni-{variant})", param_count(transformer), b), Part("projector", projector[0], b),
             Part("VAE", param_count(vae), b)]  # fmt: skip
    text_tokens = 0
    if variant == "en":
        text_tokens = T5_TOKENS
        encoder = args.get("text_encoder") or flux
        if encoder and Path(str(encoder)).is_file():
            parts.append(Part("prompt embeddings: precomputed, on the CPU", 0, 1))
            text_tokens = _embeds_length(encoder)
        else:
            parts.extend(_flux_text_encoders(encoder, DTYPE_BYTES[dtype], notes))
    latents = 4 * positions  # 2 x 2 latent pixels per code
    cfg_scale = args.get("cfg_scale") or vision.get("decoder", {}).get("cfg_scale")
    if cfg_scale is None and variant == "en":  # X-Omni-En's pipeline asserts true CFG (> 1): 2 rows a call
        notes.append("cfg_scale: none in the folder's config; X-Omni-En's pipeline requires one above 1, so "
                     "guidance is counted")
    from grpo_image.decoders.xomni_flux_flow import FLUX_LORA_TARGETS

    return DecoderShape(
        name=f"X-Omni FLUX decoder ({variant})", parts=tuple(parts), dtype_bytes=DTYPE_BYTES[dtype], kind="dit",
        max_batch_size=args.get("max_batch_size", default_of(XOmniFluxDecoder, "max_batch_size")),
        inner=transformer.inner_dim, tokens=positions + text_tokens, rows_per_image=2,
        levels=_up_levels(vae.config.block_out_channels, latents), note="; ".join(notes),
        block_kinds=flux_blocks(transformer, lora_targets or FLUX_LORA_TARGETS, variant),
        heads=transformer.config.num_attention_heads, image_tokens=positions, latent_elements=16 * latents,
        text_width=transformer.config.joint_attention_dim if text_tokens else 0,
        guidance_scale=float(cfg_scale or (math.inf if variant == "en" else 1.0)),
        adapted=adapted_linears(transformer, lora_targets or FLUX_LORA_TARGETS),
    )  # fmt: skip


def _glm_image(args: dict, grid: tuple[int, int], prompts: list[str], lora_targets: str | None) -> DecoderShape:
    """GLM-Image's decoder as GlmImageDecoder loads it: the DiT, the VAE and the ByT5 glyph encoder from `path`.

    The DiT sees one token per prior code after the 2 x 2 upsampling (4hw) and the glyph tokens of the prompt;
    the pipeline runs its two guidance passes one after the other and the VAE on the whole call.
    """
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from grpo_image.decoders.glm_image import GlmImageDecoder

    root, notes = Path(str(args["path"])), []

    def config_of(folder: str, load, published, note: str):
        """The part's saved config, else its published one (said in the plan's notes)."""
        if (root / folder / "config.json").is_file():
            return load(root / folder)
        notes.append(note)
        return published

    dit_config = config_of("transformer", GlmImageTransformer2DModel.load_config, GLM_IMAGE_DIT,
                           "transformer: GLM-Image's published configuration")
    vae_config = config_of("vae", AutoencoderKL.load_config, FLUX_VAE,
                           "VAE: FLUX.1-dev's configuration (16 latent channels, 8 px per latent, as GLM-Image's)")
    encoder_config = config_of("text_encoder", T5Config.from_pretrained, T5Config(**BYT5_SMALL),
                               "glyph encoder: ByT5-small's configuration")
    transformer = meta_build(lambda: GlmImageTransformer2DModel.from_config(dit_config))
    vae = meta_build(lambda: AutoencoderKL.from_config(vae_config))
    encoder = meta_build(lambda: T5EncoderModel(encoder_config))
    dtype = str(args.get("dtype") or "bfloat16").removeprefix("torch.")  # the decoder's default on a GPU
    b = DTYPE_BYTES[dtype]
    parts = (Part("transformer (GLM-Image DiT)", param_count(transformer), b), Part("VAE", param_count(vae), b),
             Part("glyph encoder (ByT5)", param_count(encoder), b))  # fmt: skip
    config = transformer.config
    image_tokens = 4 * grid[0] * grid[1]  # each large-grid code repeated over 2 x 2 DiT patches (upsample_codes)
    from grpo_image.decoders.glm_image_flow import DIT_LORA_TARGETS

    return DecoderShape(
        name="GLM-Image DiT decoder", parts=parts, dtype_bytes=b, kind="dit",
        max_batch_size=args.get("max_batch_size", default_of(GlmImageDecoder, "max_batch_size")),
        inner=config.num_attention_heads * config.attention_head_dim, tokens=image_tokens + glyph_tokens(prompts),
        rows_per_image=1, vae_batched=True,
        levels=_up_levels(vae.config.block_out_channels, image_tokens * config.patch_size**2), note="; ".join(notes),
        block_kinds=glm_image_blocks(transformer, lora_targets or DIT_LORA_TARGETS),
        heads=config.num_attention_heads, image_tokens=image_tokens,
        latent_elements=image_tokens * config.patch_size**2 * config.in_channels, text_width=config.text_embed_dim,
        guidance_scale=float(args.get("guidance_scale", default_of(GlmImageDecoder, "guidance_scale"))),
        adapted=adapted_linears(transformer, lora_targets or DIT_LORA_TARGETS),
    )  # fmt: skip


def glyph_tokens(prompts: list[str]) -> int:
    """The most glyph tokens one prompt gives GLM-Image's DiT: ByT5's ids of its quoted texts, as the pipeline makes
    them (`get_glyph_texts`, `_get_glyph_embeds`: one id per UTF-8 byte and an end id per text, the empty text when
    a prompt quotes none, and one more pad id per text when they are even in number)."""
    from diffusers import GlmImagePipeline
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    # the pipeline's own glyph rules, which need none of its models
    pipe = GlmImagePipeline(tokenizer=tokenizer, processor=None, text_encoder=None, vision_language_encoder=None,
                            vae=None, transformer=None, scheduler=None)  # fmt: skip
    longest = default_of(GlmImagePipeline.__call__, "max_sequence_length")
    most = 1  # the empty text: the unconditional pass's, and a prompt set's without quotes
    for texts in pipe.get_glyph_texts(prompts) if prompts else []:
        texts = texts or [""]
        ids = tokenizer(texts, max_length=longest, truncation=True).input_ids
        most = max(most, sum(len(row) for row in ids) + len(texts) * ((len(texts) + 1) % 2))
    return most


def _flux_text_encoders(folder, dtype_bytes: int, notes: list[str]) -> list[Part]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    parts = []
    for sub, config_cls, model_cls, published, label in (
        ("text_encoder", CLIPTextConfig, CLIPTextModel, CLIP_L_TEXT, "CLIP-L text encoder"),
        ("text_encoder_2", T5Config, T5EncoderModel, T5_XXL, "T5-XXL text encoder"),
    ):
        path = Path(str(folder)) / sub if folder else None
        if path is not None and (path / "config.json").is_file():
            config = config_cls.from_pretrained(path)
        else:
            config = config_cls(**published)
            notes.append(f"{label}: published configuration")
        parts.append(Part(label, param_count(meta_build(lambda: model_cls(config))), dtype_bytes))
    return parts


def _embeds_length(path) -> int:
    """The text tokens of a precomputed prompt-embeddings file (`save_prompt_embeds`: prompt_embeds [P, S, J])."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as embeds:
        return int(embeds.get_slice("prompt_embeds").get_shape()[1])


def _projector_params(path) -> tuple[int, int]:
    """(parameters, feature width z) of X-Omni's projector: from its safetensors header, else its published size."""
    if path and Path(path).is_file() and str(path).endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as weights:
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        return sum(math.prod(shape) for shape in shapes.values()), int(shapes["post_quant_conv.weight"][0])
    from grpo_image.decoders.xomni_projector import XOmniProjector

    return param_count(meta_build(lambda: XOmniProjector(**XOMNI_PROJECTOR))), XOMNI_PROJECTOR["z_channels"]


def _janus_vq(args: dict) -> DecoderShape:
    from transformers import JanusConfig, JanusVQVAE

    from grpo_image.decoders.vq import JanusVQDecoder

    source = args["path_or_model"]
    path = config_json(source, "decoder.path_or_model")
    vq_config = JanusConfig.from_pretrained(path.parent).vq_config
    vq = meta_build(lambda: JanusVQVAE(vq_config))
    dtype = str(args.get("dtype") or "bfloat16").removeprefix("torch.")
    channels = [vq_config.base_channels * m for m in vq_config.channel_multiplier]
    return DecoderShape(
        name="Janus VQ decoder", parts=(Part("VQ model", param_count(vq), DTYPE_BYTES[dtype]),),
        dtype_bytes=DTYPE_BYTES[dtype], kind="conv",
        max_batch_size=args.get("max_batch_size", default_of(JanusVQDecoder, "max_batch_size")),
        levels=_up_levels(channels, int(vq_config.num_patches) ** 2),
    )  # fmt: skip


def _up_levels(block_channels, latent_pixels: int) -> tuple[tuple[int, int, int], ...]:
    """(in, out, pixels) of each up block of a VAE-style decoder: the channels of the encoder's blocks reversed,
    the resolution doubling after every block but the last (diffusers' and Janus's decoders alike)."""
    channels = list(reversed(block_channels))
    levels, previous = [], channels[0]  # the mid block runs at the deepest width
    for index, width in enumerate(channels):
        levels.append((previous, width, latent_pixels * 4**index))
        previous = width
    return tuple(levels)


def _join(folder, relative) -> str | None:
    return str(Path(folder) / relative) if folder and relative else None


def reward_parts(reward_specs: list[dict]) -> tuple[list[Part], list[str]]:
    """The GPU models the recipe's rewards hold in each actor, and the rewards whose memory is not modelled.

    Each reward class says what it holds: `gpu_parameters(**its arguments)` counts its models from their configs
    (0 for a reward served over HTTP or run on the CPU; None, or no such method, for one it cannot count). The
    class is the one the recipe names, so the library itself names no reward. Each is counted in the dtype it
    holds its weights in on a GPU (`reward_weight_bytes`).
    """
    parts, unknown = [], []
    for spec in reward_specs:
        scorer = dict(spec["scorer"])
        target = str(scorer.pop(COMPONENT_KEY))
        reward_class = import_dotted(target)
        count = getattr(reward_class, "gpu_parameters", None)
        parameters = count(**scorer) if count is not None else None
        if parameters is None:
            unknown.append(spec["name"])
        elif parameters:
            name = f"{spec['name']}: {target.rsplit('.', 1)[-1]}"
            parts.append(Part(name, parameters, reward_weight_bytes(reward_class, scorer)))
    return parts, unknown


def reward_weight_bytes(reward_class, arguments: dict) -> int:
    """Bytes per weight of a model reward on a GPU: its `dtype` argument, else its constructor's default (the
    reference's precision). "amp" (HPSv2's fp16 autocast) keeps fp32 weights; no dtype (a GPU default, or a reward
    without the option) counts half precision."""
    import inspect

    dtype = arguments.get("dtype", inspect.Parameter.empty)
    if dtype is inspect.Parameter.empty:
        option = inspect.signature(reward_class.__init__).parameters.get("dtype")
        dtype = option.default if option is not None else None
    return {"float32": 4, "amp": 4}.get(str(dtype).removeprefix("torch."), 2)
