"""A tiny local HTTP server that speaks enough of the Anthropic Messages API for tests.

It listens on 127.0.0.1 (a free port), answers `POST /v1/messages` with scripted replies in
order, and records every request (headers and JSON body), so tests can drive the real
`anthropic` SDK client end to end — retries, back-off and parsing included — without a network.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclasses.dataclass
class Reply:
    """One scripted HTTP reply: `text` becomes a well-formed message; or a raw error status."""

    text: str | None = None
    status: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    error_type: str = "api_error"
    message: str = "scripted error"  # the error body's message (e.g. one that echoes the key)


def text_reply(text: str) -> Reply:
    return Reply(text=text)


def rate_limit_reply(retry_after_s: float = 0.01) -> Reply:
    return Reply(status=429, headers={"retry-after": f"{retry_after_s}"}, error_type="rate_limit_error")


@dataclasses.dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class MessagesAPIServer:
    """Context manager: `with MessagesAPIServer([Reply(...), ...]) as server: server.base_url`."""

    def __init__(self, replies: list[Reply]):
        self.replies = list(replies)
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _next(self, request: RecordedRequest) -> Reply | None:
        with self._lock:
            self.requests.append(request)
            return self.replies.pop(0) if self.replies else None

    def __enter__(self) -> "MessagesAPIServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("request-id", f"req_test_{len(owner.requests)}")
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                body = json.loads(raw) if raw else {}
                request = RecordedRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                if self.path.split("?")[0] != "/v1/messages":
                    self._send(404, _error("not_found_error", f"no route {self.path}"), {"x-should-retry": "false"})
                    return
                reply = owner._next(request)
                if reply is None:
                    self._send(400, _error("invalid_request_error", "no scripted reply left"), {"x-should-retry": "false"})
                elif reply.status != 200:
                    self._send(reply.status, _error(reply.error_type, reply.message), reply.headers)
                else:
                    self._send(200, _message(body.get("model", "unknown"), reply.text or "", len(owner.requests)), reply.headers)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _message(model: str, text: str, number: int) -> dict[str, Any]:
    return {
        "id": f"msg_test_{number:04d}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 321, "output_tokens": 42},
    }
