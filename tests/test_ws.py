"""A real WebSocket server on 127.0.0.1 (port 0) with a real client (python-websockets), tiny model."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from osum.errors import InvalidConfigError
from streaming.engine import Engine, EngineOptions
from streaming.events import Final
from streaming.scheduler import SchedulerOptions
from streaming.session import SessionConfig
from streaming.ws_messages import KNOWN_PARAMS, ProtocolError, config_from_params, parse_client_text
from streaming.ws_server import serve_ws

from .serving import pcm16, stream_listen

SIL = np.zeros(16000, np.float32)
OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))


async def _with_server(model, body, options=OPTS):  # type: ignore[no-untyped-def]
    engine = Engine(model, options)
    await engine.start()
    server, port = await serve_ws(engine)
    try:
        return await body(f"ws://127.0.0.1:{port}", engine)
    finally:
        server.close()
        await server.wait_closed()
        await engine.stop()


async def _expect_close(url: str, first: list, code: int, query: str = "tasks=emotion") -> list[dict]:
    async with connect(f"{url}/v1/listen?{query}") as ws:
        with pytest.raises(ConnectionClosed):
            for m in first:
                await ws.send(m)
                await asyncio.sleep(0.02)
            async for _ in ws:
                pass
        msgs = []
        assert ws.close_code == code, (ws.close_code, ws.close_reason)
        return msgs


def test_real_speech_over_websocket_equals_the_engine(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    audio = np.concatenate([SIL, male_clip, SIL])

    async def body(url, engine):  # type: ignore[no-untyped-def]
        msgs = await stream_listen(url, audio, step=8001)  # odd sizes: samples split across frames
        direct = await engine.open_session(SessionConfig(tasks=("emotion",)))
        await direct.send(pcm16(audio))
        await direct.end()
        finals = [e.transcript async for e in direct.events() if isinstance(e, Final)]
        return msgs, finals

    msgs, finals = asyncio.run(_with_server(tiny_model, body))
    assert msgs[0]["type"] == "Begin" and msgs[0]["resume_token"]
    kinds = [m["type"] for m in msgs]
    assert "SpeechStarted" in kinds and "UtteranceEnd" in kinds and kinds[-1] == "Analysis"
    assert [m["transcript"] for m in msgs if m["type"] == "Results" and m["is_final"]] == finals
    assert any(m["type"] == "Results" and not m["is_final"] for m in msgs)
    seqs = [m["seq"] for m in msgs[1:]]
    assert seqs == list(range(len(seqs)))


@pytest.mark.parametrize(
    ("frames", "query", "code"),
    [
        (["{not json"], "", 1008),  # malformed JSON as the first message
        ([json.dumps({"type": "Dance"})], "", 1008),  # unknown type
        ([json.dumps([1, 2])], "", 1008),  # valid JSON, not an object
        ([b"\x00\x00" * 100, json.dumps({"type": "Configure", "tasks": "emotion"})], "tasks=emotion", 1008),  # config after audio
        ([b"\x00" * ((1 << 20) + 10)], "tasks=emotion", 1009),  # oversized frame
        ([], "sample_rate=4000", 4400),  # a rate out of range
        ([], "tasks=karaoke", 4400),
        ([json.dumps({"type": "KeepAlive", "extra": 1})], "tasks=emotion", 1008),
    ],
)
def test_bad_input_battery(tiny_model, male_clip, frames, query, code) -> None:  # type: ignore[no-untyped-def]
    async def body(url, engine):  # type: ignore[no-untyped-def]
        await _expect_close(url, frames, code, query)
        msgs = await stream_listen(url, np.concatenate([SIL, male_clip, SIL]))  # the server is still healthy
        assert any(m["type"] == "Results" and m["is_final"] for m in msgs)

    asyncio.run(_with_server(tiny_model, body))


def test_abrupt_disconnect_harms_no_one(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def body(url, engine):  # type: ignore[no-untyped-def]
        other = asyncio.create_task(stream_listen(url, np.concatenate([SIL, male_clip, SIL])))
        ws = await connect(f"{url}/v1/listen?tasks=emotion")
        await ws.send(pcm16(np.concatenate([SIL, male_clip]))[:40001])  # half a sample at the end
        ws.transport.abort()  # no close frame
        msgs = await other
        assert any(m["type"] == "Results" and m["is_final"] for m in msgs)
        for _ in range(100):  # the abandoned session finishes and leaves
            if len(engine.sessions) == 0:
                break
            await asyncio.sleep(0.1)
        assert len(engine.sessions) == 0

    asyncio.run(_with_server(tiny_model, body))


def test_configure_message_and_over_capacity(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def body(url, engine):  # type: ignore[no-untyped-def]
        async with connect(f"{url}/v1/listen") as ws:  # config in the first message instead of the query
            await ws.send(json.dumps({"type": "Configure", "tasks": ["gender"], "interim_results": False}))
            await ws.send(pcm16(np.concatenate([SIL, male_clip, SIL])))
            await ws.send(json.dumps({"type": "CloseStream"}))
            msgs = [json.loads(m) async for m in ws]
        assert not any(m["type"] == "Results" and not m["is_final"] for m in msgs)
        assert [m for m in msgs if m["type"] == "Analysis"][0]["tags"].keys() == {"gender"}
        held = await engine.open_session(SessionConfig())  # takes the only place
        await _expect_close(url, [], 1013)
        await held.end()

    asyncio.run(_with_server(tiny_model, body, replace(OPTS, max_sessions=1)))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parsing_never_raises_anything_but_protocol_errors(text: str) -> None:
    try:
        msg = parse_client_text(text)
    except ProtocolError:
        return
    assert msg.type in ("Configure", "KeepAlive", "Finalize", "CloseStream")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(KNOWN_PARAMS - {"resume", "last_seq", "token"})), st.text(max_size=12), max_size=6))
def test_config_validation_is_total(params: dict[str, str]) -> None:
    try:
        cfg = config_from_params(params)
    except InvalidConfigError:
        return
    assert 8000 <= cfg.audio.sample_rate <= 48000 and cfg.partial_step_ms % 80 == 0


def test_eager_finals_can_be_turned_off_on_both_protocols() -> None:
    """``eager_final_ms`` (query/Configure, or gRPC's endpointing_config): default 200, 0 = off."""
    from streaming.grpc_server import session_config
    from streaming.proto import speech_pb2 as pb

    assert config_from_params({}).eager_after_ms == 200
    assert config_from_params({"eager_final_ms": "0"}).eager_after_ms is None
    assert config_from_params({"eager_final_ms": "300", "endpointing": "800"}).eager_after_ms == 300
    with pytest.raises(InvalidConfigError):
        config_from_params({"eager_final_ms": "-5"})
    plain = pb.StreamingRecognitionConfig(config=pb.RecognitionConfig(sample_rate_hertz=16000))
    assert session_config(plain).eager_after_ms == 200
    off = pb.StreamingRecognitionConfig(config=pb.RecognitionConfig(
        sample_rate_hertz=16000, endpointing_config=pb.EndpointingConfig(eager_final_ms=0)))
    assert session_config(off).eager_after_ms is None
