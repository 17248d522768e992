"""GLM-Image through transformers' and diffusers' own classes, at toy size: prompt rows, positions and log-probs
against the model's own forward and `generate`, the decoder against `GlmImagePipeline`, and both recipes through the
CLI on a saved tiny GLM-Image folder (the AR model, its processor, the DiT, the VAE, ByT5 and the scheduler).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo_image.app.cli import main
from grpo_image.decoders.glm_image import GlmImageDecoder, prompt_runs, upsample_codes
from grpo_image.base.logging import read_metrics
from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.policies.glm_image import glm_image_policy, tiny_glm_image_policy
from grpo_image.core.sampling import SamplingSettings, inverse_cdf_sample, left_pad, sample_codes, sample_uniforms
from grpo_image.training.saved_weights import load_stages
from grpo_image.decoders.tiny_glm_image import tiny_dit_parts
from tests.helpers_checkpoint import saved_weights
from tests.helpers_rewards import write_tiny_hps
from tests.helpers_sampling import logprob_tolerance, position_logits, roundings_to_a_logit
from tests.rewards_servers import ChatServer, Reply, completion

REPO = Path(__file__).resolve().parents[1]
HEIGHT, WIDTH = 64, 96  # -> a 2 x 3 large grid and a 13 x 19 preview (see test_prompt_rows_grids_and_positions)
PROMPTS = ["a red sign that says 'OPEN'", "x", 'a long menu board reading "Coffee 3 dollars" above a counter']
SETTINGS = SamplingSettings(temperature=0.9, top_k=20, top_p=0.75)


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py


@pytest.fixture(scope="module")
def policy():
    return tiny_glm_image_policy(HEIGHT, WIDTH, initializer_range=0.3, seed=1)


def processor_batch(policy, prompts: list[str]):
    """The pipeline's processor call (pipeline_glm_image.py l.359-376) on a left-padded batch, as tensors."""
    messages = [[{"role": "user", "content": [{"type": "text", "text": p}]}] for p in prompts]
    return policy.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"target_h": HEIGHT, "target_w": WIDTH, "padding": True},
    )  # fmt: skip


# 1. prompt rows, grids, positions -------------------------------------------------------------------------------


def test_prompt_rows_grids_and_positions(policy):
    # 64 x 96 px: large grid 2 x 3; h/w = 2/3, preview int(sqrt(2/3) * 16) x int(sqrt(3/2) * 16) = 13 x 19
    assert (policy.grid, policy.preview, policy.num_positions) == ((2, 3), (13, 19), 13 * 19 + 2 * 3)
    rows = policy.encode(PROMPTS)
    batch = processor_batch(policy, PROMPTS)
    ids, mask = left_pad(rows, policy.pad_token_id, policy.device)
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    assert policy.tokenizer.decode(rows[1]) == "[gMASK]<sop><|user|>\nx<sop>2 3<eop><sop>13 19<eop><|dit_token_64|>"
    (empty,) = policy.encode(["anything"], unconditional=True)
    assert policy.tokenizer.decode(empty) == "[gMASK]<sop><|user|>\n<sop>2 3<eop><sop>13 19<eop><|dit_token_64|>"
    # the model's own get_rope_index gives each real prefix token (p, p, p)
    rope, _ = policy.model.model.get_rope_index(
        batch["input_ids"], batch["image_grid_thw"], batch["images_per_sample"], batch["attention_mask"]
    )  # [3, R, P]
    ours = policy.prefix_positions(mask)  # [3, R, P]
    assert torch.equal(ours[:, mask.bool()], rope[:, mask.bool()])
    # codes: row 1 has P = 18 tokens; preview code t -> (18, 18 + t // 19, 18 + t % 19); large code u ->
    # (B, B + u // 3, B + u % 3) with B = 18 + max(13, 19) = 37
    codes = policy.code_positions(mask, 0, policy.num_positions)[:, 1]  # [3, L]
    assert len(rows[1]) == 18
    assert codes[:, 0].tolist() == [18, 18, 18] and codes[:, 20].tolist() == [18, 19, 19]
    assert codes[:, 246].tolist() == [18, 30, 36]  # the last preview code, t = 246 = 12 * 19 + 18
    assert codes[:, 247].tolist() == [37, 37, 37] and codes[:, 252].tolist() == [37, 38, 39]


