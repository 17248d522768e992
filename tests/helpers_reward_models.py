"""Tiny models of HPSv3's and ImageReward's real classes, saved in the layouts their released files use.

HPSv3: a Qwen2-VL folder (config, a byte-level Qwen2 tokenizer with Qwen2-VL's special tokens and chat template, the
image processor) and an `HPSv3.safetensors` holding the state dict of HPSv3's `Qwen2VLRewardModelBT` as transformers
4.45 names it (`visual.*`, `model.*`, `lm_head.weight`, `rm_head.*`). ImageReward: an `ImageReward.pt` state dict in
BLIP's own layout (`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`) with a `med_config.json`, and a
BERT WordPiece tokenizer folder. Weights are seeded random; only the shapes and names are the released files'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Qwen/Qwen2-VL-7B-Instruct's chat template, as transformers' own Qwen2-VL processor tests carry it
# (tests/models/qwen2_vl/test_processor_qwen2_vl.py, `prepare_processor_dict`)
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL's special tokens in their order (ids follow the byte-level vocabulary, as in the real tokenizer)
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>"]  # fmt: skip


# preprocessor_config.json's fields as Qwen2-VL-7B-Instruct's has them (its own pixel range, which HPSv3 replaces)
QWEN2_VL_PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                         "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                         "image_std": [0.26862954, 0.26130258, 0.27577711],
                         "image_processor_type": "Qwen2VLImageProcessor",
                         "processor_class": "Qwen2VLProcessor"}  # fmt: skip


def _byte_level_qwen2_tokenizer():
    """A Qwen2 tokenizer with no merges: one token per byte (256) plus Qwen2-VL's special tokens."""
    from tokenizers import decoders, models, pre_tokenizers, Tokenizer
    from transformers import Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>")  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIALS[1:]})
    return tokenizer


def spread(module: torch.nn.Module) -> None:
    """Redraw a seeded module's weights at unit gain (std 1 / sqrt(fan-in), biases 0.1): default initialisation
    (std 0.02) leaves a toy model nearly blind to its input, and a test could not tell one image from another."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.1)


def write_tiny_qwen2_vl(root: Path) -> Path:
    """A Qwen2-VL base folder as HPSv3 needs it, in the files Qwen/Qwen2-VL-7B-Instruct has (config.json, the
    tokenizer's files, chat_template.json, preprocessor_config.json with its own min and max pixels; no weights)."""
    from transformers import Qwen2VLConfig

    tokenizer = _byte_level_qwen2_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
            rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )  # fmt: skip
    folder = root / "qwen2_vl"
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    (folder / "preprocessor_config.json").write_text(json.dumps(QWEN2_VL_PREPROCESSOR))
    return folder


def write_tiny_hpsv3(root: Path, seed: int = 0):
    """A tiny Qwen2-VL base folder and an HPSv3 checkpoint of a seeded model built on it, under `root`:
    (base folder, checkpoint path, the Qwen2VLForConditionalGeneration, the score head)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base = write_tiny_qwen2_vl(root)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})  # as HPSv3's train.py does
    config = Qwen2VLConfig.from_pretrained(base)
    config.text_config.vocab_size = len(tokenizer)  # HPSv3 resizes the embeddings to its tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config).eval()
        hidden = config.text_config.hidden_size  # HPSv3's rm_head ("ranknet", no rm_head_kwargs), restated
        head = torch.nn.Sequential(
            torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05), torch.nn.Linear(1024, 16),
            torch.nn.ReLU(), torch.nn.Linear(16, 2),
        ).eval()
        for module in (model, head):
            spread(module)
    state = {}  # transformers 4.45's names for Qwen2VLForConditionalGeneration, HPSv3's `rm_head`
    for key, tensor in model.state_dict().items():
        key = key.replace("model.visual.", "visual.", 1).replace("model.language_model.", "model.", 1)
        state[key] = tensor.contiguous()
    state.update({f"rm_head.{key}": tensor for key, tensor in head.state_dict().items()})
    checkpoint = root / "HPSv3.safetensors"
    save_file(state, str(checkpoint))
    return base, checkpoint, model, head


# A ViT of BLIP's layout at toy size (ImageReward's is ViT-L/16 at 224 px: width 1024, 24 blocks, 16 heads, MLP 4096)
TINY_VIT = dict(hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=32)
# med_config.json's fields at toy size (ImageReward's: BERT-base, 768 wide, 12 layers, vocab 30524)
TINY_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 24, "initializer_range": 0.02, "intermediate_size": 40,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "encoder_width": 16,
            "add_cross_attention": True}  # fmt: skip


def write_tiny_bert_tokenizer(root: Path) -> Path:
    """A WordPiece tokenizer folder of bert-base-uncased's kind: lower-casing, specials first, a few words."""
    from transformers import BertTokenizerFast

    words = ["a", "red", "cat", "two", "dogs", "on", "hill", "at", "dawn", "tiny", "house", "##s", "the"]
    (root / "bert").mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"abcdefghijklmnopqrstuvwxyz"]
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(root / "bert" / "vocab.txt"), do_lower_case=True).save_pretrained(root / "bert")
    return root / "bert"


