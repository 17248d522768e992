"""A chat-completions server on 127.0.0.1 for the server-backed reward tests.

It speaks just enough of the OpenAI protocol to be checked against: it parses the request JSON, checks the path,
the bearer token and that the message carries one data-URL image and one text part, decodes the image, and answers
what the test's `reply(request, hit)` function returns. It records every request, how many arrived, and the most
that were in flight at once.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
from PIL import Image


@dataclass
class Reply:
    """What the server answers: a status, a JSON body (or raw text), after `delay` seconds."""

    body: Any
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def completion(content: str, logprobs: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """A chat-completion body with `content`, and first-token top logprobs [(token, logprob)] when given."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    if logprobs is not None:
        top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in logprobs]
        choice["logprobs"] = {"content": [{"token": logprobs[0][0], "logprob": logprobs[0][1], "top_logprobs": top}]}
    return {"id": "cmpl-test", "object": "chat.completion", "choices": [choice]}


@dataclass
class Seen:
    """One request as the server understood it."""

    body: dict[str, Any]
    text: str
    image: np.ndarray  # uint8 [H, W, 3], decoded from the data URL
    image_format: str
    authorization: str | None


class ChatServer:
    """`with ChatServer(reply) as server:` serves at `server.base_url` (…/v1) until the block ends."""

    def __init__(self, reply: Callable[[Seen, int], Reply], api_key: str | None = None) -> None:
        self.reply = reply
        self.api_key = api_key
        self.seen: list[Seen] = []
        self.hits = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.errors: list[str] = []  # protocol violations found by the server, asserted empty by tests
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                with server._lock:
                    server.hits += 1
                    hit = server.hits
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(hit)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, hit: int) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                seen = server._check(self.path, self.headers.get("Authorization"), raw)
                if seen is None:
                    self._send(Reply({"error": "bad request"}, status=400))
                    return
                self._send(server.reply(seen, hit))

            def _send(self, reply: Reply) -> None:
                time.sleep(reply.delay)
                data = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data.encode())))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data.encode())
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _check(self, path: str, authorization: str | None, raw: bytes) -> Seen | None:
        problems = []
        if path != "/v1/chat/completions":
            problems.append(f"path {path}")
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            problems.append("missing or wrong bearer token")
        try:
            body = json.loads(raw)
            (message,) = body["messages"]
            image_part, text_part = message["content"]
            url = image_part["image_url"]["url"]
            head, payload = url.split(",", 1)
            image_format = head.removeprefix("data:image/").removesuffix(";base64")
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
            seen = Seen(body, text_part["text"], image, image_format, authorization)
        except Exception as err:  # noqa: BLE001 (any malformed request is a protocol violation)
            problems.append(f"malformed request: {err!r}")
            seen = None
        if problems:
            with self._lock:
                self.errors.extend(problems)
            return None
        with self._lock:
            self.seen.append(seen)
        return seen

    def __enter__(self) -> "ChatServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