def test_sizes_that_are_not_multiples_of_32_and_other_models_are_refused(policy, tmp_path):
    from grpo_image.policies.glm_image import glm_image_grids

    with pytest.raises(ValueError, match="multiples of 32"):
        glm_image_grids(policy.processor, 1000, 1024)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ValueError, match="model_type 'qwen2' is not 'glm_image'"):
        glm_image_policy(str(tmp_path))


def test_the_head_is_the_code_rows_and_codes_are_their_own_ids(policy):
    hidden = torch.randn(2, 5, 32)
    full = policy.model.lm_head(hidden)  # [2, 5, 72]: 64 codes, start, end, 6 more vision rows
    # the same 32-term products, in another shape: 8 * sqrt(32) * 2^-24 * |z| (`logprob_tolerance`, 32 roundings)
    tol = logprob_tolerance(policy.model.config.text_config.hidden_size, full.abs().max().item())
    assert torch.allclose(policy.image_logits(hidden), full[..., :64], atol=tol, rtol=0)
    assert policy.codes_to_ids(torch.tensor([0, 63])).tolist() == [0, 63]
    tokens = policy.tokenizer.convert_ids_to_tokens([0, 63, 64])
    assert tokens == ["<|dit_token_0|>", "<|dit_token_63|>", "<|dit_token_64|>"]  # code 0, code 63, image start


# 2. log-probs against the model's own forward and generate -------------------------------------------------------


