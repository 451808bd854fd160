"""WebSocket ``/v1/realtime``: the OpenAI Realtime transcription events over the same engine.

A thin adapter for clients written against OpenAI's Realtime API (also spoken by vLLM,
SGLang and Riva NIM). One connection is one engine session, opened at the first audio.

Client events (JSON text frames):

* ``session.update`` (or the beta ``transcription_session.update``): before any audio.
  ``session.audio.input.format`` ``{"type": "audio/pcm", "rate": 24000}`` (beta:
  ``input_audio_format: "pcm16"``, 24 kHz), ``session.audio.input.turn_detection``
  ``{"type": "server_vad", "threshold", "silence_duration_ms"}`` or ``null`` (beta:
  ``session.turn_detection``), and the extension ``session.osum``
  ``{"tasks": ["emotion", ...], "chat": false}``. Unknown fields are ignored.
* ``input_audio_buffer.append`` ``{"audio": <base64 PCM16 little-endian mono>}``.
* ``input_audio_buffer.commit``: end the current turn now; ``{"final": true}`` (vLLM's
  extension) also ends the stream, after which the server closes with 1000.

Server events: ``session.created`` / ``session.updated``,
``input_audio_buffer.speech_started`` / ``speech_stopped`` / ``committed``,
``conversation.item.input_audio_transcription.delta`` (append-only: the newly committed
text of the running hypothesis), ``conversation.item.input_audio_transcription.completed``
(``transcript``: the utterance's final transcript, authoritative, as OpenAI's), ``error``,
and the extension ``osum.analysis`` (``item_id``, ``tags``, ``reply``) after each completed
item when tasks were asked for. Every server event has ``event_id`` and ``type``; ours
carry an ``osum`` object with the utterance id, times in seconds and ``seq``.

With ``turn_detection: null`` turns end only on commit (the VAD still finds speech; its
endpoint silence is set to 10 s). ``input_audio_buffer.clear`` is not supported (audio
already given to the VAD cannot be taken back): it gets an ``error`` and is ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import uuid
from dataclasses import replace
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from osum.errors import InvalidConfigError, OsumError

from .audio import AudioFormat
from .auth import Principal
from .engine import Engine, LiveSession
from .events import Analysis, Error, Event, Final, Partial, ReplyDelta, SpeechEnded, SpeechStarted
from .session_base import SessionConfig
from .status import with_hint, ws_close_code
from .vad import VadOptions

__all__ = ["serve_realtime", "config_from_session"]

log = logging.getLogger("streaming.realtime")
DEFAULT_RATE = 24000  # OpenAI's pcm16
MANUAL_SILENCE_MS = 10000  # turn_detection null: commits end turns


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a JSON object (absent or null: empty). Raises InvalidConfigError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidConfigError(f"{what} must be an object")
    return value


def _number(value: Any, what: str, integral: bool = False) -> float:
    """A finite JSON number (an integral one with ``integral``). Raises InvalidConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidConfigError(f"{what} must be a number, got {value!r}")
    if integral and value != int(value):
        raise InvalidConfigError(f"{what} must be a whole number, got {value!r}")
    return value


