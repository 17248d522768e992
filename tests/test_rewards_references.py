"""Every server-backed reward against its reference: the judge request as the reference sends it, byte for byte.

The reference texts below are copied from the reference repositories (repository, path and commit in each
rewards/instructions/*.yaml file, repeated here), as Python literals in the references' own string form, so that
this file and the data files are two independent copies: a request rendered from the data file must equal the
reference's text with the same prompt, and the image must arrive at the reference client's size and encoding
(the server on 127.0.0.1 records the request body). The score parsers and formulas are checked on string tables
against the references' own parsers and formulas, re-stated here.
"""

from __future__ import annotations

import base64
import io
import math
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from rewards._chat import INSTRUCTIONS, instruction_names, load_instruction
from rewards.ocr import OCR
from rewards.unified_reward import RUBRICS, UnifiedReward, parse_scores
from rewards.vlm_alignment import VARIANTS, VLMAlignment
from tests.rewards_servers import ChatServer, Reply, completion

FAST = dict(backoff=0.01, timeout=5.0)
PROMPT = 'A neon sign reading "OPEN 24/7" above a café door, rain on the glass'  # quotes, a slash, an accent

# yifan123/flow_grpo flow_grpo/rewards.py @ ac4c86e8cae021841f1fde853d340e0db67690dd, unifiedreward_score_sglang
# (CodeGoat24/UnifiedReward sglang_llava/sglang_inference.py holds the same string)
FLOW_GRPO_UNIFIED_REWARD_V15 = (
    '<image>\n'
    'You are given a text caption and a generated image based on that caption. Your task is to evaluate '
    'this image based on two key criteria:\n'
    '1. Alignment with the Caption: Assess how well this image aligns with the provided caption. '
    'Consider the accuracy of depicted objects, their relationships, and attributes as described in the '
    'caption.\n'
    '2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail '
    'preservation, color accuracy, and overall aesthetic appeal.\n'
    "Based on the above criteria, assign a score from 1 to 5 after 'Final Score:'.\n"
    'Your task is provided as follows:\n'
    'Text Caption: [{prompt}]'
)
# CodeGoat24/UnifiedReward @ ff6f520247a2d36e2aff7b2ba53a935afd437f66,
# inference_qwen/image_generation/qwen_point_score_image_generation.py
UNIFIED_REWARD_QWEN_POINT = (
    'You are given a text caption and a generated image based on that caption. Your task is to evaluate '
    'this image based on two key criteria:\n'
    '1. Alignment with the Caption: Assess how well this image aligns with the provided caption. '
    'Consider the accuracy of depicted objects, their relationships, and attributes as described in the '
    'caption.\n'
    '2. Overall Image Quality: Examine the visual quality of this image, including clarity, detail '
    'preservation, color accuracy, and overall aesthetic appeal.\n'
    'Extract key elements from the provided text caption, evaluate their presence in the generated image '
    "using the format: 'element (type): value' (where value=0 means not generated, and value=1 means "
    "generated), and assign a score from 1 to 5 after 'Final Score:'.\n"
    'Your task is provided as follows:\n'
    'Text Caption: [{prompt}]'
)
# ... inference_qwen/image_generation/qwen_point_score_ACS_image_generation.py
UNIFIED_REWARD_QWEN_ACS = (
    'You are presented with a generated image and its associated text caption. Your task is to analyze '
    'the image across multiple dimensions in relation to the caption. Specifically:\n'
    '\n'
    '1. Evaluate each word in the caption based on how well it is visually represented in the image. '
    'Assign a numerical score to each word using the format:\n'
    '   Word-wise Scores: [["word1", score1], ["word2", score2], ..., ["wordN", scoreN], '
    '["[No_mistakes]", scoreM]]\n'
    '   - A higher score indicates that the word is less well represented in the image.\n'
    '   - The special token [No_mistakes] represents whether all elements in the caption were correctly '
    'depicted. A high score suggests no mistakes; a low score suggests missing or incorrect elements.\n'
    '\n'
    '2. Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n'
    '- Alignment Score: How well the image matches the caption in terms of content.\n'
    '- Coherence Score: How logically consistent the image is (absence of visual glitches, object '
    'distortions, etc.).\n'
    '- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n'
    '\n'
    'Output your evaluation using the format below:\n'
    '\n'
    '---\n'
    '\n'
    'Word-wise Scores: [["word1", score1], ..., ["[No_mistakes]", scoreM]]\n'
    '\n'
    'Alignment Score (1-5): X\n'
    'Coherence Score (1-5): Y\n'
    'Style Score (1-5): Z\n'
    '\n'
    'Your task is provided as follows:\n'
    'Text Caption: [{prompt}]'
)
# ... inference_llava/image_generation/point_score_ACS_image_generation.py: the Qwen script's text after LLaVA's
# image placeholder, word for word
UNIFIED_REWARD_LLAVA_ACS = '<image>\n' + UNIFIED_REWARD_QWEN_ACS
# ... inference_qwen/UnifiedReward-2.0-inference/point_score_ACS_image_generation.py (`problem`)
UNIFIED_REWARD_20_ACS = (
    'You are presented with a generated image and its associated text caption. Your task is to analyze '
    'the image across multiple dimensions in relation to the caption. Specifically:\n'
    'Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n'
    '- Alignment Score: How well the image matches the caption in terms of content.\n'
    '- Coherence Score: How logically consistent the image is (absence of visual glitches, object '
    'distortions, etc.).\n'
    '- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n'
    '\n'
    'Output your evaluation using the format below:\n'
    '\n'
    'Alignment Score (1-5): X\n'
    'Coherence Score (1-5): Y\n'
    'Style Score (1-5): Z\n'
    '\n'
    'Your task is provided as follows:\n'
    'Text Caption: [{prompt}]'
)
# yifan123/flow_grpo flow_grpo/qwenvl.py @ ac4c86e8cae021841f1fde853d340e0db67690dd, QwenVLScorer.task
FLOW_GRPO_QWENVL_AESTHETIC = (
    '\n'
    'Your role is to evaluate the aesthetic quality score of given images.\n'
    '1. Bad: Extremely blurry, underexposed with significant noise, indiscernible\n'
    'subjects, and chaotic composition.\n'
    '2. Poor: Noticeable blur, poor lighting, washed-out colors, and awkward\n'
    'composition with cut-off subjects.\n'
    '3. Fair: In focus with adequate lighting, dull colors, decent composition but\n'
    'lacks creativity.\n'
    '4. Good: Sharp, good exposure, vibrant colors, thoughtful composition with\n'
    'a clear focal point.\n'
    '5. Excellent: Exceptional clarity, perfect exposure, rich colors, masterful\n'
    'composition with emotional impact.\n'
    '\n'
    'Please first provide a detailed analysis of the evaluation process, including the criteria for '
    'judging aesthetic quality, within the <Thought> tag. Then, give a final score from 1 to 5 within '
    'the <Score> tag.\n'
    '<Thought>\n'
    '[Analyze the evaluation process in detail here]\n'
    '</Thought>\n'
    '<Score>X</Score>\n'
)
# linzhiqiu/t2v_metrics t2v_metrics/models/vqascore_models/clip_t5_model.py @ 10d549b369861aab49e7dbe9f33a469a17ef1129
VQASCORE_CLIP_FLANT5 = (
    'Does this figure show "{}"? Please answer yes or no.'
)
# linzhiqiu/t2v_metrics t2v_metrics/models/vqascore_models/qwen2vl_model.py @ 6ecb74f92028f42c7e64546d3a71e98c8c73068f
VQASCORE_QWEN2VL = (
    'Does this figure show "{}"? Please answer Yes or No.'
)
# CaraJ7/T2I-R1 src/t2i-r1/src/utils/reward_orm.py @ 2d9d4d1af4119953b3a8541f914f85481d7e1e76 (DEFAULT_IMAGE_TOKEN
# is "<image>" in its LLaVA-NeXT llava/constants.py)
T2I_R1_ORM = (
    '{DEFAULT_IMAGE_TOKEN} This image is generated by a prompt: {prompt}. Does this image accurately '
    'represent the prompt? Please answer yes or no without explanation.'
)
# X-Omni-Team/X-Omni textbench/evaluate_text_reward.py @ 2b8237bb3789638c290eeda3e83ed81bd3652c3b, qwen_prompt
XOMNI_LONGTEXT_OCR = (
    'Recognize the text in the image, only reply with the text content, but avoid repeating previously '
    "mentioned content. If no text is recognized, please reply with 'No text recognized'."
)


