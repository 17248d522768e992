"""Image-code logits of an exported model read by its family's own classes, with no grpo-image import.

Run as a script in a process of its own (`python tests/own_classes.py REQUESTS.json OUT.safetensors`): for each
request {"family", "folder", "ids", "offset", "codes"} it loads the folder with the family's own loader, as a user
serving the export would, and writes the logits of every position over the image codes. The functions also run on
a model grpo-image holds (adapters attached), to compute the same logits in the same way.
"""

from __future__ import annotations

import json
import sys

import torch


def torchvision_importable() -> None:
    """The vision extra's documented step (README, "Install"): PyPI's CUDA torchvision imports next to the CPU torch
    once the two op schemas its import registers kernels for exist."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            library.define(schema)
        torchvision_importable.library = library  # the definitions live as long as this object


@torch.no_grad()
def image_code_logits(family: str, model, ids: torch.Tensor, offset: int, codes: int) -> torch.Tensor:
    """fp32 logits over the image codes at every position of `ids` [1, T]: [T, codes]."""
    if family == "janus":
        hidden = model.model.language_model(input_ids=ids).last_hidden_state  # [1, T, H]
        return model.model.generation_head(hidden)[0].float()  # generation_head: proj_out, activation, vision_head
    if family == "glm_image":  # the vision vocabulary's first rows are the codes
        return model(input_ids=ids).logits[0, :, :codes].float()
    return model(input_ids=ids).logits[0, :, offset : offset + codes].float()


def load(family: str, folder: str):
    if family == "janus":
        from transformers import JanusForConditionalGeneration, JanusProcessor

        JanusProcessor.from_pretrained(folder)  # the export carries the processor the family serves with
        return JanusForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    if family == "glm_image":
        from diffusers import GlmImagePipeline

        pipe = GlmImagePipeline.from_pretrained(folder, dtype=torch.float32)
        return pipe.vision_language_encoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def main(requests_file: str, out_file: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    results = {}
    for request in json.loads(open(requests_file).read()):
        model = load(request["family"], request["folder"]).eval()
        ids = torch.tensor([request["ids"]])
        results[request["key"]] = image_code_logits(request["family"], model, ids, request["offset"],
                                                    request["codes"]).contiguous()
    assert "grpo_image" not in sys.modules, "the export must load without grpo-image"
    save_file(results, out_file)


if __name__ == "__main__":
    torchvision_importable()
    main(*sys.argv[1:])
