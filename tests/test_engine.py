"""The async engine: many sessions on one worker, capacity, resume, slow clients, the Redis store."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from streaming.engine import (
    Engine,
    EngineOptions,
    OverCapacityError,
    ShuttingDownError,
    SessionLimitError,
    SessionNotFoundError,
    StateUnavailableError,
)
from streaming.events import Analysis, Error, Final, Partial, SpeechEnded, SpeechStarted
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig
from streaming.store import InMemoryStore, RedisStore

from .redis_server import redis_server

SIL = np.zeros(16000, np.float32)
CFG = SessionConfig(max_partial_tokens=4, tasks=("emotion",))
OPTS = EngineOptions(scheduler=SchedulerOptions(max_batch=4, max_wait_ms=20, final_max_tokens=6))


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def _talk(engine: Engine, audio: np.ndarray, chunk: int = 6400, end: bool = True, cfg: SessionConfig = CFG):  # type: ignore[no-untyped-def]
    s = await engine.open_session(cfg)
    data = _pcm(audio)
    for i in range(0, len(data), chunk):
        await s.send(data[i : i + chunk])
    if end:
        await s.end()
    return s


async def _collect(s) -> list:  # type: ignore[no-untyped-def]
    return [ev async for ev in s.events()]


def test_concurrent_sessions_share_batches(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    # a batch forms from requests of one kind queued within max_wait_ms of each other. With
    # partials on, the sessions' finals come apart by however long the partials queued before
    # them took (on CPU those run one at a time), which on a loaded CI machine was more than
    # 20 ms and then more than 200 ms (13 requests in 13 batches, twice). So no partials here
    # (a step longer than any clip): the finals, then the analyses, are queued together
    opts = replace(OPTS, scheduler=replace(OPTS.scheduler, max_wait_ms=500))
    cfg = replace(CFG, partial_step_ms=60_000)

    async def main() -> list[list]:
        engine = Engine(tiny_model, opts)
        await engine.start()
        clips = [male_clip, female_clip, male_clip[::-1].copy(), female_clip]
        sessions = await asyncio.gather(*(_talk(engine, np.concatenate([SIL, c, SIL]), cfg=cfg) for c in clips))
        results = await asyncio.gather(*(_collect(s) for s in sessions))
        print(f"{engine.scheduler.requests} requests in {engine.scheduler.batches} batches")
        assert engine.scheduler.batches < engine.scheduler.requests  # work of several sessions was batched
        await engine.stop()
        return results

    results = asyncio.run(main())
    for events in results:
        kinds = [type(e) for e in events]
        assert kinds[0] is SpeechStarted and Final in kinds and kinds[-1] is Analysis
        assert [e.seq for e in events] == list(range(len(events)))
    # the same audio gives the same final, whatever else ran in its batch
    assert [e.transcript for e in results[1] if isinstance(e, Final)] == [e.transcript for e in results[3] if isinstance(e, Final)]


def test_over_capacity_and_stopping(tiny_model) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = Engine(tiny_model, replace(OPTS, max_sessions=1))
        with pytest.raises(OverCapacityError, match="not accepting"):
            await engine.open_session(CFG)
        await engine.start()
        await engine.open_session(CFG)
        with pytest.raises(OverCapacityError, match="over capacity"):
            await engine.open_session(CFG)
        await engine.stop()
        # a stopped (draining) engine says so: the client goes elsewhere now rather than waiting here
        with pytest.raises(ShuttingDownError, match="shutting down"):
            await engine.open_session(CFG)
        assert engine.metrics.refused.labels("shutting_down")._value.get() == 1

    asyncio.run(main())


def _resume_flow(tiny_model, male_clip, store) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = Engine(tiny_model, OPTS, store=store)
        await engine.start()
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL]), end=False)
        first = []
        async for ev in s.events():  # the client reads up to the SpeechStarted, then vanishes
            first.append(ev)
            if isinstance(ev, SpeechStarted):
                break
        await s.abort()  # abrupt disconnect: the utterance is still finished and stored
        for bad in ("nope", s.id, s.id + ".0123456789abcdef0123456789abcdef"):  # a bare or forged id is not a token
            with pytest.raises(SessionNotFoundError):
                await engine.open_session(CFG, resume=bad)
        with pytest.raises(SessionNotFoundError):  # only the key that opened it may resume it
            await engine.open_session(CFG, resume=s.resume_token, owner="mallory")
        r = await engine.open_session(CFG, resume=s.resume_token, last_seq=first[-1].seq)
        data = _pcm(np.concatenate([male_clip, SIL]))
        for i in range(0, len(data), 6400):
            await r.send(data[i : i + 6400])
        await r.end()
        later = await _collect(r)
        await engine.stop()
        replayed = [e for e in later if e.seq < later[-1].seq and isinstance(e, (Final, Analysis)) and e.utterance_id == 0]
        assert [type(e) for e in replayed[:2]] == [Final, Analysis]  # the unacknowledged results, once each
        seqs = [e.seq for e in later]
        assert seqs == sorted(set(seqs)) and seqs[0] > first[-1].seq
        finals = [e for e in later if isinstance(e, Final)]
        assert [f.utterance_id for f in finals] == [0, 1]  # numbering continues
        assert finals[1].start > finals[0].end

    asyncio.run(main())


def test_resume_with_memory_store(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    _resume_flow(tiny_model, male_clip, InMemoryStore())


def test_resume_with_redis(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with redis_server(tmp_path) as url:
        _resume_flow(tiny_model, male_clip, RedisStore(url))


def test_redis_store_layout(tmp_path: Path) -> None:
    """Snapshot hash with a TTL, a per-session results stream, the global analytics stream."""
    from streaming.session_base import Snapshot

    async def main() -> None:
        store = RedisStore(url, ttl_s=60, max_results=3)
        assert await store.ping()
        snap = Snapshot("abc", {"tasks": ["emotion"]}, seq=7, next_utterance=2, audio_offset=16000, finals=[{"seq": 3}])
        await store.save(snap)
        assert await store.load("abc") == snap and await store.load("zzz") is None
        assert 0 < await store.redis.ttl("osum:session:abc") <= 60
        for seq in range(5):
            await store.add_result("abc", {"type": "Final", "seq": seq, "transcript": f"t{seq}"})
        assert [e["seq"] for e in await store.results_after("abc", 2)] == [3, 4]
        assert await store.redis.xlen("osum:results:abc") == 3  # trimmed to max_results
        entries = await store.redis.xrange("osum:results")
        assert [json.loads(f["event"])["transcript"] for _, f in entries] == [f"t{i}" for i in range(5)]
        await store.delete("abc")
        assert await store.load("abc") is None
        await store.close()

    with redis_server(tmp_path) as url:
        asyncio.run(main())


def test_resume_after_the_ttl_is_refused_and_the_global_stream_is_trimmed(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Past the store's TTL a resume token finds nothing (session_not_found: open a new
    session); the global analytics stream stays near ``global_maxlen`` however many results come."""

    async def main() -> None:
        store = RedisStore(url, ttl_s=1, global_maxlen=10)
        await store.redis.config_set("stream-node-max-entries", 5)  # MAXLEN ~ trims whole nodes: small ones here
        engine = Engine(tiny_model, OPTS, store=store)
        await engine.start()
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL]))
        await _collect(s)
        again = await engine.open_session(CFG, resume=s.resume_token)  # within the TTL: the same session
        assert again.id == s.id
        await again.end()
        await _collect(again)
        await asyncio.sleep(2.5)  # past the TTL (Redis expires the keys itself)
        with pytest.raises(SessionNotFoundError, match="expired"):
            await engine.open_session(CFG, resume=s.resume_token)
        for seq in range(60):
            await store.add_result("other", {"type": "Final", "seq": seq})
        assert 10 <= await store.redis.xlen("osum:results") <= 15
        await engine.stop()

    with redis_server(tmp_path) as url:
        asyncio.run(main())


