"""How large a request body may be: 413 on a declared Content-Length over the limit, or as soon
as a body sent without one (chunked) passes it, before the rest is read.

Two places enforce it. The replica reads its body through `read_body`. Serve's HTTP proxy,
though, reads every body into memory for the replica as fast as the client sends it, before the
replica says anything; `BodyLimit` in front of the proxy (Serve's hook for proxy middlewares,
the environment variable RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH naming `proxy_middlewares`,
with MAX_BODY_BYTES_ENV for the limit) refuses there, so an oversized body is never held whole.
jobs/serve.py sets both when it starts Ray itself.
"""

import json
import os

from starlette.middleware import Middleware
from starlette.requests import Request

from elastic_ray.serving.settings import MAX_BODY_BYTES

PROXY_CALLBACK = "elastic_ray.serving.body:proxy_middlewares"
MAX_BODY_BYTES_ENV = "ELASTIC_RAY_MAX_BODY_BYTES"


class BodyTooLarge(ValueError):
    """A request body over the limit."""

    def __init__(self, limit: int, declared: int | None = None):
        size = f"of {declared} bytes " if declared is not None else ""
        super().__init__(f"the request body {size}is over the limit of {limit} bytes")


def declared_length(headers) -> int | None:
    """Content-Length as a number; a malformed one counts as over any limit."""
    value = headers.get("content-length")
    if value is None:
        return None
    return int(value) if value.strip().isdigit() else float("inf")


async def read_body(request: Request, limit: int) -> bytes:
    """The body of a replica's request, refused (BodyTooLarge) past `limit` bytes, declared or read."""
    declared = declared_length(request.headers)
    if declared is not None and declared > limit:
        raise BodyTooLarge(limit, declared)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def too_large_response(error: BodyTooLarge) -> tuple[dict, dict]:
    """The ASGI start and body messages of a 413 in OpenAI's error format; the connection closes,
    as the rest of the body is never read."""
    content = json.dumps({"error": {"message": str(error), "type": "invalid_request_error", "param": None,
                                    "code": "request_too_large"}}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": content}


class BodyLimit:
    """ASGI middleware for Serve's proxy: an HTTP request's body is read here, up to `max_bytes`,
    before the proxy sees it (which it would buffer whole); past the limit the answer is 413."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = declared_length(headers)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(send, BodyTooLarge(self.max_bytes, declared))
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(send, BodyTooLarge(self.max_bytes))
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(send, error: BodyTooLarge) -> None:
        for message in too_large_response(error):
            await send(message)


def proxy_middlewares() -> list[Middleware]:
    """Serve's proxy callback: the body limit, `MAX_BODY_BYTES_ENV` bytes (default MAX_BODY_BYTES)."""
    return [Middleware(BodyLimit, max_bytes=int(os.environ.get(MAX_BODY_BYTES_ENV, MAX_BODY_BYTES)))]
