"""A real gRPC server on 127.0.0.1 (port 0) with a real client, over the engine and the tiny model."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import grpc
import numpy as np
import pytest
import soundfile as sf

from streaming.engine import Engine, EngineOptions
from streaming.events import Final
from streaming.grpc_server import serve
from streaming.proto import speech_pb2 as pb
from streaming.proto import speech_pb2_grpc
from streaming.scheduler import SchedulerOptions
from streaming.session_base import SessionConfig

SIL = np.zeros(16000, np.float32)
OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def _config(**kw) -> pb.StreamingRecognizeRequest:  # type: ignore[no-untyped-def]
    rc = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000, analysis_tasks=["emotion"])
    sc = pb.StreamingRecognitionConfig(config=rc, interim_results=True, partial_step_ms=480)
    for k, v in kw.items():
        setattr(sc, k, v)
    return pb.StreamingRecognizeRequest(streaming_config=sc)


def _words_config() -> pb.StreamingRecognizeRequest:
    req = _config()
    req.streaming_config.config.enable_word_time_offsets = True
    return req


async def _stream(stub, audio: np.ndarray, first: pb.StreamingRecognizeRequest | None = None,  # type: ignore[no-untyped-def]
                  extra: list | None = None) -> list[pb.StreamingRecognizeResponse]:
    """One StreamingRecognize call made as the SDK makes it: the config, then the audio only after
    the server's begin response. A client that writes while the server refuses its config may see
    INTERNAL from its own writer instead of the server's status (a grpc-python client race)."""
    begun = asyncio.Event()

    async def requests():  # type: ignore[no-untyped-def]
        yield first or _config()
        await begun.wait()  # a refused call ends while this waits: nothing more is written
        data = _pcm(audio)
        for i in range(0, len(data), 8000):
            yield pb.StreamingRecognizeRequest(audio_content=data[i : i + 8000])
        for req in extra or []:
            yield req

    responses = []
    async for r in stub.StreamingRecognize(requests()):
        responses.append(r)
        begun.set()
    return responses


async def _with_server(model, body, options=OPTS, **serve_kw):  # type: ignore[no-untyped-def]
    engine = Engine(model, options)
    await engine.start()
    server, port = await serve(engine, "127.0.0.1", 0, **serve_kw)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = speech_pb2_grpc.SpeechStub(channel)
            stub.channel = channel  # for tests that need other services on the same server
            return await body(stub, engine)
    finally:
        await server.stop(None)
        await engine.stop()


