"""Connection-level limits of the predictor's HTTP server: header and body read timeouts, and caps on slow and
open connections, so a slow or lying client cannot hold a connection.

uvicorn has no header or body read timeout of its own (only the keep-alive timeout between requests): a
client that sends half its headers, or declares a `Content-Length` and stops sending, holds its connection and
its request task forever. `guarded_protocol(limits)` returns a subclass of uvicorn's httptools protocol (the one
uvicorn picks by default; KServe installs `uvicorn[standard]`) that the KServe REST server's uvicorn config
uses (`vlpipe.serving.predictor`):

- header timeout: from a connection's first byte, or from the first byte of the next request on a keep-alive
  connection, to the end of the request headers (`ServingLimits.header_timeout_s`);
- body timeout: from the end of the headers to the end of the body (`body_timeout_s`); the time the model
  takes to answer does not count;
- on either timeout the server answers `408` with `connection: close` (when no response has started) and
  closes the connection; a route still waiting for the body sees a disconnect, so nothing is generated;
- at most `max_slow_connections` connections may be sending headers or body at once: a new connection
  beyond that closes the oldest slow one that has been at it for over a second (408), so a flood of slow
  connections cannot lock out clients that send their requests promptly;
- the request line and headers may take at most `max_header_bytes` (431 and close beyond it; httptools would
  otherwise buffer an endless header);
- at most `max_connections` open connections: beyond that the oldest idle keep-alive connection is closed,
  else the oldest slow one, else the new connection.

The subclass uses uvicorn's protocol internals (`cycle`, `transport`, the parser callbacks), read from uvicorn
0.54 (pinned in constraints.txt); `tests/serving/test_fuzz.py` drives every path over raw sockets.

Each of these logs one line (`connection closed: status=408 reason=header_timeout ...`), with no request
content.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from vlpipe.serving.limits import ServingLimits, request_id

_SERIAL = itertools.count()
logger = logging.getLogger("vlpipe.serving.requests")

_MESSAGES = {
    "header_timeout": "the request headers did not arrive in time; send the whole request promptly",
    "body_timeout": "the request body did not arrive in time (or is shorter than its Content-Length)",
    "too_many_slow_connections": "too many connections are sending slowly; this one was the oldest",
    "headers_too_large": "the request line and headers are too large",
}
_STATUS_LINES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


def _error_response(status: int, reason: str) -> bytes:
    body = json.dumps({"error": _MESSAGES[reason]}).encode()
    head = (
        _STATUS_LINES[status] + b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n"
    )
    return head + body


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read timeouts and connection caps (see the module docstring).

    The limits are class attributes; `guarded_protocol` makes a subclass carrying one server's limits.
    """

    header_timeout_s: float = ServingLimits().header_timeout_s
    body_timeout_s: float = ServingLimits().body_timeout_s
    max_slow_connections: int = ServingLimits().max_slow_connections
    max_connections: int = ServingLimits().max_connections
    max_header_bytes: int = ServingLimits().max_header_bytes
    # A connection counts as slow for eviction only after this long: a burst of prompt clients that have
    # connected but whose first bytes the event loop has not read yet is not a flood.
    slow_grace_s: float = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading_since: float | None = None  # set while headers or a body are awaited
        self._opened_at = 0.0
        # True between a request's first byte (or the connection's start) and the end of its headers.
        self._in_headers = True
        self._header_bytes = 0

    # -- the reading phases --------------------------------------------------------------------------------------
    def _start_reading(self, phase: str, timeout_s: float) -> None:
        self._stop_reading()
        if self._reading_since is None or phase == "header":
            self._reading_since = self.loop.time()
        self._read_timer = self.loop.call_later(timeout_s, self._timed_out, f"{phase}_timeout")

    def _stop_reading(self, done: bool = False) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        if done:
            self._reading_since = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened_at = self.loop.time()
        self._serial = next(_SERIAL)  # ties in loop time (same loop iteration) go to the earlier connection
        self._start_reading("header", self.header_timeout_s)
        self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_reading(done=True)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        # httptools buffers an unfinished header in memory: bound it (the chunk that ends the headers may also
        # carry body bytes, so only a request still in its headers is refused).
        if (
            self._in_headers
            and self._header_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._stop_reading(done=True)
            logger.info("connection closed: status=431 reason=headers_too_large request_id=-")
            self.transport.write(_error_response(431, "headers_too_large"))
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        if self._read_timer is None:  # the first byte of a keep-alive connection's next request
            self._start_reading("header", self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        super().on_headers_complete()
        self._start_reading("body", self.body_timeout_s)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_reading(done=True)

    # -- closing --------------------------------------------------------------------------------------------
    def _timed_out(self, reason: str) -> None:
        self._read_timer = None
        self._reading_since = None
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        rid = request_id(self.scope) if reason == "body_timeout" and self.scope else "-"
        logger.info("connection closed: status=408 reason=%s request_id=%s", reason, rid)
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # mid-response (only with pipelining): just close
                self.transport.close()
                return
            # The route, if it is waiting for the body, reads a disconnect and answers nothing.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(_error_response(408, reason))
        self.transport.close()

    def _make_room(self) -> None:
        now = self.loop.time()
        peers = [c for c in self.connections if c is not self and isinstance(c, GuardedHttpProtocol)]
        slow = [c for c in peers if c._reading_since is not None]
        overdue = [c for c in slow if now - (c._reading_since or now) >= self.slow_grace_s]
        if len(slow) >= self.max_slow_connections and overdue:
            oldest = min(overdue, key=lambda c: (c._reading_since or now, c._serial))
            oldest._stop_reading()
            oldest._timed_out("too_many_slow_connections")
            peers.remove(oldest)
        if len(self.connections) > self.max_connections:
            idle = [
                c
                for c in peers
                if c._reading_since is None and (c.cycle is None or c.cycle.response_complete)
            ]
            if idle:
                victim = min(idle, key=lambda c: (c._opened_at, c._serial))
            else:
                overdue = [c for c in overdue if c in peers]
                victim = min(overdue, key=lambda c: (c._reading_since or now, c._serial)) if overdue else self
            logger.info("connection closed: reason=too_many_connections (%d open)", len(self.connections))
            victim.transport.close()


def guarded_protocol(limits: ServingLimits) -> type[GuardedHttpProtocol]:
    """A `GuardedHttpProtocol` subclass carrying `limits`' timeouts and connection caps, for
    `uvicorn.Config(http=...)`."""
    return type(
        "GuardedHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "header_timeout_s": limits.header_timeout_s,
            "body_timeout_s": limits.body_timeout_s,
            "max_slow_connections": limits.max_slow_connections,
            "max_connections": limits.max_connections,
            "max_header_bytes": limits.max_header_bytes,
        },
    )
