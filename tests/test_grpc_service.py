"""The gRPC server's life around a stream: drain, resume, bad clients beside healthy ones.

Real servers on 127.0.0.1 (port 0), real grpc clients, the engine over the tiny model.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from streaming.engine import Engine
from streaming.events import Final
from streaming.grpc_server import serve
from streaming.proto import speech_pb2 as pb
from streaming.proto import speech_pb2_grpc
from streaming.session_base import SessionConfig
from streaming.store import InMemoryStore

from .test_grpc import OPTS, SIL, _config, _pcm

SPEECH = "osum.speech.v1.Speech"
BEGIN = pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_BEGIN
CHUNK = 3200  # bytes: 100 ms of PCM16 at 16 kHz


def _is_final(r: pb.StreamingRecognizeResponse) -> bool:
    return bool(r.results) and r.results[0].is_final


async def _audio(audio: np.ndarray, pace_s: float = 0.0) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    data = _pcm(audio)
    for i in range(0, len(data), CHUNK):
        yield pb.StreamingRecognizeRequest(audio_content=data[i : i + CHUNK])
        if pace_s:
            await asyncio.sleep(pace_s)


class Stream:
    """One StreamingRecognize call driven step by step: the config, then audio the test hands
    over (only after the begin response, as the SDK does), half-closed when the test says so."""

    def __init__(self, stub: speech_pb2_grpc.SpeechStub, first: pb.StreamingRecognizeRequest | None = None) -> None:
        self._queue: asyncio.Queue[pb.StreamingRecognizeRequest | None] = asyncio.Queue()
        self.begun = asyncio.Event()
        self.responses: list[pb.StreamingRecognizeResponse] = []
        self.call = stub.StreamingRecognize(self._requests(first or _config()))
        self.reading = asyncio.create_task(self._read())

    async def _requests(self, first: pb.StreamingRecognizeRequest) -> AsyncIterator[pb.StreamingRecognizeRequest]:
        yield first
        await self.begun.wait()
        while (req := await self._queue.get()) is not None:
            yield req

    async def _read(self) -> None:
        async for r in self.call:
            self.responses.append(r)
            self.begun.set()

    async def send(self, audio: np.ndarray, pace_s: float = 0.0) -> None:
        """Queue ``audio`` in 100 ms chunks, ``pace_s`` apart (0: all at once)."""
        async for req in _audio(audio, pace_s):
            self._queue.put_nowait(req)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def status(self) -> grpc.StatusCode:
        """The call's status once it ended (the responses are all read by then)."""
        await asyncio.gather(self.reading, return_exceptions=True)  # a non-OK status is the point, not an error
        return await self.call.code()

    async def wait_for(self, pred, timeout: float = 30.0) -> pb.StreamingRecognizeResponse:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while True:
                for r in self.responses:
                    if pred(r):
                        return r
                if self.reading.done():
                    raise AssertionError(f"the call ended without the awaited response: {await self.status()}")
                await asyncio.sleep(0.01)


