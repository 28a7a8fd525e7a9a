"""A cap on request bodies, enforced while they stream in (Content-Length can be absent or a lie), and a 503
for requests cut short by a server shutdown."""
from __future__ import annotations

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyTooLarge(Exception):
    pass


class _TrackedSend:
    """Wraps an ASGI send and remembers whether the response has started (after which no error answer can be
    sent in its place)."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


async def _send_json_error(send: Send, status: int, code: str, message: str,
                           extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        await _send_json_error(send, 413, "payload_too_large",
                               f"request body is larger than {self.max_bytes} bytes (RMT_MAX_UPLOAD_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._reject(send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        tracked = _TrackedSend(send)
        try:
            await self.app(scope, counting_receive, tracked)
        except _BodyTooLarge:
            if not tracked.started:
                await self._reject(send)


class ShutdownAnswer:
    """A request still running when the server's graceful-shutdown period ends is cancelled; answer it with a
    retryable 503 instead of the server's bare 500 (typically an upload still streaming in).

    Requests that finish within the grace period are not affected: this only acts on cancellation.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _TrackedSend(send)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not tracked.started:
                try:
                    await _send_json_error(send, 503, "shutting_down",
                                           "the server shut down before this request finished; retry shortly",
                                           ((b"retry-after", b"5"),))
                except Exception:  # noqa: BLE001 - the connection is already gone: nothing to tell
                    pass
            raise
