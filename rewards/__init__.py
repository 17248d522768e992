"""Reward plugins: picklable classes built from config inside a reward worker (see rewards/README.md).

Each public file is one reward and may import only `grpo_image.core.types` and the small private helpers of this
package: `_image.py` (image conversions, the only place they live), `_text.py` (text targets and the text
metrics), `_chat.py` (the OpenAI-compatible client), `_clip.py` (transformers CLIP embeddings), `_ocr_engines.py`
and `_rebuild.py` (pickling as arguments). A reward's `__call__(images, prompts, metadata)` returns a
`RewardOutput` of raw float32 scores [n]; NaN means "not applicable".
"""
