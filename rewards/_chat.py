"""The one client for OpenAI-compatible chat-completions servers (vLLM, sglang), shared by server-backed rewards.

A judge model is served by a process the user starts; a reward only sends it one image and one question per
sample. What a training run needs from that client: a bounded number of requests in flight (a reward worker must
not flood a server that other workers share), a timeout per attempt, retries with exponential backoff on the
failures that go away on their own (408, 429, 5xx, refused or dropped connections, read timeouts), and an API key
that never reaches a log, a repr or a pickle. The retries are urllib3's `Retry` (which also honours a server's
`Retry-After`), the concurrency a `ThreadPoolExecutor`; nothing here re-implements either.

A request that still fails after its retries is an error naming the sample, never a NaN: NaN is reserved for
"not applicable", and the caller decides what a reply that does not parse means.

What a judge is sent is a fact about the judge: it was trained or evaluated with one exact instruction text and one
way of sending the image. Those live as data in rewards/instructions/*.yaml, each with its source (repository, path,
commit) and licence: the reference's `template` byte for byte (`{prompt}` where the reference puts the prompt; some
have no slot), the image its client sends (`size` [W, H] or null for full size, `format`, JPEG `quality`), and what
a reward needs to read the reply (score patterns, answer tokens, phrases to strip). `load_instruction` reads one.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rewards._image import to_data_url

RETRY_STATUSES = (408, 429, *range(500, 600))


def retrying_session(max_retries: int, backoff: float, backoff_max: float, connections: int) -> Any:
    """A requests session whose every request (POST too: scoring and chat completions have no side effect, so sending
    one again is safe) retries refused connections, read timeouts and RETRY_STATUSES up to `max_retries` times, with
    urllib3's exponential backoff, honouring Retry-After; the last answer comes back to be reported with its body."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=max_retries, connect=max_retries, read=max_retries, status=max_retries, other=0, allowed_methods=None,
        status_forcelist=RETRY_STATUSES, backoff_factor=backoff, backoff_max=backoff_max, raise_on_status=False,
        respect_retry_after_header=True,
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=connections)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def post_answered(session: Any, url: str, *, where: str, error: type, timeout: float, max_retries: int,
                  reason: Callable[[Any], str], **request: Any) -> Any:
    """POST through a `retrying_session` and return the 200 answer; a transport failure or any other status (after
    the retries) raises `error`, its message starting with `where` and ending with `reason(response)`."""
    import requests

    try:
        response = session.post(url, timeout=timeout, **request)
    except requests.RequestException as err:
        raise error(
            f"{where} failed after {max_retries} retries (timeout {timeout}s per attempt): {type(err).__name__}: {err}"
        ) from None  # the chained urllib3 errors carry nothing more, and no header is ever part of them
    if response.status_code != 200:
        retried = f" after {max_retries} retries" if response.status_code in RETRY_STATUSES else ""
        raise error(f"{where} answered HTTP {response.status_code}{retried}: {reason(response)}")
    return response


INSTRUCTIONS = Path(__file__).with_name("instructions")


def instruction_names() -> list[str]:
    """Every instruction file's name (without .yaml)."""
    return sorted(path.stem for path in INSTRUCTIONS.glob("*.yaml"))


def load_instruction(name: str) -> dict[str, Any]:
    """The instruction file `name` as a dict; ValueError naming the file when it is missing or incomplete."""
    import yaml

    path = INSTRUCTIONS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no instruction file {path.name} in {INSTRUCTIONS}; known: {instruction_names()}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    missing = [key for key in ("source", "licence", "template", "image") if key not in data]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return data


def image_options(
    data: dict[str, Any], image_format: str | None = None, image_size: Any = None, jpeg_quality: int | None = None
) -> dict[str, Any]:
    """The chat client's image settings from an instruction's `image` entry, each overridden where given
    (`image_size` "full" sends the image at full size where the instruction's client resizes it)."""
    image = data["image"]
    size = image.get("size") if image_size is None else (None if image_size == "full" else image_size)
    return {
        "image_format": image["format"] if image_format is None else image_format,
        "image_size": None if size is None else (int(size[0]), int(size[1])),
        "jpeg_quality": int(image.get("quality", 95) if jpeg_quality is None else jpeg_quality),
    }


