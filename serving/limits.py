"""Request limits of the predictor, and how a refused request is answered (4xx, the server keeps serving).

`ServingLimits` holds every cap with a safe default, so a server started without configuration is already
protected: request bodies (checked by `BodySizeLimitMiddleware` before any route parses them), images per
request, pixels per image (decompression bombs are refused before decoding), generated tokens, `n`, `best_of`,
rows per V1/V2 request and chat messages. A refused request raises `RequestRejected`, which
`rejected_handler` turns into a JSON error: OpenAI's `{"error": {"message", "type", "param", "code"}}` under
`/openai/`, KServe's `{"error": message}` elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

OPENAI_PREFIX = "/openai/"
# ASGI types, spelled out to keep this module free of starlette imports at type-check time.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServingLimits(BaseModel):
    """Caps on what one request may ask of the server. Every cap is on by default.

    Attributes:
        max_body_bytes: largest request body (413 above it); base64 images count here.
        max_images: images per request, over all messages or rows (400 above it).
        max_image_pixels: width·height of one image, checked from the header before decoding (413 above it);
            the checkpoint's own cap applies too, whichever is lower.
        max_tokens: largest `max_tokens` / `max_new_tokens` a request may ask for (400 above it).
        default_max_tokens: generated tokens when a chat request gives no `max_tokens`.
        max_n: largest `n` (answers per chat request).
        max_best_of: largest `best_of` (answers sampled and scored by the PRM per request).
        max_batch: rows per V1 (`instances`) or V2 (batch dimension) request.
        max_messages: messages per chat request.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_images: int = Field(default=4, ge=0)
    max_image_pixels: int = Field(default=16_000_000, gt=0)
    max_tokens: int = Field(default=1024, gt=0)
    default_max_tokens: int = Field(default=256, gt=0)
    max_n: int = Field(default=8, gt=0)
    max_best_of: int = Field(default=16, gt=0)
    max_batch: int = Field(default=16, gt=0)
    max_messages: int = Field(default=64, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self


class RequestRejected(Exception):
    """A request the server refuses, with the HTTP status to answer and a message saying what to change.

    Args:
        status_code: 400 (bad input), 404 (unknown model), 413 (too large) or 422.
        message: what is wrong and what to do, shown to the client.
        param: the request field at fault (OpenAI's `param`), if one is.
    """

    def __init__(self, status_code: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param


_ERROR_TYPES = {404: "not_found_error", 413: "request_too_large"}


def error_body(path: str, status_code: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON error for a refused request: OpenAI's shape under `/openai/`, KServe's elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        kind = _ERROR_TYPES.get(status_code, "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": status_code}}
    return {"error": message}


async def rejected_handler(request: Any, exc: Exception) -> Any:
    """FastAPI exception handler for `RequestRejected`."""
    from fastapi.responses import JSONResponse

    assert isinstance(exc, RequestRejected)
    return JSONResponse(
        status_code=exc.status_code,
        content=error_body(request.url.path, exc.status_code, exc.message, exc.param),
    )


class BodySizeLimitMiddleware:
    """ASGI middleware that answers 413 to a request whose body is over `max_body_bytes`.

    The body is read (up to the cap) before the route sees it, so no handler ever parses an oversized body,
    whatever its declared `Content-Length` (chunked uploads are counted as they arrive). The rest of an
    oversized body is drained and discarded, up to `drain_bytes`, so the client reads the 413 instead of a
    reset connection; beyond that the server answers and closes.

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: the cap.
        drain_bytes: how much of an oversized body is read and thrown away before answering
            (default 8 x the cap).
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, drain_bytes: int | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.drain_bytes = drain_bytes if drain_bytes is not None else 8 * max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            if declared <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._too_large(scope, send, declared)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_body_bytes:
                await self._drain(receive, total, message.get("more_body", False))
                await self._too_large(scope, send, total)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: http.disconnect, which streaming responses watch for

        await self.app(scope, replay, send)

    async def _drain(self, receive: Receive, seen: int, more: bool = True) -> None:
        while more and seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _too_large(self, scope: Scope, send: Send, size: int) -> None:
        message = (
            f"request body is {size} bytes or more, above the server's cap of {self.max_body_bytes} bytes; "
            "send smaller or fewer images"
        )
        payload = json.dumps(error_body(scope.get("path", ""), 413, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