def _image(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(1, h, w, 3), dtype=np.uint8)  # uint8 [1, h, w, 3]


def _sent(seen) -> tuple[str, bytes]:
    """The data URL's header and the encoded image bytes of a recorded request."""
    head, payload = seen.body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)
    return head, base64.b64decode(payload)


def _encoded(image: np.ndarray, fmt: str, size: tuple[int, int] | None = None) -> bytes:
    """The reference clients' encodings: flow_grpo's `Image.fromarray(image).resize((512, 512))` then
    `save(format="PNG")`; UnifiedReward-2.0's `img.convert("RGB").save(format="JPEG", quality=95)`."""
    pil = Image.fromarray(image)
    if size is not None:
        pil = pil.resize(size)  # PIL's default filter for RGB, as the reference calls it
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- the data files


def test_every_instruction_file_names_its_source_and_licence_and_is_used():
    used = set(RUBRICS.values()) | set(VARIANTS.values()) | {"xomni_longtext_ocr"}
    assert set(instruction_names()) == used  # no file without a reward, no reward without its file
    for name in instruction_names():
        data = load_instruction(name)
        source = data["source"]
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", source["repository"]) and source["path"], name
        assert re.fullmatch(r"[0-9a-f]{40}", source["commit"]), name
        assert data["licence"] and data["image"]["format"] in ("png", "jpeg"), name
        # the YAML scalar loads to the same text with any YAML 1.1 loader: no tabs, no trailing spaces in the file
        raw = (INSTRUCTIONS / f"{name}.yaml").read_text(encoding="utf-8")
        assert "\t" not in raw and yaml.safe_load(raw)["template"] == data["template"]


