"""LoRA targets: module-name suffixes from a list, or one regex over full names."""

from omegaconf import OmegaConf

from grpo_image.training.weights import make_weights
from grpo_image.policies.tiny import tiny_policy

DEFAULTS = OmegaConf.load("grpo_image/base/defaults.yaml").train


def lora_modules(**lora) -> set[str]:
    cfg = OmegaConf.merge(DEFAULTS, {"mode": "lora", "lora": lora})
    weights = make_weights(tiny_policy(num_codes=4, grid=(1, 2), hidden_size=16, num_layers=2), cfg)
    # peft names them base_model.model.model.layers.<i>...: keep the part from "layers." on
    return {"layers." + name.split(".lora_A")[0].split(".layers.")[-1]
            for name, _ in weights.policy.model.named_parameters() if "lora_A" in name}


def test_a_list_targets_every_module_with_that_name():
    assert lora_modules(target_modules=["q_proj", "v_proj"]) == {
        "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"}


def test_a_regex_targets_only_the_modules_it_matches():
    assert lora_modules(target_regex=r".*layers\.1\.mlp\.(up|down)_proj") == {"layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}
