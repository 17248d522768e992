"""`grpo-image export` of a run that trained the decoder (decoder GRPO): the trained decoder in the export.

GLM-Image: a tiny GLM-Image saved as its diffusers repository is the source (`policy.path` and `decoder.path`); a
run of 2 steps with train.target both, in bf16 as the real recipes run, trains the policy's and the DiT's adapters.
The export's transformer/ is then loaded by diffusers' own pipeline in a process of its own (tests/own_decoder.py)
and computes the trained decoder's output. X-Omni: the merge into the decoder subfolder its config.json names,
tensor by tensor against W + (alpha / r) B A.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grpo_image.app.cli import main
from grpo_image.decoders.flow_lora import adapters_disabled
from grpo_image.decoders.tiny_glm_image import tiny_dit_parts
from grpo_image.export.export import export
from grpo_image.export.source_folders import ExportError
from tests.data import DATA
from tests.helpers_sampling import logprob_tolerance, roundings_to_a_logit
from tests.own_decoder import dit_output

pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

REPO = Path(__file__).resolve().parents[1]
R, ALPHA = 4, 8  # the decoder's LoRA: scaling alpha / r = 2, so a merge that forgot it would be off by half
STEP = "step_000002"
LM_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.down_proj)"  # as test_export's


def glm_recipe(root: Path, source: Path, target: str) -> Path:
    """test_decoder_grpo's tiny recipe with the policy and the decoder read from `source`: 2 steps, bf16."""
    recipe = {
        "seed": 3, "steps": 2, "save_every": 2, "sample_every": 0, "output_dir": str(root / "runs" / target),
        "policy": {"_component_": "grpo_image.policies.glm_image.glm_image_policy", "path": str(source),
                   "height": 64, "width": 96, "dtype": "bfloat16"},
        "decoder": {"_component_": "grpo_image.decoders.glm_image.GlmImageDecoder", "path": str(source),
                    "num_inference_steps": 4, "guidance_scale": 1.5, "dtype": "bfloat16", "device": "cpu"},
        "rewards": [
            {"name": "color", "feeds": "policy", "scorer": {"_component_": "rewards.color.ColorAdherence",
                                                             "tolerance": 80.0}},
            {"name": "jpeg", "feeds": "decoder", "scorer": {"_component_": "rewards.jpeg.JPEGCompressibility",
                                                             "quality": 75, "scale": "fraction"}},
        ],
        "data": {"prompts": str(REPO / "prompts" / "tiny_decoder.jsonl"), "batch_size": 2, "group_size": 2,
                 "max_passes": 1000.0},
        "sampling": {"min_p": 0.03},
        "train": {"target": target, "mode": "lora", "lr": 1e-2, "minibatches": 2,
                  "lora": {"target_regex": LM_TARGETS}},
        "decoder_train": {"group_size": 3, "num_inference_steps": 4, "window": 2, "lr": 1e-2,
                          "lora": {"r": R, "alpha": ALPHA}},
        "logging": {"tensorboard": False, "num_samples": 2},
    }
    path = root / f"{target}.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(recipe)))
    return path


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """The source folder, the run (train.target both) and its exports: float32, bfloat16, peft."""
    from diffusers import GlmImagePipeline

    from grpo_image.policies.glm_image import tiny_glm_image_policy

    root = tmp_path_factory.mktemp("export_decoder")
    policy = tiny_glm_image_policy()
    source = root / "glm_image"
    GlmImagePipeline(processor=policy.processor, vision_language_encoder=policy.model.to(torch.bfloat16),
                     **tiny_dit_parts(policy.num_codes, vae_width=32, vae_groups=1)).save_pretrained(source)
    assert main(["train", str(glm_recipe(root, source, "both"))]) == 0
    run = root / "runs" / "both"
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = root / "exports" / dtype
        assert main(["export", str(run), "--out", str(out[dtype]), "--dtype", dtype]) == 0
    out["peft"] = root / "exports" / "peft"
    assert main(["export", str(run), "--out", str(out["peft"]), "--format", "peft"]) == 0
    return root, source, run, out


def attached_transformer(source: Path, run: Path):
    """The run's trained DiT as `sample` and `eval` decode with it: the source's in float32, adapters attached."""
    from grpo_image.decoders.glm_image import GlmImageDecoder
    from grpo_image.training.decoder_grpo import attach_trained_adapters

    decoder = GlmImageDecoder(str(source), num_inference_steps=1, dtype="float32", device="cpu")
    attach_trained_adapters(decoder, run / "checkpoints" / STEP / "decoder")
    return decoder.pipe.transformer.eval()


