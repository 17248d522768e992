"""What a memory plan needs to know about a recipe's policy, read from its config: no weight is loaded.

Every count comes from the real model class built on the `meta` device (shapes without storage), so it is exact
for the architecture the code runs: from the checkpoint's `config.json` for the families loaded from a folder
(X-Omni, Janus-Pro, GLM-Image, any HF causal LM), or from calling the recipe's own policy component under the meta
device for components built from arguments (the tiny policies, a user's own). The decoder and the rewards are read
the same way in grpo_image.planning.decoder_sizes.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from grpo_image.base.config import COMPONENT_KEY, RecipeError, import_dotted, instantiate
from grpo_image.training.preflight import PATH_ARGUMENT
from grpo_image.training.weights import rounded_by_autocast

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Linears of a Qwen2 / LLaMA / GLM-4 layer that take the same input (q/k/v the normed states, gate/up or GLM-4's fused
# gate_up the normed states, o the attention's output, down the gated product): LoRA adapters over an fp32 base keep
# one copy per input
ATTENTION_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                    "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in",
                    "down_proj": "mlp_mid"}  # fmt: skip
NORMED_INPUTS = ("attn_in", "mlp_in")  # the groups whose input is a pre-norm's output


@dataclass(frozen=True)
class PolicyShape:
    """Parameter counts and the widths of one decoder layer of the policy's language model."""

    source: str  # where the numbers come from
    dtype_bytes: int  # the policy's dtype: its compute dtype
    params: int
    sharded_params: int  # in the decoder layers (children of ModuleLists named `layers`): what FSDP shards
    largest_layer_params: int  # one such layer (FSDP gathers one at a time in training)
    largest_tensor_params: int  # the largest single weight (an embedding or head): what a resume holds at once
    trainable_params: int  # what train.mode full trains (modules the policy freezes left out)
    trainable_sharded: int
    trainable_linear: int  # trained parameters only Linears hold: the reference keeps them in the compute dtype
    trainable_linear_sharded: int  # those of them in the decoder layers
    cast_params: int  # weights of the Linear layers in the language model's decoder layers (cast under autocast)
    layers: int
    hidden: int
    intermediate: int
    norm_readers: int  # Linears of one layer that read a pre-norm's output (q, k, v, gate, up: 5; GLM-4's gate_up: 4)
    mlp_up_width: int  # the widest output of the MLP's input projections: I, or 2I for GLM-4's fused gate_up
    post_norms: int  # norms of a sub-layer's output before the residual add (GLM-4: 2; Qwen2 / LLaMA: none)
    heads: int
    kv_heads: int
    head_dim: int
    codes: int  # V
    positions: int  # L
    grid: tuple[int, int]  # the (h, w) grid the decoder draws: the last h*w of the L codes
    embeds_codes: bool  # Janus: codes enter through a generation aligner (an MLP) whose activations count too
    final_norms: int  # norms applied to every token after the last layer (X-Omni: its text and multimodal norms)
    lora_params: int  # adapter parameters for the recipe's train.lora settings
    lora_inputs: tuple[tuple[str, int], ...]  # (input group, in_features) of each adapted Linear in one LM layer
    lora_rank: int
    prompt_tokens: int  # P: the longest prompt row, in tokens
    prompt_note: str


