"""GLM-Image's decoder transformer of an export, read by diffusers' own pipeline, with no grpo-image import.

Run as a script in a process of its own (`python tests/own_decoder.py FOLDER INPUTS.safetensors OUT.safetensors`):
it loads FOLDER with `GlmImagePipeline.from_pretrained` in float32, as a user serving the export would, and writes
its transformer's output on the fixed inputs. `dit_output` also runs on a transformer grpo-image holds (adapters
attached), to compute the same output in the same way.
"""

from __future__ import annotations

import sys

import torch


@torch.no_grad()
def dit_output(transformer, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One conditional DiT call as GlmImagePipeline makes it: the predicted velocity, fp32 [n, C, h, w]."""
    return transformer(
        hidden_states=inputs["latents"], encoder_hidden_states=inputs["glyphs"], prior_token_id=inputs["prior"],
        prior_token_drop=torch.zeros_like(inputs["prior"], dtype=torch.bool), timestep=inputs["timestep"],
        target_size=inputs["target_size"], crop_coords=torch.zeros_like(inputs["target_size"]), return_dict=False,
    )[0].float()


def main(folder: str, inputs_file: str, out_file: str) -> None:
    from diffusers import GlmImagePipeline
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    pipe = GlmImagePipeline.from_pretrained(folder, dtype=torch.float32)
    output = dit_output(pipe.transformer.eval(), load_file(inputs_file))
    assert "grpo_image" not in sys.modules, "the export must load without grpo-image"
    save_file({"output": output.contiguous()}, out_file)


if __name__ == "__main__":
    from own_classes import torchvision_importable  # the script's folder is first on sys.path

    torchvision_importable()
    main(*sys.argv[1:])
