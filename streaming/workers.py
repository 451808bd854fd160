"""``osum-serve --workers N``: N server processes sharing both ports, one supervisor.

One Python process serves its sessions on one event loop, i.e. on one core: with the null
engine it tops out at a few hundred real-time sessions (docs/benchmarks.md). Workers spread
the servers over the machine's cores. Each worker is a whole ``osum-serve`` (its own engine,
gRPC and WebSocket servers) bound to the same two ports with ``SO_REUSEPORT``, so the kernel
spreads new connections over them; what they share goes through Redis:

* Session state: one Redis for all (``REDIS_URL``, or a private redis-server the supervisor
  starts), so a session resumes on whichever worker its reconnect reaches.
* Ports: the supervisor binds both ports first with ``SO_REUSEPORT`` (which also resolves
  port 0) and holds them without listening for its lifetime; workers bind the same ports and
  listen. A bound socket that does not listen gets no connections.
* Metrics: ``/metrics`` on any worker reports the sum over all of them (prometheus-client's
  multiprocess mode, in a folder the supervisor owns; gauges count live workers only).
* Limits: ``--max-sessions`` is for the whole server, split evenly over the workers (the
  kernel spreads connections by hash, so a worker can be full while another is not).
  Per-key limits (``--max-sessions-per-key``) are counted per process, so the supervisor
  refuses them with more than one worker rather than let them silently multiply.
* Life cycle: SIGTERM or SIGINT reaches every worker, which drains as a single server does;
  the supervisor exits 0 when all have. A worker that dies is started again (its
  connections' clients resume on the others); one that keeps dying stops the server. Workers
  get SIGTERM if the supervisor dies, even by ``kill -9``.

The model engine works too, but each worker loads its own copy of the model: that suits a
machine with a GPU per worker, not a CPU that one model already keeps busy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from osum.errors import InvalidConfigError

__all__ = ["reserve_port", "supervise"]

log = logging.getLogger("osum.serve")

RESTARTS = 5  # a worker that dies this many times ...
RESTART_WINDOW_S = 60.0  # ... within this window stops the whole server
START_TIMEOUT_S = 900.0  # loading the released model on a cold disk takes minutes
DRAIN_TIMEOUT_S = 90.0  # workers drain open utterances (gRPC's grace is 30 s) before a kill


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with ``SO_REUSEPORT`` without listening; port 0 picks a free one.

    The socket keeps the port for the workers, which bind it the same way and listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise InvalidConfigError(f"cannot bind {host}:{port}: {e.strerror}") from None
    return s


class _Worker:
    def __init__(self, index: int, cmd: list[str], env: dict[str, str]) -> None:
        self.index, self.cmd, self.env = index, cmd, env
        self.proc: subprocess.Popen[str] | None = None
        self.deaths: list[float] = []

    def start(self) -> None:
        from .app import die_with_parent

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True, env=self.env,
                                     preexec_fn=die_with_parent)  # fmt: skip

    def wait_listening(self, deadline: float) -> dict:
        """The worker's "listening" line (it prints nothing else on stdout)."""
        assert self.proc is not None and self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    break  # exited: its own log says why
                return json.loads(line)
        raise RuntimeError(f"worker {self.index} did not start (exit status {self.proc.poll()})")


