"""Load test: N concurrent real-time sessions of real speech against a real osum-serve.

    python load_tests/load.py --engine null --sessions 10,100,300,1000 --seconds 20 --plot docs/img/load-null.png
    python load_tests/load.py --engine model --model tiny --sessions 1,2,4 --protocol grpc

It starts ``osum-serve`` on 127.0.0.1 (ports chosen by the system; a private redis-server
as users get it), opens N sessions (WebSocket ``/v1/listen`` or gRPC), each streaming real
speech with 1.0-1.6 s pauses in 100 ms chunks (``--chunk-ms``) at real-time pace (starts spread over the
first ``--ramp`` seconds), and records for every utterance, in wall time:

* first partial: from the chunk holding the speech's true start to the first Partial;
* final: from the chunk holding the speech's true end to the Final (so the 600 ms
  endpoint silence is included);
* added: from the chunk that completed the endpoint silence (the Final's ``end`` +
  600 ms) to the Final: what the service (and the model, with ``--engine model``) adds;
* analysis: from the Final to the Analysis;

plus errors, refusals, the driver's own lag behind its schedule, the server's CPU use and
audio seconds processed per wall second. With several N it searches for the knee: it stops
at the first N that fails (added P99 over ``--target-ms``, any error or refusal, or the
driver unable to keep real time) and reports the largest N that held. Bounded: at most
``--max-sessions`` sessions and ``--seconds`` of audio each; it stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import clips, program  # noqa: E402  (real speech with pauses)

CHUNK = 1600  # 100 ms at 16 kHz
ENDPOINT_S = 0.6


@dataclass
class Stats:
    first_partial: list[float] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    added: list[float] = field(default_factory=list)
    analysis: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # driver: send time minus scheduled time
    errors: dict[str, int] = field(default_factory=dict)
    utterances: int = 0
    audio_s: float = 0.0

    def merge(self, o: Stats) -> None:
        for k in ("first_partial", "final", "added", "analysis", "lag"):
            getattr(self, k).extend(getattr(o, k))
        for code, n in o.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.utterances += o.utterances
        self.audio_s += o.audio_s


class Timeline:
    """When each chunk was sent; maps stream times to send times."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk = chunk  # samples a chunk
        self.sent: list[float] = []

    def at(self, seconds: float) -> float | None:
        k = int(seconds * 16000) // self.chunk
        return self.sent[k] if 0 <= k < len(self.sent) else None


def _record(st: Stats, tl: Timeline, segs: list[tuple[int, int]], m: dict, now: float, state: dict) -> None:
    kind = m["type"]
    if kind == "Error":
        st.errors[m["code"]] = st.errors.get(m["code"], 0) + 1
        return
    if kind == "Partial" and m["utterance_id"] not in state["partial"]:
        state["partial"].add(m["utterance_id"])
        seg = min(segs, key=lambda s: abs(s[0] / 16000 - m["start"]))
        if (t := tl.at(seg[0] / 16000)) is not None:
            st.first_partial.append(now - t)
    elif kind == "Final":
        st.utterances += 1
        state["final"][m["utterance_id"]] = now
        seg = min(segs, key=lambda s: abs(s[1] / 16000 - m["end"]))
        if m.get("reason") == "silence":
            if (t := tl.at(seg[1] / 16000)) is not None:
                st.final.append(now - t)
            if (t := tl.at(m["end"] + ENDPOINT_S)) is not None:
                st.added.append(now - t)
    elif kind == "Analysis" and m["utterance_id"] in state["final"]:
        st.analysis.append(now - state["final"][m["utterance_id"]])


async def _pace(chunks: list[bytes], tl: Timeline, st: Stats, send) -> None:  # type: ignore[no-untyped-def]
    t0, step = time.perf_counter(), tl.chunk / 16000
    for k, c in enumerate(chunks):
        due = t0 + k * step
        if (d := due - time.perf_counter()) > 0:
            await asyncio.sleep(d)
        now = time.perf_counter()
        st.lag.append(now - due)
        tl.sent.append(now)
        await send(c)
    st.audio_s += len(chunks) * step


