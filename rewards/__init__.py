"""Reward plugins: picklable classes built from config inside a reward worker.

Each file is standalone and may import only `grpo_image.types` and `rewards._image` (the one place image
conversions live), so a plugin can be copied, read or replaced on its own. A reward's `__call__(images,
prompts, metadata)` returns a `RewardOutput` of raw float32 scores [n]; NaN means "not applicable".
"""
