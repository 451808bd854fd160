"""gRPC: ``osum.speech.v1.Speech`` over the engine (``grpc.aio``).

The servicer only translates: the first request's ``streaming_config`` becomes a
:class:`SessionConfig`, audio chunks and control messages become engine calls, engine
events become :class:`StreamingRecognizeResponse` messages. Errors map once, through
:mod:`streaming.status`, to status codes. HTTP/2 flow control gives backpressure: the
request reader awaits each ``send``, so a client faster than the engine is slowed, not
buffered.

Auth (:mod:`streaming.auth`): ``authorization: Bearer <key>`` metadata, checked once the
config message is read and before anything else (UNAUTHENTICATED otherwise). Health checking and reflection need no
key. A stream that sends nothing for ``idle_timeout_s`` ends with DEADLINE_EXCEEDED.

Drain (the engine stops accepting, then finishes every open utterance): a stream the server
ends this way gets its last results, then UNAVAILABLE (``shutting_down``), so the client
resumes elsewhere with its token; a stream opened while draining is refused the same way.
Request bytes that do not parse are a ``protocol_error`` (INVALID_ARGUMENT), like any other
malformed input, not grpc's own UNKNOWN.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from osum.errors import InvalidConfigError, OsumError

from .audio import AudioFormat
from .auth import Authenticator, Principal, credential_from
from .engine import Engine, ShuttingDownError
from .events import Analysis, Error, Event, Final, Partial, ReplyDelta, SpeechEnded, SpeechStarted
from .proto import speech_pb2 as pb
from .proto import speech_pb2_grpc
from .session_base import SessionConfig
from .status import RETRY_AFTER_S, RETRY_CODES, IdleTimeoutError, ProtocolError, grpc_status, with_hint
from .vad import VadOptions

__all__ = [
    "SpeechServicer",
    "add_to_server",
    "audio_format",
    "serve",
    "session_config",
    "to_response",
]

log = logging.getLogger("streaming.grpc")

_ENCODINGS = {pb.RecognitionConfig.ENCODING_UNSPECIFIED: "pcm16", pb.RecognitionConfig.LINEAR16: "pcm16",
              pb.RecognitionConfig.FLOAT32: "float32"}  # fmt: skip


def audio_format(c: pb.RecognitionConfig) -> AudioFormat:
    """The raw audio format a RecognitionConfig declares (InvalidConfigError if unusable)."""
    if c.encoding not in _ENCODINGS:
        raise InvalidConfigError(f"unsupported encoding {c.encoding}")
    return AudioFormat(encoding=_ENCODINGS[c.encoding], sample_rate=c.sample_rate_hertz or 16000,
                       channels=c.audio_channel_count or 1)  # fmt: skip


def session_config(sc: pb.StreamingRecognitionConfig) -> SessionConfig:
    """Validate a streaming config once. Raises InvalidConfigError with the reason."""
    c = sc.config
    audio = audio_format(c)
    vad = VadOptions()
    eager = SessionConfig.eager_final_ms
    if c.HasField("endpointing_config"):
        e = c.endpointing_config
        vad = VadOptions(
            threshold=e.threshold or vad.threshold, min_silence_ms=e.min_silence_ms or vad.min_silence_ms,
            min_speech_ms=e.min_speech_ms or vad.min_speech_ms, max_utterance_s=e.max_utterance_s or vad.max_utterance_s,
        )  # fmt: skip
        if e.HasField("eager_final_ms"):
            eager = e.eager_final_ms
    return SessionConfig(
        audio=audio, vad=vad, interim_results=sc.interim_results, partial_step_ms=sc.partial_step_ms or 480,
        tasks=tuple(c.analysis_tasks), chat=c.enable_chat_reply, eager_final_ms=eager,
        word_times=c.enable_word_time_offsets, partial_context=sc.partial_context or SessionConfig.partial_context,
        partial_growth=sc.partial_growth if sc.HasField("partial_growth") else SessionConfig.partial_growth,
    )  # fmt: skip


class _Malformed:
    """What the lenient deserializer hands over instead of a message whose bytes do not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises. grpc turns a deserializer's exception into
    UNKNOWN ("Unexpected DecodeError") before the servicer sees anything; handing the servicer
    a :class:`_Malformed` instead lets it refuse with ``protocol_error`` like other bad input."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as e:
            return _Malformed(str(e))

    return deserialize


def _parsed(req: Any, what: str) -> Any:
    """``req`` itself, or ProtocolError when its bytes were not a ``what``."""
    if isinstance(req, _Malformed):
        raise ProtocolError(f"the request bytes are not a valid {what} ({req.reason})")
    return req