def test_slow_client_loses_only_its_session(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = Engine(tiny_model, replace(OPTS, event_queue=1, slow_consumer_s=0.2))
        await engine.start()
        slow = await _talk(engine, np.concatenate([SIL, male_clip, SIL]))  # never reads
        fast = await engine.open_session(CFG)
        reading = asyncio.create_task(_collect(fast))  # reads while it sends, as a real client does
        data = _pcm(np.concatenate([SIL, male_clip, SIL]))
        for i in range(0, len(data), 6400):
            await fast.send(data[i : i + 6400])
        await fast.end()
        got = await reading
        assert any(isinstance(e, Final) for e in got)
        await asyncio.wait_for(slow.wait_closed(), 30)
        assert slow.id not in engine.sessions
        await engine.stop()

    asyncio.run(main())


def test_bad_audio_reports_an_error_event(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> list:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        s = await engine.open_session(replace(CFG, audio=replace(CFG.audio, max_chunk_bytes=4096)))
        await s.send(b"\x00" * 10000)
        await s.send(_pcm(np.concatenate([SIL, male_clip, SIL]))[:4000])
        await s.end()
        events = await _collect(s)
        await engine.stop()
        return events

    events = asyncio.run(main())
    assert isinstance(events[0], Error) and events[0].code == "invalid_audio" and not events[0].fatal


def test_metrics_count_what_happened(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> str:
        engine = Engine(tiny_model, replace(OPTS, max_sessions=1))
        await engine.start()
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL]))
        with pytest.raises(OverCapacityError):
            await engine.open_session(CFG)
        await _collect(s)
        text = engine.metrics.render().decode()
        await engine.stop()
        return text

    text = asyncio.run(main())
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['osum_sessions_opened_total{resumed="false"}'] == 1
    assert samples['osum_sessions_refused_total{code="over_capacity"}'] == 1
    assert samples["osum_audio_seconds_total"] == pytest.approx(6.0, abs=0.01)
    assert samples['osum_events_total{type="Final"}'] == 1 and samples['osum_events_total{type="Analysis"}'] == 1
    assert samples['osum_work_seconds_count{kind="final"}'] == 1


