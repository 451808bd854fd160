"""The analytics consumer example (clients/analytics/consumer.py) on results an engine wrote to a real Redis."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from streaming.engine import Engine, EngineOptions
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig
from streaming.store import RedisStore

from .redis_server import redis_server

ROOT = Path(__file__).resolve().parent.parent


def _consumer():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("osum_analytics_consumer", ROOT / "clients" / "analytics" / "consumer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_consumer_group_follows_calls_and_recovers_pending_entries(tiny_model, male_clip, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    consumer = _consumer()
    sil = np.zeros(16000, np.float32)
    pcm = (np.concatenate([sil, male_clip, sil, male_clip, sil]) * 32767).astype("<i2").tobytes()

    async def main(url: str) -> tuple[list[dict], list[dict]]:
        engine = Engine(tiny_model, EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6)), store=RedisStore(url))
        await engine.start()
        s = await engine.open_session(SessionConfig(tasks=("emotion",)))
        await s.send(pcm)
        await s.end()
        _ = [ev async for ev in s.events()]
        await engine.stop()

        def crash(entry: dict) -> None:
            raise RuntimeError("worker died")

        with pytest.raises(RuntimeError):  # the first entry is delivered, not acknowledged
            await consumer.consume(url, "dash", "w1", crash, from_start=True, max_entries=1)
        got: list[dict] = []
        n = await consumer.consume(url, "dash", "w1", got.append, max_entries=4)  # pending first, then the rest
        other: list[dict] = []
        await consumer.consume(url, "audit", "a1", other.append, from_start=True, max_entries=4)  # another group sees all
        assert n == 4
        return got, other

    with redis_server(tmp_path) as url:
        got, other = asyncio.run(main(url))
    assert [e["type"] for e in got] == ["Final", "Analysis", "Final", "Analysis"]
    assert [e["event"]["utterance_id"] for e in got] == [0, 0, 1, 1] and len({e["session_id"] for e in got}) == 1
    assert [e["id"] for e in other] == [e["id"] for e in got]
    consumer.handle(got[0])
    consumer.handle(got[1])
    out = capsys.readouterr().out.splitlines()
    assert "final" in out[0] and "analysis  emotion=" in out[1]
