"""Stream audio to osum-live over WebSocket or gRPC and get typed events back.

    from osum_client import AsyncClient, StreamOptions, from_file

    async with AsyncClient("ws://127.0.0.1:8080", api_key="...") as client:     # or grpc://127.0.0.1:50051
        async for ev in client.stream(from_file("call.wav"), StreamOptions(tasks=("emotion",))):
            print(ev)

The source is any iterable or async iterable of PCM16 chunks; put :data:`FINALIZE` in it to
end the current utterance at once. Sources are paced at real time by default
(``StreamOptions.realtime``). While the source is quiet the client sends KeepAlive. If the
connection drops or the server restarts, the client reconnects with the resume token,
acknowledges the last event it yielded (the server replays later results, none twice) and
re-sends the audio the server had not heard yet (it keeps the last ``replay_s`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from .events import Begin, Error, Event, from_grpc, from_ws
from .sources import aiter_chunks, paced

__all__ = ["AsyncClient", "Client", "StreamOptions", "FINALIZE", "ConnectionFailed"]

FINALIZE = object()  # put in a source to end the current utterance now
_END = object()
_RETRY_WS_CODES = {1001, 1006, 1011, 1012}  # going away, dropped, server error, restarting


class ConnectionFailed(Exception):
    """The server could not be reached (after ``StreamOptions.reconnects`` tries)."""


class _Dropped(Exception):
    """The connection ended in a way that resuming may fix."""


class _Refused(Exception):
    def __init__(self, error: Error) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class StreamOptions:
    """What a stream asks of the server, and how the client behaves."""

    sample_rate: int = 16000
    tasks: tuple[str, ...] = ("emotion", "style", "events")
    interim_results: bool = True
    chat: bool = False
    endpointing_ms: int | None = None  # trailing silence that ends an utterance (server default 600)
    eager_final_ms: int | None = None  # start the final pass after this much silence (server default 200; 0: off)
    words: bool = False  # each Final's words with their times (Final.words)
    partial_step_ms: int | None = None  # audio between partials, a multiple of 80 (server default 480)
    partial_context: str | None = None  # "full" (server default) or "chunked": what each partial encodes
    partial_growth: float | None = None  # full context: the step grows to this share of the utterance (default 0.1)
    realtime: bool = True  # pace the source at real time; False: as fast as the server takes it
    keepalive_s: float = 5.0
    reconnects: int = 3
    replay_s: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)  # more query parameters (WebSocket)

    def __post_init__(self) -> None:
        if not 8000 <= self.sample_rate <= 48000:
            raise ValueError("sample_rate must be in [8000, 48000]")
        if self.keepalive_s <= 0 or self.reconnects < 0 or self.replay_s < 0:
            raise ValueError("keepalive_s > 0, reconnects >= 0 and replay_s >= 0 are required")


# ---- one connection per protocol ---------------------------------------------------------


class _WsConnection:
    def __init__(self, base: str, api_key: str | None) -> None:
        self.base, self.api_key = base.rstrip("/"), api_key
        self.ws: Any = None

    async def open(self, opt: StreamOptions, token: str | None, last_seq: int) -> Begin:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        q = {"encoding": "linear16", "sample_rate": str(opt.sample_rate), "tasks": ",".join(opt.tasks),
             "interim_results": str(opt.interim_results).lower(), "chat": str(opt.chat).lower(),
             "words": str(opt.words).lower(), **opt.extra}  # fmt: skip
        if opt.endpointing_ms is not None:
            q["endpointing"] = str(opt.endpointing_ms)
        if opt.eager_final_ms is not None:
            q["eager_final_ms"] = str(opt.eager_final_ms)
        for name in ("partial_step_ms", "partial_context", "partial_growth"):
            if (value := getattr(opt, name)) is not None:
                q[name] = str(value)
        if token:
            q |= {"resume": token, "last_seq": str(last_seq)}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            self.ws = await connect(f"{self.base}/v1/listen?{urlencode(q)}", additional_headers=headers, max_size=1 << 22)
        except InvalidStatus as e:
            body = e.response.body or b"{}"
            with contextlib.suppress(ValueError):
                m = json.loads(body)
                raise _Refused(Error(-1, "", m.get("code", "http_error"), m.get("message", ""), True)) from None
            raise _Refused(Error(-1, "", "http_error", f"HTTP {e.response.status_code}", True)) from None
        except OSError as e:
            raise _Dropped(str(e)) from e
        first = await self.recv()
        if isinstance(first, Begin):
            return first
        if isinstance(first, Error):
            raise _Refused(first)
        raise _Dropped("the server closed before the session began")

    async def recv(self) -> Event | None:
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                raw = await self.ws.recv()
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else 1006
                if code in _RETRY_WS_CODES:
                    raise _Dropped(f"closed {code}") from None
                return None
            if isinstance(raw, str) and (ev := from_ws(json.loads(raw))) is not None:
                return ev

    async def send_audio(self, chunk: bytes) -> None:
        await self._send(chunk)

    async def control(self, kind: str) -> None:  # Finalize | KeepAlive | CloseStream
        await self._send(json.dumps({"type": kind}))

    async def _send(self, data: str | bytes) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self.ws.send(data)
        except ConnectionClosed as e:
            raise _Dropped(str(e)) from None

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class _GrpcConnection:
    def __init__(self, target: str, api_key: str | None) -> None:
        self.target, self.api_key = target, api_key
        self.channel: Any = None
        self.call: Any = None
        self.fatal: Error | None = None  # the in-band error that precedes an error status
        self.requests: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)  # small: backpressure reaches the source

    async def open(self, opt: StreamOptions, token: str | None, last_seq: int) -> Begin:
        import grpc

        from .proto import speech_pb2 as pb
        from .proto import speech_pb2_grpc

        rc = pb.RecognitionConfig(encoding=pb.RecognitionConfig.LINEAR16, sample_rate_hertz=opt.sample_rate,
                                  analysis_tasks=list(opt.tasks), enable_chat_reply=opt.chat,
                                  enable_word_time_offsets=opt.words)  # fmt: skip
        if opt.endpointing_ms is not None:
            rc.endpointing_config.min_silence_ms = opt.endpointing_ms
        if opt.eager_final_ms is not None:
            rc.endpointing_config.eager_final_ms = opt.eager_final_ms
        sc = pb.StreamingRecognitionConfig(config=rc, interim_results=opt.interim_results,
                                           partial_step_ms=opt.partial_step_ms or 0, partial_context=opt.partial_context or "")  # fmt: skip
        if opt.partial_growth is not None:
            sc.partial_growth = opt.partial_growth
        if token:
            sc.resume_token, sc.last_seq = token, last_seq
        self.channel = grpc.aio.insecure_channel(self.target, options=[("grpc.max_send_message_length", 4 << 20)])
        md = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
        await self.requests.put(pb.StreamingRecognizeRequest(streaming_config=sc))
        self.call = speech_pb2_grpc.SpeechStub(self.channel).StreamingRecognize(self._requests(), metadata=md)
        # audio only after the begin response: a refusal then never races with our own writes
        first = await self.recv()
        if isinstance(first, Begin):
            return first
        raise _Dropped("the stream ended before the session began")

    async def _requests(self) -> AsyncIterator[Any]:
        while (req := await self.requests.get()) is not _END:
            yield req

    async def recv(self) -> Event | None:
        import grpc

        while True:
            try:
                r = await self.call.read()
            except grpc.aio.AioRpcError as e:
                if self.fatal is not None and self.fatal.code != "shutting_down":
                    return None  # the server said why in-band, and that was yielded
                raise self._error(e) from None
            if r is grpc.aio.EOF:
                return None
            if (ev := from_grpc(r)) is not None:
                if isinstance(ev, Error) and ev.fatal:
                    # the server ends the call next; this says why even when grpc loses the status
                    self.fatal = ev
                    if ev.code == "shutting_down":
                        continue  # not the user's concern: the client resumes elsewhere
                return ev

    def _error(self, e: Any) -> Exception:
        import grpc

        code = dict(e.trailing_metadata() or ()).get("osum-code") or e.code().name.lower()
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            return _Dropped(e.details() or "unavailable")
        if e.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (e.debug_error_string() or ""):
            # grpc/grpc#36066: our own write, racing the call's end, replaced the server's status.
            # Resuming asks the server what became of the session.
            return _Dropped("the call ended while the client was writing")
        return _Refused(Error(-1, "", code, e.details() or "", True))

    async def send_audio(self, chunk: bytes) -> None:
        from .proto import speech_pb2 as pb

        await self._put(pb.StreamingRecognizeRequest(audio_content=chunk))

    async def control(self, kind: str) -> None:
        from .proto import speech_pb2 as pb

        if kind == "CloseStream":
            await self._put(_END)
            return
        k = pb.ControlMessage.FINALIZE if kind == "Finalize" else pb.ControlMessage.KEEP_ALIVE
        await self._put(pb.StreamingRecognizeRequest(control=pb.ControlMessage(kind=k)))

    async def _put(self, req: Any) -> None:
        if self.call is not None and self.call.done():
            raise _Dropped("the call has ended")
        await self.requests.put(req)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


# ---- the client ---------------------------------------------------------------------------


@dataclass
class _Sent:
    """Audio sent but maybe not heard: (first sample, chunk), newest last; and the source's state."""

    rate: int
    keep_s: float
    chunks: deque[tuple[int, bytes]] = field(default_factory=deque)
    samples: int = 0
    source_done: bool = False

    def add(self, chunk: bytes) -> None:
        self.chunks.append((self.samples, chunk))
        self.samples += len(chunk) // 2
        while self.chunks and self.chunks[0][0] < self.samples - self.keep_s * self.rate:
            self.chunks.popleft()

    def after(self, seconds: float) -> Iterator[bytes]:
        """The kept audio from ``seconds`` of stream time on (the part a resumed server has not heard)."""
        start = int(round(seconds * self.rate))
        for first, chunk in self.chunks:
            end = first + len(chunk) // 2
            if end > start:
                yield chunk[2 * max(0, start - first) :]


class AsyncClient:
    """A client for one server. ``url``: ``ws://host:port`` (WebSocket ``/v1/listen``) or
    ``grpc://host:port``; ``api_key``: sent as a bearer token."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss", "grpc"):
            raise ValueError(f"url must start with ws://, wss:// or grpc://, got {url!r}")
        self.url, self.api_key = url, api_key
        self.protocol = "grpc" if parts.scheme == "grpc" else "ws"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _connection(self) -> _WsConnection | _GrpcConnection:
        if self.protocol == "grpc":
            return _GrpcConnection(urlsplit(self.url).netloc, self.api_key)
        return _WsConnection(self.url, self.api_key)

    async def stream(self, source: Iterable[Any] | AsyncIterable[Any], options: StreamOptions | None = None) -> AsyncIterator[Event]:
        """Stream ``source`` and yield events until the server has sent the last result.

        A refusal (bad key, over capacity, bad config) is yielded as a fatal :class:`Error`.
        Raises :class:`ConnectionFailed` when the server cannot be reached after the retries.
        """
        opt = options or StreamOptions()
        chunks: asyncio.Queue[Any] = asyncio.Queue(maxsize=16)
        pump = asyncio.create_task(self._pump(source, opt, chunks))
        sent = _Sent(opt.sample_rate, opt.replay_s)
        token, last_seq, failures = None, -1, 0
        try:
            while True:
                conn = self._connection()
                sender: asyncio.Task[None] | None = None
                try:
                    begin = await conn.open(opt, token, last_seq)
                    failures = 0
                    token = begin.resume_token
                    yield begin
                    sender = asyncio.create_task(self._send(conn, chunks, sent, begin.audio_offset, opt))
                    while (ev := await conn.recv()) is not None:
                        last_seq = max(last_seq, ev.seq)
                        yield ev
                    return
                except _Refused as e:
                    yield e.error
                    return
                except _Dropped as e:
                    failures += 1
                    if failures > opt.reconnects:
                        raise ConnectionFailed(f"{self.url}: {e}") from None
                    await asyncio.sleep(min(0.25 * 2**failures, 4.0))
                finally:
                    if sender is not None:
                        sender.cancel()
                        with contextlib.suppress(asyncio.CancelledError, _Dropped):
                            await sender
                    await conn.close()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, source: Iterable[Any] | AsyncIterable[Any], opt: StreamOptions, out: asyncio.Queue[Any]) -> None:
        items = paced(source, opt.sample_rate) if opt.realtime else aiter_chunks(source)
        async for item in items:
            await out.put(item)
        await out.put(_END)

    async def _send(self, conn: Any, chunks: asyncio.Queue[Any], sent: _Sent, offset: float, opt: StreamOptions) -> None:
        for chunk in list(sent.after(offset)):  # what the server had not heard before this connection
            await conn.send_audio(chunk)
        while not sent.source_done:
            try:
                item = await asyncio.wait_for(chunks.get(), opt.keepalive_s)
            except TimeoutError:
                await conn.control("KeepAlive")
                continue
            if item is _END:
                sent.source_done = True
            elif item is FINALIZE:
                await conn.control("Finalize")
            else:
                sent.add(item)
                await conn.send_audio(item)
        await conn.control("CloseStream")


class Client:
    """The synchronous face of :class:`AsyncClient` (an event loop in a background thread)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self._async = AsyncClient(url, api_key)

    def stream(self, source: Iterable[Any], options: StreamOptions | None = None) -> Iterator[Event]:
        out: queue.Queue[Any] = queue.Queue(maxsize=256)

        async def run() -> None:
            try:
                async for ev in self._async.stream(source, options):
                    await asyncio.to_thread(out.put, ev)
            except BaseException as e:  # handed to the caller's thread
                out.put(e)
            finally:
                out.put(_END)

        thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
        thread.start()
        while (item := out.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
        thread.join()
