"""The tiny policy: X-Omni's token layout, an offline tokenizer, and save/load like a real checkpoint."""

import torch

from grpo_image.policies.tiny import build_tiny_tokenizer, tiny_policy
from grpo_image.policies.xomni import EOM, IMAGE, SOM


def test_vocabulary_layout_is_text_then_codes_then_specials():
    tokenizer = build_tiny_tokenizer(num_codes=5)
    vocab = tokenizer.get_vocab()
    # 256 byte tokens, <pad>, <eos>: text ids 0..257; codes 258..262; then <SOM>, <EOM>, <IMAGE>
    assert [vocab[f"<img_{k}>"] for k in range(5)] == [258, 259, 260, 261, 262]
    assert [vocab[SOM], vocab[EOM], vocab[IMAGE]] == [263, 264, 265]
    assert len(tokenizer) == 266 and tokenizer.pad_token_id == 256


def test_prompt_ends_with_the_xomni_image_prefix_and_any_text_encodes():
    policy = tiny_policy(num_codes=5, grid=(3, 7), hidden_size=16, num_layers=1)
    (ids,) = policy.encode(["a red square"])
    assert policy.tokenizer.decode(ids) == "a red square<SOM>3 7<IMAGE>"
    (chinese,) = policy.encode(["红色的方块"])
    assert policy.tokenizer.decode(chinese) == "红色的方块<SOM>3 7<IMAGE>"
    assert len(chinese) == 5 * 3 + 5  # 3 UTF-8 bytes per character, then <SOM> 3 ' ' 7 <IMAGE>
    (empty,) = policy.encode(["a red square"], unconditional=True)
    assert policy.tokenizer.decode(empty) == "<SOM>3 7<IMAGE>"


def test_same_seed_same_weights_and_save_load_round_trip(tmp_path):
    policy = tiny_policy(num_codes=6, grid=(2, 2), hidden_size=16, num_layers=1, seed=7)
    twin = tiny_policy(num_codes=6, grid=(2, 2), hidden_size=16, num_layers=1, seed=7)
    other = tiny_policy(num_codes=6, grid=(2, 2), hidden_size=16, num_layers=1, seed=8)
    assert torch.equal(policy.model.lm_head.weight, twin.model.lm_head.weight)
    assert not torch.equal(policy.model.lm_head.weight, other.model.lm_head.weight)
    policy.save_pretrained(tmp_path)
    loaded = tiny_policy(path=str(tmp_path), grid=(2, 2))
    assert (loaded.image_token_offset, loaded.num_codes) == (258, 6)  # read back from the tokenizer
    for (name, a), (_, b) in zip(policy.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.encode(["x"]) == policy.encode(["x"])
