"""Limits and backpressure as a client of either server sees them (real servers on 127.0.0.1,
real clients, the tiny model), and osum-serve's drain over gRPC and its in-memory fallback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from streaming.engine import Engine, EngineOptions
from streaming.grpc_server import serve as serve_grpc
from streaming.proto import speech_pb2 as pb
from streaming.proto import speech_pb2_grpc
from streaming.scheduler import SchedulerOptions
from streaming.work import FinalRequest
from streaming.ws_server import serve_ws

from .serving import json_logs, pcm16, start_serve, stop_serve

SIL = np.zeros(16000, np.float32)
OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))
CHUNK = 3200  # bytes: 100 ms of PCM16


def _config() -> pb.StreamingRecognizeRequest:
    rc = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000)
    return pb.StreamingRecognizeRequest(streaming_config=pb.StreamingRecognitionConfig(config=rc, interim_results=False))


async def _requests(
    data: bytes, pause_s: float = 0.0, hold: asyncio.Event | None = None
) -> AsyncIterator[pb.StreamingRecognizeRequest]:
    """The config, then ``data`` in 100 ms chunks; with ``hold``, the stream then stays open,
    not writing, until ``hold`` is set (a client waiting for its results)."""
    yield _config()
    await asyncio.sleep(0.1)  # audio after the begin response (see docs/protocol.md)
    for i in range(0, len(data), CHUNK):
        yield pb.StreamingRecognizeRequest(audio_content=data[i : i + CHUNK])
        if pause_s:
            await asyncio.sleep(pause_s)
    if hold is not None:
        await hold.wait()


@contextlib.asynccontextmanager
async def _servers(model, options: EngineOptions):  # type: ignore[no-untyped-def]
    engine = Engine(model, options)
    await engine.start()
    ws, ws_port = await serve_ws(engine)
    grpc_server, grpc_port = await serve_grpc(engine)
    try:
        yield engine, f"ws://127.0.0.1:{ws_port}", f"127.0.0.1:{grpc_port}"
    finally:
        await grpc_server.stop(None)
        ws.close()
        await ws.wait_closed()
        await engine.stop()


def test_session_length_limit_on_both_servers(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """Past ``max_session_s`` of audio a connection ends: WebSocket Error limit_exceeded and
    close 1013, gRPC RESOURCE_EXHAUSTED; both say to open a new session, with the retry hint."""
    audio = pcm16(np.concatenate([SIL, male_clip]))  # 5 s

    async def main() -> None:
        async with _servers(tiny_model, replace(OPTS, max_session_s=2.0)) as (engine, ws_url, grpc_addr):
            msgs = []
            async with connect(f"{ws_url}/v1/listen") as ws:
                with contextlib.suppress(ConnectionClosed):
                    for i in range(0, len(audio), CHUNK):
                        await ws.send(audio[i : i + CHUNK])
                    async for m in ws:
                        msgs.append(json.loads(m))
            assert ws.close_code == 1013
            error = next(m for m in msgs if m["type"] == "Error")
            assert error["code"] == "limit_exceeded" and "open a new one" in error["message"] and "retry after" in error["message"]

            async with grpc.aio.insecure_channel(grpc_addr) as channel:
                # the limit trips on the first chunk past 2 s; the client has written it and then
                # waits with the stream open, as grpc-python clients must: one still writing when
                # the status arrives may be shown INTERNAL instead (grpc/grpc#36066; it failed this
                # test once in a CI run), which would test the client library, not the server
                hold, said = asyncio.Event(), []
                over = audio[: int(2.2 * 16000) * 2]
                call = speech_pb2_grpc.SpeechStub(channel).StreamingRecognize(_requests(over, 0.002, hold))
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async with asyncio.timeout(30):  # a server that never ends the call fails here
                        async for r in call:
                            said += [r.error] if r.HasField("error") else []
                hold.set()
                assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "open a new one" in await call.details()
                assert [(e.code, e.fatal) for e in said] == [("limit_exceeded", True)]  # said in-band first
            async with asyncio.timeout(30):
                while engine.sessions:  # both sessions finished what they heard and left
                    await asyncio.sleep(0.01)

    asyncio.run(main())


def _stall_finals(engine: Engine, gate: threading.Event) -> None:
    run_finals = engine.scheduler._runners[FinalRequest]
    engine.scheduler._runners[FinalRequest] = lambda reqs: gate.wait(60) and run_finals(reqs)


def test_backpressure_pauses_reading_on_both_servers(tiny_model, male_clip) -> None:  # type: ignore[no-untyped-def]
    """The model stalls while a client sends a recording as fast as it can: each server stops
    reading that client's audio once its ended utterances hold ``max_queued_s`` (the WebSocket
    server pauses reads, the gRPC server stops taking messages), rather than buffering it; once the
    model goes on, every utterance is transcribed, none lost."""
    two = np.concatenate([SIL, male_clip, SIL, male_clip, SIL])
    data = pcm16(np.concatenate([two, two, two]))  # 6 utterances, 30 s, sent at once

    async def heard_stalls(engine: Engine) -> int:
        """Once the session's audio intake stops growing for a while: the samples it had read."""
        async with asyncio.timeout(30):
            while not engine.sessions:
                await asyncio.sleep(0.01)
            session = next(iter(engine.sessions.values())).session
            last = -1
            while session.intake.samples_in != last:
                last = session.intake.samples_in
                await asyncio.sleep(0.5)
            return last

    async def main() -> None:
        gate = threading.Event()
        async with _servers(tiny_model, replace(OPTS, max_queued_s=1.0)) as (engine, ws_url, grpc_addr):
            _stall_finals(engine, gate)
            # WebSocket
            async with connect(f"{ws_url}/v1/listen") as ws:

                async def send_all() -> None:
                    for i in range(0, len(data), CHUNK):
                        await ws.send(data[i : i + CHUNK])

                sending = asyncio.create_task(send_all())
                try:
                    held = await heard_stalls(engine)
                finally:
                    gate.set()
                assert 0 < held < len(data) // 2  # it stopped reading: the rest waits in the client and the socket
                await sending
                await ws.send(json.dumps({"type": "CloseStream"}))
                msgs = [json.loads(m) async for m in ws]
            finals = [m["utterance_id"] for m in msgs if m["type"] == "Results" and m["is_final"]]
            assert finals == list(range(6))
            # gRPC
            gate.clear()
            async with grpc.aio.insecure_channel(grpc_addr) as channel:
                call = speech_pb2_grpc.SpeechStub(channel).StreamingRecognize(_requests(data))
                reading = asyncio.create_task(_responses(call))
                try:
                    held = await heard_stalls(engine)
                finally:
                    gate.set()  # whatever happened: a stalled model would hold the engine's stop too
                # the server stopped reading; what the client wrote meanwhile waits in grpc's
                # buffers, bounded server-side by HTTP/2 flow control (grpc-python's client
                # buffers the rest of a request iterator on its own side)
                assert 0 < held < len(data) // 2
                responses = await asyncio.wait_for(reading, 120)
            assert [r.results[0].utterance_id for r in responses if r.results and r.results[0].is_final] == list(range(6))

    asyncio.run(main())