def fixed_inputs() -> dict[str, torch.Tensor]:
    """One 64 x 96 image's DiT inputs: latents [1, 4, 8, 12] (24 patches of 2 x 2), the 2 x 3 code grid upsampled to
    one prior code a patch [1, 24], 5 glyph embeddings [1, 5, 16], a mid-schedule timestep."""
    g = torch.Generator().manual_seed(11)
    return {"latents": torch.randn(1, 4, 8, 12, generator=g), "glyphs": torch.randn(1, 5, 16, generator=g),
            "prior": torch.randint(0, 64, (1, 24), generator=g), "timestep": torch.tensor([500.0]),
            "target_size": torch.tensor([[64.0, 96.0]])}


def merged_tolerance(transformer, tokens: int, max_out: float) -> float:
    """The merged export against the adapters attached: (W + s B A) x and W x + s B (A x) round differently, W + s B A
    once more (half an fp32 ULP of each weight) and every later sum in another order. Each is a rounding of relative
    size u = 2^-24 in sequence from the inputs to an output value; counted as in a decoder layer
    (helpers_sampling.roundings_to_a_logit: norms, q/k/v, scores, the sum over the tokens, out, the MLP), plus the
    embedders before the block (patch, timestep, prior codes, glyphs: one hidden-wide sum each) and the output
    head's norm and projection, they add up like a random walk (helpers_sampling.logprob_tolerance)."""
    config = transformer.config
    hidden = config.num_attention_heads * config.attention_head_dim
    roundings = roundings_to_a_logit(layers=config.num_layers, hidden=hidden, intermediate=4 * hidden,
                                     head_dim=config.attention_head_dim, tokens=tokens) + 4 * hidden
    return logprob_tolerance(roundings, max_out)


