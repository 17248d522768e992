"""The reward server and `rewards.remote.RemoteReward` on 127.0.0.1, with the rewards of recipes/tiny_cpu.yaml.

Scores that cross the wire equal the scores of the same rewards in process, exactly: the images travel as PNG
(lossless), the server builds the rewards from the same component nodes and runs the same arithmetic, and a float32
score goes out as the double it equals and comes back as the same float32. Every refusal of docs/rewards-server.md
is sent for real, and a good request is answered correctly after each one.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from grpo_image.app.cli import main
from grpo_image.planning.decoder_sizes import reward_parts
from grpo_image.scoring.reward_server import RewardServer
from rewards._image import to_data_url
from rewards.remote import RemoteReward, RemoteRewardError
from tests.helpers_reward_server import REPO, Flaky, Stalls, recipe_batch, recipe_rewards, serving

RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
TOKEN_ENV = "GRPO_IMAGE_TEST_REWARD_TOKEN"
TOKEN = "s3cret-token-for-the-tests"
FAST = dict(backoff=0.01, timeout=30.0)  # quick retries; a generous timeout per attempt on two shared cores
LIMIT = 64 * 2**10  # the refusal server's body limit: 12 images of 32x32 px fit (about 1.5 KB each as base64 PNG)


@pytest.fixture(scope="module")
def batch():
    """12 palette images of tiny_cpu.yaml: random codes, plus flat ones that score 1 on colour."""
    codes = np.random.default_rng(0).integers(0, 16, size=(12, 16))  # int64 [12, L = 4 x 4 codes]
    codes[:3] = [[5], [5], [9]]  # flat red, red, lime: the colours of prompts 0, 2 and 4
    return recipe_batch("tiny_cpu.yaml", codes, list(range(0, 24, 2)))  # uint8 [12, 32, 32, 3], 12 prompts, metadata


@pytest.fixture(scope="module")
def reference():
    """The recipe's rewards in this process, built apart from the served ones."""
    return recipe_rewards("tiny_cpu.yaml")


@pytest.fixture(scope="module")
def server():
    """Both rewards of tiny_cpu.yaml, a token, a 64 KiB body limit and 64 x 64 px images at most."""
    os.environ[TOKEN_ENV] = TOKEN
    with serving(RewardServer(recipe_rewards("tiny_cpu.yaml"), token_env=TOKEN_ENV, max_request_bytes=LIMIT,
                              max_image_pixels=64 * 64)) as running:
        yield running
    del os.environ[TOKEN_ENV]


def test_served_scores_equal_in_process_scores_for_every_reward(server, batch, reference):
    images, prompts, metadata = batch
    metadata = [*metadata[:-1], {}]  # the last sample has no colour: ColorAdherence scores it NaN, sent as null
    for name, reward in reference.items():
        expected = reward(images, prompts, metadata)
        remote = RemoteReward(server.url, name, token_env=TOKEN_ENV, batch_size=5, **FAST)  # 3 requests: 5, 5, 2
        got = remote(images, prompts, metadata)
        assert got.scores.dtype == np.float32
        np.testing.assert_array_equal(got.scores, expected.scores)  # exact, and NaN where NaN (module docstring)
        assert got.info == expected.info
        if name == "color":
            assert np.isnan(got.scores[-1]) and got.scores[:3].tolist() == [1.0, 1.0, 1.0]  # flat, right colour


def test_remote_reward_pickles_as_its_arguments_and_holds_no_gpu_memory(server, batch):
    remote = RemoteReward(server.url, "jpeg", token_env=TOKEN_ENV, max_concurrency=2, **FAST)
    data = pickle.dumps(remote)
    assert TOKEN.encode() not in data and TOKEN not in repr(remote)
    again = pickle.loads(data)
    assert again._init_args == remote._init_args
    np.testing.assert_array_equal(again(*batch).scores, remote(*batch).scores)
    spec = {"name": "far", "weight": 1.0, "required": True,
            "scorer": {"_component_": "rewards.remote.RemoteReward", "base_url": server.url}}
    assert reward_parts([spec]) == ([], [])  # counted, as nothing on the worker's GPU


def _good(batch, reward="jpeg", rows=slice(0, 2)) -> dict:
    images, prompts, metadata = batch
    return {"reward": reward, "images": [to_data_url(image) for image in images[rows]], "prompts": prompts[rows],
            "metadata": metadata[rows]}


