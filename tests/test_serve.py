"""`osum-serve` as a user runs it: a subprocess with both servers, a private redis-server, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

SIL = np.zeros(16000, np.float32)


def _start(env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:  # type: ignore[type-arg]
    env = dict(os.environ) | (env_extra or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.app", "--model", "tiny", "--grpc-port", "0", "--ws-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)


def test_serve_streams_reports_health_and_drains_on_sigterm(male_clip) -> None:  # type: ignore[no-untyped-def]
    proc, info = _start()
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