def plain_node(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def component_args(node: dict) -> dict:
    return {k: v for k, v in node.items() if k != COMPONENT_KEY}


def default_of(function, name: str):
    return inspect.signature(function).parameters[name].default


def meta_build(build):
    with torch.device("meta"):
        return build()


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_json(folder, who: str) -> Path:
    path = Path(str(folder)) / "config.json"
    if not path.is_file():
        raise RecipeError(f"{who}: no {path} (a memory plan reads the model's config.json; no weights are needed)")
    return path


@dataclass(frozen=True)
class Built:
    """A policy's model built on the meta device, and what else the plan reads of the policy (its L, V, prompt rows)."""

    model: nn.Module
    config: object  # the language model's config
    trainable: list[nn.Parameter]  # what train.mode full trains (modules the policy freezes left out)
    grid: tuple[int, int]
    positions: int  # L
    codes: int
    encode: tuple | None  # (token counts of prompt rows, how they were counted), or None: no tokenizer to count with
    source: str
    image_head: list[nn.Module]  # the Linears the policy's image head reads in fp32 (its `image_head_of`)


def policy_shape(policy_node, lora_node, prompts: list[str]) -> PolicyShape:
    """The shape of the recipe's policy (`policy` node) with its LoRA adapters (`train.lora` node).

    `prompts` (the prompt set's texts) give P, the longest prompt row in tokens.
    """
    node = plain_node(policy_node)
    target, args = str(node[COMPONENT_KEY]), component_args(node)
    family = FAMILIES.get(target)
    if family is not None:
        function = import_dotted(target)
        return _shape(family(args, function), args.get("dtype", default_of(function, "dtype")), lora_node, prompts)
    loads = [key for key, value in args.items() if PATH_ARGUMENT.search(key) and value is not None]
    if loads:
        raise RecipeError(
            f"memory plan: policy component {target} loads '{loads[0]}' and is not a family the plan reads from a "
            f"config.json ({', '.join(name.rsplit('.', 1)[-1] for name in FAMILIES)}); a component built from its "
            "arguments alone is planned by building it on the meta device"
        )
    policy = meta_build(lambda: instantiate(node))  # built from arguments: the component itself, without storage
    model = policy.model
    encode = (lambda texts: [len(row) for row in policy.encode(texts)], "with the policy's tokenizer")
    built = Built(model, getattr(model.config, "text_config", model.config),
                  [p for p in model.parameters() if p.requires_grad], policy.grid, policy.num_positions,
                  policy.num_codes, encode, f"{target}, built from the recipe's arguments",
                  policy.image_head())  # fmt: skip
    return _shape(built, next(model.parameters()).dtype, lora_node, prompts)


def _xomni(args: dict, function) -> Built:
    from grpo_image.policies.xomni import XOmniPolicy, xomni_grid
    from grpo_image.policies.xomni_model import XOmniConfig, XOmniForCausalLM

    path = config_json(args["path"], "policy.path")
    config = XOmniConfig.from_dict(json.loads(path.read_text()))
    model = meta_build(lambda: XOmniForCausalLM(config))
    grid = xomni_grid(args.get("height", 1024), args.get("width", 1024))
    encode = _folder_encoder(path.parent, _template(args, function), grid, bos=False)  # Qwen2's tokenizer: no BOS
    return Built(model, config, list(model.parameters()), grid, grid[0] * grid[1], config.image_vocab_size, encode,
                 str(path), XOmniPolicy.image_head_of(model))  # fmt: skip


def _janus(args: dict, function) -> Built:
    from transformers import JanusConfig, JanusForConditionalGeneration

    from grpo_image.policies.janus import JanusPolicy

    path = config_json(args["path"], "policy.path")
    config = JanusConfig.from_pretrained(path.parent)
    model = meta_build(lambda: JanusForConditionalGeneration(config))
    side = int(config.vq_config.num_patches)
    encode = _folder_encoder(path.parent, _template(args, function), (side, side), bos=True)
    return Built(model, config.text_config, _janus_trainable(model), (side, side), side * side,
                 config.vq_config.num_embeddings, encode, str(path), JanusPolicy.image_head_of(model))  # fmt: skip


def _causal_lm(args: dict, function) -> Built:
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_image.policies.causal_lm import CausalLMPolicy

    path = config_json(args["path"], "policy.path")
    config = AutoConfig.from_pretrained(path.parent)
    model = meta_build(lambda: AutoModelForCausalLM.from_config(config))
    grid = tuple(args["grid"])
    encode = _folder_encoder(path.parent, _template(args, function), grid, bos=False)
    return Built(model, config, list(model.parameters()), grid, grid[0] * grid[1], args["num_codes"], encode, str(path),
                 CausalLMPolicy.image_head_of(model))


def _glm_image(args: dict, function) -> Built:
    """GLM-Image's AR model from `vision_language_encoder/config.json` (or a saved policy's own folder).

    What GlmImagePolicy trains: all but the vision encoder and the VQ tokenizer. L: the preview grid's codes, then
    the large grid's, as the processor asks for them at the policy's height and width; P: the processor's prompt rows
    when the folder has the checkpoint's processor. The grids depend on the size alone, so a folder of config files
    gets them from a processor built offline (the tiny policy's).
    """
    from transformers import AutoProcessor, GlmImageConfig, GlmImageForConditionalGeneration

    from grpo_image.policies.glm_image import pipeline_processor_call, build_tiny_glm_image_processor
    from grpo_image.policies.glm_image import GlmImagePolicy, glm_image_folders, glm_image_grids

    model_dir, processor_dir = glm_image_folders(args["path"])
    path = config_json(model_dir, "policy.path")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != "glm_image":
        raise RecipeError(f"policy.path: {path}: model_type {model_type!r} is not 'glm_image'")
    config = GlmImageConfig.from_pretrained(model_dir)
    model = meta_build(lambda: GlmImageForConditionalGeneration(config))
    frozen = {id(p) for module in (model.model.visual, model.model.vqmodel) for p in module.parameters()}
    height, width = (int(args.get(key, default_of(function, key))) for key in ("height", "width"))
    processor = AutoProcessor.from_pretrained(processor_dir) if _has_tokenizer(processor_dir) else None
    try:
        grid, preview = glm_image_grids(processor or build_tiny_glm_image_processor(1, 3), height, width)
    except ValueError as error:
        raise RecipeError(f"policy.height, policy.width: {error}") from None
    encode = None
    if processor is not None:

        def rows(texts: list[str]) -> list[int]:  # the pipeline's own processor call, as GlmImagePolicy.encode makes it
            return [len(row) for row in pipeline_processor_call(processor, texts, height, width)["input_ids"]]

        encode = (rows, "with the checkpoint's processor")
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    positions = preview[0] * preview[1] + grid[0] * grid[1]
    return Built(model, config.text_config, trainable, grid, positions, config.vq_config.num_embeddings, encode,
                 str(path), GlmImagePolicy.image_head_of(model))  # fmt: skip


FAMILIES = {  # policy components that load a folder: how to build their model from its config files alone
    "grpo_image.policies.xomni.xomni_policy": _xomni,
    "grpo_image.policies.janus.janus_policy": _janus,
    "grpo_image.policies.causal_lm.causal_lm_policy": _causal_lm,
    "grpo_image.policies.glm_image.glm_image_policy": _glm_image,
}


def _template(args: dict, function) -> str:
    return args.get("prompt_template", default_of(function, "prompt_template"))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def _folder_encoder(folder: Path, template: str, grid, bos: bool):
    """Token counts of prompt rows with the folder's tokenizer, or None when the folder has none."""
    if not _has_tokenizer(folder):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)

    def count(texts: list[str]) -> list[int]:
        rows = [template.format(prompt=t.strip(), h=grid[0], w=grid[1]) for t in texts]
        return [len(tokenizer(row, add_special_tokens=False)["input_ids"]) + int(bos) for row in rows]

    return count, "with the checkpoint's tokenizer"