def config_from_session(session: Any, base: SessionConfig) -> SessionConfig:
    """An OpenAI ``session`` object (GA or beta shape) -> SessionConfig. Total: anything else
    than a valid session raises InvalidConfigError (tested with hypothesis)."""
    session = _object(session, "session")
    audio_in = _object(_object(session.get("audio"), "session.audio").get("input"), "session.audio.input")
    rate = base.audio.sample_rate
    fmt = audio_in.get("format", session.get("input_audio_format"))
    if isinstance(fmt, dict):
        if fmt.get("type", "audio/pcm") != "audio/pcm":
            raise InvalidConfigError(f"only audio/pcm input is supported, got {fmt.get('type')!r}")
        rate = int(_number(fmt.get("rate", DEFAULT_RATE), "format.rate", integral=True))
    elif fmt is not None:
        if fmt != "pcm16":
            raise InvalidConfigError(f"only pcm16 input is supported, got {fmt!r}")
        rate = DEFAULT_RATE
    vad = base.vad
    key = "turn_detection"
    if key in audio_in or key in session:
        td = audio_in.get(key, session.get(key))
        if td is None:
            vad = replace(vad, min_silence_ms=MANUAL_SILENCE_MS)
        elif isinstance(td, dict):
            if td.get("type", "server_vad") != "server_vad":
                raise InvalidConfigError(f"turn_detection type {td.get('type')!r} is not supported (server_vad or null)")
            silence = _number(td.get("silence_duration_ms", vad.min_silence_ms), "turn_detection.silence_duration_ms", integral=True)
            vad = VadOptions(threshold=float(_number(td.get("threshold", vad.threshold), "turn_detection.threshold")),
                             min_silence_ms=int(silence), min_speech_ms=vad.min_speech_ms,
                             max_utterance_s=vad.max_utterance_s)  # fmt: skip
        else:
            raise InvalidConfigError("turn_detection must be an object or null")
    ext = _object(session.get("osum"), "session.osum")
    tasks = ext.get("tasks", list(base.tasks))
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise InvalidConfigError("osum.tasks must be a list of task names")
    chat = ext.get("chat", base.chat)
    if not isinstance(chat, bool):
        raise InvalidConfigError(f"osum.chat must be true or false, got {chat!r}")
    return replace(base, audio=AudioFormat(encoding="pcm16", sample_rate=rate, channels=1), vad=vad,
                   tasks=tuple(tasks), chat=chat)  # fmt: skip


def _describe(cfg: SessionConfig) -> dict[str, Any]:
    manual = cfg.vad.min_silence_ms >= MANUAL_SILENCE_MS
    td = None if manual else {"type": "server_vad", "threshold": cfg.vad.threshold, "silence_duration_ms": cfg.vad.min_silence_ms}
    return {"type": "transcription", "object": "realtime.transcription_session",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": cfg.audio.sample_rate}, "turn_detection": td,
                                "transcription": {"model": "osum"}}},
            "osum": {"tasks": list(cfg.tasks), "chat": cfg.chat}}  # fmt: skip


