"""Request limits of the predictor, and how a refused request is answered (4xx, the server keeps serving).

`ServingLimits` holds every cap with a safe default, so a server started without configuration is already
protected: request bodies, JSON shape (finite numbers, valid Unicode, bounded nesting), images per request,
pixels per image (decompression bombs are refused before decoding), generated tokens, `n`, `best_of`, rows per
V1/V2 request, chat messages, and the connection-level timeouts and caps that `vlpipe.serving.connections`
enforces. `RequestGuardMiddleware` reads and checks every body before any route parses it.

A refused request raises `RequestRejected` (or one of KServe's errors), which the handlers here turn into a
JSON error: OpenAI's `{"error": {"message", "type", "param", "code"}}` under `/openai/`, KServe's
`{"error": message}` elsewhere. Every response carries an `x-request-id` header (the client's, when it sent a
well-formed one). A rejection is logged as one line, `request rejected: status=400 reason=<code>
request_id=<id>`, without the request's content or a traceback; only a server fault (500) logs its traceback.
Messages never hold object reprs (`<... object at 0x...>`) and are cut to `MAX_MESSAGE_CHARS`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

OPENAI_PREFIX = "/openai/"
MAX_MESSAGE_CHARS = 300
REQUEST_ID_HEADER = "x-request-id"
OFF_LOOP_BYTES = 1024 * 1024  # JSON bodies larger than this are checked on a worker thread
# ASGI types, spelled out to keep this module free of starlette imports at type-check time.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("vlpipe.serving.requests")
if logger.level == logging.NOTSET:  # rejection lines are INFO: shown wherever logging has a handler
    logger.setLevel(logging.INFO)

_OBJECT_REPR = re.compile(r"<[^<>]{0,200}? at 0x[0-9a-fA-F]+>")
_SURROGATE = re.compile("[\ud800-\udfff]")
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class ServingLimits(BaseModel):
    """Caps on what one request or connection may ask of the server. Every cap is on by default.

    Attributes:
        max_body_bytes: largest request body (413 above it); base64 images count here.
        max_json_depth: deepest nesting of objects and arrays in a JSON body (400 above it).
        max_images: images per request, over all messages or rows (400 above it).
        max_image_pixels: width·height of one image, checked from the header before decoding (413 above it);
            the checkpoint's own cap applies too, whichever is lower.
        max_tokens: largest `max_tokens` / `max_new_tokens` a request may ask for (400 above it).
        default_max_tokens: generated tokens when a request gives no `max_tokens`.
        max_n: largest `n` (answers per chat request).
        max_best_of: largest `best_of` (answers sampled and scored by the PRM per request).
        max_batch: rows per V1 (`instances`) or V2 (batch dimension) request.
        max_messages: messages per chat request.
        header_timeout_s: time from a connection's first byte (or the first byte of a keep-alive request) to
            the end of its request headers; past it the server answers 408 and closes the connection.
        body_timeout_s: time from the end of the headers to the end of the body (408 and close past it);
            generation time does not count.
        max_slow_connections: connections still sending headers or body at once; a new connection beyond it
            closes the oldest of them that has been at it for over a second (408).
        max_connections: open connections at once; beyond it the oldest idle keep-alive connection is
            closed, else the oldest slow one, else the new one.
        max_header_bytes: size of a request line and headers (431 and close above it).
        batch_max_size: answer rows generated together at most (a request with `n` answers takes `n` rows);
            1 generates one row at a time.
        batch_wait_ms: how long an idle server waits for requests still being encoded to start a batch
            together (a lone request starts at once).
        max_queue: requests waiting for a place in the batch at most (429 with `Retry-After` beyond).
        request_timeout_s: time from a request's arrival to its last token (504 past it; a stream that has
            started ends with an error event).
        max_video_frames: frames sampled from one video in a chat request (the evaluation sampling: one
            frame at the middle of each of this many segments).
        max_video_bytes: size of one decoded video file in a chat request (413 above it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_json_depth: int = Field(default=32, gt=0)
    max_images: int = Field(default=4, ge=0)
    max_image_pixels: int = Field(default=16_000_000, gt=0)
    max_tokens: int = Field(default=1024, gt=0)
    default_max_tokens: int = Field(default=256, gt=0)
    max_n: int = Field(default=8, gt=0)
    max_best_of: int = Field(default=16, gt=0)
    max_batch: int = Field(default=16, gt=0)
    max_messages: int = Field(default=64, gt=0)
    header_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    body_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    max_slow_connections: int = Field(default=64, gt=0)
    max_connections: int = Field(default=1024, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    batch_max_size: int = Field(default=16, gt=0)
    batch_wait_ms: float = Field(default=5.0, ge=0, le=10_000, allow_inf_nan=False)
    max_queue: int = Field(default=256, gt=0)
    request_timeout_s: float = Field(default=600.0, gt=0, allow_inf_nan=False)
    max_video_frames: int = Field(default=8, gt=0)
    max_video_bytes: int = Field(default=8 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.max_slow_connections > self.max_connections:
            raise ValueError("max_slow_connections must not exceed max_connections")
        return self


_DEFAULT_CODES = {
    400: "invalid_request",
    404: "not_found",
    413: "too_large",
    422: "invalid_request",
    429: "queue_full",
    504: "deadline_exceeded",
}


class RequestRejected(Exception):
    """A request the server refuses, with the HTTP status to answer and a message saying what to change.

    Args:
        status_code: 400 (bad input), 404 (unknown model), 413 (too large), 422, 429 (queue full), 503 or
            504 (deadline).
        message: what is wrong and what to do, shown to the client (never the request's content).
        param: the request field at fault (OpenAI's `param`), if one is.
        code: a short reason code for the log line (`image_too_large`, `invalid_json`, ...); by default one
            derived from the status.
        headers: extra response headers (`Retry-After` on a 429).
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code or _DEFAULT_CODES.get(status_code, "rejected")
        self.headers = dict(headers or {})


_ERROR_TYPES = {
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    504: "timeout",
}


def clean_message(message: str) -> str:
    """A message safe to show and log: object reprs replaced, lone surrogates dropped, cut to a bounded length."""
    text = _OBJECT_REPR.sub("<object>", message)
    text = _SURROGATE.sub("", text)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def error_body(path: str, status_code: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON error for a refused request: OpenAI's shape under `/openai/`, KServe's elsewhere."""
    message = clean_message(message)
    if path.startswith(OPENAI_PREFIX):
        kind = (
            "server_error" if status_code >= 500 else _ERROR_TYPES.get(status_code, "invalid_request_error")
        )
        param = None if param is None else clean_message(param)
        return {"error": {"message": message, "type": kind, "param": param, "code": status_code}}
    return {"error": message}


def request_id(scope_or_request: Any) -> str:
    """The id `RequestGuardMiddleware` gave the request ("-" outside it)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    state = scope.get("state") if isinstance(scope, MutableMapping) else None
    return str((state or {}).get("request_id", "-"))


def log_rejection(status_code: int, code: str, rid: str) -> None:
    """The one log line of a refused request: status, reason code and request id; nothing from the request."""
    logger.info("request rejected: status=%d reason=%s request_id=%s", status_code, code, rid)


def _json_response(request: Any, status_code: int, message: str, param: str | None = None, **headers: str):
    from fastapi.responses import JSONResponse

    body = error_body(request.url.path, status_code, message, param)
    return JSONResponse(status_code=status_code, content=body, headers=headers or None)


async def rejected_handler(request: Any, exc: Exception) -> Any:
    """FastAPI exception handler for `RequestRejected`."""
    assert isinstance(exc, RequestRejected)
    log_rejection(exc.status_code, exc.code, request_id(request))
    return _json_response(request, exc.status_code, exc.message, exc.param, **exc.headers)


async def validation_error_handler(request: Any, exc: Exception) -> Any:
    """FastAPI's `RequestValidationError` as a 422 naming the fields at fault, never echoing their values.

    FastAPI's own handler echoes each bad value and fails (500) on values JSON cannot hold (NaN, bytes);
    this one only renders field paths and pydantic's messages.
    """
    errors = exc.errors() if hasattr(exc, "errors") else []
    parts = []
    for error in errors[:3]:
        # A path can hold the client's own dict keys: each part is cut short.
        loc = [str(p)[:40] for p in error.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    message = "invalid request: " + "; ".join(parts) + more if parts else "invalid request body"
    param = ".".join(str(p)[:40] for p in errors[0].get("loc", ()) if p != "body") if errors else None
    log_rejection(422, "validation_error", request_id(request))
    return _json_response(request, 422, message, param or None)


def kserve_error_handler(status_code: int, code: str) -> Callable[[Any, Exception], Awaitable[Any]]:
    """A handler for one of KServe's exceptions (`InvalidInput`, `ModelNotFound`, ...): its status, one log
    line instead of KServe's logged traceback, and the exception's own message (cleaned)."""

    async def handler(request: Any, exc: Exception) -> Any:
        log_rejection(status_code, code, request_id(request))
        return _json_response(request, status_code, str(exc) or code)

    return handler


async def server_error_handler(request: Any, exc: Exception) -> Any:
    """Anything unexpected: a 500 that closes the connection, with the traceback logged once, server side only."""
    rid = request_id(request)
    logger.error("request failed: status=500 reason=%s request_id=%s", type(exc).__name__, rid, exc_info=exc)
    message = f"internal server error (request id {rid}); the server keeps serving"
    # Starlette answers this one outside the middlewares, so the request id header is set here.
    headers = {"connection": "close", REQUEST_ID_HEADER: rid}
    return _json_response(request, 500, message, **headers)


# -- JSON body checks --------------------------------------------------------------------------------------------
class _BadJSON(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _reject_constant(name: str) -> Any:
    raise _BadJSON("non_finite_number", f"the body holds {name}; JSON numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadJSON(
            "non_finite_number", "the body holds a number too large for a double; send finite numbers"
        )
    return value


def check_json_body(body: bytes, max_depth: int) -> None:
    """Check a JSON body before any route parses it: UTF-8, valid JSON, finite numbers, no lone UTF-16
    surrogates in strings or keys, nesting at most `max_depth` deep.

    Raises:
        RequestRejected: (400) naming what is wrong, never quoting the body.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected(400, "the body is not UTF-8; send UTF-8 JSON", code="invalid_utf8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except _BadJSON as exc:
        raise RequestRejected(400, str(exc), code=exc.code) from None
    except RecursionError:
        raise RequestRejected(
            400, f"the body nests deeper than {max_depth} levels", code="json_too_deep"
        ) from None
    except ValueError:  # JSONDecodeError, and integers longer than Python's digit limit
        raise RequestRejected(400, "the body is not valid JSON", code="invalid_json") from None
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise RequestRejected(
                    400,
                    "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff) in a string; send valid Unicode",
                    code="invalid_unicode",
                )
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise RequestRejected(
                    400, f"the body nests deeper than {max_depth} levels", code="json_too_deep"
                )
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


# -- the middleware ----------------------------------------------------------------------------------------------
class RequestGuardMiddleware:
    """ASGI middleware, outermost: a request id for every request, and the body read and checked before any
    route sees it.

    - The body is read up to `max_body_bytes` (413 above it, whatever its declared `Content-Length`; chunked
      uploads are counted as they arrive). The rest of an oversized body is drained and discarded, up to
      `drain_bytes`, so the client reads the 413 instead of a reset connection; beyond that the server
      answers and closes. How long a body may take is bounded by the connection's body timeout.
    - A non-empty POST/PUT/PATCH body must be valid JSON (`check_json_body`; 400 otherwise), except a V2
      binary-extension body (`inference-header-content-length`), which KServe parses itself.
    - The request id is the client's `x-request-id` when it is 1-64 characters of `[A-Za-z0-9._:-]`, else a
      new one; routes read it from `scope["state"]["request_id"]`, every response carries it.

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: the body cap.
        max_json_depth: the JSON nesting cap.
        drain_bytes: how much of an oversized body is read and thrown away before answering
            (default 8 x the cap).
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, max_json_depth: int = 32, drain_bytes: int | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.drain_bytes = drain_bytes if drain_bytes is not None else 8 * max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope.get("headers", [])}
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = given if _CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        declared = _content_length(headers)
        if declared is not None and declared > self.max_body_bytes:
            if declared <= self.drain_bytes:
                await self._drain(receive, 0)
            await self._refuse(scope, send_with_id, 413, "body_too_large", self._too_large(declared))
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
                await self._refuse(scope, send_with_id, 413, "body_too_large", self._too_large(total))
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        data = b"".join(chunks)
        if (
            data
            and scope.get("method") in ("POST", "PUT", "PATCH")
            and b"inference-header-content-length" not in headers
        ):
            try:
                if len(data) > OFF_LOOP_BYTES:  # parsing megabytes takes a while: keep health checks answered
                    await asyncio.to_thread(check_json_body, data, self.max_json_depth)
                else:
                    check_json_body(data, self.max_json_depth)
            except RequestRejected as exc:
                await self._refuse(scope, send_with_id, exc.status_code, exc.code, exc.message)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: http.disconnect, which streaming responses watch for

        await self.app(scope, replay, send_with_id)

    async def _drain(self, receive: Receive, seen: int, more: bool = True) -> None:
        while more and seen <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)

    def _too_large(self, size: int) -> str:
        return (
            f"request body is {size} bytes or more, above the server's cap of {self.max_body_bytes} bytes; "
            "send smaller or fewer images"
        )

    async def _refuse(self, scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        log_rejection(status, code, request_id(scope))
        payload = json.dumps(error_body(scope.get("path", ""), status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status == 413:  # the rest of the body may still be on its way: do not read it as the next request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
