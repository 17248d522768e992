"""HPSv3: human preference score from a Qwen2-VL-7B reward model (MizzenAI/HPSv3, ICCV 2025).

HPSv3 is Qwen2-VL-7B-Instruct fine-tuned on human preference pairs with a small MLP head on one token: the model reads
one image and a fixed instruction that ends in a special token `<|Reward|>`, and the head maps that token's last
hidden state to (mu, sigma) of a Gaussian preference score. The score is mu, as the reference's inference selects.
The `hpsv3` package pins transformers 4.45.2, so this reward rebuilds the model with the installed transformers' own
Qwen2-VL classes and reads the released checkpoint.

What the reference does, and this reward with it (hpsv3 1.0.0: inference.py, train.py, model/qwen2vl_trainer.py,
dataset/utils.py, config/HPSv3_7B.yaml):
- text: Qwen2-VL's chat template over one user turn, the image then `instruction.format(text_prompt=prompt) +
  suffix` (byte for byte in model_inputs/hpsv3.yaml), with the generation prompt; right padding in a batch;
- image: resized once with PIL bicubic to the size Qwen2-VL's `smart_resize` gives for 256 * 28 * 28 pixels
  (`min_pixels = max_pixels`; sides multiples of 28, aspect kept), then rescaled, normalised (CLIP mean/std) and cut
  into 14 px patches, all by the base model's image processor on its PIL path (the reference resizes in
  qwen_vl_utils' copy, then the processor's own resize to the same size changes nothing);
- positions: the reference's forward calls the language model without position ids, so every token gets its plain
  index on all three M-RoPE axes (not Qwen2-VL's 3-D image positions): passed here explicitly;
- head: Linear(hidden, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2) in fp32 on the `<|Reward|>`
  token's hidden state; the VLM in bf16 (`dtype`, the reference's precision by default);
- the language model head (`lm_head`) is in the checkpoint but never used for the score: it is not loaded.

Files: `checkpoint` is the released HPSv3.safetensors (hub repo MizzenAI/HPSv3); `base_model` a local copy of
Qwen/Qwen2-VL-7B-Instruct's config, tokenizer and processor files (its weights are not read: the checkpoint holds
every weight). Batched; pickles as its arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from grpo_image.core.types import RewardOutput
from rewards._image import to_pil, validate_batch
from rewards._rebuild import RebuildOnUnpickle

MODEL_INPUTS = Path(__file__).with_name("model_inputs") / "hpsv3.yaml"
DTYPES = ("bfloat16", "float16", "float32")
HEAD_WIDTHS = (1024, 16, 2)  # the reference's "ranknet" head without rm_head_kwargs; output (mu, sigma)


def model_inputs() -> dict[str, Any]:
    """HPSv3's fixed inputs (instruction, suffix, reward token, pixels) from model_inputs/hpsv3.yaml."""
    import yaml

    return yaml.safe_load(MODEL_INPUTS.read_text(encoding="utf-8"))


def user_text(prompt: str, inputs: dict[str, Any]) -> str:
    """The text the reference puts after the image for `prompt`."""
    return inputs["instruction"].format(text_prompt=prompt) + inputs["suffix"]


