"""Typed events, the same for both protocols, parsed from the wire.

Every event has ``seq`` (per session, continuing across resumes; acknowledge the last
one you processed when you resume) and ``session_id``. Times are seconds from the
start of the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "Begin", "SpeechStarted", "Partial", "Final", "Word", "Tag", "Analysis", "ReplyDelta", "UtteranceEnd", "Error",
           "from_ws", "from_grpc"]  # fmt: skip


@dataclass(frozen=True)
class Event:
    seq: int
    session_id: str


@dataclass(frozen=True)
class Begin(Event):
    """The session is open. Keep ``resume_token`` to continue it after a disconnect."""

    resume_token: str
    audio_offset: float = 0.0  # seconds of this stream already heard (non-zero on a resume)


@dataclass(frozen=True)
class SpeechStarted(Event):
    utterance_id: int
    start: float


@dataclass(frozen=True)
class Partial(Event):
    """A running hypothesis: ``committed`` never changes within the utterance, ``unstable`` may."""

    utterance_id: int
    committed: str
    unstable: str
    stability: float
    start: float
    end: float

    @property
    def text(self) -> str:
        return self.committed + self.unstable


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True)
class Final(Event):
    """The utterance's final transcript (computed on the whole utterance)."""

    utterance_id: int
    transcript: str
    start: float
    end: float
    confidence: float | None = None
    words: tuple[Word, ...] = ()


@dataclass(frozen=True)
class Tag:
    """A label with its probability among the task's labels; ``unsupported`` when the model has no such skill."""

    label: str
    score: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis(Event):
    """An utterance's tags (emotion, style, events, gender, age) and, in chat mode, the reply."""

    utterance_id: int
    tags: dict[str, Tag]
    reply: str | None = None


@dataclass(frozen=True)
class ReplyDelta(Event):
    """Voice chat: the next piece of the model's reply, as it is written (the Analysis has it whole)."""

    utterance_id: int
    delta: str


@dataclass(frozen=True)
class UtteranceEnd(Event):
    utterance_id: int
    end: float


@dataclass(frozen=True)
class Error(Event):
    """An error from the server. ``fatal`` ones end the stream."""

    code: str
    message: str
    fatal: bool = False


def _tags(raw: dict[str, Any]) -> dict[str, Tag]:
    return {k: Tag(v.get("label", ""), v.get("score"), dict(v.get("scores") or {})) for k, v in raw.items()}


def from_ws(m: dict[str, Any]) -> Event | None:
    """A ``/v1/listen`` JSON message -> an event (None for types this SDK does not know)."""
    base = {"seq": int(m.get("seq", -1)), "session_id": m.get("session_id", "")}
    kind = m.get("type")
    if kind == "Begin":
        return Begin(**base, resume_token=m["resume_token"], audio_offset=float(m.get("audio_offset", 0.0)))
    if kind == "SpeechStarted":
        return SpeechStarted(**base, utterance_id=m["utterance_id"], start=m["timestamp"])
    if kind == "Results" and not m.get("is_final"):
        return Partial(**base, utterance_id=m["utterance_id"], committed=m["committed"], unstable=m["unstable"],
                       stability=m["stability"], start=m["start"], end=m["end"])  # fmt: skip
    if kind == "Results":
        words = tuple(Word(w["word"], w["start"], w["end"]) for w in m.get("words", []))
        return Final(**base, utterance_id=m["utterance_id"], transcript=m["transcript"], start=m["start"], end=m["end"],
                     confidence=m.get("confidence"), words=words)  # fmt: skip
    if kind == "Analysis":
        return Analysis(**base, utterance_id=m["utterance_id"], tags=_tags(m.get("tags", {})), reply=m.get("reply"))
    if kind == "ReplyDelta":
        return ReplyDelta(**base, utterance_id=m["utterance_id"], delta=m["delta"])
    if kind == "UtteranceEnd":
        return UtteranceEnd(**base, utterance_id=m["utterance_id"], end=m["last_word_end"])
    if kind == "Error":
        return Error(**base, code=m.get("code", "unknown"), message=m.get("message", ""), fatal=bool(m.get("fatal")))
    return None


def from_grpc(r: Any) -> Event | None:
    """A ``StreamingRecognizeResponse`` -> an event."""
    from .proto import speech_pb2 as pb

    base = {"seq": r.seq, "session_id": r.session_id}
    if r.resume_token:
        return Begin(**base, resume_token=r.resume_token, audio_offset=r.audio_offset)
    if r.HasField("error"):
        return Error(**base, code=r.error.code, message=r.error.message, fatal=r.error.fatal)
    if r.HasField("reply_delta"):
        return ReplyDelta(**base, utterance_id=r.reply_delta.utterance_id, delta=r.reply_delta.delta)
    if r.HasField("analysis"):
        a = r.analysis
        tags = {k: Tag(v.label, v.score, dict(v.scores)) for k, v in a.tags.items()}
        return Analysis(**base, utterance_id=a.utterance_id, tags=tags, reply=a.reply or None)
    if r.speech_event_type == pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_BEGIN:
        return SpeechStarted(**base, utterance_id=r.speech_event_utterance_id, start=r.speech_event_time)
    if r.speech_event_type == pb.StreamingRecognizeResponse.SPEECH_ACTIVITY_END:
        return UtteranceEnd(**base, utterance_id=r.speech_event_utterance_id, end=r.speech_event_time)
    for res in r.results:
        alt = res.alternatives[0] if res.alternatives else None
        if res.is_final:
            words = tuple(Word(w.word, w.start_time, w.end_time) for w in alt.words) if alt else ()
            return Final(**base, utterance_id=res.utterance_id, transcript=alt.transcript if alt else "",
                         start=res.result_start_time, end=res.result_end_time, confidence=alt.confidence if alt else None,
                         words=words)  # fmt: skip
        return Partial(**base, utterance_id=res.utterance_id, committed=res.committed_transcript,
                       unstable=res.unstable_transcript, stability=res.stability, start=res.result_start_time,
                       end=res.result_end_time)  # fmt: skip
    return None
