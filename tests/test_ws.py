"""A real WebSocket server on 127.0.0.1 (port 0) with a real client (python-websockets), tiny model."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from osum.errors import InvalidConfigError, OsumError
from streaming.engine import Engine, EngineOptions
from streaming.events import Final
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig
from streaming.status import ws_close_code
from streaming.ws_messages import (
    KNOWN_PARAMS,
    MAX_SEQ,
    ProtocolError,
    config_from_params,
    listen_request,
    parse_client_text,
)
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


async def _expect_close(url: str, first: list, code: int, error: str | None, query: str = "tasks=emotion") -> list[dict]:
    """Open ``/v1/listen?query``, send ``first``, read until the server closes; every message received.

    Asserts the close ``code`` and, as docs/protocol.md says, that the last message before it is
    one fatal ``Error`` with the code ``error`` (None: no Error at all, the WebSocket layer
    closed by itself, as for an oversized frame)."""
    msgs: list[dict] = []
    async with asyncio.timeout(30), connect(f"{url}/v1/listen?{query}") as ws:
        try:
            for m in first:
                await ws.send(m)
                await asyncio.sleep(0.02)
            async for m in ws:
                msgs.append(json.loads(m))
        except ConnectionClosed:
            pass
        with contextlib.suppress(ConnectionClosed):  # what arrived before a send found the connection closed
            while True:
                msgs.append(json.loads(await ws.recv()))
    assert ws.close_code == code, (ws.close_code, ws.close_reason, msgs)
    errors = [m for m in msgs if m["type"] == "Error"]
    if error is None:
        assert errors == []
    else:
        assert [m["code"] for m in errors] == [error] and msgs[-1] is errors[0] and errors[0]["fatal"] is True, msgs
        assert errors[0]["message"]
    return msgs


async def _healthy_while(url: str, audio: np.ndarray, bad: Awaitable[Any]) -> list[dict]:
    """A session opened first streams the first half of ``audio``, then ``bad`` runs, then the
    session streams the rest and ends normally; every message it got (Begin first)."""
    async with connect(f"{url}/v1/listen?tasks=emotion") as ws:
        begin = json.loads(await ws.recv())
        assert begin["type"] == "Begin"

        async def read() -> list[dict]:
            return [json.loads(m) async for m in ws]

        reading = asyncio.create_task(read())  # read throughout, as a live client does
        data = pcm16(audio)
        half = len(data) // 4 * 2  # whole samples
        for i in range(0, half, 8000):
            await ws.send(data[i : min(i + 8000, half)])
        await bad
        for i in range(half, len(data), 8000):
            await ws.send(data[i : i + 8000])
        await ws.send(json.dumps({"type": "CloseStream"}))
        msgs = await reading
    assert ws.close_code == 1000
    return [begin, *msgs]


def _finals(msgs: list[dict]) -> list[str]:
    return [m["transcript"] for m in msgs if m["type"] == "Results" and m["is_final"]]


async def _opens_and_closes(url: str) -> None:
    """A new session right now: Begin, then a normal close after CloseStream."""
    async with connect(f"{url}/v1/listen?tasks=emotion") as ws:
        assert json.loads(await ws.recv())["type"] == "Begin"
        await ws.send(pcm16(SIL[:8000]))
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for _ in ws:
            pass
    assert ws.close_code == 1000


async def _gone(engine: Engine, keep: int = 0) -> None:
    """Wait until the engine holds ``keep`` sessions at most (abandoned ones finish and leave)."""
    for _ in range(100):
        if len(engine.sessions) <= keep:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{len(engine.sessions)} sessions still open")


def _server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records (a handler that raised logs 'connection handler failed' and closes 1011)."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture(scope="module")
def usual_finals(tiny_model, male_clip) -> list[str]:  # type: ignore[no-untyped-def]
    """The finals of SIL + male_clip + SIL straight from an engine: what a healthy session gets."""

    async def main() -> list[str]:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        try:
            s = await engine.open_session(SessionConfig(tasks=("emotion",)))
            await s.send(pcm16(np.concatenate([SIL, male_clip, SIL])))
            await s.end()
            return [e.transcript async for e in s.events() if isinstance(e, Final)]
        finally:
            await engine.stop()

    finals = asyncio.run(main())
    assert finals
    return finals


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
    timed = [m for m in msgs if m["type"] in ("Results", "Analysis")]
    assert all("processing_latency_ms" in m for m in timed)  # the key is always there (null when unknown)
    final = next(m for m in msgs if m["type"] == "Results" and m["is_final"])
    assert isinstance(final["processing_latency_ms"], float) and final["processing_latency_ms"] > 0


def _configure(**fields: Any) -> str:
    return json.dumps({"type": "Configure", **fields})


@pytest.mark.parametrize(
    ("frames", "query", "code", "error"),
    [
        (["{not json"], "", 1008, "protocol_error"),  # malformed JSON as the first message
        ([json.dumps({"type": "Dance"})], "", 1008, "protocol_error"),  # unknown type
        ([json.dumps([1, 2])], "", 1008, "protocol_error"),  # valid JSON, not an object
        ([b"\x00\x00" * 100, _configure(tasks="emotion")], "tasks=emotion", 1008, "protocol_error"),  # config after audio
        ([b"\x00" * ((1 << 20) + 10)], "tasks=emotion", 1009, None),  # oversized frame: websockets closes, no Error
        ([], "sample_rate=4000", 4400, "invalid_config"),  # a rate out of range
        ([], "tasks=karaoke", 4400, "invalid_config"),
        ([], "words=true", 4400, "unsupported_task"),  # the tiny model has no word aligner
        ([], "words=maybe", 4400, "invalid_config"),
        ([json.dumps({"type": "KeepAlive", "extra": 1})], "tasks=emotion", 1008, "protocol_error"),
        # resume fields: each of these was a ValueError/TypeError and close 1011
        ([], "resume=abc.def&last_seq=xyz", 4400, "invalid_config"),
        ([_configure(last_seq=1.5)], "", 4400, "invalid_config"),
        ([_configure(last_seq=True)], "", 4400, "invalid_config"),
        ([_configure(last_seq=-2)], "", 4400, "invalid_config"),
        ([_configure(token="")], "", 4400, "invalid_config"),
        ([], "resume=%C3%A9.x", 4004, "session_not_found"),  # not ASCII: hmac.compare_digest raised TypeError
    ],
)
def test_bad_input_battery(tiny_model, male_clip, usual_finals, caplog, frames, query, code, error) -> None:  # type: ignore[no-untyped-def]
    """Each bad input gets its documented Error and close code, while a session opened before
    it, streaming real speech, gets its usual finals; new sessions open after it."""
    caplog.set_level(logging.WARNING)

    async def body(url, engine):  # type: ignore[no-untyped-def]
        healthy = await _healthy_while(url, np.concatenate([SIL, male_clip, SIL]), _expect_close(url, frames, code, error, query))
        assert _finals(healthy) == usual_finals
        assert not [m for m in healthy if m["type"] == "Error"]
        await _opens_and_closes(url)
        await _gone(engine)
        failed = {s.labels["code"]: s.value for s in engine.metrics.failed.collect()[0].samples if s.name.endswith("_total")}
        assert failed == ({error: 1.0} if error else {})  # /metrics counts the refusal by its code, once

    asyncio.run(_with_server(tiny_model, body))
    assert _server_errors(caplog) == []


async def _half_sent_frame(port: int, query: str, audio: bytes) -> None:
    """Over a raw TCP socket: a valid WebSocket handshake, ``audio`` as a whole binary frame if
    any (the session is then open: its Begin is read first), then a frame header announcing
    4,000 bytes followed by only 1,000 of them, then a reset (SO_LINGER 0: no FIN, no close frame)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /v1/listen?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head

    def frame(payload: bytes, announced: int) -> bytes:  # client frames are masked (RFC 6455 5.3)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return struct.pack("!BBH", 0x82, 0x80 | 126, announced) + mask + masked

    if audio:
        b0, b1 = await reader.readexactly(2)  # the server's Begin: an unmasked text frame
        n = b1 & 0x7F if b1 & 0x7F < 126 else struct.unpack("!H", await reader.readexactly(2))[0]
        assert b0 == 0x81 and json.loads(await reader.readexactly(n))["type"] == "Begin"
        writer.write(frame(audio, len(audio)))
    writer.write(frame(bytes(1000), 4000))
    await writer.drain()
    await asyncio.sleep(0.3)  # the server reads the header and waits inside the frame
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def test_a_half_sent_frame_then_a_reset_harms_no_one(tiny_model, male_clip, usual_finals, caplog) -> None:  # type: ignore[no-untyped-def]
    """A frame cut off mid-payload by a dropped socket, both while the server waits for a
    Configure and mid-session: the concurrent session gets its usual finals, the broken
    sessions leave, the handler never fails, and a normal stream right after works."""
    caplog.set_level(logging.WARNING)
    speech = np.concatenate([SIL, male_clip, SIL])

    async def body(url, engine):  # type: ignore[no-untyped-def]
        port = int(url.rsplit(":", 1)[1])

        async def both() -> None:
            await _half_sent_frame(port, "", b"")  # no query: the server waits for Configure or audio
            await _half_sent_frame(port, "tasks=emotion", pcm16(speech[:16000]))  # a session with audio
            await _gone(engine, keep=1)  # the broken ones finished and left; the healthy one stays

        healthy = await _healthy_while(url, speech, both())
        assert _finals(healthy) == usual_finals
        after = await stream_listen(url, speech)
        assert _finals(after) == usual_finals
        await _gone(engine)

    asyncio.run(_with_server(tiny_model, body))
    assert _server_errors(caplog) == []


