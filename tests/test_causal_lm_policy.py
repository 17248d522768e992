"""Any HF causal LM with an image-code id range: loaded from a folder the way a user's checkpoint is."""

import torch

from grpo_image.app.cli import main
from grpo_image.base.logging import read_metrics
from grpo_image.core.logprobs import teacher_forced_logprobs
from grpo_image.policies.causal_lm import causal_lm_policy
from grpo_image.policies.tiny import tiny_policy
from grpo_image.core.sampling import SamplingSettings, sample_codes
from tests.helpers_sampling import logprob_tolerance, position_logits, roundings_to_a_logit
from tests.test_cli_train import RECIPE, SMALL

TEMPLATE = "<|user|>{prompt}<|image {h}x{w}|>"  # a template of the user's own, with the grid in it


def saved_model(folder):
    """A Qwen2 causal LM whose ids 258..273 are image codes, saved like any HF checkpoint."""
    tiny_policy(num_codes=16, grid=(2, 2), hidden_size=32, num_layers=1, seed=4).save_pretrained(folder)
    return folder


def test_a_saved_causal_lm_loads_and_its_sampled_logprobs_equal_teacher_forced(tmp_path):
    policy = causal_lm_policy(str(saved_model(tmp_path)), image_token_offset=258, num_codes=16, grid=[2, 3],
                              prompt_template=TEMPLATE)
    assert policy.tokenizer.decode(policy.encode(["cat"])[0]) == "<|user|>cat<|image 2x3|>"
    prompts = ["a cat", "a dog on a red sofa"]
    for settings in (SamplingSettings(top_k=5), SamplingSettings(cfg_scale=2.0)):
        codes, sampled = sample_codes(policy, prompts, torch.tensor([1, 2]), settings)
        assert codes.shape == (2, 6)
        with torch.no_grad():
            forced = teacher_forced_logprobs(policy, prompts, codes, settings)
        # two summation orders of the same fp32 log-probs (`logprob_tolerance`): 1 Qwen2 layer of hidden 32, MLP 64,
        # heads of 8 over at most P + L - 1 keys, on this model's largest logit, with its guidance
        tokens = max(len(row) for row in policy.encode(prompts)) + codes.shape[1] - 1
        roundings = roundings_to_a_logit(layers=1, hidden=32, intermediate=64, head_dim=8, tokens=tokens)
        max_logit = position_logits(policy, prompts, codes, SamplingSettings()).abs().max().item()
        tol = logprob_tolerance(roundings, max_logit, cfg_scale=settings.cfg_scale)
        torch.testing.assert_close(forced, sampled, atol=tol, rtol=0)


def test_a_code_range_outside_the_vocabulary_is_refused(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="image codes 270..285 do not fit the model's vocabulary of 277"):
        causal_lm_policy(str(saved_model(tmp_path)), image_token_offset=270, num_codes=16, grid=[2, 2])


def test_the_cli_trains_a_causal_lm_named_in_a_recipe(tmp_path):
    policy = ["policy={_component_: grpo_image.policies.causal_lm.causal_lm_policy, "
              f"path: {saved_model(tmp_path / 'model')}, image_token_offset: 258, num_codes: 16, grid: [2, 2]}}"]
    assert main(["train", RECIPE, *SMALL, "steps=2", *policy, "train.mode=lora", f"output_dir={tmp_path / 'run'}"]) == 0
    assert [row["step"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