def test_resuming_at_capacity_replaces_the_old_connection(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = Engine(tiny_model, replace(OPTS, max_sessions=1))
        await engine.start()
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL]), end=False)
        r = await engine.open_session(CFG, resume=s.resume_token, last_seq=-1)  # the client reconnected before the old side closed
        assert s._closed.is_set() and engine.sessions == {s.id: r}
        await r.end()
        events = await _collect(r)
        assert [type(e) for e in events if isinstance(e, Final)] == [Final]  # the first utterance, replayed once
        await engine.stop()

    asyncio.run(main())


def test_per_key_session_limit_and_session_length(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        engine = Engine(tiny_model, replace(OPTS, max_sessions_per_key=1, max_session_s=2.0))
        await engine.start()
        a = await engine.open_session(CFG, owner="alice")
        with pytest.raises(SessionLimitError, match="alice"):
            await engine.open_session(CFG, owner="alice")
        b = await engine.open_session(CFG, owner="bob")  # another key is not affected
        await a.send(_pcm(male_clip[:40000]))  # 2.5 s: over the limit only after this chunk
        with pytest.raises(SessionLimitError, match="over 2 s"):
            await a.send(_pcm(SIL[:1600]))
        for s in (a, b):
            await s.end()
            await _collect(s)
        again = await engine.open_session(CFG, owner="alice")  # the closed session freed the place
        await again.end()
        await engine.stop()

    asyncio.run(main())


def test_redis_outage_and_restart_mid_session(tiny_model, male_clip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Redis going away does not end a call: results still reach the client (with one warning);
    storing resumes when Redis is back; a resume meanwhile is refused with a retry hint."""
    import redis.asyncio as redis

    utt = _pcm(np.concatenate([male_clip, SIL]))

    async def main(url: str) -> tuple[list, list, list]:
        store = RedisStore(url)
        engine = Engine(tiny_model, OPTS, store=store)
        await engine.start()
        s = await engine.open_session(CFG)
        reading = asyncio.create_task(_collect(s))
        await s.send(_pcm(SIL) + utt)
        while len(s.session.finals) < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # its Analysis
        r = redis.from_url(url)
        with contextlib.suppress(Exception):
            await r.shutdown(nosave=True)  # Redis goes away mid-call
        await r.aclose()
        await s.send(utt)

        async def outage_noticed() -> None:  # utterance 1 final, and its store commit failed
            # (not just the final: the commit may still be retrying when Redis comes back below)
            while len(s.session.finals) < 2 or not s._store_down:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(outage_noticed(), 60)
        assert not await store.ping()
        with pytest.raises(StateUnavailableError):
            await engine.open_session(CFG, resume=s.resume_token)
        with redis_server(tmp_path) as again:  # Redis is back (empty: it kept nothing)
            assert again == url
            await s.send(utt)
            await s.end()
            events = await reading
            stored = await store.results_after(s.id, -1)
            await engine.stop()
        return events, stored, [e for e in events if isinstance(e, Error)]

    with redis_server(tmp_path) as url:
        events, stored, errors = asyncio.run(main(url))
    finals = [e for e in events if isinstance(e, Final)]
    assert [f.utterance_id for f in finals] == [0, 1, 2]  # every result reached the client
    assert [e.code for e in errors] == ["state_unavailable"] and not errors[0].fatal  # one warning per outage
    assert [e["utterance_id"] for e in stored if e["type"] == "Final"] == [2]  # stored again once Redis was back


def test_backpressure_stops_reading_audio_until_the_model_catches_up(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A client sending faster than the model works is held in ``send`` (so its transport
    slows it) instead of its ended utterances piling up without bound."""
    import threading

    from streaming.work import FinalRequest

    gate = threading.Event()

    async def main() -> tuple[list, int]:
        engine = Engine(tiny_model, replace(OPTS, max_queued_s=1.0))
        await engine.start()
        run_finals = engine.scheduler._runners[FinalRequest]
        engine.scheduler._runners[FinalRequest] = lambda reqs: gate.wait(60) and run_finals(reqs)  # a stalled model
        s = await engine.open_session(CFG)
        reading = asyncio.create_task(_collect(s))
        two = np.concatenate([SIL, male_clip, SIL, male_clip, SIL])
        await s.send(_pcm(two))  # two utterances end in this chunk: queued past the limit
        assert s.session.queued_samples() > 16000
        heard = s.session.intake.samples_in
        more = asyncio.create_task(s.send(_pcm(two)))
        await asyncio.sleep(0.5)
        blocked = not more.done() and s.session.intake.samples_in == heard  # waiting, this audio not read
        gate.set()
        await asyncio.wait_for(more, 60)
        await s.end()
        events = await asyncio.wait_for(reading, 120)
        await engine.stop()
        return events, blocked

    events, blocked = asyncio.run(main())
    assert blocked
    assert [e.utterance_id for e in events if isinstance(e, Final)] == [0, 1, 2, 3]  # nothing lost


def test_results_carry_their_processing_latency(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def main() -> tuple[list, int]:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL, male_clip, SIL]), chunk=3200)
        events = await _collect(s)
        await engine.stop()
        return events, len(s._arrivals)

    events, arrivals = asyncio.run(main())
    timed = [e for e in events if isinstance(e, (Partial, Final, Analysis))]
    assert {type(e) for e in timed} == {Partial, Final, Analysis}
    for e in timed:  # from the arrival of the audio it covers to the event: positive, and not absurd
        assert e.processing_latency_ms is not None and 0 < e.processing_latency_ms < 60_000, e
    finals = {e.utterance_id: e for e in timed if isinstance(e, Final)}
    for a in (e for e in timed if isinstance(e, Analysis)):  # measured from the same audio as its Final
        assert a.processing_latency_ms >= finals[a.utterance_id].processing_latency_ms  # type: ignore[operator]
    assert arrivals <= 1  # arrival times are kept only while an event may still refer to them