class ChatError(RuntimeError):
    """A request failed after all its retries, or the server answered something that is not a chat completion."""


class ChatClient:
    """POST one (image, text) user message per sample to `{base_url}/chat/completions`; returns the reply JSONs.

    base_url: the server's OpenAI base URL, e.g. "http://localhost:8000/v1". api_key_env: the name of the
    environment variable holding the API key (read at request time, sent as a bearer token); None sends no key.
    timeout: seconds per attempt (connect and read). max_retries: extra attempts after the first. backoff: the
    exponential backoff factor in seconds (urllib3: backoff * 2 ** (retry - 1), at most backoff_max).
    max_concurrency: requests in flight at once from this client. image_format: "png" (lossless) or "jpeg" at
    `jpeg_quality`; image_size: (W, H) to resize every image to before encoding (PIL bicubic, as the reference
    clients that resize do), None to send it at full size.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        max_concurrency: int = 8,
        image_format: str = "png",
        image_size: tuple[int, int] | None = None,
        jpeg_quality: int = 95,
    ) -> None:
        if not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"ChatClient: base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("ChatClient: need max_concurrency >= 1, max_retries >= 0 and timeout > 0")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"ChatClient: image_format must be 'png' or 'jpeg', got {image_format!r}")
        if image_size is not None and (len(image_size) != 2 or min(int(v) for v in image_size) < 1):
            raise ValueError(f"ChatClient: image_size must be [width, height] >= 1 or null, got {image_size!r}")
        if not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"ChatClient: jpeg_quality must be in 1..100, got {jpeg_quality!r}")
        self.base_url = str(base_url).rstrip("/")
        self.model = model
        self.api_key_env = api_key_env  # the variable's name only: the key itself is never stored
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.backoff_max = float(backoff_max)
        self.max_concurrency = int(max_concurrency)
        self.image_format = image_format
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.jpeg_quality = int(jpeg_quality)

    def __repr__(self) -> str:
        return (
            f"ChatClient(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r}, "
            f"timeout={self.timeout}, max_retries={self.max_retries}, max_concurrency={self.max_concurrency})"
        )

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def complete(self, images: np.ndarray, texts: list[str], **params: Any) -> list[dict[str, Any]]:
        """images uint8 [n, H, W, 3], n texts -> n reply JSONs, in order; `params` go into every request body."""
        headers = {"Content-Type": "application/json"}
        key = self._api_key()
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        workers = max(1, min(self.max_concurrency, len(texts)))
        with retrying_session(self.max_retries, self.backoff, self.backoff_max, workers) as session:

            def one(index: int) -> dict[str, Any]:
                url = to_data_url(images[index], self.image_format, self.jpeg_quality, self.image_size)
                image = {"type": "image_url", "image_url": {"url": url}}
                content = [image, {"type": "text", "text": texts[index]}]
                body = {"model": self.model, "messages": [{"role": "user", "content": content}], **params}
                return self._post(session, headers, body, index)

            with ThreadPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(one, range(len(texts))))

    def _post(self, session: Any, headers: dict, body: dict, index: int) -> dict[str, Any]:
        response = post_answered(session, self.url, where=f"sample {index}: {self.url}", error=ChatError,
                                 timeout=self.timeout, max_retries=self.max_retries,
                                 reason=lambda answer: repr(answer.text[:300]), json=body, headers=headers)
        try:
            reply = response.json()
            reply["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ChatError(
                f"sample {index}: {self.url} did not answer a chat completion ({err!r}): {response.text[:300]!r}"
            ) from None
        return reply

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ChatError(f"the environment variable {self.api_key_env!r} (api_key_env) is not set or empty")
        return key


def message_text(reply: dict[str, Any]) -> str:
    """The assistant's text in a chat-completion reply ('' when the server sent none)."""
    content = reply["choices"][0]["message"].get("content")
    if isinstance(content, list):  # some servers answer with content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""
