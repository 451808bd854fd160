"""WebSocket: ``/v1/listen`` over the engine (python-websockets' asyncio server).

One connection is one session. The handler only translates (see
:mod:`streaming.ws_messages` for the protocol): binary frames go to ``send`` (awaited
before the next frame is read, so a client faster than the engine is slowed by TCP
backpressure, never buffered without bound), text frames are parsed and turned into
engine calls, and engine events are written back as JSON. Protocol violations get an
``Error`` message and a close code from :mod:`streaming.status`; bad audio gets an
``Error`` message and the stream goes on.

Before the handshake completes, :func:`serve_ws`'s request hook answers the plain HTTP
routes it is given (``/healthz`` ...) and authenticates WebSocket requests
(:mod:`streaming.auth`): a missing or unknown key gets HTTP 401 and no session. A client
that sends nothing (audio, ``KeepAlive`` or anything else) for ``idle_timeout_s`` gets an
``idle_timeout`` error and close code 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from osum.errors import InvalidConfigError, OsumError

from .auth import ANONYMOUS, Authenticator, Principal, UnauthenticatedError, credential_from
from .engine import Engine, LiveSession
from .metrics import EngineMetrics
from .session_base import SessionConfig
from .status import IdleTimeoutError, with_hint, ws_close_code
from .ws_messages import ProtocolError, event_message, listen_request, parse_client_text

__all__ = ["MAX_FRAME_BYTES", "FrameReader", "ListenHandler", "serve_ws"]

log = logging.getLogger("streaming.ws")
MAX_FRAME_BYTES = 1 << 20


class FrameReader:
    """Reads one connection's frames under an idle deadline.

    ``recv()`` returns the client's next frame, None when it closed normally; it raises
    IdleTimeoutError after ``idle_timeout_s`` of waiting, ConnectionClosed when the connection
    dropped. One timer per connection, re-armed only when it fires: a timer per frame
    (``asyncio.timeout`` around every ``recv``) cost ~7 % of the server's CPU at 300 streams.
    """

    def __init__(self, ws: ServerConnection, idle_timeout_s: float, hint: str = "") -> None:
        self.ws, self.timeout, self.hint = ws, idle_timeout_s, hint
        self._loop = asyncio.get_running_loop()
        self._since = 0.0  # when the current wait began
        self._waiting: asyncio.Task[Any] | None = None  # the task inside recv(), if any
        self._timer: asyncio.TimerHandle | None = None
        self._fired = False

    async def recv(self) -> str | bytes | None:
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._since + self.timeout, self._check)
        self._waiting = asyncio.current_task()
        try:
            return await self.ws.recv()
        except asyncio.CancelledError:
            if self._fired and self._waiting is not None and self._waiting.uncancel() == 0:
                raise IdleTimeoutError(f"nothing received for {self.timeout:g} s{self.hint}") from None
            raise
        except ConnectionClosedOK:
            return None
        finally:
            self._waiting = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._waiting is None:  # the handler is busy with a frame, not idle: recv() re-arms
            return
        due = self._since + self.timeout
        if self._loop.time() >= due:
            self._fired = True
            self._waiting.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)


def principal(ws: ServerConnection) -> Principal:
    """Who opened this connection (set by the request hook before the handshake)."""
    return getattr(ws, "osum_principal", ANONYMOUS)


class ListenHandler:
    def __init__(self, engine: Engine, idle_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path if ws.request else "/")
        if path.path == "/v1/realtime":
            from .realtime import serve_realtime

            await serve_realtime(self.engine, ws, principal(ws), self.idle_timeout_s)
            return
        if path.path != "/v1/listen":
            await _close_with_error(ws, "not_found", f"no WebSocket endpoint at {path.path}", 4004)
            return
        params = dict(parse_qsl(path.query))
        try:
            session = await self._open(ws, params)
        except OsumError as e:
            self.engine.metrics.failed.labels("ws", e.code).inc()
            await _close_with_error(ws, e.code, with_hint(e.code, str(e)), ws_close_code(e.code))
            return
        except ConnectionClosed:  # the client left (or broke a frame) before its session began: nothing to clean up
            return
        try:
            await ws.send(json.dumps({"type": "Begin", "session_id": session.id, "resume_token": session.resume_token,
                                      "audio_offset": session.audio_offset}))  # fmt: skip
        except ConnectionClosed:  # gone already: finish the session (kept for a resume) rather than leak it
            await session.abort()
            return
        writer = asyncio.create_task(self._write(ws, session))
        reader = asyncio.create_task(self._read(ws, session))
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done():
            error = reader.exception()
            if isinstance(error, OsumError):
                self.engine.metrics.failed.labels("ws", error.code).inc()
                await _send_error(ws, error.code, with_hint(error.code, str(error)))
            elif error is not None and not isinstance(error, ConnectionClosed):
                log.error("session %s: reader failed", session.id, exc_info=error, extra={"session_id": session.id})
            await session.end()  # abrupt disconnect too: finish what was heard, keep it for a resume
            with contextlib.suppress(ConnectionClosed):
                await writer
            code = ws_close_code(error.code) if isinstance(error, OsumError) else 1000
            await ws.close(code, str(error)[:120] if isinstance(error, OsumError) else "stream closed")
            return
        # the session ended on the server's side (drain, slow client): stop reading and close
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await reader
        await ws.close(1000 if self.engine.accepting else 1012, "stream closed" if self.engine.accepting else "server restarting")

    async def _open(self, ws: ServerConnection, params: dict[str, str]) -> LiveSession:
        """Config from the query, or from a Configure message that comes first.

        Every value (``resume``, ``last_seq`` and ``token`` too) is validated by
        :func:`listen_request` before the engine sees it: a bad one raises an OsumError
        that the caller maps to an ``Error`` message and close code, never a crash (1011).
        """
        owner = principal(ws).name
        request = listen_request(params)
        # only the key (auth was checked before the handshake completed) and perhaps a
        # last_seq: wait for an optional Configure before audio
        if set(params) <= {"token", "last_seq"}:
            try:
                first = await asyncio.wait_for(ws.recv(), timeout=10)
            except TimeoutError:
                raise ProtocolError("no Configure message or audio within 10 s") from None
            if isinstance(first, str):
                msg = parse_client_text(first)
                if msg.type != "Configure":
                    raise ProtocolError(f"expected Configure or audio first, got {msg.type}")
                request = listen_request(params | msg.params)  # a query last_seq holds unless Configure names one
            else:
                session = await self.engine.open_session(SessionConfig(), None, request.last_seq, owner)
                await session.send(first)
                return session
        return await self.engine.open_session(request.config, request.resume, request.last_seq, owner)

    async def _read(self, ws: ServerConnection, session: LiveSession) -> None:
        reader = FrameReader(ws, self.idle_timeout_s, " (send KeepAlive while paused)")
        try:
            while (frame := await reader.recv()) is not None:
                if isinstance(frame, bytes):
                    await session.send(frame)
                    continue
                msg = parse_client_text(frame)
                if msg.type == "Finalize":
                    await session.finalize()
                elif msg.type == "CloseStream":
                    await session.end()
                    return
                elif msg.type == "Configure":
                    raise ProtocolError("Configure is only allowed before any audio")
        finally:
            reader.close()
        await session.end()  # the client closed its side

    async def _write(self, ws: ServerConnection, session: LiveSession) -> None:
        async for ev in session.events():
            try:
                await ws.send(json.dumps(event_message(ev)))
            except ConnectionClosed:
                await session.abort()
                return


async def _send_error(ws: ServerConnection, code: str, message: str) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps({"type": "Error", "code": code, "message": message, "fatal": True}))


async def _close_with_error(ws: ServerConnection, code: str, message: str, close_code: int) -> None:
    await _send_error(ws, code, message)
    await ws.close(close_code, message[:120])


WS_PATHS = ("/v1/listen", "/v1/realtime")
HttpRoutes = Callable[[ServerConnection, Request], Awaitable[Response | None]]


def request_hook(auth: Authenticator, http: HttpRoutes | None,
                 metrics: EngineMetrics | None = None) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:  # fmt: skip
    """Before the handshake: plain HTTP routes, then authentication of WebSocket requests
    (a refusal is counted in ``metrics``: protocol ``http``, code ``unauthenticated``)."""

    async def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if http is not None and (resp := await http(conn, request)) is not None:
            return resp
        url = urlsplit(request.path)
        if url.path not in WS_PATHS:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        try:
            who = await auth.authenticate(credential_from(request.headers.raw_items(), dict(parse_qsl(url.query))))
        except UnauthenticatedError as e:
            resp = conn.respond(HTTPStatus.UNAUTHORIZED, json.dumps({"type": "Error", "code": e.code, "message": str(e)}) + "\n")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="osum"'
            del resp.headers["Content-Type"]
            resp.headers["Content-Type"] = "application/json"
            log.info("refused an unauthenticated %s request", url.path, extra={"code": e.code})
            if metrics is not None:
                metrics.failed.labels("http", e.code).inc()
            return resp
        conn.osum_principal = who  # type: ignore[attr-defined]
        return None

    return process_request


def _select_subprotocol(conn: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    # browsers pass the key as ["token", KEY]; the server must then name one of the offers
    return Subprotocol("token") if "token" in offered else None


async def serve_ws(engine: Engine, host: str = "127.0.0.1", port: int = 0, auth: Authenticator | None = None,
                   http: HttpRoutes | None = None, idle_timeout_s: float = 30.0,
                   max_frame_bytes: int = MAX_FRAME_BYTES, reuse_port: bool = False) -> tuple[Server, int]:  # fmt: skip
    """Start the WebSocket server (``/v1/listen``, ``/v1/realtime`` and the given HTTP routes);
    returns it and the bound port. ``reuse_port``: share the port with other processes
    (``SO_REUSEPORT``: osum-serve's workers). Raises InvalidConfigError when the port cannot be bound."""
    try:
        server = await serve(
            ListenHandler(engine, idle_timeout_s), host, port, max_size=max_frame_bytes, compression=None,
            process_request=request_hook(auth or Authenticator(), http, engine.metrics),
            select_subprotocol=_select_subprotocol, reuse_port=reuse_port,
        )  # fmt: skip
    except OSError as e:  # the port is taken, or the address is not this machine's
        raise InvalidConfigError(f"WebSocket cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = next(iter(server.sockets)).getsockname()[1]
    return server, bound