class _Connection:
    def __init__(self, engine: Engine, ws: ServerConnection, who: Principal, idle_timeout_s: float) -> None:
        self.engine, self.ws, self.who, self.idle = engine, ws, who, idle_timeout_s
        self.config = SessionConfig(audio=AudioFormat(sample_rate=DEFAULT_RATE))
        self.session: LiveSession | None = None
        self.writer: asyncio.Task[None] | None = None
        self.committed: dict[int, str] = {}  # utterance -> committed text already sent as deltas
        self.prev_item: str | None = None
        self.sid = uuid.uuid4().hex

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"event_id": f"event_{uuid.uuid4().hex[:20]}", "type": kind, **fields}))

    async def error(self, code: str, message: str, event_id: str | None = None) -> None:
        await self.send("error", error={"type": "invalid_request_error", "code": code, "message": message, "event_id": event_id})

    def item(self, utterance_id: int) -> str:
        return f"item_{(self.session.id if self.session else self.sid)[:16]}_{utterance_id}"

    async def run(self) -> None:
        await self.send("session.created", session=_describe(self.config))
        try:
            await self._read()
        except OsumError as e:
            self.engine.metrics.failed.labels("realtime", e.code).inc()
            await self.error(e.code, with_hint(e.code, str(e)))
            await self._finish(ws_close_code(e.code), str(e)[:120])
            return
        except ConnectionClosed:
            pass
        await self._finish(1000, "stream closed")

    async def _finish(self, code: int, reason: str) -> None:
        if self.session is not None:
            await self.session.end()  # finish what was heard
            if self.writer is not None:
                with contextlib.suppress(ConnectionClosed):
                    await self.writer
        await self.ws.close(code, reason)

    async def _open(self) -> LiveSession:
        if self.session is None:
            self.session = await self.engine.open_session(self.config, owner=self.who.name)
            self.writer = asyncio.create_task(self._write(self.session))
        return self.session

    async def _read(self) -> None:
        from .ws_server import FrameReader  # ws_server routes here: imported late, as it imports us late

        reader = FrameReader(self.ws, self.idle)
        try:
            await self._read_frames(reader)
        finally:
            reader.close()

    async def _read_frames(self, reader: Any) -> None:
        while (frame := await reader.recv()) is not None:
            if isinstance(frame, bytes):
                await self.error("invalid_event", "binary frames are not part of this protocol; use input_audio_buffer.append")
                continue
            try:
                msg = json.loads(frame)
            except ValueError as e:
                await self.error("invalid_json", f"malformed JSON: {e}")
                continue
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                await self.error("invalid_event", "an event must be a JSON object with a type")
                continue
            if await self._handle(msg):
                return

    async def _handle(self, msg: dict[str, Any]) -> bool:
        """One client event; True when the stream is over."""
        kind, eid = msg["type"], msg.get("event_id")
        if kind in ("session.update", "transcription_session.update"):
            if self.session is not None:
                await self.error("session_locked", "session.update is only allowed before the first audio", eid)
                return False
            try:
                self.config = config_from_session(msg.get("session") or {}, self.config)
            except OsumError as e:  # config_from_session is total: nothing else comes out of it
                await self.error(e.code, str(e), eid)
                return False
            await self.send(kind.replace(".update", ".updated"), session=_describe(self.config))
        elif kind == "input_audio_buffer.append":
            try:
                pcm = base64.b64decode(msg.get("audio", ""), validate=True)
            except (binascii.Error, TypeError, ValueError):
                await self.error("invalid_audio", "audio must be base64-encoded PCM16", eid)
                return False
            session = await self._open()
            try:
                await session.send(pcm)
            except InvalidConfigError as e:
                await self.error("invalid_audio", str(e), eid)
        elif kind == "input_audio_buffer.commit":
            session = await self._open()
            await session.finalize()
            if msg.get("final"):
                return True
        elif kind == "input_audio_buffer.clear":
            await self.error("unsupported_event", "input_audio_buffer.clear is not supported by this server", eid)
        else:
            await self.error("unknown_event", f"unknown event type {kind!r}", eid)
        return False

    async def _write(self, session: LiveSession) -> None:
        async for ev in session.events():
            try:
                await self._event(ev)
            except ConnectionClosed:
                await session.abort()
                return

    async def _event(self, ev: Event) -> None:
        ext = {"seq": ev.seq, "session_id": ev.session_id}
        if isinstance(ev, SpeechStarted):
            await self.send("input_audio_buffer.speech_started", audio_start_ms=round(ev.start * 1000),
                            item_id=self.item(ev.utterance_id), osum=ext | {"utterance_id": ev.utterance_id})  # fmt: skip
        elif isinstance(ev, Partial):
            sent = self.committed.get(ev.utterance_id, "")
            if len(ev.committed) > len(sent) and ev.committed.startswith(sent):
                self.committed[ev.utterance_id] = ev.committed
                await self.send("conversation.item.input_audio_transcription.delta", item_id=self.item(ev.utterance_id),
                                content_index=0, delta=ev.committed[len(sent):], osum=ext)  # fmt: skip
        elif isinstance(ev, SpeechEnded):
            item = self.item(ev.utterance_id)
            await self.send("input_audio_buffer.speech_stopped", audio_end_ms=round(ev.end * 1000), item_id=item, osum=ext)
        elif isinstance(ev, Final):
            item = self.item(ev.utterance_id)
            await self.send("input_audio_buffer.committed", previous_item_id=self.prev_item, item_id=item)
            self.prev_item = item
            self.committed.pop(ev.utterance_id, None)
            await self.send("conversation.item.input_audio_transcription.completed", item_id=item, content_index=0,
                            transcript=ev.transcript, osum=ext | {"utterance_id": ev.utterance_id, "start": ev.start,
                                                                  "end": ev.end, "reason": ev.reason})  # fmt: skip
        elif isinstance(ev, Analysis):
            tags = {k: {"label": v.label, "score": v.score, "scores": v.scores} for k, v in ev.tags.items()}
            await self.send("osum.analysis", item_id=self.item(ev.utterance_id), tags=tags, reply=ev.reply, osum=ext)
        elif isinstance(ev, ReplyDelta):
            await self.send("osum.reply.delta", item_id=self.item(ev.utterance_id), delta=ev.delta, osum=ext)
        elif isinstance(ev, Error):
            await self.error(ev.code, ev.message)


async def serve_realtime(engine: Engine, ws: ServerConnection, who: Principal, idle_timeout_s: float) -> None:
    """Serve one ``/v1/realtime`` connection until it closes (refusals, at the first audio,
    are answered by :meth:`_Connection.run` like any other error)."""
    await _Connection(engine, ws, who, idle_timeout_s).run()
