"""UnifiedReward, VLMAlignment and the VLM OCR reader against a chat-completions server on 127.0.0.1.

The server (tests/rewards_servers.py) checks what a real vLLM/sglang server would need: path, bearer token, one
data-URL image and one text part. Each test asserts numbers derived by hand from what the server answered.
"""

from __future__ import annotations

import logging
import math
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from rewards._chat import ChatError
from rewards.ocr import OCR
from rewards.unified_reward import UnifiedReward
from rewards.vlm_alignment import VLMAlignment
from tests.rewards_servers import ChatServer, Reply, completion

FAST = dict(backoff=0.01, timeout=5.0)  # keep retries quick in tests


def _images(n: int, h: int = 8, w: int = 12) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)  # uint8 [n, h, w, 3]


def _by_prompt(answers: dict[str, str]):
    """A reply function answering the content mapped to the prompt found in the request text."""

    def reply(seen, hit):
        for prompt, content in answers.items():
            if f"[{prompt}]" in seen.text:
                return Reply(completion(content))
        return Reply(completion("I have no idea."))

    return reply


# ---------------------------------------------------------------- UnifiedReward parsing


def test_unified_reward_v15_parses_final_score_and_counts_garbage():
    answers = {
        "a cat": "The cat is there.\nFinal Score: 4",  # 4 / 5 = 0.8
        "a dog": "Final Score: 2.5",  # 2.5 / 5 = 0.5
        "a fox": "What a lovely picture!",  # no score: NaN, counted
        "a cow": "Final Score: 7",  # outside 1..5: NaN, counted
        "a hen": "Final Score: 1\n... on reflection, Final Score: 3",  # flow_grpo's re.search: the first, 0.2
    }
    images = _images(5)
    with ChatServer(_by_prompt(answers)) as server:
        out = UnifiedReward(server.base_url, rubric="v1.5", **FAST)(images, list(answers), [{}] * 5)
    assert not server.errors
    assert out.scores.dtype == np.float32
    np.testing.assert_allclose(out.scores[[0, 1, 4]], [0.8, 0.5, 0.2], rtol=1e-6)  # float32 score of an exact ratio: off by at most half a float32 ULP (6e-8 relative)
    assert np.isnan(out.scores[2]) and np.isnan(out.scores[3])
    assert out.info == {"unparsed": 2.0}
    # The server saw each image as flow_grpo sends it (resized to 512x512, then lossless PNG) and the rubric with
    # the caption slot filled in.
    for seen in server.seen:
        prompt = next(p for p in answers if f"Text Caption: [{p}]" in seen.text)
        sent = Image.fromarray(images[list(answers).index(prompt)]).resize((512, 512))
        np.testing.assert_array_equal(seen.image, np.asarray(sent))
        assert seen.image_format == "png" and seen.body["model"] == "UnifiedReward"
        assert seen.body["temperature"] == 0.0 and "Final Score:" in seen.text


def test_unified_reward_20_three_axes_and_field_choice():
    content = "Alignment Score (1-5): 4\nCoherence Score (1-5): 3.5\nStyle Score (1-5): 5"
    with ChatServer(lambda seen, hit: Reply(completion(content))) as server:
        images = _images(1)
        mean = UnifiedReward(server.base_url, rubric="2.0", **FAST)(images, ["x"], [{}])
        style = UnifiedReward(server.base_url, rubric="2.0", fields=["style"], **FAST)(images, ["x"], [{}])
        acs = UnifiedReward(server.base_url, rubric="v1.5_acs", fields=["alignment"], **FAST)(images, ["x"], [{}])
    np.testing.assert_allclose(mean.scores, [(4 + 3.5 + 5) / 3 / 5], rtol=1e-6)  # 12.5 / 15 = 0.8333 in float32
    np.testing.assert_allclose(style.scores, [1.0])  # 5 / 5: exact
    np.testing.assert_allclose(acs.scores, [0.8])  # 4 / 5 in float32: within numpy's default rtol 1e-7 (6e-8)
    assert "Alignment Score (1-5): X" in server.seen[0].text  # the required answer format is sent verbatim


def test_unified_reward_custom_template_and_validation():
    with ChatServer(lambda seen, hit: Reply(completion("Rating: 8"))) as server:
        reward = UnifiedReward(
            server.base_url, template="Rate <{prompt}> from 0 to 10 as 'Rating: n'.",
            score_patterns={"rating": r"Rating: (\d+)"}, minimum=0, maximum=10, **FAST,
        )
        out = reward(_images(1), ["sunset"], [{}])
        no_slot = UnifiedReward(server.base_url, template="Rate this image.", score_patterns={"r": r"Rating: (\d+)"},
                                minimum=0, maximum=10, **FAST)(_images(1), ["ignored"], [{}])
    assert server.seen[0].text == "Rate <sunset> from 0 to 10 as 'Rating: n'."
    assert server.seen[1].text == "Rate this image."  # a template without a slot is sent as it is
    assert out.scores[0] == pytest.approx(0.8) and no_slot.scores[0] == pytest.approx(0.8)  # 8 / 10
    with pytest.raises(ValueError, match="unknown rubric"):
        UnifiedReward("http://127.0.0.1:1/v1", rubric="v9")
    with pytest.raises(ValueError, match="exactly one group"):
        UnifiedReward("http://127.0.0.1:1/v1", template="x", score_patterns={"r": "Rating: \\d+"})
    with pytest.raises(ValueError, match="fields"):
        UnifiedReward("http://127.0.0.1:1/v1", rubric="v1.5", fields=["style"])
    with pytest.raises(ValueError, match="match"):
        UnifiedReward("http://127.0.0.1:1/v1", match="middle")


