"""``/v1/realtime`` (OpenAI Realtime transcription events) on a real server with a real client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import base64
import json

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from osum.errors import InvalidConfigError
from streaming.audio import AudioFormat
from streaming.auth import Authenticator
from streaming.engine import Engine, EngineOptions
from streaming.events import Final
from streaming.realtime import MANUAL_SILENCE_MS, config_from_session
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig
from streaming.ws_server import serve_ws

OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))
KEY = "k-realtime-0123456789abcdef"


def _pcm24(x16: np.ndarray) -> bytes:
    x = soxr.resample(x16.astype(np.float32), 16000, 24000)
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def test_session_objects_map_to_session_configs() -> None:
    base = SessionConfig(audio=AudioFormat(sample_rate=24000))
    ga = config_from_session({"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000},
        "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 400}}},
        "osum": {"tasks": ["emotion"], "chat": True}}, base)  # fmt: skip
    assert ga.audio.sample_rate == 16000 and ga.vad.min_silence_ms == 400 and ga.vad.threshold == 0.6
    assert ga.tasks == ("emotion",) and ga.chat
    beta = config_from_session({"input_audio_format": "pcm16", "turn_detection": None}, base)
    assert beta.audio.sample_rate == 24000 and beta.vad.min_silence_ms == MANUAL_SILENCE_MS
    for bad in ({"input_audio_format": "g711_ulaw"}, {"turn_detection": {"type": "semantic_vad"}}, {"osum": {"tasks": "emotion"}}):
        with pytest.raises(InvalidConfigError):
            config_from_session(bad, base)


def test_realtime_transcription_over_the_engine(tiny_model, male_clip) -> None:
    sil = np.zeros(16000, np.float32)
    pcm = _pcm24(np.concatenate([sil, male_clip, sil]))

    async def main() -> tuple[list[dict], list[str]]:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        server, port = await serve_ws(engine, auth=Authenticator({KEY: "rt"}))
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        try:
            with pytest.raises(InvalidStatus) as e:
                async with connect(url):
                    pass
            assert e.value.response.status_code == 401
            async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
                await ws.send(json.dumps({"type": "session.update", "session": {"type": "transcription", "osum": {"tasks": ["emotion"]}}}))
                updated = json.loads(await ws.recv())
                assert updated["type"] == "session.updated" and updated["session"]["audio"]["input"]["format"]["rate"] == 24000
                for bad in ("{not json", json.dumps({"type": "response.create"}),
                            json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"})):  # fmt: skip
                    await ws.send(bad)
                    err = json.loads(await ws.recv())
                    assert err["type"] == "error" and err["error"]["code"] in ("invalid_json", "unknown_event", "invalid_audio")
                step = 4800  # 100 ms at 24 kHz, PCM16
                for i in range(0, len(pcm), step):
                    await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + step]).decode()}))
                await ws.send(json.dumps({"type": "session.update", "session": {}}))  # too late: an error, the stream goes on
                await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
                events = [json.loads(m) async for m in ws]
                assert ws.close_code == 1000
            direct = await engine.open_session(SessionConfig(audio=AudioFormat(sample_rate=24000), tasks=("emotion",)))
            await direct.send(pcm)
            await direct.end()
            finals = [ev.transcript async for ev in direct.events() if isinstance(ev, Final)]
            return events, finals
        finally:
            server.close()
            await server.wait_closed()
            await engine.stop()

    events, finals = asyncio.run(main())
    kinds = [e["type"] for e in events]
    assert any(e["type"] == "error" and e["error"]["code"] == "session_locked" for e in events)
    assert "input_audio_buffer.speech_started" in kinds and "input_audio_buffer.speech_stopped" in kinds
    completed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.completed"]
    assert [c["transcript"] for c in completed] == finals  # the same results as the engine directly
    first = kinds.index("conversation.item.input_audio_transcription.completed")
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.committed") < first
    analysis = [e for e in events if e["type"] == "osum.analysis"]
    assert analysis and analysis[0]["item_id"] == completed[0]["item_id"] and set(analysis[0]["tags"]) == {"emotion"}
    assert all(e["event_id"].startswith("event_") for e in events)
    assert all(e["delta"] for e in events if e["type"].endswith(".delta"))  # append-only increments, never empty


def test_realtime_bad_events_and_capacity(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """A binary frame and a session.update with junk values are errors and the stream goes on;
    over capacity, the first audio is refused: error over_capacity with the retry hint, close 1013."""

    async def main() -> None:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        server, port = await serve_ws(engine)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        try:
            async with connect(url) as ws:
                assert json.loads(await ws.recv())["type"] == "session.created"
                for bad, code in ((b"\x00\x01", "invalid_event"),
                                  (json.dumps({"type": "session.update", "session": {"audio": [1]}}), "invalid_config"),
                                  (json.dumps({"type": "session.update", "session": {"turn_detection": {"threshold": None}}}), "invalid_config"),
                                  (json.dumps({"type": "session.update", "session": {"osum": {"chat": "no"}}}), "invalid_config")):  # fmt: skip
                    await ws.send(bad)
                    err = json.loads(await ws.recv())
                    assert err["type"] == "error" and err["error"]["code"] == code, err
                await ws.send(json.dumps({"type": "session.update", "session": {}}))
                assert json.loads(await ws.recv())["type"] == "session.updated"  # still serving this client
            engine.opt = dataclasses.replace(engine.opt, max_sessions=1)
            await engine.open_session(SessionConfig())  # full
            msgs = []
            async with connect(url) as ws:
                await ws.recv()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(_pcm24(male_clip[:1600])).decode()}))
                with contextlib.suppress(ConnectionClosed):
                    async for m in ws:
                        msgs.append(json.loads(m))
            assert ws.close_code == 1013
            assert msgs[-1]["error"]["code"] == "over_capacity" and "retry after" in msgs[-1]["error"]["message"]
            assert engine.metrics.failed.labels("realtime", "over_capacity")._value.get() == 1
        finally:
            server.close()
            await server.wait_closed()
            await engine.stop()

    asyncio.run(main())
