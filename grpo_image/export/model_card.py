"""The README.md of an export: what the model is, how it was trained, how well, what may be done with it.

Everything in it is read from the run (its recipe as saved in the checkpoint, the metrics up to the checkpoint's
step) or from the source folder (the licence in its own model card's front matter); nothing is filled in by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from grpo_image.base.logging import plot_reward_curve, read_metrics
from grpo_image.export.source_folders import Family

REWARD_CURVE = "reward_curve.png"
LAST_STEPS = 10  # the final reward: the mean over this many last steps, as noisy single steps are
FLUX_NOTE = ("X-Omni's image decoder is built on FLUX.1-dev, which is distributed under the FLUX.1 [dev] "
             "Non-Commercial License: read it before any commercial use of the decoder.")
LOADING = {
    "X-Omni": """```python
# X-Omni's own code (its remote code, transformers 4.51.3 as X-Omni pins it):
#   python generate.py --model_name_or_path {out} --flux_model_name_or_path /path/to/FLUX.1-dev \\
#     --prompt "..." --image-size 1024 1024 --cfg-scale 1.0 --min-p 0.03 --output-path out.png
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True, torch_dtype="auto")
```""",
    "GLM-Image": """```python
from diffusers import GlmImagePipeline
pipe = GlmImagePipeline.from_pretrained("{out}", dtype=torch.bfloat16).to("cuda")
image = pipe(prompt="...", height=1024, width=1024).images[0]
```""",
    "Janus-Pro": """```python
from transformers import JanusForConditionalGeneration, JanusProcessor
model = JanusForConditionalGeneration.from_pretrained("{out}", dtype="auto")
processor = JanusProcessor.from_pretrained("{out}")
```""",
    "causal LM": """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{out}", dtype="auto")
tokenizer = AutoTokenizer.from_pretrained("{out}")
```""",
    "adapter": """```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "{out}")  # base_model: loaded from base_model_name_or_path
```""",
    "decoder adapter": """```python
# the decoder's adapter, on its transformer (loaded from decoder/adapter_config.json's base_model_name_or_path)
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
inject_adapter_in_model(LoraConfig.from_pretrained("{out}/decoder"), transformer)
set_peft_model_state_dict(transformer, load_file("{out}/decoder/adapter_model.safetensors"))
```""",
}


def source_licence(source: Path | None) -> str | None:
    """The `license:` of the source's own model card (its README.md's YAML front matter), if it states one."""
    card = source / "README.md" if source is not None else None
    if card is None or not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    front = text.split("---", 2)[1]
    try:
        meta = yaml.safe_load(front) or {}
    except yaml.YAMLError:
        return None
    licence = meta.get("license") if isinstance(meta, dict) else None
    return str(licence) if licence else None


def reward_table(rows: list[dict]) -> list[tuple[str, float | None, float | None]]:
    """(reward, first step's mean, mean of the last LAST_STEPS steps) for every reward/<name>/mean logged."""
    names = sorted({k for row in rows for k in row if k.startswith("reward/") and k.endswith("/mean")})
    table = []
    for name in names:
        values = [row[name] for row in rows if row.get(name) is not None]
        last = values[-LAST_STEPS:]
        table.append((name.split("/")[1], values[0] if values else None, sum(last) / len(last) if last else None))
    return table


def trained_row(target: str, policy_mode: str, decoder_mode: str | None, *, peft: bool) -> str:
    """What the run trained, from its `train.target`: a reader of the card must know whether the decoder beside the
    language model is the source's or a trained one, and whether a policy adapter carries any training at all."""
    if target == "decoder" and decoder_mode:
        policy = ("its policy adapter, written as usual, is untrained (B zero)" if peft
                  else "the policy is the source's, unchanged")
        return f"the decoder only (train.target decoder): {decoder_mode}; {policy}"
    if target == "both" and decoder_mode:
        return f"the policy ({policy_mode}) and the decoder ({decoder_mode}) (train.target both)"
    return f"the policy: {policy_mode}"


def write_model_card(
    folder: Path, out: Path, *, family: Family | None, source: Path | None, checkpoint: Path, config_text: str, steps: int,
    mode: str, stages: list[Path], dtype: str | None, name: str, decoder: str, decoder_export: str | None = None,
) -> Path:
    """README.md (and the reward curve beside it) into `folder`, which becomes `out`; `family` None: an adapter.
    `mode`: what the run trained (`trained_row`); `decoder_export`: where the trained decoder is, if the run trained
    one."""
    run_dir = checkpoint.parent.parent
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if row.get("step", 0) <= steps] \
        if (run_dir / "metrics.jsonl").is_file() else []
    if rows:
        plot_reward_curve(rows, folder / REWARD_CURVE, title=f"Reward: {run_dir.name}, steps 1-{steps}")
    licence = source_licence(source)
    recipe_hash = hashlib.sha256(config_text.encode()).hexdigest()
    front = {"license": licence or "other", "tags": ["grpo-image", "text-to-image", "reinforcement-learning", "grpo"]}
    if source is not None:
        front["base_model"] = source.name
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {name}", "",
             f"{family.name if family else 'A LoRA adapter'} fine-tuned with GRPO (grpo-image) from "
             f"`{source.name if source else 'a model built in memory'}`.", "",
             "| | |", "|---|---|",
             f"| base model | `{source}` |" if source else "| base model | built in memory by the recipe |",
             f"| recipe | `config.yaml` of `{checkpoint.name}`, sha256 `{recipe_hash}` |",
             f"| steps | {steps} |",
             f"| trained | {mode} |",
             f"| decoder the rewards saw | {decoder} |",
             f"| stages | {' → '.join(f'`{stage}`' for stage in stages)} |",
             f"| weights | {dtype} (adapters merged in float32, cast once) |" if dtype else "| weights | peft adapter |",
             *([f"| trained decoder | {decoder_export} |"] if decoder_export else []),
             ""]
    table = reward_table(rows)
    if table:
        lines += ["## Reward", "", f"![reward curve]({REWARD_CURVE})", "",
                  f"| reward | step 1 | last {min(LAST_STEPS, len(rows))} steps |", "|---|---|---|"]
        lines += [f"| {reward} | {_fmt(first)} | {_fmt(last)} |" for reward, first, last in table]
        lines.append("")
    lines += ["## Loading", "", LOADING[family.name if family else "adapter"].format(out="path/to/this/folder"), ""]
    if decoder_export and not family:
        lines += [LOADING["decoder adapter"].format(out="path/to/this/folder"), ""]
    lines += ["## Licences", "",
              f"- The weights derive from `{source.name if source else 'the base model'}`: "
              + (f"its model card states `license: {licence}`." if licence else
                 "its model card states no licence; read the base model's terms."),
              *([f"- {FLUX_NOTE}"] if family and family.name == "X-Omni" else []), "",
              "## Upload", "", "```bash", f"hf upload YOUR_NAME/{name} {out} .",
              "# huggingface_hub < 1.0: huggingface-cli upload YOUR_NAME/" + f"{name} {out} .", "```", ""]
    card = folder / "README.md"
    card.write_text("\n".join(lines))
    return card


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def trainer_step(checkpoint: Path) -> int:
    """The step a checkpoint was taken after."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])