def _png(array: np.ndarray, mode: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bad_requests(batch) -> list[tuple[str, dict, int, str]]:
    """(case, request keyword arguments, expected status, a fragment of the reason)."""
    good = _good(batch)
    png = good["images"][0]
    jpeg = io.BytesIO()
    Image.fromarray(batch[0][0]).save(jpeg, format="JPEG")
    big = np.zeros((65, 65, 3), np.uint8)  # 4,225 px > the server's 4,096
    body = lambda **change: {"json": {**good, **change}}  # noqa: E731
    return [
        ("not JSON", {"data": b"{'images': oops"}, 400, "not JSON"),
        ("not an object", {"json": [good]}, 400, "JSON object"),
        ("missing field", {"json": {k: v for k, v in good.items() if k != "prompts"}}, 400, "missing fields ['prompts']"),
        ("unknown field", body(image=png), 400, "unknown fields ['image']"),
        ("wrong type", body(prompts=[1, 2]), 400, "'prompts' must be a list of strings"),
        ("lengths differ", body(prompts=["one"]), 400, "one each per sample"),
        ("no images", body(images=[], prompts=[], metadata=[]), 400, "empty"),
        ("not a data URL", body(images=[png.split(",")[1], png]), 400, "not a PNG data URL"),
        ("bad base64", body(images=["data:image/png;base64,@@@@", png]), 400, "invalid base64"),
        ("truncated PNG", body(images=[png[:22 + 100], png]), 400, "does not decode as a PNG"),  # 75 of its bytes
        ("JPEG bytes", body(images=["data:image/png;base64," + base64.b64encode(jpeg.getvalue()).decode(), png]),
         400, "does not decode as a PNG"),
        ("RGBA PNG", body(images=[_png(np.zeros((32, 32, 4), np.uint8)), png]), 400, "mode RGBA"),
        ("sizes differ", body(images=[_png(np.zeros((32, 16, 3), np.uint8)), png]), 400, "share one size"),
        ("too many pixels", body(images=[_png(big), _png(big)]), 413, "more than the server's 4096 pixels"),
        ("body over the limit", {"data": b" " * (LIMIT + 1)}, 413, f"more than the server's {LIMIT}"),
        ("unknown reward", body(reward="hpsv9"), 404, "no reward named 'hpsv9'"),
        ("no reward named", body(reward=None), 400, "name one in 'reward'"),
        ("reward fails on its input", body(reward="color", metadata=[{"color": "teal"}, {}]), 422,
         "reward 'color' failed: ValueError"),
        ("wrong path", {"json": good, "path": "/v1/score"}, 404, "answers GET /health and POST /score"),
        ("GET /score", {"method": "GET"}, 405, "answers GET /health and POST /score"),
        ("no token", {"json": good, "token": None}, 401, "bearer token"),
        ("wrong token", {"json": good, "token": TOKEN + "x"}, 401, "bearer token"),
    ]


def _send(url: str, method: str = "POST", path: str = "/score", token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return requests.request(method, url + path, headers=headers, timeout=30, **kwargs)


def test_bad_requests_are_refused_with_their_status_and_the_server_keeps_serving(server, batch, reference):
    expected = reference["jpeg"](*(part[:2] for part in batch)).scores
    for case, request, status, reason in _bad_requests(batch):
        answer = _send(server.url, **request)
        assert (answer.status_code, answer.headers["Content-Type"]) == (status, "application/json"), case
        assert reason in answer.json()["error"], (case, answer.json())
        assert ("WWW-Authenticate" in answer.headers) == (status == 401), case
        after = _send(server.url, json=_good(batch))
        assert after.status_code == 200, (case, after.text)
        np.testing.assert_array_equal(np.float32(after.json()["scores"]), expected, err_msg=case)
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/score")  # no Content-Length: the end of the body cannot be found
    connection.putheader("Authorization", f"Bearer {TOKEN}")
    connection.endheaders()
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())) == (411, {"error": "send the body with a Content-Length header"})
    connection.close()


def test_health_lists_the_rewards_and_limits_and_needs_the_token(server):
    assert _send(server.url, "GET", "/health", token=None).status_code == 401
    assert _send(server.url, "GET", "/health").json() == {
        "protocol": 1, "rewards": ["color", "jpeg"], "max_request_bytes": LIMIT, "max_image_pixels": 4096}


def test_refusals_are_logged_without_the_token(server, batch, caplog):
    caplog.set_level(logging.DEBUG, logger="grpo_image.scoring.reward_server")
    assert _send(server.url, json=_good(batch), token="not-" + TOKEN).status_code == 401
    assert _send(server.url, json=_good(batch)).status_code == 200
    assert "401 missing or wrong bearer token" in caplog.text
    assert "POST /score" in caplog.text and TOKEN not in caplog.text


