"""ASGI middleware bounding request bodies in size (413) and in time (408)."""

from __future__ import annotations

import asyncio
import time

from .errors import error_response


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: by Content-Length (before reading any of it), and by
    counting streamed bytes; refuse bodies that take longer than `timeout` seconds with 408.

    The body is read here (bounded by the limit and the timeout) and replayed to the app, so the app
    never sees more than `limit` bytes and a slow client never holds a model or a concurrency slot.
    """

    def __init__(self, app, limit: int, timeout: float = 60.0):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        too_large = error_response(413, f"request body is larger than {self.limit} bytes", "payload_too_large", path=path)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                slow = error_response(408, f"the request body took longer than {self.timeout:g}s to arrive",
                                      "request_timeout", {"Connection": "close"}, path)
                return await slow(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)