async def ws_session(port: int, chunks: list[bytes], segs: list[tuple[int, int]]) -> Stats:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    st, tl, state = Stats(), Timeline(len(chunks[0]) // 2), {"partial": set(), "final": {}}
    try:
        async with connect(f"ws://127.0.0.1:{port}/v1/listen?tasks=emotion&interim_results=true", max_size=None) as ws:
            begin = json.loads(await ws.recv())
            if begin["type"] != "Begin":
                st.errors[begin.get("code", "refused")] = 1
                return st

            async def reader() -> None:
                async for raw in ws:
                    m = json.loads(raw)
                    m["type"] = "Partial" if m["type"] == "Results" and not m["is_final"] else ("Final" if m["type"] == "Results" else m["type"])
                    _record(st, tl, segs, m, time.perf_counter(), state)

            task = asyncio.create_task(reader())
            await _pace(chunks, tl, st, ws.send)
            await ws.send('{"type": "CloseStream"}')
            await task
    except (ConnectionClosed, InvalidStatus, OSError) as e:
        st.errors[type(e).__name__] = st.errors.get(type(e).__name__, 0) + 1
    return st


async def grpc_session(port: int, chunks: list[bytes], segs: list[tuple[int, int]]) -> Stats:
    import grpc

    from streaming.proto import speech_pb2 as pb
    from streaming.proto import speech_pb2_grpc

    st, tl, state = Stats(), Timeline(len(chunks[0]) // 2), {"partial": set(), "final": {}}
    q: asyncio.Queue = asyncio.Queue()
    rc = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=16000, analysis_tasks=["emotion"])
    await q.put(pb.StreamingRecognizeRequest(streaming_config=pb.StreamingRecognitionConfig(config=rc, interim_results=True)))

    async def requests():  # type: ignore[no-untyped-def]
        while (r := await q.get()) is not None:
            yield r

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = speech_pb2_grpc.SpeechStub(ch).StreamingRecognize(requests())
        try:
            await call.read()  # the begin response: audio only after it

            async def send_then_close() -> None:
                await _pace(chunks, tl, st, lambda c: q.put(pb.StreamingRecognizeRequest(audio_content=c)))
                await q.put(None)  # half-close: the server sends what is left and ends the call

            sender = asyncio.create_task(send_then_close())
            while (r := await call.read()) is not grpc.aio.EOF:
                now = time.perf_counter()
                if r.HasField("error"):
                    m = {"type": "Error", "code": r.error.code}
                elif r.HasField("analysis"):
                    m = {"type": "Analysis", "utterance_id": r.analysis.utterance_id}
                elif r.results:
                    res = r.results[0]
                    m = {"type": "Final" if res.is_final else "Partial", "utterance_id": res.utterance_id,
                         "start": res.result_start_time, "end": res.result_end_time, "reason": "silence"}  # fmt: skip
                else:
                    continue
                _record(st, tl, segs, m, now, state)
            await sender
        except grpc.aio.AioRpcError as e:
            st.errors[e.code().name] = st.errors.get(e.code().name, 0) + 1
    return st


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def run_level(n: int, port: int, protocol: str, seconds: float, ramp: float, pids: list[int], seed: int,
                    chunk: int = CHUNK) -> dict:  # fmt: skip
    rng = random.Random(seed)
    pool = clips()
    progs = []
    for _ in range(n):
        audio, segs = program(seconds, rng, pool)
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        progs.append(([pcm[i : i + 2 * chunk] for i in range(0, len(pcm), 2 * chunk)], segs))
    session = ws_session if protocol == "ws" else grpc_session

    async def one(i: int) -> Stats:
        await asyncio.sleep(ramp * i / max(1, n))
        return await session(port, *progs[i])

    server_cpu = lambda: sum(_cpu_seconds(p) for p in pids)  # noqa: E731 (the server's processes: supervisor and workers)
    cpu0, me0, t0 = server_cpu(), _cpu_seconds(os.getpid()), time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, server_cpu() - cpu0
    driver_cpu = _cpu_seconds(os.getpid()) - me0
    total = Stats()
    for r in results:
        total.merge(r)
    return {"n": n, "stats": total, "wall": wall, "server_cpu": cpu / wall, "driver_cpu": driver_cpu / wall}


def _held(row: dict, target_ms: float) -> bool:
    return not row["errors"] and row["added"][99] <= target_ms and row["lag"][99] <= 100 and row["utterances"] > 0


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1000) if xs else float("nan")


def start_server(engine: str, model: str, max_sessions: int, profile: Path | None = None,
                 event_loop: str = "auto", workers: int = 1) -> tuple[subprocess.Popen, dict]:  # type: ignore[type-arg]
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *prof, "-m", "streaming.app", "--engine", engine, "--model", model, "--grpc-port", "0", "--ws-port", "0",
           "--max-sessions", str(max_sessions * workers), "--idle-timeout", "120", "--event-loop", event_loop,
           "--workers", str(workers)]  # fmt: skip  # each worker may take them all: the kernel's spread is uneven
    log = open(os.environ.get("OSUM_LOAD_SERVER_LOG", os.devnull), "w")  # noqa: SIM115 (lives as long as the server)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit("osum-serve did not start")
    return proc, json.loads(line)