# ---------------------------------------------------------------- UnifiedReward: the requests

RUBRIC_CASES = [
    # rubric, the reference's text, its image (format, resize), max_tokens in the request (None: not sent)
    ("v1.5", FLOW_GRPO_UNIFIED_REWARD_V15, ("png", (512, 512)), None),
    ("v1.5_acs", UNIFIED_REWARD_LLAVA_ACS, ("png", None), 4096),
    ("qwen", UNIFIED_REWARD_QWEN_POINT, ("png", None), 512),
    ("qwen_acs", UNIFIED_REWARD_QWEN_ACS, ("png", None), 4096),
    ("2.0", UNIFIED_REWARD_20_ACS, ("jpeg", None), 4096),
    ("qwenvl_aesthetic", FLOW_GRPO_QWENVL_AESTHETIC, ("png", None), 2048),
]


@pytest.mark.parametrize("rubric, reference, image_format, max_tokens", RUBRIC_CASES)
def test_unified_reward_sends_the_references_text_image_and_budget(rubric, reference, image_format, max_tokens):
    image = _image(len(rubric))
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 3"))) as server:
        UnifiedReward(server.base_url, rubric=rubric, **FAST)(image, [PROMPT], [{}])
    assert not server.errors and len(server.seen) == 1
    seen = server.seen[0]
    # the reference's f-string evaluated with the same prompt (the aesthetic rubric has no slot: sent as it is)
    assert seen.text == reference.format(prompt=PROMPT)
    assert seen.text.encode("utf-8") == reference.format(prompt=PROMPT).encode("utf-8")  # byte for byte
    fmt, size = image_format
    head, data = _sent(seen)
    assert head == f"data:image/{fmt};base64"
    if size is not None or fmt == "jpeg":  # the reference client encodes itself: the same bytes
        assert data == _encoded(image[0], fmt, size)
    else:  # the reference hands the image to the model's processor: the same pixels, losslessly
        assert seen.image.shape == image[0].shape and np.array_equal(seen.image, image[0])
    assert seen.body.get("max_tokens") == max_tokens and seen.body["temperature"] == 0.0


