"""One live session's async face: audio in, events out, driven on the engine's shared worker.

A :class:`LiveSession` is what :meth:`streaming.engine.Engine.open_session` returns. Its
driver task asks the sans-I/O :class:`~streaming.session.Session` for model work, runs it on
the engine's :class:`~streaming.scheduler.Scheduler`, and publishes the resulting events to a
bounded queue and, for finalized results, to the engine's
:class:`~streaming.store.SessionStore`. Audio decoding and VAD run in the engine's feed pool,
never on the event loop. A client that stops reading its events for ``slow_consumer_s`` loses
its session; the others are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from osum.errors import OsumError

from .errors import SessionLimitError
from .events import Analysis, Error, Event, Final, Partial
from .session import Session
from .session_base import State
from .work import AnalysisRequest

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["LiveSession"]

log = logging.getLogger("streaming.engine")  # one logger for the engine and its sessions


class LiveSession:
    """One session's async face. Methods are safe to call from one client task."""

    def __init__(self, engine: Engine, session: Session, replay: list[Event]) -> None:
        self.engine = engine
        self.session = session
        self.id = session.id
        self.owner = session.owner
        self.resume_token = engine.resume_token(session.id)
        self.audio_offset = session.snapshot().audio_offset / 16000  # stream seconds already heard (resume point)
        self._out: asyncio.Queue[Event | None] = asyncio.Queue(engine.opt.event_queue)
        for ev in replay:
            self._out.put_nowait(ev)
        self._lock = asyncio.Lock()  # the Session is not thread-safe: feed and work take turns
        self._kick = asyncio.Event()
        self._closed = asyncio.Event()
        self._store_down = False
        self._draining = False
        # (stream sample, monotonic time): audio up to that sample had arrived by then; for
        # processing_latency_ms. Pruned to what events still to come can refer to; bounded.
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4096)
        self._final_arrival: dict[int, float] = {}  # utterance -> arrival of its end, for its Analysis
        self._caught_up = asyncio.Event()  # the driver applied work: a waiting send looks again
        self._driver = asyncio.get_running_loop().create_task(self._drive(), name=f"session-{self.id}")

    # ---- client side --------------------------------------------------------------------

    async def send(self, data: bytes | np.ndarray) -> None:
        """Audio. Decoding and VAD run in the feed pool; the driver then asks for model work."""
        if self._draining:
            return
        loop = asyncio.get_running_loop()
        # backpressure: wait (without reading more of the client's audio, so its transport
        # slows it) while this session's ended utterances wait for the model
        limit = self.engine.opt.max_queued_s * 16000
        while self.session.queued_samples() > limit and not self._closed.is_set():
            self._caught_up.clear()
            await self._caught_up.wait()
        async with self._lock:
            fmt = self.session.config.audio
            if self.session.intake.samples_in / fmt.sample_rate > self.engine.opt.max_session_s:
                raise SessionLimitError(f"session over {self.engine.opt.max_session_s:g} s of audio; open a new one")
            before = self.session.intake.samples_in
            if self.engine.opt.feed_inline:
                self.session.feed(data)
            else:
                await _to_the_end(loop.run_in_executor(self.engine.feed_pool, self.session.feed, data))
            self.engine.metrics.audio.inc((self.session.intake.samples_in - before) / fmt.sample_rate)
            self._arrivals.append((self.session.position, time.monotonic()))
        self._kick.set()

    async def finalize(self) -> None:
        async with self._lock:
            self.session.finalize()
        self._kick.set()

    async def end(self) -> None:
        """End of stream: the open utterance is finished; events() ends after the last result."""
        async with self._lock:
            self.session.end_of_stream()
        self._kick.set()

    async def drain(self) -> None:
        """The server is stopping: finish the open utterance; audio still arriving is dropped
        quietly (the client resumes elsewhere and re-sends it from the resume point)."""
        self._draining = True
        await self.end()

    async def abort(self) -> None:
        """The client went away: finish what was heard, keep the results in the store for a resume."""
        await self.end()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def cancel(self) -> None:
        """Stop the driver now (the engine stopping without a drain); the session closes as it is."""
        self._driver.cancel()

    def store_down(self, message: str) -> None:
        """The store failed for this session: tell the client once (a non-fatal
        ``state_unavailable``); storing is tried again with the next result."""
        self._store_down = True
        self.session.warn("state_unavailable", message)

    async def events(self) -> AsyncIterator[Event]:
        """Events in order until the session closes."""
        while (ev := await self._out.get()) is not None:
            yield ev

    # ---- driver ---------------------------------------------------------------------------

    async def _drive(self) -> None:
        s, eng = self.session, self.engine
        try:
            while True:  # until closed and everything published (a session may close with events pending)
                self._kick.clear()  # before asking: a send after this point wakes the wait below
                async with self._lock:
                    req = s.next_work(allow_partial=not eng.overloaded, partial_spacing=eng.partial_spacing())
                if req is None:
                    await self._publish()
                    if s.state is State.CLOSED:
                        break
                    await self._kick.wait()
                    continue
                started = time.monotonic()
                try:
                    result = await self._run(req)
                    eng.metrics.work.labels(type(req).__name__.removesuffix("Request").lower()).observe(time.monotonic() - started)
                except OsumError as e:
                    async with self._lock:
                        s.fail(req, e)
                else:
                    async with self._lock:
                        s.apply(req, result)
                self._caught_up.set()
                await self._publish()
        except _SlowConsumer:
            log.warning("session %s: client not reading events; closing", self.id, extra={"session_id": self.id})
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug of ours: this session ends with an error it can see; the others go on
            log.exception("session %s: driver failed", self.id, extra={"session_id": self.id})
            with contextlib.suppress(Exception):
                async with self._lock:
                    s.fatal("internal", "internal error; the session has ended")
                await self._publish()
        finally:
            self._caught_up.set()
            await self._finish()

    async def _run(self, req: Any) -> Any:
        """Run a request on the scheduler. Until its result comes, what happens meanwhile is
        published as it happens: what the client's audio produces (SpeechStarted, SpeechEnded,
        audio errors: an endpoint is told at once, not after the model's request, up to a second
        on CPU) and a chat reply's pieces as the model writes them."""
        pieces: deque[str] = deque()  # a chat reply so far: filled on the model's thread, emptied here
        if isinstance(req, AnalysisRequest) and req.chat:
            loop = asyncio.get_running_loop()

            def on_reply(text: str) -> None:  # the model's worker thread
                pieces.append(text)
                loop.call_soon_threadsafe(self._kick.set)

            req.on_reply = on_reply
        task = asyncio.ensure_future(self.engine.scheduler.run(req))
        try:
            while True:
                self._kick.clear()
                kick = asyncio.ensure_future(self._kick.wait())
                await asyncio.wait({task, kick}, return_when=asyncio.FIRST_COMPLETED)
                kick.cancel()
                if pieces:
                    latest = pieces[-1]  # the text so far: only the newest matters
                    pieces.clear()
                    async with self._lock:
                        self.session.reply_so_far(req.utterance_id, latest)
                if task.done():
                    return task.result()  # the driver publishes next, after applying it
                await self._publish()
        finally:
            task.cancel()  # a no-op once done; else the driver itself is being cancelled

    def _arrived(self, end: float) -> float | None:
        """When the audio up to stream time ``end`` had arrived (None: no longer known)."""
        sample = round(end * 16000)
        for at, t in self._arrivals:
            if at >= sample:
                return t
        return None

    def _with_latency(self, events: list[Event]) -> list[Event]:
        """Partials, Finals and Analyses with ``processing_latency_ms`` (time since their audio arrived)."""
        now, out = time.monotonic(), []
        for ev in events:
            t: float | None = None
            if isinstance(ev, (Partial, Final)):
                t = self._arrived(ev.end)
                if isinstance(ev, Final) and t is not None and self.session.config.tasks:
                    self._final_arrival[ev.utterance_id] = t
                    while len(self._final_arrival) > 16:  # tags never asked for, or failed: forget
                        del self._final_arrival[next(iter(self._final_arrival))]
            elif isinstance(ev, Analysis):
                t = self._final_arrival.pop(ev.utterance_id, None)
            if t is None:
                out.append(ev)
                continue
            self.engine.metrics.latency.labels(ev.type).observe(now - t)
            out.append(dataclasses.replace(ev, processing_latency_ms=round((now - t) * 1000, 1)))
        keep = self.session.pending_from()
        while self._arrivals and self._arrivals[0][0] < keep:  # no event to come ends before `keep`
            self._arrivals.popleft()
        return out

    async def _publish(self) -> None:
        # only the driver publishes (between requests, and in _run while one runs): in order
        async with self._lock:  # a feed thread may be appending events to the session's list
            events = self._with_latency(self.session.drain())
        if any(isinstance(ev, (Final, Analysis)) for ev in events):
            events += await self._persist(events)
        m = self.engine.metrics
        for ev in events:
            m.events.labels(ev.type).inc()
            if isinstance(ev, Error):
                m.errors.labels(ev.code).inc()
            try:
                self._out.put_nowait(ev)  # the usual case, without a timer
            except asyncio.QueueFull:
                try:
                    await asyncio.wait_for(self._out.put(ev), self.engine.opt.slow_consumer_s)
                except TimeoutError:
                    raise _SlowConsumer from None

    async def _persist(self, events: list[Event]) -> list[Event]:
        """Store finalized results. If the store is down the client still gets them (with one
        non-fatal ``state_unavailable`` error per outage); storing resumes when it is back."""
        store = self.engine.store
        try:
            results = [ev.to_dict() for ev in events if isinstance(ev, (Final, Analysis))]
            await store.commit(self.session.snapshot(), results)
        except Exception as e:  # connection refused, timeout, Redis restarting
            self.engine.metrics.errors.labels("state_unavailable").inc()
            if not self._store_down:
                self._store_down = True
                log.warning("session %s: cannot store results (%s); serving on without persistence", self.id, e, extra={"session_id": self.id})
                async with self._lock:
                    self.store_down("session state cannot be stored right now: results are delivered but a resume "
                                    "may not find them")  # fmt: skip
                    return self.session.drain()
            return []
        if self._store_down:
            self._store_down = False
            log.info("session %s: storing results again", self.id, extra={"session_id": self.id})
        return []

    async def _finish(self) -> None:
        try:
            await self.engine.store.save(self.session.snapshot())
        except Exception:  # the store is down: the results already sent stay sent
            log.exception("session %s: could not store the final snapshot", self.id, extra={"session_id": self.id})
        if self.engine.sessions.get(self.id) is self:
            del self.engine.sessions[self.id]
        log.info("session closed", extra={"session_id": self.id, "key": self.owner})
        while True:  # make room for the end marker even if the client stopped reading
            try:
                self._out.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._out.get_nowait()
        self._closed.set()


class _SlowConsumer(Exception):
    pass


async def _to_the_end(work: asyncio.Future[None]) -> None:
    """Await a feed thread's ``work`` to its end, even when the awaiting task is cancelled
    meanwhile (then the cancellation is raised after it). The thread changes the session, so
    the caller's lock must stay held until it is done: a cancelled send (a client that went
    away) once released it mid-feed, ``end()`` then ran beside the feed, and the session was
    left ending with an utterance open, never to close."""
    cancelled = False
    while True:
        try:
            await asyncio.shield(work)
            break
        except asyncio.CancelledError:
            if work.done():  # the work itself was cancelled (the pool shut down)
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError

