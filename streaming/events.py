"""The engine's events: what a session tells its client, in order, with sequence numbers.

Times are seconds from the start of the stream (audio time, not wall time). Every
event carries ``seq``, the session's running count, so a client that reconnects can
say which it has seen; utterances are numbered from 0 per session.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Event", "SpeechStarted", "Partial", "Word", "Final", "Label", "Analysis", "ReplyDelta", "SpeechEnded", "Error",
    "UNSUPPORTED", "event_from_dict",
]  # fmt: skip

UNSUPPORTED = "unsupported"  # the label of a tag this model was not trained and measured on


@dataclass(frozen=True)
class Event:
    seq: int
    session_id: str

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type} | dataclasses.asdict(self)


@dataclass(frozen=True)
class SpeechStarted(Event):
    utterance_id: int
    start: float


@dataclass(frozen=True)
class Partial(Event):
    """An interim hypothesis: ``committed`` never changes within the utterance; ``unstable`` may."""

    utterance_id: int
    committed: str
    unstable: str
    stability: float  # share of the hypothesis that is committed, 0..1
    start: float
    end: float  # audio covered so far
    # wall time from the arrival of the audio up to ``end`` to this event (set by the engine)
    processing_latency_ms: float | None = None


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Final(Event):
    """The utterance's transcript, from the full-context encoder (equals offline recognition)."""

    utterance_id: int
    transcript: str
    start: float
    end: float
    confidence: float | None = None
    words: tuple[Word, ...] = ()
    reason: str = "silence"  # silence | max_length | finalize | end_of_stream
    # wall time from the arrival of the audio up to ``end`` to this event (set by the engine)
    processing_latency_ms: float | None = None


@dataclass(frozen=True)
class Label:
    """One tag: a label with its probability among the task's labels, or ``unsupported``."""

    label: str
    score: float | None = None
    scores: dict[str, float] | None = None


@dataclass(frozen=True)
class Analysis(Event):
    """The utterance's tags, computed after its Final; kinds the session did not ask for are absent."""

    utterance_id: int
    tags: dict[str, Label] = field(default_factory=dict)  # emotion, style, events, gender, age
    reply: str | None = None  # STTC: the model's answer to the utterance
    # wall time from the arrival of the utterance's last audio to this event (set by the engine)
    processing_latency_ms: float | None = None


@dataclass(frozen=True)
class ReplyDelta(Event):
    """Voice chat: the next piece of the model's reply to an utterance, as it is written.

    The pieces join into the reply; the Analysis that follows carries the whole reply."""

    utterance_id: int
    delta: str


@dataclass(frozen=True)
class SpeechEnded(Event):
    utterance_id: int
    end: float
    reason: str


@dataclass(frozen=True)
class Error(Event):
    code: str
    message: str
    fatal: bool = False  # True: the session is over


_TYPES: dict[str, type[Event]] = {c.__name__: c for c in (SpeechStarted, Partial, Final, Analysis, ReplyDelta, SpeechEnded, Error)}


def event_from_dict(d: dict[str, Any]) -> Event:
    """Inverse of :meth:`Event.to_dict` (for the session store's replay)."""
    d = dict(d)
    cls = _TYPES[d.pop("type")]
    if cls is Final:
        d["words"] = tuple(Word(**w) for w in d.get("words", ()))
    if cls is Analysis:
        d["tags"] = {k: Label(**v) for k, v in d.get("tags", {}).items()}
    return cls(**d)
