"""`osum-serve` as a user runs it: a subprocess with both servers, a private redis-server, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .serving import start_serve

SIL = np.zeros(16000, np.float32)


def test_serve_streams_reports_health_and_drains_on_sigterm(male_clip) -> None:  # type: ignore[no-untyped-def]
    proc, info = start_serve(["--model", "tiny"])
    try:
        port = info["ws_port"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).status == 200
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).read() == b"ready\n"
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "osum_sessions_active 0.0" in metrics and "osum_queue_depth" in metrics

        async def talk() -> list[dict]:
            async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
                pcm = (np.concatenate([SIL, male_clip, SIL]) * 32767).astype("<i2").tobytes()
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
        assert proc.stderr is not None
        logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert any("private redis-server" in r["msg"] for r in logs) and any(r["msg"] == "stopped" for r in logs)
        opened = [r for r in logs if r["msg"].startswith("session opened")]
        assert opened and opened[0]["session_id"] and opened[0]["key"] == "anonymous"  # structured, per session
        assert any(r["msg"] == "auth is OFF: anyone who can reach the ports may open sessions (local use only)" for r in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_a_session_survives_kill_9_of_the_server(male_clip, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """State is in Redis: a new process resumes the session; finalized results are kept, none twice."""
    from .redis_server import redis_server

    def stop(proc) -> None:  # type: ignore[no-untyped-def]
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    speech = (np.concatenate([SIL, male_clip, SIL]) * 32767).astype("<i2").tobytes()

    async def first_half(port: int) -> tuple[str, int, list[dict]]:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion") as ws:
            begin = json.loads(await ws.recv())
            await ws.send(speech)
            msgs = []
            while not any(m["type"] == "Analysis" for m in msgs):  # utterance 0 is finished and stored
                msgs.append(json.loads(await ws.recv()))
            return begin["resume_token"], msgs[-1]["seq"], [begin, *msgs]

    async def second_half(port: int, token: str, last_seq: int) -> list[dict]:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?resume={token}&last_seq={last_seq}") as ws:
            await ws.send(speech)
            await ws.send(json.dumps({"type": "CloseStream"}))
            return [json.loads(m) async for m in ws]

    with redis_server(tmp_path) as url:
        proc, info = start_serve(["--model", "tiny"], {"REDIS_URL": url})
        try:
            token, last_seq, before = asyncio.run(first_half(info["ws_port"]))
            proc.send_signal(signal.SIGKILL)  # no drain, no goodbye
            proc.wait(timeout=30)
        finally:
            stop(proc)
        proc, info = start_serve(["--model", "tiny"], {"REDIS_URL": url})
        try:
            after = asyncio.run(second_half(info["ws_port"], token, last_seq))
        finally:
            stop(proc)
    assert after[0]["type"] == "Begin" and after[0]["session_id"] == before[0]["session_id"]
    assert after[0]["audio_offset"] > 0  # where the client should replay from
    finals = [m for m in before + after if m["type"] == "Results" and m["is_final"]]
    assert [f["utterance_id"] for f in finals] == [0, 1]  # numbering continued; nothing repeated
    seqs = [m["seq"] for m in before[1:] + after[1:]]
    assert seqs == sorted(set(seqs))
