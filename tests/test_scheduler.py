"""The scheduler's batching rules, on the worker thread, with the tiny model's device (CPU)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
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
