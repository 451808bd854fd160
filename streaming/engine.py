"""The engine: many live sessions over one model, for servers to drive.

    engine = Engine(model, EngineOptions(), store=InMemoryStore())
    await engine.start()
    s = await engine.open_session(SessionConfig(...))         # or resume=session_id
    await s.send(pcm_bytes); await s.finalize(); await s.end()
    async for event in s.events(): ...
    await engine.stop()

Each :class:`~streaming.live.LiveSession` has a driver task that asks its sans-I/O
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
import hashlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from osum.timing import require_aligner

from .errors import OverCapacityError, SessionLimitError, SessionNotFoundError, ShuttingDownError, StateUnavailableError
from .events import event_from_dict
from .live import LiveSession
from .metrics import EngineMetrics
from .scheduler import Scheduler, SchedulerOptions
from .session import Session
from .session_base import SessionConfig, Snapshot
from .store import InMemoryStore, SessionStore

__all__ = ["Engine", "EngineOptions", "LiveSession", "OverCapacityError", "SessionNotFoundError", "SessionLimitError",
           "ShuttingDownError", "StateUnavailableError"]

log = logging.getLogger("streaming.engine")
T = TypeVar("T")


SPACING_PERIOD_S = 0.5  # how often partial_spacing adjusts
MAX_SPACING = 8.0  # at most 8 times partial_step_ms between partials (3.8 s at 480 ms)


@dataclass(frozen=True)
class EngineOptions:
    """Capacity, limits and pacing of one engine, validated once."""

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
    """Many live sessions over one model: opens and resumes them, refuses what it cannot
    serve in time, and shares one model worker and one feed pool among them."""

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
        self.feed_pool = ThreadPoolExecutor(self.opt.feed_threads, thread_name_prefix="osum-feed")  # decoding and VAD
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
            s.cancel()
        self.scheduler.close()
        self.feed_pool.shutdown(wait=False, cancel_futures=True)
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
            live.store_down("session state cannot be stored right now: a resume may not find it")
        return live
