"""`osum-serve` as a user runs it: a subprocess with both servers, a private redis-server, SIGTERM drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.error
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .serving import json_logs, start_serve, stop_serve

SIL = np.zeros(16000, np.float32)


def test_serve_streams_reports_health_and_drains_on_sigterm(male_clip) -> None:  # type: ignore[no-untyped-def]
    proc, info = start_serve(["--model", "tiny"])
    try:
        port = info["ws_port"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read() == b"ready\n"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "osum_sessions_active 0.0" in metrics and "osum_queue_depth" in metrics
        pcm = (np.concatenate([SIL, male_clip, SIL]) * 32767).astype("<i2").tobytes()

        async def a_call_and_a_refused_one() -> None:
            async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
                await ws.send(pcm)
                await ws.send(json.dumps({"type": "CloseStream"}))
                async for _ in ws:
                    pass
            with contextlib.suppress(ConnectionClosed):
                async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=karaoke") as ws:  # invalid_config, 4400
                    async for _ in ws:
                        pass

        asyncio.run(a_call_and_a_refused_one())
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert values[("osum_sessions_opened_total", (("resumed", "false"),))] == 1
        assert abs(values[("osum_audio_seconds_total", ())] - len(pcm) / 32000) < 0.01
        assert values[("osum_result_latency_seconds_count", (("type", "Final"),))] >= 1
        assert values[("osum_calls_failed_total", (("code", "invalid_config"), ("protocol", "ws")))] == 1

        async def talk() -> list[dict]:
            async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
                await ws.send(pcm)
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)  # mid-stream: the open utterance must still be finished
                msgs = []
                try:
                    async for m in ws:
                        msgs.append(json.loads(m))
                except ConnectionClosed:
                    pass
                assert ws.close_code == 1012  # service restart: reconnect and resume elsewhere
                return msgs

        msgs = asyncio.run(talk())
        assert any(m["type"] == "Results" and m["is_final"] for m in msgs)
        assert proc.wait(timeout=60) == 0
        logs = json_logs(proc)
        assert any("private redis-server" in r["msg"] for r in logs) and any(r["msg"] == "stopped" for r in logs)
        opened = [r for r in logs if r["msg"].startswith("session opened")]
        assert opened and opened[0]["session_id"] and opened[0]["key"] == "anonymous"  # structured, per session
        assert any(r["msg"] == "auth is OFF: anyone who can reach the ports may open sessions (local use only)" for r in logs)
    finally:
        stop_serve(proc)


def test_a_session_survives_kill_9_of_the_server(male_clip, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """State is in Redis: a new process resumes the session. The client had acknowledged only
    up to utterance 0's Final when the server was killed, so the Analysis stored before the
    kill is replayed from Redis, once and unchanged; numbering goes on; nothing twice."""
    from .redis_server import redis_server

    speech = (np.concatenate([SIL, male_clip, SIL]) * 32767).astype("<i2").tobytes()

    async def first_half(port: int) -> list[dict]:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
            msgs = [json.loads(await ws.recv())]
            await ws.send(speech)
            while not any(m["type"] == "Analysis" for m in msgs):  # utterance 0 is finished and stored
                msgs.append(json.loads(await ws.recv()))
            return msgs

    async def second_half(port: int, token: str, last_seq: int) -> list[dict]:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?resume={token}&last_seq={last_seq}") as ws:
            begin = json.loads(await ws.recv())
            heard = round(begin["audio_offset"] * 16000) * 2  # bytes of PCM16 the server had heard
            await ws.send(speech[heard:] + speech)  # re-send from there, then a new utterance
            await ws.send(json.dumps({"type": "CloseStream"}))
            return [begin, *[json.loads(m) async for m in ws]]

    with redis_server(tmp_path) as url:
        proc, info = start_serve(["--model", "tiny"], {"REDIS_URL": url})
        try:
            before = asyncio.run(first_half(info["ws_port"]))
            proc.send_signal(signal.SIGKILL)  # no drain, no goodbye
            proc.wait(timeout=30)
        finally:
            stop_serve(proc)
        final0 = next(m for m in before if m["type"] == "Results" and m["is_final"])
        analysis0 = before[-1]
        acked = [m for m in before[1:] if m["seq"] <= final0["seq"]]  # what the client had processed
        proc, info = start_serve(["--model", "tiny"], {"REDIS_URL": url})
        try:
            after = asyncio.run(second_half(info["ws_port"], before[0]["resume_token"], final0["seq"]))
        finally:
            stop_serve(proc)
    assert after[0]["type"] == "Begin" and after[0]["session_id"] == before[0]["session_id"]
    assert after[0]["audio_offset"] > 0  # where the client should replay from
    assert after[1] == analysis0  # replayed from Redis by the new process: same seq, same tags
    assert [m for m in after if m["type"] == "Analysis"][1:] and all(m["utterance_id"] == 1 for m in after[2:] if "utterance_id" in m)
    finals = [m for m in acked + after if m["type"] == "Results" and m["is_final"]]
    assert [f["utterance_id"] for f in finals] == [0, 1]  # numbering continued; nothing repeated
    assert finals[0] == final0
    seqs = [m["seq"] for m in acked + after[1:]]
    assert seqs == sorted(set(seqs)) and seqs[0] == 0  # in order, none twice, none lost before the kill


def test_redis_restarted_while_serving(male_clip, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As documented: with Redis down a call goes on (results delivered, one non-fatal
    state_unavailable event), /readyz says 503; once Redis is back storing resumes and
    /readyz says 200 again. Against a real `osum-serve` and a real redis-server."""
    import redis

    from .redis_server import redis_server

    utt = (np.concatenate([male_clip, SIL]) * 32767).astype("<i2").tobytes()

    def ready(port: int) -> int:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status
        except urllib.error.HTTPError as e:
            return e.code

    async def call(port: int, redis_down, redis_up) -> list[dict]:  # type: ignore[no-untyped-def]
        msgs: list[dict] = []

        async def until_final(n: int) -> None:
            while sum(m["type"] == "Results" and m["is_final"] for m in msgs) < n:
                msgs.append(json.loads(await ws.recv()))

        async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
            msgs.append(json.loads(await ws.recv()))  # Begin
            await ws.send((SIL * 32767).astype("<i2").tobytes() + utt)
            await asyncio.wait_for(until_final(1), 60)
            await asyncio.to_thread(redis_down)
            await ws.send(utt)
            await asyncio.wait_for(until_final(2), 60)
            while not any(m["type"] == "Error" for m in msgs):  # the warning follows the failed commit
                msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
            await asyncio.to_thread(redis_up)
            await ws.send(utt)
            await ws.send(json.dumps({"type": "CloseStream"}))
            msgs += [json.loads(m) async for m in ws]
        return msgs

    first = redis_server(tmp_path)
    url = first.__enter__()
    proc, info = start_serve(["--model", "tiny"], {"REDIS_URL": url})
    port, seen, later = info["ws_port"], {}, []
    try:
        assert ready(port) == 200

        def redis_down() -> None:
            first.__exit__(None, None, None)
            seen["down"] = ready(port)

        def redis_up() -> None:
            later.append(redis_server(tmp_path))
            assert later[0].__enter__() == url  # same address, empty: it kept nothing
            seen["up"] = ready(port)

        msgs = asyncio.run(call(port, redis_down, redis_up))
        sid = msgs[0]["session_id"]
        stored = redis.Redis(unix_socket_path=url.removeprefix("unix://")).xrange(f"osum:results:{sid}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        for cm in later:
            cm.__exit__(None, None, None)
    assert seen == {"down": 503, "up": 200}
    finals = [m["utterance_id"] for m in msgs if m["type"] == "Results" and m["is_final"]]
    assert finals == [0, 1, 2]  # every result reached the client
    errors = [m for m in msgs if m["type"] == "Error"]
    assert [e["code"] for e in errors] == ["state_unavailable"] and not errors[0]["fatal"]
    assert [json.loads(f[b"event"])["utterance_id"] for _, f in stored if json.loads(f[b"event"])["type"] == "Final"] == [2]


def test_private_redis_does_not_outlive_a_killed_server() -> None:
    """Without REDIS_URL the server starts its own redis-server; `kill -9` of the server must
    not leave it running."""
    import time
    from pathlib import Path

    def gone(pid: int) -> bool:  # exited: no process, or a zombie until init reaps it
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().rsplit(") ", 1)[-1].startswith("Z")
        except FileNotFoundError:
            return True

    proc, _ = start_serve(["--model", "tiny"], {"REDIS_URL": ""})
    try:
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        redis_pids = [p for p in children if b"redis-server" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(redis_pids) == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not gone(redis_pids[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(redis_pids[0])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