async def _ended(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    """Read ``call`` to its end; its status and details (a non-OK status is what the tests look for)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            pass
    return await call.code(), await call.details()


@contextlib.asynccontextmanager
async def _server(model, store=None):  # type: ignore[no-untyped-def]
    """An engine, its gRPC server and a channel to it; all closed at the end, whatever happened."""
    engine = Engine(model, OPTS, store=store)
    await engine.start()
    server, port = await serve(engine, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield engine, server, channel, f"127.0.0.1:{port}"
    finally:
        await channel.close()
        await server.stop(None)
        await engine.stop()


def test_drain_sends_the_open_utterance_then_unavailable(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM mid-utterance: the stream gets that utterance's final and analysis, then
    UNAVAILABLE (shutting_down); new streams are refused the same way; the session resumes
    on another server sharing the store."""
    store = InMemoryStore()

    async def main() -> None:
        async with _server(tiny_model, store) as (engine, server, channel, _):
            stub = speech_pb2_grpc.SpeechStub(channel)
            live = Stream(stub)
            await live.begun.wait()
            # speech without its trailing silence: the utterance is open when the drain comes. The
            # client then pauses (open, not half-closed): a grpc-python aio client still writing
            # when the status arrives may report INTERNAL "Internal error from Core" instead of the
            # server's status (grpc/grpc#36066), which would test the client library, not the server
            await live.send(np.concatenate([SIL, male_clip[: 16000 * 5 // 2]]))
            started = await live.wait_for(lambda r: r.speech_event_type == BEGIN)
            assert not any(_is_final(r) for r in live.responses)
            # the drain exactly as osum-serve runs it on SIGTERM (streaming/app.py: run)
            engine.accepting = False
            for name in ("", SPEECH):
                await server.osum_health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SPEECH))
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            refused = Stream(stub)  # opened while draining: told to go elsewhere now, not "full, wait"
            assert await refused.status() == grpc.StatusCode.UNAVAILABLE and not refused.responses
            assert "shutting down" in await refused.call.details()
            grpc_stop = asyncio.create_task(server.stop(grace=30))
            await engine.stop(drain=True)
            await grpc_stop
            assert await live.status() == grpc.StatusCode.UNAVAILABLE, await live.call.details()
            assert "resume" in await live.call.details()
            # ...and before that status, the open utterance's results
            finals = [r.results[0] for r in live.responses if _is_final(r)]
            assert [f.utterance_id for f in finals] == [started.speech_event_utterance_id]
            assert finals[0].alternatives[0].transcript and finals[0].result_end_time > started.speech_event_time
            said, last = live.responses[-1], live.responses[-2]  # the in-band error, after every result
            assert said.error.code == "shutting_down" and said.error.fatal and said.seq == -1
            assert last.HasField("analysis") and last.analysis.utterance_id == started.speech_event_utterance_id

        # the client resumes on another server sharing the store: same session, nothing replayed twice
        async with _server(tiny_model, store) as (_, _, channel, _):
            begin = live.responses[0]
            resumed = Stream(speech_pb2_grpc.SpeechStub(channel), _config(resume_token=begin.resume_token, last_seq=last.seq))
            await resumed.begun.wait()
            resumed.close()
            assert await resumed.status() == grpc.StatusCode.OK
            again = resumed.responses[0]
            assert again.session_id == begin.session_id and again.audio_offset > 0
            assert not [r for r in resumed.responses[1:] if r.results or r.HasField("analysis")]  # all were delivered

    asyncio.run(main())


def test_resume_after_a_disconnect_replays_only_what_was_not_processed(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """The client vanishes after the first final (its analysis not processed yet); it reconnects
    with the token and the seq of that final: same session, the analysis replayed once, numbering
    and utterance ids continue, no final lost or repeated."""
    audio = np.concatenate([SIL, male_clip, SIL, male_clip, SIL])
    first_part = len(SIL) * 2 + len(male_clip)  # samples: utterance 0 and the silence that ends it

    async def main() -> None:
        async with _server(tiny_model) as (engine, _, channel, _):
            stub = speech_pb2_grpc.SpeechStub(channel)
            one = Stream(stub)
            await one.begun.wait()
            await one.send(audio[:first_part])
            final0 = await one.wait_for(_is_final)
            one.call.cancel()  # abrupt: no half-close
            assert await one.status() == grpc.StatusCode.CANCELLED
            processed = [r for r in one.responses if r.seq <= final0.seq]
            begin = one.responses[0]

            two = Stream(stub, _config(resume_token=begin.resume_token, last_seq=final0.seq))
            await two.begun.wait()
            again = two.responses[0]
            assert again.seq == -1 and again.session_id == begin.session_id and again.resume_token == begin.resume_token
            heard = round(again.audio_offset * 16000)
            assert 0 < heard <= first_part
            await two.send(audio[heard:])  # re-send from where the server's hearing stopped
            two.close()
            assert await two.status() == grpc.StatusCode.OK
            assert engine.sessions == {}

        replayed = two.responses[1]
        assert replayed.HasField("analysis") and replayed.analysis.utterance_id == 0 and replayed.seq > final0.seq
        assert [r.analysis.utterance_id for r in two.responses if r.HasField("analysis")] == [0, 1]
        seqs = [r.seq for r in processed[1:] + two.responses[1:]]
        assert seqs == sorted(set(seqs))  # in order, none twice
        finals = [r.results[0] for r in processed + two.responses if _is_final(r)]
        assert [f.utterance_id for f in finals] == [0, 1]  # none lost, none repeated
        assert finals[1].result_start_time > finals[0].result_end_time

    asyncio.run(main())


@pytest.fixture(scope="module")
def expected_finals(tiny_model, male_clip) -> list[str]:  # type: ignore[no-untyped-def]
    """The finals of SIL + male_clip + SIL straight from an engine with nobody else on it."""

    async def main() -> list[str]:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        s = await engine.open_session(SessionConfig(tasks=("emotion",)))
        async for req in _audio(np.concatenate([SIL, male_clip, SIL])):
            await s.send(req.audio_content)
        await s.end()
        finals = [e.transcript async for e in s.events() if isinstance(e, Final)]
        await engine.stop()
        return finals

    return asyncio.run(main())


# Bad clients: each acts while a healthy stream is open, and returns its call's status and details.


async def _garbage_protobuf(channel, engine, clip, address) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    raw = channel.stream_stream(f"/{SPEECH}/StreamingRecognize", request_serializer=None,
                                response_deserializer=pb.StreamingRecognizeResponse.FromString)  # fmt: skip

    async def requests() -> AsyncIterator[bytes]:
        yield _config().SerializeToString()
        await asyncio.sleep(0.2)  # after the begin response
        yield b"\xff\xff\xff\xff"  # a truncated varint: not a StreamingRecognizeRequest
        await asyncio.sleep(10)  # open until the server ends the call

    return await _ended(raw(requests()))


async def _oversized_message(channel, engine, clip, address) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    async def requests() -> AsyncIterator[pb.StreamingRecognizeRequest]:
        yield _config()
        await asyncio.sleep(0.2)
        yield pb.StreamingRecognizeRequest(audio_content=b"\0\0" * (1 << 20))  # 2 MiB of audio: over serve()'s 2 MiB
        await asyncio.sleep(10)

    return await _ended(speech_pb2_grpc.SpeechStub(channel).StreamingRecognize(requests()))


async def _unsupported_sample_rate(channel, engine, clip, address) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    first = _config()
    first.streaming_config.config.sample_rate_hertz = 96000  # the documented range is 8 to 48 kHz
    s = Stream(speech_pb2_grpc.SpeechStub(channel), first)
    return await s.status(), await s.call.details()


async def _client_disconnect(channel, engine, clip, address) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    s = Stream(speech_pb2_grpc.SpeechStub(channel))
    await s.begun.wait()
    sid = s.responses[0].session_id
    await s.send(np.concatenate([SIL, clip[: 16000 * 2]]))
    await s.wait_for(lambda r: r.speech_event_type == BEGIN)
    s.call.cancel()  # mid-utterance, without a half-close
    status = await s.status(), await s.call.details()
    async with asyncio.timeout(30):  # the server notices, finishes what it heard and frees the place
        while sid in engine.sessions:
            await asyncio.sleep(0.01)
    stored = await engine.store.results_after(sid, -1)
    assert [r["type"] for r in stored][:1] == ["Final"], stored  # the cut utterance, kept for a resume
    return status


async def _half_sent_frame(channel, engine, clip, address) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    """A raw HTTP/2 client: the preface, a HEADERS frame for a new stream cut off half-way, then
    a TCP reset. The server answered the preface (its SETTINGS frame), and no session began."""
    import socket
    import struct

    opened = sum(s.value for s in engine.metrics.opened.collect()[0].samples if s.name.endswith("_total"))
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    frame = lambda length, kind, flags, stream: struct.pack(">I", length)[1:] + bytes([kind, flags]) + struct.pack(">I", stream)  # noqa: E731
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(0, 0x4, 0, 0))  # preface + empty SETTINGS
    reply = await asyncio.to_thread(sock.recv, 9)
    sock.sendall(frame(64, 0x1, 0x4, 1) + b"\x83\x86")  # HEADERS announcing 64 bytes: 2 sent
    await asyncio.sleep(0.2)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # a reset, not a goodbye
    await asyncio.sleep(0.2)
    assert len(reply) == 9 and reply[3] == 0x4, reply  # a SETTINGS frame: a live HTTP/2 server read it
    assert sum(s.value for s in engine.metrics.opened.collect()[0].samples if s.name.endswith("_total")) == opened
    return grpc.StatusCode.OK, "no call began"


BAD = {
    "garbage protobuf": (_garbage_protobuf, grpc.StatusCode.INVALID_ARGUMENT, "not a valid StreamingRecognizeRequest"),
    "oversized message": (_oversized_message, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
    "unsupported sample rate": (_unsupported_sample_rate, grpc.StatusCode.INVALID_ARGUMENT, "sample_rate"),
    "client disconnect": (_client_disconnect, grpc.StatusCode.CANCELLED, "Locally cancelled"),
    "half-sent frame, then a reset": (_half_sent_frame, grpc.StatusCode.OK, "no call began"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_client_does_not_disturb_a_concurrent_session(tiny_model, male_clip, expected_finals, case) -> None:  # type: ignore[no-untyped-def]
    bad, code, details = BAD[case]

    async def main() -> None:
        async with _server(tiny_model) as (engine, _, channel, address):
            stub = speech_pb2_grpc.SpeechStub(channel)
            healthy = Stream(stub)  # opened first, still streaming while the bad client acts
            await healthy.begun.wait()
            audio = np.concatenate([SIL, male_clip, SIL])
            await healthy.send(audio[: len(audio) // 2])
            got = await bad(channel, engine, male_clip, address)
            assert got[0] == code and details in got[1], got
            counted = {s.labels["code"]: s.value for s in engine.metrics.failed.collect()[0].samples if s.name.endswith("_total")}
            # /metrics counts what the server refused, by code (grpc refuses oversized messages itself)
            assert counted == {"garbage protobuf": {"protocol_error": 1.0}, "unsupported sample rate": {"invalid_config": 1.0}}.get(case, {})
            await healthy.send(audio[len(audio) // 2 :])
            healthy.close()
            assert await healthy.status() == grpc.StatusCode.OK
            assert [r.results[0].alternatives[0].transcript for r in healthy.responses if _is_final(r)] == expected_finals
            assert not [r for r in healthy.responses if r.HasField("error")]
            # the server still serves: health, and a new stream from begin to a clean end
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SPEECH))
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            after = Stream(stub)
            await after.begun.wait()
            await after.send(SIL)
            after.close()
            assert await after.status() == grpc.StatusCode.OK and after.responses[0].seq == -1
            assert not engine.sessions  # nothing left open by the bad client

    asyncio.run(main())