# ---------------------------------------------------------------- retries, timeout, concurrency


@pytest.mark.parametrize("status", [500, 429, 503, 408])
def test_retries_transient_statuses(status):
    def reply(seen, hit):
        return Reply({"error": "busy"}, status=status) if hit <= 2 else Reply(completion("Final Score: 5"))

    with ChatServer(reply) as server:
        out = UnifiedReward(server.base_url, max_retries=3, **FAST)(_images(1), ["x"], [{}])
    assert server.hits == 3  # two failures, then the answer
    assert out.scores.tolist() == [1.0]


def test_gives_up_after_max_retries_with_the_status_and_sample():
    with ChatServer(lambda seen, hit: Reply({"error": "down"}, status=502)) as server:
        with pytest.raises(ChatError, match=r"sample 0: .*HTTP 502 after 2 retries"):
            UnifiedReward(server.base_url, max_retries=2, **FAST)(_images(1), ["x"], [{}])
    assert server.hits == 3  # the first attempt and two retries


def test_client_error_is_not_retried():
    with ChatServer(lambda seen, hit: Reply({"error": "bad model"}, status=404)) as server:
        with pytest.raises(ChatError, match="HTTP 404"):
            UnifiedReward(server.base_url, max_retries=3, **FAST)(_images(1), ["x"], [{}])
    assert server.hits == 1


