"""Decoder GRPO in the training loop (train.target decoder | both) on a tiny GLM-Image, in bf16 as the real recipes
run: nested-group advantages against a hand computation, both sets of adapters moving, exact resume, the trained
adapters decoding `sample`'s images, and the recipe checks that refuse what cannot learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from grpo_image.app.cli import main
from grpo_image.base.config import load_recipe
from grpo_image.base.logging import read_metrics
from tests.test_cli_train import comparable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: see conftest.py

B, K, G = 2, 2, 3  # prompts, AR samples of each, decodes of each sample
RECIPE = {
    "seed": 3, "steps": 2, "save_every": 1, "sample_every": 1,
    "policy": {"_component_": "grpo_image.policies.glm_image.tiny_glm_image_policy", "height": 64, "width": 96,
               "num_codes": 64, "dtype": "bfloat16", "initializer_range": 0.3},
    "decoder": {"_component_": "grpo_image.decoders.tiny_glm_image.tiny_glm_image_decoder", "num_codes": 64,
                "guidance_scale": 1.5, "vae_width": 32, "vae_groups": 1, "dtype": "bfloat16"},
    "rewards": [  # GLM-Image's split in miniature: one reward for the AR model, one for the decoder
        {"name": "color", "feeds": "policy", "scorer": {"_component_": "rewards.color.ColorAdherence",
                                                         "tolerance": 80.0}},
        {"name": "jpeg", "feeds": "decoder", "scorer": {"_component_": "rewards.jpeg.JPEGCompressibility",
                                                         "quality": 75, "scale": "fraction"}},
    ],
    "data": {"prompts": str(REPO / "prompts" / "tiny_decoder.jsonl"), "batch_size": B, "group_size": K,
             "max_passes": 1000.0},
    "sampling": {"min_p": 0.03},
    "train": {"target": "both", "mode": "lora", "lr": 1e-2, "beta": 0.01, "minibatches": 2},
    "decoder_train": {"group_size": G, "num_inference_steps": 4, "window": 2, "lr": 1e-2, "beta": 0.01},
    "logging": {"tensorboard": False, "num_samples": 2},
}


def write_recipe(folder: Path, **changes) -> Path:
    whole = {key: value for key, value in changes.items() if "_component_" in value}  # another component: replaced
    recipe = OmegaConf.merge(OmegaConf.create({**RECIPE, **whole}), OmegaConf.create(changes))
    path = folder / "recipe.yaml"
    path.write_text(OmegaConf.to_yaml(recipe))
    return path


def test_both_moves_both_adapters_with_the_nested_advantages_computed_by_hand(tmp_path, monkeypatch):
    from grpo_image.training import train

    cfg = load_recipe(write_recipe(tmp_path), [f"output_dir={tmp_path / 'run'}"])
    trainer = train.build_trainer(cfg)
    seen: dict[str, object] = {}
    pool_gather, decoder_update, policy_update = trainer.pool.gather, trainer.decoder.update, train.update_policy

    def gather(pending):
        scored = pool_gather(pending)
        seen["scores"] = scored.scores.copy()  # [B*K*G, 2]
        return scored

    def update_decoder(chunks, advantages):
        seen["decoder"] = advantages.clone()
        seen["windows"] = [(c.rows, c.window.latents.shape, c.window.logprobs.shape) for c in chunks]
        return decoder_update(chunks, advantages)

    def update_policy(*args):
        seen["policy"] = args[6].clone()  # update_policy(trainer, step, prompts, codes, behaviour, ref, advantages)
        return policy_update(*args)

    trainer.pool.gather, trainer.decoder.update = gather, update_decoder
    monkeypatch.setattr(train, "update_policy", update_policy)
    policy_before = [p.detach().clone() for p in trainer.weights.trainable_parameters()]
    decoder_before = [p.detach().clone() for p in trainer.decoder.params]
    metrics, _ = train.grpo_step(trainer, 1)

    scores = seen["scores"].astype(np.float64)
    assert scores.shape == (B * K * G, 2)
    eps = cfg.advantages.eps
    # the policy's: each AR sample's colour score averaged over its G decodes, normalised within its prompt's K
    means = scores[:, 0].reshape(B, K, G).mean(-1)  # [B, K]
    policy = (means - means.mean(1, keepdims=True)) / (means.std(1, keepdims=True) + eps)  # population std
    # the decoder's: each image's jpeg score normalised within the G decodes of its codes
    decodes = scores[:, 1].reshape(B * K, G)  # [B*K, G]
    decoder = (decodes - decodes.mean(1, keepdims=True)) / (decodes.std(1, keepdims=True) + eps)
    # float32 advantages of O(1) values from float32 scores: a few float32 ulps of 1
    assert np.allclose(seen["policy"].numpy(), policy.reshape(-1), atol=1e-5, rtol=0)
    assert np.allclose(seen["decoder"].numpy(), decoder.reshape(-1), atol=1e-5, rtol=0)
    # only the window is kept: each decoder batch (one prompt's K*G decodes) holds window + 1 latents of 2 steps
    for rows, latents, logprobs in seen["windows"]:
        assert rows.stop - rows.start == K * G and latents[1] == 3 and logprobs[1:] == (2,)
    assert metrics["decoder/ratio_mean_first"] == pytest.approx(1.0, abs=1e-6)  # on-policy: the same kernels
    assert abs(metrics["train/ratio_mean_first"] - 1) <= 1e-3  # bf16 sampler and trainer
    moved = [not torch.equal(a, p) for a, p in zip(policy_before, trainer.weights.trainable_parameters())]
    assert any(moved), "the policy's adapters did not move"
    assert any(not torch.equal(a, p) for a, p in zip(decoder_before, trainer.decoder.params)), "decoder did not move"
    trainer.pool.close()


def test_a_run_that_trains_both_resumes_exactly_and_samples_with_its_decoder(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", str(recipe), f"output_dir={straight}"]) == 0
    assert main(["train", str(recipe), f"output_dir={split}", "steps=1"]) == 0
    assert main(["train", str(recipe), f"output_dir={split}", f"resume={split}"]) == 0
    assert comparable(read_metrics(straight / "metrics.jsonl")) == comparable(read_metrics(split / "metrics.jsonl"))
    for part in ("policy/adapter_model.safetensors", "decoder/adapter_model.safetensors"):
        ours, theirs = (load_file(run / "checkpoints" / "step_000002" / part) for run in (straight, split))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    trained = load_file(straight / "checkpoints" / "step_000002" / "decoder" / "adapter_model.safetensors")
    assert any(name.endswith("lora_B.weight") and value.abs().max() > 0 for name, value in trained.items())

    from grpo_image.decoders.flow_lora import adapter_state
    from grpo_image.evaluation.generate import load_decoder

    cfg = load_recipe(recipe, [])
    loaded = adapter_state(load_decoder(cfg, straight).pipe.transformer)  # the run's newest checkpoint
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k], trained[k].to(loaded[k].dtype)) for k in trained)
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    prompts = str(REPO / "prompts" / "tiny_decoder.jsonl")
    assert main(["sample", str(recipe), "--prompts", prompts, "--n", "1", "--out", str(plain)]) == 0
    assert main(["sample", str(recipe), "--checkpoint", str(straight), "--prompts", prompts, "--n", "1", "--out",
                 str(tuned)]) == 0  # fmt: skip
    from PIL import Image

    differ = [np.asarray(Image.open(plain / name.name)).tolist() != np.asarray(Image.open(name)).tolist()
              for name in sorted(tuned.glob("*.png"))]  # fmt: skip
    assert differ and any(differ)  # the trained adapters decode sample's images (its policy moved as well)


@pytest.mark.parametrize("change, message", [
    ({"decoder": {"_component_": "grpo_image.decoders.palette.PaletteDecoder", "patch_size": 8}},
     "has no flow-matching form"),
    ({"workers": {"prefetch": True}}, "workers.prefetch"),
    ({"decoder_seeds": "group"}, "decoder_seeds: group"),
    ({"rewards": [{"name": "color", "feeds": "policy", "scorer": {"_component_": "rewards.color.ColorAdherence"}}]},
     "no reward feeds the decoder"),
    ({"decoder_train": {"window": 4}}, "does not fit"),  # 4 steps: the last is never in the window
    ({"decoder_train": {"kind": "ode"}}, "decoder_train.kind"),
])
def test_recipes_that_cannot_train_the_decoder_are_refused(tmp_path, capsys, change, message):
    recipe = write_recipe(tmp_path, **change)
    assert main(["validate", str(recipe)]) == 2
    assert message in capsys.readouterr().err


def test_a_stage_continues_the_decoder_its_run_trained_and_policy_only_stages_are_refused(tmp_path, capsys):
    """train.init_from of a run that trained the decoder: the next stage's decoder adapters start from it (a run with
    train.target policy would have its workers decode with the untrained decoder, so it is refused)."""
    from grpo_image.training.decoder_grpo import DecoderTrainer
    from grpo_image.training.distributed import World

    first = tmp_path / "first"
    recipe = write_recipe(tmp_path, train={"target": "decoder"})
    assert main(["train", str(recipe), f"output_dir={first}", "steps=1"]) == 0
    saved = load_file(first / "checkpoints" / "step_000001" / "decoder" / "adapter_model.safetensors")
    cfg = load_recipe(recipe, [f"train.init_from={first}", f"output_dir={tmp_path / 'second'}"])
    from grpo_image.decoders.flow_lora import adapter_state

    continued = adapter_state(DecoderTrainer(cfg, World()).flow.transformer)
    assert continued.keys() == saved.keys() and all(torch.equal(continued[k], saved[k]) for k in saved)
    refused = write_recipe(tmp_path, train={"target": "policy", "init_from": str(first)})
    assert main(["validate", str(refused)]) == 2
    assert "trained the decoder too" in capsys.readouterr().err


def test_a_recipes_own_lora_targets_are_trained_saved_and_attached_again(tmp_path):
    """decoder_train.lora.target_regex replaces the family's list; the checkpoint says which modules it adapted, so
    `sample`, `eval` and `export` attach the adapters where the run trained them."""
    from grpo_image.decoders.flow_lora import adapter_state
    from grpo_image.decoders.tiny_glm_image import tiny_glm_image_decoder
    from grpo_image.training.decoder_grpo import DecoderTrainer, attach_trained_adapters, saved_lora
    from grpo_image.training.distributed import World

    regex = r"transformer_blocks\.\d+\.attn1\.to_q|proj_out"  # one projection and the output head
    cfg = load_recipe(write_recipe(tmp_path, decoder_train={"lora": {"target_regex": regex}}), [])
    trainer = DecoderTrainer(cfg, World())
    adapted = {name.split(".lora_")[0] for name in adapter_state(trainer.flow.transformer)}
    assert adapted == {"transformer_blocks.0.attn1.to_q", "proj_out"}
    with torch.no_grad():
        for param in trainer.params:
            param.add_(0.01)  # a trained-looking adapter
    trainer.save(tmp_path / "decoder")
    assert saved_lora(tmp_path / "decoder") == {"r": 64, "lora_alpha": 128.0, "target_modules": regex}
    fresh = tiny_glm_image_decoder(num_codes=64, vae_width=32, vae_groups=1)
    attach_trained_adapters(fresh, tmp_path / "decoder")
    ours, theirs = adapter_state(trainer.flow.transformer), adapter_state(fresh.pipe.transformer)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
