"""Byte-level tokenizers built offline, for the tiny policies of every family.

Every tiny policy needs a real fast tokenizer (it saves and loads like a checkpoint's) laid out as its family's
real one is, and none can be downloaded. A byte-level BPE with no merges does it: each of the 256 byte-level tokens
is a token, so any text, Chinese included, encodes; the caller orders the vocabulary (bytes, specials, image codes)
as its family does, and names the tokens that are never split.
"""

from __future__ import annotations

BYTE_TOKENS = 256
PAD, EOS = "<pad>", "<eos>"  # the tiny text layouts' pad and end tokens


def byte_alphabet() -> list[str]:
    """The 256 byte-level tokens, in the order every tiny vocabulary here lists them."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def byte_level_tokenizer(vocab: list[str], special_tokens: list[str], prepend_bos: str | None = None, **kwargs):
    """A fast tokenizer whose token `vocab[i]` has id i; `special_tokens` are never split; `prepend_bos` adds that
    token before every encoded text (as Janus's tokenizer does); `kwargs` go to PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(vocab)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(special_tokens)
    if prepend_bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{prepend_bos} $A", special_tokens=[(prepend_bos, vocab.index(prepend_bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