def test_timeout_is_honoured_and_retried():
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 5"), delay=3.0)) as server:
        reward = UnifiedReward(server.base_url, timeout=0.3, max_retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(ChatError, match="timeout 0.3s"):
            reward(_images(1), ["x"], [{}])
        elapsed = time.monotonic() - start
    assert elapsed < 2.0  # two attempts of 0.3 s, far less than the server's 3 s
    assert server.hits == 2


def test_connection_refused_is_an_error_after_retries():
    reward = UnifiedReward("http://127.0.0.1:9/v1", max_retries=1, backoff=0.01, timeout=1.0)  # port 9: nothing
    with pytest.raises(ChatError, match="sample 0"):
        reward(_images(1), ["x"], [{}])


def test_concurrency_is_bounded():
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 3"), delay=0.15)) as server:
        out = UnifiedReward(server.base_url, max_concurrency=3, **FAST)(_images(9), ["x"] * 9, [{}] * 9)
    assert server.hits == 9 and server.max_in_flight == 3  # bounded, and the bound is used
    np.testing.assert_allclose(out.scores, [0.6] * 9)  # float32 of 3 / 5: within numpy's default rtol 1e-7 (half a ULP is 6e-8 relative)


# ---------------------------------------------------------------- API key


def test_api_key_is_sent_but_never_logged_repr_or_pickled(monkeypatch, caplog):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("GRPO_TEST_JUDGE_KEY", secret)
    caplog.set_level(logging.DEBUG)
    reply = lambda seen, hit: Reply(completion("Final Score: 4")) if hit > 1 else Reply({}, status=500)  # noqa: E731
    with ChatServer(reply, api_key=secret) as server:
        reward = UnifiedReward(server.base_url, api_key_env="GRPO_TEST_JUDGE_KEY", **FAST)
        out = reward(_images(1), ["x"], [{}])
    assert not server.errors and server.seen[0].authorization == f"Bearer {secret}"
    assert out.scores.tolist() == [pytest.approx(0.8)]  # float32 of 4 / 5: 1.5e-8 off, approx's rel 1e-6
    assert "Retry" in caplog.text  # urllib3 logged the retry: the log was captured, and the key is not in it
    assert secret not in caplog.text
    assert secret not in repr(reward) and "GRPO_TEST_JUDGE_KEY" in repr(reward)
    assert secret.encode() not in pickle.dumps(reward)
    monkeypatch.delenv("GRPO_TEST_JUDGE_KEY")
    with pytest.raises(ChatError, match="GRPO_TEST_JUDGE_KEY"):
        reward(_images(1), ["x"], [{}])


def test_wrong_key_is_rejected_by_the_server(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_JUDGE_KEY", "wrong")
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 4")), api_key="right") as server:
        with pytest.raises(ChatError, match="HTTP 400"):
            UnifiedReward(server.base_url, api_key_env="GRPO_TEST_JUDGE_KEY", **FAST)(_images(1), ["x"], [{}])
    assert server.errors == ["missing or wrong bearer token"]


# ---------------------------------------------------------------- VLMAlignment


def test_vlm_alignment_reads_p_yes_from_first_token_logprobs():
    def reply(seen, hit):
        if "red square" in seen.text:  # P("Yes") = 0.7: VQAScore's answer token exactly, " yes" is another token
            return Reply(completion("Yes", [("Yes", math.log(0.7)), ("No", math.log(0.2)), (" yes", math.log(0.05))]))
        if "blue circle" in seen.text:  # "Yes" is not among the top logprobs: 0
            return Reply(completion("No", [("No", math.log(0.9)), ("The", math.log(0.05))]))
        return Reply(completion("Yes"))  # no logprobs at all: NaN, counted

    with ChatServer(reply) as server:
        reward = VLMAlignment(server.base_url, model="qwen2.5-vl", **FAST)
        out = reward(_images(3), ["a red square", "a blue circle", "a green hat"], [{}] * 3)
    assert not server.errors
    # P(Yes) from the server's log-probs (exp of log 0.7 in float64, then float32): within 1e-7 of 0.7
    np.testing.assert_allclose(out.scores[:2], [0.7, 0.0], atol=1e-6)
    assert np.isnan(out.scores[2]) and out.info == {"unparsed": 1.0}
    body = server.seen[0].body
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["model"] == "qwen2.5-vl"
    texts = sorted(seen.text for seen in server.seen)
    assert texts[0] == 'Does this figure show "a blue circle"? Please answer yes or no.'


def test_vlm_alignment_template_override():
    with ChatServer(lambda seen, hit: Reply(completion("Yes", [("Yes", 0.0)]))) as server:
        out = VLMAlignment(server.base_url, "m", template="Is this {prompt}?", **FAST)(_images(1), ["art"], [{}])
    assert server.seen[0].text == "Is this art?" and out.scores.tolist() == [1.0]  # exp(0) = 1


# ---------------------------------------------------------------- OCR through a VLM server


def test_ocr_vlm_engine_reads_text_from_the_server():
    with ChatServer(lambda seen, hit: Reply(completion(" Hello World \n"))) as server:
        ocr = OCR(engine="vlm", engine_options={"base_url": server.base_url, "model": "reader", **FAST})
        out = ocr(_images(3), ['a sign "Hello World"', 'a sign "Hello Word"', "no text"], [{}] * 3)
    # "helloworld" in "helloworld": 1; "helloword" is not a substring: levenshtein 1 over 9 letters -> 8/9.
    np.testing.assert_allclose(out.scores[:2], [1.0, 8 / 9], rtol=1e-6)  # float32 score of an exact ratio: off by at most half a float32 ULP (6e-8 relative)
    assert np.isnan(out.scores[2]) and server.hits == 2  # no request for the sample without a target


# ---------------------------------------------------------------- pickling


def test_server_rewards_pickle_round_trip():
    rewards = [
        UnifiedReward("http://127.0.0.1:1/v1", rubric="2.0", fields=["alignment"], api_key_env="K"),
        VLMAlignment("http://127.0.0.1:1/v1", "m", template="Is it {prompt}?"),
        OCR(engine="vlm", metric="accuracy", engine_options={"base_url": "http://127.0.0.1:1/v1", "model": "m"}),
    ]
    for reward in rewards:
        clone = pickle.loads(pickle.dumps(reward))
        assert type(clone) is type(reward) and repr(clone) == repr(reward)
    content = "Alignment Score (1-5): 2\nCoherence Score (1-5): 1\nStyle Score (1-5): 1"
    with ChatServer(lambda seen, hit: Reply(completion(content))) as server:
        reward = UnifiedReward(server.base_url, rubric="2.0", fields=["alignment"], **FAST)
        clone = pickle.loads(pickle.dumps(reward))
        assert clone(_images(1), ["x"], [{}]).scores.tolist() == [pytest.approx(0.4)]  # 2 / 5


# ---------------------------------------------------------------- request shape


def test_jpeg_images_and_input_checks():
    images = np.full((1, 16, 16, 3), (200, 40, 40), dtype=np.uint8)  # flat red: JPEG keeps it within a few levels
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 5"))) as server:
        UnifiedReward(server.base_url, image_format="jpeg", **FAST)(images, ["x"], [{}])
        with pytest.raises(ValueError, match="1 images but 2 prompts"):
            UnifiedReward(server.base_url, **FAST)(images, ["x", "y"], [{}, {}])
    assert server.hits == 1 and server.seen[0].image_format == "jpeg"
    # JPEG (quality 95) of a flat colour: the DCT's DC term is quantised by at most a few levels per channel,
    # and chroma subsampling of a flat block adds nothing; 8 levels still tells JPEG from a wrong image
    assert np.abs(server.seen[0].image.astype(int) - images[0, 0, 0]).max() <= 8  # resized to 512x512 first
    with pytest.raises(ValueError, match="image_format"):
        UnifiedReward("http://127.0.0.1:1/v1", image_format="webp")
    with pytest.raises(ValueError, match="http"):
        VLMAlignment("localhost:8000", "m")
