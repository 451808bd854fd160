"""Helpers for tests that talk to a real server: `osum-serve` as a subprocess, and /v1/listen."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from websockets.asyncio.client import connect


def start_serve(args: list[str], env_extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:  # type: ignore[type-arg]
    """``osum-serve ARGS`` on ports 0; returns the process and its first stdout line ("listening", with the ports)."""
    env = dict(os.environ) | (env_extra or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "streaming.app", *args, "--grpc-port", "0", "--ws-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else ""
    return proc, json.loads(line)


def stop_serve(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Kill ``proc`` if it still runs, reap it and close its pipes (after a test, whatever happened)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def json_logs(proc: subprocess.Popen) -> list[dict]:  # type: ignore[type-arg]
    """The structured log records an exited ``osum-serve`` wrote to stderr."""
    assert proc.stderr is not None
    return [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def stream_listen(url: str, audio: np.ndarray, query: str = "tasks=emotion", step: int = 8000) -> list[dict]:
    """Send ``audio`` to ``url``/v1/listen in frames of ``step`` bytes, then CloseStream; every message until a normal close."""
    async with connect(f"{url}/v1/listen?{query}") as ws:
        data = pcm16(audio)
        for i in range(0, len(data), step):
            await ws.send(data[i : i + step])
        await ws.send(json.dumps({"type": "CloseStream"}))
        msgs = [json.loads(m) async for m in ws]
        assert ws.close_code == 1000
        return msgs
