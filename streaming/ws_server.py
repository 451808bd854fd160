"""WebSocket: ``/v1/listen`` over the engine (python-websockets' asyncio server).

One connection is one session. The handler only translates (see
:mod:`streaming.ws_messages` for the protocol): binary frames go to ``send`` (awaited
before the next frame is read, so a client faster than the engine is slowed by TCP
backpressure, never buffered without bound), text frames are parsed and turned into
engine calls, and engine events are written back as JSON. Protocol violations get an
``Error`` message and a close code from :mod:`streaming.status`; bad audio gets an
``Error`` message and the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from osum.errors import OsumError

from .engine import Engine, LiveSession
from .session import SessionConfig
from .status import RETRY_AFTER_S, ws_close_code
from .ws_messages import ProtocolError, config_from_params, event_message, parse_client_text

__all__ = ["ListenHandler", "serve_ws", "MAX_FRAME_BYTES"]

log = logging.getLogger("streaming.ws")
MAX_FRAME_BYTES = 1 << 20


class ListenHandler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def __call__(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path if ws.request else "/")
        if path.path != "/v1/listen":
            await _close_with_error(ws, "not_found", f"no WebSocket endpoint at {path.path}", 4004)
            return
        params = dict(parse_qsl(path.query))
        try:
            session = await self._open(ws, params)
        except OsumError as e:
            await _close_with_error(ws, e.code, _with_hint(e), ws_close_code(e.code))
            return
        if session is None:
            return
        await ws.send(json.dumps({"type": "Begin", "session_id": session.id, "resume_token": session.id}))
        writer = asyncio.create_task(self._write(ws, session))
        reader = asyncio.create_task(self._read(ws, session))
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done():
            error = reader.exception()
            if isinstance(error, ProtocolError):
                await _send_error(ws, error.code, str(error))
            elif error is not None and not isinstance(error, ConnectionClosed):
                log.error("session %s: reader failed", session.id, exc_info=error)
            await session.end()  # abrupt disconnect too: finish what was heard, keep it for a resume
            with contextlib.suppress(ConnectionClosed):
                await writer
            code = ws_close_code(error.code) if isinstance(error, ProtocolError) else 1000
            await ws.close(code, str(error)[:120] if isinstance(error, ProtocolError) else "stream closed")
            return
        # the session ended on the server's side (drain, slow client): stop reading and close
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await reader
        await ws.close(1000 if self.engine.accepting else 1012, "stream closed" if self.engine.accepting else "server restarting")

    async def _open(self, ws: ServerConnection, params: dict[str, str]) -> LiveSession | None:
        """Config from the query, or from a Configure message that comes first."""
        resume = params.pop("resume", None)
        last_seq = int(params.pop("last_seq", "-1") or -1)
        params.pop("token", None)  # auth is checked before the handshake completes (servers' concern)
        if not params and resume is None:  # wait for an optional Configure before audio
            try:
                first = await asyncio.wait_for(ws.recv(), timeout=10)
            except TimeoutError:
                raise ProtocolError("no Configure message or audio within 10 s") from None
            if isinstance(first, str):
                msg = parse_client_text(first)
                if msg.type != "Configure":
                    raise ProtocolError(f"expected Configure or audio first, got {msg.type}")
                params = msg.params
                resume = params.pop("resume", resume)
                last_seq = int(params.pop("last_seq", last_seq))
                session = await self.engine.open_session(config_from_params(params), resume, last_seq)
            else:
                session = await self.engine.open_session(SessionConfig(), resume, last_seq)
                await session.send(first)
            return session
        return await self.engine.open_session(config_from_params(params), resume, last_seq)

    async def _read(self, ws: ServerConnection, session: LiveSession) -> None:
        async for frame in ws:
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


def _with_hint(e: OsumError) -> str:
    return f"{e} (retry after {RETRY_AFTER_S} s)" if e.code == "over_capacity" else str(e)


async def serve_ws(engine: Engine, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> tuple[Server, int]:
    """Start the WebSocket server; returns it and the bound port."""
    server = await serve(ListenHandler(engine), host, port, max_size=MAX_FRAME_BYTES, compression=None, **kwargs)
    bound = next(iter(server.sockets)).getsockname()[1]
    return server, bound