def test_unified_reward_image_options_override_the_rubrics():
    image = _image(7, 30, 20)
    with ChatServer(lambda seen, hit: Reply(completion("Final Score: 3"))) as server:
        UnifiedReward(server.base_url, rubric="v1.5", image_size="full", max_tokens=64, **FAST)(image, ["x"], [{}])
        UnifiedReward(server.base_url, rubric="2.0", image_format="png", image_size=[16, 8], **FAST)(image, ["x"], [{}])
    full, small = server.seen
    assert np.array_equal(full.image, image[0]) and full.body["max_tokens"] == 64
    assert _sent(small) == ("data:image/png;base64", _encoded(image[0], "png", (16, 8)))


# ---------------------------------------------------------------- UnifiedReward: the parsers


def score_of(rubric: str, reply: str, fields: list[str] | None = None) -> float:
    """UnifiedReward's score of one reply under a rubric's data: mean of the fields / maximum, NaN if unparsed."""
    data = load_instruction(RUBRICS[rubric])
    patterns = {name: data["scores"][name] for name in fields or list(data["scores"])}
    values = parse_scores(reply, patterns, data["match"], data["minimum"], data["maximum"])
    if values is None:
        return math.nan
    return float(np.mean(list(values.values()))) / data["maximum"]


def flow_grpo_extract(reply: str) -> float:
    """flow_grpo's `_extract_scores` for one reply, then `sc / 5.0` (flow_grpo/rewards.py), re-stated."""
    match = re.search(r"Final Score:\s*([1-5](?:\.\d+)?)", reply)
    return float(match.group(1)) / 5.0 if match else 0.0


@pytest.mark.parametrize(
    "reply",
    [
        "The image matches.\nFinal Score: 4",  # 0.8
        "Final Score:4.5",  # no space: 0.9
        "Final Score: 2\nOn reflection, Final Score: 5",  # repeated: re.search takes the first, 0.4
        "Final Score: 10",  # the pattern reads its first digit: 1, 0.2 (the reference's reading, kept)
        "Final Score: **4**",  # bold: the reference's pattern does not match (0 there, NaN here)
        "Final Score：4",  # a full-width colon: no match
        "final score: 4",  # lower case: no match
        "Final Score: 0",  # out of range: [1-5] does not match
        "Final Score: 5.5",  # matched, 1.1 there; above the maximum: NaN here
        "",
    ],
)
def test_v15_parser_is_flow_grpos_where_it_reads_a_score(reply):
    ours, reference = score_of("v1.5", reply), flow_grpo_extract(reply)
    if reference == 0.0 or reference > 1.0:  # no match (flow_grpo's silent 0) or above 5: NaN, counted
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(reference, abs=1e-12)  # the same float64 division


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("cat (object): 1\nFinal Score: 4", 0.8),
        ("Final Score: **4**", 0.8),  # bold marker
        ("Final Score：3", 0.6),  # full-width colon
        ("Final Score: 2\n...\nFinal Score: 4.5", 0.9),  # repeated: the last, the verdict after any quoting
        ("Final Score: 6", math.nan),  # out of range
        ("Final Score: 0", math.nan),
        ("Final Score: -3", math.nan),
        ("final score: 3", math.nan),  # the label is case-sensitive, as trained
        ("no score at all", math.nan),
    ],
)
def test_qwen_point_score_parser(reply, expected):
    np.testing.assert_equal(score_of("qwen", reply), expected)  # exact: 4 / 5 etc. in float64 both ways


ACS = "Word-wise Scores: [[\"cat\", 0.1]]\n\nAlignment Score (1-5): {a}\nCoherence Score (1-5): {c}\nStyle Score (1-5): {s}"


@pytest.mark.parametrize("rubric", ["v1.5_acs", "qwen_acs", "2.0"])
@pytest.mark.parametrize(
    "reply, fields, expected",
    [
        (ACS.format(a=4, c=3, s=5), None, 0.8),  # (4 + 3 + 5) / 3 / 5
        (ACS.format(a="**4**", c=3, s="5.0"), None, 0.8),  # bold and decimals
        (ACS.format(a=4, c=3, s=5).replace("Style Score (1-5): 5", "Style Score (1-5)：5"), None, 0.8),  # full-width
        ("Alignment Score (1-5): X\n" + ACS.format(a=2, c=3, s=4), None, 0.6),  # the echoed format, then the verdict
        (ACS.format(a=4, c=3, s=9), None, math.nan),  # one axis out of range: the reply is unparsed
        (ACS.format(a=4, c=3, s=9), ["alignment"], 0.8),  # ... unless only the others are asked for
        ("Alignment Score (1-5): 4", None, math.nan),  # axes missing
        ("Alignment Score (1-5): 4", ["alignment"], 0.8),
    ],
)
def test_acs_parsers(rubric, reply, fields, expected):
    np.testing.assert_allclose(score_of(rubric, reply, fields), expected, rtol=1e-15)  # float64 mean of 3 values


