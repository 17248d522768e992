"""ImageReward: human preference reward from BLIP with an MLP head (THUDM/ImageReward, NeurIPS 2023).

The prompt, read by BLIP's BERT text encoder with cross-attention to BLIP's ViT-L image features, gives a [CLS]
feature that a 5-layer linear MLP maps to one number, normalised by fixed constants from its code (mostly within about -2 to 2).
The `image-reward` package pins timm 0.6 and pulls fairscale and CLIP from git, so this reward loads the released
`ImageReward.pt` into transformers' own BLIP classes (`BlipVisionModel`, `BlipTextModel`: the same layers, renamed
once in `blip_state`).

As the reference scores (ImageReward/ImageReward.py `ImageReward.score`, models/BLIP/blip.py, blip_pretrain.py,
vit.py, med.py):
- image: torchvision Resize(224, bicubic) of the shorter side, CenterCrop(224), ToTensor, Normalize with CLIP's
  mean/std (`_transform`); ViT-L/16 (`create_vit("large")`: width 1024, 24 blocks, 16 heads, LayerNorm eps 1e-6);
- text: bert-base-uncased's tokenizer with BLIP's added `[DEC]` and `[ENC]` tokens (`init_tokenizer`), padded to
  max_length 35 and truncated there; the [CLS] token's last hidden state, cross-attending to every image token;
- score: MLP(768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations), then (r - MEAN) / STD; fp32 (the reference's
  precision, the `dtype` default).

Files: `checkpoint` is ImageReward.pt (hub repo THUDM/ImageReward), `med_config` its med_config.json (default: beside
the checkpoint), `tokenizer` a local copy of bert-base-uncased's tokenizer files. `vit` changes the ViT's
BlipVisionConfig fields (none for ImageReward; tests build a tiny one). Batched; pickles as its arguments.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import to_pil, validate_batch
from rewards._rebuild import RebuildOnUnpickle

# ImageReward/ImageReward.py: `self.mean`, `self.std` (the raw MLP output's statistics), `_transform`'s constants
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE, MAX_LENGTH = 224, 35  # BLIP_Pretrain(image_size=224, ...); tokenizer(max_length=35)
# models/BLIP/blip.py create_vit("large") and vit.py VisionTransformer's defaults (mlp_ratio 4, qkv_bias, nn.GELU,
# LayerNorm eps 1e-6), as a transformers BlipVisionConfig
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=IMAGE_SIZE, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)  # fmt: skip
MLP_WIDTHS = (1024, 128, 64, 16, 1)  # ImageReward.py `MLP(768)`; Dropouts at 1, 3, 5, so Linears at 0, 2, 4, 6, 7
DTYPES = ("float32", "bfloat16", "float16")
# BLIP's VisionTransformer names -> transformers' BlipVisionModel names: outside the blocks, and inside block i
VIT_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
           "patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"}  # fmt: skip
VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")  # not in the score


def configs(med_config: Path, vit: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) of ImageReward's BLIP: ViT-L (or `vit`'s changes to it), and BERT with
    cross-attention from med_config.json (`encoder_width` set to the ViT's width, as BLIP_Pretrain does)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(**{**VIT_LARGE, **(vit or {})})
    med = json.loads(med_config.read_text())
    text = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], hidden_act=med["hidden_act"],
        layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        encoder_hidden_size=vision.hidden_size, is_decoder=True,  # is_decoder builds the cross-attention
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # generation's: the score generates nothing
    )  # fmt: skip
    return vision, text


def score_mlp(width: int) -> Any:
    """ImageReward's MLP as an nn.Sequential whose keys are the checkpoint's `mlp.layers.*` (eval: no dropout)."""
    from torch import nn

    layers, previous = [], width
    for index, out in enumerate(MLP_WIDTHS):
        layers.append(nn.Linear(previous, out))
        if index < 3:
            layers.append(nn.Dropout(0.2 if index < 2 else 0.1))
        previous = out
    return nn.Sequential(*layers)


def vit_key(key: str) -> str:
    """One BLIP ViT tensor name as BlipVisionModel names it (an unknown name is returned as it is, and refused)."""
    if key in VIT_TOP:
        return VIT_TOP[key]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        return f"encoder.layers.{index}.{VIT_BLOCK[module]}.{kind}" if module in VIT_BLOCK else key
    module, _, kind = key.rpartition(".")
    return f"{VIT_TOP[module]}.{kind}" if module in VIT_TOP else key


def blip_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """ImageReward.pt's state dict as (BlipVisionModel, BlipTextModel, MLP) state dicts."""
    vision, text, mlp = {}, {}, {}
    for key, tensor in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[vit_key(key.removeprefix("blip.visual_encoder."))] = tensor
        elif key.startswith("blip.text_encoder.") and not key.startswith(UNUSED):
            text[key.removeprefix("blip.text_encoder.")] = tensor
        elif key.startswith("mlp.layers."):
            mlp[key.removeprefix("mlp.layers.")] = tensor
    return vision, text, mlp


def load_strict(module: Any, state: dict[str, Any], what: str, path: Path) -> None:
    """Load every tensor of `module` from `state`, refusing missing, unexpected or reshaped ones by name."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"ImageReward: {path}'s {what} does not fit ImageReward's layout: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shapes {shapes[:5]}"
        )
    module.load_state_dict(state)


class ImageReward(RebuildOnUnpickle):
    """ImageReward's normalised score of each image against its prompt; see the module docstring."""

    @staticmethod
    def gpu_parameters(checkpoint: str, med_config: str | None = None, vit: dict | None = None, **_: Any) -> int:
        """Parameters this reward holds on its worker's GPU (for `grpo-image plan`): BLIP's ViT-L and text encoder
        (no pooler, no projections: the score uses neither) and the MLP, counted from the configs on the meta device."""
        import torch
        from transformers import BlipTextModel, BlipVisionModel

        vision, text = configs(find_med_config(checkpoint, med_config), vit)
        with torch.device("meta"):
            text_encoder = BlipTextModel(text, add_pooling_layer=False)
            modules = [BlipVisionModel(vision), text_encoder, score_mlp(text.hidden_size)]
        return sum(p.numel() for module in modules for p in module.parameters())

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str,
        med_config: str | None = None,
        vit: dict[str, Any] | None = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int = 16,
    ) -> None:
        import torch
        from torchvision import transforms
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        if dtype not in DTYPES:
            raise ValueError(f"ImageReward: dtype must be one of {DTYPES}, got {dtype!r}")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"ImageReward: checkpoint {path} does not exist; download ImageReward.pt and med_config.json from "
                f"the THUDM/ImageReward repository on the Hugging Face hub and pass the first as `checkpoint`"
            )
        self._init_args = dict(
            checkpoint=checkpoint, tokenizer=tokenizer, med_config=med_config, vit=vit, dtype=dtype, device=device,
            batch_size=batch_size,
        )  # fmt: skip
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype)
        self.batch_size = int(batch_size)
        vision_config, text_config = configs(find_med_config(checkpoint, med_config), vit)
        vision, text, mlp = blip_state(torch.load(path, map_location="cpu", weights_only=True))
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = score_mlp(text_config.hidden_size)
        for module, state, what in ((self.vision, vision, "ViT"), (self.text, text, "text encoder")):
            load_strict(module, state, what, path)
            module.to(self.device, self.dtype).eval()
        load_strict(self.mlp, mlp, "MLP", path)
        self.mlp.to(self.device).eval()  # fp32 whatever `dtype`: the reference casts the feature to fp32 before it
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer, in its order
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.preprocess = transforms.Compose([
            transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE), transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ])  # fmt: skip

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        import torch

        images = validate_batch("ImageReward", images, prompts, metadata)  # uint8 [n, H, W, 3]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            pixels = torch.stack([self.preprocess(im) for im in to_pil(images[start:stop])])  # [b, 3, 224, 224]
            tokens = self.tokenizer(
                list(prompts[start:stop]), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                return_tensors="pt",
            ).to(self.device)  # input_ids, attention_mask [b, 35]
            with torch.no_grad():
                image_embeds = self.vision(pixels.to(self.device, self.dtype)).last_hidden_state  # [b, 197, 1024]
                image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)  # [b, 197]
                text = self.text(
                    tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=image_embeds,
                    encoder_attention_mask=image_atts,
                ).last_hidden_state  # [b, 35, 768]
                raw = self.mlp(text[:, 0].float())[:, 0]  # [b], from the [CLS] feature
            scores.append(((raw - MEAN) / STD).cpu())
        return RewardOutput(scores=torch.cat(scores).numpy())


def find_med_config(checkpoint: str, med_config: str | None) -> Path:
    """The BERT config: the given file, else med_config.json beside the checkpoint (as the hub repository has it)."""
    path = Path(med_config).expanduser() if med_config else Path(checkpoint).expanduser().with_name("med_config.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageReward: {path} does not exist; pass the med_config.json of the THUDM/ImageReward repository as "
            f"`med_config`"
        )
    return path
