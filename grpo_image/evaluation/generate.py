"""Sampling images from a base model or a saved checkpoint: `grpo-image sample`, and the first half of `eval`.

Seeds: image k of the prompt with id i, under seed s, is sampled from `derive_seeds(s, i, STREAM_EVAL_SAMPLE, n)[k-1]`
and decoded with `derive_seeds(s, i, STREAM_EVAL_DECODE, n)[k-1]`. The sampler draws each image from its own seeded
stream, so an image depends on (checkpoint, prompt, s, i, k) alone: not on the batch it was drawn in, not on n
(seed sequences are prefix-stable), and two checkpoints given the same seeds draw with the same uniforms, which is
what makes a before/after comparison paired. Every image's seeds are written next to it in `samples.jsonl`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from grpo_image.base.config import instantiate
from grpo_image.training.data import load_prompts
from grpo_image.decoders import decode_images
from grpo_image.training.distributed import training_device
from grpo_image.base.image_files import image_name, save_images
from grpo_image.base.progress import progress
from grpo_image.evaluation.longtext import is_longtext_file, read_longtext
from grpo_image.training.decoder_grpo import attach_trained_adapters, trained_decoder_folder
from grpo_image.training.saved_weights import load_stages, policy_folder
from grpo_image.core.sampling import SamplingSettings, resolve_checkpoint_sampling, sample_codes
from grpo_image.core.seeding import STREAM_EVAL_DECODE, STREAM_EVAL_SAMPLE, derive_seeds
from grpo_image.core.types import PromptRecord

MANIFEST = "samples.jsonl"


def load_prompt_set(path: str | Path) -> list[tuple[int, PromptRecord]]:
    """(id, record) pairs: a LongText file keeps its prompt_ids, any other prompt set numbers its prompts from 0."""
    if is_longtext_file(path):
        return read_longtext(path)
    return list(enumerate(load_prompts(path)))


def load_policy(cfg: DictConfig, checkpoint: str | Path | None = None):
    """The recipe's policy, with a checkpoint's weights when one is given (a peft adapter or full weights).

    `checkpoint`: a run folder (its newest complete checkpoint), a checkpoint folder (`checkpoints/step_N`), or a
    `policy/` folder (or any peft adapter folder, or a full-model folder with model.safetensors) directly.
    As in training, the stages the checkpoint continued (its run's `train.init_from`, and theirs) come first, their
    adapters attached, not merged; without a checkpoint, the recipe's `train.init_from` weights.
    """
    torch.manual_seed(cfg.seed)  # as in training, so that a seeded random policy is the same one
    policy = instantiate(cfg.policy)
    policy.model.to(training_device())  # the GPU when there is one, as in training
    if checkpoint is None:  # the weights the recipe's runs start from (and the base its adapters apply to)
        load_stages(policy, OmegaConf.select(cfg, "train.init_from", default=None), merge=False)
    else:  # the checkpoint and every stage it continued, as its run computed them; misfits refused in one line
        folder = policy_folder(checkpoint)  # a run folder's newest checkpoint, its weights hashed once
        load_stages(policy, folder, merge=False)
        _warn_if_trained_from_elsewhere(cfg, folder)
    policy.model.eval()
    return policy


def load_decoder(cfg: DictConfig, checkpoint: str | Path | None = None):
    """The recipe's decoder; from a checkpoint whose run trained the decoder too (a `decoder/` beside its `policy/`;
    without a checkpoint, the recipe's `train.init_from`), that run's decoder adapters on it, so that images are
    decoded as the run's last step decoded them."""
    decoder = instantiate(cfg.decoder)
    source = checkpoint if checkpoint is not None else OmegaConf.select(cfg, "train.init_from", default=None)
    folder = trained_decoder_folder(source)
    if folder is not None:
        attach_trained_adapters(decoder, folder)
    return decoder


def _warn_if_trained_from_elsewhere(cfg: DictConfig, folder: Path) -> None:
    """A checkpoint trained from another policy than the recipe's is loaded anyway, with a warning."""
    saved = folder.parent / "config.yaml"
    if not saved.is_file():
        return
    trained = OmegaConf.load(saved)
    theirs = OmegaConf.select(trained, "policy", default=None)
    if _plain(theirs) != _plain(cfg.policy):
        print(f"warning: {saved} was trained with another 'policy' than the recipe's ({_plain(theirs)!r}); "
              f"loading its weights into the recipe's policy", file=sys.stderr, flush=True)


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def image_seeds(seed: int, prompt_id: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample seeds, decode seeds) of images 1..n of one prompt: int64 [n] each."""
    return derive_seeds(seed, prompt_id, STREAM_EVAL_SAMPLE, n), derive_seeds(seed, prompt_id, STREAM_EVAL_DECODE, n)


@torch.no_grad()
def generate_images(
    policy, decoder, settings: SamplingSettings, items: list[tuple[int, PromptRecord]], out: str | Path, *,
    n: int = 4, seed: int = 0, batch_size: int = 16, label: str = "sampling", extra: dict | None = None,
) -> list[dict]:
    """Sample n images per prompt into `out` as {id:04d}_{k}.png, write `samples.jsonl`, return its rows.

    `extra` is added to every manifest row (e.g. the checkpoint the images came from).
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []  # one entry an image: (prompt_id, k, record, sample seed, decode seed)
    for prompt_id, record in items:
        sample_seeds, decode_seeds = image_seeds(seed, prompt_id, n)
        jobs += [(prompt_id, k + 1, record, sample_seeds[k], decode_seeds[k]) for k in range(n)]
    policy.model.eval()
    rows = []
    with progress(len(jobs), label) as advance:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            sample_seeds = torch.stack([job[3] for job in batch])  # [b]
            decode_seeds = torch.stack([job[4] for job in batch])  # [b]
            prompts = [job[2].prompt for job in batch]
            codes, _ = sample_codes(policy, prompts, sample_seeds, settings)  # [b, L]
            images = decode_images(decoder, codes.cpu().numpy(), policy.grid, decode_seeds.numpy(), prompts)
            # images: uint8 [b, H, W, 3]
            names = [image_name(job[0], job[1]) for job in batch]
            save_images(images, [out / name for name in names])
            for (prompt_id, k, record, s_seed, d_seed), name in zip(batch, names):
                rows.append({"file": name, "prompt_id": prompt_id, "k": k, "prompt": record.prompt,
                             "metadata": record.metadata, "seed": seed, "sample_seed": int(s_seed),
                             "decode_seed": int(d_seed), **(extra or {})})
            advance(len(batch))
    with open(out / MANIFEST, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


def sample(cfg: DictConfig, prompts: str | Path, out: str | Path, *, checkpoint: str | Path | None = None,
           n: int = 4, seed: int | None = None, batch_size: int = 16) -> list[dict]:
    """`grpo-image sample`: the recipe's policy (or a checkpoint's) draws n images per prompt into `out`."""
    items = load_prompt_set(prompts)
    policy = load_policy(cfg, checkpoint)
    decoder = load_decoder(cfg, checkpoint)
    resolve_checkpoint_sampling(cfg.sampling, policy)  # null keys: the checkpoint's own
    settings = SamplingSettings.from_config(cfg.sampling)
    seed = cfg.seed if seed is None else seed
    extra = {"checkpoint": None if checkpoint is None else str(checkpoint)}
    return generate_images(policy, decoder, settings, items, out, n=n, seed=seed, batch_size=batch_size,
                           label="sampling", extra=extra)
