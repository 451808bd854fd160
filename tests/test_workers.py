"""`osum-serve --workers 2`: two real server processes sharing both ports (streaming.workers),
a private redis-server between them, real WebSocket and gRPC clients, the null engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from osum_client import AsyncClient, StreamOptions, from_array
from osum_client.events import Final
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from .serving import json_logs, pcm16, start_serve, stop_serve, stream_listen

SIL = np.zeros(16000, np.float32)
NULL = ["--engine", "null", "--workers", "2"]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading is Linux's")


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    families = text_string_to_metric_families(text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _owner(workers: list[int], server_port: int, client_port: int) -> int:
    """The worker pid whose socket is the server side of the connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == server_port and int(f[2].split(":")[1], 16) == client_port:
            inode = f[9]
    assert inode is not None, "connection not found in /proc/net/tcp"
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


def _worker_pids(supervisor: int) -> set[int]:
    kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return {int(k) for k in kids if b"--worker-index" in Path(f"/proc/{k}/cmdline").read_bytes()}


def test_two_workers_share_the_ports_sessions_and_metrics(male_clip) -> None:  # type: ignore[no-untyped-def]
    proc, info = start_serve(NULL)
    try:
        port, pids = info["ws_port"], info["workers"]
        assert len(pids) == 2 and _worker_pids(proc.pid) == set(pids)
        audio = np.concatenate([SIL, male_clip, SIL])

        async def sdk_grpc() -> list:
            opts = StreamOptions(tasks=(), realtime=False)
            client = AsyncClient(f"grpc://127.0.0.1:{info['grpc_port']}")
            return [ev async for ev in client.stream(from_array(audio), opts)]

        async def calls() -> tuple[list[list[dict]], list[list]]:
            ws = asyncio.gather(*(stream_listen(f"ws://127.0.0.1:{port}", audio, "tasks=") for _ in range(12)))
            return await ws, await asyncio.gather(*(sdk_grpc() for _ in range(4)))

        ws_calls, grpc_calls = asyncio.run(calls())
        for msgs in ws_calls:
            assert any(m["type"] == "Results" and m["is_final"] for m in msgs)
        for events in grpc_calls:
            assert any(isinstance(ev, Final) for ev in events)
        # a scrape reaches one worker; it must report both
        for _ in range(6):
            v = _metrics(port)
            assert v[("osum_sessions_opened_total", (("resumed", "false"),))] == 16
            assert abs(v[("osum_audio_seconds_total", ())] - 16 * len(audio) / 16000) < 0.05
            assert v[("osum_sessions_active", ())] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        logs = json_logs(proc)
        opened = [r for r in logs if r["msg"].startswith("session opened")]
        assert len(opened) == 16 and {r["worker"] for r in opened} == {0, 1}  # spread: (1/2)^15 to fail by chance
        assert [r for r in logs if r["msg"] == "stopped"] and any(r["msg"] == "stopped (2 workers)" for r in logs)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    finally:
        stop_serve(proc)


def test_a_call_survives_kill_9_of_its_worker(male_clip) -> None:  # type: ignore[no-untyped-def]
    """The worker that holds a call is killed mid-call: the client resumes on whichever worker
    its reconnect reaches (the other one, or the replacement the supervisor starts), from the
    state in the shared Redis; the numbering goes on."""
    speech = pcm16(np.concatenate([SIL, male_clip, SIL]))
    proc, info = start_serve(NULL)
    try:
        port, pids = info["ws_port"], info["workers"]

        async def first_half() -> tuple[list[dict], int]:
            async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=") as ws:
                owner = _owner(pids, port, ws.local_address[1])
                await ws.send(speech)  # the session opens on its first audio or Configure
                msgs = [json.loads(await ws.recv())]
                while not any(m["type"] == "Results" and m["is_final"] for m in msgs):
                    msgs.append(json.loads(await ws.recv()))
                os.kill(owner, signal.SIGKILL)  # no drain, no goodbye
                return msgs, owner

        before, killed = asyncio.run(first_half())
        final0 = next(m for m in before if m["type"] == "Results" and m["is_final"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the supervisor starts a replacement
            now = _worker_pids(proc.pid)
            if len(now) == 2 and killed not in now:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the killed worker was not replaced")

        async def second_half() -> list[dict]:
            url = f"ws://127.0.0.1:{port}/v1/listen?resume={before[0]['resume_token']}&last_seq={final0['seq']}"
            async with connect(url) as ws:
                begin = json.loads(await ws.recv())
                heard = round(begin["audio_offset"] * 16000) * 2
                await ws.send(speech[heard:] + speech)
                await ws.send(json.dumps({"type": "CloseStream"}))
                return [begin, *[json.loads(m) async for m in ws]]

        after = asyncio.run(second_half())
        assert after[0]["session_id"] == before[0]["session_id"] and after[0]["audio_offset"] > 0
        finals = [m for m in after if m["type"] == "Results" and m["is_final"]]
        assert finals and all(f["utterance_id"] >= 1 for f in finals)  # numbering went on
        assert after[1]["seq"] > final0["seq"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert any("exited with status -9: starting it again" in r["msg"] for r in json_logs(proc))
    finally:
        stop_serve(proc)


def _serve_fails(args: list[str]) -> list[dict]:
    """``osum-serve ARGS`` that must exit 1 at start; its log records."""
    r = subprocess.run([sys.executable, "-m", "streaming.app", *args], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    return [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]


def test_workers_refuse_what_they_cannot_keep() -> None:
    logs = _serve_fails([*NULL, "--max-sessions-per-key", "2", "--grpc-port", "0", "--ws-port", "0"])
    assert any("--max-sessions-per-key is counted per process" in r["msg"] for r in logs)
    logs = _serve_fails(["--engine", "null", "--workers", "0"])
    assert any("--workers must be >= 1" in r["msg"] for r in logs)


@pytest.mark.parametrize("which", ["--grpc-port", "--ws-port"])
def test_a_port_in_use_is_an_error_at_start(which: str) -> None:
    """gRPC's own default (SO_REUSEPORT) would share the port with whoever holds it."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a holder that allows sharing
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        other = "--ws-port" if which == "--grpc-port" else "--grpc-port"
        logs = _serve_fails(["--engine", "null", which, str(taken.getsockname()[1]), other, "0"])
    name = "gRPC" if which == "--grpc-port" else "WebSocket"
    assert any(r["msg"].startswith(f"cannot start: {name} cannot listen on 127.0.0.1:") for r in logs)