def test_resume_after_a_dropped_connection_loses_and_repeats_nothing(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Drop the connection mid-way through the second utterance (no CloseStream), reconnect
    with ``resume`` and ``last_seq``, re-send the audio from ``audio_offset``: every utterance's
    Final and Analysis arrive exactly once across both connections, in seq order."""
    audio = np.concatenate([SIL, male_clip, SIL, male_clip, SIL])
    cut = 2 * (2 * len(SIL) + len(male_clip) + len(male_clip) // 2)  # bytes: half-way through the second clip
    data = pcm16(audio)

    async def body(url, engine):  # type: ignore[no-untyped-def]
        ws = await connect(f"{url}/v1/listen?tasks=emotion")
        begin = json.loads(await ws.recv())
        for i in range(0, cut, 8000):
            await ws.send(data[i : min(i + 8000, cut)])
        first: list[dict] = []
        while not (first and first[-1]["type"] == "Analysis"):  # the first utterance's Final, then its Analysis
            first.append(json.loads(await ws.recv()))
        # the client processed everything up to the first Final; what came after (the Analysis at
        # least) arrived but was not processed when the connection dropped: it must come again
        last_seq = next(m["seq"] for m in first if m["type"] == "Results" and m["is_final"])
        ws.transport.abort()  # dropped: no CloseStream, no close frame

        query = f"resume={begin['resume_token']}&last_seq={last_seq}"
        async with connect(f"{url}/v1/listen?{query}") as again:
            resumed = json.loads(await again.recv())
            offset = round(resumed["audio_offset"] * 16000) * 2
            reading = asyncio.create_task(_read_all(again))
            for i in range(offset, len(data), 8000):
                await again.send(data[i : i + 8000])
            await again.send(json.dumps({"type": "CloseStream"}))
            second = await reading
        assert again.close_code == 1000
        return begin, first, last_seq, resumed, second

    begin, first, last_seq, resumed, second = asyncio.run(_with_server(tiny_model, body))
    first_final = next(m for m in first if m["type"] == "Results" and m["is_final"])
    assert resumed["type"] == "Begin" and resumed["session_id"] == begin["session_id"]
    assert first_final["end"] <= resumed["audio_offset"] <= cut / 2 / 16000  # it heard at least the first utterance
    assert second and all(m["seq"] > last_seq for m in second)  # nothing replayed from before last_seq
    # what the server had sent after last_seq before the drop comes again, unchanged
    unprocessed = [m for m in first if m["seq"] > last_seq and (m["type"] == "Analysis" or m.get("is_final"))]
    by_seq = {m["seq"]: m for m in second}
    assert unprocessed and all(by_seq.get(m["seq"]) == m for m in unprocessed)
    processed = [m for m in first if m["seq"] <= last_seq] + second
    seqs = [m["seq"] for m in processed]
    assert seqs == sorted(set(seqs))  # in order, none twice
    finals = [m["utterance_id"] for m in processed if m["type"] == "Results" and m["is_final"]]
    analyses = [m["utterance_id"] for m in processed if m["type"] == "Analysis"]
    assert len(finals) >= 2 and finals == list(range(len(finals)))  # 0..n-1, each once: none lost, none twice
    assert analyses == finals
    live = [m for m in second if m["type"] == "Results" and m["is_final"] and m["seq"] >= _first_live_seq(second)]
    assert live and all(m["start"] >= resumed["audio_offset"] - 0.01 for m in live)  # after the resume point
    assert not [m for m in first + second if m["type"] == "Error"]


async def _read_all(ws: Any) -> list[dict]:
    return [json.loads(m) async for m in ws]


def _first_live_seq(msgs: list[dict]) -> int:
    """The seq of the first event made after the resume (replayed ones are Finals and Analyses only)."""
    return next(m["seq"] for m in msgs if m["type"] not in ("Results", "Analysis") or not m.get("is_final", True))


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
        assert next(m for m in msgs if m["type"] == "Analysis")["tags"].keys() == {"gender"}
        held = await engine.open_session(SessionConfig())  # takes the only place
        await _expect_close(url, [], 1013, "over_capacity")
        await held.end()

    asyncio.run(_with_server(tiny_model, body, replace(OPTS, max_sessions=1)))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),  # floats: NaN and Infinity too
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_SEQ_LIKE = st.integers(min_value=-3, max_value=1 << 64) | st.integers().map(str) | st.floats().map(str)
# Configure messages, with the resume fields often (the keys where the bug hid) and strange keys sometimes
_CONFIGURE = st.dictionaries(
    st.sampled_from(["resume", "last_seq", "token"]) | st.sampled_from(sorted(KNOWN_PARAMS)) | st.text(max_size=8),
    _JSON | _SEQ_LIKE,
    max_size=5,
).map(lambda d: json.dumps({"type": "Configure", **d}))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | _CONFIGURE)
def test_parsing_never_raises_anything_but_protocol_errors(text: str) -> None:
    """Any text frame: a ProtocolError, or a message whose fields then validate or fail with a
    documented error (4400/4004), never an exception that would close the connection 1011."""
    try:
        msg = parse_client_text(text)
    except ProtocolError:
        return
    assert msg.type in ("Configure", "KeepAlive", "Finalize", "CloseStream")
    assert all(isinstance(v, str) for v in msg.params.values())
    if msg.type != "Configure":
        return
    try:
        request = listen_request(msg.params)
    except OsumError as e:
        assert ws_close_code(e.code) in (4400, 4004), e
        return
    assert type(request.last_seq) is int and -1 <= request.last_seq <= MAX_SEQ
    assert request.resume == msg.params.get("resume")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(KNOWN_PARAMS)), st.text(max_size=12) | _SEQ_LIKE.map(str), max_size=6))
def test_config_validation_is_total(params: dict[str, str]) -> None:
    """Any query (resume, last_seq and token included): a valid request or a documented error."""
    try:
        request = listen_request(params)
    except OsumError as e:
        assert (e.code, ws_close_code(e.code)) in (("invalid_config", 4400), ("session_not_found", 4004)), e
        assert e.code == "invalid_config" or "resume" in params
        return
    cfg = request.config
    assert 8000 <= cfg.audio.sample_rate <= 48000 and cfg.partial_step_ms % 80 == 0
    assert type(request.last_seq) is int and -1 <= request.last_seq <= MAX_SEQ
    assert request.last_seq == int(params.get("last_seq", -1)) and request.resume == params.get("resume")


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"last_seq": v}, "invalid_config")
        for v in ["xyz", "1.5", "true", "-2", "", " 7", "1_0", "\u0663", "1e3", "nan", str(MAX_SEQ + 1)]
    ]
    + [({"token": v}, "invalid_config") for v in ["", "a key", "\x00" * 16, "é" * 16, "k" * 513]]
    + [({"resume": v}, "session_not_found") for v in ["", "é.x", "a b.c", "x" * 513]],
)
def test_resume_fields_are_validated(params: dict[str, str], error: str) -> None:
    with pytest.raises(OsumError) as e:
        listen_request({"tasks": "emotion", **params})
    assert e.value.code == error


def test_resume_fields_that_are_fine() -> None:
    assert listen_request({}).last_seq == -1 and listen_request({}).resume is None
    ok = listen_request({"resume": "abc.def", "last_seq": "0007", "token": "k-0123456789abcdef"})
    assert (ok.resume, ok.last_seq) == ("abc.def", 7)
    assert listen_request({"last_seq": "-1"}).last_seq == -1
    assert listen_request({"last_seq": str(MAX_SEQ)}).last_seq == MAX_SEQ
    # a Configure message's JSON values become strings first: the same rules apply to them
    for value in (1.5, True, -2, 1e3):
        with pytest.raises(InvalidConfigError):
            listen_request(parse_client_text(_configure(last_seq=value)).params)
    assert listen_request(parse_client_text(_configure(last_seq=12)).params).last_seq == 12


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


def test_partial_context_is_a_websocket_option() -> None:
    """``partial_context``: full (default) or chunked; anything else is the client's error."""
    assert config_from_params({}).partial_context == "full"
    assert config_from_params({"partial_context": "chunked"}).partial_context == "chunked"
    with pytest.raises(InvalidConfigError, match="partial_context"):
        config_from_params({"partial_context": "causal"})
    assert listen_request({"partial_context": "chunked"}).config.partial_context == "chunked"


def test_partial_growth_and_context_on_both_wires() -> None:
    """``partial_growth`` (0 to 1, default 0.1) and ``partial_context``: WebSocket parameters
    and StreamingRecognitionConfig fields; bad values are the client's error."""
    from streaming.grpc_server import session_config
    from streaming.proto import speech_pb2 as pb

    assert config_from_params({}).partial_growth == SessionConfig.partial_growth == 0.1
    assert config_from_params({"partial_growth": "0"}).partial_growth == 0.0
    for bad in ("-1", "2", "nan", "fast"):
        with pytest.raises(InvalidConfigError, match="partial_growth"):
            config_from_params({"partial_growth": bad})
    rc = pb.RecognitionConfig(sample_rate_hertz=16000)
    plain = session_config(pb.StreamingRecognitionConfig(config=rc))
    assert (plain.partial_context, plain.partial_growth) == ("full", 0.1)
    fixed = session_config(pb.StreamingRecognitionConfig(config=rc, partial_context="chunked", partial_growth=0))
    assert (fixed.partial_context, fixed.partial_growth) == ("chunked", 0.0)
    for bad in (dict(partial_context="causal"), dict(partial_growth=3.0)):
        with pytest.raises(InvalidConfigError):
            session_config(pb.StreamingRecognitionConfig(config=rc, **bad))