def test_the_export_holds_the_trained_decoder_and_diffusers_pipeline_computes_it(glm):
    root, source, run, out = glm
    inputs = fixed_inputs()
    save_file(inputs, root / "dit_inputs.safetensors")
    done = subprocess.run([sys.executable, str(REPO / "tests" / "own_decoder.py"), str(out["float32"]),
                           str(root / "dit_inputs.safetensors"), str(root / "dit_output.safetensors")],
                          capture_output=True, text=True, cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = load_file(root / "dit_output.safetensors")["output"]  # [1, 4, 8, 12]
    transformer = attached_transformer(source, run)
    want = dit_output(transformer, inputs)  # [1, 4, 8, 12]
    with adapters_disabled(transformer):
        untrained = dit_output(transformer, inputs)  # [1, 4, 8, 12]: the source's DiT
    assert got.shape == want.shape == (1, 4, 8, 12)
    tolerance = merged_tolerance(transformer, tokens=24 + 5, max_out=want.abs().max().item())
    assert (got - want).abs().max().item() <= tolerance, ((got - want).abs().max().item(), tolerance)
    assert (want - untrained).abs().max().item() > 100 * tolerance  # the adapters did move what the export computes


def test_the_merged_weights_are_the_sources_plus_scaled_b_a_and_the_bf16_export_is_them_rounded_once(glm):
    _, source, run, out = glm
    name = "transformer_blocks.0.ff.net.2"
    adapters = load_file(run / "checkpoints" / STEP / "decoder" / "adapter_model.safetensors")
    a, b = adapters[f"{name}.lora_A.weight"], adapters[f"{name}.lora_B.weight"]  # [4, 64], [16, 4]
    assert b.abs().max() > 0  # trained
    original = load_file(source / "transformer" / "diffusion_pytorch_model.safetensors")
    full, half = (load_file(out[d] / "transformer" / "diffusion_pytorch_model.safetensors")
                  for d in ("float32", "bfloat16"))  # fmt: skip
    assert full.keys() == half.keys() == original.keys()
    for key, value in full.items():  # the source's tensors and dtypes (fp32), each bf16 tensor the fp32 one rounded
        assert value.shape == original[key].shape and value.dtype == original[key].dtype == torch.float32, key
        assert torch.equal(half[key], value.to(torch.bfloat16)), key
    delta = (ALPHA / R) * b @ a  # [16, 64]
    expected = original[f"{name}.weight"] + delta
    # one fp32 rounding of W + delta (u |W + delta|) and of the r = 4 products summed in B A (4 u sum |s B A|)
    bound = 2**-24 * (expected.abs() + 4 * (ALPHA / R) * b.abs() @ a.abs())  # [16, 64]
    assert ((full[f"{name}.weight"] - expected).abs() <= bound).all()
    assert (delta.abs() > bound).any()  # the update is there, not lost in W's rounding
    adapted = {key.split(".lora_")[0] for key in adapters}
    for key, value in full.items():  # every other tensor is the source's own
        if key.removesuffix(".weight") not in adapted:
            assert torch.equal(value, original[key]), key
    assert not any(torch.equal(full[f"{m}.weight"], original[f"{m}.weight"]) for m in adapted)  # all trained
    # the other components are carried as they were
    assert (out["float32"] / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (source / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (out["float32"] / "transformer" / "config.json").read_bytes() == \
        (source / "transformer" / "config.json").read_bytes()


def test_the_peft_export_holds_both_adapters_and_the_decoders_loads_with_peft(glm):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    root, source, run, out = glm
    checkpoint = run / "checkpoints" / STEP
    assert (out["peft"] / "adapter_model.safetensors").read_bytes() == \
        (checkpoint / "policy" / "adapter_model.safetensors").read_bytes()
    decoder = out["peft"] / "decoder"
    assert (decoder / "adapter_model.safetensors").read_bytes() == \
        (checkpoint / "decoder" / "adapter_model.safetensors").read_bytes()
    config = json.loads((decoder / "adapter_config.json").read_text())
    from grpo_image.decoders.glm_image_flow import DIT_LORA_TARGETS

    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, ALPHA, DIT_LORA_TARGETS)
    assert config["base_model_name_or_path"] == str((source / "transformer").resolve())
    # the model card's loading snippet, on the source's transformer: the trained decoder's output exactly
    from diffusers import GlmImageTransformer2DModel

    transformer = GlmImageTransformer2DModel.from_pretrained(config["base_model_name_or_path"]).eval()
    inject_adapter_in_model(LoraConfig.from_pretrained(str(decoder)), transformer)
    set_peft_model_state_dict(transformer, load_file(decoder / "adapter_model.safetensors"))
    inputs = fixed_inputs()
    assert torch.equal(dit_output(transformer, inputs), dit_output(attached_transformer(source, run), inputs))
    card = (out["peft"] / "README.md").read_text()
    assert "the policy (LoRA r 16, alpha 32) and the decoder (LoRA r 4, alpha 8 on its transformer)" in card
    assert "inject_adapter_in_model" in card


def test_the_model_card_says_the_run_trained_both_and_where_the_decoder_is(glm):
    _, _, _, out = glm
    card = (out["bfloat16"] / "README.md").read_text()
    assert "| trained | the policy (LoRA r 16, alpha 32) and the decoder (LoRA r 4, alpha 8 on its transformer) " \
           "(train.target both) |" in card
    assert "| trained decoder | `transformer/`: the transformer with the run's adapters merged |" in card


def test_a_decoder_only_run_says_so_and_writes_its_untrained_policy_adapter(glm, tmp_path):
    """A decoder-only run's checkpoint: the both-run's, its config saying train.target decoder and its policy adapter
    untrained (B zero), as such a run saves it."""
    _, _, run, _ = glm
    checkpoint = tmp_path / "run" / "checkpoints" / STEP
    shutil.copytree(run / "checkpoints" / STEP, checkpoint)
    config = OmegaConf.load(checkpoint / "config.yaml")
    config.train.target = "decoder"
    OmegaConf.save(config, checkpoint / "config.yaml")
    policy = load_file(checkpoint / "policy" / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in policy.items()},
              checkpoint / "policy" / "adapter_model.safetensors")
    export(checkpoint, tmp_path / "peft", fmt="peft", progress=lambda line: None)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "peft" / "decoder" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "the decoder only (train.target decoder)" in card and "untrained (B zero)" in card
    export(checkpoint, tmp_path / "auto", dtype="float32", progress=lambda line: None)
    assert "the policy is the source's, unchanged" in (tmp_path / "auto" / "README.md").read_text()


def test_a_decoder_trained_elsewhere_or_in_memory_is_refused_and_nothing_is_written(glm, tmp_path):
    root, source, run, _ = glm
    other = tmp_path / "other_glm_image"
    shutil.copytree(source, other)
    cases = {"decoder.path": str(other), "decoder": {"_component_":
                                                     "grpo_image.decoders.tiny_glm_image.tiny_glm_image_decoder"}}
    reasons = {"decoder.path": "its adapters belong to another transformer", "decoder": "built in memory"}
    for key, value in cases.items():
        checkpoint = tmp_path / key / "checkpoints" / STEP
        shutil.copytree(run / "checkpoints" / STEP, checkpoint)
        config = OmegaConf.load(checkpoint / "config.yaml")
        OmegaConf.update(config, key, value, merge=False)
        OmegaConf.save(config, checkpoint / "config.yaml")
        with pytest.raises(ExportError, match=reasons[key]):
            export(checkpoint, tmp_path / f"out_{key}", progress=lambda line: None)
        assert not (tmp_path / f"out_{key}").exists() and not (tmp_path / f".out_{key}.partial").exists()


def test_the_xomni_merge_writes_the_decoder_subfolder_its_config_names(tmp_path):
    """X-Omni's decoder transformer (the tiny reference's X-Omni-En) in the subfolder vision_config.decoder.model_path
    names, with adapters as decoder GRPO injects them: the merge keeps the source's names, shapes and dtypes, and an
    adapted weight is W + (alpha / r) B A."""
    from grpo_image.decoders.flow_lora import add_decoder_lora, adapter_state
    from grpo_image.decoders.xomni_flux_flow import FLUX_LORA_TARGETS
    from grpo_image.decoders.xomni_transformer import load_xomni_transformer
    from grpo_image.export.decoder_weights import DIFFUSERS_STEM, TrainedDecoder, decoder_folder, merged_tensors
    from grpo_image.export.safetensors_shards import write_shards
    from grpo_image.export.source_folders import FAMILIES

    reference = DATA / "xomni_tiny_decoder_reference" / "transformer_en"
    source = tmp_path / "X-Omni-En"
    shutil.copytree(DATA / "xomni_tiny_reference", source)
    shutil.copytree(reference, source / "flux_decoder")
    config = json.loads((source / "config.json").read_text())
    config["vision_config"] = {"decoder": {"model_path": "flux_decoder", "upscale_factor": 16}}
    (source / "config.json").write_text(json.dumps(config))
    xomni = next(family for family in FAMILIES.values() if family.name == "X-Omni")
    assert decoder_folder(source, xomni) == source / "flux_decoder"

    transformer = load_xomni_transformer(reference, "en", 64)
    add_decoder_lora(transformer, r=R, alpha=ALPHA, targets=FLUX_LORA_TARGETS)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))  # a trained-looking adapter
    adapters = adapter_state(transformer)
    (tmp_path / "decoder").mkdir()
    save_file(adapters, tmp_path / "decoder" / "adapter_model.safetensors")
    trained = TrainedDecoder(tmp_path / "decoder", R, ALPHA, FLUX_LORA_TARGETS)
    _, tensors = merged_tensors(source / "flux_decoder", trained, torch.float32)
    (tmp_path / "out").mkdir()
    write_shards(tensors, tmp_path / "out", max_shard_size="100KB", stem=DIFFUSERS_STEM)  # the 0.5 MB source in shards
    index = json.loads((tmp_path / "out" / f"{DIFFUSERS_STEM}.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    merged = {k: v for shard in shards for k, v in load_file(tmp_path / "out" / shard).items()}
    with safe_open(reference / f"{DIFFUSERS_STEM}.safetensors", "pt") as handle:
        original = {name: handle.get_tensor(name) for name in handle.keys()}
    assert merged.keys() == original.keys()
    assert all(merged[k].shape == v.shape and merged[k].dtype == v.dtype for k, v in original.items())
    modules = {key.split(".lora_")[0] for key in adapters}
    assert len(modules) == 12 * 2 + 5 * 2  # en: 12 projections a double block, 5 a single block, 2 of each
    for module in modules:
        a, b = adapters[f"{module}.lora_A.weight"], adapters[f"{module}.lora_B.weight"]  # [4, in], [out, 4]
        expected = original[f"{module}.weight"] + (ALPHA / R) * b @ a  # [out, in]
        # fp32 rounding of W + delta and of the 4 products of B A, as in the GLM-Image test above
        bound = 2**-24 * (expected.abs() + 4 * (ALPHA / R) * b.abs() @ a.abs())
        assert ((merged[f"{module}.weight"] - expected).abs() <= bound).all(), module
    for key, value in original.items():
        if key.removesuffix(".weight") not in modules:
            assert torch.equal(merged[key], value), key
    shutil.copy2(reference / "config.json", tmp_path / "out" / "config.json")  # carried as it is, beside the shards
    loaded = load_xomni_transformer(tmp_path / "out", "en", 64)  # refuses any missing or unexpected weight
    assert all(torch.equal(value, merged[key]) for key, value in loaded.state_dict().items())
