"""`grpo-image serve-reward`: a recipe's rewards behind a small JSON-over-HTTP server (docs/rewards-server.md).

A heavy scorer (a 7B judge, a detector with dependencies of its own) can then run on another node or in another
environment, and a training run calls it through `rewards.remote.RemoteReward`. The rewards are built as a reward
worker builds them, from the recipe's component nodes, so a served reward scores what it scores in process.

Requests are answered by threads (the standard library's ThreadingHTTPServer), but a reward need not be
thread-safe: each reward runs one request at a time (a lock per reward), and at most `max_requests` bodies are held
in memory at once (later requests wait, unread, in their sockets). A request that is malformed, too large or not
authorised is refused with a 4xx and a JSON reason, and the server goes on serving.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from grpo_image.base.config import RecipeError, instantiate, reward_specs, validate_components
from grpo_image.scoring.reward_protocol import PROTOCOL, RequestRefused, parse_score_request, score_reply

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 2**20  # 8 images of 1152 px as PNG (about 5 MB each in base64) with room to spare
MAX_IMAGE_PIXELS = 4096 * 4096  # far above any decoder's output, far below what would exhaust a host's memory
MAX_REQUESTS = 4  # bodies held at once: at most 4 x MAX_REQUEST_BYTES of requests in memory
SOCKET_TIMEOUT_S = 300.0  # a client that stops sending mid-body frees its thread after this long


def build_rewards(cfg: Any, only: str | None = None) -> dict[str, Any]:
    """name -> reward built from the recipe's component node: every reward of the recipe, or the one named `only`."""
    specs = reward_specs(cfg)
    names = [spec["name"] for spec in specs]
    if not specs:
        raise RecipeError("the recipe has no rewards to serve")
    if only is not None:
        specs = [spec for spec in specs if spec["name"] == only]
        if not specs:
            raise RecipeError(f"--reward {only!r}: the recipe's rewards are {names}")
    for spec in specs:
        validate_components(spec["scorer"], f"rewards.{names.index(spec['name'])}.scorer")
    return {spec["name"]: instantiate(spec["scorer"]) for spec in specs}


