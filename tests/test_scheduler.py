"""The scheduler's batching rules, on the worker thread, with the tiny model's device (CPU)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from streaming.scheduler import Scheduler, SchedulerOptions
from streaming.work import FinalRequest, PartialRequest


def _partial(full: bool) -> PartialRequest:
    audio = np.zeros(16000, np.float32) if full else None
    return PartialRequest(torch.zeros(80, 0), None, torch.zeros(0, 8), [], [], audio=audio)


def test_on_cpu_full_context_partials_run_one_per_batch_so_finals_wait_for_one(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Full-context partials run one after another inside a CPU batch, so the scheduler takes
    them one at a time (chunked ones still batch): a final queued behind them runs after at
    most one, not after all."""
    sched = Scheduler(tiny_model, SchedulerOptions(max_batch=8, max_wait_ms=1))
    gate, ran = threading.Event(), []

    def partials(reqs: list) -> list:  # type: ignore[type-arg]
        gate.wait(30)
        ran.append(("partial", ["full" if r.audio is not None else "chunked" for r in reqs]))
        return [None] * len(reqs)

    def finals(reqs: list) -> list:  # type: ignore[type-arg]
        ran.append(("final", [len(reqs)]))
        return [None] * len(reqs)

    sched._runners[PartialRequest], sched._runners[FinalRequest] = partials, finals

    async def main() -> None:
        sched.start()
        first = asyncio.ensure_future(sched.run(_partial(True)))
        while sched.queued:  # until the worker has taken the first (and waits at the gate)
            await asyncio.sleep(0.01)
        queued = [_partial(f) for f in (True, True, False, False, True)]
        rest = [asyncio.ensure_future(sched.run(r)) for r in queued]
        await asyncio.sleep(0.05)
        final = asyncio.ensure_future(sched.run(FinalRequest(np.zeros(1600, np.float32))))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, final, *rest)

    try:
        asyncio.run(main())
    finally:
        sched.close()
    assert ran == [("partial", ["full"]), ("final", [1]), ("partial", ["full"]), ("partial", ["full"]),
                   ("partial", ["chunked", "chunked"]), ("partial", ["full"])]  # fmt: skip


def test_utilization_is_the_workers_recent_busy_fraction(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The engine spaces partials out by it: 0 when idle, about the share of the window spent
    running batches, and a batch still running counts up to now."""
    import time

    from streaming import scheduler as sched_mod
    from streaming.engine import Engine, EngineOptions

    sched = Scheduler(tiny_model, SchedulerOptions(max_batch=1, max_wait_ms=1))
    gate = threading.Event()

    def busy(reqs: list) -> list:  # type: ignore[type-arg]
        if reqs[0].final_chunk:
            gate.wait(30)
        else:
            time.sleep(0.25)
        return [None] * len(reqs)

    sched._runners[PartialRequest] = busy
    assert sched.utilization == 0.0

    async def main() -> tuple[float, float]:
        sched.start()
        await asyncio.gather(*(sched.run(_partial(False)) for _ in range(4)))  # 1 s of work
        done = sched.utilization
        stuck = asyncio.ensure_future(sched.run(PartialRequest(torch.zeros(80, 0), None, torch.zeros(0, 8), [], [],
                                                               final_chunk=True)))  # fmt: skip
        await asyncio.sleep(0.5)
        running = sched.utilization
        gate.set()
        await stuck
        return done, running

    try:
        done, running = asyncio.run(main())
    finally:
        sched.close()
    window = sched_mod.UTILIZATION_WINDOW_S
    assert 0.9 / window <= done <= 1.3 / window
    assert done + 0.4 / window <= running <= done + 0.7 / window

    from streaming import engine as engine_mod

    engine = Engine(tiny_model, EngineOptions(partial_load=0.5))
    engine.scheduler._busy.append((time.monotonic() - 4.0, time.monotonic() + 60))  # busy: 4 of the last 5 s and on
    seen, now = [], time.monotonic()
    for _ in range(14):  # a busy worker: the factor grows by a quarter a period, up to its bound
        now += engine_mod.SPACING_PERIOD_S
        seen.append(engine.partial_spacing(now))
    assert seen[:3] == [1.25, 1.25**2, 1.25**3] and seen[-1] == engine_mod.MAX_SPACING
    assert engine.partial_spacing(now + engine_mod.SPACING_PERIOD_S / 2) == engine_mod.MAX_SPACING  # within a period: unchanged
    engine.scheduler._busy.clear()  # idle: it shrinks back to 1
    for _ in range(12):
        now += engine_mod.SPACING_PERIOD_S
        seen.append(engine.partial_spacing(now))
    assert seen[14] == engine_mod.MAX_SPACING * 0.8 and seen[-1] == 1.0
    with pytest.raises(ValueError, match="partial_load"):
        EngineOptions(partial_load=0)