def to_response(ev: Event) -> pb.StreamingRecognizeResponse:
    """The wire form of one engine event."""
    r = pb.StreamingRecognizeResponse(seq=ev.seq, session_id=ev.session_id)
    latency = getattr(ev, "processing_latency_ms", None)  # Partial, Final, Analysis; None when unknown
    if latency is not None:
        r.processing_latency_ms = latency
    if isinstance(ev, SpeechStarted):
        r.speech_event_type = pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_BEGIN
        r.speech_event_time = ev.start
        r.speech_event_utterance_id = ev.utterance_id
    elif isinstance(ev, SpeechEnded):
        r.speech_event_type = pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_END
        r.speech_event_time = ev.end
        r.speech_event_utterance_id = ev.utterance_id
    elif isinstance(ev, Partial):
        r.results.append(pb.StreamingRecognitionResult(
            alternatives=[pb.SpeechRecognitionAlternative(transcript=ev.committed + ev.unstable)],
            is_final=False, stability=ev.stability, result_start_time=ev.start, result_end_time=ev.end,
            utterance_id=ev.utterance_id, committed_transcript=ev.committed, unstable_transcript=ev.unstable,
        ))  # fmt: skip
    elif isinstance(ev, Final):
        words = [pb.WordInfo(word=w.text, start_time=w.start, end_time=w.end) for w in ev.words]
        r.results.append(pb.StreamingRecognitionResult(
            alternatives=[pb.SpeechRecognitionAlternative(transcript=ev.transcript, confidence=ev.confidence or 0.0, words=words)],
            is_final=True, stability=1.0, result_start_time=ev.start, result_end_time=ev.end, utterance_id=ev.utterance_id,
        ))  # fmt: skip
    elif isinstance(ev, Analysis):
        tags = {k: pb.Label(label=v.label, score=v.score or 0.0, scores=v.scores or {}) for k, v in ev.tags.items()}
        r.analysis.CopyFrom(pb.Analysis(utterance_id=ev.utterance_id, tags=tags, reply=ev.reply or ""))
    elif isinstance(ev, ReplyDelta):
        r.reply_delta.CopyFrom(pb.ReplyDelta(utterance_id=ev.utterance_id, delta=ev.delta))
    elif isinstance(ev, Error):
        r.error.CopyFrom(pb.StreamError(code=ev.code, message=ev.message, fatal=ev.fatal))
    return r