def flow_grpo_aesthetic(reply: str) -> float:
    """flow_grpo's `extract_scores` for one reply (flow_grpo/qwenvl.py), re-stated."""
    match = re.search(r"<Score>(\d+)</Score>", reply)
    return float(match.group(1)) / 5 if match else 0


@pytest.mark.parametrize(
    "reply",
    [
        "<Thought>sharp, well lit</Thought>\n<Score>4</Score>",  # 0.8
        "<Score>X</Score> ... <Score>3</Score>",  # the echoed template does not match \d+: the first number, 0.6
        "<Score>2</Score><Score>5</Score>",  # repeated: the first, 0.4
        "<Score>4.5</Score>",  # no match there (0), NaN here
        "<Score>7</Score>",  # 1.4 there, above the maximum: NaN here
        "<Score>0</Score>",  # 0 there, below the minimum: NaN here
        "**Score: 4**",  # no tag
    ],
)
def test_aesthetic_parser_is_flow_grpos_where_it_reads_a_score(reply):
    ours, reference = score_of("qwenvl_aesthetic", reply), flow_grpo_aesthetic(reply)
    if reference == 0 or reference > 1:
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(reference, abs=1e-12)


# ---------------------------------------------------------------- VLM alignment


VARIANT_CASES = [
    ("vqascore", lambda prompt: VQASCORE_CLIP_FLANT5.format(prompt)),
    ("vqascore_qwen2vl", lambda prompt: VQASCORE_QWEN2VL.format(prompt)),
    ("t2i_r1_orm", lambda prompt: T2I_R1_ORM.format(DEFAULT_IMAGE_TOKEN="<image>", prompt=prompt)),
]


@pytest.mark.parametrize("variant, question", VARIANT_CASES)
def test_vlm_alignment_sends_the_references_question(variant, question):
    image = _image(3)
    reply = completion("yes", [("yes", math.log(0.6)), ("no", math.log(0.3)), ("Yes", math.log(0.1))])
    with ChatServer(lambda seen, hit: Reply(reply)) as server:
        VLMAlignment(server.base_url, "judge", variant=variant, **FAST)(image, [PROMPT], [{}])
    seen = server.seen[0]
    assert seen.text.encode("utf-8") == question(PROMPT).encode("utf-8")
    assert _sent(seen)[0] == "data:image/png;base64" and np.array_equal(seen.image, image[0])  # full size, lossless
    assert seen.body["max_tokens"] == 1 and seen.body["temperature"] == 0.0 and seen.body["logprobs"] is True


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


TOKENS = ["yes", "no", "Yes", "No", "maybe"]


def _scored(variant: str, logits: list[float], chosen: str | None = None) -> float:
    """The reward's score of a reply whose first-token logprobs are the raw log-softmax of `logits` over TOKENS."""
    logprobs = _log_softmax(np.array(logits, dtype=np.float64))
    listed = sorted(zip(TOKENS, logprobs.tolist()), key=lambda pair: -pair[1])
    if chosen is not None:  # the server's chosen token first (it is the greedy one in these cases)
        listed = [pair for pair in listed if pair[0] == chosen] + [pair for pair in listed if pair[0] != chosen]
    with ChatServer(lambda seen, hit: Reply(completion(listed[0][0], listed))) as server:
        out = VLMAlignment(server.base_url, "judge", variant=variant, **FAST)(_image(0), ["x"], [{}])
    return float(out.scores[0])