@torch.no_grad()
def own_forward_logprobs(policy, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """The model's own path as `generate` runs it: the prefix with image_grid_thw (get_rope_index positions), then
    one code per step with its cache (the decode positions get_rope_index stored); tempered code log-probs [N, L]."""
    from transformers import DynamicCache

    model, batch = policy.model, processor_batch(policy, PROMPTS)
    grids = {"image_grid_thw": batch["image_grid_thw"], "images_per_sample": batch["images_per_sample"]}
    mask, cache = batch["attention_mask"], DynamicCache(config=model.config)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache, use_cache=True, **grids)
    logits = [out.logits[:, -1]]
    for t in range(codes.shape[1] - 1):
        mask = torch.cat([mask, mask.new_ones(len(PROMPTS), 1)], dim=1)
        out = model(input_ids=codes[:, t : t + 1], attention_mask=mask, cache=out.cache, use_cache=True, **grids)
        logits.append(out.logits[:, -1])
    steps = torch.stack(logits, dim=1)[..., : policy.num_codes].float() / temperature  # [N, L, V]
    return steps.log_softmax(-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def glm_logprob_tolerance(policy, codes: torch.Tensor) -> float:
    """How far the three fp32 computations below may differ (`logprob_tolerance`): they sum in other orders (one token
    against a cache, a whole sequence, the model's own forward), over 2 GLM-4 layers of hidden 32, MLP 64 and heads
    of 16 attending over at most P + L - 1 = 77 + 252 keys (1,202 roundings in sequence to a logit), on logits up to
    |z| = 7.5 tempered by 0.9: 1.4e-4. Measured: 1.2e-5 on an AVX-512 CPU, 1.0e-5 with ATEN_CPU_CAPABILITY=default
    and MKL_CBWR=COMPATIBLE (the AVX2 kernels); a fixed 1e-5 was one machine's observation."""
    config = policy.model.config.text_config
    ids, _ = left_pad(policy.encode(PROMPTS), policy.pad_token_id, policy.device)
    roundings = roundings_to_a_logit(
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        head_dim=config.hidden_size // config.num_attention_heads, tokens=ids.shape[1] + codes.shape[1] - 1,
    )
    max_logit = position_logits(policy, PROMPTS, codes, SamplingSettings()).abs().max().item()  # raw, unguided
    return logprob_tolerance(roundings, max_logit, temperature=SETTINGS.temperature)


def test_sampled_and_teacher_forced_logprobs_equal_the_models_own_forward(policy):
    codes, sampled = sample_codes(policy, PROMPTS, torch.tensor([4, 5, 6]), SETTINGS)  # KV cache, left padding
    with torch.no_grad():
        forced = teacher_forced_logprobs(policy, PROMPTS, codes, SETTINGS, chunk=100)  # one pass, 3 chunks
    own = own_forward_logprobs(policy, codes, SETTINGS.temperature)
    tol = glm_logprob_tolerance(policy, codes)
    assert 1e-4 < tol < 1e-3  # the figures of the docstring: looser than rounding, far tighter than a wrong position
    assert (sampled - own).abs().max() <= tol and (forced - own).abs().max() <= tol
    assert (forced - sampled).abs().max() <= tol
    # sensitivity: the same pass with 1-D positions (what a plain causal LM would use) is far off
    ids, mask = left_pad(policy.encode(PROMPTS), policy.pad_token_id, policy.device)
    full = torch.cat([mask, torch.ones_like(codes[:, :-1])], dim=1)
    with torch.no_grad():
        hidden, _ = policy.forward_hidden(torch.cat([ids, codes[:, :-1]], 1), full, (full.cumsum(-1) - 1).clamp(min=0))
    flat = (policy.image_logits(hidden[:, ids.shape[1] - 1 :]) / 0.9).log_softmax(-1).gather(-1, codes[..., None])
    assert (flat.squeeze(-1) - own).abs().max() > 10 * tol


def test_sampled_codes_are_what_generate_samples_held_to_the_code_rows(policy):
    """transformers' own generate, its own warpers, held to the code rows, and the sampler's seeded uniforms drawn
    by inverse CDF as the last processor (greedy then takes that code): the same codes, for every seed."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    seeds = torch.tensor([7, 8, 9])
    codes, _ = sample_codes(policy, PROMPTS, seeds, SETTINGS)
    v, length = policy.num_codes, policy.num_positions
    batch = processor_batch(policy, PROMPTS)
    prefix = batch["input_ids"].shape[1]

    class CodeRows(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores.masked_fill(torch.arange(scores.shape[-1]) >= v, float("-inf"))

    class SeededDraw(LogitsProcessor):
        uniforms = sample_uniforms(seeds, length)  # [N, L]

        def __call__(self, input_ids, scores):
            code = inverse_cdf_sample(scores[:, :v].log_softmax(-1), self.uniforms[:, input_ids.shape[1] - prefix])
            return torch.full_like(scores, float("-inf")).scatter(-1, code[:, None], 0.0)

    processors = LogitsProcessorList([CodeRows(), TemperatureLogitsWarper(0.9), TopKLogitsWarper(20),
                                      TopPLogitsWarper(0.75), SeededDraw()])  # fmt: skip
    config = GenerationConfig(do_sample=False, max_new_tokens=length, pad_token_id=policy.pad_token_id,
                              eos_token_id=None)  # fmt: skip
    with torch.no_grad():
        out = policy.model.generate(**batch, logits_processor=processors, generation_config=config)
    assert torch.equal(out[:, prefix:], codes)


def test_null_sampling_keys_are_what_the_checkpoints_generation_config_makes_generate_use(policy, tmp_path):
    """GlmImagePipeline samples the AR with `generate(do_sample=True)`, which reads the folder's generation_config.json
    and gives every key it leaves unset transformers' default: a recipe's null keys resolve to the same values, a key
    the recipe sets wins, and a warper the sampler does not apply is refused."""
    from omegaconf import OmegaConf
    from transformers import GenerationConfig

    from grpo_image.core.sampling import resolve_checkpoint_sampling

    policy.save_pretrained(tmp_path)  # the AR model and its processor, loadable as a GLM-Image policy
    GenerationConfig(do_sample=True, temperature=0.9, top_p=0.75).save_pretrained(tmp_path)  # the card's; no top_k
    loaded = glm_image_policy(str(tmp_path), HEIGHT, WIDTH, dtype="float32")
    assert loaded.checkpoint_sampling() == {"temperature": 0.9, "top_k": 50, "top_p": 0.75, "min_p": 0.0}
    theirs, _ = loaded.model._prepare_generation_config(None, do_sample=True)  # what the pipeline's generate() uses
    assert (theirs.temperature, theirs.top_k, theirs.top_p, theirs.min_p) == (0.9, 50, 0.75, None)
    node = OmegaConf.create({"temperature": None, "top_k": 20, "top_p": None, "min_p": None})
    assert resolve_checkpoint_sampling(node, loaded) == {"temperature": 0.9, "top_p": 0.75, "min_p": 0.0}
    assert node.top_k == 20 and SamplingSettings.from_config({**node, "cfg_scale": 1.0, "cfg_logprobs": "mixture",
                                                              "batch_size": 0, "compile": False}).top_p == 0.75
    GenerationConfig(do_sample=True, top_k=7, typical_p=0.5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sets {'typical_p': 0.5}, which this sampler does not apply"):
        glm_image_policy(str(tmp_path), HEIGHT, WIDTH, dtype="float32").checkpoint_sampling()


def test_lora_regex_of_the_recipe_adapts_the_language_model_only(policy):
    from grpo_image.base.config import load_recipe

    regex = load_recipe(str(REPO / "recipes" / "glm_image_lora.yaml"), []).train.lora.target_regex
    names = [name for name, module in policy.model.named_modules()
             if isinstance(module, torch.nn.Linear) and re.fullmatch(regex, name)]  # fmt: skip
    # 2 layers x (q, k, v, o, gate_up, down), all inside model.language_model
    assert len(names) == 12 and all(name.startswith("model.language_model.layers.") for name in names)


# 3. the decoder against GlmImagePipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glm_folder(tmp_path_factory, policy):
    """A whole tiny GLM-Image folder in the repository's layout, saved by GlmImagePipeline itself (AR in bf16)."""
    import copy

    from diffusers import GlmImagePipeline

    root = tmp_path_factory.mktemp("glm") / "GLM-Image"
    ar = copy.deepcopy(policy.model).to(torch.bfloat16)
    pipe = GlmImagePipeline(processor=policy.processor, vision_language_encoder=ar, **tiny_dit_parts(policy.num_codes))
    pipe.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def decoder(glm_folder):
    return GlmImageDecoder(str(glm_folder), num_inference_steps=3, guidance_scale=1.5, dtype="float32", device="cpu")


def test_decoder_is_the_pipeline_called_with_the_large_grid(decoder, glm_folder):
    from diffusers import GlmImagePipeline

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (2, 253), generator=generator)  # [n, L]: preview (247) then large (6)
    images = decoder(codes.numpy(), (2, 3), np.array([11, 12]), prompts=[PROMPTS[0]] * 2)
    assert images.shape == (2, 64, 96, 3) and images.dtype == np.uint8
    pipe = GlmImagePipeline.from_pretrained(glm_folder, vision_language_encoder=None, processor=None,
                                            dtype=torch.float32)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    for i in range(2):
        prior = GlmImagePipeline._upsample_token_ids(codes[i, 247:], 2, 3)  # [1, 24], the pipeline's own upsampling
        assert torch.equal(prior, upsample_codes(codes[i : i + 1, 247:], (2, 3)))
        direct = pipe(prompt=PROMPTS[0], prior_token_ids=prior, height=64, width=96, num_inference_steps=3,
                      guidance_scale=1.5, generator=torch.Generator().manual_seed(11 + i)).images[0]  # fmt: skip
        # The decoder ran both rollouts in one batch, the pipeline here one: fp32 sums in another order (which some
        # CPU kernels take, e.g. the portable ones, for another batch size) differ in the last bits, far under one
        # 8-bit level, and rounding to uint8 turns that into at most one level, at a few pixels
        difference = np.abs(images[i].astype(int) - np.asarray(direct).astype(int))  # the pipeline's PIL image
        assert difference.max() <= 1 and np.mean(difference) < 0.01, (difference.max(), np.mean(difference))