class RewardServer:
    """Serves `rewards` (name -> reward) at http://host:port until `close`; port 0 picks a free port (see `url`).

    token_env: the name of an environment variable holding the bearer token every request must carry; it is read at
    request time (never stored or logged) and a server whose variable is unset or empty refuses every request.
    """

    def __init__(
        self,
        rewards: dict[str, Any],
        host: str = "127.0.0.1",
        port: int = 0,
        token_env: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        if not rewards:
            raise ValueError("RewardServer: no rewards to serve")
        if max_request_bytes < 1 or max_image_pixels < 1 or max_requests < 1:
            raise ValueError("RewardServer: max_request_bytes, max_image_pixels and max_requests must be >= 1")
        self.rewards = dict(rewards)
        self.locks = {name: threading.Lock() for name in self.rewards}
        self.slots = threading.BoundedSemaphore(max_requests)
        self.token_env = token_env
        self.max_request_bytes = int(max_request_bytes)
        self.max_image_pixels = int(max_image_pixels)
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True  # a stalled client never keeps the process from exiting
        self.httpd.reward_server = self  # type: ignore[attr-defined]  # how a handler finds its server

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Answer requests until `shutdown` is called from another thread (or KeyboardInterrupt in this one)."""
        self.httpd.serve_forever(poll_interval=0.1)

    def shutdown(self) -> None:
        """Stop `serve_forever` (from another thread) and close the listening socket: new connections are refused."""
        self.httpd.shutdown()
        self.close()

    def close(self) -> None:
        self.httpd.server_close()

    def health(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "rewards": list(self.rewards), "max_request_bytes": self.max_request_bytes,
                "max_image_pixels": self.max_image_pixels}

    def authorised(self, header: str | None) -> bool:
        if self.token_env is None:
            return True
        token = os.environ.get(self.token_env, "")
        if not token:
            log.warning("the token variable %s is unset or empty: every request is refused", self.token_env)
            return False
        return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())  # no timing hint

    def score(self, raw: bytes) -> bytes:
        """A `POST /score` body -> the reply body; RequestRefused for a request that is not scored."""
        request = parse_score_request(raw, self.max_image_pixels)
        name = request.reward
        if name is None:
            if len(self.rewards) > 1:
                raise RequestRefused(400, f"this server serves {list(self.rewards)}: name one in 'reward'")
            (name,) = self.rewards
        if name not in self.rewards:
            raise RequestRefused(404, f"no reward named {name!r} here; this server serves {list(self.rewards)}")
        with self.locks[name]:
            try:
                output = self.rewards[name](request.images, request.prompts, request.metadata)
            except Exception as err:  # the reward's own failure on this input: reported, never retried by clients
                raise RequestRefused(422, f"reward '{name}' failed: {type(err).__name__}: {err}") from None
        return score_reply(name, output, len(request.prompts))


class _Handler(BaseHTTPRequestHandler):
    """GET /health and POST /score; every answer is JSON, every refusal `{"error": reason}`."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client's pooled connection carries many requests
    server_version = "grpo-image-reward"
    timeout = SOCKET_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._unread = self._declared_length()  # a body sent with a GET is read and dropped
        self._answer(lambda app: json.dumps(app.health()).encode(), "/health")

    def do_POST(self) -> None:  # noqa: N802
        app: RewardServer = self.server.reward_server  # type: ignore[attr-defined]
        self._unread = self._declared_length()
        with app.slots:
            self._answer(lambda app: app.score(self._body(app)), "/score")

    def _answer(self, route, path: str) -> None:
        app: RewardServer = self.server.reward_server  # type: ignore[attr-defined]
        try:
            if self.path != path:
                raise RequestRefused(405 if self.path in ("/health", "/score") else 404,
                                     f"{self.command} {self.path}: this server answers GET /health and POST /score")
            if not app.authorised(self.headers.get("Authorization")):
                raise RequestRefused(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
            status, body = 200, route(app)
        except RequestRefused as err:
            log.warning("%s %s from %s: %d %s", self.command, self.path, self.client_address[0], err.status, err.reason)
            status, body = err.status, json.dumps({"error": err.reason}).encode()
        except Exception as err:  # a fault of the server itself: logged in full, answered as such
            log.exception("%s %s failed", self.command, self.path)
            status, body = 500, json.dumps({"error": f"internal server error: {type(err).__name__}: {err}"}).encode()
        self._discard_unread(app)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _declared_length(self) -> int:
        try:
            return max(0, int(self.headers.get("Content-Length", "")))
        except ValueError:
            return 0

    def _body(self, app: RewardServer) -> bytes:
        if "Content-Length" not in self.headers or self.headers.get("Transfer-Encoding"):
            self.close_connection = True  # the end of an undeclared body cannot be found: this connection is done
            raise RequestRefused(411, "send the body with a Content-Length header")
        if self._unread > app.max_request_bytes:
            raise RequestRefused(413, f"the body is {self._unread} bytes, more than the server's "
                                      f"{app.max_request_bytes} (send fewer images per request)")
        raw, self._unread = self.rfile.read(self._unread), 0
        return raw

    def _discard_unread(self, app: RewardServer) -> None:
        """Read a refused body in small pieces (up to the limit again) so that the client reads the reply.

        Closing a socket with unread data resets the connection, and the client would lose the reply with the reason.
        A body even larger is not read: the connection is closed after the reply.
        """
        if not self._unread:
            return
        self.close_connection = True
        if self._unread <= 2 * app.max_request_bytes:
            while self._unread > 0:
                piece = self.rfile.read(min(self._unread, 2**16))
                if not piece:
                    break
                self._unread -= len(piece)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.client_address[0], format % args)