def _prompt_tokens(encode, prompts: list[str]) -> tuple[int, str]:
    """P, the longest prompt row (its template included) in tokens, and how it was found."""
    if not prompts:
        return 64, "assumed 64 (no prompt set)"
    if encode is None:
        return max(len(p) for p in prompts) + 16, "no tokenizer found: one per character of the longest prompt, + 16"
    count, how = encode
    return max(count(prompts)), f"the longest of {len(prompts)} prompts, {how}"


def _janus_trainable(model: nn.Module) -> list[nn.Parameter]:
    """What JanusPolicy trains: not the understanding encoder, its aligner, the VQ model, nor an untied lm_head."""
    frozen = [model.model.vision_model, model.model.aligner, model.model.vqmodel]
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        frozen.append(model.lm_head)
    skip = {id(p) for module in frozen for p in module.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers FSDP shards: the children of every ModuleList named `layers` (as grpo_image.training.fsdp does)."""
    return [layer for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" for layer in module]  # fmt: skip


def _lm_layers(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The language model's decoder layers: the largest ModuleList named `layers` with num_hidden_layers children."""
    lists = [m for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers" and len(m) == num_layers]  # fmt: skip
    if not lists:
        raise RecipeError(f"memory plan: found no ModuleList of {num_layers} decoder layers in {type(model).__name__}")
    return max(lists, key=param_count)


def _shape(built: Built, dtype, lora_node, prompts: list[str]) -> PolicyShape:
    """Count what the plan needs on a model built on the meta device."""
    model, config = built.model, built.config
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise RecipeError(f"policy dtype {dtype!r}: a memory plan knows {', '.join(DTYPE_BYTES)}")
    trainable_ids = {id(p) for p in built.trainable}
    layers = _decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    linear = rounded_by_autocast(model, built.image_head)
    lm_layers = _lm_layers(model, config.num_hidden_layers)
    cast = sum(m.weight.numel() for layer in lm_layers for m in layer.modules() if isinstance(m, nn.Linear))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    linears = [(name.split(".")[-1], m) for name, m in lm_layers[0].named_modules() if isinstance(m, nn.Linear)]
    mlp_in = [m.out_features for short, m in linears if ATTENTION_GROUPS.get(short) == "mlp_in"]
    norms = [m for m in lm_layers[0].children() if "Norm" in type(m).__name__]  # pre-norms, then any post-norms
    lora_params, lora_inputs = _lora(model, lm_layers[0], lora_node)
    tokens, how = _prompt_tokens(built.encode, prompts)
    return PolicyShape(
        source=built.source, dtype_bytes=DTYPE_BYTES[dtype], params=param_count(model),
        sharded_params=sum(param_count(layer) for layer in layers),
        largest_layer_params=max((param_count(layer) for layer in layers), default=0),
        largest_tensor_params=max(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in built.trainable),
        trainable_sharded=sum(p.numel() for p in model.parameters() if id(p) in trainable_ids and id(p) in in_layers),
        trainable_linear=sum(p.numel() for p in model.parameters() if id(p) in trainable_ids and id(p) in linear),
        trainable_linear_sharded=sum(p.numel() for p in model.parameters()
                                     if id(p) in trainable_ids and id(p) in linear and id(p) in in_layers),
        cast_params=cast, layers=config.num_hidden_layers, hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        norm_readers=sum(ATTENTION_GROUPS.get(short) in NORMED_INPUTS for short, _ in linears),
        mlp_up_width=max(mlp_in, default=config.intermediate_size), post_norms=max(len(norms) - 2, 0), heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", heads), head_dim=head_dim, codes=int(built.codes),
        positions=int(built.positions), grid=(int(built.grid[0]), int(built.grid[1])),
        embeds_codes=hasattr(getattr(model, "model", None), "generation_aligner"),
        final_norms=2 if type(model).__name__ == "XOmniForCausalLM" else 1,
        lora_params=lora_params, lora_inputs=lora_inputs, lora_rank=int(lora_node.r), prompt_tokens=tokens,
        prompt_note=how,
    )  # fmt: skip


def _lora(model: nn.Module, first_layer: nn.Module, lora_node) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Adapter parameters over the whole model, and (group, in_features) of the adapted Linears of one LM layer.

    The module selection is peft's: a list of names matches a module whose name is, or ends in `.`, one of them;
    `target_regex` must match the whole module name.
    """
    regex = lora_node.target_regex
    names = list(lora_node.target_modules)

    def targeted(name: str) -> bool:
        if regex:
            return re.fullmatch(regex, name) is not None
        return any(name == t or name.endswith("." + t) for t in names)

    r = int(lora_node.r)
    params, first = 0, []
    layer_ids = {id(m) for m in first_layer.modules()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and targeted(name):
            params += r * (module.in_features + module.out_features)
            if id(module) in layer_ids:
                short = name.split(".")[-1]
                first.append((ATTENTION_GROUPS.get(short, name), module.in_features))
    return params, tuple(first)