def main() -> None:
    from streaming.app import event_loop_factory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("null", "model"), default="null")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--protocol", choices=("ws", "grpc"), default="ws")
    ap.add_argument("--sessions", default="10,100,300,1000", help="comma-separated N, searched in order")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio per session")
    ap.add_argument("--ramp", type=float, default=5.0, help="seconds over which sessions start")
    ap.add_argument("--target-ms", type=float, default=50.0, help="added latency P99 that must hold")
    ap.add_argument("--max-sessions", type=int, default=2000)
    ap.add_argument("--plot", type=Path, help="PNG of latency against N")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--keep-going", action="store_true", help="measure every N, also past the first failure (for plots)")
    ap.add_argument("--profile", type=Path, help="run the server under cProfile, writing here")
    ap.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="the server's and the driver's event loop")
    ap.add_argument("--workers", type=int, default=1, help="server processes sharing the ports (osum-serve --workers)")
    ap.add_argument("--chunk-ms", type=int, default=100, help="audio per message (Riva's published figures use 160)")
    args = ap.parse_args()
    if not 10 <= args.chunk_ms <= 1000:
        raise SystemExit("--chunk-ms must be 10 to 1000")
    levels = [int(x) for x in args.sessions.split(",")]
    if max(levels) > args.max_sessions:
        raise SystemExit(f"at most {args.max_sessions} sessions")
    proc, info = start_server(args.engine, args.model, max(levels) + 10, args.profile, args.event_loop, args.workers)
    pids = [proc.pid, *info.get("workers", [])]
    port = info["ws_port"] if args.protocol == "ws" else info["grpc_port"]
    rows, knee = [], None
    head = ("| N | utterances | errors | first partial P50/P95/P99 ms | final P50/P95/P99 ms | added P50/P95/P99 ms | "
            "analysis P50/P95 ms | driver lag P99 ms | server CPU | driver CPU | audio s per s |")  # fmt: skip
    print(f"engine={args.engine} model={args.model if args.engine == 'model' else '-'} protocol={args.protocol} "
          f"workers={args.workers} chunk={args.chunk_ms}ms seconds={args.seconds} cores={os.cpu_count()}\n\n{head}\n|" + "---:|" * 11, flush=True)
    try:
        for i, n in enumerate(levels):
            with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:  # the driver: the same loop
                r = runner.run(run_level(n, port, args.protocol, args.seconds, args.ramp, pids, seed=i, chunk=16 * args.chunk_ms))
            s: Stats = r["stats"]
            row = {"n": n, "utterances": s.utterances, "errors": s.errors, "server_cpu": r["server_cpu"], "driver_cpu": r["driver_cpu"],
                   "audio_per_s": s.audio_s / r["wall"]}  # fmt: skip
            for k in ("first_partial", "final", "added", "analysis", "lag"):
                row[k] = {q: pct(getattr(s, k), q) for q in (50, 95, 99)}
            rows.append(row)
            f3 = lambda d: f"{d[50]:.0f} / {d[95]:.0f} / {d[99]:.0f}"  # noqa: E731
            print(f"| {n} | {s.utterances} | {sum(s.errors.values()) or 0} | {f3(row['first_partial'])} | {f3(row['final'])} | "
                  f"{f3(row['added'])} | {row['analysis'][50]:.0f} / {row['analysis'][95]:.0f} | {row['lag'][99]:.0f} | "
                  f"{100 * r['server_cpu']:.0f}% | {100 * r['driver_cpu']:.0f}% | {row['audio_per_s']:.1f} |", flush=True)  # fmt: skip
            if not _held(row, args.target_ms):
                print(f"\nN={n} fails the target (added P99 <= {args.target_ms:.0f} ms, no errors, driver lag P99 <= 100 ms)"
                      + (f": errors {s.errors}" if s.errors else ""))
                if not args.keep_going:
                    break
                continue
            if all(_held(r, args.target_ms) for r in rows):  # the knee: the largest N below the first failure
                knee = n
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\nlargest N that held: {knee if knee is not None else 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r["n"] for r in rows]
        for q, style in ((50, "o-"), (95, "s--"), (99, "^:")):
            ax.plot(ns, [r["added"][q] for r in rows], style, label=f"added P{q}")
        ax.axhline(args.target_ms, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("concurrent real-time sessions")
        ax.set_ylabel("latency added after the endpoint (ms)")
        ax.set_title(f"osum-serve, {args.engine} engine, {args.protocol}, {os.cpu_count()} cores")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)


if __name__ == "__main__":
    main()