def test_a_group_in_one_call_is_its_rollouts_one_by_one_and_groups_are_decoded_apart(decoder):
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 64, (5, 253), generator=generator).numpy()
    seeds, prompts = np.arange(20, 25), [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2
    assert prompt_runs(prompts, None) == [slice(0, 3), slice(3, 5)]
    assert prompt_runs(prompts, 2) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    together = decoder(codes, (2, 3), seeds, prompts=prompts)
    alone = np.concatenate([decoder(codes[i : i + 1], (2, 3), seeds[i : i + 1], prompts=prompts[i : i + 1])
                            for i in range(5)])  # fmt: skip
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1  # fp32 rounding of a batch of one prompt
    assert not np.array_equal(together[0], together[1])  # the seed matters
    # why one call per group: the pipeline itself, given both prompts in one batch, zero-pads the shorter prompt's
    # glyph embeddings with no mask, and the first image moves away from the one its prompt alone gives
    prior = upsample_codes(torch.as_tensor(codes[[0, 3], -6:]), (2, 3))  # [2, 24]
    mixed = decoder.pipe(prompt=[prompts[0], prompts[3]], prior_token_ids=prior, height=64, width=96,
                         num_inference_steps=3, guidance_scale=1.5, output_type="np",
                         generator=[torch.Generator().manual_seed(int(s)) for s in seeds[[0, 3]]]).images  # fmt: skip
    assert np.abs((mixed[0] * 255).round() - alone[0]).max() >= 2


# 4. the recipes through the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("glm_rewards")
    hps_model, _, _ = write_tiny_hps(root)
    prompts = root / "prompts.jsonl"
    records = [{"prompt": PROMPTS[0], "metadata": {"text": ["OPEN"]}},
               {"prompt": PROMPTS[2], "metadata": {"text": ["Coffee 3 dollars"]}}]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, hps_model


def recipe_overrides(glm_folder: Path, reward_root: Path, hps_model: str, url: str) -> list[str]:
    return [f"policy.path={glm_folder}", f"policy.height={HEIGHT}", f"policy.width={WIDTH}",
            f"decoder.path={glm_folder}", "decoder.num_inference_steps=2", "decoder.dtype=float32",
            "decoder.device=cpu", f"rewards.0.scorer.checkpoint={reward_root / 'HPS_v2.1_compressed.pt'}",
            f"rewards.0.scorer.model_name={hps_model}", f"rewards.1.scorer.base_url={url}",
            "train.fsdp=false"]  # fmt: skip


ONE_STEP = ["steps=1", "data.batch_size=2", "data.group_size=4", "sample_every=1", "workers.backend=inprocess",
            "workers.prefetch=false", "train.logprob_chunk=100", "logging.num_samples=2", "sampling.batch_size=0",
            "train.micro_batch_size=0"]  # fmt: skip


def judge(seen, hit) -> Reply:
    return Reply(completion("Yes", logprobs=[("Yes", math.log(0.9)), ("No", math.log(0.1))]))


@pytest.mark.parametrize("recipe", ["glm_image_lora", "glm_image_full"])
def test_recipe_runs_one_step_in_its_own_bf16_and_validates(policy, glm_folder, reward_assets, tmp_path, recipe,
                                                            capsys):
    reward_root, hps_model = reward_assets
    path = str(REPO / "recipes" / f"{recipe}.yaml")
    with ChatServer(judge) as server:
        extra = recipe_overrides(glm_folder, reward_root, hps_model, server.base_url)
        assert main(["validate", path, *extra, f"data.prompts={reward_root / 'prompts.jsonl'}"]) == 0
        assert "components checked" in capsys.readouterr().out
        code = main(["train", path, *ONE_STEP, *extra, f"data.prompts={reward_root / 'prompts.jsonl'}",
                     f"output_dir={tmp_path}"])  # fmt: skip
    assert code == 0
    from omegaconf import OmegaConf

    resolved = OmegaConf.load(tmp_path / "config.yaml").sampling  # the recipe's nulls, as the run resolved them:
    # this folder's generation_config.json sets no sampling key, so transformers' defaults, as generate() uses them
    assert (resolved.temperature, resolved.top_k, resolved.top_p, resolved.min_p) == (1.0, 50, 1.0, 0.0)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    for key in ("train/logprob_diff/p50", "train/logprob_diff/max", "train/logprob_diff/outside_clip",
                "sampling/filtered_mass/mean", "sampling/filtered_mass/max"):
        assert key in row, key  # fmt: skip
    for key, value in row.items():
        if key.startswith(("reward/", "train/", "adv/", "sampling/")) and not key.endswith(("/nan", "/std")):
            assert value is not None and math.isfinite(value), (key, row)
    assert row["reward/alignment/mean"] == pytest.approx(0.9, abs=1e-6)  # P("Yes")
    assert abs(row["train/ratio_mean_first"] - 1) <= 1e-3  # on-policy: the bf16 rollouts' log-probs are the trainer's
    saved = tmp_path / "checkpoints" / "step_000001" / "policy"
    if recipe == "glm_image_lora":
        adapter = json.loads((saved / "adapter_config.json").read_text())
        assert "language_model" in adapter["target_modules"]
    else:  # a full checkpoint's weights load into the recipe's GLM-Image policy, as sample and eval read them
        loaded = glm_image_policy(str(glm_folder), HEIGHT, WIDTH, dtype="float32")
        load_stages(loaded, saved, merge=False)
        for name, value in saved_weights(saved).items():
            assert torch.equal(loaded.model.state_dict()[name], value), name
    assert (tmp_path / "samples" / "step_000001.png").is_file()


def test_recipes_validate_with_their_own_prompt_set(glm_folder, reward_assets, monkeypatch, capsys):
    reward_root, hps_model = reward_assets
    monkeypatch.chdir(REPO)  # the recipes name prompts/text_en.jsonl relative to the repository
    for recipe in ("glm_image_lora", "glm_image_full", "glm_image_decoupled"):
        extra = recipe_overrides(glm_folder, reward_root, hps_model, "http://127.0.0.1:9/v1")
        if recipe == "glm_image_decoupled":  # its detail reward: HPSv2 again, feeding the decoder
            extra += [f"rewards.3.scorer.checkpoint={reward_root / 'HPS_v2.1_compressed.pt'}",
                      f"rewards.3.scorer.model_name={hps_model}"]
        assert main(["validate", f"recipes/{recipe}.yaml", *extra]) == 0, capsys.readouterr().err
        assert "components checked" in capsys.readouterr().out


def test_sample_decodes_with_each_rollouts_prompt(glm_folder, reward_assets, tmp_path):
    """`grpo-image sample` goes through the same decode path as the workers: the DiT gets each rollout's prompt."""
    reward_root, hps_model = reward_assets
    extra = recipe_overrides(glm_folder, reward_root, hps_model, "http://127.0.0.1:9/v1")
    assert main(["sample", str(REPO / "recipes" / "glm_image_lora.yaml"), *extra, "--prompts",
                 str(reward_root / "prompts.jsonl"), "--n", "2", "--out", str(tmp_path)]) == 0  # fmt: skip
    images = sorted(path.name for path in tmp_path.glob("*.png"))
    assert images == ["0000_1.png", "0000_2.png", "0001_1.png", "0001_2.png"]
    from PIL import Image

    with Image.open(tmp_path / "0000_1.png") as image:
        assert image.size == (WIDTH, HEIGHT)  # 2 x 3 large codes of 32 px