def score_head(hidden_size: int) -> Any:
    """The reference's score head (its `rm_head`): keys 0.*, 3.*, 5.* as in the checkpoint."""
    from torch import nn

    wide, narrow, out = HEAD_WIDTHS
    return nn.Sequential(
        nn.Linear(hidden_size, wide), nn.ReLU(), nn.Dropout(0.05), nn.Linear(wide, narrow), nn.ReLU(),
        nn.Linear(narrow, out),
    )  # fmt: skip


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's tensors (transformers 4.45 names: `visual.*`, `model.*`, `lm_head.*`, `rm_head.*`) as the
    state dicts of a current `Qwen2VLModel` (`visual.*`, `language_model.*`) and of the score head; the unused
    language model head is not read."""
    from safetensors import safe_open

    backbone, head, unknown = {}, {}, []
    with safe_open(str(path), framework="pt") as tensors:
        for key in tensors.keys():
            if key.startswith("visual."):
                backbone[key] = tensors.get_tensor(key)
            elif key.startswith("model."):
                backbone["language_model." + key.removeprefix("model.")] = tensors.get_tensor(key)
            elif key.startswith("rm_head."):
                head[key.removeprefix("rm_head.")] = tensors.get_tensor(key)
            elif key != "lm_head.weight":
                unknown.append(key)
    if unknown or not head:
        raise ValueError(f"HPSv3: {path} is not an HPSv3 checkpoint (unknown keys {unknown[:5]}, head {sorted(head)})")
    return backbone, head


def load_processor(base_model: str, inputs: dict[str, Any]) -> Any:
    """The base model's processor with the PIL image path (as the reference resizes) at HPSv3's pixel count, right
    padding, and the reward token added to the tokenizer as the reference adds it."""
    from transformers import AutoProcessor, Qwen2VLImageProcessorPil

    pixels = int(inputs["pixels"])  # min_pixels = max_pixels; as keywords, they replace the folder's own range
    images = Qwen2VLImageProcessorPil.from_pretrained(base_model, min_pixels=pixels, max_pixels=pixels)
    if (images.size.shortest_edge, images.size.longest_edge) != (pixels, pixels):
        raise ValueError(f"HPSv3: the image processor of {base_model} keeps its pixel range {images.size}")
    processor = AutoProcessor.from_pretrained(base_model, image_processor=images)
    processor.tokenizer.padding_side = "right"
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [inputs["reward_token"]]})
    return processor


def check_fit(backbone: dict[str, Any], config: Any, where: str) -> None:
    """Refuse a checkpoint whose tensors are not exactly those of `config`'s Qwen2-VL model (names and shapes),
    naming the first differences: e.g. a base folder whose tokenizer is not the one HPSv3 was trained with."""
    import torch
    from transformers import Qwen2VLModel

    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in Qwen2VLModel(config).state_dict().items()}
    problems = {
        "missing": sorted(set(expected) - set(backbone))[:5],
        "unexpected": sorted(set(backbone) - set(expected))[:5],
        "shapes": [
            f"{key}: {tuple(backbone[key].shape)} for {expected[key]}"
            for key in sorted(set(expected) & set(backbone)) if tuple(backbone[key].shape) != expected[key]
        ][:5],
    }  # fmt: skip
    if any(problems.values()):
        raise ValueError(f"HPSv3: {where}: {({name: keys for name, keys in problems.items() if keys})}")


def base_config(base_model: str, vocab_size: int) -> Any:
    """The base model's Qwen2-VL config with the vocabulary the reference resizes to (its tokenizer's length)."""
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(base_model)
    config.text_config.vocab_size = vocab_size
    return config


class HPSv3(RebuildOnUnpickle):
    """mu of HPSv3's (mu, sigma) for each image and its prompt; see the module docstring."""

    @staticmethod
    def gpu_parameters(base_model: str, **_: Any) -> int:
        """Parameters this reward holds on its worker's GPU (for `grpo-image plan`): the Qwen2-VL model without its
        language model head, at the tokenizer's vocabulary, and the score head; counted on the meta device."""
        import torch
        from transformers import AutoTokenizer, Qwen2VLModel

        tokenizer = AutoTokenizer.from_pretrained(base_model)  # the tokenizer alone: no image or video processor
        tokenizer.add_special_tokens({"additional_special_tokens": [model_inputs()["reward_token"]]})
        config = base_config(base_model, len(tokenizer))
        with torch.device("meta"):
            modules = [Qwen2VLModel(config), score_head(config.text_config.hidden_size)]
        return sum(p.numel() for module in modules for p in module.parameters())

    def __init__(
        self,
        checkpoint: str,
        base_model: str,
        dtype: str = "bfloat16",
        device: str | None = None,
        batch_size: int = 4,
    ) -> None:
        import torch
        from transformers import Qwen2VLModel

        if dtype not in DTYPES:
            raise ValueError(f"HPSv3: dtype must be one of {DTYPES}, got {dtype!r}")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"HPSv3: checkpoint {path} does not exist; download HPSv3.safetensors from the MizzenAI/HPSv3 "
                f"repository on the Hugging Face hub and pass its path as `checkpoint`"
            )
        self._init_args = dict(
            checkpoint=checkpoint, base_model=base_model, dtype=dtype, device=device, batch_size=batch_size
        )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, dtype)
        self.batch_size = int(batch_size)
        self.inputs = model_inputs()
        self.processor = load_processor(base_model, self.inputs)
        self.reward_token_id = self.processor.tokenizer.convert_tokens_to_ids(self.inputs["reward_token"])
        config = base_config(base_model, len(self.processor.tokenizer))
        backbone, head = read_checkpoint(path)
        check_fit(backbone, config, f"{path} does not fit the Qwen2-VL of {base_model}")
        model = Qwen2VLModel.from_pretrained(None, config=config, state_dict=backbone, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.head = score_head(config.text_config.hidden_size)
        self.head.load_state_dict(head)
        self.head = self.head.to(self.device, torch.float32).eval()

    def __call__(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> RewardOutput:
        import torch

        images = validate_batch("HPSv3", images, prompts, metadata)  # uint8 [n, H, W, 3]
        scores = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch = self.encode(to_pil(images[start:stop]), prompts[start:stop])
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state  # [b, T, D]
                rows, columns = torch.nonzero(batch["input_ids"] == self.reward_token_id, as_tuple=True)  # [b], [b]
                if rows.tolist() != list(range(len(hidden))):
                    raise ValueError(f"HPSv3: prompts {start}..{start + len(hidden) - 1} must hold no reward token")
                mu_sigma = self.head(hidden[rows, columns].float())  # [b, 2], fp32 as the reference's head
            scores.append(mu_sigma[:, 0].cpu())
        return RewardOutput(scores=torch.cat(scores).numpy())

    def encode(self, images: list, prompts: list[str]) -> dict[str, Any]:
        """The model's inputs for b images and prompts, as the reference builds them, with its plain positions."""
        import torch

        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(p, self.inputs)}]}]
            for p in prompts
        ]
        texts = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"]  # [b, T], right-padded
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # [b, T]: plain index, every M-RoPE axis
        return {
            "input_ids": input_ids.to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),  # [b, T]
            "position_ids": positions.to(self.device),
            "pixel_values": batch["pixel_values"].to(self.device, self.dtype),  # [sum of patches, 3 * 2 * 14 * 14]
            "image_grid_thw": batch["image_grid_thw"].to(self.device),  # [b, 3]
        }
