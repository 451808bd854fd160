"""The engine: many live sessions over one model, for servers to drive.

    engine = Engine(model, EngineOptions(), store=InMemoryStore())
    await engine.start()
    s = await engine.open_session(SessionConfig(...))         # or resume=session_id
    await s.send(pcm_bytes); await s.finalize(); await s.end()
    async for event in s.events(): ...
    await engine.stop()

Each :class:`LiveSession` has a driver task that asks its sans-I/O
:class:`~streaming.session.Session` for model work, runs it on the shared
:class:`~streaming.scheduler.Scheduler` and publishes the resulting events to a bounded
queue and, for finalized results, to the :class:`~streaming.store.SessionStore`. Audio
decoding and VAD run in a small thread pool, never on the event loop.

Capacity: at most ``max_sessions`` sessions; when the worker lags real time by more than
``max_backlog_s`` new sessions are refused with :class:`OverCapacityError` and partials
are skipped until it catches up (finals are never skipped). Optionally (``partial_load``
below 1) partials are spaced out while the worker is busier than that. A client that does not read
its events for ``slow_consumer_s`` loses its session (fatal ``slow_consumer`` error);
others are unaffected.

Limits (:class:`EngineOptions`): sessions in total and per API key (``owner``), audio per
session (``max_session_s``). Resume tokens are ``<session id>.<signature>``, signed with a
secret shared through the store, so a session id seen in logs or analytics cannot be used
to take a session over, and only the key that opened a session may resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from osum.errors import OsumError
from osum.timing import require_aligner

from .events import Analysis, Error, Event, Final, Partial, event_from_dict
from .metrics import EngineMetrics
from .scheduler import Scheduler, SchedulerOptions
from .session import Session, SessionConfig, Snapshot, State
from .store import InMemoryStore, SessionStore
from .work import AnalysisRequest

__all__ = ["Engine", "EngineOptions", "LiveSession", "OverCapacityError", "SessionNotFoundError", "SessionLimitError",
           "ShuttingDownError", "StateUnavailableError"]

log = logging.getLogger("streaming.engine")
T = TypeVar("T")


class OverCapacityError(OsumError):
    code = "over_capacity"


class ShuttingDownError(OsumError):
    """The engine drains (stopped after it started): no new sessions; retry on another replica now."""

    code = "shutting_down"


class SessionNotFoundError(OsumError):
    code = "session_not_found"


class StateUnavailableError(OsumError):
    """The session store cannot be reached (only a resume needs it)."""

    code = "state_unavailable"


class SessionLimitError(OsumError):
    """A per-key or per-session limit (sessions of one key, audio length of one session)."""

    code = "limit_exceeded"


SPACING_PERIOD_S = 0.5  # how often partial_spacing adjusts
MAX_SPACING = 8.0  # at most 8 times partial_step_ms between partials (3.8 s at 480 ms)


@dataclass(frozen=True)
class EngineOptions:
    max_sessions: int = 64
    max_sessions_per_key: int = 0  # 0: no per-key limit
    max_session_s: float = 4 * 3600.0  # audio seconds one session may send
    max_backlog_s: float = 1.0
    # backpressure: a session whose ended utterances still waiting for the model hold more
    # than this much audio stops taking audio (``send`` waits) until the model catches up
    max_queued_s: float = 20.0
    event_queue: int = 256
    slow_consumer_s: float = 10.0
    feed_threads: int = 2
    feed_inline: bool = False  # decode on the event loop: only for sessions whose feed is trivial (null engine)
    # partials are spaced out while the worker is busier than this (its busy fraction over
    # the last seconds, 0 to 1; see Engine.partial_spacing); 1 (the default): never. Off
    # because it did not pay on osum-mini, 2 cores (docs/streaming.md): sparser partials
    # make worse drafts, and the Finals that verify them dearer (337 -> 600 ms a pass)
    partial_load: float = 1.0
    scheduler: SchedulerOptions = field(default_factory=SchedulerOptions)

    def __post_init__(self) -> None:
        for name in ("max_sessions", "event_queue", "feed_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineOptions.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_session_s", "max_backlog_s", "max_queued_s", "slow_consumer_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EngineOptions.{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.partial_load <= 1:
            raise ValueError(f"EngineOptions.partial_load must be in (0, 1], got {self.partial_load}")
        if self.max_sessions_per_key < 0:
            raise ValueError(f"EngineOptions.max_sessions_per_key must be >= 0, got {self.max_sessions_per_key}")


class Engine:
    def __init__(self, model: Any, options: EngineOptions | None = None, store: SessionStore | None = None,
                 scheduler: Any = None) -> None:  # fmt: skip
        self.model = model
        self.opt = options or EngineOptions()
        self.store: SessionStore = store if store is not None else InMemoryStore()
        self.scheduler = scheduler if scheduler is not None else Scheduler(model, self.opt.scheduler)
        self.metrics = EngineMetrics()
        self.metrics.queue.set_function(lambda: self.scheduler.queued)
        self.metrics.active.set_function(lambda: len(self.sessions))
        self.sessions: dict[str, LiveSession] = {}
        self._pool = ThreadPoolExecutor(self.opt.feed_threads, thread_name_prefix="osum-feed")
        self.accepting = False
        self._started = False  # accepting is False both before start and while draining
        self._secret = b""
        self._spacing, self._spacing_at = 1.0, 0.0  # partial_spacing's factor and when it last moved

    async def start(self) -> None:
        self._secret = await self.store.secret()
        self.scheduler.start()
        self._started = True
        self.accepting = True

    def resume_token(self, session_id: str) -> str:
        """The token that lets a client continue ``session_id`` (on any replica sharing the store)."""
        sig = hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{session_id}.{sig}"

    def _new_session(self, sid: str, config: SessionConfig, snapshot: Snapshot | None, owner: str) -> Session:
        return Session(sid, config, self.model, snapshot, owner=owner)

    @staticmethod
    async def _read_state(read: Awaitable[T]) -> T:
        """A store read for a resume; StateUnavailableError when the store is down."""
        try:
            return await read
        except Exception as e:
            raise StateUnavailableError("session state cannot be read right now; retry the resume later") from e

    def _session_for_token(self, token: str) -> str:
        sid, _, sig = token.rpartition(".")
        if not sid or not hmac.compare_digest(self.resume_token(sid), token):
            raise SessionNotFoundError("no session to resume: invalid resume token")
        return sid

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain``, finish every open utterance and store the state. Idempotent."""
        self.accepting = False
        sessions = list(self.sessions.values())
        if drain:
            await asyncio.gather(*(s.drain() for s in sessions), return_exceptions=True)
            await asyncio.gather(*(s.wait_closed() for s in sessions), return_exceptions=True)
        for s in sessions:
            s._driver.cancel()
        self.scheduler.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.store.close()

    @property
    def overloaded(self) -> bool:
        return self.scheduler.backlog_seconds > self.opt.max_backlog_s

    def partial_spacing(self, now: float | None = None) -> float:
        """How much to stretch the step between partials (1 to ``MAX_SPACING``), adjusting it
        first when a period has passed since the last adjustment (``now``: ``time.monotonic()``
        by default). A controller on the worker's busy fraction: every ``SPACING_PERIOD_S``
        the factor grows by a quarter while the worker is busier than ``partial_load`` and
        shrinks by a fifth while it is not, so the worker settles near that load whatever the
        partials cost (a fixed ratio could not: at a full worker it stretched them only
        1 / partial_load times)."""
        now = time.monotonic() if now is None else now
        if now - self._spacing_at >= SPACING_PERIOD_S:
            self._spacing_at = now
            grow = self.scheduler.utilization > self.opt.partial_load
            self._spacing = min(MAX_SPACING, max(1.0, self._spacing * (1.25 if grow else 0.8)))
        return self._spacing

    async def open_session(self, config: SessionConfig, resume: str | None = None, last_seq: int = -1,
                           owner: str = "anonymous") -> LiveSession:  # fmt: skip
        """A new session, or, with ``resume`` (a resume token), the stored one continued
        (results after ``last_seq`` replayed).

        Raises:
            OverCapacityError: too many sessions, the worker lags, or the engine has not started.
            ShuttingDownError: the engine stops (drains).
            SessionLimitError: ``owner`` already has ``max_sessions_per_key`` sessions.
            SessionNotFoundError: the token is invalid, belongs to another key, or nothing is
                stored under it (expired).
            UnsupportedTaskError: word times asked of a model that has no word aligner.
        """
        if config.word_times:
            require_aligner(self.model)
        if not self.accepting:
            if self._started:  # a draining server: "go elsewhere now", not "this one is full, wait"
                self.metrics.refused.labels("shutting_down").inc()
                raise ShuttingDownError("the server is shutting down; open the session on another replica")
            self.metrics.refused.labels("over_capacity").inc()
            raise OverCapacityError("the engine is not accepting sessions yet (starting)")
        if resume is not None:
            resume = self._session_for_token(resume)
        per_key = self.opt.max_sessions_per_key
        if per_key and sum(1 for s in self.sessions.values() if s.owner == owner and s.id != resume) >= per_key:
            self.metrics.refused.labels("limit_exceeded").inc()
            raise SessionLimitError(f"key {owner!r} already has {per_key} open sessions; retry later")
        # a session resuming here replaces its own older connection: it does not need a new place
        taken = len(self.sessions) - (1 if resume is not None and resume in self.sessions else 0)
        if taken >= self.opt.max_sessions or self.overloaded:
            self.metrics.refused.labels("over_capacity").inc()
            raise OverCapacityError(f"over capacity ({len(self.sessions)} sessions); retry later")
        snapshot, replay = None, []
        if resume is not None:
            old = self.sessions.get(resume)
            # read the state before touching a live connection: a refused resume must not end it
            snapshot = await self._read_state(self.store.load(resume))
            if snapshot is None or snapshot.owner != owner or (old is not None and old.owner != owner):
                self.metrics.refused.labels("session_not_found").inc()
                raise SessionNotFoundError("no session to resume for this token (expired, or opened with another key)")
            if old is not None:  # the same session reconnecting here: finish the old connection's side
                await old.abort()
                snapshot = await self._read_state(self.store.load(resume)) or snapshot
            config = SessionConfig.from_dict(snapshot.config)
            replay = [event_from_dict(e) for e in await self._read_state(self.store.results_after(resume, last_seq))]
        sid = resume or uuid.uuid4().hex
        live = LiveSession(self, self._new_session(sid, config, snapshot, owner), replay)
        self.sessions[sid] = live
        self.metrics.opened.labels(str(resume is not None).lower()).inc()
        log.info("session %s %s", "resumed" if resume else "opened", sid, extra={"session_id": sid, "key": owner})
        try:
            await self.store.save(live.session.snapshot())
        except Exception as e:  # a new session works without the store; it just cannot be resumed yet
            log.warning("session %s: cannot store its state (%s)", sid, e, extra={"session_id": sid})
            live._store_down = True
            live.session.warn("state_unavailable", "session state cannot be stored right now: a resume may not find it")
        return live


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
                await _to_the_end(loop.run_in_executor(self.engine._pool, self.session.feed, data))
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
                    self.session.warn("state_unavailable", "session state cannot be stored right now: results are "
                                      "delivered but a resume may not find them")  # fmt: skip
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