def write_tiny_image_reward(root: Path, seed: int = 0):
    """ImageReward.pt (BLIP's own tensor names, seeded random values at unit gain), med_config.json beside it and a
    BERT tokenizer folder, under `root`: (checkpoint path, tokenizer folder, the state dict)."""
    tokenizer = write_tiny_bert_tokenizer(root)
    med = {**TINY_MED, "vocab_size": len((tokenizer / "vocab.txt").read_text().split()) + 2}  # + [DEC], [ENC]
    (root / "med_config.json").write_text(json.dumps(med))
    d, w, t, i = TINY_VIT["hidden_size"], TINY_VIT["intermediate_size"], med["hidden_size"], med["intermediate_size"]
    grid = (224 // TINY_VIT["patch_size"]) ** 2
    shapes = {"blip.visual_encoder.cls_token": (1, 1, d), "blip.visual_encoder.pos_embed": (1, grid + 1, d),
              "blip.visual_encoder.patch_embed.proj.weight": (d, 3, TINY_VIT["patch_size"], TINY_VIT["patch_size"]),
              "blip.visual_encoder.patch_embed.proj.bias": (d,), "blip.visual_encoder.norm.weight": (d,),
              "blip.visual_encoder.norm.bias": (d,)}  # fmt: skip
    for b in range(TINY_VIT["num_hidden_layers"]):  # vit.py Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2
        for name, shape in (("norm1", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("norm2", (d,)),
                            ("mlp.fc1", (w, d)), ("mlp.fc2", (d, w))):  # fmt: skip
            shapes[f"blip.visual_encoder.blocks.{b}.{name}.weight"] = shape
            shapes[f"blip.visual_encoder.blocks.{b}.{name}.bias"] = (shape[0],)
    text = "blip.text_encoder."
    shapes.update({f"{text}embeddings.word_embeddings.weight": (med["vocab_size"], t),
                   f"{text}embeddings.position_embeddings.weight": (med["max_position_embeddings"], t),
                   f"{text}embeddings.LayerNorm.weight": (t,), f"{text}embeddings.LayerNorm.bias": (t,)})  # fmt: skip
    for layer in range(med["num_hidden_layers"]):  # med.py BertLayer: attention, crossattention, intermediate, output
        at = f"{text}encoder.layer.{layer}."
        linears = {"attention.self.query": (t, t), "attention.self.key": (t, t), "attention.self.value": (t, t),
                   "attention.output.dense": (t, t), "crossattention.self.query": (t, t),
                   "crossattention.self.key": (t, d), "crossattention.self.value": (t, d),
                   "crossattention.output.dense": (t, t), "intermediate.dense": (i, t), "output.dense": (t, i)}
        norms = ("attention.output.LayerNorm", "crossattention.output.LayerNorm", "output.LayerNorm")  # fmt: skip
        for name, shape in linears.items():
            shapes[f"{at}{name}.weight"], shapes[f"{at}{name}.bias"] = shape, (shape[0],)
        for name in norms:
            shapes[f"{at}{name}.weight"], shapes[f"{at}{name}.bias"] = (t,), (t,)
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((t, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        shapes[f"mlp.layers.{index}.weight"], shapes[f"mlp.layers.{index}.bias"] = (n_out, n_in), (n_out,)
    shapes.update({"blip.vision_proj.weight": (256, d), "blip.vision_proj.bias": (256,),
                   "blip.text_proj.weight": (256, t), "blip.text_proj.bias": (256,)})  # in the file, not in the score
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=generator)
        elif len(shape) == 1:
            state[key] = 0.1 * torch.randn(shape, generator=generator)
        else:  # unit gain: std 1 / sqrt(fan-in), or 1 / sqrt(width) for the cls token and positions [1, *, width]
            fan_in = shape[-1] if len(shape) == 3 else math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=generator) * fan_in**-0.5
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    checkpoint = root / "ImageReward.pt"
    torch.save(state, checkpoint)
    return checkpoint, tokenizer, state
