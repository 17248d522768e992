"""X-Omni's FLUX decoder on current diffusers against tensors computed by X-Omni's own code (diffusers 0.34).

The reference folder (`shared/data/xomni_tiny_decoder_reference/`, see its README) holds tiny random parts and
every intermediate tensor of the code -> feature path, of one transformer forward per variant and of a 2-step
sampling run. Tolerances are the manifest's: max |diff| <= 1e-5 in fp32, 1e-4 for `pipe.vae_input` and
`pipe.image`, 1 for `image_uint8`. The smallest bug the manifest measures (en: features injected before the
double blocks) moves the output by 0.94, so every bound below is far from any real mistake.

One platform note, measured here: the reference's fp32 time embedding `temb` is 4.9e-6 away from its float64
value while ours is 2.7e-7 away (the sinusoid of t*1000 and g*1000, arguments up to 1000 rad, differs in the
last bits between CPUs). Fed the reference's `temb`, every block output below agrees to <= 1.5e-6, so the blocks
are checked that way at 1e-5; tensors that carry our own `temb` through the blocks (the forward's `sample`,
the sampling run's per-step tensors) drift to 1.3e-5 .. 3e-5 and are checked at TOL_TEMB = 5e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

from tests.data import DATA

REF = DATA / "xomni_tiny_decoder_reference"

from grpo_image.decoders.xomni_flux import (  # noqa: E402
    PrecomputedPromptEmbeds,
    XOmniFluxDecoder,
    save_prompt_embeds,
    to_uint8,
)
from grpo_image.decoders.xomni_projector import XOmniProjector  # noqa: E402
from grpo_image.decoders.xomni_transformer import load_xomni_transformer  # noqa: E402

TOL = 1e-5  # manifest: fp32_max_abs_diff
TOL_VAE = 1e-4  # manifest: pipe.vae_input (|max| ~20 after /0.3611) and pipe.image
TOL_TEMB = 5e-5  # tensors downstream of our own temb (module docstring); observed max 3.0e-5
GRID = (3, 5)  # the reference's code grid: 48 x 80 px
PROMPT = "a tiny test prompt"  # the reference run's prompt (zh: sets the batch size only)


def maxdiff(a, b) -> float:
    return (torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max().item()


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(REF / "reference.safetensors")


def en_pipe_text() -> tuple[torch.Tensor, torch.Tensor]:
    """The en pipeline's stand-in CLIP/T5 outputs: [T5(PROMPT); T5('')] [2, 7, 32] and pooled [2, 32].

    reference.safetensors does not store them (only the forward's, which differ). The README says "seeded
    randn, length 7"; drawing T5(prompt), CLIP(prompt), T5(''), CLIP('') in that order from
    Generator().manual_seed(1274) reproduces `en.pipe.tf_out` at step 0 to 8e-6 (cond) and 1.2e-5 (uncond),
    where every other seed tried (0..2000) is >= 0.9 off: found by that search, then checked end to end below.
    """
    g = torch.Generator().manual_seed(1274)
    e_pos, p_pos = torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g)
    e_neg, p_neg = torch.randn(1, 7, 32, generator=g), torch.randn(1, 32, generator=g)
    return torch.cat([e_pos, e_neg]), torch.cat([p_pos, p_neg])


@pytest.fixture(scope="module")
def embeds_file(tmp_path_factory) -> Path:
    """The en text conditioning as a precomputed-embeddings file, plus two more prompts for batching tests."""
    embeds, pooled = en_pipe_text()  # [2, 7, 32], [2, 32]
    g = torch.Generator().manual_seed(5)
    extra_e, extra_p = torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    table = PrecomputedPromptEmbeds(
        [PROMPT, "", "a red cube", "a blue ball"], torch.cat([embeds, extra_e]), torch.cat([pooled, extra_p])
    )
    path = tmp_path_factory.mktemp("embeds") / "prompt_embeds.safetensors"
    save_prompt_embeds(path, [PROMPT, "a red cube", "a blue ball"], table, batch_size=2)
    return path


def make_decoder(variant: str, **kwargs) -> XOmniFluxDecoder:
    args = dict(
        projector=str(REF / "projector.safetensors"),
        transformer=str(REF / f"transformer_{variant}"),
        vae=str(REF / "vae"),
        scheduler=str(REF / "scheduler"),
        num_inference_steps=2,
        cfg_scale=3.0,  # the reference's (cfg_scale, cfg_scale_2) are (3.0, 1.5) for zh, (3.0, 3.0) for en
        dtype="float32",
        device="cpu",
    )
    return XOmniFluxDecoder(**{**args, **kwargs})


@pytest.fixture(scope="module")
def decoders(embeds_file) -> dict[str, XOmniFluxDecoder]:
    return {"zh": make_decoder("zh"), "en": make_decoder("en", text_encoder=str(embeds_file))}


def test_projector_reproduces_code_to_feature_path(ref):
    projector = XOmniProjector.from_file(REF / "projector.safetensors", REF / "projector_config.json")
    seen = {}
    projector.post_quant_conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("codebook_lookup", a[0]))
    projector.post_quant_conv.register_forward_hook(lambda m, a, o: seen.__setitem__("post_quant_conv", o))
    projector.post_conv[0].register_forward_hook(lambda m, a, o: seen.__setitem__("resblock0", o))
    projector.post_conv[1].register_forward_hook(lambda m, a, o: seen.__setitem__("features", o))
    with torch.no_grad():
        seen["siglip_tensor"] = projector(ref["vq.codes"][None], GRID)  # [1, 15, 64]
    for key in ("codebook_lookup", "post_quant_conv", "resblock0", "features", "siglip_tensor"):
        assert maxdiff(seen[key], ref[f"vq.{key}"]) <= TOL, key  # observed <= 1.9e-6
    # raw rows: the codebook's norms are U(0.5, 2), so a normalising lookup would be off by O(1)
    assert maxdiff(seen["codebook_lookup"][0, :, 0, 0], projector.quantize["embedding"].weight[5]) == 0.0


@pytest.mark.parametrize("variant", ["zh", "en"])
def test_transformer_forward_matches_reference(ref, variant):
    model = load_xomni_transformer(REF / f"transformer_{variant}")
    assert type(model).__name__.endswith("Zh") == (variant == "zh")  # "auto" told the variants apart
    inputs = {k.split(".fwd.in.")[1]: t for k, t in ref.items() if k.startswith(f"{variant}.fwd.in.")}
    seen, use_ref_temb = {}, [False]

    def keep(name):
        return lambda m, a, o: seen.__setitem__(name, o)

    def keep_block(i, kind):  # a block returns (txt, img); the reference keeps the names below
        def hook(m, a, o):
            if kind == "single":  # cat([txt, img]) as the reference (zh: txt is empty)
                seen[f"single_block.{i}"] = torch.cat(o, dim=1)
            elif variant == "en":
                seen[f"double_block.{i}.txt"], seen[f"double_block.{i}.img"] = o
            else:
                seen[f"double_block.{i}"] = o[1]

        return hook

    model.x_embedder.register_forward_hook(keep("x_embedder"))
    model.context_embedder.register_forward_hook(keep("context_embedder"))
    model.siglip_embed.register_forward_hook(keep("siglip_embed"))
    model.norm_out.register_forward_hook(keep("norm_out"))
    model.time_text_embed.register_forward_hook(
        lambda m, a, o: ref[f"{variant}.fwd.temb"] if use_ref_temb[0] else seen.__setitem__("temb", o)
    )
    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_hook(keep_block(i, "double"))
    for i, block in enumerate(model.single_transformer_blocks):
        block.register_forward_hook(keep_block(i, "single"))

    with torch.no_grad():
        sample = model(**inputs).sample  # [2, 15, 16]: rows cond, uncond
    for key in ["temb", "x_embedder", "siglip_embed"] + (["context_embedder"] if variant == "en" else []):
        assert maxdiff(seen[key], ref[f"{variant}.fwd.{key}"]) <= TOL, key  # temb 4.8e-6, others 0.0
    assert maxdiff(sample, ref[f"{variant}.fwd.sample"]) <= TOL_TEMB  # observed zh 1.3e-5, en 7.9e-6

    use_ref_temb[0] = True  # every stage on the reference's temb: <= 1.5e-6 observed
    with torch.no_grad():
        seen["sample"] = model(**inputs).sample
    stages = [k for k in ref if k.startswith(f"{variant}.fwd.") and ".fwd.in." not in k and not k.endswith("temb")]
    assert len(stages) == (11 if variant == "en" else 8)  # every per-stage tensor the reference has
    for key in stages:
        assert maxdiff(seen[key.split(".fwd.")[1]], ref[key]) <= TOL, key

    # zero features add exactly nothing (siglip_embed has no bias): the uncond row equals "no features"
    use_ref_temb[0] = False
    no_feats = {**inputs, "siglip_tensor": None}
    with torch.no_grad():
        assert torch.equal(model(**no_feats).sample[1], model(**inputs).sample[1])


@pytest.mark.parametrize("variant", ["zh", "en"])
def test_two_step_sampling_matches_reference(ref, decoders, variant):
    decoder = decoders[variant]
    steps, vae_in = {}, {}
    hook = decoder.vae.decoder.register_forward_pre_hook(lambda m, a: vae_in.__setitem__("x", a[0]))
    try:
        latents = decoder.denoise(
            ref[f"{variant}.pipe.initial_latents"], ref["vq.siglip_tensor"], GRID, [PROMPT],
            on_step=lambda i, t: steps.__setitem__(i, t),
        )  # fmt: skip
        image = decoder.latents_to_images(latents, GRID)  # [1, 3, 48, 80]
    finally:
        hook.remove()
    assert maxdiff(decoder.scheduler.sigmas, ref[f"{variant}.pipe.sigmas"]) <= TOL  # [1, 0.6128, 0]
    # [1000, 612.83]: sigma * 1000 in float32, whose ULP at 1000 is 6e-5; the shift's exp differs by a few ULPs
    assert maxdiff(decoder.scheduler.timesteps, ref[f"{variant}.pipe.timesteps"]) <= 1e-3
    for i in range(2):
        assert maxdiff(steps[i]["model_output"], ref[f"{variant}.pipe.tf_out"][i]) <= TOL_TEMB, i
        assert maxdiff(steps[i]["noise_pred"], ref[f"{variant}.pipe.noise_pred_cfg"][i]) <= TOL_TEMB, i
        assert maxdiff(steps[i]["latents"], ref[f"{variant}.pipe.latents_after_step"][i]) <= TOL_TEMB, i
    assert maxdiff(vae_in["x"], ref[f"{variant}.pipe.vae_input"]) <= TOL_VAE  # observed zh 3.6e-5, en 6.3e-5
    assert maxdiff(image, ref[f"{variant}.pipe.image"]) <= TOL_VAE  # observed 2.7e-6
    assert maxdiff(to_uint8(image), ref[f"{variant}.pipe.image_uint8"]) <= 1  # TOL_VAE may cross one rounding edge


@pytest.mark.parametrize("variant", ["zh", "en"])
def test_decoder_call_reproduces_reference_image(ref, decoders, variant):
    decoder = decoders[variant]
    # seed 1234 on its own generator draws the reference's noise: the same uniforms, turned into normals by
    # Box-Muller, whose log, sqrt and cos run as SIMD (Sleef, <= 1 ULP each) or scalar (libm) code by CPU kernel
    # family. A few ULPs of float32 (1.2e-7 relative) at |x| <= 5: <= 4 * 1.2e-7 * 5 = 2.4e-6 (measured: 0 between
    # AVX2 and AVX-512, 1.0e-6 against the scalar kernels); a wrong seed or generator is off by about 1.
    noise = decoder.initial_latents([1234], GRID)
    assert noise.abs().max() <= 5 and maxdiff(noise, ref[f"{variant}.pipe.initial_latents"]) <= 2.4e-6
    image = decoder(ref["vq.codes"][None].numpy(), GRID, np.array([1234]), prompts=[PROMPT])
    assert image.dtype == np.uint8 and image.shape == (1, 48, 80, 3)
    assert maxdiff(image, ref[f"{variant}.pipe.image_uint8"]) <= 1  # as above: one grey level at a rounding edge


def test_decoder_built_from_checkpoint_folders(ref, tmp_path):
    """What a user passes: an X-Omni folder (config.json vision_config + files) and a FLUX.1-dev folder."""
    xomni, flux = tmp_path / "X-Omni-Zh", tmp_path / "FLUX.1-dev"
    xomni.mkdir(), flux.mkdir()
    (xomni / "projector.safetensors").symlink_to(REF / "projector.safetensors")
    (xomni / "decoder").mkdir()  # upstream passes siglip_channels at load time, so its config may lack it
    (xomni / "decoder" / "diffusion_pytorch_model.safetensors").symlink_to(
        REF / "transformer_zh" / "diffusion_pytorch_model.safetensors"
    )
    config = json.loads((REF / "transformer_zh" / "config.json").read_text())
    (xomni / "decoder" / "config.json").write_text(json.dumps({**config, "siglip_channels": None}))
    (flux / "vae").symlink_to(REF / "vae")
    (flux / "scheduler").symlink_to(REF / "scheduler")
    vision = {
        "dtype": "float32",
        "encoder": {"projector_path": "projector.safetensors", "z_channels": 64},
        "decoder": {"model_path": "decoder", "upscale_factor": 16, "num_inference_steps": 2, "cfg_scale": 3.0},
    }
    (xomni / "config.json").write_text(json.dumps({"vision_config": vision}))
    decoder = XOmniFluxDecoder(str(xomni), str(flux), device="cpu")
    assert (decoder.variant, decoder.num_inference_steps, decoder.cfg_scale) == ("zh", 2, 3.0)
    assert decoder.dtype == torch.float32 and not decoder.needs_prompts
    assert decoder.transformer.config.siglip_channels == 64  # from the projector's feature width
    image = decoder(ref["vq.codes"][None].numpy(), GRID, np.array([1234]))  # the protocol's 3-argument call
    assert maxdiff(image, ref["zh.pipe.image_uint8"]) <= 1  # as above: one grey level at a rounding edge
    # an explicit argument overrides vision_config: 1 step gives another image
    one_step = XOmniFluxDecoder(str(xomni), str(flux), device="cpu", num_inference_steps=1)
    assert maxdiff(one_step(ref["vq.codes"][None].numpy(), GRID, np.array([1234])), image) > 10


def test_output_is_uint8_with_16_pixels_per_code(decoders):
    codes = np.random.default_rng(0).integers(0, 64, size=(2, 6))  # int64 [2, 2*3]
    images = decoders["zh"](codes, (2, 3), np.array([0, 1]))
    assert images.dtype == np.uint8 and images.shape == (2, 32, 48, 3)  # H = 16*2, W = 16*3


def test_same_seed_same_image_and_seed_matters(decoders):
    codes = np.random.default_rng(1).integers(0, 64, size=(1, 15))
    first = decoders["en"](codes, GRID, np.array([7]), prompts=["a red cube"])
    again = decoders["en"](codes, GRID, np.array([7]), prompts=["a red cube"])
    other = decoders["en"](codes, GRID, np.array([8]), prompts=["a red cube"])
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).max() > 10


@pytest.mark.parametrize("max_batch_size", [None, 2])
def test_batch_equals_rollouts_one_by_one(embeds_file, max_batch_size):
    decoder = make_decoder("en", text_encoder=str(embeds_file), max_batch_size=max_batch_size)
    codes = np.random.default_rng(2).integers(0, 64, size=(3, 15))  # int64 [3, 15]
    seeds = np.array([11, 12, 11])  # rows 0 and 2: same seed, other codes and prompt
    prompts = ["a red cube", PROMPT, "a blue ball"]
    batch = decoder(codes, GRID, seeds, prompts=prompts)  # uint8 [3, 48, 80, 3]
    single = np.concatenate(
        [decoder(codes[i : i + 1], GRID, seeds[i : i + 1], prompts=prompts[i : i + 1]) for i in range(3)]
    )  # uint8 [3, 48, 80, 3]
    # the noise is bit-identical; batched matmuls may round differently, so allow one grey level
    assert torch.equal(decoder.initial_latents(seeds, GRID)[1], decoder.initial_latents([12], GRID)[0])
    assert np.abs(batch.astype(int) - single.astype(int)).max() <= 1


def test_en_needs_prompts_and_known_embeddings(decoders, embeds_file):
    codes, seeds = np.zeros((1, 15), dtype=np.int64), np.array([0])
    assert decoders["en"].needs_prompts
    with pytest.raises(ValueError, match="prompts="):
        decoders["en"](codes, GRID, seeds)
    with pytest.raises(KeyError, match="an unseen prompt"):
        decoders["en"](codes, GRID, seeds, prompts=["an unseen prompt"])
    table = PrecomputedPromptEmbeds.from_file(embeds_file)
    embeds, pooled = table([PROMPT, ""])
    assert maxdiff(embeds, en_pipe_text()[0]) == 0.0 and maxdiff(pooled, en_pipe_text()[1]) == 0.0


def test_bad_inputs_fail_loudly(decoders, tmp_path):
    with pytest.raises(ValueError, match="unexpected_keys"):
        load_xomni_transformer(REF / "transformer_zh", variant="en")
    with pytest.raises(ValueError, match="siglip_channels=64"):
        load_xomni_transformer(REF / "transformer_en", siglip_channels=32)
    with pytest.raises(ValueError, match="codebook_dim"):
        XOmniProjector.from_file(REF / "projector.safetensors", {"codebook_dim": 8})
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decoders["zh"](np.full((1, 15), 64), GRID, np.array([0]))
    with pytest.raises(ValueError, match="grid 3x5"):
        decoders["zh"](np.zeros((1, 14), dtype=np.int64), GRID, np.array([0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_decoder("zh", vae=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_decoder("zh", num_inference_steps=None)


def tiny_flux_text_folder(folder: Path) -> tuple[torch.nn.Module, torch.nn.Module, object, object]:
    """A FLUX.1-dev-shaped folder with tiny random CLIP/T5 text encoders (width 32 = the tiny joint/pooled dims)."""
    from diffusers import FluxPipeline, FlowMatchEulerDiscreteScheduler
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "<unk>", "</s>", "a", "red", "cube", "tiny", "test", "prompt"]

    def tokenizer(max_length: int) -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
            model_max_length=max_length,
        )  # fmt: skip

    torch.manual_seed(0)
    clip_cfg = CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=2, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    t5_cfg = T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    clip, t5 = CLIPTextModel(clip_cfg).eval(), T5EncoderModel(t5_cfg).eval()
    tok, tok_2 = tokenizer(8), tokenizer(512)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(REF / "scheduler")
    FluxPipeline(
        scheduler=scheduler, vae=None, text_encoder=clip, tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok_2,
        transformer=None,
    ).save_pretrained(folder)  # fmt: skip
    (folder / "vae").symlink_to(REF / "vae")
    return clip, t5, tok, tok_2


def test_flux_folder_text_encoder(ref, tmp_path):
    """en given a FLUX.1-dev folder: CLIP pooled + T5 sequence through diffusers' encode_prompt, as X-Omni-En."""
    from grpo_image.decoders.xomni_flux import FluxPromptEncoder

    clip, t5, tok, tok_2 = tiny_flux_text_folder(tmp_path / "FLUX.1-dev")
    encoder = FluxPromptEncoder(tmp_path / "FLUX.1-dev", max_sequence_length=6)
    embeds, pooled = encoder(["a red cube", ""])  # [2, 6, 32], [2, 32]
    with torch.no_grad():
        ids = tok_2(["a red cube", ""], padding="max_length", max_length=6, return_tensors="pt").input_ids
        clip_ids = tok(["a red cube", ""], padding="max_length", max_length=8, return_tensors="pt").input_ids
        assert maxdiff(embeds, t5(ids).last_hidden_state) == 0.0
        assert maxdiff(pooled, clip(clip_ids).pooler_output) == 0.0

    # the decoder takes the folder as flux_path (vae, scheduler, text encoders) ...
    codes, seeds = ref["vq.codes"][None].numpy(), np.array([3])
    live = make_decoder("en", vae=None, scheduler=None, flux_path=str(tmp_path / "FLUX.1-dev"))
    image = live(codes, GRID, seeds, prompts=["a red cube"])
    # ... and gives the same image as embeddings precomputed from that folder
    save_prompt_embeds(tmp_path / "embeds.safetensors", ["a red cube"], FluxPromptEncoder(tmp_path / "FLUX.1-dev"))
    stored = make_decoder("en", text_encoder=str(tmp_path / "embeds.safetensors"))
    assert np.array_equal(stored(codes, GRID, seeds, prompts=["a red cube"]), image)
