"""Dynamic (continuous) batching of concurrent requests on one generation thread.

`Batcher` owns a `vlpipe.model.generate.GenerationEngine` and runs it on its own thread, so the event loop
never blocks on generation (health and readiness stay fast under load). Requests are submitted from the event
loop as `Ticket`s, each a list of (prompt, per-row sampling settings) groups (`n` / `best_of` samples of one
prompt share one prefill). The thread:

1. waits for work; when the batch is empty and other requests are still being encoded (`incoming`), it waits
   up to `batch_wait_ms` for them, so concurrent requests that arrive together start together (a lone request
   starts at once);
2. admits waiting tickets while their rows fit in `batch_max_size` (a ticket larger than that runs alone), also
   between decode steps of a running batch (continuous batching: no request waits for a batch to drain);
3. steps the engine (one token per row) and hands each ticket its new tokens on the event loop
   (`loop.call_soon_threadsafe`), where `Ticket.next` returns them as they come (token streaming).

A ticket that is cancelled (its client disconnected, its deadline passed) has its rows cancelled: the engine
drops them at its next step, freeing their slots. At most `max_queue` tickets wait for room in the batch (a
ticket the batch has free rows for does not count); `submit` beyond that raises `QueueFull` (the routes answer 429 with `Retry-After`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlpipe.model.conversation import EncodedSample
    from vlpipe.model.generate import GenerationEngine, Row, SamplingParams

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher's waiting queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Update:
    """What one decode step gave one row of a ticket: a token, or the row's end (`token` None,
    `finish_reason` set: `stop`, `length` or `cancelled`)."""

    index: int
    token: int | None
    finish_reason: str | None = None


class Ticket:
    """One request's rows in the batcher. Created by `Batcher.submit`; read on the event loop.

    `next()` returns each step's `Update`s as steps produce them, until every row has finished; `tokens` and
    `finish_reasons` hold each row's answer so far. `cancel()` stops every row (from the loop's thread).
    """

    def __init__(self, groups: Sequence[tuple[EncodedSample, Sequence[SamplingParams]]], loop) -> None:
        self.groups = [(prompt, list(params)) for prompt, params in groups]
        self.size = sum(len(params) for _, params in self.groups)
        self.tokens: list[list[int]] = [[] for _ in range(self.size)]
        self.finish_reasons: list[str | None] = [None] * self.size
        self.rows: list[Row] = []
        self.cancelled = False
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.stream = True
        self.pending: list[Update] = []  # a non-streamed ticket's updates, handed over when it is done
        self._loop = loop
        self._queue: asyncio.Queue[list[Update] | None] = asyncio.Queue()
        self._closed = False

    @property
    def done(self) -> bool:
        """Whether every row has finished (or the ticket failed)."""
        return self.error is not None or all(r is not None for r in self.finish_reasons)

    def cancel(self) -> None:
        """Stop every row; the engine drops them at its next step (thread-safe)."""
        self.cancelled = True
        for row in list(self.rows):
            row.cancelled = True

    # Called on the event loop (through call_soon_threadsafe) by the generation thread.
    def _deliver(self, updates: list[Update]) -> None:
        for u in updates:
            if u.token is not None:
                self.tokens[u.index].append(u.token)
            if u.finish_reason is not None:
                self.finish_reasons[u.index] = u.finish_reason
        self._queue.put_nowait(updates)
        if self.done:
            self._queue.put_nowait(None)

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._queue.put_nowait(None)

    async def next(self, deadline: float | None = None) -> list[Update] | None:
        """The next step's updates for this ticket, or None once every row has finished.

        Args:
            deadline: the event loop's time (`loop.time()`) after which the ticket is cancelled.

        Raises:
            TimeoutError: past `deadline` (the ticket is cancelled first).
            Exception: the generation thread's error, when the batch this ticket was in failed.
        """
        if self._closed:
            return None
        get = self._queue.get()
        try:
            if deadline is None:
                item = await get
            else:
                item = await asyncio.wait_for(get, max(0.0, deadline - self._loop.time()))
        except (TimeoutError, asyncio.CancelledError):
            self.cancel()
            raise
        if item is None:
            self._closed = True
            if self.error is not None:
                raise self.error
        return item

    async def wait(self, deadline: float | None = None) -> None:
        """Until every row has finished (see `next`)."""
        while await self.next(deadline) is not None:
            pass


def _fits(ticket: Ticket, room: int, batch_has_rows: bool) -> bool:
    """The admission rule: a ticket joins when its rows fit the free room, and always into an empty batch."""
    return ticket.size <= room or not batch_has_rows


class Batcher:
    """A generation thread running one engine over concurrent requests (see the module docstring).

    Args:
        make_engine: builds a fresh `GenerationEngine` (after a failed step the engine is rebuilt).
        batch_max_size: rows generated together at most.
        batch_wait_ms: how long an idle batcher waits for more requests before it starts a batch.
        max_queue: tickets waiting for room in the batch at most (`QueueFull` beyond); tickets the batch has
            free rows for do not count.
        name: names the thread.
        on_tokens: called with the number of tokens each step produced (a metric).
    """

    def __init__(
        self,
        make_engine: Callable[[], GenerationEngine],
        *,
        batch_max_size: int,
        batch_wait_ms: float,
        max_queue: int,
        name: str = "vlpipe",
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        self.make_engine = make_engine
        self.batch_max_size = batch_max_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.max_queue = max_queue
        self.on_tokens = on_tokens
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._engine: GenerationEngine | None = None
        self._owners: dict[int, tuple[Ticket, int]] = {}  # id(row) -> (ticket, index in ticket)
        self._thread = threading.Thread(target=self._loop, name=f"vlpipe-batcher-{name}", daemon=True)
        self._started = False
        self._incoming = 0  # requests being encoded, about to be submitted
        self._step_s = 0.05  # a running estimate of one decode step, for Retry-After
        self.steps = 0  # decode steps run, and rows in them: steps and rows_stepped give the mean batch
        self.rows_stepped = 0
        self.peak_rows = 0

    # -- the event-loop side -----------------------------------------------------------------------------------
    def submit(
        self, groups: Sequence[tuple[EncodedSample, Sequence[SamplingParams]]], *, stream: bool = True
    ) -> Ticket:
        """Queue a request's rows; call from the event loop.

        Args:
            groups: (prompt, one `SamplingParams` per row) pairs; the rows of a group share one prefill.
            stream: hand the ticket every step's tokens; False hands them over once, when every row has
                finished (fewer wake-ups of the event loop for a request that is not streamed).

        Raises:
            QueueFull: when `max_queue` tickets already wait for room in the batch.
        """
        ticket = Ticket(groups, asyncio.get_running_loop())
        ticket.stream = stream
        with self._cond:
            if self._waiting_for_room() >= self.max_queue:
                raise QueueFull(self._retry_after())
            if not self._started:
                self._started = True
                self._thread.start()
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark a request as on its way (being encoded) for the duration of the block: an idle batcher waits
        up to `batch_wait_ms` for such requests to start a batch with them, and starts at once when none is."""
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify()

    def _waiting_for_room(self) -> int:
        """Waiting tickets that the next admission (`_take`) would leave waiting: those the batch has no room for.
        A burst that arrives within one decode step is not refused while the batch has free rows for it."""
        engine = self._engine
        active = 0 if engine is None else engine.active
        room, admitted, live = self.batch_max_size - active, 0, 0
        for ticket in self._waiting:
            if ticket.cancelled:
                continue
            live += 1
            if live == admitted + 1 and _fits(ticket, room, admitted > 0 or active > 0):
                admitted += 1
                room -= ticket.size
        return live - admitted

    def _retry_after(self) -> int:
        # Roughly: the queue ahead, a batch at a time, each ~100 steps.
        batches = max(1, len(self._waiting) // max(1, self.batch_max_size))
        return max(1, min(60, round(batches * 100 * self._step_s)))

    @property
    def active_rows(self) -> int:
        """Rows in the running batch (a snapshot)."""
        engine = self._engine
        return 0 if engine is None else len(engine.rows) + len(engine.pending)

    @property
    def queued(self) -> int:
        """Tickets waiting for admission."""
        return len(self._waiting)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (in-flight tickets are failed)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._started:
            self._thread.join(timeout_s)

    # -- the generation thread -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self._engine = self.make_engine()
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not engine.active:
                    self._cond.wait()
                if self._stop:
                    break
                if not engine.active:  # a new batch: give requests being encoded a moment to join it
                    deadline = time.monotonic() + self.batch_wait_s
                    while (
                        not self._stop
                        and self._incoming > 0
                        and sum(t.size for t in self._waiting) < self.batch_max_size
                        and (remaining := deadline - time.monotonic()) > 0
                    ):
                        self._cond.wait(remaining)
                admitted = self._take(engine)
            for ticket in admitted:
                for prompt, params in ticket.groups:
                    offset = len(ticket.rows)
                    rows = engine.add(prompt, params)
                    for k, row in enumerate(rows):
                        self._owners[id(row)] = (ticket, offset + k)
                    ticket.rows.extend(rows)
                if ticket.cancelled:
                    ticket.cancel()
            started = time.perf_counter()
            rows = engine.active
            try:
                events = engine.step()
            except Exception as exc:  # a failed batch fails its requests; the server keeps serving
                logger.exception("generation step failed; failing %d rows", engine.active)
                self._fail_all(engine, exc)
                engine = self._engine = self.make_engine()
                continue
            self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - started)
            self.steps += 1
            self.rows_stepped += rows
            self.peak_rows = max(self.peak_rows, rows)
            self._dispatch(events)
        self._fail_all(engine, RuntimeError("the server is shutting down"))

    def _take(self, engine: GenerationEngine) -> list[Ticket]:
        """Waiting tickets that fit in the batch (the first one always, into an empty batch)."""
        taken: list[Ticket] = []
        room = self.batch_max_size - engine.active
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._waiting.popleft()
                ticket._loop.call_soon_threadsafe(ticket._fail, TimeoutError("cancelled before admission"))
                continue
            if not _fits(ticket, room, bool(taken) or engine.active > 0):
                break
            self._waiting.popleft()
            taken.append(ticket)
            room -= ticket.size
        return taken

    def _dispatch(self, events: list[tuple[Row, int | None]]) -> None:
        by_ticket: dict[int, tuple[Ticket, list[Update]]] = {}
        produced = 0
        for row, token in events:
            ticket, index = self._owners[id(row)]
            update = Update(index, token, row.finish_reason)
            by_ticket.setdefault(id(ticket), (ticket, []))[1].append(update)
            if token is not None:
                produced += 1
            if row.finish_reason is not None:
                del self._owners[id(row)]
        if produced and self.on_tokens is not None:
            self.on_tokens(produced)
        for ticket, updates in by_ticket.values():
            if not ticket.stream:
                ticket.pending.extend(updates)
                if not all(row.done for row in ticket.rows):
                    continue
                updates, ticket.pending = ticket.pending, []
            ticket._loop.call_soon_threadsafe(ticket._deliver, updates)

    def _fail_all(self, engine: GenerationEngine, exc: BaseException) -> None:
        tickets = {id(t): t for t, _ in self._owners.values()}
        with self._cond:
            if self._stop:
                tickets.update({id(t): t for t in self._waiting})
                self._waiting.clear()
        self._owners.clear()
        for ticket in tickets.values():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for it
                ticket._loop.call_soon_threadsafe(ticket._fail, exc)
