"""The memory plan against what the code allocates, and the plan in `grpo-image plan` and `grpo-image validate`.

Peak memory is measured on the CPU with torch's profiler (`profile_memory=True`): it records every allocation and
free of the tensor allocator with the running total of bytes held since profiling began, so the maximum of that
total over a call is the extra memory the call needed at its worst moment (what `torch.cuda.max_memory_allocated`
reports on a GPU), exact and repeatable. The plan's numbers for the same call must lie within 25% of it, for a
small fp32 Qwen2 policy, a 20x larger bf16 X-Omni policy and a bf16 GLM-Image policy of the same size (LoRA with
checkpointing, and full fine-tuning with fp32 masters under autocast): one sampler call, and one micro-batch's
forward and backward; and for one call of GLM-Image's decoder. The real recipes are planned from folders of config
files alone, as a user has them before downloading the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_image.app.cli import main
from grpo_image.base.config import instantiate, load_recipe
from grpo_image.training.data import load_prompts
from grpo_image.planning.decoder_sizes import decoder_shape
from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.core.loss import grpo_loss
from grpo_image.planning.memory_plan import decode_bytes, kv_bytes_per_token, plan_recipe, rollout_bytes, update_bytes
from grpo_image.training.weights import make_weights
from grpo_image.core.sampling import SamplingSettings, sample_codes

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny_cpu.yaml")
GLM_LORA = str(REPO / "recipes" / "glm_image_lora.yaml")
ROWS = 4
# X-Omni-En: Qwen2.5-7B's published config.json (hidden 3584, MLP 18944, 28 heads, 4 KV heads, vocab 152,064, untied
# heads) with X-Omni's own configuration_xomni.py values (28 + 4 + 4 layers, 16,448 multimodal ids, 16,384 codes)
XOMNI_EN = {"model_type": "x-omni", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 36,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "mm_vocab_size": 16448,
            "image_vocab_size": 16384, "num_mm_adap_layers": 4, "num_mm_head_layers": 4,
            "max_position_embeddings": 131072, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
# Janus-Pro-7B: DeepSeek-LLM-7B's language model (30 layers, hidden 4096, 32 heads, MLP 11008, vocab 102,400) and
# the generation path at its width (aligner and head of 4096), SigLIP-L/16 at 384 px, the 16,384-code VQ
JANUS_PRO_7B = {"text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                "num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32,
                                "vocab_size": 102400, "max_position_embeddings": 16384},
                "vision_config": {"projection_dim": 4096},
                "vq_config": {"projection_dim": 4096, "image_token_embed_dim": 4096}, "tie_word_embeddings": False}
# zai-org/GLM-Image: vision_language_encoder/config.json is transformers' GlmImageConfig defaults (40 GLM-4 layers of
# 4096, 168,064 + 16,512-row embedding and head; the rotary settings, which change no size, aside), and
# transformer/config.json and text_encoder/config.json (a T5 encoder of google/byt5-small's shape) as published
GLM_IMAGE_DIT = {"_class_name": "GlmImageTransformer2DModel", "attention_head_dim": 128, "condition_dim": 256,
                 "in_channels": 16, "num_attention_heads": 32, "num_layers": 30, "out_channels": 16, "patch_size": 2,
                 "prior_vq_quantizer_codebook_size": 16384, "text_embed_dim": 1472, "time_embed_dim": 512}
BYT5_SMALL_ENCODER = {"d_model": 1472, "d_ff": 3584, "d_kv": 64, "num_layers": 12, "num_heads": 6, "vocab_size": 384,
                      "feed_forward_proj": "gated-gelu"}


def peak_bytes(fn) -> int:
    """The most bytes held by tensors allocated during fn, beyond what was held before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"memory_trace_{os.getpid()}.json"
    prof.export_chrome_trace(str(path))
    try:
        events = [e["args"] for e in json.loads(path.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    finally:
        path.unlink()
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


@pytest.fixture(scope="module")
def xomni_folder(tmp_path_factory):
    """A saved X-Omni of 4 layers of hidden 512 (10 M parameters, 20x the small Qwen2) in bf16: a real checkpoint."""
    from grpo_image.policies.xomni import tiny_xomni_policy

    folder = tmp_path_factory.mktemp("xomni") / "model"
    policy = tiny_xomni_policy(grid=(8, 8), image_vocab_size=256, hidden_size=512, num_layers=4)
    policy.model.to(torch.bfloat16)
    policy.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def glm_folder(tmp_path_factory):
    """A tiny GLM-Image folder in the repository's layout, saved by GlmImagePipeline itself: the tiny policy's
    processor and configuration widened to 4 GLM-4 layers of hidden 512 (8 heads and 2 KV heads of 64, half of each
    rotary, mrope sections 8 + 4 + 4: GLM-Image's layout in miniature; 10 M parameters, X-Omni's size above) in bf16,
    and the toy DiT, VAE and ByT5 glyph encoder of tests/test_glm_image.py."""
    from diffusers import GlmImagePipeline
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    from grpo_image.policies.glm_image import tiny_glm_image_policy
    from tests.test_glm_image import tiny_dit_parts

    tiny = tiny_glm_image_policy(64, 64, num_codes=256)
    config = tiny.model.config.to_dict()
    config["text_config"].update(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                                 num_key_value_heads=2)  # fmt: skip
    config["text_config"]["rope_parameters"]["mrope_section"] = [8, 4, 4]
    torch.manual_seed(0)
    model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(config)).to(torch.bfloat16)
    root = tmp_path_factory.mktemp("glm") / "GLM-Image"
    parts = tiny_dit_parts(tiny.num_codes)
    GlmImagePipeline(processor=tiny.processor, vision_language_encoder=model, **parts).save_pretrained(root)
    return root


@pytest.fixture
def one_thread():
    """One thread: the measured calls are small, and a loaded machine makes extra threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = {
    "qwen2 fp32, full": ["policy.hidden_size=128", "policy.grid=[16,16]", "policy.num_codes=256", "train.mode=full"],
    "x-omni bf16, LoRA, checkpointing": ["train.mode=lora", "train.gradient_checkpointing=true"],
    "x-omni bf16, full (fp32 masters)": ["train.mode=full"],
    "glm-image bf16, LoRA, checkpointing": ["train.mode=lora", "train.gradient_checkpointing=true"],
    "glm-image bf16, full (fp32 masters)": ["train.mode=full"],
}
# 128 px: 8 x 8 codes of 16 px; 64 px: a 2 x 2 large grid of 32 px and a 16 x 16 preview, L = 260
POLICIES = {
    "x-omni": ("xomni_folder", "{{_component_: grpo_image.policies.xomni.xomni_policy, path: '{}', height: 128, "
                               "width: 128, dtype: bfloat16}}"),
    "glm-image": ("glm_folder", "{{_component_: grpo_image.policies.glm_image.glm_image_policy, path: '{}', "
                                "height: 64, width: 64, dtype: bfloat16}}"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_plan_is_within_25_percent_of_the_measured_peaks(case, request, one_thread):
    overrides = [*CASES[case], f"data.batch_size={ROWS}", "data.group_size=2", "train.minibatches=2",
                 f"sampling.batch_size={ROWS}", "train.logprob_chunk=32"]  # fmt: skip
    family = case.split(" ")[0]
    if family in POLICIES:
        fixture, node = POLICIES[family]
        overrides.append("policy=" + node.format(request.getfixturevalue(fixture)))
    cfg = load_recipe(TINY, overrides)
    if family == "glm-image":  # the recipe's adapters: the language model's q, k, v, o, gate_up and down
        cfg.train.lora.target_regex = load_recipe(GLM_LORA).train.lora.target_regex
    plan = plan_recipe(cfg, TINY)
    p, s = plan.policy, plan.setup
    torch.manual_seed(0)
    policy = instantiate(cfg.policy)
    # Start-up: what building the weights allocates, the model as loaded held aside (the host's copy), plus what
    # stays where the loader put it (moved to a GPU from the host; free on the CPU): the planned start-up, within
    # 0.5% for the buffers the plan leaves out (rotary frequencies, a few KiB: 0.08% of the LoRA cases' 21 MiB)
    loaded = [t.detach() for t in [*policy.model.parameters(), *policy.model.buffers()]]
    built = {}
    measured_startup = peak_bytes(lambda: built.setdefault("weights", make_weights(policy, cfg.train)))
    storages = {t.untyped_storage().data_ptr() for t in loaded}
    held = {id(t): t for t in [*policy.model.parameters(), *policy.model.buffers()]}.values()
    measured_startup += sum(t.numel() * t.element_size() for t in held if t.untyped_storage().data_ptr() in storages)
    assert plan.phases["start-up"] == pytest.approx(measured_startup, rel=0.005), (case, measured_startup)
    weights = built["weights"]
    del loaded
    if cfg.train.gradient_checkpointing:
        policy.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    texts = sorted((r.prompt for r in load_prompts(cfg.data.prompts)), key=len)
    prompts = texts[-1:] + texts[: ROWS - 1]  # the longest (the plan's P) and shorter ones: left-padded rows
    settings = SamplingSettings.from_config(cfg.sampling)
    codes = torch.randint(0, p.codes, (ROWS, p.positions), generator=torch.Generator().manual_seed(0))  # [N, L]

    def rollout():
        policy.model.eval()
        with weights.rollout_weights():
            sample_codes(policy, prompts, torch.arange(ROWS), settings)

    def micro_batch():
        policy.model.train()
        with weights.compute():
            logprobs = teacher_forced_logprobs(policy, prompts, codes, settings, cfg.train.logprob_chunk)  # [N, L]
        loss, _ = grpo_loss(logprobs, logprobs.detach(), None, torch.ones(ROWS), clip_eps_low=0.2, clip_eps_high=0.2,
                             beta=0.0)
        loss.backward()

    measured_rollout = peak_bytes(rollout)
    micro_batch()  # the first micro-batch of a step allocates the gradients; the next ones add into them
    measured_update = peak_bytes(micro_batch)
    planned_rollout, planned_update = rollout_bytes(p, s, ROWS), update_bytes(p, s, ROWS, s.checkpointing)
    assert measured_rollout > 2**20 and measured_update > 8 * 2**20  # large enough that allocator noise is small
    assert planned_rollout == pytest.approx(measured_rollout, rel=0.25), (case, planned_rollout, measured_rollout)
    assert planned_update == pytest.approx(measured_update, rel=0.25), (case, planned_update, measured_update)


def test_validate_warns_when_the_recipe_does_not_fit_its_hardware(capsys):
    assert main(["validate", TINY, "hardware.gpus=1", "hardware.gpu_memory_gb=0.005"]) == 0  # 5 MB: cannot fit
    err = capsys.readouterr().err
    assert err.startswith("grpo-image: warning:") and "does not fit the 1 x 0.005 GB GPUs" in err
    assert "train.micro_batch_size <=" in err and err.count("\n") == 1  # the keys to change, on one line
    for fits in (["hardware.gpus=1", "hardware.gpu_memory_gb=80"], ["hardware.gpus=0", "hardware.gpu_memory_gb=0.005"]):
        assert main(["validate", TINY, *fits]) == 0
        assert capsys.readouterr().err == ""  # fits, or no hardware named: nothing to say


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Folders holding only the config files of X-Omni-En, Janus-Pro-7B and GLM-Image, as the user has before
    downloading (GLM-Image's: no tokenizer, no VAE config)."""
    from transformers import GlmImageConfig, JanusConfig, T5Config

    root = tmp_path_factory.mktemp("published")
    (root / "X-Omni-En").mkdir()
    (root / "X-Omni-En" / "config.json").write_text(json.dumps(XOMNI_EN))
    JanusConfig(**JANUS_PRO_7B).save_pretrained(root / "Janus-Pro-7B")
    glm = root / "GLM-Image"
    GlmImageConfig().save_pretrained(glm / "vision_language_encoder")
    (glm / "transformer").mkdir()
    (glm / "transformer" / "config.json").write_text(json.dumps(GLM_IMAGE_DIT))
    T5Config(**BYT5_SMALL_ENCODER).save_pretrained(glm / "text_encoder")
    return root


def real_recipe(name: str, root: Path) -> list[str]:
    if name == "janus_pro_7b":
        return [f"policy.path={root / 'Janus-Pro-7B'}", f"decoder.path_or_model={root / 'Janus-Pro-7B'}"]
    if name.startswith("glm_image"):
        return [f"policy.path={root / 'GLM-Image'}", f"decoder.path={root / 'GLM-Image'}"]
    return [f"policy.path={root / 'X-Omni-En'}", f"decoder.xomni_path={root / 'X-Omni-En'}",
            f"decoder.flux_path={root / 'FLUX.1-dev'}"]  # fmt: skip


@pytest.mark.parametrize("name", ["xomni_en_lora", "xomni_en_full", "xomni_zh_stage", "xomni_en_decoder",
                                  "janus_pro_7b", "glm_image_lora", "glm_image_full", "glm_image_decoupled"])  # fmt: skip
def test_each_real_recipe_fits_the_gpus_it_names(name, published, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their prompt sets relative to the repository
    plan = plan_recipe(load_recipe(f"recipes/{name}.yaml", real_recipe(name, published)), name)
    assert plan.setup.stated and plan.fits, (name, plan.phases, plan.worker_peak)
    p = plan.policy
    if name.startswith("xomni"):
        # embeddings and heads (152,064 + 16,448) x 3584 x 2, 36 layers of 233,057,792, two final norms of 3584
        assert p.params == 1_207_894_016 + 36 * 233_057_792 + 2 * 3584
        # 36 layers x (K, V) x 4 KV heads x 128: bf16 under LoRA; fp32 keys (RoPE's output) under autocast
        assert kv_bytes_per_token(p, plan.setup.mode) == 36 * 4 * 128 * (2 + (4 if plan.setup.mode == "full" else 2))
        if name == "xomni_zh_stage":  # the English stage's adapter, not written yet: assumed of this recipe's shape
            assert plan.held["weights"] == 2 * p.params + 4 * 2 * p.lora_params
        if name == "xomni_en_decoder":  # FLUX.1-dev's transformer trains on the one training process
            d = plan.decoder
            # r 64 (in + out) on 19 double blocks (both streams' q, k, v, out: 3072 -> 3072; their MLPs: 3072 ->
            # 12288 -> 3072) and 38 single blocks (q, k, v; proj_mlp 3072 -> 12288; proj_out 15360 -> 3072)
            double, single = 8 * 6144 + 4 * 15360, 3 * 6144 + 15360 + 18432
            assert plan.decoder_train.adapters == 64 * (19 * double + 38 * single) == 261_488_640
            assert plan.decoder_train.resident - sum(part.bytes for part in d.parts) == 16 * 261_488_640
            assert d.tokens == 4096 + 512 and plan.decoder_train.guided  # X-Omni-En's true CFG: counted
            assert plan.decoder_train.checkpointing and not any("transformer" in row[0] for row in plan.worker_rows)
    elif name.startswith("glm_image"):
        # 40 GLM-4 layers of 203,969,024 (q and k, v with biases, o, gate_up of 2 x 13,696, down, 4 norms), the
        # 168,064-row embedding and the final norm; the 16,512-row head; the vision encoder and the VQ tokenizer
        layer = (4096 + 1) * (4096 + 2 * 256) + 4096 * 4096 + 4096 * 2 * 13696 + 13696 * 4096 + 4 * 4096
        assert layer == 203_969_024
        lm = 40 * layer + 168_064 * 4096 + 4096 + 16_512 * 4096
        assert p.trainable_params == lm == 8_914_788_352
        assert p.params == lm + 1_159_607_808 + 39_849_472
        # 40 layers x (K, V) x 2 KV heads x 128: 40 KiB in bf16, 60 KiB with fp32 keys under autocast
        assert kv_bytes_per_token(p, plan.setup.mode) == 40 * 2 * 128 * (2 + (4 if plan.setup.mode == "full" else 2))
        # 1024 px: a 16 x 16 preview, then the 32 x 32 large grid; rows 0..16,383 of the head
        assert (p.positions, p.grid, p.codes) == (256 + 1024, (32, 32), 16384)
        assert (p.norm_readers, p.mlp_up_width, p.post_norms) == (4, 2 * 13696, 2)  # q, k, v, gate_up; 2 post-norms
        d = plan.decoder
        # 30 DiT blocks of 226,578,432 (AdaLN 512 -> 12 x 4096, q/k/v/o, a 4x GELU MLP, biases) and its embedders
        block = 513 * 12 * 4096 + 4 * 4097 * 4096 + 4097 * 16384 + 16385 * 4096
        assert block == 226_578_432 and d.parts[0].params == 30 * block + 129_529_920
        assert d.parts[2].params == 217_657_472  # ByT5-small's encoder
        assert d.note == "VAE: FLUX.1-dev's configuration (16 latent channels, 8 px per latent, as GLM-Image's)"
        # one 1024 px image: 64 x 64 DiT tokens (the 32 x 32 codes, 2 x 2 each) and the glyph tokens of the prompt set's
        # most quoted text: "Explore the Northern Lights", "Guided tours from October to March", "Book Your Trip",
        # a ByT5 id per byte and an end id each
        assert d.tokens == 64 * 64 + (27 + 34 + 14) + 3 and d.inner == 4096
        assert (d.rows_per_image, d.vae_batched) == (1, True)
        if name == "glm_image_decoupled":  # the DiT trains on the one training process, the actors only score
            # q, k, v, out (4096 -> 4096) and the MLP (4096 -> 16384 -> 4096) of 30 blocks, r 64 (in + out) each
            assert plan.decoder_train.resident - sum(part.bytes for part in d.parts) == 16 * 30 * 64 * (
                4 * 8192 + 2 * 20480)
            assert not any("DiT" in label for label, _, _ in plan.worker_rows)
    else:
        assert kv_bytes_per_token(p, "lora") == 30 * 32 * 128 * 4  # 480 KiB: every head has its own K and V
        assert (p.positions, p.codes) == (576, 16384)


def test_plan_command_prints_the_table_and_what_to_change(published, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    recipe = "recipes/xomni_en_lora.yaml"
    assert main(["plan", recipe, *real_recipe("xomni_en_lora", published), "sampling.batch_size=0",
                 "--gpus", "2", "--gpu-memory", "80"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "2 training processes, 80 GB per GPU" in out
    # 256 rollouts per process at once: 256 rows x (P + 4,095) tokens x 72 KiB, more than an 80 GB GPU
    assert "KV cache per sampler call (256 rows" in out and "72.0 KiB per token" in out
    assert "DOES NOT FIT" in out and "set sampling.batch_size <=" in out
    assert main(["plan", recipe, "--gpus", "0"]) == 2  # a usage error, like every other command's


def tiny_glm(folder: Path) -> list[str]:
    return [f"policy.path={folder}", "policy.height=64", "policy.width=64", f"decoder.path={folder}"]


@pytest.mark.parametrize("recipe", ["glm_image_lora", "glm_image_full"])
def test_plan_reads_a_glm_image_folder(recipe, glm_folder, monkeypatch, capsys):
    """Both GLM-Image recipes planned from a real (tiny) GLM-Image folder: its configs, its processor, its DiT parts."""
    from diffusers import AutoencoderKL, GlmImageTransformer2DModel
    from transformers import T5EncoderModel

    monkeypatch.chdir(REPO)
    path = f"recipes/{recipe}.yaml"
    plan = plan_recipe(load_recipe(path, tiny_glm(glm_folder)), recipe)
    p, d = plan.policy, plan.decoder
    # 64 px: a 2 x 2 large grid after a 16 x 16 preview; the prompt rows as the checkpoint's processor makes them
    assert (p.positions, p.grid, p.codes) == (260, (2, 2), 256) and "processor" in p.prompt_note
    saved = [GlmImageTransformer2DModel.from_pretrained(glm_folder / "transformer"),
             AutoencoderKL.from_pretrained(glm_folder / "vae"),
             T5EncoderModel.from_pretrained(glm_folder / "text_encoder")]  # fmt: skip
    assert [part.params for part in d.parts] == [sum(t.numel() for t in m.parameters()) for m in saved]
    assert d.note == "" and d.inner == 16  # read from the folder: 2 heads of 8
    assert main(["plan", path, *tiny_glm(glm_folder)]) == 0
    out = capsys.readouterr().out
    assert "L = 260 codes of 256" in out and "GLM-Image DiT decoder: one call of 4 images" in out
    assert "peak by phase" in out and "-> fits" in out
    assert main(["plan", path, *tiny_glm(glm_folder), "policy.height=1000"]) == 2
    assert "policy.height, policy.width: GLM-Image image size 1000x64" in capsys.readouterr().err


def test_glm_image_decoder_call_is_within_25_percent_of_the_measured_peak(glm_folder, one_thread):
    """The DiT's two passes one after the other, then the VAE on the whole call: 3 images of 256 px at once."""
    from grpo_image.decoders.glm_image import GlmImageDecoder

    prompts, grid = ['a sign that says "OPEN"'] * 3, (8, 8)
    node = {"_component_": "grpo_image.decoders.glm_image.GlmImageDecoder", "path": str(glm_folder), "dtype": "float32"}
    shape = decoder_shape(node, grid, prompts)
    decoder = GlmImageDecoder(str(glm_folder), num_inference_steps=2, dtype="float32", device="cpu")
    codes = np.random.default_rng(0).integers(0, 256, (3, 256 + 64))  # [n, L]: preview, then the 8 x 8 large grid
    decoder(codes, grid, np.arange(3), prompts=prompts)  # the first call builds what later calls reuse
    measured = peak_bytes(lambda: decoder(codes, grid, np.arange(3), prompts=prompts))
    # the VAE's last block, about 3 x (8 + 8) channels of 256 x 256 px in fp32 (12 MiB) an image, outweighs the toy
    # DiT: one image at a time (a sliced VAE) would be a third of the measured peak
    assert measured > 16 * 2**20
    assert decode_bytes(shape, 3) == pytest.approx(measured, rel=0.25)
