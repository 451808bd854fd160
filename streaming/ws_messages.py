"""The WebSocket protocol's messages (``/v1/listen``), in the style of Deepgram and AssemblyAI.

Client -> server: binary frames of audio (as declared: PCM16 by default), and JSON text
frames with a ``type``:

* ``Configure`` (optional, before any audio): the same keys as the query string;
* ``KeepAlive``: nothing to do, the connection is alive;
* ``Finalize``: end the current utterance now;
* ``CloseStream``: no more audio; the server sends the remaining results and closes (1000).

Query parameters (or ``Configure`` keys): ``encoding`` (linear16 | float32),
``sample_rate``, ``channels``, ``interim_results`` (true | false), ``partial_step_ms``,
``tasks`` (comma-separated: emotion, style, events, gender, age), ``chat`` (true | false),
``endpointing`` (trailing silence in ms), ``min_speech_ms``, ``max_utterance_s``,
``vad_threshold``, ``eager_final_ms``, ``words`` (true | false: each final's word times),
``partial_context`` (full | chunked: what each partial encodes), ``partial_growth`` (full
context: the step grows to this fraction of the utterance so far; 0 to 1), ``resume`` (a resume token), ``last_seq`` (an integer >= -1) and
``token`` (the API key, already checked before the handshake). :func:`listen_request`
validates them all: a bad value is the client's error (``invalid_config``, close 4400; a
``resume`` that cannot be a token: ``session_not_found``, close 4004), never a crash.

Server -> client: JSON text frames, see :func:`event_message`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from osum.errors import InvalidConfigError

from .audio import AudioFormat
from .engine import SessionNotFoundError
from .events import Analysis, Error, Event, Final, Partial, ReplyDelta, SpeechEnded, SpeechStarted
from .session_base import SessionConfig
from .status import ProtocolError
from .vad import VadOptions

__all__ = [
    "KNOWN_PARAMS", "ClientMessage", "ListenRequest", "ProtocolError", "config_from_params", "event_message", "listen_request",
    "parse_client_text",
]  # fmt: skip

CLIENT_TYPES = ("Configure", "KeepAlive", "Finalize", "CloseStream")
KNOWN_PARAMS = frozenset({
    "encoding", "sample_rate", "channels", "interim_results", "partial_step_ms", "tasks", "chat", "endpointing",
    "min_speech_ms", "max_utterance_s", "vad_threshold", "eager_final_ms", "words", "partial_context", "partial_growth", "resume", "last_seq", "token",
})  # fmt: skip
_ENCODINGS = {"linear16": "pcm16", "pcm16": "pcm16", "float32": "float32"}
MAX_SEQ = (1 << 63) - 1  # seq is an int64 on gRPC: the same bound on both protocols
# ASCII digits only: int() alone would also take " 7", "1_0" and non-ASCII digits such as "\u0663"
_INTEGER = re.compile(r"-?[0-9]{1,19}")
# resume tokens and API keys are visible ASCII; anything else (a space, a control character,
# "é") cannot be one, and non-ASCII text would make hmac.compare_digest raise TypeError
_VISIBLE_ASCII = re.compile(r"[!-~]{1,512}")


@dataclass(frozen=True)
class ClientMessage:
    type: str
    params: dict[str, str]


def parse_client_text(text: str, max_len: int = 65536) -> ClientMessage:
    """Parse one JSON text frame. Raises ProtocolError with the reason, never anything else."""
    if len(text) > max_len:
        raise ProtocolError(f"text message over {max_len} characters")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_TYPES)}")
    params = {k: v for k, v in obj.items() if k != "type"}
    if kind != "Configure" and params:
        raise ProtocolError(f"{kind} takes no fields")
    out: dict[str, str] = {}
    for k, v in params.items():
        if k not in KNOWN_PARAMS:
            raise ProtocolError(f"unknown Configure field {k!r}")
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, (int, float, str)):
            out[k] = str(v)
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = ",".join(v)
        else:
            raise ProtocolError(f"Configure field {k!r} has an unsupported value")
    return ClientMessage(kind, out)


def _bool(name: str, v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise InvalidConfigError(f"{name} must be true or false, got {v!r}")


def _num(name: str, v: str, kind: type) -> Any:
    try:
        return kind(v)
    except ValueError:
        raise InvalidConfigError(f"{name} must be a number, got {v!r}") from None


@dataclass(frozen=True)
class ListenRequest:
    """A validated ``/v1/listen`` request: the session's config and, for a resume, where to continue."""

    config: SessionConfig
    resume: str | None = None  # a resume token (``Begin.resume_token``); None: a new session
    last_seq: int = -1  # the seq of the last event the client processed; -1: none


def _last_seq(v: str | None) -> int:
    if v is None:
        return -1
    if not _INTEGER.fullmatch(v) or not -1 <= int(v) <= MAX_SEQ:
        raise InvalidConfigError(f"last_seq must be an integer from -1 (nothing processed) to {MAX_SEQ}, got {v[:40]!r}")
    return int(v)