def _worker_command(argv: Sequence[str], index: int, grpc_port: int, ws_port: int, max_sessions: int) -> list[str]:
    # argparse keeps the last of a repeated option: the user's command line, then what differs
    return [sys.executable, "-m", "streaming.app", *argv, "--workers", "1", "--worker-index", str(index),
            "--grpc-port", str(grpc_port), "--ws-port", str(ws_port), "--max-sessions", str(max_sessions)]  # fmt: skip


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run ``args.workers`` workers of ``osum-serve argv`` until SIGTERM or SIGINT."""
    from .app import PrivateRedis, prepare_base

    n = args.workers
    if args.max_sessions_per_key:
        raise InvalidConfigError("--max-sessions-per-key is counted per process: it needs --workers 1")
    if args.max_sessions < n:
        raise InvalidConfigError(f"--max-sessions {args.max_sessions} is less than one session per worker ({n})")
    env = dict(os.environ)
    private = None
    if not env.get("REDIS_URL"):
        if not shutil.which("redis-server"):
            raise InvalidConfigError("--workers > 1 needs a shared session store: "
                                     "set REDIS_URL or install redis-server")  # fmt: skip
        private = PrivateRedis()
        env["REDIS_URL"] = private.url
        log.info("session state in a private redis-server (%s), shared by %d workers", private.sock, n)
    metrics_dir = tempfile.mkdtemp(prefix="osum-metrics-")
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    held: list[socket.socket] = []
    workers: list[_Worker] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers (signal %d): each drains its sessions", n, signum)
        stopping = True
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.engine == "model":  # once, before workers race for the cache
            prepare_base(args.model)
        held = [reserve_port(args.host, args.grpc_port), reserve_port(args.host, args.ws_port)]
        grpc_port, ws_port = (s.getsockname()[1] for s in held)
        per_worker = math.ceil(args.max_sessions / n)
        workers = [_Worker(i, _worker_command(argv, i, grpc_port, ws_port, per_worker), env) for i in range(n)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        for w in workers:
            w.wait_listening(deadline)
        pids = [w.proc.pid for w in workers if w.proc is not None]
        line = {"event": "listening", "grpc_port": grpc_port, "ws_port": ws_port, "workers": pids}
        print(json.dumps(line), flush=True)
        log.info("listening: gRPC %s:%d, WebSocket/HTTP %s:%d, %d workers (%s sessions each at most)",
                 args.host, grpc_port, args.host, ws_port, n, per_worker)  # fmt: skip
        return _watch(workers, lambda: stopping, metrics_dir)
    except RuntimeError as e:  # a worker did not start: stop the others
        if stopping:  # told to stop while starting
            return 0
        log.error("cannot start: %s", e)
        on_signal(signal.SIGTERM, None)
        return 1  # the others drain in finally
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _reap(workers)
        for s in held:
            s.close()
        if private is not None:
            private.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _watch(workers: list[_Worker], stopping: Callable[[], bool], metrics_dir: str) -> int:
    """Restart workers that die until told to stop; then wait for all. Returns the exit status."""
    from prometheus_client import multiprocess

    while True:
        for w in workers:
            assert w.proc is not None
            code = w.proc.poll()
            if code is None:
                continue
            if stopping():
                continue
            multiprocess.mark_process_dead(w.proc.pid, metrics_dir)
            now = time.monotonic()
            w.deaths = [t for t in w.deaths if now - t < RESTART_WINDOW_S] + [now]
            if len(w.deaths) >= RESTARTS:
                log.error("worker %d died %d times in %.0f s (last exit status %s): stopping", w.index,
                          len(w.deaths), RESTART_WINDOW_S, code)  # fmt: skip
                for other in workers:
                    if other.proc is not None and other.proc.poll() is None:
                        other.proc.send_signal(signal.SIGTERM)
                return 1  # supervise() reaps them
            log.error("worker %d (pid %d) exited with status %s: starting it again", w.index, w.proc.pid, code)
            w.start()
            w.wait_listening(time.monotonic() + START_TIMEOUT_S)
        if stopping() and all(w.proc is not None and w.proc.poll() is not None for w in workers):
            codes = [w.proc.returncode for w in workers if w.proc is not None]
            log.info("stopped (%d workers)", len(workers))
            return 0 if all(c == 0 for c in codes) else 1
        time.sleep(0.2)


def _reap(workers: list[_Worker]) -> None:
    """Wait for the workers to drain; kill any still running after DRAIN_TIMEOUT_S."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    for w in workers:
        if w.proc is None:
            continue
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in %.0f s: killed", w.index, DRAIN_TIMEOUT_S)
            w.proc.kill()
            w.proc.wait()
        if w.proc.stdout is not None:
            w.proc.stdout.close()
