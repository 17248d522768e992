"""What the sampler's distribution looks like at every code position, for tests that check the filters' effect."""

import torch

from grpo_image.core.sampling import SamplingSettings, guided_logits, left_pad, policy_rows, tempered


@torch.no_grad()
def position_logits(policy, prompts: list[str], codes: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The guided, tempered (unfiltered) logits before every code of `codes` [N, L]: [N, L, V]."""
    ids, mask = left_pad(policy_rows(policy, prompts, settings.uses_cfg), policy.pad_token_id, policy.device)
    steps = policy.codes_to_ids(codes[:, :-1]).repeat(settings.rows_per_prompt, 1)  # [R, L-1]
    positions = torch.cat([policy.prefix_positions(mask), policy.code_positions(mask, 0, codes.shape[1] - 1)], -1)
    full = torch.cat([mask, torch.ones_like(steps)], dim=1)  # [R, P+L-1]
    hidden, _ = policy.forward_hidden(torch.cat([ids, steps], 1), full, positions)  # [R, P+L-1, H]
    logits = policy.image_logits(hidden[:, ids.shape[1] - 1 :]).float()  # [R, L, V]
    return tempered(guided_logits(logits, settings.cfg_scale) if settings.uses_cfg else logits, settings.temperature)