@pytest.mark.parametrize("logits", [[0.3, 0.1, 2.0, 1.0, -1.0], [-2.0, 1.0, 0.5, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
def test_vqascore_is_p_of_the_exact_answer_token(logits):
    # t2v_metrics: softmax(raw logits / 1.0)[id of "Yes"]; "yes" and " Yes" are other tokens and do not count
    expected = float(np.exp(_log_softmax(np.array(logits)))[TOKENS.index("Yes")])
    # float64 both ways, then one float32 cast of a probability: within 6e-8 relative, 1e-7 absolute below 1
    assert _scored("vqascore", logits) == pytest.approx(expected, abs=1e-7)


def t2i_r1_orm(logits: np.ndarray, temperature: float = 0.3) -> float:
    """T2I-R1's ORM (reward_orm.py), re-stated: HF generate's scores (logits / temperature), softmax, first token,
    yes_prob / (yes_prob + no_prob) of the tokens "yes" and "no"."""
    scores = np.exp(_log_softmax(logits / temperature))
    yes_prob, no_prob = scores[TOKENS.index("yes")], scores[TOKENS.index("no")]
    return float(yes_prob / (yes_prob + no_prob))


@pytest.mark.parametrize(
    "logits, chosen",
    [
        ([2.0, 1.5, 0.3, -1.0, -2.0], "yes"),  # a close call: 0.5 logits apart at T 0.3 is 0.84, not raw 0.62
        ([0.5, 2.5, 0.0, 0.2, -1.0], "no"),
        ([1.0, 0.0, 3.0, -2.0, -1.0], "Yes"),  # "Yes" chosen: the reference's check lower-cases it and goes on
    ],
)
def test_t2i_r1_orm_is_yes_over_yes_and_no_at_its_temperature(logits, chosen):
    expected = t2i_r1_orm(np.array(logits, dtype=np.float64))
    # float64 both ways (the normaliser cancels in the ratio), then one float32 cast: within 1e-7
    assert _scored("t2i_r1_orm", logits, chosen) == pytest.approx(expected, abs=1e-7)


def test_t2i_r1_orm_without_a_yes_or_no_answer_is_unparsed():
    assert math.isnan(_scored("t2i_r1_orm", [0.0, 0.0, 0.0, 0.0, 5.0]))  # "maybe": the reference scores 0
    reply = completion("Yes", [("Yes", math.log(0.9)), ("The", math.log(0.05))])  # yes and no both unlisted
    with ChatServer(lambda seen, hit: Reply(reply)) as server:
        out = VLMAlignment(server.base_url, "judge", variant="t2i_r1_orm", **FAST)(_image(0), ["x"], [{}])
    assert math.isnan(out.scores[0]) and out.info == {"unparsed": 1.0}


# ---------------------------------------------------------------- the VLM OCR reader


def xomni_clean(text: str) -> str:
    """X-Omni's `clean_and_remove_hallucinations` (textbench/evaluate_text_reward.py) as published: its loop keeps
    only the last keyword's replacement."""
    keywords_list = ["addCriterion", "No text recognized."]
    for keyword in keywords_list:
        s = text.replace(keyword, "").replace(f"\n{keyword}", "").replace(f"{keyword}\n", "")
    return s


@pytest.mark.parametrize(
    "reply, reference_agrees",
    [
        ("OPEN 24/7", True),
        ("No text recognized.", True),  # -> ""
        ("OPEN\nNo text recognized.", True),  # -> "OPEN" (the reference keeps a trailing line break)
        ("OPEN addCriterion LATE", False),  # the reference's loop drops this replacement: it keeps "addCriterion"
        ("No text recognized", False),  # the form the instruction asks for, without the full stop: removed here
    ],
)
def test_vlm_reader_asks_xomnis_question_and_strips_its_phrases(reply, reference_agrees):
    with ChatServer(lambda seen, hit: Reply(completion(reply))) as server:
        ocr = OCR(engine="vlm", engine_options={"base_url": server.base_url, "model": "reader", **FAST})
        read = ocr.read(_image(1))
    seen = server.seen[0]
    assert seen.text.encode("utf-8") == XOMNI_LONGTEXT_OCR.encode("utf-8") and seen.body["max_tokens"] == 1024
    assert np.array_equal(seen.image, _image(1)[0])  # full size, lossless (the reference passes the PNG file)
    assert "addCriterion" not in read[0] and "No text recognized" not in read[0]
    # whitespace aside (no metric reads it), the read-out is the reference's wherever its loop does what it says
    assert (read[0].split() == xomni_clean(reply).split()) is reference_agrees