def test_streaming_over_grpc_equals_the_engine(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    audio = np.concatenate([SIL, male_clip, SIL])

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        responses = await _stream(stub, audio)
        direct = await engine.open_session(SessionConfig(tasks=("emotion",)))
        data = _pcm(audio)
        for i in range(0, len(data), 8000):
            await direct.send(data[i : i + 8000])
        await direct.end()
        finals = [e.transcript async for e in direct.events() if isinstance(e, Final)]
        return responses, finals

    responses, finals = asyncio.run(_with_server(tiny_model, body))
    begin = responses[0]  # session id and resume token first, before any result
    assert begin.seq == -1 and begin.resume_token.startswith(begin.session_id + ".") and not begin.results
    assert [r.seq for r in responses] == list(range(-1, len(responses) - 1))
    kinds = [r.speech_event_type for r in responses if r.speech_event_type]
    assert kinds == [pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_BEGIN, pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_END]
    interim = [r.results[0] for r in responses if r.results and not r.results[0].is_final]
    final = [r.results[0] for r in responses if r.results and r.results[0].is_final]
    assert interim and all(0 <= x.stability <= 1 for x in interim)
    assert [f.alternatives[0].transcript for f in final] == finals
    analysis = next(r.analysis for r in responses if r.HasField("analysis"))
    assert analysis.tags["emotion"].label and 0 < analysis.tags["emotion"].score <= 1
    # the engine's processing latency reaches the wire: time from the final's audio to the final
    assert all(r.processing_latency_ms > 0 for r in responses if r.results and r.results[0].is_final)
    assert begin.processing_latency_ms == 0  # nothing was processed for the begin response


@pytest.mark.parametrize(
    ("first", "extra", "code", "message"),
    [
        (pb.StreamingRecognizeRequest(audio_content=b"\x00\x00"), None, grpc.StatusCode.INVALID_ARGUMENT, "first message"),
        (None, [_config()], grpc.StatusCode.INVALID_ARGUMENT, "only allowed in the first"),
        (_config(partial_step_ms=100), None, grpc.StatusCode.INVALID_ARGUMENT, "multiple of 80"),
        (_config(resume_token="nope", last_seq=3), None, grpc.StatusCode.NOT_FOUND, "no session"),
        (_words_config(), None, grpc.StatusCode.FAILED_PRECONDITION, "no word times"),  # the tiny model has no aligner
        (pb.StreamingRecognizeRequest(), None, grpc.StatusCode.INVALID_ARGUMENT, "first message"),  # empty, first
        (None, [pb.StreamingRecognizeRequest()], grpc.StatusCode.INVALID_ARGUMENT, "empty request"),  # empty, later
    ],
)
def test_bad_streams_get_their_status(tiny_model, male_clip, first, extra, code, message) -> None:  # type: ignore[no-untyped-def]
    async def body(stub, engine):  # type: ignore[no-untyped-def]
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _stream(stub, male_clip[:16000], first, extra)
        assert e.value.code() == code and message in e.value.details()
        # the server is still healthy: a normal stream right after works
        ok = await _stream(stub, np.concatenate([SIL, male_clip, SIL]))
        assert any(r.results and r.results[0].is_final for r in ok)

    asyncio.run(_with_server(tiny_model, body))


def test_a_stream_closed_before_its_config_opens_nothing(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """Half-closed with no message at all: nothing to refuse or answer, so OK and no responses."""

    async def nothing():  # type: ignore[no-untyped-def]
        return
        yield

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        call = stub.StreamingRecognize(nothing())
        assert [r async for r in call] == [] and await call.code() == grpc.StatusCode.OK
        assert not engine.sessions

    asyncio.run(_with_server(tiny_model, body))


def test_over_capacity_is_resource_exhausted(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    async def body(stub, engine):  # type: ignore[no-untyped-def]
        await engine.open_session(SessionConfig())  # takes the only place
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _stream(stub, male_clip[:8000])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after 5 s" in e.value.details()
        assert ("retry-after", "5") in tuple(e.value.trailing_metadata() or ())  # machine-readable hint

    asyncio.run(_with_server(tiny_model, body, replace(OPTS, max_sessions=1)))


def test_garbage_bytes_are_a_protocol_error(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Bytes that do not parse as a request: INVALID_ARGUMENT (protocol_error), not grpc's UNKNOWN."""
    garbage = b"\xff\xff\xff\xff"  # a truncated varint: not a StreamingRecognizeRequest, nor a RecognizeRequest

    async def raw_stream(channel, messages: list[bytes]) -> list[pb.StreamingRecognizeResponse]:  # type: ignore[no-untyped-def]
        call = channel.stream_stream("/osum.speech.v1.Speech/StreamingRecognize", request_serializer=None,
                                     response_deserializer=pb.StreamingRecognizeResponse.FromString)  # fmt: skip

        async def requests():  # type: ignore[no-untyped-def]
            for m in messages:
                yield m
                await asyncio.sleep(0.05)  # no writes racing the refusal (see _stream)
            await asyncio.sleep(10)  # then stay open: the server, not a half-close, ends the call

        return [r async for r in call(requests())]

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        for messages in ([garbage], [_config().SerializeToString(), garbage]):  # as the first message, and later
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await raw_stream(stub.channel, messages)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid StreamingRecognizeRequest" in e.value.details()
        recognize = stub.channel.unary_unary("/osum.speech.v1.Speech/Recognize", request_serializer=None,
                                             response_deserializer=pb.RecognizeResponse.FromString)  # fmt: skip
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await recognize(garbage)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid RecognizeRequest" in e.value.details()
        # the server is still healthy: a normal stream right after works
        ok = await _stream(stub, np.concatenate([SIL, male_clip, SIL]))
        assert any(r.results and r.results[0].is_final for r in ok)
        assert not engine.sessions  # the refused streams left nothing open

    asyncio.run(_with_server(tiny_model, body))


def test_per_key_session_limit_over_grpc(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from streaming.auth import Authenticator

    alice, bob = "k-alice-0123456789abcdef", "k-bob-0123456789abcdef"

    async def open_stream(stub, key: str, begun: asyncio.Event, done: asyncio.Event):  # type: ignore[no-untyped-def]
        async def requests():  # type: ignore[no-untyped-def]
            yield _config()
            await done.wait()  # a live stream: open until the test half-closes it

        call = stub.StreamingRecognize(requests(), metadata=(("authorization", f"Bearer {key}"),))
        responses = []
        async for r in call:
            responses.append(r)
            begun.set()
        return responses

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        first_begun, first_done = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(open_stream(stub, alice, first_begun, first_done))
        await first_begun.wait()
        with pytest.raises(grpc.aio.AioRpcError) as e:  # alice's second session: over her limit
            await open_stream(stub, alice, asyncio.Event(), asyncio.Event())
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already has 1 open sessions" in e.value.details() and "retry after 5 s" in e.value.details()
        assert ("retry-after", "5") in tuple(e.value.trailing_metadata() or ())
        with pytest.raises(grpc.aio.AioRpcError) as e:  # a whole-file Recognize is one of her sessions too
            await stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16,
                                                                                  sample_rate_hertz=16000),
                                                     audio=b"\0\0" * 16000), metadata=(("authorization", f"Bearer {alice}"),))  # fmt: skip
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already has 1 open sessions" in e.value.details()
        for key in (bob, alice):  # another key is not limited by alice's sessions; alice's ended one frees her place
            begun, done = asyncio.Event(), asyncio.Event()
            other = asyncio.create_task(open_stream(stub, key, begun, done))
            await begun.wait()
            done.set()
            assert (await other)[0].seq == -1
            if key == bob:
                first_done.set()
                assert len(await first) == 1  # begin only; it ended normally

    auth = Authenticator({alice: "alice", bob: "bob"})
    asyncio.run(_with_server(tiny_model, body, replace(OPTS, max_sessions_per_key=1), auth=auth))


def test_recognize_a_file(tiny_model, male_clip, female_clip) -> None:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([SIL, male_clip, SIL, SIL, female_clip, SIL]), 16000, format="FLAC")

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        cfg = pb.RecognitionConfig(analysis_tasks=["gender"])
        resp = await stub.Recognize(pb.RecognizeRequest(config=cfg, audio=buf.getvalue()))
        assert len(resp.results) == 2 and all(r.is_final for r in resp.results) and len(resp.analyses) == 2
        raw = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000)
        audio = np.concatenate([SIL, male_clip, SIL, SIL, female_clip, SIL])
        resp_raw = await stub.Recognize(pb.RecognizeRequest(config=raw, audio=_pcm(audio)))
        assert len(resp_raw.results) == 2 and not resp_raw.analyses
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Recognize(pb.RecognizeRequest(config=cfg, audio=b"not audio"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # word times reach the engine, which refuses them for a model without an aligner
        words = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000, enable_word_time_offsets=True)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Recognize(pb.RecognizeRequest(config=words, audio=_pcm(audio)))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no word times" in e.value.details()
        assert dict(e.value.trailing_metadata() or ()).get("osum-code") == "unsupported_task"

    asyncio.run(_with_server(tiny_model, body))


def test_health_and_reflection(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def body(stub, engine):  # type: ignore[no-untyped-def]
        channel = stub.channel
        health = health_pb2_grpc.HealthStub(channel)
        got = await health.Check(health_pb2.HealthCheckRequest(service="osum.speech.v1.Speech"))
        assert got.status == health_pb2.HealthCheckResponse.SERVING

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        names = [s.name async for r in refl.ServerReflectionInfo(ask()) for s in r.list_services_response.service]
        assert "osum.speech.v1.Speech" in names and "grpc.health.v1.Health" in names

    asyncio.run(_with_server(tiny_model, body))