class SpeechServicer(speech_pb2_grpc.SpeechServicer):
    """``osum.speech.v1.Speech`` over ``engine``. Register it with :func:`add_to_server` (which
    also makes unparsable requests a ``protocol_error``), not the generated function."""

    def __init__(self, engine: Engine, auth: Authenticator | None = None, idle_timeout_s: float = 30.0) -> None:
        self.engine = engine
        self.auth = auth or Authenticator()
        self.idle_timeout_s = idle_timeout_s
        self._cleanups: set[asyncio.Task[None]] = set()  # strong references: see StreamingRecognize

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        try:
            return await self.auth.authenticate(credential_from(context.invocation_metadata() or ()))
        except OsumError as e:
            await _abort(self.engine, context, e)
            raise  # not reached: abort raises

    async def StreamingRecognize(  # noqa: N802 (gRPC's method name)
        self, requests: AsyncIterator[pb.StreamingRecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamingRecognizeResponse]:
        try:
            first = await asyncio.wait_for(anext(requests), self.idle_timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            await _abort(self.engine, context, IdleTimeoutError(f"no streaming_config within {self.idle_timeout_s:g} s"))
        # Auth after reading the config message, before any work: refusing while the client is
        # still writing its first message makes grpc-python clients report INTERNAL instead of
        # our status (their writer's error wins). Clients should send audio after the begin response.
        who = await self._principal(context)
        try:
            if _parsed(first, "StreamingRecognizeRequest").WhichOneof("streaming_request") != "streaming_config":
                raise ProtocolError("the first message must carry streaming_config, and only it")
            cfg = session_config(first.streaming_config)
            sc = first.streaming_config
            session = await self.engine.open_session(cfg, resume=sc.resume_token or None,
                                                     last_seq=sc.last_seq if sc.resume_token else -1, owner=who.name)  # fmt: skip
        except OsumError as e:  # a draining engine says shutting_down: UNAVAILABLE, resume elsewhere
            await _abort(self.engine, context, e)
        reader = asyncio.create_task(self._read(requests, session))
        try:
            yield pb.StreamingRecognizeResponse(seq=-1, session_id=session.id, resume_token=session.resume_token,
                                                audio_offset=session.audio_offset)  # fmt: skip
            async for ev in session.events():
                yield to_response(ev)
            ending: BaseException | None = None
            if reader.done() and reader.exception() is not None:
                ending = reader.exception()
            elif not reader.done() and not self.engine.accepting:
                # The session ended on the server's side (the client had not half-closed) because the
                # server drains: every result of the open utterance has been sent above. A plain OK
                # would read as "the stream is complete"; UNAVAILABLE tells the client to resume.
                ending = ShuttingDownError("the server is shutting down; resume the session on another replica")
            if ending is not None:
                # Said in-band first: a client still writing when the status arrives may be shown
                # INTERNAL by grpc-python instead of our status (grpc/grpc#36066); the message it
                # has already read says what happened.
                code, text = _said(ending)
                yield pb.StreamingRecognizeResponse(seq=-1, session_id=session.id,
                                                    error=pb.StreamError(code=code, message=text, fatal=True))
                await _abort(self.engine, context, ending)
        finally:
            reader.cancel()
            # A cancelled call (the client went away) may be cancelled again while this cleans up,
            # and a reader cancelled before it ever ran skips its own finally: either would leave
            # the session open for good, holding its place. The cleanup runs in its own task.
            cleanup = asyncio.create_task(_settle(reader, session))
            self._cleanups.add(cleanup)
            cleanup.add_done_callback(self._cleanups.discard)
            await asyncio.shield(cleanup)

    async def _read(self, requests: AsyncIterator[pb.StreamingRecognizeRequest], session: Any) -> None:
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):  # no task per message, unlike wait_for
                        req = await anext(requests)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise IdleTimeoutError(f"nothing received for {self.idle_timeout_s:g} s") from None
                kind = _parsed(req, "StreamingRecognizeRequest").WhichOneof("streaming_request")
                if kind == "audio_content":
                    await session.send(req.audio_content)
                elif kind == "control":
                    if req.control.kind == pb.ControlMessage.FINALIZE:
                        await session.finalize()
                elif kind == "streaming_config":
                    raise ProtocolError("streaming_config is only allowed in the first message")
                else:
                    raise ProtocolError("empty request")
        finally:
            await session.end()

    async def Recognize(self, request: pb.RecognizeRequest, context: grpc.aio.ServicerContext) -> pb.RecognizeResponse:  # noqa: N802
        from .recognize import recognize_file

        who = await self._principal(context)
        try:
            request = _parsed(request, "RecognizeRequest")
            finals, analyses = await recognize_file(self.engine, request.config, request.audio, who.name)
        except OsumError as e:
            await _abort(self.engine, context, e)
        return pb.RecognizeResponse(
            results=[to_response(f).results[0] for f in finals], analyses=[to_response(a).analysis for a in analyses]
        )


async def _settle(reader: asyncio.Task[None], session: Any) -> None:
    """After a call: the reader finished (its outcome was reported, or is moot: after an abort grpc
    fails the read it waited in), the session's input ended, and what was heard finished and
    stored (kept for a resume) if the client left first."""
    await asyncio.gather(reader, return_exceptions=True)
    await session.abort()  # end() is idempotent; then wait until the session has closed


def _said(e: BaseException) -> tuple[str, str]:
    """What the client is told of ``e``: its code and message ("internal" for a bug of ours)."""
    return (e.code, with_hint(e.code, str(e))) if isinstance(e, OsumError) else ("internal", "internal error")


async def _abort(engine: Engine, context: grpc.aio.ServicerContext, e: BaseException) -> None:
    """End the call with ``e``'s status (counted in ``osum_calls_failed_total``); raises."""
    code, text = _said(e)
    engine.metrics.failed.labels("grpc", code).inc()
    if not isinstance(e, OsumError):
        log.error("internal error", exc_info=e)
    # osum-code: the error's own code (as on the WebSocket), finer than the status
    retry = (("retry-after", str(RETRY_AFTER_S)),) if code in RETRY_CODES else ()
    context.set_trailing_metadata((("osum-code", code), *retry))
    await context.abort(grpc_status(code) if isinstance(e, OsumError) else grpc.StatusCode.INTERNAL, text)


def add_to_server(servicer: SpeechServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as the generated ``add_SpeechServicer_to_server`` does, but with
    request deserializers that hand unparsable bytes to the servicer (see :func:`_lenient`)."""
    handlers = {
        "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
            servicer.StreamingRecognize,
            request_deserializer=_lenient(pb.StreamingRecognizeRequest.FromString),
            response_serializer=pb.StreamingRecognizeResponse.SerializeToString,
        ),
        "Recognize": grpc.unary_unary_rpc_method_handler(
            servicer.Recognize,
            request_deserializer=_lenient(pb.RecognizeRequest.FromString),
            response_serializer=pb.RecognizeResponse.SerializeToString,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["Speech"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)  # the fast path for stubs' registered methods


async def serve(engine: Engine, host: str = "127.0.0.1", port: int = 0, auth: Authenticator | None = None,
                idle_timeout_s: float = 30.0, max_message_bytes: int = 2 << 20,
                reuse_port: bool = False) -> tuple[grpc.aio.Server, int]:  # fmt: skip
    """Start a gRPC server for ``engine``; returns it and the bound port.

    ``reuse_port``: share the port with other processes (``SO_REUSEPORT``: osum-serve's
    workers). Off, a port another process holds is an error (gRPC's own default is on, which
    would silently split the connections with whoever holds it).
    Raises InvalidConfigError when the port cannot be bound."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", int(reuse_port))])  # fmt: skip
    add_to_server(SpeechServicer(engine, auth, idle_timeout_s), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    service = pb.DESCRIPTOR.services_by_name["Speech"].full_name
    reflection.enable_server_reflection((service, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpcio: "Failed to bind to address ..."
        raise InvalidConfigError(f"gRPC cannot listen on {host}:{port} (in use?): {e}") from None
    await server.start()
    serving = health_pb2.HealthCheckResponse.SERVING
    for name in ("", service):
        await checker.set(name, serving)
    server.osum_health = checker  # type: ignore[attr-defined]  # osum-serve marks NOT_SERVING on drain
    return server, bound
