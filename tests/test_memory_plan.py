"""The memory plan against what the code allocates, and the plan in `grpo-image plan` and `grpo-image validate`.

Peak memory is measured on the CPU with torch's profiler (`profile_memory=True`): it records every allocation and
free of the tensor allocator with the running total of bytes held since profiling began, so the maximum of that
total over a call is the extra memory the call needed at its worst moment (what `torch.cuda.max_memory_allocated`
reports on a GPU), exact and repeatable. The plan's numbers for the same call must lie within 25% of it, for a
small fp32 Qwen2 policy and a 20x larger bf16 X-Omni policy (LoRA with checkpointing, and full fine-tuning with
fp32 masters under autocast): one sampler call, and one micro-batch's forward and backward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from grpo_image.cli import main
from grpo_image.config import instantiate, load_recipe
from grpo_image.data import load_prompts
from grpo_image.logprobs import teacher_forced_logprobs
from grpo_image.loss import grpo_loss
from grpo_image.memory_plan import kv_bytes_per_token, plan_recipe, rollout_bytes, update_bytes
from grpo_image.policies.lora import make_weights
from grpo_image.sampling import SamplingSettings, sample_codes

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny_cpu.yaml")
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
}


@pytest.mark.parametrize("case", CASES)
def test_plan_is_within_25_percent_of_the_measured_peaks(case, xomni_folder, one_thread):
    overrides = [*CASES[case], f"data.batch_size={ROWS}", "data.group_size=2", "train.minibatches=2",
                 f"sampling.batch_size={ROWS}", "train.logprob_chunk=32"]  # fmt: skip
    if case.startswith("x-omni"):
        overrides.append(f"policy={{_component_: grpo_image.policies.xomni.xomni_policy, path: '{xomni_folder}', "
                         "height: 128, width: 128, dtype: bfloat16}")  # fmt: skip
    cfg = load_recipe(TINY, overrides)
    plan = plan_recipe(cfg, TINY)
    p, s = plan.policy, plan.setup
    torch.manual_seed(0)
    policy = instantiate(cfg.policy)
    weights = make_weights(policy, cfg.train)
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
        loss, _ = grpo_loss(logprobs, logprobs.detach(), None, torch.ones(ROWS), 0.2, 0.2, 0.0)
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
    """Folders holding only the config.json of X-Omni-En and Janus-Pro-7B, as the user has before downloading."""
    from transformers import JanusConfig

    root = tmp_path_factory.mktemp("published")
    (root / "X-Omni-En").mkdir()
    (root / "X-Omni-En" / "config.json").write_text(json.dumps(XOMNI_EN))
    JanusConfig(**JANUS_PRO_7B).save_pretrained(root / "Janus-Pro-7B")
    return root


def real_recipe(name: str, root: Path) -> list[str]:
    if name == "janus_pro_7b":
        return [f"policy.path={root / 'Janus-Pro-7B'}", f"decoder.path_or_model={root / 'Janus-Pro-7B'}"]
    return [f"policy.path={root / 'X-Omni-En'}", f"decoder.xomni_path={root / 'X-Omni-En'}",
            f"decoder.flux_path={root / 'FLUX.1-dev'}"]  # fmt: skip


@pytest.mark.parametrize("name", ["xomni_en_lora", "xomni_en_full", "xomni_zh_stage", "janus_pro_7b"])
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