def test_client_refusals_are_errors_naming_the_server_and_the_reason(server, batch, monkeypatch):
    images, prompts, metadata = batch
    noise = np.random.default_rng(1).integers(0, 256, size=(12, 60, 60, 3), dtype=np.uint8)  # PNG cannot shrink it
    with pytest.raises(RemoteRewardError, match=r"samples 0\.\.7: http://127\.0\.0\.1:\d+/score answered HTTP 400: "
                                                r"this server serves \['color', 'jpeg'\]: name one in 'reward'"):
        RemoteReward(server.url, token_env=TOKEN_ENV, **FAST)(images, prompts, metadata)
    with pytest.raises(RemoteRewardError, match="answered HTTP 401: missing or wrong bearer token"):
        RemoteReward(server.url, "jpeg", **FAST)(images, prompts, metadata)
    monkeypatch.setenv("GRPO_IMAGE_TEST_UNSET", "")
    with pytest.raises(RemoteRewardError, match="'GRPO_IMAGE_TEST_UNSET' \\(token_env\\) is not set or empty"):
        RemoteReward(server.url, "jpeg", token_env="GRPO_IMAGE_TEST_UNSET", **FAST)(images, prompts, metadata)
    with pytest.raises(RemoteRewardError, match=r"samples 0\.\.7: .* answered HTTP 413: the body is \d+ bytes"):
        RemoteReward(server.url, "jpeg", token_env=TOKEN_ENV, batch_size=8, **FAST)(noise, prompts, metadata)


def test_server_errors_and_read_timeouts_are_retried(batch, reference):
    images, prompts, metadata = batch
    ONE_REQUEST = dict(FAST, batch_size=12)  # the 12 images in one request, so that hits count attempts
    expected = reference["jpeg"](images, prompts, metadata).scores
    with serving(Flaky({"jpeg": reference["jpeg"]}, failures=2)) as flaky:
        np.testing.assert_array_equal(RemoteReward(flaky.url, max_retries=2, **ONE_REQUEST)(images, prompts, metadata).scores,
                                      expected)
        assert flaky.hits == 3  # two HTTP 500 answers, then the scores
    with serving(Flaky({"jpeg": reference["jpeg"]}, failures=3)) as flaky:
        with pytest.raises(RemoteRewardError, match="answered HTTP 500 after 2 retries: internal server error: "
                                                    "RuntimeError: planted failure 3"):
            RemoteReward(flaky.url, max_retries=2, **ONE_REQUEST)(images, prompts, metadata)
    with serving(Stalls({"jpeg": reference["jpeg"]})) as stalls:
        try:  # the first attempt is never answered: it times out after 2 s and the second attempt is scored
            got = RemoteReward(stalls.url, max_retries=1, backoff=0.01, timeout=2.0, batch_size=12)(images, prompts, metadata)
        finally:
            stalls.release.set()
        np.testing.assert_array_equal(got.scores, expected)
        assert stalls.hits == 2


def test_serve_reward_command_serves_until_ctrl_c(batch, reference):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "grpo_image", "serve-reward", RECIPE, "--reward", "jpeg", "--port", "0"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()
        url = re.fullmatch(rf"serving jpeg of {re.escape(RECIPE)} at (http://127\.0\.0\.1:\d+) "
                           r"\(POST /score, GET /health\)\n", ready)
        assert url, ready
        assert requests.get(url[1] + "/health", timeout=30).json()["rewards"] == ["jpeg"]
        got = RemoteReward(url[1], **FAST)(*batch)
        np.testing.assert_array_equal(got.scores, reference["jpeg"](*batch).scores)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()  # a no-op once it has exited
    assert process.returncode == 0, err
    assert out == "" and err == "grpo-image serve-reward: stopped\n"


@pytest.mark.parametrize("arguments, message", [
    (["--reward", "hps"], r"--reward 'hps': the recipe's rewards are \['color', 'jpeg'\]"),
    (["--token-env", "GRPO_IMAGE_TEST_UNSET"], "--token-env GRPO_IMAGE_TEST_UNSET: the variable is unset or empty"),
    (["--max-request-mb", "0"], "--max-request-mb must be > 0 and --max-image-pixels >= 1"),
    (["--host", "TAKEN"], r"cannot listen on 127\.0\.0\.1:\d+: \[Errno 98\] Address already in use"),
])
def test_serve_reward_refuses_what_cannot_serve_in_one_line(arguments, message, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_IMAGE_TEST_UNSET", raising=False)
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port some other program listens on
        port = str(taken.getsockname()[1])
        arguments = ["--host", "127.0.0.1", "--port", port] if arguments[1] == "TAKEN" else ["--port", "0", *arguments]
        assert main(["serve-reward", RECIPE, *arguments]) == 2
    assert re.fullmatch(f"grpo-image: error: {message}\n", capsys.readouterr().err)
