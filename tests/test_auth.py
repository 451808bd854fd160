"""API keys, limits and idle timeouts on real gRPC and WebSocket servers (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from osum.errors import InvalidConfigError
from streaming.auth import ANONYMOUS, Authenticator, UnauthenticatedError, credential_from, parse_keys
from streaming.engine import Engine, EngineOptions
from streaming.grpc_server import serve
from streaming.proto import speech_pb2 as pb
from streaming.proto import speech_pb2_grpc
from streaming.scheduler import SchedulerOptions
from streaming.ws_server import serve_ws

from .redis_server import redis_server

KEY, OTHER = "k-alice-0123456789abcdef", "k-bob-0123456789abcdef"
OPTS = EngineOptions(scheduler=SchedulerOptions(final_max_tokens=6))
AUTH = Authenticator({KEY: "alice", OTHER: "bob"})


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    assert parse_keys(f"alice:{KEY}, {OTHER}") == {KEY: "alice", OTHER: "key-2"}
    f = tmp_path / "keys"
    f.write_text(f"# name key\nalice {KEY}\n\n{OTHER}  # a bare key\n")
    auth = Authenticator.from_sources(env={"OSUM_API_KEYS": "carol:k-carol-0123456789abcdef"}, file=f)
    assert auth.enabled and "3 static key(s)" in auth.describe()
    with pytest.raises(InvalidConfigError, match="shorter than 16"):
        parse_keys("alice:short")
    with pytest.raises(InvalidConfigError, match="no API keys"):
        Authenticator.from_sources(env={}, mode="required")
    off = Authenticator.from_sources(env={})
    assert not off.enabled and "OFF" in off.describe()


def test_authenticate_and_credentials() -> None:
    async def main() -> None:
        assert (await AUTH.authenticate(KEY)).name == "alice"
        for bad in (None, "", KEY + "x"):
            with pytest.raises(UnauthenticatedError):
                await AUTH.authenticate(bad)
        assert await Authenticator().authenticate(None) is ANONYMOUS

    asyncio.run(main())
    assert credential_from([("Authorization", f"Bearer {KEY}")]) == KEY
    assert credential_from([("authorization", f"Token {KEY}")]) == KEY
    assert credential_from([("Sec-WebSocket-Protocol", f"token, {KEY}")]) == KEY
    assert credential_from([], {"token": KEY}) == KEY
    assert credential_from([("Authorization", "Basic abc")]) is None


def test_keys_in_redis_can_be_added_and_revoked_live(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        import redis.asyncio as redis

        r = redis.from_url(url, decode_responses=True)
        auth = Authenticator(redis=r)
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(KEY)
        await r.hset("osum:api_keys", KEY, "alice")
        assert (await auth.authenticate(KEY)).name == "alice"
        await r.hdel("osum:api_keys", KEY)
        with pytest.raises(UnauthenticatedError):
            await auth.authenticate(KEY)
        await r.aclose()

    with redis_server(tmp_path) as url:
        asyncio.run(main(url))


async def _ws_server(model, body, options=OPTS, **kw):  # type: ignore[no-untyped-def]
    engine = Engine(model, options)
    await engine.start()
    server, port = await serve_ws(engine, auth=AUTH, **kw)
    try:
        return await body(f"ws://127.0.0.1:{port}/v1/listen", engine)
    finally:
        server.close()
        await server.wait_closed()
        await engine.stop()


async def _begin(url: str, **kw) -> dict:  # type: ignore[no-untyped-def]
    async with connect(url, **kw) as ws:
        begin = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "CloseStream"}))
        async for _ in ws:
            pass
        return begin | {"subprotocol": ws.subprotocol}


def test_websocket_refuses_before_the_handshake_and_accepts_each_credential_form(tiny_model) -> None:
    async def body(url, engine):  # type: ignore[no-untyped-def]
        for bad in ({}, {"additional_headers": {"Authorization": "Bearer wrong-key-0123456789"}}):
            with pytest.raises(InvalidStatus) as e:
                await _begin(url + "?tasks=emotion", **bad)
            assert e.value.response.status_code == 401
            assert json.loads(e.value.response.body)["code"] == "unauthenticated"
        assert engine.metrics.opened.labels("false")._value.get() == 0  # no session was opened
        header = await _begin(url + "?tasks=emotion", additional_headers={"Authorization": f"Bearer {KEY}"})
        query = await _begin(url + f"?tasks=emotion&token={KEY}")
        browser = await _begin(url + "?tasks=emotion", subprotocols=["token", KEY])  # what a browser can do
        assert browser["subprotocol"] == "token"
        for b in (header, query, browser):
            assert b["type"] == "Begin" and b["session_id"]
        return header

    asyncio.run(_ws_server(tiny_model, body))


def test_websocket_per_key_limit_and_idle_timeout(tiny_model) -> None:
    async def body(url, engine):  # type: ignore[no-untyped-def]
        async with connect(url + f"?tasks=emotion&token={KEY}") as first:
            assert json.loads(await first.recv())["type"] == "Begin"
            async with connect(url + f"?tasks=emotion&token={KEY}") as second:  # alice's second session
                msg = json.loads(await second.recv())
                with pytest.raises(ConnectionClosed):
                    await second.recv()
                assert msg["code"] == "limit_exceeded" and "retry after" in msg["message"]
                assert second.close_code == 1013
            async with connect(url + f"?tasks=emotion&token={OTHER}") as bob:  # bob is not affected
                assert json.loads(await bob.recv())["type"] == "Begin"
                await bob.send(json.dumps({"type": "CloseStream"}))
            # alice's first connection sends nothing: closed for idleness
            msgs = []
            with pytest.raises(ConnectionClosed):
                while True:
                    msgs.append(json.loads(await first.recv()))
            assert msgs[-1]["code"] == "idle_timeout" and first.close_code == 4008

    asyncio.run(_ws_server(tiny_model, body, replace(OPTS, max_sessions_per_key=1), idle_timeout_s=1.0))


def test_websocket_idle_deadline_restarts_with_every_frame(tiny_model) -> None:
    """One timer per connection, re-armed when it fires: a client that keeps sending is never
    idle, even long past the first deadline; once it stops, it is closed one timeout later."""

    async def body(url, engine):  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        async with connect(url + f"?tasks=emotion&token={KEY}") as ws:
            assert json.loads(await ws.recv())["type"] == "Begin"
            for _ in range(6):  # 2.4 s of KeepAlive every 0.4 s, with a 1.0 s idle timeout
                await asyncio.sleep(0.4)
                await ws.send(json.dumps({"type": "KeepAlive"}))
            assert ws.close_code is None
            quiet = loop.time()
            msgs = []
            with pytest.raises(ConnectionClosed):
                while True:
                    msgs.append(json.loads(await ws.recv()))
            waited = loop.time() - quiet
            assert msgs[-1]["code"] == "idle_timeout" and ws.close_code == 4008
            assert 0.9 <= waited < 2.0, waited

    asyncio.run(_ws_server(tiny_model, body, OPTS, idle_timeout_s=1.0))


def test_grpc_needs_a_key_health_does_not(tiny_model, male_clip) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def cfg() -> pb.StreamingRecognizeRequest:
        rc = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000, analysis_tasks=["emotion"])
        return pb.StreamingRecognizeRequest(streaming_config=pb.StreamingRecognitionConfig(config=rc))

    async def requests(begun: asyncio.Event):  # type: ignore[no-untyped-def]
        yield cfg()
        await begun.wait()  # audio after the begin response, as the SDK does (no writer race)
        yield pb.StreamingRecognizeRequest(audio_content=b"\0\0" * 1600)

    async def stream(stub, md):  # type: ignore[no-untyped-def]
        begun = asyncio.Event()
        call = stub.StreamingRecognize(requests(begun), metadata=md)
        out = []
        async for r in call:
            begun.set()
            out.append(r)
        return out

    async def main() -> None:
        engine = Engine(tiny_model, OPTS)
        await engine.start()
        server, port = await serve(engine, "127.0.0.1", 0, auth=AUTH, idle_timeout_s=1.0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = speech_pb2_grpc.SpeechStub(ch)
                for md in ((), (("authorization", "Bearer nope-0123456789abcdef"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stream(stub, md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Recognize(pb.RecognizeRequest(audio=b"RIFF"), metadata=md)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                ok = await stream(stub, (("authorization", f"Bearer {KEY}"),))
                assert ok and ok[0].resume_token.startswith(ok[0].session_id + ".")

                async def silent():  # type: ignore[no-untyped-def]
                    yield cfg()
                    await asyncio.sleep(30)

                call = stub.StreamingRecognize(silent(), metadata=(("authorization", f"Bearer {KEY}"),))
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in call:
                        pass
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED

                async def mute():  # type: ignore[no-untyped-def]
                    await asyncio.sleep(30)  # not even the config message
                    yield cfg()

                call = stub.StreamingRecognize(mute(), metadata=(("authorization", f"Bearer {KEY}"),))
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in call:
                        pass
                assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert "no streaming_config within 1 s" in await call.details()
                assert not engine.sessions
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop(None)
            await engine.stop()

    asyncio.run(main())
