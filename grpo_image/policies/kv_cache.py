"""The sampler's KV cache: allocated once per sampler call, attended only over the tokens it holds.

transformers' static cache keeps each layer's keys and values in [R, kv_heads, max_len, D] buffers written in place,
so a sampler call never grows or copies its cache, and a decode step's shapes can stay fixed (compiled, captured as
a CUDA graph). But its layers hand the attention the whole buffer: every step attends over max_len positions, the
prompt's padding and the positions not written yet included (masked, so they add nothing but time), and the prefill
attends over the whole buffer too. Attending over P + L positions at each of L steps is about twice the work of a
growing cache, which attends over what it holds.

`CacheViews` writes into the same buffers and hands the attention a view of their first `width` positions, which the
sampler sets before each forward (`attend_over`):
- the prefill: exactly the prompt's P positions;
- eager decode steps (bucket 1): exactly the tokens held once the step's own is written, what a growing cache attends
  over, without its concatenations. The shape changes every step, so the cache says it is not compileable, which
  lets transformers skip the mask when no row is padded, as it does for a growing cache;
- compiled decode steps (bucket > 1): the tokens held rounded up to a multiple of `bucket`, capped at max_len, so a
  call's steps take ceil(max_len / bucket) shapes, each its own compiled graph; the causal mask hides the positions
  of the view not written yet.

Same numbers as a growing cache: the keys and values are the same, and a masked position's score is -inf before the
softmax, so its weight is exactly 0 and it adds exactly 0 to the weighted sum. What a wider view can change is only
the order in which the attention kernel sums the weights (its blocks over the keys depend on their count): the
rounding of one sum over at most max_len terms, which the sampler's tolerances already count.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

class ViewedLayer(StaticLayer):
    """A full-attention StaticLayer whose `update` writes into the whole buffer and returns its first `width`
    positions, and whose mask is as wide."""

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.width = max_cache_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # [R, kv_heads, max_len, D] each
        return keys[:, :, : self.width], values[:, :, : self.width]  # [R, kv_heads, width, D] views, no copy

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv length, kv offset) of the mask transformers builds: the view's width from position 0."""
        return self.width, 0


class CacheViews(StaticCache):
    """transformers' StaticCache for `config`, its full-attention layers attending over views (`attend_over`).

    Other layer kinds (sliding-window, linear attention) keep transformers' own static layers: they already bound
    what they attend over.
    """

    def __init__(self, config, max_cache_len: int, bucket: int = 1) -> None:
        if bucket < 1:
            raise ValueError(f"KV cache view bucket must be >= 1 position, got {bucket}")
        super().__init__(config=config, max_cache_len=max_cache_len)
        self.max_cache_len, self.bucket = max_cache_len, bucket
        self.layers = [ViewedLayer(max_cache_len) if type(layer) is StaticLayer else layer for layer in self.layers]

    @property
    def is_compileable(self) -> bool:
        """Only bucketed views keep a step's shapes fixed; transformers skips a decode step's mask when this is False
        and no row is padded, as for a growing cache."""
        return self.bucket > 1 and super().is_compileable

    def attend_over(self, held: int, exact: bool = False) -> int:
        """Set the view for the next forward, after which the cache holds `held` tokens per row: `held` positions when
        `exact` or the bucket is 1, else `held` rounded up to a multiple of the bucket (at most max_len). Returns the
        view's width, the width of the 2-D attention mask to pass with it."""
        if not 0 < held <= self.max_cache_len:
            raise ValueError(f"KV cache of {self.max_cache_len} tokens per row cannot hold {held}")
        width = held if exact else min(self.max_cache_len, -(-held // self.bucket) * self.bucket)
        for layer in self.layers:
            if isinstance(layer, ViewedLayer):
                layer.width = width
        return width