def listen_request(p: Mapping[str, str]) -> ListenRequest:
    """Query parameters / Configure fields -> a validated :class:`ListenRequest`.

    Raises:
        InvalidConfigError: an unknown key, or a bad value (``last_seq`` not an integer >= -1,
            ``token`` not an API key's form, any :func:`config_from_params` error).
        SessionNotFoundError: a ``resume`` value that cannot be a resume token (the engine
            checks the signature of one that can: the same error, as documented).
    """
    config = config_from_params(p)
    last_seq = _last_seq(p.get("last_seq"))
    token = p.get("token")
    if token is not None and not _VISIBLE_ASCII.fullmatch(token):
        raise InvalidConfigError("token must be an API key: 1 to 512 visible ASCII characters")
    resume = p.get("resume")
    if resume is not None and not _VISIBLE_ASCII.fullmatch(resume):
        raise SessionNotFoundError("no session to resume: invalid resume token")
    return ListenRequest(config, resume, last_seq)


def config_from_params(p: Mapping[str, str]) -> SessionConfig:
    """Query parameters / Configure fields -> a validated SessionConfig (InvalidConfigError otherwise).

    ``resume``, ``last_seq`` and ``token`` are accepted and not looked at: :func:`listen_request`
    validates them (a server should call that)."""
    unknown = set(p) - KNOWN_PARAMS
    if unknown:
        raise InvalidConfigError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    enc = p.get("encoding", "linear16").lower()
    if enc not in _ENCODINGS:
        raise InvalidConfigError(f"encoding must be linear16 or float32, got {enc!r}")
    audio = AudioFormat(encoding=_ENCODINGS[enc], sample_rate=_num("sample_rate", p.get("sample_rate", "16000"), int),
                        channels=_num("channels", p.get("channels", "1"), int))  # fmt: skip
    d = VadOptions()
    vad = VadOptions(
        min_silence_ms=_num("endpointing", p.get("endpointing", str(d.min_silence_ms)), int),
        min_speech_ms=_num("min_speech_ms", p.get("min_speech_ms", str(d.min_speech_ms)), int),
        max_utterance_s=_num("max_utterance_s", p.get("max_utterance_s", str(d.max_utterance_s)), float),
        threshold=_num("vad_threshold", p.get("vad_threshold", str(d.threshold)), float),
    )
    tasks = tuple(t for t in p.get("tasks", "emotion,style,events").split(",") if t)
    return SessionConfig(
        audio=audio, vad=vad, interim_results=_bool("interim_results", p.get("interim_results", "true")),
        partial_step_ms=_num("partial_step_ms", p.get("partial_step_ms", "480"), int), tasks=tasks,
        chat=_bool("chat", p.get("chat", "false")),
        eager_final_ms=_num("eager_final_ms", p.get("eager_final_ms", str(SessionConfig.eager_final_ms)), int),
        word_times=_bool("words", p.get("words", "false")),
        partial_context=p.get("partial_context", SessionConfig.partial_context),
        partial_growth=_num("partial_growth", p.get("partial_growth", str(SessionConfig.partial_growth)), float),
    )  # fmt: skip


def event_message(ev: Event) -> dict[str, Any]:
    """Engine event -> the JSON object sent to the client.

    ``SpeechStarted``, ``Results`` (interim: ``is_final`` false with ``committed`` and
    ``unstable``; final: ``is_final`` true with ``transcript`` and ``confidence``),
    ``UtteranceEnd``, ``ReplyDelta`` (chat: the next piece of the reply, as it is written),
    ``Analysis`` (``tags``: kind -> {label, score, scores}; ``reply``)
    and ``Error`` (``code``, ``message``, ``fatal``). All carry ``seq`` and ``session_id``.
    ``Results`` and ``Analysis`` also carry ``processing_latency_ms``: the server's wall time
    from the arrival of the audio they cover to the event (null when the engine did not set it).
    """
    base = {"seq": ev.seq, "session_id": ev.session_id}
    if isinstance(ev, SpeechStarted):
        return {"type": "SpeechStarted", **base, "utterance_id": ev.utterance_id, "timestamp": ev.start}
    if isinstance(ev, Partial):
        return {"type": "Results", **base, "utterance_id": ev.utterance_id, "is_final": False, "committed": ev.committed,
                "unstable": ev.unstable, "transcript": ev.committed + ev.unstable, "stability": round(ev.stability, 3),
                "start": ev.start, "end": ev.end, "words": [], "processing_latency_ms": ev.processing_latency_ms}  # fmt: skip
    if isinstance(ev, Final):
        return {"type": "Results", **base, "utterance_id": ev.utterance_id, "is_final": True, "transcript": ev.transcript,
                "committed": ev.transcript, "unstable": "", "confidence": ev.confidence, "start": ev.start, "end": ev.end,
                "words": [{"word": w.text, "start": w.start, "end": w.end} for w in ev.words], "reason": ev.reason,
                "processing_latency_ms": ev.processing_latency_ms}  # fmt: skip
    if isinstance(ev, ReplyDelta):
        return {"type": "ReplyDelta", **base, "utterance_id": ev.utterance_id, "delta": ev.delta}
    if isinstance(ev, SpeechEnded):
        return {"type": "UtteranceEnd", **base, "utterance_id": ev.utterance_id, "last_word_end": ev.end, "reason": ev.reason}
    if isinstance(ev, Analysis):
        tags = {k: {"label": v.label, "score": v.score, "scores": v.scores} for k, v in ev.tags.items()}
        return {"type": "Analysis", **base, "utterance_id": ev.utterance_id, "tags": tags, "reply": ev.reply,
                "processing_latency_ms": ev.processing_latency_ms}  # fmt: skip
    assert isinstance(ev, Error)
    return {"type": "Error", **base, "code": ev.code, "message": ev.message, "fatal": ev.fatal}
