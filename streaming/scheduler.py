"""The model's one worker: batches the work of many sessions, off the event loop.

Sessions submit requests from the event loop with ``await scheduler.run(req)``; a
single worker thread owns the model and, each round, takes up to ``max_batch``
requests of the most urgent kind (finals, then analyses, then partials), waiting up to
``max_wait_ms`` for more of that kind to arrive, runs them as one batch, and resolves
their futures on the loop.

Bounds: each session has at most one request in flight, so the queue is bounded by the
number of sessions, which the engine caps; :attr:`Scheduler.backlog_seconds` estimates
how far behind real time the worker is, so the engine can stop asking for partials and
refuse new sessions ("over capacity") rather than fall behind. When a batch raises, its
requests run again one at a time, so only a request that fails alone fails (``model_error``):
one session's bad work never fails the others'.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from osum.decoding import DecodingOptions
from osum.errors import OsumError

from .work import AnalysisRequest, FinalRequest, PartialRequest, run_analyses, run_finals, run_partials

__all__ = ["Scheduler", "SchedulerOptions", "ModelError", "SchedulerClosed"]

log = logging.getLogger("streaming.scheduler")


class ModelError(OsumError):
    code = "model_error"


class SchedulerClosed(OsumError):
    code = "shutting_down"


@dataclass(frozen=True)
class SchedulerOptions:
    max_batch: int = 8
    max_wait_ms: float = 5.0
    final_max_tokens: int = 200
    # how Finals decode: None, greedy (each verifies its session's last partial in one pass);
    # else these options for every Final, e.g. ``DecodingOptions.osum_paper()`` (OSUM's beam
    # sampling) or a beam: the transcript offline recognition gives with them, at several
    # times the final pass's cost and latency (osum-mini, beam 4: no better, docs/osum-mini.md)
    final_decoding: DecodingOptions | None = None


_ORDER = (FinalRequest, AnalysisRequest, PartialRequest)
UTILIZATION_WINDOW_S = 5.0  # what "recently busy" means for the partials' spacing


class Scheduler:
    def __init__(self, model: Any, options: SchedulerOptions | None = None) -> None:
        self.model = model
        self.opt = options or SchedulerOptions()
        self._queues: dict[type, deque[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]] = {
            k: deque() for k in _ORDER
        }
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.requests = 0
        self._busy: deque[tuple[float, float]] = deque()  # (start, end) of the batches of the last window
        self._running_since: float | None = None
        device = getattr(model, "device", None)
        self._device_type = getattr(device, "type", "cpu")
        self._runners: dict[type, Callable[[list[Any]], list[Any]]] = {
            FinalRequest: lambda reqs: run_finals(self.model, reqs, self.opt.final_max_tokens, self.opt.final_decoding),
            AnalysisRequest: lambda reqs: run_analyses(self.model, reqs),
            PartialRequest: lambda reqs: run_partials(self.model, reqs),
        }

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="osum-model-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop taking work; requests still queued fail with :class:`SchedulerClosed`. Idempotent."""
        with self._cv:
            self._closed = True
            pending = [item for q in self._queues.values() for item in q]
            for q in self._queues.values():
                q.clear()
            self._cv.notify_all()
        for _req, fut, loop in pending:
            loop.call_soon_threadsafe(_set_exception, fut, SchedulerClosed("the engine is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    @property
    def backlog_seconds(self) -> float:
        """How long the oldest queued request has waited (0 when idle): the lag behind real time."""
        with self._cv:
            oldest = min((item[1]._osum_t for q in self._queues.values() for item in q), default=None)  # type: ignore[attr-defined]
        return 0.0 if oldest is None else time.monotonic() - oldest

    @property
    def utilization(self) -> float:
        """The worker's busy fraction over the last ``UTILIZATION_WINDOW_S`` seconds (0 to 1),
        counting a batch still running up to now."""
        now = time.monotonic()
        since = now - UTILIZATION_WINDOW_S
        with self._cv:
            spans = list(self._busy) + ([(self._running_since, now)] if self._running_since is not None else [])
        busy = sum(max(0.0, end - max(start, since)) for start, end in spans)
        return min(1.0, busy / UTILIZATION_WINDOW_S)

    async def run(self, req: Any) -> Any:
        """Run one request on the model (batched with others); returns its result."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        fut._osum_t = time.monotonic()  # type: ignore[attr-defined]
        with self._cv:
            if self._closed:
                raise SchedulerClosed("the engine is shutting down")
            self._queues[type(req)].append((req, fut, loop))
            self._cv.notify()
        return await fut

    def _take(self) -> tuple[type, list[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]] | None:
        with self._cv:
            while not self._closed and not any(self._queues.values()):
                self._cv.wait()
            if self._closed:
                return None
            kind = next(k for k in _ORDER if self._queues[k])
            deadline = time.monotonic() + self.opt.max_wait_ms / 1000
            q = self._queues[kind]
            while len(q) < self.opt.max_batch and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)  # more of this kind may come; a close wakes us too
                if self._closed:
                    return None
            batch = [q.popleft() for _ in range(min(len(q), self._batch_limit(kind, q)))]
            return kind, batch

    def _batch_limit(self, kind: type, q: deque[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]) -> int:
        """How many of the queue's leading requests one batch takes. On CPU, full-context
        partials run one after another inside a batch (``work._full_partials``), so batching
        them gains nothing and would make a final that arrives meanwhile wait for all of
        them: there a batch takes them one at a time, and finals wait for at most one."""
        if kind is not PartialRequest or self._device_type != "cpu":
            return self.opt.max_batch
        n = 0
        for req, _, _ in q:  # the chunked ones up to the first full-context one, or that one alone
            if n == self.opt.max_batch:
                break
            if req.audio is not None:
                return n or 1
            n += 1
        return n

    def _worker(self) -> None:
        while (taken := self._take()) is not None:
            kind, batch = taken
            batch = [item for item in batch if not item[1].cancelled()]
            if batch:
                self._run(kind, batch)

    def _run(self, kind: type, batch: list[tuple[Any, asyncio.Future[Any], asyncio.AbstractEventLoop]]) -> None:
        """Run one batch and hand back its results. If it raises, its requests run again one at
        a time, so that only work which fails alone fails: one session's bad request never
        costs the others theirs."""
        start = time.monotonic()
        with self._cv:
            self._running_since = start
        try:
            results = self._runners[kind]([req for req, _, _ in batch])
        except Exception as e:  # one bad batch must not kill the worker
            self._ran(start)
            log.exception("model work failed (%s x%d)", kind.__name__, len(batch))
            if len(batch) == 1:
                _req, fut, loop = batch[0]
                _hand_back(loop, _set_exception, fut, ModelError(f"model work failed: {type(e).__name__}"))
            else:
                for item in batch:
                    self._run(kind, [item])
            return
        self._ran(start)
        self.batches += 1
        self.requests += len(batch)
        for (_req, fut, loop), res in zip(batch, results):
            _hand_back(loop, _set_result, fut, res)

    def _ran(self, start: float) -> None:
        end = time.monotonic()
        with self._cv:
            self._running_since = None
            self._busy.append((start, end))
            while self._busy and self._busy[0][1] < end - UTILIZATION_WINDOW_S:
                self._busy.popleft()


def _hand_back(loop: asyncio.AbstractEventLoop, setter: Any, fut: asyncio.Future[Any], value: Any) -> None:
    """Give a result to the loop that asked for it; nobody waits any more if that loop has
    closed meanwhile (a request still running when its engine stopped without draining)."""
    try:
        loop.call_soon_threadsafe(setter, fut, value)
    except RuntimeError:  # "Event loop is closed"
        pass


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