def test_a_send_cancelled_mid_feed_keeps_the_session_whole(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A server cancels a reader that is inside ``send`` when its client goes away, and then
    ends the session. The chunk being fed is fed to its end first: its utterance gets its
    Final, nothing starts after the end, and the session closes (it once stayed open for
    good, ending with an utterance open, when the lock was let go mid-feed)."""
    speech = _pcm(np.concatenate([SIL, male_clip, male_clip, SIL]))  # ~10 s in one chunk: the feed takes a while

    async def main() -> list:  # type: ignore[type-arg]
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        s = await engine.open_session(CFG)
        sending = asyncio.create_task(s.send(speech))
        await asyncio.sleep(0.02)  # inside the feed thread by now
        assert not sending.done()
        sending.cancel()
        await s.end()  # what the servers do after cancelling their reader
        with pytest.raises(asyncio.CancelledError):
            await sending
        async with asyncio.timeout(60):
            events = await _collect(s)
            await s.wait_closed()
        assert not engine.sessions
        await engine.stop()
        return events

    events = asyncio.run(main())
    started = [e.utterance_id for e in events if isinstance(e, SpeechStarted)]
    finals = [e.utterance_id for e in events if isinstance(e, Final)]
    assert started and finals == started  # every utterance heard was finished, none opened after the end
    assert not [e for e in events if isinstance(e, Error)]


def test_the_endpoint_is_published_while_the_model_is_busy(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """SpeechStarted and SpeechEnded (UtteranceEnd on the wire) go out when the VAD decides,
    not after the model's request in flight: here the first request is held until the client
    has seen the endpoint."""

    async def main() -> list:  # type: ignore[type-arg]
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        release, held = asyncio.Event(), []
        run = engine.scheduler.run

        async def gated(req):  # type: ignore[no-untyped-def]
            held.append(req)
            await release.wait()
            return await run(req)

        engine.scheduler.run = gated  # type: ignore[method-assign]
        s = await _talk(engine, np.concatenate([SIL, male_clip, SIL, SIL]))
        events = []
        try:
            async with asyncio.timeout(20):
                async for ev in s.events():
                    events.append(ev)
                    if isinstance(ev, SpeechEnded):
                        break
            assert len(held) == 1 and not release.is_set()  # the session's first request is still held
        finally:
            release.set()
        events += await _collect(s)
        await engine.stop()
        return events

    events = asyncio.run(main())
    kinds = [type(e) for e in events]
    assert kinds[:2] == [SpeechStarted, SpeechEnded] and Final in kinds and kinds[-1] is Analysis


def test_a_sessions_results_do_not_depend_on_its_batch(male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    """int8: sessions whose Finals and tags meet in one batch get bit for bit what each gets
    alone, and the Finals are offline recognition's (padding changes no bits)."""
    from osum.decoding import DecodingOptions
    from osum.inference import recognize
    from osum.loading import load_model
    from streaming.work import AnalysisRequest, FinalRequest

    model = load_model("tiny", quantize="int8")
    cfg = SessionConfig(interim_results=False, tasks=("emotion",))  # no partials: Finals without drafts batch
    clips = [np.concatenate([SIL, c, SIL]) for c in (male_clip, female_clip, female_clip[: 16000 * 2])]
    sizes: dict[type, list[int]] = {FinalRequest: [], AnalysisRequest: []}

    async def run(group: list[np.ndarray]) -> list[list]:
        engine = Engine(model, replace(OPTS, scheduler=SchedulerOptions(max_batch=4, max_wait_ms=200, final_max_tokens=6)))
        await engine.start()
        for kind, seen in sizes.items():
            runner = engine.scheduler._runners[kind]
            engine.scheduler._runners[kind] = lambda reqs, runner=runner, seen=seen: seen.append(len(reqs)) or runner(reqs)

        async def one(audio: np.ndarray) -> list:
            s = await engine.open_session(cfg)
            await s.send(_pcm(audio))
            await s.end()
            return await _collect(s)

        out = await asyncio.gather(*(one(a) for a in group))
        await engine.stop()
        return list(out)

    together = asyncio.run(run(clips))
    assert max(sizes[FinalRequest]) > 1 and max(sizes[AnalysisRequest]) > 1  # they did share batches
    alone = [asyncio.run(run([c]))[0] for c in clips]
    for audio, t, a in zip(clips, together, alone, strict=True):
        finals = [(e.transcript, e.confidence, e.start, e.end) for e in t if isinstance(e, Final)]
        assert finals and finals == [(e.transcript, e.confidence, e.start, e.end) for e in a if isinstance(e, Final)]
        tags = [e.tags["emotion"].scores for e in t if isinstance(e, Analysis)]
        assert tags == [e.tags["emotion"].scores for e in a if isinstance(e, Analysis)]
        heard = np.frombuffer(_pcm(audio), "<i2").astype(np.float32) / 32768.0
        for _, confidence, start, end in finals:
            seg = heard[round(start * 16000) : round(end * 16000)]
            assert recognize(model, [seg], "asr", DecodingOptions(max_new_tokens=6), score_tags=False)[0].confidence == confidence


def test_a_request_that_fails_costs_only_its_own_session(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    """When a batch raises, its requests run again one at a time: the session whose work fails
    alone gets ``model_error``; the others in that batch get their Finals."""
    from streaming.work import FinalRequest

    poison = 16000 * 26 // 10  # the short utterance's Final is "bad work" for this model

    async def main() -> tuple[list[list], list[int]]:
        engine = Engine(tiny_model, replace(OPTS, scheduler=SchedulerOptions(max_batch=4, max_wait_ms=200, final_max_tokens=6)))
        await engine.start()
        run_finals, sizes = engine.scheduler._runners[FinalRequest], []

        def flaky(reqs: list) -> list:  # type: ignore[type-arg]
            sizes.append(len(reqs))
            if any(r.audio.size < poison for r in reqs):
                raise RuntimeError("this utterance breaks the model")
            return run_finals(reqs)

        engine.scheduler._runners[FinalRequest] = flaky
        cfg = replace(CFG, interim_results=False)

        async def one(audio: np.ndarray) -> list:
            s = await engine.open_session(cfg)
            await s.send(_pcm(np.concatenate([SIL, audio, SIL])))
            await s.end()
            return await _collect(s)

        out = await asyncio.gather(one(male_clip), one(female_clip[: 16000 * 2]), one(male_clip))
        await engine.stop()
        return list(out), sizes

    (healthy, bad, healthy2), sizes = asyncio.run(main())
    assert max(sizes) > 1  # the bad request shared a batch with the others
    for events in (healthy, healthy2):
        assert [e for e in events if isinstance(e, Final)] and not [e for e in events if isinstance(e, Error)]
    assert [e.code for e in bad if isinstance(e, Error)] == ["model_error"]
    assert not [e for e in bad if isinstance(e, Final)]


def test_a_session_whose_driver_fails_ends_with_an_internal_error_and_the_others_go_on(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A bug in one session's work loop is that session's fatal ``internal`` error (no silent
    end, no hang); a concurrent session gets all its results."""

    async def main() -> tuple[list, list]:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        bad, good = await engine.open_session(CFG), await engine.open_session(CFG)

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        bad.session.next_work = broken  # type: ignore[method-assign]
        data = _pcm(np.concatenate([SIL, male_clip, SIL]))

        async def talk(s) -> list:  # type: ignore[no-untyped-def]
            for i in range(0, len(data), 3200):
                with contextlib.suppress(Exception):  # the broken session may refuse audio once it has ended
                    await s.send(data[i : i + 3200])
            with contextlib.suppress(Exception):
                await s.end()
            return await asyncio.wait_for(_collect(s), 60)

        out = await asyncio.gather(talk(bad), talk(good))
        await engine.stop()
        return out[0], out[1]

    bad, good = asyncio.run(main())
    assert [(e.code, e.fatal) for e in bad if isinstance(e, Error)] == [("internal", True)]
    assert not any(isinstance(e, Final) for e in bad)
    assert [e for e in good if isinstance(e, Final)] and not any(isinstance(e, Error) for e in good)


def test_the_servers_final_decoding_reaches_every_final(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """`osum-serve --final-osum-decoding` (or `--final-beam N`): the scheduler decodes each
    Final with those options, as offline recognition with them would; a bad beam is refused
    before a model loads."""
    import argparse

    from osum.decoding import DecodingOptions
    from osum.inference import recognize
    from streaming.app import final_decoding, main

    paper = final_decoding(argparse.Namespace(final_osum_decoding=True, final_beam=1))
    assert paper == DecodingOptions.osum_paper()
    assert final_decoding(argparse.Namespace(final_osum_decoding=False, final_beam=1)) is None  # greedy
    beam = final_decoding(argparse.Namespace(final_osum_decoding=False, final_beam=3))
    assert beam is not None and beam.beam_size == 3
    assert main(["--model", "tiny", "--final-beam", "0"]) == 1  # "cannot start: --final-beam must be >= 1"
    audio = np.concatenate([SIL, male_clip, SIL])

    async def finals(decoding: DecodingOptions | None) -> list[Final]:
        engine = Engine(tiny_model, replace(OPTS, scheduler=replace(OPTS.scheduler, final_decoding=decoding)))
        await engine.start()
        events = await _collect(await _talk(engine, audio, cfg=replace(CFG, tasks=())))
        await engine.stop()
        return [e for e in events if isinstance(e, Final)]

    (ours,) = asyncio.run(finals(paper))
    (greedy,) = asyncio.run(finals(None))
    heard = np.frombuffer(_pcm(audio), "<i2").astype(np.float32) / 32768.0
    seg = heard[round(ours.start * 16000) : round(ours.end * 16000)]
    opts = replace(paper, max_new_tokens=OPTS.scheduler.final_max_tokens)
    assert ours.transcript == recognize(tiny_model, [seg], "asr", opts, score_tags=False)[0].transcript
    assert ours.transcript != greedy.transcript  # the options were used