async def _responses(call) -> list[pb.StreamingRecognizeResponse]:  # type: ignore[no-untyped-def]
    return [r async for r in call]


def test_sigterm_drains_a_grpc_stream_then_unavailable(male_clip) -> None:  # type: ignore[no-untyped-def]
    """A real osum-serve (no Redis: state in memory, with the documented warning): SIGTERM
    mid-utterance ends an open gRPC stream with that utterance's final, then UNAVAILABLE, and
    the process exits 0."""
    import os
    import sys

    env = {"PATH": os.path.dirname(sys.executable), "REDIS_URL": ""}  # no redis-server to be found
    proc, info = start_serve(["--model", "tiny"], env)
    try:

        async def talk() -> tuple[grpc.StatusCode, str, list[pb.StreamingRecognizeResponse]]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{info['grpc_port']}") as channel:
                begun, speaking = asyncio.Event(), asyncio.Event()

                async def requests() -> AsyncIterator[pb.StreamingRecognizeRequest]:
                    yield _config()
                    await begun.wait()
                    audio = pcm16(np.concatenate([SIL, male_clip[: 16000 * 3]]))  # speech still going on
                    for i in range(0, len(audio), CHUNK):
                        yield pb.StreamingRecognizeRequest(audio_content=audio[i : i + CHUNK])
                    await speaking.wait()  # the server hears the utterance
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.sleep(30)  # open, not half-closed: the server ends the call

                call = speech_pb2_grpc.SpeechStub(channel).StreamingRecognize(requests())
                got = []
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for r in call:
                        got.append(r)
                        begun.set()
                        if r.speech_event_type == pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_BEGIN:
                            speaking.set()
                return await call.code(), await call.details(), got

        code, details, got = asyncio.run(talk())
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        finals = [r for r in got if r.results and r.results[0].is_final]
        assert len(finals) == 1 and finals[0].results[0].utterance_id == 0  # the open utterance, finished
        assert proc.wait(timeout=60) == 0
        logs = json_logs(proc)
        assert any("no REDIS_URL and no redis-server: session state in memory" in r["msg"] and r["level"] == "warning" for r in logs)
    finally:
        stop_serve(proc)
